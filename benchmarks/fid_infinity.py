"""FID against the number of crops, and extrapolated to infinitely many, for `model_report.py --save-outputs`:

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 \
        --unseen pyiqa_ref_dir/ --unseen-crops 1024 --crops 1024 --modes detail --whole-photos \
        --save-outputs --output report/
    python benchmarks/fid_infinity.py report/outputs_never-seen-photos.npz report/outputs_held-out-photos.npz \
        --cache features/ --output benchmarks/results/sr3-photos-x4/fid-infinity

FID over N crops exceeds the distance between the two distributions by about k / N, and k depends on the images:
two methods compared at the same N are not compared on the same footing, and a ratio of FIDs over a thousand crops
leans towards 1 by an amount that differs from method to method. For each saved method this measures the FID
against the set's HR on random subsets of several sizes (the same crops of both, as the report's FID pairs them),
prints the mean at each size, fits FID = FID_inf + k / N and extrapolates to N -> infinity
(`diffusers_sr3.metrics.fid_infinity`; Chong and Forsyth, *Effectively Unbiased FID and Inception Score and Where to
Find Them*, CVPR 2020). The FID over all the crops, the number the report prints, is the last point. Ratios are to
the first method saved (bicubic). With fewer crops than the features' 2048 dimensions the points bend away from the
line and the intercept moves with `--sizes`: read it beside the measured points.

Writes fid_infinity.json (every measured point) and fid_infinity.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_report  # noqa: E402  (a sibling script: its saved outputs)
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

from diffusers_sr3.metrics import InceptionFeatures, fid_infinity, inception_features  # noqa: E402


def features_of(images: np.ndarray, network: torch.nn.Module, cache: Optional[str]) -> torch.Tensor:
    """The Inception features of uint8 `images`, kept in `cache` (a folder; None: not kept) under a hash of the
    images, so that fits over other sizes or seeds rerun in seconds."""
    path = None if cache is None else os.path.join(cache, hashlib.sha1(images.tobytes()).hexdigest() + ".npy")
    if path is not None and os.path.exists(path):
        return torch.from_numpy(np.load(path))
    features = inception_features(torch.from_numpy(images), network=network)
    if path is not None:
        os.makedirs(cache, exist_ok=True)
        np.save(path + ".partial.npy", features.numpy())
        os.replace(path + ".partial.npy", path)
    return features


def score_set(
    saved: Dict[str, Any],
    network: torch.nn.Module,
    draws: int,
    seed: int,
    sizes: Optional[Sequence[int]],
    cache: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """FID over all crops and FID_inf of every saved method against the set's HR, as rows of the table."""
    reference = features_of(saved["HR"], network, cache)
    rows = []
    for method, images in saved.items():
        if method == "HR":
            continue
        estimate = fid_infinity(features_of(images, network, cache), reference, sizes, draws, seed)
        rows.append(
            {
                "method": method,
                "fid": estimate.points[-1][1],
                "fid_infinity": estimate.value,
                "slope": estimate.slope,
                "points": estimate.points,
            }
        )
    for row in rows:
        row["fid_x_first"] = row["fid"] / rows[0]["fid"]
        row["fid_infinity_x_first"] = row["fid_infinity"] / rows[0]["fid_infinity"]
    return rows


def markdown(sets: List[Dict[str, Any]], draws: int) -> str:
    lines = [
        "FID against each set's HR over all its crops (the report's number) and extrapolated to infinitely many crops "
        f"(FID_inf: least squares of FID against 1 / N over random subsets, {draws} per size), each also as a "
        "multiple of the set's first method's; k is the slope, the bias at N crops being about k / N.",
        "",
        "| test set | method | FID, all crops | x first | FID_inf | x first | k |",
        "|---|---|---|---|---|---|---|",
    ]
    for scored in sets:
        for row in scored["rows"]:
            lines.append(
                f"| {scored['set']} ({scored['crops']} crops) | {row['method']} | {row['fid']:.1f} | "
                f"{row['fid_x_first']:.3f}x | {row['fid_infinity']:.1f} | {row['fid_infinity_x_first']:.3f}x | "
                f"{row['slope']:.0f} |"
            )
    lines += ["", "FID by the number of crops, the mean over the subsets of each size (x the first method's):", ""]
    for scored in sets:
        methods = [row["method"] for row in scored["rows"]]
        lines += [f"| {scored['set']}: crops | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        means = [mean_by_size(row["points"]) for row in scored["rows"]]
        for size in means[0]:
            cells = [f"{by_size[size]:.1f} ({by_size[size] / means[0][size]:.3f}x)" for by_size in means]
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def mean_by_size(points: List[List[float]]) -> Dict[int, float]:
    """The mean FID at each subset size of `fid_infinity`'s points."""
    by_size: Dict[int, List[float]] = {}
    for size, fid in points:
        by_size.setdefault(int(size), []).append(fid)
    return {size: sum(values) / len(values) for size, values in by_size.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", help="outputs_<set>.npz files of `model_report.py --save-outputs`")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="subset sizes (default: 7 from N/4 to N)")
    parser.add_argument("--draws", type=int, default=4, help="random subsets per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="a folder to keep the Inception features in, and to take them from")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    network = InceptionFeatures()
    sets = []
    for path in args.outputs:
        started = time.perf_counter()
        set_name, arrays = model_report.load_outputs(path)
        rows = score_set(arrays, network, args.draws, args.seed, args.sizes, args.cache)
        sets.append({"set": set_name, "crops": int(arrays["HR"].shape[0]), "rows": rows})
        print(f"{set_name}: {time.perf_counter() - started:.0f} s", flush=True)
    report = {"draws": args.draws, "seed": args.seed, "sets": sets}
    print(write_report(args.output, "fid_infinity", report, markdown(sets, args.draws)))
    return report


if __name__ == "__main__":
    main()
