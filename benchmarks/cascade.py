"""Peak memory and time per stage of the 1024x1024 face cascade (uncond_64 -> sr_64_256 -> sr_256_1024).

Each stage runs in a fresh process at batch 1 with random weights (memory and time do not depend on the
weights), so the peak resident memory reported is that stage's alone. Prints a markdown table and writes it,
with the raw numbers as JSON, to --output.

    python benchmarks/cascade.py --steps 2 --output benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

STAGES = (("uncond_64", None), ("sr_64_256", 64), ("sr_256_1024", 256))


def run_stage(preset_name: str, input_size: int, steps: int, dtype_name: str, threads: int) -> dict:
    """Build one stage from its preset and sample at batch 1; returns timings, FLOPs and peak memory."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
    from diffusers_sr3.presets import get_preset

    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    preset = get_preset(preset_name)
    unet = SR3UNet2DModel(**preset.unet_config()).eval().to(dtype)
    unet.noise_level_embedding.float()
    scheduler = make_scheduler("dpmsolver")
    if preset.upscale_factor is None:
        pipeline = SR3UnconditionalPipeline(unet, scheduler)
        call = dict(batch_size=1)
    else:
        pipeline = SR3Pipeline(unet, scheduler, upscale_factor=preset.upscale_factor)
        call = dict(image=torch.rand(3, input_size, input_size))
    pipeline.set_progress_bar_config(disable=True)
    size = preset.resolution
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, unet.config.in_channels, size, size, dtype=dtype), torch.tensor([0.5]))
    started = time.perf_counter()
    pipeline(num_inference_steps=steps, output_type="pt", **call)
    elapsed = time.perf_counter() - started
    return {
        "stage": preset_name,
        "output": f"{size}x{size}",
        "parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "gflop_per_eval": counter.get_total_flops() / 1e9,
        "steps": steps,
        "seconds": elapsed,
        "seconds_per_step": elapsed / steps,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "dtype": dtype_name,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per stage")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default="benchmarks/results", help="folder for cascade.json / cascade.md")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args()

    if args.stage:
        input_size = dict(STAGES)[args.stage]
        print(json.dumps(run_stage(args.stage, input_size, args.steps, args.dtype, args.threads)))
        return

    results = []
    for name, _ in STAGES:
        command = [sys.executable, __file__, "--stage", name, "--steps", str(args.steps), "--dtype", args.dtype]
        command += ["--threads", str(args.threads)]
        finished = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
        print(
            f"{name}: {results[-1]['seconds_per_step']:.2f} s/step, peak {results[-1]['peak_rss_gib']:.2f} GiB",
            flush=True,
        )

    header = (
        "| stage | output | parameters (M) | GFLOP / eval | s / step | peak memory (GiB) |\n|---|---|---|---|---|---|\n"
    )
    rows = "".join(
        f"| {r['stage']} | {r['output']} | {r['parameters_m']:.1f} | {r['gflop_per_eval']:.0f} | "
        f"{r['seconds_per_step']:.2f} | {r['peak_rss_gib']:.2f} |\n"
        for r in results
    )
    table = f"Batch 1, {args.dtype}, {args.threads} threads, {args.steps} DPM-Solver steps per stage.\n\n{header}{rows}"
    print("\n" + table)
    write_report(args.output, "cascade", results, table)


if __name__ == "__main__":
    main()
