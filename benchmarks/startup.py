"""How long the command line takes to start: the wall time of `sr3 --help`, `sr3 upscale --help`,
`python -c "import diffusers_sr3"` and `python examples/train_sr3.py --help`, and of `python -c "import torch"` for
reference (the median of --runs fresh
processes each, after one unmeasured run that warms the file cache).

    python benchmarks/startup.py                               # the diffusers_sr3 that Python finds
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/startup.py  # another checkout's, to compare

`sr3` is the console script beside this Python when installed, else `python -m diffusers_sr3`; both honour PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

TRAIN_SR3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "train_sr3.py")


def _sr3() -> List[str]:
    script = os.path.join(os.path.dirname(sys.executable), "sr3")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "diffusers_sr3"]


def commands() -> Dict[str, List[str]]:
    """What is timed, by the label printed for it."""
    return {
        "sr3 --help": [*_sr3(), "--help"],
        "sr3 upscale --help": [*_sr3(), "upscale", "--help"],
        'python -c "import diffusers_sr3"': [sys.executable, "-c", "import diffusers_sr3"],
        "python examples/train_sr3.py --help": [sys.executable, TRAIN_SR3, "--help"],
        'python -c "import torch" (reference)': [sys.executable, "-c", "import torch"],
    }


def wall_time(command: Sequence[str]) -> float:
    """Seconds from starting `command` to its exit (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="measured runs of each command (default: 5)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    where = subprocess.run(
        [sys.executable, "-c", "import diffusers_sr3; print(diffusers_sr3.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"diffusers_sr3 from {where}; median of {args.runs} run(s), {os.cpu_count()} CPU(s)")
    print("| command | seconds |\n|---|---:|")
    medians = {}
    for label, command in commands().items():
        wall_time(command)
        medians[label] = statistics.median(wall_time(command) for _ in range(args.runs))
        print(f"| `{label}` | {medians[label]:.2f} |", flush=True)
    return medians


if __name__ == "__main__":
    main()
