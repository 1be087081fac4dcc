"""How long the Space takes per example photo on this machine: the page's own request (`spaces/app.py`'s
`super_resolve` event, both modes with the page's defaults) timed on each photo in `spaces/examples`, with the load
average before and after each, since a machine shared with other jobs stretches the time.

    python benchmarks/space_examples.py                      # the packaged model, on the CPU
    python benchmarks/space_examples.py --model DIR --device cuda

Prints one line per photo and a Markdown table for the Space's card (spaces/README.md, "Time on a CPU").
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

SPACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "spaces", "app.py")


def load_space():
    """spaces/app.py, a script beside the package, imported as a module."""
    spec = importlib.util.spec_from_file_location("sr3_space_app", SPACE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sr3_space_app"] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def time_examples(space, pipeline, photos: Sequence[str]) -> List[Dict[str, object]]:
    """Seconds of the page's request per photo in `photos`, with the page's defaults, and the load around it."""
    demo = space.build_demo(pipeline, examples=photos)
    request = next(function for function in demo.fns.values() if function.api_name == "super_resolve").fn
    steps = pipeline.detail_settings()["num_inference_steps"]
    rows = []
    for photo in photos:
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        *_, info = request({"path": photo, "orig_name": os.path.basename(photo)}, "x4", steps, "ddim", 0, 0)
        seconds = time.perf_counter() - started
        rows.append(
            {
                "photo": os.path.basename(photo),
                "seconds": seconds,
                "summary": info,
                "load": (load_before, os.getloadavg()[0]),
            }
        )
        print(f"{rows[-1]['photo']}: {seconds:.1f} s, load average {load_before:.1f} -> {rows[-1]['load'][1]:.1f}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SR3 pipeline folder (default: the packaged model)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    args = parser.parse_args(argv)
    space = load_space()
    pipeline = space.load_pipeline(space.resolve_model(args.model), args.device)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), device {args.device}")
    rows = time_examples(space, pipeline, space.example_images())
    print("\n| photo | seconds | load average (1 min, before -> after) |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {row['photo']} | {row['seconds']:.0f} | {row['load'][0]:.1f} -> {row['load'][1]:.1f} |")
    return rows


if __name__ == "__main__":
    main()
