"""GPU readiness check, run by benchmarks/gpu_check.sh: tests, per-evaluation speed and one upscale on a device.

    bash benchmarks/gpu_check.sh                       # CUDA: under 10 minutes
    bash benchmarks/gpu_check.sh --device cpu          # smaller sizes; what CI runs to prove the script works

Three parts, written as one JSON + markdown report (gpu_check.json, gpu_check.md in --output):
1. the test suite's device-agnostic subset (tests/test_device_agnostic.py) with SR3_TEST_DEVICE=<device>;
2. per-evaluation time of the photos_x4 UNet (batch 1, --eval-size output pixels) in fp32, bf16, fp16,
   fp32 channels_last and fp32 channels_last + torch.compile, with the relative error against fp32
   (a variant that fails, e.g. fp16 on a CPU without it or torch.compile without a compiler, is reported, not fatal);
3. one `sr3 upscale` of a held-out photo cropped to --upscale-size (512 on a GPU) in fidelity and detail mode:
   wall time of the whole command and the output size.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "fp32": dict(dtype=torch.float32, channels_last=False, compile=False),
    "bf16": dict(dtype=torch.bfloat16, channels_last=False, compile=False),
    "fp16": dict(dtype=torch.float16, channels_last=False, compile=False),
    "fp32 channels_last": dict(dtype=torch.float32, channels_last=True, compile=False),
    "fp32 channels_last + torch.compile": dict(dtype=torch.float32, channels_last=True, compile=True),
}
SMALL = {"cpu": dict(eval_size=128, upscale_size=32, repeats=2)}
LARGE = dict(eval_size=1024, upscale_size=512, repeats=10)


def run_tests(device: str, selection: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(env, SR3_TEST_DEVICE=device))
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    print(f"tests on {device}: {summary}", flush=True)
    return dict(
        selection=selection,
        passed=result.returncode == 0,
        summary=summary,
        seconds=time.perf_counter() - started,
        output_tail=(result.stdout + result.stderr)[-4000:] if result.returncode else "",
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_evaluations(device: torch.device, size: int, repeats: int, names: List[str]) -> List[Dict[str, Any]]:
    from diffusers_sr3 import SR3UNet2DModel
    from diffusers_sr3.presets import get_preset

    torch.manual_seed(0)
    reference_unet = SR3UNet2DModel(**get_preset("photos_x4").unet_config()).eval()
    state = reference_unet.state_dict()
    x = torch.randn(1, reference_unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    level = torch.full((1,), 0.5)
    rows, reference = [], None
    for name in names:
        variant = VARIANTS[name]
        row: Dict[str, Any] = dict(variant=name)
        try:
            unet = SR3UNet2DModel(**get_preset("photos_x4").unet_config())
            unet.load_state_dict(state)
            unet = unet.to(device).eval()
            if variant["dtype"] != torch.float32:
                unet = unet.to(variant["dtype"])
                unet.noise_level_embedding.float()  # as from_pretrained(dtype=...) keeps it
            if variant["channels_last"]:
                unet = unet.to(memory_format=torch.channels_last)
            network = torch.compile(unet) if variant["compile"] else unet
            inputs = x.to(device, variant["dtype"])
            if variant["channels_last"]:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                started = time.perf_counter()
                output = network(inputs, level.to(device), return_dict=False)[0]
                synchronize(device)
                row["first_call_seconds"] = time.perf_counter() - started
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    output = network(inputs, level.to(device), return_dict=False)[0]
                    synchronize(device)
                    times.append(time.perf_counter() - started)
            output = output.float().cpu()
            if reference is None:
                reference = output
            row["seconds_per_eval"] = sorted(times)[len(times) // 2]
            row["seconds_per_megapixel"] = row["seconds_per_eval"] / (size * size / 1e6)
            row["relative_error_vs_fp32"] = float((output - reference).norm() / reference.norm())
            if device.type == "cuda":
                row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            print(f"{name}: {row['seconds_per_eval']:.4f} s / eval", flush=True)
        except Exception as error:  # noqa: BLE001 - a failing variant is a finding, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            print(f"{name}: failed ({row['error']})", flush=True)
        rows.append(row)
    return rows


def upscale_photo(device: str, size: int, model: Optional[str], env: Dict[str, str], work: str) -> List[Dict]:
    from diffusers_sr3.image_processing import degrade, images_to_tensor, tensor_to_pil
    from diffusers_sr3.photos import load_photo, packaged_photo_paths, photo_split

    photo = max(
        (load_photo(path) for path in photo_split(packaged_photo_paths(), heldout=0.25)[1]), key=lambda p: min(p.size)
    )
    side = min(size * 4, min(photo.size)) // 4 * 4
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    low, _ = degrade(images_to_tensor([photo.crop((left, top, left + side, top + side))]), 4)
    source = os.path.join(work, "photo.png")
    tensor_to_pil(low)[0].save(source)
    rows = []
    for mode in ("fidelity", "detail"):
        output = os.path.join(work, f"photo_{mode}.png")
        command = [sys.executable, "-m", "diffusers_sr3", "upscale", source, "--output", output, "--quiet"]
        command += ["--device", device, "--mode", mode] + (["--model", model] if model else [])
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
        row = dict(mode=mode, input=f"{side // 4}x{side // 4}", seconds=seconds, passed=result.returncode == 0)
        if result.returncode:
            row["error"] = result.stderr[-2000:]
        else:
            import PIL.Image

            row["output"] = "x".join(map(str, PIL.Image.open(output).size))
        print(f"sr3 upscale --mode {mode} {row['input']}: {seconds:.1f} s ({'ok' if row['passed'] else 'FAILED'})")
        rows.append(row)
    return rows


def markdown(report: Dict[str, Any]) -> str:
    tests = report["tests"]
    lines = [
        f"# GPU readiness check on {report['device']} ({report['device_name']}, torch {report['torch']})",
        "",
        f"Tests ({' '.join(tests['selection'])}): **{'passed' if tests['passed'] else 'FAILED'}** — "
        f"{tests['summary']} ({tests['seconds']:.0f} s)",
        "",
        f"Per evaluation, photos_x4 UNet, batch 1, {report['eval_size']}x{report['eval_size']} output:",
        "",
        "| variant | s / eval | s / megapixel | first call (s) | relative error vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for row in report["evaluations"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {row['seconds_per_eval']:.4f} | {row['seconds_per_megapixel']:.3f} | "
            f"{row['first_call_seconds']:.2f} | {row['relative_error_vs_fp32']:.1e} |"
        )
    lines += ["", "`sr3 upscale` of one held-out photo (whole command, model load included):", ""]
    lines += ["| mode | input | output | s |", "|---|---|---|---|"]
    for row in report["upscale"]:
        output = row.get("output", "FAILED")
        lines.append(f"| {row['mode']} | {row['input']} | {output} | {row['seconds']:.1f} |")
    lines += ["", f"Total: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu (smaller sizes)")
    parser.add_argument("--eval-size", type=int, help="output pixels per side of the per-evaluation benchmark")
    parser.add_argument("--upscale-size", type=int, help="input side of the photo upscaled end to end")
    parser.add_argument("--repeats", type=int, help="timed evaluations per variant (median)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tests", nargs="*", default=["tests/test_device_agnostic.py"], help="pytest selection")
    parser.add_argument("--model", help="pipeline for the upscale (default: the packaged model)")
    parser.add_argument("--output", default="benchmarks/results/gpu_check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu to check the script on a CPU")
    sizes = SMALL.get(device.type, LARGE)
    eval_size = args.eval_size or sizes["eval_size"]
    upscale_size = args.upscale_size or sizes["upscale_size"]
    repeats = args.repeats or sizes["repeats"]

    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    report: Dict[str, Any] = dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        eval_size=eval_size,
        upscale_size=upscale_size,
    )
    report["tests"] = (
        run_tests(str(device), args.tests, env)
        if args.tests
        else dict(selection=[], passed=True, summary="skipped", seconds=0.0)
    )
    report["evaluations"] = benchmark_evaluations(device, eval_size, repeats, args.variants)
    with tempfile.TemporaryDirectory() as work:
        report["upscale"] = upscale_photo(str(device), upscale_size, args.model, env, work)
    report["seconds"] = time.perf_counter() - started
    text = write_report(args.output, "gpu_check", report, markdown(report))
    print("\n" + text)
    return report


if __name__ == "__main__":
    main()
