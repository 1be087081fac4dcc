"""Where in the schedule the packaged model loses texture, and whether its test photos are like its training photos.

Three measurements on the packaged `sr3-photos-x4`, detail mode's sampler (the pipeline's DDIM, 10 steps, eta 1,
unguided), on the texture crops of a set (those whose bicubic upsample keeps under `TEXTURE_KEPT_EDGE_SHARE` of
their edge energy; 64-pixel crops super-resolved alone, drawn as `benchmarks/samplers.py` draws them):

1. *Sampling from the truth.* The same sampler, started not from noise but from the true residual noised to the
   level of step t, for every step t of the 10: how much of the HR's texture edge energy comes out. Where this jumps
   is where the model decides texture: below it, the noisy sample still carries the answer; above it, the model
   has to invent it.
2. *A linear correction.* At each level, the network's estimate of the clean residual, corrected by the gain k that
   best adds back the part of the noisy sample it did not keep (k x (x_t / gamma - estimate), k fitted on the crops
   themselves): how much of the estimate's squared error that removes. If a sizeable share, the estimate is
   miscalibrated and a sampler could fix it; if not, what it misses is not in reach of a linear filter.
3. *Residual amplitude.* The standard deviation of each crop's residual (HR - bicubic, in the network's scale) on
   the training photos and on the set measured, as quantiles. The training photos are cropped at 512 pixels on the
   longer side, as the held-out ones are; the shipped tiles were cut at 512 and 1024, and the 1024 ones are softer.

    python benchmarks/results/samplers/where-texture-is-decided/probe.py --output OUT            # held-out photos
    python benchmarks/results/samplers/where-texture-is-decided/probe.py --photos pyiqa_ref_dir --output OUT

Writes `probe.json`, `probe.md` and `probe.png` (bicubic | sampled from noise | sampled from the truth at each
level in `--picture-levels` | HR, on the four texture crops with the most edge energy, magnified). The linear
correction is fitted and measured on the texture crops too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import PIL.Image
import torch

BENCHMARKS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, BENCHMARKS)
import model_report  # noqa: E402  (the never-seen crops and the picture's row choice)

from diffusers_sr3 import SR3Pipeline  # noqa: E402
from diffusers_sr3.image_processing import degrade, grid, tensor_to_pil  # noqa: E402
from diffusers_sr3.metrics import TEXTURE_KEPT_EDGE_SHARE, edge_energy, kept_edge_share, quantize  # noqa: E402
from diffusers_sr3.noise import noise_level_for_step  # noqa: E402
from diffusers_sr3.photos import heldout_crops, packaged_photo_paths, photo_crops, photo_split  # noqa: E402
from diffusers_sr3.pretrained import default_model_path  # noqa: E402

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.97)


def estimate(pipeline: SR3Pipeline, condition: torch.Tensor, noisy: torch.Tensor, level: torch.Tensor, batch: int):
    """The network's clean-residual estimate, in batches."""
    with torch.no_grad():
        return torch.cat(
            [
                pipeline.unet(
                    torch.cat([condition[i : i + batch], noisy[i : i + batch]], 1),
                    level.expand(len(noisy[i : i + batch])),
                ).sample
                for i in range(0, len(noisy), batch)
            ]
        )


def sample_from(pipeline, condition, clean, start: Optional[int], seed: int, batch: int) -> torch.Tensor:
    """DDIM eta 1 over the pipeline's 10 detail steps, from noise (`start` None) or from `clean` noised to `start`."""
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = [t for t in scheduler.timesteps.tolist() if start is None or t <= start]
    if start is None:
        sample = noise
    else:
        level = noise_level_for_step(scheduler, start)
        sample = level * clean + (1 - level**2).sqrt() * noise
    for t in timesteps:
        predicted = estimate(pipeline, condition, sample, noise_level_for_step(scheduler, t), batch)
        sample = scheduler.step(predicted, t, sample, eta=1.0, generator=generator).prev_sample
    return sample


def linear_correction(pipeline, condition, clean, level: torch.Tensor, seed: int, batch: int) -> Dict[str, float]:
    """Squared error of the estimate at `level`, and what the best gain on (x_t / level - estimate) leaves of it."""
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    noisy = level * clean + (1 - level**2).sqrt() * noise
    predicted = estimate(pipeline, condition, noisy, level, batch)
    error, kept_out = clean - predicted, noisy / level - predicted
    gain = float((error * kept_out).sum() / (kept_out * kept_out).sum())
    mse = float(error.pow(2).mean())
    corrected = float((error - gain * kept_out).pow(2).mean())
    return dict(level=float(level), mse=mse, gain=gain, corrected_mse=corrected, removed=1 - corrected / mse)


def residual_amplitudes(hr: torch.Tensor, factor: int, scale: float) -> List[float]:
    _, bicubic = degrade(hr, factor)
    spread = ((hr - bicubic) * scale).flatten(1).std(1)
    return [round(float(value), 2) for value in torch.quantile(spread, torch.tensor(QUANTILES))]


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the packaged sr3-photos-x4)")
    parser.add_argument("--photos", default=None, help="folder of never-seen photos (default: the held-out photos)")
    parser.add_argument("--crops", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="as benchmarks/samplers.py's --seed: the same crops")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--picture-levels", type=int, nargs="+", default=[1400, 1000])
    parser.add_argument("--magnify", type=int, default=4)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    pipeline = SR3Pipeline.from_pretrained(args.model or default_model_path())
    pipeline.unet.eval()
    factor, scale = pipeline.config.upscale_factor, pipeline.config.residual_scale
    if args.photos:
        hr = model_report.unseen_crops(args.photos, 64, args.crops, args.seed + 2)
    else:
        hr, _ = heldout_crops(64, args.crops, seed=args.seed)
    texture = kept_edge_share(hr, factor) < TEXTURE_KEPT_EDGE_SHARE
    amplitudes = {
        "training photos": residual_amplitudes(
            photo_crops(
                photo_split(packaged_photo_paths())[0],
                64,
                count=args.crops,
                seed=args.seed + 1,
                max_side=512,
                output_type="pt",
            ),
            factor,
            scale,
        ),
        "this set": residual_amplitudes(hr, factor, scale),
    }
    hr = hr[texture]
    _, condition = degrade(hr, factor)
    clean = (hr - condition) * scale
    hr_edges = edge_energy(quantize(hr)).sum()

    def edges(residual: torch.Tensor) -> float:
        return float(edge_energy(quantize((condition + residual / scale).clamp(-1, 1))).sum() / hr_edges)

    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(10)
    starts: List[Optional[int]] = [None] + scheduler.timesteps.tolist()[:-1]
    sampled, sampled_rows = {}, []
    for start in starts:
        residual = sample_from(pipeline, condition, clean, start, args.seed, args.batch_size)
        sampled[start] = residual
        row = dict(start="noise" if start is None else start, texture_edges=edges(residual))
        if start is not None:
            row["level"] = float(noise_level_for_step(scheduler, start))
        sampled_rows.append(row)
        print(row, flush=True)
    corrections = []
    for t in scheduler.timesteps.tolist()[:-1]:
        row = dict(
            t=t, **linear_correction(pipeline, condition, clean, noise_level_for_step(scheduler, t), t, args.batch_size)
        )
        corrections.append(row)
        print(row, flush=True)
    report = dict(
        model=args.model or "packaged sr3-photos-x4",
        photos=f"never-seen photos ({os.path.basename(os.path.normpath(args.photos))})"
        if args.photos
        else "held-out photos",
        crops=args.crops,
        texture_crops=int(texture.sum()),
        bicubic_texture_edges=edges(torch.zeros_like(clean)),
        sampled_from=sampled_rows,
        linear_correction=corrections,
        residual_std_quantiles=dict(quantiles=list(QUANTILES), **amplitudes),
    )
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "probe.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output, "probe.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    columns = [condition, condition + sampled[None] / scale]
    columns += [condition + sampled[level] / scale for level in args.picture_levels] + [hr]
    size = (64 * args.magnify, 64 * args.magnify)
    rows = model_report.busiest(hr, 4)
    grid(
        [[tensor_to_pil(c[i : i + 1].clamp(-1, 1))[0].resize(size, PIL.Image.NEAREST) for c in columns] for i in rows]
    ).save(os.path.join(args.output, "probe.png"))
    return report


def markdown(report: Dict) -> str:
    lines = [
        f"{report['photos']}: {report['texture_crops']} texture crops of {report['crops']}; model "
        f"{report['model']}; bicubic texture edges / HR {report['bicubic_texture_edges']:.3f}",
        "",
        "| sampled from | signal level | texture edges / HR |",
        "|---|---|---|",
    ]
    for row in report["sampled_from"]:
        start = "noise (t = 1800)" if row["start"] == "noise" else f"the truth at t = {row['start']}"
        level = f"{row['level']:.3f}" if "level" in row else "-"
        lines.append(f"| {start} | {level} | {row['texture_edges']:.3f} |")
    lines += [
        "",
        "| t | signal level | squared error | best gain | error left | removed |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["linear_correction"]:
        lines.append(
            f"| {row['t']} | {row['level']:.3f} | {row['mse']:.4f} | {row['gain']:+.4f} | {row['corrected_mse']:.4f} "
            f"| {100 * row['removed']:.2f}% |"
        )
    amplitudes = report["residual_std_quantiles"]
    lines += [
        "",
        "| residual std per crop, quantiles " + " / ".join(str(q) for q in amplitudes["quantiles"]) + " | |",
        "|---|---|",
    ]
    lines += [
        f"| {name} | {' / '.join(str(v) for v in amplitudes[name])} |" for name in ("training photos", "this set")
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
