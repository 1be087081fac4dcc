"""What a seed reproduces: `sr3 upscale` rerun with one setting changed, compared pixel for pixel (README, "What a
seed reproduces").

    python benchmarks/determinism.py --output benchmarks/results/determinism

Crops `--crops` squares of `--size` pixels from the middle of the packaged model's held-out photos
(`diffusers_sr3.photos.packaged_model_heldout()`, never trained on), saves them as PNG and upscales them with `sr3
upscale --seed 7` (in this process) once per mode (`--modes`) and backend (`--backends`: `torch` is float32, `bf16`
bfloat16 autocast, `onnx` ONNX Runtime): at 1 thread, at 1 thread again, at 2 threads, at 1 thread with all crops in
one batch (`--batch-size`), and each crop alone with the seed its line in the first run names. Each comparison
reports, over all crops, the largest difference of the 8-bit outputs, how many values differ and the PSNR between the
two runs ("identical" where they are). A difference at another thread count is the float summation order of
torch's kernels; the rows of one run are comparable, and reruns of the script on one machine give the same table.
Writes determinism.json and determinism.md to --output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

SEED = 7


def save_crops(folder: str, count: int, size: int) -> List[str]:
    """The middle `size` square of each of the first `count` held-out photos, as PNG files in `folder`."""
    from diffusers_sr3.photos import load_photo, packaged_model_heldout, packaged_photo_paths, photo_name

    installed = {photo_name(path): path for path in packaged_photo_paths()}
    photos = [installed[name] for name in packaged_model_heldout()[:count]]
    if len(photos) < count:
        raise SystemExit(f"--crops {count}: only {len(photos)} held-out photos are installed")
    paths = []
    for index, photo in enumerate(photos):
        image = load_photo(photo)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        path = os.path.join(folder, f"crop{index}.png")
        image.crop((left, top, left + size, top + size)).save(path)
        paths.append(path)
    return paths


def upscale(model: str, inputs: List[str], output: str, *options: str) -> Dict[str, np.ndarray]:
    """`sr3 upscale` of `inputs` into `output`: each input's name to its result's pixels (int, so they subtract)."""
    from diffusers_sr3.cli import main

    os.makedirs(output, exist_ok=True)
    arguments = ["upscale", *inputs, "--model", model, "--output", output, "--quiet", "--overwrite", *options]
    with contextlib.redirect_stdout(io.StringIO()):
        if main(arguments) != 0:
            raise SystemExit(f"sr3 {' '.join(arguments)} failed")
    results = {}
    for path in inputs:
        name = os.path.splitext(os.path.basename(path))[0]
        with PIL.Image.open(os.path.join(output, f"{name}_sr.png")) as image:
            results[name] = np.asarray(image.convert("RGB")).astype(np.int64)
    return results


def compare(first: Dict[str, np.ndarray], second: Dict[str, np.ndarray]) -> Dict[str, Optional[float]]:
    """The largest difference, the count of values that differ (of all) and the PSNR between two runs' outputs."""
    differences = np.concatenate([np.abs(first[name] - second[name]).ravel() for name in first])
    mse = float(np.mean(differences.astype(np.float64) ** 2))
    return {
        "largest": int(differences.max()),
        "differing": int(np.count_nonzero(differences)),
        "values": int(differences.size),
        "psnr": 10 * math.log10(255**2 / mse) if mse else None,  # None: identical
    }


def measure(model: str, crops: List[str], scratch: str, mode: str, backend: str) -> Dict[str, Dict[str, float]]:
    """The comparisons of one mode and backend against their run at 1 thread."""
    base = ["--mode", mode, "--backend", backend, "--seed", str(SEED)]

    def run(tag: str, *options: str, inputs: List[str] = crops) -> Dict[str, np.ndarray]:
        return upscale(model, inputs, os.path.join(scratch, f"{mode}-{backend}-{tag}"), *options)

    reference = run("threads1", *base, "--threads", "1")
    alone: Dict[str, np.ndarray] = {}
    for offset, crop in enumerate(crops):  # a file's seed is the run's seed plus its place in the run
        options = ["--mode", mode, "--backend", backend, "--seed", str(SEED + offset), "--threads", "1"]
        alone.update(run(f"alone{offset}", *options, inputs=[crop]))
    return {
        "1 thread, again": compare(reference, run("again", *base, "--threads", "1")),
        "2 threads": compare(reference, run("threads2", *base, "--threads", "2")),
        f"one batch of {len(crops)}": compare(
            reference, run("batch", *base, "--threads", "1", "--batch-size", str(len(crops)))
        ),
        "each crop alone, its seed": compare(reference, alone),
    }


def table(results: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
    lines = [
        "| mode, backend | against the run at 1 thread | largest difference | values that differ | PSNR between runs |",
        "|---|---|---|---|---|",
    ]
    for setting, comparisons in results.items():
        for change, numbers in comparisons.items():
            percent = 100 * numbers["differing"] / numbers["values"]
            share = f"{numbers['differing']} of {numbers['values']} ({percent:.2f}%)"
            psnr = "identical" if numbers["psnr"] is None else f"{numbers['psnr']:.1f} dB"
            lines.append(f"| {setting} | {change} | {numbers['largest']} | {share} | {psnr} |")
    return lines


def main(argv=None) -> Dict[str, Dict[str, Dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sr3-photos-x4", help="a pipeline folder or the packaged model's name")
    parser.add_argument("--crops", type=int, default=3, help="how many held-out photos to crop")
    parser.add_argument("--size", type=int, default=64, help="the crops' side, in input pixels")
    parser.add_argument("--modes", nargs="+", default=["fidelity", "detail"], choices=["fidelity", "detail"])
    parser.add_argument("--backends", nargs="+", default=["torch", "bf16"], choices=["torch", "bf16", "onnx"])
    parser.add_argument("--output", default=None, help="folder for determinism.json and .md (default: print only)")
    args = parser.parse_args(argv)
    if args.crops < 2:
        parser.error("--crops must be at least 2: one batch of a single crop compares nothing")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        crops = save_crops(scratch, args.crops, args.size)
        for mode in args.modes:
            for backend in args.backends:
                results[f"{mode}, {backend}"] = measure(args.model, crops, scratch, mode, backend)
    lines = table(results)
    print("\n".join(lines))
    if args.output:
        settings = {key: value for key, value in vars(args).items() if key != "output"}
        write_report(args.output, "determinism", {"settings": settings, "results": results}, "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
