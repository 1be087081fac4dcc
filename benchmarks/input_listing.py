"""How long listing an input folder of many small files takes, as `sr3 upscale FOLDER` lists it: the median wall time
and the least CPU time of `find_image_sources([FOLDER])` (the folder walk `sr3 upscale`, `sr3 eval` and training
share) and of the same under `hold_folders_for_reading` (the readers' dataset locks, which look for prepared datasets
during that walk), over --runs runs after one unmeasured run that warms the file cache.

    python benchmarks/input_listing.py                                    # the diffusers_sr3 that Python finds
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/input_listing.py  # another checkout's, to compare

The files are empty `.png` names (listing reads no file), --files of them spread over --folders folders (1 folder: all
in one), made once in --dir (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, Optional, Sequence


def make_tree(root: str, files: int, folders: int) -> None:
    for index in range(files):
        folder = os.path.join(root, f"folder_{index % folders:04d}") if folders > 1 else root
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"image_{index:06d}.png"), "wb").close()


def timed(call: Callable[[], object], runs: int) -> Dict[str, float]:
    """The median wall time and the least CPU time of `runs` calls, in seconds (CPU time is what other processes on
    shared cores disturb least)."""
    call()  # warms the file cache
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_median_s": statistics.median(wall), "cpu_min_s": min(cpu)}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000, help="files in the tree (default: 10000)")
    parser.add_argument("--folders", type=int, default=100, help="folders they are spread over (default: 100)")
    parser.add_argument("--runs", type=int, default=15, help="measured runs of each listing (default: 15)")
    parser.add_argument("--dir", help="where to make the tree (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)

    import diffusers_sr3
    from diffusers_sr3.image_io import find_image_sources
    from diffusers_sr3.training.output_lock import hold_folders_for_reading

    def held_listing(folder: str) -> None:
        with hold_folders_for_reading([(folder, "input")], "upscaling it"):
            find_image_sources([folder])

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        tree = os.path.join(root, "inputs")
        make_tree(tree, args.files, args.folders)
        assert len(find_image_sources([tree])) == args.files
        results = {
            "find_image_sources": timed(lambda: find_image_sources([tree]), args.runs),
            "find_image_sources under hold_folders_for_reading": timed(lambda: held_listing(tree), args.runs),
        }
    print(f"{diffusers_sr3.__file__}: {args.files} files in {args.folders} folder(s), {args.runs} runs")
    for label, times in results.items():
        wall, cpu = times["wall_median_s"] * 1000, times["cpu_min_s"] * 1000
        print(f"  {label}: wall median {wall:.1f} ms, CPU min {cpu:.1f} ms")
    return results


if __name__ == "__main__":
    main()
