"""Training throughput of the shipped configuration against the previous packaged one, measured in one run.

    python benchmarks/training_throughput.py --output benchmarks/results/training_throughput

Times optimizer steps of the real training objective (`diffusers_sr3.training.objective`: the scaled residual,
x0 prediction, per-sample noise levels, AdamW) on a batch of random crops at the network's sample size (64x64 for
both shipped networks) for each network and precision:

- `previous`: the network the packaged `sr3-photos-x4` had before the quality issue (full output resolution,
  width 32, multipliers 1-2-4-8, attention at 8x8; 15.2M parameters);
- `photos_x4`: the shipped preset (pixel-unshuffle by 4, the UNet on the 16x16 grid; 15.2M parameters);
- any other preset name (`tiny` for the tests);

each in float32 and under bfloat16 autocast (what `--mixed_precision bf16` does; fast only on hardware with
bfloat16 matrix units, e.g. CPUs with AMX). Reports seconds per step (median after a warm-up step), steps/s,
images/s and the speed-up over the first row. Timings on shared machines are noisy: compare the ratios within one
run. Writes training_throughput.json and .md to --output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from diffusers_sr3 import SR3UNet2DModel, make_scheduler
from diffusers_sr3.backends import cpu_name
from diffusers_sr3.noise import training_betas
from diffusers_sr3.presets import get_preset
from diffusers_sr3.training.objective import diffusion_loss, noise_batch, predict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

# The packaged model's UNet config before the low-resolution network (git history of pretrained/sr3-photos-x4).
PREVIOUS_PACKAGED = dict(
    in_channels=6,
    out_channels=3,
    block_out_channels=32,
    channel_multipliers=(1, 2, 4, 8),
    attention_resolutions=(8,),
    layers_per_block=2,
    norm_groups=32,
    sample_size=64,
    noise_level_embedding_scale=1000.0,
)
RESIDUAL_SCALE = 14.2  # the shipped run's measured scale (any value costs the same)


def network_config(name: str) -> Dict[str, Any]:
    return dict(PREVIOUS_PACKAGED) if name == "previous" else get_preset(name).unet_config()


def time_steps(name: str, bfloat16: bool, batch: int, steps: int, seed: int = 0) -> float:
    """Median seconds per optimizer step (after one warm-up step) of network `name`."""
    torch.manual_seed(seed)
    unet = SR3UNet2DModel(**network_config(name)).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4)
    betas = training_betas(make_scheduler("ddpm"))
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    hr = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    condition = (hr + 0.1 * torch.randn(hr.shape, generator=generator)).clamp(-1, 1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bfloat16 else contextlib.nullcontext()

    def step() -> None:
        noised = noise_batch(
            unet,
            betas,
            hr,
            condition,
            prediction_type="sample",
            per_sample_timestep=True,
            residual=True,
            residual_scale=RESIDUAL_SCALE,
            generator=generator,
        )
        with autocast:
            prediction = predict(unet, noised)
        loss = diffusion_loss(prediction.float(), noised, "l1", None, "sample")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"# Training throughput ({report['machine']})",
        "",
        f"Batch {report['batch']} of crops at each network's sample size (64x64 for both shipped networks), median "
        f"of {report['steps']} steps after a warm-up step, the "
        "training objective of the shipped recipe (scaled residual, x0 prediction, AdamW).",
        "",
        "| network | parameters | precision | s / step | steps / s | images / s | vs first row |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['network']} | {row['parameters'] / 1e6:.1f}M | {row['precision']} | {row['seconds_per_step']:.3f} "
            f"| {row['steps_per_second']:.2f} | {row['images_per_second']:.1f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["previous", "photos_x4"], help="previous or preset names")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--output", default="benchmarks/results/training_throughput")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: List[Dict[str, Any]] = []
    for name in args.networks:
        parameters = sum(p.numel() for p in SR3UNet2DModel(**network_config(name)).parameters())
        for precision in args.precisions:
            seconds = time_steps(name, precision == "bf16", args.batch, args.steps)
            rows.append(
                dict(
                    network=name,
                    parameters=parameters,
                    precision=precision,
                    seconds_per_step=seconds,
                    steps_per_second=1 / seconds,
                    images_per_second=args.batch / seconds,
                )
            )
            print(f"{name} {precision}: {seconds:.3f} s/step", flush=True)
    for row in rows:
        row["speedup"] = rows[0]["seconds_per_step"] / row["seconds_per_step"]
    report = dict(
        machine=f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        batch=args.batch,
        steps=args.steps,
        rows=rows,
    )
    text = write_report(args.output, "training_throughput", report, markdown(report))
    print(text)
    return report


if __name__ == "__main__":
    main()
