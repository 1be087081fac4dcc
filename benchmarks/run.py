"""Speed benchmark of SR3 inference and training on this machine, measured as ratios within one run.

    python benchmarks/run.py --preset sr_16_128 --batch 1 --output benchmarks/results

Prints, and writes as JSON and a markdown table to --output:
- the machine: threads, CPU flags, and a 3x3-convolution micro-benchmark (the achievable "peak" GFLOP/s per dtype);
- the model: parameters and FLOPs per evaluation;
- per-evaluation time of each inference variant (median after warm-up), achieved GFLOP/s and fraction of peak,
  speed-up over the plain fp32 NCHW model, and the error of low-precision outputs against fp32;
- end-to-end images per second of the pipeline for each scheduler and step count (measured up to
  --max-measured-steps, beyond that extrapolated from the measured per-step time and marked so);
- one training step (batch --train-batch) per training variant: time, samples/s and peak memory (each in a fresh
  process so peak memory is its own), and what the peak is made of: the runtime, the parameters' four copies
  (weights, gradients, Adam's moments) and the activations saved for the backward pass (under bf16 autocast these
  include the weights' bfloat16 copies);
- a scaling table of per-evaluation time over resolution and batch for the fastest inference variant.

Timings on shared machines are noisy: compare the ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.noise import swap_scheduler, training_betas
from diffusers_sr3.presets import get_preset
from diffusers_sr3.training.objective import diffusion_loss, noise_batch, predict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def median_seconds(function: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `function` after `warmup` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
                    return [flag for flag in line.split(":", 1)[1].split() if flag in wanted]
    except OSError:
        pass
    return []


def conv_peak(dtype: torch.dtype, repeats: int, channels: int = 256) -> float:
    """GFLOP/s of a large 3x3 convolution in channels_last: what this machine achieves on the UNet's main op."""
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype).to(memory_format=torch.channels_last).eval()
    x = torch.randn(4, channels, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * channels * channels * 9 * 4 * 32 * 32
    with torch.no_grad():
        seconds = median_seconds(lambda: conv(x), repeats, 2)
    return flops / seconds / 1e9


def build_unet(preset_name: str, dtype: torch.dtype, channels_last: bool) -> SR3UNet2DModel:
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**get_preset(preset_name).unet_config()).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
        unet.noise_level_embedding.float()  # as from_pretrained(dtype=...) keeps it
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


INFERENCE_VARIANTS = {
    "fp32 NCHW (plain)": dict(dtype=torch.float32, channels_last=False, compile=False),
    "fp32 channels_last": dict(dtype=torch.float32, channels_last=True, compile=False),
    "bf16 NCHW": dict(dtype=torch.bfloat16, channels_last=False, compile=False),
    "bf16 channels_last": dict(dtype=torch.bfloat16, channels_last=True, compile=False),
}
# Measured only with --compile (compiling takes minutes on a small CPU).
COMPILED_VARIANTS = {
    "fp32 channels_last + torch.compile": dict(dtype=torch.float32, channels_last=True, compile=True),
    "bf16 channels_last + torch.compile": dict(dtype=torch.bfloat16, channels_last=True, compile=True),
}


def model_input(unet: SR3UNet2DModel, batch: int, size: int, variant: Dict) -> torch.Tensor:
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(variant["dtype"])
    return x.contiguous(memory_format=torch.channels_last) if variant["channels_last"] else x


def benchmark_inference(args, peaks: Dict[str, float], flops: float) -> List[Dict]:
    size = get_preset(args.preset).resolution
    known = {**INFERENCE_VARIANTS, **COMPILED_VARIANTS}
    names = args.variants + [name for name in COMPILED_VARIANTS if args.compile and name not in args.variants]
    variants = {name: known[name] for name in names}
    levels = torch.full((args.batch,), 0.5)
    reference_output = None
    rows = []
    for name, variant in variants.items():
        unet = build_unet(args.preset, variant["dtype"], variant["channels_last"])
        network = torch.compile(unet) if variant["compile"] else unet
        x = model_input(unet, args.batch, size, variant)
        try:
            with torch.no_grad():
                started = time.perf_counter()
                output = network(x, levels).sample.float()  # compiles, for the compiled variants
                first_call = time.perf_counter() - started
                seconds = median_seconds(lambda network=network, x=x: network(x, levels), args.repeats, args.warmup)
        except Exception as error:  # torch.compile needs a C++ toolchain and Python headers; report, go on
            if not variant["compile"]:
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"  {name}: failed: {message}", flush=True)
            rows.append({"variant": name, "failed": message})
            continue
        if reference_output is None:
            reference_output, baseline = output, seconds
        error = ((output - reference_output).norm() / reference_output.norm()).item()
        dtype_name = "bfloat16" if variant["dtype"] == torch.bfloat16 else "float32"
        achieved = flops * args.batch / seconds / 1e9
        rows.append(
            {
                "variant": name,
                "seconds_per_eval": seconds,
                "speedup_vs_plain_fp32": baseline / seconds,
                "gflops_per_s": achieved,
                "fraction_of_peak": achieved / peaks[dtype_name],
                "relative_error_vs_fp32": error,
                "first_call_seconds": first_call,
            }
        )
        print(f"  {name}: {seconds * 1000:.0f} ms/eval, x{baseline / seconds:.2f}, rel. error {error:.1e}", flush=True)
    return rows


def fastest_variant(rows: List[Dict]) -> Dict:
    """The fastest measured variant that the pipeline and scaling sections reuse (compiled ones are not reused)."""
    eager = [row for row in rows if row["variant"] in INFERENCE_VARIANTS and "failed" not in row]
    name = min(eager, key=lambda row: row["seconds_per_eval"])["variant"]
    return {"name": name, **INFERENCE_VARIANTS[name]}


def benchmark_pipeline(args, variant: Dict) -> List[Dict]:
    preset = get_preset(args.preset)
    unet = build_unet(args.preset, variant["dtype"], variant["channels_last"])
    base = make_scheduler("ddpm")
    rows = []
    for entry in args.schedules:
        scheduler_name, steps = entry.split(":")
        steps = int(steps)
        scheduler = swap_scheduler(base, scheduler_name)
        if preset.upscale_factor is None:
            pipeline = SR3UnconditionalPipeline(unet, scheduler)
            call = dict(batch_size=args.batch)
        else:
            pipeline = SR3Pipeline(unet, scheduler, upscale_factor=preset.upscale_factor)
            low = preset.resolution // preset.upscale_factor
            call = dict(image=torch.rand(args.batch, 3, low, low))
        pipeline.set_progress_bar_config(disable=True)
        measured_steps = min(steps, args.max_measured_steps)
        started = time.perf_counter()
        pipeline(num_inference_steps=measured_steps, output_type="pt", **call)
        seconds = (time.perf_counter() - started) / measured_steps * steps
        rows.append(
            {
                "scheduler": scheduler_name,
                "steps": steps,
                "seconds_per_batch": seconds,
                "images_per_second": args.batch / seconds,
                "measured": measured_steps == steps,
            }
        )
        note = "" if measured_steps == steps else f" (extrapolated from {measured_steps} steps)"
        print(f"  {scheduler_name} {steps} steps: {seconds:.1f} s per batch of {args.batch}{note}", flush=True)
    return rows


TRAINING_VARIANTS = {
    "fp32 NCHW (plain)": dict(autocast=False, channels_last=False, checkpointing=False, fused=False),
    "fp32 channels_last": dict(autocast=False, channels_last=True, checkpointing=False, fused=False),
    "bf16 autocast": dict(autocast=True, channels_last=False, checkpointing=False, fused=False),
    "bf16 autocast + channels_last + fused Adam": dict(
        autocast=True, channels_last=True, checkpointing=False, fused=True
    ),
    "fp32 channels_last + fused Adam": dict(autocast=False, channels_last=True, checkpointing=False, fused=True),
    "fp32 + gradient checkpointing": dict(autocast=False, channels_last=False, checkpointing=True, fused=False),
    "bf16 autocast + channels_last + fused Adam + checkpointing": dict(
        autocast=True, channels_last=True, checkpointing=True, fused=True
    ),
}


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def resident_bytes(field: str) -> int:
    """This process's resident memory from /proc/self/status: `VmRSS` (now) or `VmHWM` (its peak).

    Not getrusage's ru_maxrss: Linux carries that over an exec from the process that started this one, so a training
    worker would report at least the parent's resident memory. Elsewhere ru_maxrss is all there is.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def training_worker(preset_name: str, variant: Dict, batch: int, steps: int) -> Dict:
    """Time `steps` training steps (after one warm-up) of one variant; runs in its own process.

    Besides the time and the peak resident memory, it reports what that peak is made of: the runtime (the process
    before the model exists), the parameters (weights, gradients and the optimizer's two moments: four copies), and the
    activations autograd keeps for the backward pass (measured in the warm-up step: unique storages saved, parameters
    excluded), the part that gradient checkpointing and the batch size change.
    """
    runtime = resident_bytes("VmRSS")
    preset = get_preset(preset_name)
    unet = build_unet(preset_name, torch.float32, variant["channels_last"]).train()
    if variant["checkpointing"]:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4, fused=variant["fused"] or None)
    betas = training_betas(make_scheduler("ddpm"))
    generator = torch.Generator().manual_seed(0)
    size = preset.resolution
    target = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    condition = None if preset.upscale_factor is None else torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    if variant["channels_last"]:
        target = target.contiguous(memory_format=torch.channels_last)
        condition = None if condition is None else condition.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant["autocast"] else contextlib.nullcontext()

    parameter_storages = {parameter.untyped_storage().data_ptr() for parameter in unet.parameters()}
    saved: Dict[int, int] = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step(measure: bool = False):
        batch_noised = noise_batch(unet, betas, target, condition, generator=generator)
        saved_activations = contextlib.nullcontext()
        if measure:
            saved_activations = torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor)
        with autocast, saved_activations:
            loss = diffusion_loss(predict(unet, batch_noised), batch_noised)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(measure=True)  # the warm-up
    seconds = median_seconds(step, steps, 0)
    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in unet.parameters())
    return {
        "seconds_per_step": seconds,
        "samples_per_second": batch / seconds,
        "peak_rss_gib": gib(resident_bytes("VmHWM")),
        "runtime_gib": gib(runtime),
        "parameters_gib": gib(4 * parameter_bytes),
        "activations_gib": gib(sum(saved.values())),
    }


def benchmark_training(args) -> List[Dict]:
    rows = []
    baseline = None
    for name in args.train_variants:
        command = [sys.executable, __file__, "--preset", args.preset, "--train-worker", name]
        command += ["--train-batch", str(args.train_batch), "--train-steps", str(args.train_steps)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            lines = finished.stderr.strip().splitlines()
            print(f"  {name}: failed (exit {finished.returncode}): {lines[-1] if lines else ''}", flush=True)
            continue
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        baseline = baseline or result
        result.update(
            variant=name,
            speedup_vs_plain_fp32=baseline["seconds_per_step"] / result["seconds_per_step"],
            memory_vs_plain_fp32=result["peak_rss_gib"] / baseline["peak_rss_gib"],
        )
        rows.append(result)
        print(
            f"  {name}: {result['seconds_per_step']:.2f} s/step, x{result['speedup_vs_plain_fp32']:.2f}, "
            f"peak {result['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    return rows


def benchmark_scaling(args, variant: Dict) -> List[Dict]:
    unet = build_unet(args.preset, variant["dtype"], variant["channels_last"])
    rows = []
    for resolution in args.resolutions:
        for batch in args.batches:
            if resolution * resolution * batch > args.max_pixels:
                continue
            x = model_input(unet, batch, resolution, variant)
            with torch.no_grad():
                levels = torch.full((batch,), 0.5)
                seconds = median_seconds(lambda x=x, levels=levels: unet(x, levels), max(1, args.repeats // 2), 1)
            rows.append({"resolution": resolution, "batch": batch, "seconds_per_eval": seconds})
            print(f"  {resolution}px batch {batch}: {seconds:.2f} s", flush=True)
    return rows


def markdown(report: Dict) -> str:
    lines = [f"# SR3 speed benchmark: preset {report['preset']}, batch {report['batch']}", ""]
    machine = report["machine"]
    lines += [
        f"torch {machine['torch']}, {machine['threads']} threads, CPU flags {', '.join(machine['cpu_flags']) or '-'}; "
        f"convolution peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine["conv_peak_gflops"].items()),
        "",
        f"Model: {report['parameters_m']:.1f}M parameters, {report['gflop_per_eval']:.1f} GFLOP per evaluation "
        f"at {report['resolution']}px, batch 1.",
        "",
        "| inference variant | ms / eval | speed-up | GFLOP/s | of peak | rel. error vs fp32 | first call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["inference"]:
        if "failed" in row:
            lines.append(f"| {row['variant']} | failed: {row['failed']} | | | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {row['seconds_per_eval'] * 1000:.0f} | x{row['speedup_vs_plain_fp32']:.2f} | "
            f"{row['gflops_per_s']:.0f} | {row['fraction_of_peak']:.0%} | {row['relative_error_vs_fp32']:.1e} | "
            f"{row['first_call_seconds']:.1f} |"
        )
    if report.get("pipeline"):
        lines += ["", f"End to end ({report['fastest_variant']}):", ""]
        lines += ["| scheduler | steps | s / batch | images / s | |", "|---|---|---|---|---|"]
        for row in report["pipeline"]:
            note = "measured" if row["measured"] else "extrapolated"
            lines.append(
                f"| {row['scheduler']} | {row['steps']} | {row['seconds_per_batch']:.1f} | "
                f"{row['images_per_second']:.3f} | {note} |"
            )
    if report.get("training"):
        lines += ["", f"Training step, batch {report['train_batch']}:", ""]
        lines += [
            "| variant | s / step | samples / s | speed-up | peak memory (GiB) | memory vs plain | of which runtime / "
            "parameters x4 / activations saved (GiB) |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for row in report["training"]:
            lines.append(
                f"| {row['variant']} | {row['seconds_per_step']:.2f} | {row['samples_per_second']:.2f} | "
                f"x{row['speedup_vs_plain_fp32']:.2f} | {row['peak_rss_gib']:.2f} | "
                f"{row['memory_vs_plain_fp32']:.0%} | {row['runtime_gib']:.2f} / {row['parameters_gib']:.2f} / "
                f"{row['activations_gib']:.2f} |"
            )
    if report.get("scaling"):
        lines += ["", f"Scaling ({report['fastest_variant']}), seconds per evaluation:", ""]
        batches = sorted({row["batch"] for row in report["scaling"]})
        lines += ["| resolution | " + " | ".join(f"batch {b}" for b in batches) + " |"]
        lines += ["|---|" + "---|" * len(batches)]
        for resolution in sorted({row["resolution"] for row in report["scaling"]}):
            cells = {
                row["batch"]: row["seconds_per_eval"] for row in report["scaling"] if row["resolution"] == resolution
            }
            lines.append(
                f"| {resolution} | " + " | ".join(f"{cells[b]:.2f}" if b in cells else "-" for b in batches) + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sr_16_128", help="model preset (diffusers_sr3.presets)")
    parser.add_argument("--batch", type=int, default=1, help="inference batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(INFERENCE_VARIANTS) + list(COMPILED_VARIANTS),
        default=list(INFERENCE_VARIANTS),
        help="inference variants to measure (the first is the baseline)",
    )
    parser.add_argument("--compile", action="store_true", help="also measure the torch.compile variants")
    parser.add_argument(
        "--schedules",
        nargs="*",
        default=["ddpm:2000", "ddpm:1000", "ddim:50", "dpmsolver:10", "dpmsolver:25", "dpmsolver:50", "unipc:25"],
        help="scheduler:steps entries for the end-to-end table (empty to skip)",
    )
    parser.add_argument("--max-measured-steps", type=int, default=50, help="longer runs are extrapolated")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps per variant (0 skips)")
    parser.add_argument(
        "--train-variants",
        nargs="*",
        choices=list(TRAINING_VARIANTS),
        default=list(TRAINING_VARIANTS),
        help="training variants to measure (the first is the baseline)",
    )
    parser.add_argument("--peak-channels", type=int, default=256, help="width of the peak-convolution benchmark")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--max-pixels", type=int, default=512 * 512, help="skip scaling cells above batch x H x W")
    parser.add_argument("--output", default="benchmarks/results", help="folder for run.json and run.md")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)  # internal: one training variant in this process
    args = parser.parse_args(argv)

    if args.train_worker:
        result = training_worker(args.preset, TRAINING_VARIANTS[args.train_worker], args.train_batch, args.train_steps)
        print(json.dumps(result))
        return result

    preset = get_preset(args.preset)
    unet = build_unet(args.preset, torch.float32, False)
    size = preset.resolution
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, unet.config.in_channels, size, size), torch.tensor([0.5]))
    flops = counter.get_total_flops()
    report = {
        "preset": args.preset,
        "batch": args.batch,
        "resolution": size,
        "parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "gflop_per_eval": flops / 1e9,
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_flags": cpu_flags(),
            "conv_peak_gflops": {
                name: conv_peak(DTYPES[name], args.repeats, args.peak_channels) for name in ("float32", "bfloat16")
            },
        },
    }
    print(
        f"{args.preset}: {report['parameters_m']:.1f}M parameters, {report['gflop_per_eval']:.1f} GFLOP/eval",
        flush=True,
    )
    print(f"convolution peak: {report['machine']['conv_peak_gflops']}", flush=True)
    print("inference:", flush=True)
    report["inference"] = benchmark_inference(args, report["machine"]["conv_peak_gflops"], flops)
    variant = fastest_variant(report["inference"])
    report["fastest_variant"] = variant["name"]
    if args.schedules:
        print("pipeline:", flush=True)
        report["pipeline"] = benchmark_pipeline(args, variant)
    if args.train_steps:
        print("training:", flush=True)
        report["train_batch"] = args.train_batch
        report["training"] = benchmark_training(args)
    if args.resolutions and args.batches:
        print("scaling:", flush=True)
        report["scaling"] = benchmark_scaling(args, variant)

    text = write_report(args.output, "run", report, markdown(report))
    print("\n" + text)
    return report


if __name__ == "__main__":
    main()
