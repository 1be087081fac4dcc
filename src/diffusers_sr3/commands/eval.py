"""`sr3 eval`: PSNR/SSIM (the original's definitions), consistency and FID of super-resolved images.

Two ways to give the images:
- `--hr DIR --sr DIR [--lr DIR]`: files matched by name. The extension and a trailing `_hr`/`_sr`/`_lr`
  suffix are ignored, so `sr3 upscale` outputs (`<name>_sr.png`) match their sources (`<name>.png`).
- `--results DIR`: the original project's results folder, `<id>_hr.png` and `<id>_sr.png` (plus `<id>_lr.png`,
  and `<id>_inf.png`, the bicubic upsample, which is then scored as a baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import metrics
from ..backends import resolve_device
from ..image_io import is_image_file, open_image, walk_images
from .common import atomic_file, check_file_destination

SUFFIXES = ("_hr", "_sr", "_lr", "_inf")
MAX_LISTED = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hr", help="folder of ground-truth high-resolution images")
    parser.add_argument("--sr", help="folder of super-resolved images (matched to --hr by file name)")
    parser.add_argument("--lr", help="folder of the low-resolution inputs: adds the paper's consistency metric")
    parser.add_argument("--results", help="the original's results folder (<id>_hr.png, <id>_sr.png, ...)")
    parser.add_argument("--json", help="also write per-image and mean values to this JSON file")
    parser.add_argument("--fid", action="store_true", help="also compute FID of SR against HR (needs the [fid] extra)")
    parser.add_argument("--inception-score", action="store_true", help="also compute the Inception Score of SR")
    parser.add_argument("--device", default="cpu", help="device for FID / Inception Score (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="print only the mean values")


def _listed(names: List[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _key(relative_path: str) -> str:
    stem = os.path.splitext(relative_path)[0]
    for suffix in SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _folder_images(folder: str, what: str) -> Dict[str, str]:
    """Images under `folder` (recursively) by matching key; duplicate keys are an error."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--{what} folder not found: {folder}")
    found: Dict[str, str] = {}
    for path in walk_images(folder):
        key = _key(os.path.relpath(path, folder))
        if key in found:
            raise ValueError(f"--{what}: {found[key]} and {path} both match the name {key!r}")
        found[key] = path
    if not found:
        raise FileNotFoundError(f"no images in the --{what} folder {folder}")
    return found


def _results_images(folder: str) -> Dict[str, Dict[str, str]]:
    """The original's results folder: `{"hr": {id: path}, "sr": ..., "lr": ..., "inf": ...}`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--results folder not found: {folder}")
    kinds: Dict[str, Dict[str, str]] = {"hr": {}, "sr": {}, "lr": {}, "inf": {}}
    for name in sorted(os.listdir(folder)):
        if not is_image_file(name):
            continue
        stem = os.path.splitext(name)[0]
        for kind in kinds:
            if stem.endswith(f"_{kind}") and len(stem) > len(kind) + 1:
                kinds[kind][stem[: -len(kind) - 1]] = os.path.join(folder, name)
    if not kinds["hr"] and not kinds["sr"]:
        raise FileNotFoundError(f"no <id>_hr.png / <id>_sr.png images in the --results folder {folder}")
    return kinds


def _check_matching(reference: Dict[str, str], other: Dict[str, str], names: tuple) -> None:
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    problems = []
    if missing:
        problems.append(f"{len(missing)} {names[0]} image(s) have no {names[1]} image: {_listed(missing)}")
    if extra:
        problems.append(f"{len(extra)} {names[1]} image(s) have no {names[0]} image: {_listed(extra)}")
    if problems:
        raise ValueError("the image sets do not match: " + "; ".join(problems))


def gather(args: argparse.Namespace) -> Dict[str, Dict[str, str]]:
    """`{id: {"hr": path, "sr": path[, "lr": path][, "inf": path]}}` from the command-line options."""
    if args.results and (args.hr or args.sr):
        raise ValueError("give either --results or --hr/--sr, not both")
    if args.results:
        kinds = _results_images(args.results)
        if args.lr:
            kinds["lr"] = _folder_images(args.lr, "lr")
    elif args.hr and args.sr:
        kinds = {"hr": _folder_images(args.hr, "hr"), "sr": _folder_images(args.sr, "sr")}
        if args.lr:
            kinds["lr"] = _folder_images(args.lr, "lr")
    else:
        raise ValueError("give --hr and --sr folders, or a --results folder")
    _check_matching(kinds["hr"], kinds["sr"], ("HR", "SR"))
    for kind in ("lr", "inf"):
        if kinds.get(kind):
            _check_matching(kinds["hr"], kinds[kind], ("HR", kind.upper()))
    return {key: {kind: paths[key] for kind, paths in kinds.items() if key in paths} for key in sorted(kinds["hr"])}


def _json_value(value: float):
    return value if math.isfinite(value) else str(value)


def _uint8_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def run(args: argparse.Namespace) -> int:
    args.device = resolve_device(args.device)
    pairs = gather(args)
    if args.json:
        check_file_destination(args.json, "--json", "metrics.json")
    fid = inception = None
    try:
        if args.fid:
            if len(pairs) < 2:
                raise ValueError(f"FID needs at least 2 image pairs, got {len(pairs)}")
            fid = metrics.frechet_inception_distance(args.device)
        if args.inception_score:
            inception = metrics.inception_score_metric(args.device)
    except (ImportError, RuntimeError) as error:
        raise ValueError(str(error)) from None

    rows: Dict[str, Dict[str, float]] = {}
    size_problems: List[str] = []
    scale_problems: List[str] = []
    for key, paths in tqdm(pairs.items(), desc="evaluating", unit="image", disable=args.quiet):
        images = {kind: metrics.to_uint8_rgb(open_image(path), path) for kind, path in paths.items()}
        hr, sr = images["hr"], images["sr"]
        if "lr" in images and args.results and not args.lr and images["lr"].shape == hr.shape:
            del images["lr"]  # the original saves its bicubic image as <id>_lr.png when it had no LR input
        sizes = ", ".join(f"{kind} {image.shape[1]}x{image.shape[0]}" for kind, image in images.items())
        if sr.shape != hr.shape or ("inf" in images and images["inf"].shape != hr.shape):
            size_problems.append(f"{key} ({sizes})")
        if "lr" in images and metrics.downscale_factor(hr.shape[:2], images["lr"].shape[:2]) is None:
            scale_problems.append(f"{key} ({sizes})")
        if size_problems or scale_problems:
            continue  # the run fails: only the sizes of the remaining pairs are worth checking
        row = metrics.pair_metrics(sr, hr, images.get("lr"))
        if "inf" in images:
            row["bicubic_psnr"] = metrics.psnr(images["inf"], hr)
            row["bicubic_ssim"] = metrics.ssim(images["inf"], hr)
        rows[key] = row
        if fid is not None:
            fid.update(_uint8_tensor(hr).to(args.device), real=True)
            fid.update(_uint8_tensor(sr).to(args.device), real=False)
        if inception is not None:
            inception.update(_uint8_tensor(sr).to(args.device))
    problems = []
    if size_problems:
        problems.append(f"{len(size_problems)} pair(s) differ in size: {_listed(size_problems)}")
    if scale_problems:
        problems.append(
            f"{len(scale_problems)} LR image(s) are not their HR image shrunk by a whole factor: "
            + _listed(scale_problems)
        )
    if problems:
        raise ValueError("; ".join(problems))

    columns = list(dict.fromkeys(name for row in rows.values() for name in row))
    means = metrics.summarize({name: [row[name] for row in rows.values() if name in row] for name in columns})
    extra: Dict[str, Optional[float]] = {}
    if fid is not None:
        extra["fid"] = float(fid.compute())
    if inception is not None:
        extra["inception_score"] = float(inception.compute()[0])

    width = max([len("mean")] + [len(key) for key in rows])
    if not args.quiet:
        print(f"{'image':<{width}}  " + "  ".join(f"{name:>12}" for name in columns))
        for key, row in rows.items():
            print(f"{key:<{width}}  " + "  ".join(f"{row.get(name, math.nan):>12.6g}" for name in columns))
    print(f"{'mean':<{width}}  " + "  ".join(f"{means[name]:>12.6g}" for name in columns))
    for name, value in extra.items():
        print(f"{name}: {value:.6g}")
    if "consistency" in means:
        print(f"(consistency: MSE in [0, 1] units; the SR3 paper reports it x1e5: {means['consistency'] * 1e5:.4g})")

    if args.json:
        report = {
            "count": len(rows),
            "mean": {name: _json_value(value) for name, value in means.items()},
            **{name: _json_value(value) for name, value in extra.items()},
            "images": {key: {name: _json_value(value) for name, value in row.items()} for key, row in rows.items()},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with atomic_file(args.json) as stream:
            stream.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return 0
