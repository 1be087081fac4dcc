"""Evaluate a trained x4 SR3 photo model against bicubic, and write its report and model card.

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 \
        --faces ../shared/data/original_samples --output report/ --write-card

Test sets, none seen in training:
- held-out photos: random crops of the packaged photographs that `diffusers_sr3.photos.photo_split` holds out
  (the split the training run used: whole photos, so no held-out pixel was trained on; for the packaged model, the
  photos its card names, `diffusers_sr3.photos.PACKAGED_MODEL_HELDOUT`, whichever photo packages are installed);
- never-seen photos (`--unseen`): random crops of photos of another collection, neither trained on nor held out;
- faces: the high-resolution sample faces of the original SR3 project (`--faces`, their `hr_*` folders), resized
  to --face-size, degraded x4 and super-resolved (in tiles when larger than the model's training size).
Each photo crop is degraded and super-resolved on its own; with --whole-photos each held-out and never-seen photo is
degraded and super-resolved whole, as `sr3 upscale` runs it, and the crops are cut from every output at the same
places.
For SR3 (the pipeline's saved scheduler, --steps) and for bicubic: PSNR, SSIM, consistency, per-channel colour
error, edge energy relative to HR, grain on the flattest tenth of the crops beside the HR's own, and FID (offline
Inception; with few images FID is only indicative).
Writes report.json, report.md and evaluation.png (LR | bicubic | SR3 | HR) to --output; --write-card also writes
the model card README.md (and evaluation.png) into the model folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.backends import BACKENDS, resolve_backend, use_backend
from diffusers_sr3.detail_windows import MIN_WINDOWS_ACROSS
from diffusers_sr3.image_io import find_images, open_image
from diffusers_sr3.image_processing import (
    degrade,
    grid,
    images_to_tensor,
    resize_bicubic,
    tensor_to_pil,
    upsample_condition,
)
from diffusers_sr3.metrics import (
    TEXTURE_KEPT_EDGE_SHARE,
    edge_energy,
    flat_grain,
    frechet_inception_distance,
    image_quality,
    quantize,
)
from diffusers_sr3.model_card import write_model_card
from diffusers_sr3.photos import (
    heldout_crops,
    load_photo,
    packaged_model_heldout,
    packaged_photo_paths,
    photo_crops,
    photo_name,
    photo_split,
    random_crop_positions,
)
from diffusers_sr3.pipelines.pipeline_sr3 import DETAIL_ARGUMENTS
from diffusers_sr3.pretrained import default_model_path
from diffusers_sr3.tiling import tiled_super_resolve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)


def face_paths(folder: str) -> List[pathlib.Path]:
    """The original project's high-resolution sample faces (`hr_*/*.png`) under `folder`; none is an error."""
    paths = sorted(pathlib.Path(folder).glob("*/hr_*/*.png"))
    if not paths:
        raise FileNotFoundError(f"no hr_*/*.png faces under {folder}")
    return paths


def face_images(folder: str, size: int) -> torch.Tensor:
    """The original project's high-resolution sample faces (`hr_*/*.png`), resized to `size`, in [-1, 1]."""
    faces = [resize_bicubic(images_to_tensor(open_image(path)), (size, size)) for path in face_paths(folder)]
    return torch.cat(faces)


def super_resolve(
    pipeline: SR3Pipeline,
    lr: torch.Tensor,
    mode: str,
    args: argparse.Namespace,
    seed: Optional[int] = None,
    self_ensemble: bool = False,
) -> torch.Tensor:
    """SR3 outputs in [-1, 1] for low-resolution inputs in [-1, 1], tiled when larger than a training tile."""
    generator = torch.Generator().manual_seed(args.seed if seed is None else seed)
    # Each mode at its own step count: fidelity's default is what `sr3 upscale` runs, not detail mode's steps.
    steps = args.steps if mode == "detail" else args.fidelity_steps
    options = dict(
        mode=mode, num_inference_steps=steps, generator=generator, output_type="pt", self_ensemble=self_ensemble
    )
    if mode == "detail":
        # The report has no --temperature: detail mode samples at temperature 1.
        options.update(
            {name: getattr(args, name) for name in DETAIL_ARGUMENTS if getattr(args, name, None) is not None}
        )
    outputs = []
    for start in range(0, lr.shape[0], args.batch_size):
        batch = (lr[start : start + args.batch_size] + 1) / 2
        with use_backend(pipeline, args.backend):
            outputs.append(tiled_super_resolve(pipeline, batch, **options).images.cpu() * 2 - 1)
    return torch.cat(outputs)


SELF_ENSEMBLE = "SR3 fidelity (self-ensemble)"


# Images per Inception run: thousands at once (the 299-pixel inputs and their activations) exhaust the memory.
FID_BATCH = 64


def fids(metric: Any, real: torch.Tensor, fakes: Sequence[torch.Tensor]) -> List[float]:
    """FID of each fake set against `real`, with one Inception network and the real statistics computed once."""
    metric.reset_real_features = True
    metric.reset()
    metric.reset_real_features = False
    for batch in quantize(real).split(FID_BATCH):
        metric.update(batch, real=True)
    values = []
    for fake in fakes:
        metric.reset()
        for batch in quantize(fake).split(FID_BATCH):
            metric.update(batch, real=False)
        values.append(float(metric.compute()))
    return values


def low_resolution_input(hr: torch.Tensor, factor: int) -> torch.Tensor:
    """The x`factor` input of `hr` as a user's file holds it: downsampled, then quantised to 8 bits."""
    lr, _ = degrade(hr, factor)
    return quantize(lr).float() / 127.5 - 1


def further_seeds(args: argparse.Namespace) -> List[int]:
    """Detail mode's seeds after `args.seed`: the rest of its --detail-seeds draws, and at least the next one (the
    two-seed difference); none without detail mode."""
    if "detail" not in args.modes:
        return []
    return [args.seed + offset for offset in range(1, max(args.detail_seeds, 2))]


def run_methods(
    pipeline: SR3Pipeline, lr: torch.Tensor, size: Tuple[int, int], args: argparse.Namespace
) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
    """Bicubic and the SR3 modes on `lr`, and detail mode again with each of `further_seeds`."""
    outputs = {"bicubic": upsample_condition(lr, size).clamp(-1, 1)}
    for mode in args.modes:
        outputs[f"SR3 {mode}"] = super_resolve(pipeline, lr, mode, args)
        if mode == "fidelity" and args.self_ensemble:
            outputs[SELF_ENSEMBLE] = super_resolve(pipeline, lr, mode, args, self_ensemble=True)
    further = [super_resolve(pipeline, lr, "detail", args, seed=seed) for seed in further_seeds(args)]
    return outputs, further


def mean_of_draws(draws: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Metrics averaged over detail mode's draws (lists, such as the colour error, element by element)."""
    averaged: Dict[str, Any] = {}
    for key, value in draws[0].items():
        values = [draw[key] for draw in draws]
        averaged[key] = [float(np.mean(v)) for v in zip(*values)] if isinstance(value, list) else float(np.mean(values))
    return averaged


def score_set(
    hr: torch.Tensor,
    lr: torch.Tensor,
    outputs: Dict[str, torch.Tensor],
    further: Sequence[torch.Tensor],
    fid: Any,
    consistency: Optional[Dict[str, float]] = None,
    further_consistency: Optional[Sequence[float]] = None,
    detail_seeds: int = 1,
) -> Dict[str, Any]:
    """Metrics, FID and edges by kind of crop of each method's outputs; `consistency` replaces the crops' own.

    `further`: detail mode's draws with the following seeds (`further_consistency` their consistency). The first
    gives the two-seed difference; with `detail_seeds` above 1, detail mode's metrics and FID are the means over its
    first `detail_seeds` draws (the FID of each in `fid_per_seed`): one draw of a few images is a noisy FID.
    """
    results = {name: image_quality(images, hr, lr) for name, images in outputs.items()}
    for name, value in (consistency or {}).items():
        results[name]["consistency"] = value
    draws = list(further[: detail_seeds - 1])
    draw_results = [image_quality(images, hr, lr) for images in draws]
    for result, value in zip(draw_results, further_consistency or []):
        result["consistency"] = value
    if fid is not None:
        values = fids(fid, hr, list(outputs.values()) + draws)
        for name, value in zip(outputs, values):
            results[name]["fid"] = value
        for result, value in zip(draw_results, values[len(outputs) :]):
            result["fid"] = value
    if draw_results:
        first = results["SR3 detail"]
        results["SR3 detail"] = mean_of_draws([first] + draw_results)
        results["SR3 detail"]["seeds"] = 1 + len(draw_results)
        if fid is not None:
            results["SR3 detail"]["fid_per_seed"] = [first["fid"]] + [result["fid"] for result in draw_results]
    if further:
        results["SR3 detail"]["two_seeds_differ_255"] = float((further[0] - outputs["SR3 detail"]).abs().mean()) * 127.5
    return {
        "images": hr.shape[0],
        "size": hr.shape[-1],
        "hr_flat_grain": flat_grain(hr, hr, hr.shape[-1] // lr.shape[-1]),
        "results": results,
        "edges_by_content": edges_by_content(hr, outputs),
        "tensors": (lr, outputs, hr),
        "draws": draws,
    }


def evaluate_set(pipeline: SR3Pipeline, hr: torch.Tensor, args: argparse.Namespace, fid: Any) -> Dict[str, Any]:
    """Both sampling modes and bicubic on one test set, each crop degraded and super-resolved on its own."""
    lr = low_resolution_input(hr, pipeline.config.upscale_factor)
    outputs, further = run_methods(pipeline, lr, tuple(hr.shape[-2:]), args)
    return score_set(hr, lr, outputs, further, fid, detail_seeds=args.detail_seeds)


def load_whole_photos(
    paths: Sequence[Union[str, pathlib.Path]], factor: int, max_side: Optional[int] = None
) -> List[torch.Tensor]:
    """Each photo as a `(1, 3, H, W)` HR in [-1, 1], cropped to a multiple of `factor`."""
    photos = []
    for path in paths:
        hr = images_to_tensor(load_photo(path, max_side))
        photos.append(hr[..., : hr.shape[-2] // factor * factor, : hr.shape[-1] // factor * factor])
    return photos


class WholePhotos:
    """Photos super-resolved whole and scored on crops cut from every output at the same places."""

    def __init__(self, hr: List[torch.Tensor], size: int, count: int, seed: int, factor: int):
        self.hr, self.size, self.factor = hr, size, factor
        self.positions = random_crop_positions(
            [tuple(photo.shape[-2:]) for photo in hr], size, count, seed, step=factor
        )
        self.lr = [low_resolution_input(photo, factor) for photo in hr]
        self.bicubic = [upsample_condition(lr, tuple(photo.shape[-2:])).clamp(-1, 1) for lr, photo in zip(self.lr, hr)]

    def cut(self, images: List[torch.Tensor]) -> torch.Tensor:
        """The crops of per-photo `images` (HR or LR grid, read from their size) at the places, in one batch."""
        crops = []
        for photo, top, left in self.positions:
            scale = self.hr[photo].shape[-1] // images[photo].shape[-1]
            side, top, left = self.size // scale, top // scale, left // scale
            crops.append(images[photo][..., top : top + side, left : left + side])
        return torch.cat(crops)

    def consistency(self, outputs: List[torch.Tensor]) -> float:
        """Mean consistency of the crops, each measured on its photo's downsampled 8-bit output over the crop's input
        pixels: the downsample of a crop alone would differ from the photo's along the crop's border, for every
        method."""
        differences = [
            resize_bicubic(quantize(output).float() / 127.5 - 1, tuple(lr.shape[-2:])) - lr
            for output, lr in zip(outputs, self.lr)
        ]
        errors = []
        low = self.size // self.factor
        for photo, top, left in self.positions:
            top, left = top // self.factor, left // self.factor
            error = differences[photo][..., top : top + low, left : left + low]
            errors.append((error.double() / 2).pow(2).mean())
        return float(torch.stack(errors).mean())


def evaluate_whole_photos(
    pipeline: SR3Pipeline,
    paths: Sequence[Union[str, pathlib.Path]],
    count: int,
    seed: int,
    args: argparse.Namespace,
    fid: Any,
    max_side: Optional[int] = None,
) -> Dict[str, Any]:
    """Both modes and bicubic on whole photos, as `sr3 upscale` runs them, scored on `count` crops cut at the same
    places from every output ([`WholePhotos`]): the network sees each crop's surroundings, as it does for a user."""
    factor = pipeline.config.upscale_factor
    photos = WholePhotos(load_whole_photos(paths, factor, max_side), args.crop_size, count, seed, factor)
    whole: Dict[str, List[torch.Tensor]] = {}
    further_whole: List[List[torch.Tensor]] = [[] for _ in further_seeds(args)]  # per seed, per photo
    for lr, hr in zip(photos.lr, photos.hr):
        outputs, further = run_methods(pipeline, lr, tuple(hr.shape[-2:]), args)
        for name, image in outputs.items():
            whole.setdefault(name, []).append(image)
        for images, image in zip(further_whole, further):
            images.append(image)
    outputs = {name: photos.cut(images) for name, images in whole.items()}
    consistency = {name: photos.consistency(images) for name, images in whole.items()}
    return score_set(
        photos.cut(photos.hr),
        photos.cut(photos.lr),
        outputs,
        [photos.cut(images) for images in further_whole],
        fid,
        consistency,
        [photos.consistency(images) for images in further_whole],
        detail_seeds=args.detail_seeds,
    )


# Crops grouped by the share of the HR's edge energy that bicubic keeps: little where the detail is finer than the
# input's pixels (foliage, fabric, grain), most where it is edges the input shows.
EDGES_KEPT_EDGE_SHARE = 0.65
CONTENT_BINS = (
    ("texture", 0.0, TEXTURE_KEPT_EDGE_SHARE),
    ("mixed", TEXTURE_KEPT_EDGE_SHARE, EDGES_KEPT_EDGE_SHARE),
    ("edges", EDGES_KEPT_EDGE_SHARE, float("inf")),
)


def edges_by_content(hr: torch.Tensor, outputs: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Each method's edge energy relative to the HR's within each of `CONTENT_BINS` (by `outputs["bicubic"]`).

    A set's edge ratio is a mix: test sets differ in how many of their crops are texture. Within one kind of crop,
    sets compare directly, and a model's shortfall shows where it is.
    """
    hr_edges = edge_energy(quantize(hr))
    edges = {name: edge_energy(quantize(images)) for name, images in outputs.items()}
    kept = edges["bicubic"] / hr_edges.clamp(min=1e-12)
    table = {}
    for name, low, high in CONTENT_BINS:
        chosen = (kept >= low) & (kept < high)
        if chosen.any():
            total = hr_edges[chosen].sum()
            table[name] = {"crops": int(chosen.sum()), **{m: float(e[chosen].sum() / total) for m, e in edges.items()}}
    return table


def flattest(hr: torch.Tensor) -> int:
    """Index of the crop with the least edge energy (where grain would show)."""
    return int(edge_energy(quantize(hr)).argmin())


def busiest(hr: torch.Tensor, count: int) -> List[int]:
    """Indices of the `count` crops with the most edge energy (where restored detail would show). Not the widest
    spread of values: a smooth gradient has that, and nothing to restore."""
    return edge_energy(quantize(hr)).argsort(descending=True)[:count].tolist()


def picture(sets: Dict[str, Dict[str, Any]], rows_per_set: int, magnify: int) -> PIL.Image.Image:
    """LR | bicubic | SR3 modes | HR for the most detailed crops of each set and the flattest held-out crop,
    magnified `magnify` times with nearest neighbour so that single pixels can be judged."""
    rows: List[List[PIL.Image.Image]] = []
    for name, evaluated in sets.items():
        lr, outputs, hr = evaluated["tensors"]
        chosen = busiest(hr, rows_per_set)
        if name == "held-out photos":
            chosen.append(flattest(hr))
        for index in chosen:
            size = (hr.shape[-1] * magnify, hr.shape[-2] * magnify)
            cells = [lr] + list(outputs.values()) + [hr]
            rows.append([tensor_to_pil(part[index : index + 1])[0].resize(size, PIL.Image.NEAREST) for part in cells])
    return grid(rows)


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"Fidelity: {report['fidelity_steps']} deterministic DDIM steps from the noise's mean; detail: "
        f"{report['sampler']}, "
        f"{report['steps']} steps"
        + (f", eta {report['eta']}" if report.get("eta") is not None else "")
        + (f", strength {report['strength']}" if report.get("strength") is not None else "")
        + (f", guidance scale {report['guidance_scale']:g}" if report.get("guidance_scale") is not None else "")
        + (
            f", parallel guidance weight {report['parallel_guidance_weight']:g}"
            if report.get("parallel_guidance_weight") not in (None, 1)
            else ""
        )
        + (
            f", in {report['window_size']}-pixel windows on images at least "
            f"{MIN_WINDOWS_ACROSS * report['window_size']} pixels on their shorter side"
            if report.get("window_size")
            else ""
        )
        + (
            f", its metrics and FID the means over {report['detail_seeds']} seeds"
            if report.get("detail_seeds", 1) > 1
            else ""
        )
        + (
            "; self-ensemble: the fidelity answers for the input's 8 flips and quarter-turns, averaged"
            if report.get("self_ensemble")
            else ""
        )
        + (
            ". Photos super-resolved whole, as `sr3 upscale` does, and the crops cut from the outputs (consistency "
            "on the photo's downsampled output)"
            if report.get("whole_photos")
            else ". Each crop degraded and super-resolved on its own"
        )
        + ". LR inputs are 8-bit for every method. Consistency: MSE between the input and the downsampled output "
        "(images in [0, 1]), shown x1e-5. Grain on flat crops: on the flattest tenth of the crops (least HR edge "
        "energy), the RMS of the luma finer than half an input pixel, 1/255 units, the HR's own in brackets; above "
        "it, a method draws grain the photo does not have. FID from the offline Inception; below ~1000 images it is "
        "indicative.",
        "",
        "| test set | method | PSNR | SSIM | consistency (MSE / 1e-5) | colour error R/G/B (/255) | edges / HR "
        "| grain on flat crops (/255; HR) | FID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, evaluated in report["sets"].items():
        for method, values in evaluated["results"].items():
            colour = "/".join(f"{c:.2f}" for c in values["colour_error"])
            fid = f"{values['fid']:.1f}" if "fid" in values else "-"
            lines.append(
                f"| {name} ({evaluated['images']} x {evaluated['size']}px) | {method} | {values['psnr']:.2f} | "
                f"{values['ssim']:.4f} | {values['consistency'] * 1e5:.2f} | {colour} | {values['edge_ratio']:.3f} | "
                f"{values['flat_grain']:.2f} ({evaluated['hr_flat_grain']:.2f}) | {fid} |"
            )
    methods = list(next(iter(report["sets"].values()))["results"])
    lines += [
        "",
        "Edge energy relative to the HR's, by kind of crop: texture where bicubic keeps under "
        f"{CONTENT_BINS[0][2]:.0%} of the HR's edge energy (detail finer than the input's pixels), edges where it "
        f"keeps {CONTENT_BINS[2][1]:.0%} or more, mixed between.",
        "",
        "| test set | crops | count | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for name, evaluated in report["sets"].items():
        for kind, values in evaluated["edges_by_content"].items():
            ratios = " | ".join(f"{values[method]:.3f}" for method in methods)
            lines.append(f"| {name} | {kind} | {values['crops']} | {ratios} |")
    return "\n".join(lines) + "\n"


def outputs_file(set_name: str) -> str:
    """`outputs_<set>.npz`, in letters, digits and dashes: one file per set keeps each under a transfer limit
    (256 crops of 64px, 4 methods: about 10 MB), and the name survives any file system."""
    return f"outputs_{re.sub(r'[^A-Za-z0-9]+', '-', set_name).strip('-')}.npz"


def save_outputs(sets: Dict[str, Dict[str, Any]], folder: str) -> List[str]:
    """Every set's HR and outputs as uint8 arrays, keyed `<set>/<method>` and `<set>/HR`, one file per set (see
    [`outputs_file`]), so FID can be computed on another machine (the Inception network need not be where the model
    runs). Detail mode's further draws that `--detail-seeds` averages are saved as `SR3 detail, draw 2`, `... 3`.
    Returns the paths written."""
    paths = []
    for name, evaluated in sets.items():
        _, outputs, hr = evaluated["tensors"]
        draws = {f"SR3 detail, draw {index}": images for index, images in enumerate(evaluated.get("draws", []), 2)}
        arrays = {
            f"{name}/{method}": quantize(images).to(torch.uint8).numpy()
            for method, images in {**outputs, **draws}.items()
        }
        arrays[f"{name}/HR"] = quantize(hr).to(torch.uint8).numpy()
        paths.append(os.path.join(folder, outputs_file(name)))
        np.savez_compressed(paths[-1], **arrays)
    return paths


def load_outputs(path: str) -> Tuple[str, Dict[str, np.ndarray]]:
    """One file of [`save_outputs`]: its set's name and its arrays keyed by method (and `HR`)."""
    saved = dict(np.load(path))
    set_names = sorted({key.split("/")[0] for key in saved})
    if len(set_names) != 1 or f"{set_names[0]}/HR" not in saved:
        raise ValueError(f"{path} is not one set of `model_report.py --save-outputs` (sets: {set_names})")
    return set_names[0], {key.split("/", 1)[1]: array for key, array in saved.items()}


def unseen_crops(folder: str, size: int, count: int, seed: int) -> torch.Tensor:
    """Random crops of photos the project never trained or validated on (e.g. pyiqa's reference BMPs)."""
    return photo_crops(find_images([folder]), size, count=count, seed=seed, output_type="pt")


def heldout_photos(fraction: Optional[float], models: Sequence[str]) -> Union[float, List[str]]:
    """What `--heldout` holds out for `models`: `fraction` where given; else, when one of them is the packaged model,
    the names of its held-out photos (a fraction holds out others where other photo packages are installed, some
    of which it trained on); else 0.25, the fraction training runs hold out."""
    if fraction is not None:
        return fraction
    packaged = default_model_path()
    if any(os.path.isdir(model) and os.path.samefile(model, packaged) for model in models):
        return packaged_model_heldout()
    return 0.25


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the SR3Pipeline folder to evaluate")
    parser.add_argument("--faces", help="folder of the original's samples (holding hr_*/ folders)")
    parser.add_argument("--face-size", type=int, default=128, help="faces are evaluated at this size")
    parser.add_argument("--unseen", help="folder of photos never trained on nor held out (e.g. pyiqa's ref_dir)")
    parser.add_argument("--unseen-crops", type=int, default=128, help="crops of the --unseen photos")
    parser.add_argument("--crop-size", type=int, default=64, help="held-out photo crop size (HR)")
    parser.add_argument("--crops", type=int, default=256, help="held-out photo crops")
    parser.add_argument(
        "--heldout",
        type=float,
        default=None,
        help="the training run's held-out photo fraction (default: the packaged model's own held-out photos for "
        "the packaged model, else 0.25)",
    )
    parser.add_argument("--max-side", type=int, default=512, help="photos downscaled to this longer side first")
    parser.add_argument("--modes", nargs="+", default=["fidelity", "detail"], choices=["fidelity", "detail"])
    parser.add_argument(
        "--steps", type=int, default=None, help="detail-mode steps with the saved scheduler (default: the model's own)"
    )
    parser.add_argument(
        "--fidelity-steps", type=int, default=None, help="fidelity-mode steps (default: the pipeline's own)"
    )
    parser.add_argument("--eta", type=float, default=None, help="detail-mode eta (DDIM; default: the model's own)")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="detail-mode strength (below 1: from fidelity; default: the model's)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="detail-mode autoguidance scale, for models saved with a guidance UNet (default: the model's own)",
    )
    parser.add_argument(
        "--parallel-guidance-weight",
        type=float,
        default=None,
        help="detail-mode weight of the guidance update along the model's own prediction (default: the model's own)",
    )
    parser.add_argument(
        "--window-size",
        type=int,
        default=None,
        help="detail mode: the texture of windows of this size at every step (0: off; default: the model's own)",
    )
    parser.add_argument(
        "--self-ensemble", action="store_true", help="also fidelity mode averaged over the 8 flips and quarter-turns"
    )
    parser.add_argument(
        "--detail-seeds",
        type=int,
        default=1,
        help="detail mode drawn with this many seeds (--seed onwards), its metrics and FID the means over them: the "
        "faces' FID from one draw of 5 to 9 images moves by several points from seed to seed (pictures: the first)",
    )
    parser.add_argument(
        "--whole-photos",
        action="store_true",
        help="super-resolve the held-out and never-seen photos whole, as `sr3 upscale` does, and cut the crops from "
        "the outputs (default: each crop is degraded and super-resolved on its own, without its surroundings)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS, help="as `sr3 upscale --backend` (auto: bf16 where native)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fid", action="store_true", help="skip FID (it needs the [fid] extra)")
    parser.add_argument("--magnify", type=int, default=3, help="nearest-neighbour magnification of the pictures")
    parser.add_argument("--output", required=True, help="folder for report.json, report.md, evaluation.png")
    parser.add_argument("--device", default="cpu", help="where the network runs (cuda on a GPU machine)")
    parser.add_argument(
        "--save-outputs",
        action="store_true",
        help="also write every set's HR and outputs, 8-bit, to outputs_<set>.npz (FID elsewhere: gpu_quality.py "
        "--fid-of)",
    )
    parser.add_argument("--write-card", action="store_true", help="also write README.md into the model folder")
    parser.add_argument("--training-command", default=None, help="the command that trained the model (card)")
    args = parser.parse_args(argv)
    if args.detail_seeds < 1:
        parser.error(f"--detail-seeds must be at least 1, got {args.detail_seeds}")
    # Checked now, not when their turn comes after the long evaluation of the held-out photos.
    if args.faces:
        try:
            face_paths(args.faces)
        except OSError as error:
            parser.error(f"--faces: {error}")
    if args.unseen:
        try:
            find_images([args.unseen])
        except OSError as error:
            parser.error(f"--unseen: {error}")

    pipeline = SR3Pipeline.from_pretrained(args.model).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    # Detail mode as run, and recorded: what the command line gives, else the model's own settings (its config).
    detail = pipeline.detail_settings(
        args.steps, args.strength, args.eta, args.guidance_scale, args.window_size, args.parallel_guidance_weight
    )
    own_settings = detail == pipeline.detail_settings()
    args.steps, args.strength, args.eta = detail["num_inference_steps"], detail["strength"], detail["eta"]
    args.window_size, args.parallel_guidance_weight = detail["window_size"], detail["parallel_guidance_weight"]
    # The detail mode's guidance as run (the model's own unless --guidance-scale); None: an unguided model.
    guidance_scale = args.guidance_scale if args.guidance_scale is not None else pipeline.config.guidance_scale
    guidance_scale = guidance_scale if pipeline.guidance_unet is not None else None
    fid = None if args.no_fid else frechet_inception_distance()
    args.heldout = heldout_photos(args.heldout, [args.model])
    if args.whole_photos:
        _, heldout_paths = photo_split(packaged_photo_paths(), heldout=args.heldout)
        heldout = evaluate_whole_photos(pipeline, heldout_paths, args.crops, args.seed + 1, args, fid, args.max_side)
    else:
        crops, heldout_paths = heldout_crops(
            args.crop_size, args.crops, seed=args.seed, heldout=args.heldout, max_side=args.max_side
        )
        heldout = evaluate_set(pipeline, crops, args, fid)
    sets = {"held-out photos": heldout}
    if args.unseen and args.whole_photos:
        unseen_paths = find_images([args.unseen])
        sets["never-seen photos"] = evaluate_whole_photos(
            pipeline, unseen_paths, args.unseen_crops, args.seed + 2, args, fid
        )
    elif args.unseen:
        unseen = unseen_crops(args.unseen, args.crop_size, args.unseen_crops, args.seed + 2)
        sets["never-seen photos"] = evaluate_set(pipeline, unseen, args, fid)
    if args.faces:
        sets["original's sample faces"] = evaluate_set(pipeline, face_images(args.faces, args.face_size), args, fid)
    report = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "sampler": type(pipeline.scheduler).__name__,
        "backend": resolve_backend(args.backend, pipeline.unet),
        "steps": args.steps,
        "fidelity_steps": args.fidelity_steps or pipeline.config.fidelity_steps,
        "eta": args.eta,
        "strength": args.strength,
        "guidance_scale": guidance_scale,
        "parallel_guidance_weight": args.parallel_guidance_weight if guidance_scale is not None else None,
        "window_size": args.window_size,
        "self_ensemble": args.self_ensemble,
        "detail_seeds": args.detail_seeds,
        "whole_photos": args.whole_photos,
        "heldout_photos": [photo_name(path) for path in heldout_paths],
        "sets": {
            name: {key: value for key, value in evaluated.items() if key not in ("tensors", "draws")}
            for name, evaluated in sets.items()
        },
    }
    table = write_report(args.output, "report", report, markdown(report))
    if args.save_outputs:
        save_outputs(sets, args.output)
    figure = picture(sets, rows_per_set=3, magnify=args.magnify)
    figure.save(os.path.join(args.output, "evaluation.png"))
    print(table)

    if args.write_card:
        shutil.copy(os.path.join(args.output, "evaluation.png"), os.path.join(args.model, "evaluation.png"))
        summary_path = os.path.join(args.model, "training_summary.json")
        summary = json.load(open(summary_path, encoding="utf-8")) if os.path.isfile(summary_path) else {}
        photos = sets["held-out photos"]["results"]
        # The model-index reports the fidelity mode (the highest-PSNR answer) as the model's result.
        reported = "SR3 fidelity" if "SR3 fidelity" in photos else "SR3 detail"
        write_model_card(
            args.model,
            task="sr",
            upscale_factor=pipeline.config.upscale_factor,
            resolution=pipeline.unet.config.sample_size,
            data_description="random crops of the real photographs that ship with scikit-image, matplotlib, "
            "scikit-learn, SciPy 1.11 (raccoon face), insightface (group photo) and Debian's mate/plasma wallpaper "
            f"packages, minus the held-out photos ({', '.join(report['heldout_photos'])}), and any further "
            "photographs the training commands below name",
            sample_image="evaluation.png",
            sample_caption=" | ".join(["LR", *photos, "HR"])
            + f", magnified x{args.magnify}: the three most detailed crops of each test set, and (4th row) the "
            "flattest held-out crop, where grain would show.",
            evaluation={
                name: {k: v for k, v in values.items() if k not in ("colour_error", "two_seeds_differ_255")}
                for name, values in photos.items()
            },
            reported_method=reported,
            evaluation_dataset=f"held-out photos, {args.crops} crops of {args.crop_size}px"
            + (", cut from the photos super-resolved whole" if args.whole_photos else ""),
            training_command=args.training_command,
            training_summary={
                key: round(summary[key], 4) if isinstance(summary[key], float) else summary[key]
                for key in ("global_step", "total_batch_size", "final_loss", "residual_scale")
                if summary.get(key) is not None
            }
            or None,
            extra_sections=[
                modes_section(args.steps, args.eta, args.strength, guidance_scale, own_settings, args.window_size),
                "## All results\n\n" + table,
            ],
        )
    return report


def modes_section(
    steps: int,
    eta: Optional[float],
    strength: Optional[float],
    guidance_scale: Optional[float] = None,
    own_settings: bool = False,
    window_size: int = 0,
) -> str:
    """The card's "Two ways to sample", quoting the detail settings the report measured; `own_settings`: they are the
    pipeline's own (its config's), which a call that leaves them out runs."""
    named = (
        ("eta", eta),
        ("strength", strength),
        ("guidance_scale", guidance_scale),
        ("window_size", window_size or None),
    )
    settings = ", ".join(
        [f"num_inference_steps={steps}"] + [f"{name}={value:g}" for name, value in named if value is not None]
    )
    call = f'`pipe(image, mode="detail", {settings})`'
    if own_settings:
        call = f'`pipe(image, mode="detail")`, which runs this pipeline\'s own detail settings (its config): {call}'
    if strength is not None and strength < 1:
        refinement = (
            f"`strength` {strength:g} (this report's setting) refines the fidelity answer over the last {strength:.0%} "
            "of the schedule, adding texture on top of it. Lower strengths keep more of the fidelity answer (higher "
            "PSNR, less texture); `strength=1` refines from pure noise: sharper, more invented texture, at a PSNR and "
            "FID cost."
        )
    else:
        refinement = "It refines from pure noise; `strength` below 1 refines the fidelity answer instead."
    guidance = ""
    if guidance_scale is not None:
        guidance = (
            f" `guidance_scale` {guidance_scale:g} (autoguidance) extrapolates each step's prediction away from the "
            "pipeline's `guidance_unet`, a weaker model of the same task, for sharper, more photographic texture at "
            "twice the network evaluations per step; `guidance_scale=1` turns it off."
        )
    windows = ""
    if window_size:
        windows = (
            f" `window_size` {window_size} also runs the network on {window_size}-pixel windows (its training crop) at "
            "every step, on a grid that moves from step to step, and takes the fine texture from them and the coarse "
            "structure and colour from the whole image: a network trained on small crops draws less texture inside a "
            f"large image than on its crops. Images under {MIN_WINDOWS_ACROSS * window_size} pixels on their shorter "
            "side (a face a window cannot hold) run whole; `window_size=0` turns it off."
        )
    return f"""## Two ways to sample

- **Fidelity** (`pipe(image, mode="fidelity")`, `sr3 upscale` by default): a few deterministic DDIM steps from
  the mean of the starting noise, an estimate of the average of all plausible high-resolution images. Highest
  PSNR and SSIM, fastest; texture stays smooth where the input cannot tell. Use it for measurements, text,
  documents, faces you must not invent on. `self_ensemble=True` (`sr3 upscale --self-ensemble`) averages the
  answers for the 8 flips and quarter-turns of the input: a little higher PSNR and SSIM for 8 times the time.
- **Detail** ({call}; `sr3 upscale --mode detail`): SR3's iterative
  refinement draws one plausible image. {refinement} `eta` (DDIM) adds fresh noise per step.{guidance}{windows}
"""


if __name__ == "__main__":
    main()
