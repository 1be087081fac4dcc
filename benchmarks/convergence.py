"""How fast does SR3 converge? A reproducible study on real photographs that ship with Python/Debian packages.

Data: 64x64 crops (4x: 16 -> 64) of the packaged photographs (`diffusers_sr3.photos`); whole photos are split
into a training and a held-out set, and only held-out crops are evaluated. Model: the issue's size (inner width
32, channel multipliers 1, 2, 4, 8, attention at 8x8, 2 blocks per level, no dropout), batch 16, trained with the
shared training core (`diffusers_sr3.training.train`). Report, on the held-out crops at the saved pipeline's
sampler: PSNR, SSIM, consistency (MSE in [0, 1] between the LR input and the downsampled output), per-channel
colour error (mean over crops of |mean_c(SR) - mean_c(HR)|, in 1/255 units), edge energy relative to HR (mean
Sobel gradient magnitude of the output over that of HR), for SR3 and bicubic, and the wall time per training step.

Runs:
    python benchmarks/convergence.py --steps 500                                # the defaults for new models
    python benchmarks/convergence.py --steps 500 --ablation original v_prediction embedding_scale_1000
    python benchmarks/convergence.py --steps 3000 --output sr3-photos-x4         # keep the trained pipeline
    python benchmarks/convergence.py --list                                      # the runs and what they change

`--ablation original` trains with the original project's settings (Adam 1e-4, no warm-up, no clipping, no EMA,
L1 on epsilon, one step per batch, linear betas 1e-6..1e-2 over 2000 steps, unscaled noise-level embedding);
every other ablation changes exactly one of those. Results go to stdout as a Markdown table and, with
`--report DIR`, to `DIR/results.json`, `DIR/results.md` and a picture per run (LR | bicubic | SR3 | HR).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.image_processing import degrade, grid, tensor_to_pil
from diffusers_sr3.metrics import image_quality
from diffusers_sr3.noise import swap_scheduler
from diffusers_sr3.photos import study_crops
from diffusers_sr3.presets import NEW_MODEL_RECIPE
from diffusers_sr3.training.crops import crop_unet_config, train_on_crops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_whole  # noqa: E402  (a sibling script: where results are written)

UPSCALE_FACTOR = 4
CHANNEL_MULTIPLIERS = (1, 2, 4, 8)
UNET_OPTIONS = ("noise_level_embedding_scale", "film_affine")

# The original project's training recipe, as TrainingConfig fields (plus the two UNet options above).
ORIGINAL: Dict[str, Any] = dict(
    noise_level_embedding_scale=1.0,
    film_affine=False,
    residual=False,
    prediction_type="epsilon",
    loss_type="l1",
    snr_gamma=None,
    per_sample_timestep=False,
    beta_schedule="linear",
    num_train_timesteps=2000,
    beta_start=1e-6,
    beta_end=1e-2,
    learning_rate=1e-4,
    lr_scheduler="constant",
    lr_warmup_steps=0,
    max_grad_norm=None,
    use_ema=False,
)

# One change each from ORIGINAL: (what it changes, the changed options).
ABLATIONS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "original": ("the original project's settings", {}),
    "embedding_scale_1000": (
        "noise level x1000 before the sinusoidal encoding",
        dict(noise_level_embedding_scale=1000.0),
    ),
    "v_prediction": ("predict v instead of epsilon", dict(prediction_type="v_prediction")),
    "sample_prediction": ("predict the clean image (x0) instead of epsilon", dict(prediction_type="sample")),
    "min_snr_5": ("min-SNR-5 loss weighting", dict(snr_gamma=5.0)),
    "per_sample_timestep": ("one diffusion step per sample instead of per batch", dict(per_sample_timestep=True)),
    "lr_5e-4_warmup": (
        "learning rate 5e-4 with 50 warm-up steps",
        dict(learning_rate=5e-4, lr_scheduler="constant_with_warmup", lr_warmup_steps=50),
    ),
    "grad_clip_1": ("clip the gradient norm at 1", dict(max_grad_norm=1.0)),
    "ema": (
        "EMA of the weights (decay 1 - (1 + step) ** -0.75, at most 0.999)",
        dict(use_ema=True, ema_decay=0.999, ema_use_warmup=True),
    ),
    "film_affine": ("scale-and-shift FiLM instead of the additive embedding", dict(film_affine=True)),
    "residual_sample": (
        "diffuse the residual HR - bicubic and predict it directly (the untrained model returns bicubic)",
        dict(prediction_type="sample", residual=True),
    ),
}

# The defaults for new models that this study found (see docs/convergence.md).
RECOMMENDED: Dict[str, Any] = dict(ORIGINAL, **NEW_MODEL_RECIPE)

COLUMNS = (
    "run",
    "steps",
    "s/step",
    "PSNR",
    "SSIM",
    "consistency",
    "colour err R/G/B (/255)",
    "edge energy / HR",
)


def unet_config(crop_size: int, width: int, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The issue's network (inner width 32 at 64x64: multipliers 1, 2, 4, 8, attention at 8x8, 2 blocks/level)."""
    return crop_unet_config(
        crop_size,
        width,
        CHANNEL_MULTIPLIERS,
        noise_level_embedding_scale=float(settings["noise_level_embedding_scale"]),
        film_affine=bool(settings["film_affine"]),
    )


def build_crops(
    crop_size: int, train_crops: int, eval_crops: int, heldout: float, max_side: Optional[int], seed: int
) -> Tuple[List[Any], torch.Tensor, Dict[str, List[str]]]:
    """Training crops (PIL) from the training photos and held-out crops (`(N, 3, S, S)` in [-1, 1])."""
    crops = study_crops(crop_size, train_crops, eval_crops, seed=seed, heldout=heldout, max_side=max_side)
    photos = {"train": [str(p) for p in crops.train_photos], "heldout": [str(p) for p in crops.heldout_photos]}
    return crops.train, crops.heldout, photos


def evaluate(
    pipeline: SR3Pipeline,
    hr: torch.Tensor,
    num_inference_steps: int,
    batch_size: int,
    seed: int,
) -> Tuple[Dict[str, Any], Dict[str, Any], torch.Tensor]:
    """Super-resolve the degraded held-out crops; metrics of SR3 and of bicubic, and the SR3 outputs."""
    lr, bicubic = degrade(hr, pipeline.config.upscale_factor)
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for start in range(0, hr.shape[0], batch_size):
        low = (lr[start : start + batch_size] + 1) / 2
        images = pipeline(low, num_inference_steps=num_inference_steps, generator=generator, output_type="pt").images
        outputs.append(images.cpu() * 2 - 1)
    sr = torch.cat(outputs)
    return image_quality(sr, hr, lr), image_quality(bicubic, hr, lr), sr


def targets(sr: Dict[str, Any], bicubic: Dict[str, Any], steps: int) -> Dict[str, bool]:
    """The issue's targets (the PSNR margin is 3 dB up to 500 steps, 1.5 dB after)."""
    margin = 3.0 if steps <= 500 else 1.5
    return {
        f"psnr >= bicubic - {margin:g} dB": sr["psnr"] >= bicubic["psnr"] - margin,
        "ssim >= bicubic": sr["ssim"] >= bicubic["ssim"],
        "colour error <= 2/255": max(sr["colour_error"]) <= 2.0,
        "consistency <= 3x bicubic": sr["consistency"] <= 3 * bicubic["consistency"],
        "edges closer to HR than bicubic": abs(sr["edge_ratio"] - 1) < abs(bicubic["edge_ratio"] - 1),
    }


def saved_summary(output_dir: str) -> Optional[Dict[str, Any]]:
    """The training summary of the pipeline saved in `output_dir`, None before its first run."""
    path = os.path.join(output_dir, "training_summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def run_one(
    name: str, settings: Dict[str, Any], args: argparse.Namespace, train_crops: List[Any], output_dir: str, steps: int
) -> SR3Pipeline:
    """Train one configuration to `steps` with the shared training core and return the saved pipeline, reloaded.

    A run that already reached fewer steps in `output_dir` resumes from its checkpoint, so one run measured at
    500, 1000 and 3000 steps costs 3000 steps; resuming is exact (tests/test_training.py), and nothing in these
    settings depends on the total length (constant learning rate after warm-up, step-based EMA warm-up).
    """
    options = {key: value for key, value in settings.items() if key not in UNET_OPTIONS}
    train_on_crops(
        train_crops,
        unet_config(args.crop_size, args.width, settings),
        steps=steps,
        batch_size=args.batch_size,
        output_dir=output_dir,
        seed=args.seed,
        upscale_factor=UPSCALE_FACTOR,
        random_flip=True,
        checkpointing_steps=steps,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        tracker_project_name=f"convergence-{name}",
        **options,
    )
    pipeline = SR3Pipeline.from_pretrained(output_dir)
    if args.sampler:
        pipeline.scheduler = swap_scheduler(pipeline.scheduler, args.sampler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_samples(args: argparse.Namespace, hr: torch.Tensor, sr: torch.Tensor, path: str) -> None:
    """A picture of the first held-out crops: LR | bicubic | SR3 | HR per row."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    count = min(8, hr.shape[0])
    lr, bicubic = degrade(hr[:count], UPSCALE_FACTOR)
    columns = [tensor_to_pil(part) for part in (lr, bicubic, sr[:count], hr[:count])]
    grid([list(cells) for cells in zip(*columns)], size=(args.crop_size, args.crop_size)).save(path)


def markdown_table(rows: Sequence[Dict[str, Any]], bicubic: Dict[str, Any]) -> str:
    """The results as a Markdown table, bicubic last."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    def metric_cells(values: Dict[str, Any]) -> List[str]:
        colour = "/".join(f"{c:.1f}" for c in values["colour_error"])
        return [
            f"{values['psnr']:.2f}",
            f"{values['ssim']:.3f}",
            f"{values['consistency']:.5f}",
            colour,
            f"{values['edge_ratio']:.2f}",
        ]

    lines = [line(COLUMNS), line(["---"] * len(COLUMNS))]
    for row in rows:
        seconds = "n/a" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.2f}"
        lines.append(line([row["run"], str(row["steps"]), seconds] + metric_cells(row["sr3"])))
    lines.append(line(["bicubic", "-", "-"] + metric_cells(bicubic)))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[500],
        help="training steps; several values evaluate one run at each (the issue: 500 1000 3000)",
    )
    parser.add_argument(
        "--ablation",
        nargs="+",
        choices=sorted(ABLATIONS),
        help="runs with the original settings and one change each (default: one run with the recommended defaults)",
    )
    parser.add_argument("--output", help="save the trained pipeline here (one run only)")
    parser.add_argument("--report", help="write results.json, results.md and sample pictures to this folder")
    parser.add_argument("--list", action="store_true", help="list the ablations and the recommended defaults")
    parser.add_argument("--crop-size", type=int, default=64, help="high-resolution crop size (LR is a quarter)")
    parser.add_argument("--width", type=int, default=32, help="UNet inner width")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-crops", type=int, default=8192, help="random training crops drawn from the photos")
    parser.add_argument("--eval-crops", type=int, default=64, help="random held-out crops evaluated")
    parser.add_argument("--heldout", type=float, default=0.25, help="fraction of whole photos held out")
    parser.add_argument("--max-side", type=int, default=512, help="downscale photos to this longer side first")
    parser.add_argument("--sampler", help="evaluate with this scheduler (default: the saved pipeline's)")
    parser.add_argument("--inference-steps", type=int, default=50, help="sampling steps at evaluation")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.steps) < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    args.steps = sorted(set(args.steps))
    # The UNet halves the size three times and attention sits at 1/8 of it.
    if args.crop_size < 16 or args.crop_size % 8:
        parser.error(f"--crop-size must be a multiple of 8, at least 16, got {args.crop_size}")
    if args.output and args.ablation and len(args.ablation) > 1:
        parser.error("--output keeps one trained pipeline: give at most one --ablation with it")
    # Resuming cannot go back: a model trained further would be reported as trained for fewer steps.
    saved = saved_summary(args.output) if args.output else None
    if saved and saved["global_step"] > args.steps[0]:
        parser.error(
            f"--output {args.output} holds a model trained for {saved['global_step']} steps, more than --steps "
            f"{args.steps[0]}: give at least that many or another --output"
        )
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (description, _) in ABLATIONS.items():
            print(f"{name:22s} {description}")
        changed = {key: value for key, value in RECOMMENDED.items() if ORIGINAL.get(key) != value}
        print(f"{'(default)':22s} recommended for new models: {changed}")
        return 0
    runs = [(name, dict(ORIGINAL, **ABLATIONS[name][1])) for name in args.ablation or []] or [
        ("recommended", copy.deepcopy(RECOMMENDED))
    ]
    train_crops, heldout, photos = build_crops(
        args.crop_size, args.train_crops, args.eval_crops, args.heldout, args.max_side, args.seed
    )
    print(
        f"{len(photos['train'])} training photos -> {len(train_crops)} crops; {len(photos['heldout'])} held-out "
        f"photos -> {heldout.shape[0]} crops of {args.crop_size}x{args.crop_size}",
        flush=True,
    )
    rows: List[Dict[str, Any]] = []
    bicubic: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sr3-convergence-") as scratch:
        for name, settings in runs:
            output_dir = args.output or os.path.join(scratch, name)
            for steps in args.steps:
                earlier = saved_summary(output_dir)
                pipeline = run_one(name, settings, args, train_crops, output_dir, steps)
                summary = saved_summary(output_dir)
                if not summary["steps_this_run"] and earlier:
                    # A rerun on a finished run trains nothing: its speed and loss are the earlier run's.
                    summary = dict(
                        summary, steps_per_second=earlier["steps_per_second"], final_loss=earlier["final_loss"]
                    )
                sr_metrics, bicubic, sr = evaluate(
                    pipeline, heldout, args.inference_steps, args.eval_batch_size, args.seed
                )
                row = dict(
                    run=name,
                    steps=steps,
                    seconds_per_step=1.0 / summary["steps_per_second"] if summary["steps_per_second"] else None,
                    final_loss=summary["final_loss"],
                    settings=settings,
                    sampler=f"{type(pipeline.scheduler).__name__}, {args.inference_steps} steps",
                    sr3=sr_metrics,
                    targets=targets(sr_metrics, bicubic, steps),
                )
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
                if args.report:
                    save_samples(args, heldout, sr, os.path.join(args.report, f"samples_{name}_{steps}.png"))
    table = markdown_table(rows, bicubic)
    print(table)
    if args.report:
        report = dict(args={k: v for k, v in vars(args).items()}, photos=photos, bicubic=bicubic, runs=rows)
        write_whole(
            os.path.join(args.report, "results.json"),
            lambda handle: json.dump(report, handle, indent=2, default=str),
        )
        write_whole(os.path.join(args.report, "results.md"), lambda handle: handle.write(table + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
