"""End-to-end `sr3 upscale`: seconds per photo and peak memory, next to bicubic and today's settings, with PSNR.

    python benchmarks/upscale.py --output benchmarks/results/upscale                   # the packaged model
    python benchmarks/upscale.py --new-weights RUN/checkpoint-8000/model.safetensors --residual-scale 14.2

The packaged model's held-out photos (`diffusers_sr3.photos.packaged_model_heldout()`, never trained on) are cropped
to the high-resolution size (1024x1024 for a 256 input; for 512 the largest crop up to 2048x2048 that the photos allow),
degraded with the package's antialiased bicubic downsample, saved as PNG, and upscaled by `sr3 upscale` in a fresh
process per photo and setting: the wall time is what a user waits (Python start, model load, upscaling, writing),
the peak resident memory is that process's (`getrusage` of a wrapper's only child). Each output is scored
against the HR (PSNR, uint8).

Rows (`--rows`):
- `bicubic`: the condition alone (the package's antialiased bicubic), timed in-process.
- `fidelity`, `detail`: the model (`--model`, default the packaged one) with the default settings
  (untiled when it fits the memory budget; `--backend auto`: bfloat16 autocast on CPUs with AMX or AVX512-BF16),
  `--mode fidelity` / `--mode detail --steps STEPS` at the packaged model's detail settings (`--eta 1 --strength
  0.6`, which `--model` alone would not apply), with the model's guide if it has one.
- `detail, unguided`: the same without autoguidance (`--guidance-scale 1`): half the evaluations per refinement step.
- `detail, whole image`: the same without training-sized windows (`--window-size 0`; the packaged model's own
  `detail_window_size` is 64): the network on the whole image only.
- `fidelity, self-ensemble`: the same with `--self-ensemble` (the 8 orientations' answers averaged).
- `fidelity, float32`, `detail, float32`: the same in eager float32 (`--backend torch`): the untouched precision
  the default's PSNR is checked against (within 0.1 dB).
- `fidelity onnx`, `detail onnx`: the same with `--backend onnx` (exported once before timing: cached).
- `fidelity, 1 thread`: the same with `--threads 1` (the default is one thread per core).
- `fidelity, old tiling`: the model on today's tiling (64px tiles, overlap 16, one tile per batch): the
  untouched path the speed-ups are checked against (PSNR within 0.1 dB).
- `old model, old settings`: today's packaged model (`--old-model`) on today's settings (10 DDIM steps,
  64px tiles, overlap 16, one tile per batch, float32).
Detail runs longer than `--max-measured-steps` (per size, at least 3) are measured at the fewest steps that run
one refinement step (2 at strength 0.6: Diffusers' image-to-image count, `int(steps * strength)`) and at that many
steps, and extrapolated linearly to the full count (every step costs one evaluation); such rows are marked, and
their PSNR is that of the shorter run. Timings on shared machines are noisy: compare ratios within one run.

A tile study (`--tile-study 64 128 256 512`) super-resolves the first photo of the first size in fidelity mode
with each tile size in-process and reports PSNR against the HR and against the untiled output: whether larger
tiles (more context for the attention layers) change a trained model's output.

Writes upscale.json and upscale.md to --output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import PIL.Image
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.backends import cpu_name
from diffusers_sr3.image_processing import degrade, images_to_tensor, tensor_to_pil
from diffusers_sr3.metrics import psnr
from diffusers_sr3.photos import load_photo, packaged_model_heldout, packaged_photo_paths, photo_name, photo_split
from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS
from diffusers_sr3.pretrained import DEFAULT_DETAIL_OPTIONS, DEFAULT_STEPS, default_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

ROWS = (
    "bicubic",
    "fidelity",
    "detail",
    "detail, unguided",
    "detail, whole image",
    "fidelity, self-ensemble",
    "fidelity, float32",
    "detail, float32",
    "fidelity onnx",
    "detail onnx",
    "fidelity, 1 thread",
    "fidelity, old tiling",
    "old model, old settings",
)
OLD_TILING = ["--tile-size", "64", "--tile-overlap", "16", "--tile-batch-size", "1"]
# A wrapper whose only child is `sr3 upscale`: its RUSAGE_CHILDREN peak is that process's alone.
WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "started = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "seconds = time.perf_counter() - started\n"
    "peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'returncode': code, 'seconds': seconds, 'peak_rss_gib': peak_kib / 2**20}))\n"
)


def heldout_pairs(low_size: int, count: int, factor: int = 4) -> List[Dict[str, Any]]:
    """`count` held-out photos as (HR crop, LR) pairs for a `low_size` input (see the module docstring)."""
    high = low_size * factor
    held = photo_split(packaged_photo_paths(), heldout=packaged_model_heldout())[1]
    photos = [load_photo(path) for path in held]
    names = [photo_name(path) for path in held]
    # Photos at least as wide as the target first (then taller), so the crops are as large as the photos allow.
    order = sorted(range(len(photos)), key=lambda i: (-min(photos[i].width, high), -min(photos[i].height, high)))
    pairs = []
    for index in order[:count]:
        photo = photos[index]
        width = min(high, photo.width) // factor * factor
        height = min(high, photo.height) // factor * factor
        left, top = (photo.width - width) // 2, (photo.height - height) // 2
        hr = photo.crop((left, top, left + width, top + height))
        lr, condition = degrade(images_to_tensor([hr]), factor)
        pairs.append(
            dict(
                name=names[index],
                hr=hr,
                lr=tensor_to_pil(lr)[0],
                bicubic=tensor_to_pil(condition)[0],
            )
        )
    return pairs


def build_new_model(weights: str, residual_scale: float, folder: str, preset: str = "photos_x4") -> str:
    """A pipeline folder for the new low-resolution network from training weights (residual, x0, DDIM)."""
    from safetensors.torch import load_file

    from diffusers_sr3 import SR3UNet2DModel
    from diffusers_sr3.noise import make_scheduler
    from diffusers_sr3.presets import get_preset

    config = get_preset(preset)
    unet = SR3UNet2DModel(**config.unet_config())
    unet.load_state_dict(load_file(weights))
    scheduler = make_scheduler("ddim", prediction_type="sample", clip_sample_range=2 * residual_scale)
    pipeline = SR3Pipeline(
        unet, scheduler, upscale_factor=config.upscale_factor, residual=True, residual_scale=residual_scale
    )
    pipeline.save_pretrained(folder)
    return folder


def run_upscale(arguments: List[str], env: Dict[str, str]) -> Dict[str, float]:
    command = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "diffusers_sr3", "upscale", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark wrapper failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["returncode"] != 0:
        raise RuntimeError(f"sr3 upscale {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return measured


def row_arguments(row: str, args, steps: int) -> Optional[List[str]]:
    """`sr3 upscale` arguments of a row (model, mode, settings), or None for bicubic."""
    if row == "bicubic":
        return None
    if row == "old model, old settings":
        return ["--model", args.old_model, "--mode", "detail", "--steps", str(steps), "--backend", "torch", *OLD_TILING]
    arguments = ["--model", args.model]
    if row.startswith("fidelity"):
        arguments += ["--mode", "fidelity"]
    else:  # the packaged model's detail settings, named: these rows time them on any model, whatever it saved
        arguments += ["--mode", "detail", "--steps", str(steps)]
        arguments += [f"--{name}={value:g}" for name, value in DEFAULT_DETAIL_OPTIONS.items()]
    if "onnx" in row:
        arguments += ["--backend", "onnx"]
    if "float32" in row:
        arguments += ["--backend", "torch"]
    if "old tiling" in row:
        arguments += OLD_TILING
    if "1 thread" in row:
        arguments += ["--threads", "1"]
    if "self-ensemble" in row:
        arguments += ["--self-ensemble"]
    if "unguided" in row:
        arguments += ["--guidance-scale", "1"]
    if "whole image" in row:
        arguments += ["--window-size", "0"]
    return arguments


def measure(args, names, pairs: List[Dict[str, Any]], low_size: int, max_steps: int, work: str, env) -> List[Dict]:
    rows = []
    for row in names:
        is_detail = "detail" in row or row.startswith("old model")
        if row == "bicubic":
            full_steps = 1
        elif is_detail:
            full_steps = DEFAULT_STEPS if row.startswith("old model") else args.steps
        else:
            full_steps = FIDELITY_STEPS
        # Longer runs: measured at max_steps and at the fewest steps that refine, extrapolated linearly (each step
        # costs the same). Below strength 1 a step count must leave a step: int(steps * strength) >= 1.
        strength = 1.0 if row.startswith("old model") else DEFAULT_DETAIL_OPTIONS["strength"]
        fewest = math.ceil(1 / strength)
        step_counts = [full_steps] if full_steps <= max_steps or not is_detail else [fewest, max_steps]
        result = dict(row=row, size=low_size, steps=full_steps, measured_steps=step_counts)
        seconds, peaks, scores, megapixels = {count: [] for count in step_counts}, [], [], []
        for pair in pairs:
            hr = pair["hr"]
            megapixels.append(hr.width * hr.height / 1e6)
            if row == "bicubic":
                started = time.perf_counter()
                upsampled = package_bicubic(PIL.Image.open(pair["lr_path"]).convert("RGB"), hr.size)
                seconds[1].append(time.perf_counter() - started)
                scores.append(psnr(np.asarray(upsampled), np.asarray(hr)))
                continue
            for count in step_counts:
                name = f"{row.replace(' ', '_').replace(',', '')}_{low_size}_{count}_{pair['name']}.png"
                output = os.path.join(work, name)
                arguments = [pair["lr_path"], "--output", output, "--quiet", "--device", args.device]
                measured = run_upscale(arguments + row_arguments(row, args, count), env)
                seconds[count].append(measured["seconds"])
                peaks.append(measured["peak_rss_gib"])
                print(f"  {row} {pair['name']} ({low_size}, {count} steps): {measured['seconds']:.1f} s", flush=True)
            scores.append(psnr(np.asarray(PIL.Image.open(output).convert("RGB")), np.asarray(hr)))
        mean = {count: float(np.mean(values)) for count, values in seconds.items()}
        if len(step_counts) == 1:
            per_photo = mean[step_counts[0]]
        else:
            # Noise can make the longer run the faster one: a step never costs less than nothing.
            fewest = step_counts[0]
            per_step = max(0.0, (mean[max_steps] - mean[fewest]) / (max_steps - fewest))
            per_photo = max(mean[max_steps], mean[fewest] + (full_steps - fewest) * per_step)
            result["measured_seconds_per_photo"] = mean
        result.update(
            extrapolated=len(step_counts) > 1,
            seconds_per_photo=per_photo,
            seconds_per_megapixel=per_photo / float(np.mean(megapixels)),
            megapixels=float(np.mean(megapixels)),
            peak_rss_gib=float(max(peaks)) if peaks else None,
            psnr=float(np.mean(scores)),
        )
        rows.append(result)
        print(f"{row} @ {low_size}: {per_photo:.1f} s/photo, PSNR {result['psnr']:.2f}", flush=True)
    return rows


def package_bicubic(lr: PIL.Image.Image, size) -> PIL.Image.Image:
    """The package's bicubic upsample of an LR image (what `sr3 upscale` conditions on)."""
    from diffusers_sr3.image_processing import upsample_condition

    condition = upsample_condition(images_to_tensor([lr]), (size[1], size[0]))
    return tensor_to_pil(condition)[0]


def tile_study(pipeline: SR3Pipeline, pair: Dict[str, Any], sizes: List[int]) -> List[Dict]:
    """Fidelity-mode outputs of one photo with each tile size against the HR and the untiled output."""
    from diffusers_sr3.tiling import tiled_super_resolve

    def run(tile: Optional[int]):
        started = time.perf_counter()
        kwargs = dict(tile_size=tile, overlap=tile // 4) if tile else dict(max_tile_pixels=2**40)
        image = tiled_super_resolve(
            pipeline, pair["lr"], mode="fidelity", generator=torch.Generator().manual_seed(0), **kwargs
        ).images[0]
        return np.asarray(image), time.perf_counter() - started

    untiled, untiled_seconds = run(None)
    hr = np.asarray(pair["hr"])
    rows = [dict(tile="untiled", seconds=untiled_seconds, psnr=psnr(untiled, hr), psnr_vs_untiled=None)]
    for size in sizes:
        output, seconds = run(size)
        rows.append(dict(tile=size, seconds=seconds, psnr=psnr(output, hr), psnr_vs_untiled=psnr(output, untiled)))
        print(f"tile {size}: PSNR {rows[-1]['psnr']:.3f} ({rows[-1]['psnr_vs_untiled']:.1f} vs untiled)", flush=True)
    return rows


def markdown(report: Dict) -> str:
    lines = [
        f"# `sr3 upscale` end to end ({report['machine']['cpu']}, {report['machine']['threads']} threads, "
        f"torch {report['machine']['torch']})",
        "",
        f"Model: `{report['model']}`; old model: `{report['old_model']}`. Held-out photos per size: "
        f"{report['photos']}. Detail steps: {report['steps']}. {report['note']}",
        "",
        "| input -> output | setting | s / photo | s / megapixel | vs old settings | peak memory (GiB) | PSNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"]:
        rows = [row for row in report["rows"] if row["size"] == size]
        old = next((row for row in rows if row["row"] == "old model, old settings"), None)
        for row in rows:
            speedup = f"{old['seconds_per_photo'] / row['seconds_per_photo']:.1f}x" if old else "-"
            mark = " (extrapolated)" if row.get("extrapolated") else ""
            peak = f"{row['peak_rss_gib']:.2f}" if row["peak_rss_gib"] is not None else "-"
            label = row["row"] + (f", {row['steps']} steps" if row["steps"] > 1 else "")
            output = f"{size}->{size * 4} ({row['megapixels']:.1f} MP)"
            lines.append(
                f"| {output} | {label} | {row['seconds_per_photo']:.1f}{mark} | {row['seconds_per_megapixel']:.1f} "
                f"| {speedup} | {peak} | {row['psnr']:.2f} |"
            )
    if report.get("tile_study"):
        lines += ["", "Tile study (fidelity mode, first photo of the first size, overlap tile/4):", ""]
        lines += ["| tile | s | PSNR vs HR | PSNR vs untiled |", "|---|---|---|---|"]
        for row in report["tile_study"]:
            versus = f"{row['psnr_vs_untiled']:.1f}" if row["psnr_vs_untiled"] is not None else "-"
            lines.append(f"| {row['tile']} | {row['seconds']:.1f} | {row['psnr']:.3f} | {versus} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder of the default model (default: packaged)")
    parser.add_argument("--new-weights", help="build --model from photos_x4 training weights (model.safetensors)")
    parser.add_argument("--residual-scale", type=float, help="the training run's residual scale (with --new-weights)")
    parser.add_argument("--old-model", default=None, help="today's model (default: the packaged folder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="input sizes (x4 outputs)")
    parser.add_argument("--photos", type=int, default=2, help="held-out photos per size")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="detail-mode steps")
    parser.add_argument(
        "--max-measured-steps", type=int, nargs="+", default=[10], help="per size (the last repeats): longer "
        "detail runs are measured at this many steps and extrapolated",
    )  # fmt: skip
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument(
        "--large-rows", nargs="+", choices=ROWS, help="rows for the sizes after the first (default: --rows)"
    )
    parser.add_argument("--tile-study", type=int, nargs="*", default=[], help="tile sizes for the tile study")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="benchmarks/results/upscale")
    args = parser.parse_args(argv)
    if min(args.max_measured_steps) < 3:
        parser.error("--max-measured-steps must be at least 3 (extrapolation needs two step counts, from 2)")
    if args.new_weights:
        if args.residual_scale is None:
            parser.error("--new-weights needs --residual-scale (the training log's 'residual scale' line)")
    args.old_model = args.old_model or default_model_path()

    os.makedirs(args.output, exist_ok=True)
    # The photos, the converted model and the cache each run writes are its own: gone when it ends, stopped or not.
    with tempfile.TemporaryDirectory(prefix="upscale-benchmark-") as work:
        return measure_all(args, work)


def measure_all(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Every row of the report, with `work` as the scratch folder; the report is written after every size."""
    if args.new_weights:
        args.model = build_new_model(args.new_weights, args.residual_scale, os.path.join(work, "new-model"))
    args.model = args.model or default_model_path()
    env = dict(os.environ, HF_HUB_OFFLINE="1", SR3_CACHE_DIR=os.path.join(work, "cache"))
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    if any("onnx" in row for row in args.rows):
        # Export once before timing (cached, as on a user's second run); report the first-run cost.
        pair = heldout_pairs(min(args.sizes), 1)[0]
        pair["lr"].save(os.path.join(work, "warmup.png"))
        started = time.perf_counter()
        run_upscale(
            [os.path.join(work, "warmup.png"), "--output", os.path.join(work, "warmup_out.png"), "--quiet"]
            + ["--model", args.model, "--mode", "fidelity", "--backend", "onnx", "--device", args.device],
            env,
        )
        onnx_first_run = time.perf_counter() - started
    else:
        onnx_first_run = None

    report: Dict[str, Any] = dict(
        model=args.model if not args.new_weights else f"photos_x4 from {args.new_weights}",
        old_model=args.old_model,
        sizes=args.sizes,
        photos=args.photos,
        steps=args.steps,
        onnx_first_run_seconds=onnx_first_run,
        machine=dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__),
        note="Fresh process per photo and setting; peak = resident memory of that process.",
        rows=[],
    )
    first_pair = None
    for index, size in enumerate(args.sizes):
        pairs = heldout_pairs(size, args.photos)
        for pair in pairs:
            pair["lr_path"] = os.path.join(work, f"{pair['name']}_{size}.png")
            pair["lr"].save(pair["lr_path"])
        first_pair = first_pair or pairs[0]
        max_steps = args.max_measured_steps[min(index, len(args.max_measured_steps) - 1)]
        rows = args.rows if index == 0 or not args.large_rows else args.large_rows
        report["rows"] += measure(args, rows, pairs, size, max_steps, work, env)
        # after every size: a long run that is stopped keeps what it measured
        write_report(args.output, "upscale", report, markdown(report))
    if args.tile_study:
        pipeline = SR3Pipeline.from_pretrained(args.model)
        pipeline.set_progress_bar_config(disable=True)
        report["tile_study"] = tile_study(pipeline, first_pair, args.tile_study)

    print("\n" + write_report(args.output, "upscale", report, markdown(report)))
    return report


if __name__ == "__main__":
    main()
