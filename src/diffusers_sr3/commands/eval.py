"""`sr3 eval`: PSNR/SSIM (the original's definitions), consistency and FID of super-resolved images.

Two ways to give the images:
- `--hr DIR --sr DIR [--lr DIR]`: files matched by name. The extension and trailing `_hr`/`_sr`/`_lr`/`_inf`
  suffixes are ignored, so `sr3 upscale` outputs (`<name>_sr.png`, `<name>_lr_sr.png`) match their sources
  (`<name>.png`, `<name>_hr.png`), and an input named DIV2K's way (`0801x4.png`, so `0801x4_sr.png`) matches the
  HR image of its name without `x<factor>` (`0801.png`) when none has its own name. `sr3 upscale --save-process`
  frames (`<name>_sr_process.png`) are left out, as is any of the given folders found inside another; given one
  folder as `--hr` and `--sr`, the `<name>_sr` files in it are the SR images and the others the HR images.
- `--results DIR`: the original project's results folder, `<id>_hr.png` and `<id>_sr.png` (plus `<id>_lr.png`,
  and `<id>_inf.png`, the bicubic upsample, which is then scored as a baseline).

A folder that `sr3 prepare` is still writing (given itself, one of its `hr_<N>`/`lr_<M>` folders, a folder holding
it, or a link to any of these) is refused rather than evaluated half-written, as is one whose prepare stopped
before the end, and a prepare into it is refused while it is evaluated (`hold_for_reading`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

from ..image_io import is_image_file, open_image, walk_images
from ..training.output_lock import hold_folders_for_reading
from .common import atomic_file, check_file_destination

if TYPE_CHECKING:
    import torch

SUFFIXES = ("_hr", "_sr", "_lr", "_inf")
# Appended by `sr3 upscale --save-process` to the output's name: a grid of frames, not an SR image.
PROCESS_SUFFIX = "_process"
# DIV2K and the EDSR benchmark sets name the bicubic inputs of `0801.png` `0801x2.png`, `0801x3.png`, `0801x4.png`.
DOWNSCALED_SUFFIX = re.compile(r"(?<=.)x[2-8]$")
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
    """The name a file is matched by: its path without the extension and every trailing suffix of `SUFFIXES`
    (`a/x_lr_sr.png` -> `a/x`)."""
    stem = os.path.splitext(relative_path)[0]
    while True:
        suffix = next((suffix for suffix in SUFFIXES if stem.endswith(suffix) and len(stem) > len(suffix)), None)
        if suffix is None:
            return stem
        stem = stem[: -len(suffix)]


def _inner_folders(folder: str, others: Sequence[str]) -> List[str]:
    """The paths, relative to `folder`, of the folders of `others` that lie inside it (not `folder` itself)."""
    root = os.path.realpath(folder)
    inner = []
    for other in others:
        try:
            relative = os.path.relpath(os.path.realpath(other), root)
        except ValueError:  # on another Windows drive: not inside
            continue
        if relative != os.curdir and relative.split(os.sep)[0] != os.pardir:
            inner.append(relative + os.sep)
    return inner


def _role(stem: str) -> str:
    """What a file in a folder given for several kinds is, by its last suffix: `sr`, `lr`, `inf` or else `hr`."""
    return next((kind for kind in ("sr", "lr", "inf") if stem.endswith(f"_{kind}")), "hr")


def _upscaled_input(path: str) -> bool:
    """Whether `path` is what `sr3 upscale` wrote for a `<name>_lr` input (`<name>_lr_sr`)."""
    return os.path.splitext(path)[0].endswith("_lr_sr")


def _folder_images(folder: str, what: str, others: Sequence[str] = (), shared: bool = False) -> Dict[str, str]:
    """Images under `folder` (recursively) by matching key; duplicate keys are an error.

    Args:
        folder: the folder given as `--{what}`.
        what: `hr`, `sr` or `lr`, for the messages.
        others: the other folders given: those inside `folder` hold the other kinds of images and are left out.
        shared: `folder` is also given for another kind (`sr3 upscale photos --output photos` writes `<name>_sr`
            beside `<name>` and its `<name>_lr` input): read only the files whose last suffix names `what` (no
            suffix: `hr`). `<name>_sr_process` frames are never SR images, and where the HR image was upscaled too,
            its `<name>_sr` gives way to the LR input's `<name>_lr_sr`.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--{what} folder not found: {folder}")
    inner = _inner_folders(folder, others)
    found: Dict[str, str] = {}
    for path in walk_images(folder):
        relative = os.path.relpath(path, folder)
        stem = os.path.splitext(relative)[0]
        if relative.startswith(tuple(inner)):
            continue
        if stem.endswith("_sr" + PROCESS_SUFFIX) and (what == "sr" or shared):
            continue
        if shared and _role(stem) != what:
            continue
        key = _key(relative)
        if key in found:
            # `sr3 upscale photos --output photos` upscales the HR files too: their `<name>_sr` (`<name>_hr_sr`)
            # is no result to score, `<name>_lr_sr`, from the LR input, is.
            from_lr = [_upscaled_input(candidate) for candidate in (found[key], path)]
            if shared and what == "sr" and from_lr.count(True) == 1:
                found[key] = path if from_lr[1] else found[key]
                continue
            raise ValueError(f"--{what}: {found[key]} and {path} both match the name {key!r}")
        found[key] = path
    if not found:
        named = (f" named <name>_{what}" if what != "hr" else " without a _sr, _lr or _inf suffix") if shared else ""
        raise FileNotFoundError(f"no images{named} in the --{what} folder {folder}")
    return found


def _match_downscaled_names(reference: Dict[str, str], images: Dict[str, str], what: str) -> Dict[str, str]:
    """`images` with each key that names no reference image but does without a DIV2K `x<factor>` suffix
    (`0801x4`, reference `0801`) renamed to that; two images renamed to one key are an error."""
    matched: Dict[str, str] = {}
    for key, path in images.items():
        folder, name = os.path.split(key)
        full_size_key = os.path.join(folder, DOWNSCALED_SUFFIX.sub("", name))
        if key not in reference and full_size_key in reference:
            key = full_size_key
        if key in matched:
            raise ValueError(f"--{what}: {matched[key]} and {path} both match the name {key!r}")
        matched[key] = path
    return matched


def _results_images(folder: str) -> Dict[str, Dict[str, str]]:
    """The original's results folder: `{"hr": {id: path}, "sr": ..., "lr": ..., "inf": ...}`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--results folder not found: {folder}")
    kinds: Dict[str, Dict[str, str]] = {"hr": {}, "sr": {}, "lr": {}, "inf": {}}
    for name in sorted(os.listdir(folder)):
        if not is_image_file(name) or name.startswith("."):  # `._1_hr.png`: macOS metadata, as in `walk_images`
            continue
        stem = os.path.splitext(name)[0]
        for kind, found in kinds.items():
            if stem.endswith(f"_{kind}") and len(stem) > len(kind) + 1:
                image_id, path = stem[: -len(kind) - 1], os.path.join(folder, name)
                if image_id in found:
                    raise ValueError(f"--results: {found[image_id]} and {path} both match the name {stem!r}")
                found[image_id] = path
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
    folders = {kind: getattr(args, kind) for kind in ("hr", "sr", "lr") if getattr(args, kind)}

    def read(kind: str) -> Dict[str, str]:
        others = [folder for other, folder in folders.items() if other != kind]
        shared = os.path.isdir(folders[kind]) and any(
            os.path.isdir(folder) and os.path.samefile(folders[kind], folder) for folder in others
        )
        return _folder_images(folders[kind], kind, others, shared)

    if args.results:
        kinds = _results_images(args.results)
    elif args.hr and args.sr:
        kinds = {"hr": read("hr"), "sr": read("sr")}
    else:
        raise ValueError("give --hr and --sr folders, or a --results folder")
    if args.lr:
        kinds["lr"] = read("lr")
    for kind in ("sr", "lr"):
        if kind in folders:
            kinds[kind] = _match_downscaled_names(kinds["hr"], kinds[kind], kind)
    _check_matching(kinds["hr"], kinds["sr"], ("HR", "SR"))
    for kind in ("lr", "inf"):
        if kinds.get(kind):
            _check_matching(kinds["hr"], kinds[kind], ("HR", kind.upper()))
    return {key: {kind: paths[key] for kind, paths in kinds.items() if key in paths} for key in sorted(kinds["hr"])}


def _json_value(value: float):
    return value if math.isfinite(value) else str(value)


def _uint8_tensor(image: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(image).permute(2, 0, 1)[None]


def run(args: argparse.Namespace) -> int:
    named = [(getattr(args, kind), f"--{kind}") for kind in ("hr", "sr", "lr", "results") if getattr(args, kind)]
    with hold_folders_for_reading(named, "evaluating it"):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .. import metrics
    from ..backends import resolve_device
    from ..progress import bar_options

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
    for key, paths in tqdm(pairs.items(), desc="evaluating", unit="image", disable=args.quiet, **bar_options()):
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
        try:
            row = metrics.pair_metrics(sr, hr, images.get("lr"))
            if "inf" in images:
                row["bicubic_psnr"] = metrics.psnr(images["inf"], hr)
                row["bicubic_ssim"] = metrics.ssim(images["inf"], hr)
        except ValueError as error:  # SSIM's minimum size, the one limit left to the metrics: name the files
            raise ValueError(f"{paths['sr']} and {paths['hr']}: {error}") from None
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
    # A mean over fewer images than the others (consistency where only some have an LR image) must say so.
    counts = {name: sum(name in row for row in rows.values()) for name in columns}
    partial = {name: count for name, count in counts.items() if count != len(rows)}
    extra: Dict[str, Optional[float]] = {}
    if fid is not None:
        # A distance: the few-image estimate of identical sets lands a rounding error below 0 (-4.6e-05 for 3).
        extra["fid"] = max(0.0, float(fid.compute()))
    if inception is not None:
        extra["inception_score"] = float(inception.compute()[0])

    # Before the table: a console that cannot print it (a closed pipe, an encoding) no longer loses the report.
    if args.json:
        report = {
            "count": len(rows),
            "mean": {name: _json_value(value) for name, value in means.items()},
            **({"counts": partial} if partial else {}),
            **{name: _json_value(value) for name, value in extra.items()},
            **({"fid_images": len(rows)} if fid is not None else {}),
            "images": {key: {name: _json_value(value) for name, value in row.items()} for key, row in rows.items()},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with atomic_file(args.json) as stream:
            stream.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))

    width = max([len("mean")] + [len(key) for key in rows])
    if not args.quiet:
        print(f"{'image':<{width}}  " + "  ".join(f"{name:>12}" for name in columns))
        for key, row in rows.items():
            print(f"{key:<{width}}  " + "  ".join(f"{row.get(name, math.nan):>12.6g}" for name in columns))
    print(f"{'mean':<{width}}  " + "  ".join(f"{means[name]:>12.6g}" for name in columns))
    for name, count in partial.items():
        print(f"({name} over {count} of {len(rows)} images)")
    for name, value in extra.items():
        print(f"{name}: {value:.6g}")
    features = metrics.InceptionFeatures.num_features
    if fid is not None and len(rows) < features:
        print(
            f"(fid over {len(rows)} image pairs, fewer than the {features} features: biased upward, it compares only "
            "with FIDs over the same number of images)"
        )
    if "consistency" in means:
        print(f"(consistency: MSE in [0, 1] units; the SR3 paper reports it x1e5: {means['consistency'] * 1e5:.4g})")

    return 0
