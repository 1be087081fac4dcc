"""Evaluate a trained x4 SR3 photo model against bicubic, and write its report and model card.

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 \
        --faces ../shared/data/original_samples --output report/ --write-card

Two test sets, neither seen in training:
- held-out photos: random crops of the packaged photographs that `diffusers_sr3.photos.photo_split` holds out
  (the split the training run used: whole photos, so no held-out pixel was trained on);
- faces: the high-resolution sample faces of the original SR3 project (`--faces`, their `hr_*` folders), resized
  to --face-size, degraded x4 and super-resolved (in tiles when larger than the model's training size).
For SR3 (the pipeline's saved scheduler, --steps) and for bicubic: PSNR, SSIM, consistency, per-channel colour
error, edge energy relative to HR and FID (offline Inception; with few images FID is only indicative).
Writes report.json, report.md and evaluation.png (LR | bicubic | SR3 | HR) to --output; --write-card also writes
the model card README.md (and evaluation.png) into the model folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
from typing import Any, Dict, List, Optional, Sequence

import PIL.Image
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.image_io import open_image
from diffusers_sr3.image_processing import degrade, grid, images_to_tensor, resize_bicubic, tensor_to_pil
from diffusers_sr3.metrics import frechet_inception_distance, image_quality, quantize
from diffusers_sr3.model_card import write_model_card
from diffusers_sr3.photos import heldout_crops, photo_name
from diffusers_sr3.tiling import tiled_super_resolve


def face_images(folder: str, size: int) -> torch.Tensor:
    """The original project's high-resolution sample faces (`hr_*/*.png`), resized to `size`, in [-1, 1]."""
    paths = sorted(pathlib.Path(folder).glob("*/hr_*/*.png"))
    if not paths:
        raise FileNotFoundError(f"no hr_*/*.png faces under {folder}")
    faces = [resize_bicubic(images_to_tensor(open_image(path)), (size, size)) for path in paths]
    return torch.cat(faces)


def super_resolve(pipeline: SR3Pipeline, lr: torch.Tensor, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """SR3 outputs in [-1, 1] for low-resolution inputs in [-1, 1], tiled when larger than a training tile."""
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for start in range(0, lr.shape[0], batch_size):
        batch = (lr[start : start + batch_size] + 1) / 2
        result = tiled_super_resolve(
            pipeline, batch, num_inference_steps=steps, generator=generator, output_type="pt"
        ).images
        outputs.append(result * 2 - 1)
    return torch.cat(outputs)


def fids(metric: Any, real: torch.Tensor, fakes: Sequence[torch.Tensor]) -> List[float]:
    """FID of each fake set against `real`, with one Inception network and the real statistics computed once."""
    metric.reset_real_features = True
    metric.reset()
    metric.reset_real_features = False
    metric.update(quantize(real), real=True)
    values = []
    for fake in fakes:
        metric.reset()
        metric.update(quantize(fake), real=False)
        values.append(float(metric.compute()))
    return values


def evaluate_set(pipeline: SR3Pipeline, hr: torch.Tensor, args: argparse.Namespace, fid: Any) -> Dict[str, Any]:
    factor = pipeline.config.upscale_factor
    lr, bicubic = degrade(hr, factor)
    sr = super_resolve(pipeline, lr, args.steps, args.batch_size, args.seed)
    results = {"SR3": image_quality(sr, hr, lr), "bicubic": image_quality(bicubic, hr, lr)}
    results["SR3"]["fid"], results["bicubic"]["fid"] = fids(fid, hr, [sr, bicubic])
    return {"images": hr.shape[0], "size": hr.shape[-1], "results": results, "tensors": (lr, bicubic, sr, hr)}


def picture(sets: Sequence[Dict[str, Any]], rows_per_set: int, cell: int) -> PIL.Image.Image:
    rows: List[List[PIL.Image.Image]] = []
    for evaluated in sets:
        lr, bicubic, sr, hr = evaluated["tensors"]
        for index in range(min(rows_per_set, hr.shape[0])):
            rows.append([tensor_to_pil(part[index : index + 1])[0] for part in (lr, bicubic, sr, hr)])
    return grid(rows, size=(cell, cell))


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"Sampler: {report['sampler']}, {report['steps']} steps. FID from few images is only indicative.",
        "",
        "| test set | method | PSNR | SSIM | consistency (x1e-5) | colour error R/G/B (/255) | edges / HR | FID |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, evaluated in report["sets"].items():
        for method, values in evaluated["results"].items():
            colour = "/".join(f"{c:.2f}" for c in values["colour_error"])
            lines.append(
                f"| {name} ({evaluated['images']} x {evaluated['size']}px) | {method} | {values['psnr']:.2f} | "
                f"{values['ssim']:.4f} | {values['consistency'] * 1e5:.2f} | {colour} | {values['edge_ratio']:.3f} | "
                f"{values['fid']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the SR3Pipeline folder to evaluate")
    parser.add_argument("--faces", help="folder of the original's samples (holding hr_*/ folders)")
    parser.add_argument("--face-size", type=int, default=128, help="faces are evaluated at this size")
    parser.add_argument("--crop-size", type=int, default=64, help="held-out photo crop size (HR)")
    parser.add_argument("--crops", type=int, default=64, help="held-out photo crops")
    parser.add_argument("--heldout", type=float, default=0.25, help="the training run's held-out photo fraction")
    parser.add_argument("--max-side", type=int, default=512, help="photos downscaled to this longer side first")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps with the saved scheduler")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="folder for report.json, report.md, evaluation.png")
    parser.add_argument("--write-card", action="store_true", help="also write README.md into the model folder")
    parser.add_argument("--training-command", default=None, help="the command that trained the model (card)")
    args = parser.parse_args(argv)

    pipeline = SR3Pipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    crops, heldout_paths = heldout_crops(
        args.crop_size, args.crops, seed=args.seed, heldout=args.heldout, max_side=args.max_side
    )
    fid = frechet_inception_distance()
    sets = {"held-out photos": evaluate_set(pipeline, crops, args, fid)}
    if args.faces:
        sets["original's sample faces"] = evaluate_set(pipeline, face_images(args.faces, args.face_size), args, fid)
    report = {
        "model": args.model,
        "sampler": type(pipeline.scheduler).__name__,
        "steps": args.steps,
        "heldout_photos": [photo_name(path) for path in heldout_paths],
        "sets": {name: {k: v for k, v in evaluated.items() if k != "tensors"} for name, evaluated in sets.items()},
    }
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    table = markdown(report)
    with open(os.path.join(args.output, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    figure = picture(list(sets.values()), rows_per_set=3, cell=args.face_size)
    figure.save(os.path.join(args.output, "evaluation.png"))
    print(table)

    if args.write_card:
        shutil.copy(os.path.join(args.output, "evaluation.png"), os.path.join(args.model, "evaluation.png"))
        summary_path = os.path.join(args.model, "training_summary.json")
        summary = json.load(open(summary_path, encoding="utf-8")) if os.path.isfile(summary_path) else {}
        photos = sets["held-out photos"]["results"]
        write_model_card(
            args.model,
            task="sr",
            upscale_factor=pipeline.config.upscale_factor,
            resolution=pipeline.unet.config.sample_size,
            data_description="random crops of the real photographs that ship with scikit-image, matplotlib, "
            "scikit-learn and Debian's mate/plasma wallpaper packages, minus the held-out photos "
            f"({', '.join(report['heldout_photos'])})",
            sample_image="evaluation.png",
            evaluation=photos,
            evaluation_dataset=f"held-out photos, {args.crops} crops of {args.crop_size}px",
            training_command=args.training_command,
            training_summary={
                key: summary[key] for key in ("steps", "total_batch_size", "final_loss") if key in summary
            }
            or None,
            extra_sections=["## All results\n\n" + table],
        )
    return report


if __name__ == "__main__":
    main()
