"""Cost of `noise.ignore_scheduler_warnings`, called wherever the package builds, sets or steps a scheduler: with the
two filters in place (the usual case: a look at the list's first entries), and behind a filter that outranks them
(pytest's per-test filters), where it puts them back in front.

    python benchmarks/warning_filters.py
"""

from __future__ import annotations

import timeit
import warnings

from diffusers_sr3.noise import ignore_scheduler_warnings


def main() -> None:
    calls = 100_000
    with warnings.catch_warnings():
        ignore_scheduler_warnings()
        in_place = min(timeit.repeat(ignore_scheduler_warnings, number=calls, repeat=5)) / calls
    with warnings.catch_warnings():

        def outranked() -> None:
            warnings.simplefilter("error", DeprecationWarning)
            ignore_scheduler_warnings()

        put_back = min(timeit.repeat(outranked, number=calls // 10, repeat=5)) / (calls // 10)
    print(f"filters in place: {in_place * 1e9:.0f} ns per call")
    print(f"filters outranked, put back (with the simplefilter that outranked them): {put_back * 1e6:.1f} us per call")


if __name__ == "__main__":
    main()
