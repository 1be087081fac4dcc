"""The step-count study: how few sampling steps does a trained SR3 model need?

    python benchmarks/samplers.py --output benchmarks/results/samplers     # the packaged model, default entries
    python benchmarks/samplers.py --model my-model --entries ddpm:2000 ddim:25 unipc:10 --crops 64 --fid
    python benchmarks/samplers.py --entries fidelity:4 ddim:10 ddim:10:eta=1 ddim:25:eta=1 --crops 256 --fid
    python benchmarks/samplers.py --photos pyiqa_ref_dir/ --entries fidelity:4 ddim:10:eta=1 ddim:50:eta=1 --fid
    python benchmarks/samplers.py --whole-photos --crops 256 --entries ddim:10:eta=1:strength=0.6:guidance_scale=2 --fid

Super-resolves held-out photo crops (whole photos that `diffusers_sr3.photos.photo_split` keeps out of training, the
split the packaged model and `benchmarks/convergence.py` use), or with --photos random crops of a folder of photos never
trained on (`model_report.py --unseen`'s crops for the same seed and count), or with --training-photos random crops of
the training side of the split at --max-side (pixels the packaged model learned from: what it misses there, it misses
for want of fitting, not of generalising), with each
`scheduler:steps[:eta=E][:temperature=T][:strength=S][:guidance_scale=G][:parallel_guidance_weight=P][:window_size=W]`
entry on the model's training schedule (or `fidelity:steps`: the pipeline's fidelity mode), all from the same seed, and
reports PSNR, SSIM, consistency, colour error, edge energy relative to HR (of all crops, and of the texture crops, where
bicubic keeps under 45% of the HR's edge energy), grain on the flattest tenth of the crops (`diffusers_sr3.metrics`; the
HR's own in the header), FID (with --fid; few images make it only indicative) and the wall time per image. The first
entry is the reference (the original's 2000-step DDPM by default): an entry has *equal quality* when its PSNR is within
0.3 dB and its SSIM within 0.01 of the reference's, and the recommended sampler is the entry of equal quality with the
fewest network evaluations (the cost that does not depend on the machine's load), the higher PSNR breaking ties. With
--whole-photos each photo is super-resolved whole, as `sr3 upscale` runs it, and the crops are cut from every output at
the same places (`model_report.py --whole-photos`'s crops for the same seed and count): the network's output depends on
the size of the image it runs on, and detail settings compared on crops alone can rank and score differently on whole
photos (docs/quality.md). `guidance_scale` (autoguidance) needs a model saved with a guidance UNet, or one given by
--guidance-unet.
What an entry leaves out is the sampler's default, whatever the model saved: strength 1 (from noise), the
scheduler's eta (DDIM: 0), unguided, no windows. Writes samplers.json, samplers.md and samplers.png
(bicubic | each entry | HR on the most detailed texture crops and the flattest crop, magnified) to --output.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_report  # noqa: E402  (a sibling script: its never-seen crops)
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel
from diffusers_sr3.backends import BACKENDS, cpu_name, use_backend
from diffusers_sr3.image_io import find_images
from diffusers_sr3.image_processing import degrade, grid, tensor_to_pil
from diffusers_sr3.metrics import (
    TEXTURE_KEPT_EDGE_SHARE,
    edge_energy,
    flat_grain,
    frechet_inception_distance,
    image_quality,
    kept_edge_share,
    quantize,
)
from diffusers_sr3.noise import SCHEDULERS, swap_scheduler
from diffusers_sr3.photos import heldout_crops, packaged_photo_paths, photo_crops, photo_split
from diffusers_sr3.pipelines.pipeline_sr3 import DETAIL_ARGUMENTS
from diffusers_sr3.pretrained import default_model_path
from diffusers_sr3.tiling import tiled_super_resolve

DEFAULT_ENTRIES = (
    "ddpm:2000",
    "ddpm:1000",
    "ddim:10",
    "ddim:25",
    "ddim:50",
    "ddim:100",
    "dpmsolver:10",
    "dpmsolver:25",
    "dpmsolver:50",
    "dpmsolver:100",
    "unipc:10",
    "unipc:25",
    "unipc:50",
    "unipc:100",
)
PSNR_TOLERANCE_DB = 0.3
SSIM_TOLERANCE = 0.01


def parse_entry(entry: str) -> Tuple[str, int, Dict[str, float]]:
    """`"ddim:50"` -> `("ddim", 50, {})`, `"ddim:10:eta=1"` -> `("ddim", 10, {"eta": 1.0})`, `"fidelity:4"` ->
    `("fidelity", 4, {})`; refusing unknown schedulers and options and step counts below 1."""
    name, steps, *options = entry.split(":") + ([""] if ":" not in entry else [])
    expected = (
        f"{entry!r}: expected scheduler:steps[:eta=E][:temperature=T][:strength=S][:guidance_scale=G]"
        f"[:parallel_guidance_weight=P][:window_size=W] with a scheduler in {sorted(SCHEDULERS)} or fidelity, and "
        "steps >= 1"
    )
    if (name not in SCHEDULERS and name != "fidelity") or not steps.isdigit() or int(steps) < 1:
        raise ValueError(expected)
    parsed = {}
    for option in options:
        key, _, value = option.partition("=")
        try:
            parsed[key] = int(value) if key == "window_size" else float(value)
        except ValueError:
            raise ValueError(expected) from None
        if key not in DETAIL_ARGUMENTS or name == "fidelity":
            raise ValueError(expected)
    return name, int(steps), parsed


def sample(
    pipeline: SR3Pipeline,
    saved: Any,
    lr: torch.Tensor,
    scheduler: str,
    steps: int,
    batch_size: int,
    seed: int,
    options: Optional[Dict[str, float]] = None,
    backend: str = "torch",
    tile_size: Optional[int] = None,
) -> Tuple[torch.Tensor, float, int]:
    """SR3 outputs in [-1, 1] for `lr` in [-1, 1] with one sampler, the wall time and network evaluations per image.

    `tile_size` runs the network in overlapping tiles of that size, as `sr3 upscale --tile-size` does (None: the
    whole input at once); the evaluations count refinement steps, not tiles.

    Every sampler is built from the model's `saved` scheduler, so settings such as clipping carry over unchanged.
    `scheduler="fidelity"` runs the pipeline's fidelity mode (deterministic DDIM from the noise's mean).
    """
    fidelity = scheduler == "fidelity"
    pipeline.scheduler = saved if fidelity else swap_scheduler(saved, scheduler)
    options = dict(options or {})
    if not fidelity:
        # Entries name their settings: what one leaves out is the sampler's own default (from noise, the scheduler's
        # eta, unguided), not the model's saved detail settings.
        options.setdefault("strength", 1.0)
        step_eta = inspect.signature(pipeline.scheduler.step).parameters.get("eta")
        if step_eta is not None:
            options.setdefault("eta", step_eta.default)
        if pipeline.guidance_unet is not None:
            options.setdefault("guidance_scale", 1.0)
            options.setdefault("parallel_guidance_weight", 1.0)
        options.setdefault("window_size", 0)
    mode = dict(mode="fidelity") if fidelity else dict(mode="detail", **options)
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    started = time.perf_counter()
    run = pipeline if tile_size is None else functools.partial(tiled_super_resolve, pipeline, tile_size=tile_size)
    with use_backend(pipeline, backend):
        for start in range(0, lr.shape[0], batch_size):
            low = (lr[start : start + batch_size] + 1) / 2
            images = run(low, num_inference_steps=steps, generator=generator, output_type="pt", **mode).images
            outputs.append(images * 2 - 1)
    # Second-order samplers (Heun) list each step twice: one network evaluation per listed timestep, two with the
    # guide beside the UNet. Detail below strength 1 also runs the fidelity answer it starts from.
    evaluations = pipeline.num_timesteps * (2 if not fidelity and pipeline.guided(options.get("guidance_scale")) else 1)
    if not fidelity and options.get("strength", 1.0) < 1:
        evaluations += pipeline.config.fidelity_steps
    return torch.cat(outputs), (time.perf_counter() - started) / lr.shape[0], evaluations


def compare(rows: List[Dict[str, Any]]) -> Optional[str]:
    """Mark each row's speed-up over the first (reference) row and whether it has equal quality; the cheapest such."""
    reference = rows[0]
    for row in rows:
        row["speedup"] = reference["seconds_per_image"] / row["seconds_per_image"]
        row["equal_quality"] = bool(
            abs(row["psnr"] - reference["psnr"]) <= PSNR_TOLERANCE_DB
            and abs(row["ssim"] - reference["ssim"]) <= SSIM_TOLERANCE
        )
    equal = [row for row in rows[1:] if row["equal_quality"]]
    return min(equal, key=lambda row: (row["evaluations"], -row["psnr"]))["entry"] if equal else None


def markdown(report: Dict[str, Any]) -> str:
    has_fid = "fid" in report["rows"][0]
    lines = [
        f"Model: {report['model']}. {report['images']} crops of {report['size']}px of {report['photos']}"
        + (" (the photos super-resolved whole, the crops cut from the outputs)" if report.get("whole_photos") else "")
        + (f", the network in {report['tile_size']}px tiles" if report.get("tile_size") else "")
        + f", seed {report['seed']}, "
        f"{report['machine']}. Reference: {report['rows'][0]['entry']}; equal quality = PSNR within "
        f"{PSNR_TOLERANCE_DB} dB and SSIM within {SSIM_TOLERANCE} of it.",
        "",
        "| sampler | steps | PSNR | SSIM | consistency (x1e-5) | colour err R/G/B (/255) | edges / HR "
        f"| texture edges / HR ({report['texture_crops']} crops) | grain on flat crops (/255; HR "
        f"{report['hr_flat_grain']:.2f}) |" + (" FID |" if has_fid else "") + " s / image | speed-up | equal quality |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if has_fid else "") + "---|---|---|",
    ]
    for row in report["rows"] + [dict(report["bicubic"], entry="bicubic:-")]:
        name, steps, *options = row["entry"].split(":")
        name = " ".join([name, *options])
        colour = "/".join(f"{c:.2f}" for c in row["colour_error"])
        cells = [
            name,
            steps,
            f"{row['psnr']:.2f}",
            f"{row['ssim']:.4f}",
            f"{row['consistency'] * 1e5:.2f}",
            colour,
            f"{row['edge_ratio']:.3f}",
            f"{row['texture_edge_ratio']:.3f}" if row["texture_edge_ratio"] is not None else "-",
            f"{row['flat_grain']:.2f}",
        ]
        cells += [f"{row['fid']:.1f}"] if has_fid else []
        if "seconds_per_image" in row:
            equal = "yes" if row["equal_quality"] else "no"
            cells += [
                f"{row['seconds_per_image']:.2f}",
                f"{row['speedup']:.0f}x" if row["speedup"] >= 10 else f"{row['speedup']:.2g}x",
                equal,
            ]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Recommended: **{report['recommended'] or 'none of equal quality'}**."]
    return "\n".join(lines) + "\n"


def picture(columns: List[torch.Tensor], texture: torch.Tensor, magnify: int) -> PIL.Image.Image:
    """bicubic | each entry | HR, magnified with nearest neighbour: the 4 most detailed texture crops (where samplers
    differ most) and the flattest crop (where grain would show)."""
    hr = columns[-1]
    texture_indices = texture.nonzero().flatten()
    rows = [int(texture_indices[i]) for i in model_report.busiest(hr[texture_indices], 4)] + [model_report.flattest(hr)]
    size = (hr.shape[-1] * magnify, hr.shape[-2] * magnify)
    return grid(
        [[tensor_to_pil(column[i : i + 1])[0].resize(size, PIL.Image.NEAREST) for column in columns] for i in rows]
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SR3Pipeline folder (default: the packaged model)")
    parser.add_argument(
        "--guidance-unet", default=None, help="a UNet folder to guide the model by (for guidance_scale entries)"
    )
    parser.add_argument("--entries", nargs="+", default=list(DEFAULT_ENTRIES), help="scheduler:steps, reference first")
    parser.add_argument("--crops", type=int, default=8, help="photo crops")
    photos = parser.add_mutually_exclusive_group()
    photos.add_argument(
        "--photos", default=None, help="a folder of photos never trained on, instead of the held-out photos"
    )
    photos.add_argument(
        "--training-photos",
        action="store_true",
        help="the training side of the split instead of the held-out photos, at --max-side as the shipped model's "
        "tiles are cut: what the model draws on pixels it has learned from",
    )
    parser.add_argument("--crop-size", type=int, default=64, help="high-resolution crop size")
    parser.add_argument(
        "--whole-photos",
        action="store_true",
        help="super-resolve each photo whole, as `sr3 upscale` does, and cut the crops from the outputs (default: "
        "each crop is degraded and super-resolved on its own)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="with --whole-photos: run the network in overlapping tiles of this size, as `sr3 upscale --tile-size` "
        "does (default: each photo at once)",
    )
    parser.add_argument("--heldout", type=float, default=0.25, help="fraction of whole photos held out")
    parser.add_argument("--max-side", type=int, default=512, help="photos downscaled to this longer side first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fid", action="store_true", help="also FID against the HR crops (offline Inception)")
    parser.add_argument(
        "--backend", default="torch", choices=BACKENDS, help="as `sr3 upscale --backend` (default: float32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magnify", type=int, default=3, help="nearest-neighbour magnification of samplers.png")
    parser.add_argument(
        "--output", default="benchmarks/results/samplers", help="folder for samplers.json, .md and .png"
    )
    args = parser.parse_args(argv)
    try:
        args.parsed_entries = [parse_entry(entry) for entry in args.entries]
    except ValueError as error:
        parser.error(str(error))
    if args.crops < 1:
        parser.error(f"--crops must be at least 1, got {args.crops}")
    if args.tile_size is not None and not args.whole_photos:
        parser.error("--tile-size tiles whole photos: it needs --whole-photos")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    model = args.model or default_model_path()
    guide = {"guidance_unet": SR3UNet2DModel.from_pretrained(args.guidance_unet)} if args.guidance_unet else {}
    pipeline = SR3Pipeline.from_pretrained(model, **guide)
    pipeline.set_progress_bar_config(disable=True)
    factor = pipeline.config.upscale_factor
    photos = None
    if args.whole_photos:
        # As model_report.py --whole-photos: held-out (or training) photos at --max-side, others at their own size.
        if args.photos:
            paths, max_side, seed = find_images([args.photos]), None, args.seed + 2
        else:
            paths, max_side, seed = (
                photo_split(packaged_photo_paths(), heldout=args.heldout)[0 if args.training_photos else 1],
                args.max_side,
                args.seed + 1,
            )
        photos = model_report.WholePhotos(
            model_report.load_whole_photos(paths, factor, max_side), args.crop_size, args.crops, seed, factor
        )
        hr, lr, bicubic = photos.cut(photos.hr), photos.cut(photos.lr), photos.cut(photos.bicubic)
    elif args.photos:
        hr = model_report.unseen_crops(args.photos, args.crop_size, args.crops, args.seed + 2)
    elif args.training_photos:
        training = photo_split(packaged_photo_paths(), heldout=args.heldout)[0]
        hr = photo_crops(
            training, args.crop_size, count=args.crops, seed=args.seed + 1, max_side=args.max_side, output_type="pt"
        )
    else:
        hr, _ = heldout_crops(args.crop_size, args.crops, seed=args.seed, heldout=args.heldout, max_side=args.max_side)
    if photos is None:
        lr, bicubic = degrade(hr, factor)
    texture = kept_edge_share(hr, pipeline.config.upscale_factor) < TEXTURE_KEPT_EDGE_SHARE
    texture_hr_edges = edge_energy(quantize(hr[texture])).sum()
    fid = frechet_inception_distance() if args.fid else None
    if fid is not None:
        fid.update(quantize(hr), real=True)
        fid.reset_real_features = False

    def quality(images: torch.Tensor, consistency: Optional[float] = None) -> Dict[str, Any]:
        values = image_quality(images, hr, lr)
        if consistency is not None:
            values["consistency"] = consistency
        # Where the detail is finer than the input's pixels: how much of it a sampler restores.
        values["texture_edge_ratio"] = (
            float(edge_energy(quantize(images[texture])).sum() / texture_hr_edges) if texture.any() else None
        )
        if fid is not None:
            fid.reset()
            fid.update(quantize(images), real=False)
            values["fid"] = float(fid.compute())
        return values

    saved = pipeline.scheduler
    rows = []
    pictured = [bicubic]
    for entry, (scheduler, steps, options) in zip(args.entries, args.parsed_entries):
        if photos is None:
            sr, seconds, evaluations = sample(
                pipeline, saved, lr, scheduler, steps, args.batch_size, args.seed, options, args.backend
            )
            values = quality(sr)
        else:
            outputs, seconds = [], 0.0
            for photo_lr in photos.lr:
                output, photo_seconds, evaluations = sample(
                    pipeline, saved, photo_lr, scheduler, steps, 1, args.seed, options, args.backend, args.tile_size
                )
                outputs.append(output)
                seconds += photo_seconds / len(photos.lr)
            sr = photos.cut(outputs)
            values = quality(sr, photos.consistency(outputs))
        rows.append(dict(entry=entry, evaluations=evaluations, seconds_per_image=seconds, **values))
        pictured.append(sr)
        print(json.dumps(rows[-1]), flush=True)
    report = dict(
        model=str(model),
        photos=args.photos or ("training photos" if args.training_photos else "held-out photos"),
        images=hr.shape[0],
        texture_crops=int(texture.sum()),
        hr_flat_grain=flat_grain(hr, hr, factor),
        size=args.crop_size,
        seed=args.seed,
        machine=f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, backend {args.backend}",
        bicubic=quality(bicubic, None if photos is None else photos.consistency(photos.bicubic)),
        whole_photos=photos is not None,
        tile_size=args.tile_size,
        rows=rows,
    )
    report["recommended"] = compare(rows)
    table = write_report(args.output, "samplers", report, markdown(report))
    picture(pictured + [hr], texture, args.magnify).save(os.path.join(args.output, "samplers.png"))
    print(table)
    return report


if __name__ == "__main__":
    main()
