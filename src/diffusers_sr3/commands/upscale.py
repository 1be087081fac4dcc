"""`sr3 upscale`: super-resolve image files, folders and globs, untiled when they fit memory, else in seamless tiles."""

from __future__ import annotations

import argparse
import os
from typing import List, Tuple

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..backends import BACKENDS, use_backend
from ..image_processing import grid, load_image, tensor_to_pil
from ..pipelines import SR3Pipeline
from ..pretrained import DEFAULT_STEPS
from ..progress import UpscaleProgress, evaluations_per_crop
from ..tiling import DEFAULT_MAX_TILE_PIXELS, TiledNetwork, tiled_super_resolve
from .common import IMAGE_EXTENSIONS, add_model_arguments, add_save_process_argument, find_images, load_pipeline

# Shown by `sr3 upscale --help`; from benchmarks/upscale.py (README "Speed": model, machine and conditions).
EXPECTED_TIME = """\
expected time per output megapixel (a 256x256 input upscaled to 1024x1024 is 1 megapixel), x4 photo model
(photos_x4 network), measured by benchmarks/upscale.py on 2 CPU cores shared with other jobs:
  CPU, --mode fidelity: about {cpu_eval} s per megapixel, plus {startup} s start-up (Python, model load)
  CPU, --mode detail:   about {cpu_eval} s per megapixel per step ({steps} steps by default), plus start-up
  memory: up to 1 megapixel runs untiled (activations estimated at ~1 GB); larger images run in tiles
    within the same budget (--max-tile-pixels)
  GPU: well under 1 s per megapixel per step (an estimate from the network's FLOPs, not measured:
    run benchmarks/gpu_check.sh on a GPU)
The progress bar counts every tile of every step and shows the remaining time from the first second.
"""
CPU_SECONDS_PER_MEGAPIXEL_PER_EVALUATION = 12
STARTUP_SECONDS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXPECTED_TIME.format(
        cpu_eval=CPU_SECONDS_PER_MEGAPIXEL_PER_EVALUATION, startup=STARTUP_SECONDS, steps=DEFAULT_STEPS
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="output folder (or a file name for a single input)")
    add_model_arguments(parser, default_model="the x4 photo model that ships with the package")
    parser.add_argument(
        "--mode",
        choices=("detail", "fidelity"),
        default="detail",
        help="detail: iterative refinement (--steps network evaluations, sharp plausible texture); fidelity: one "
        "evaluation, the model's estimate of the average answer (highest PSNR, smoother, --steps times faster; "
        "models that predict the clean image)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images of one size refined together")
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="tile size at the output resolution (default: the whole image when it fits the memory budget, else "
        "the fewest evenly sized tiles that do)",
    )
    parser.add_argument(
        "--tile-overlap", type=int, default=None, help="tile overlap in pixels (default: half the model's sample_size)"
    )
    parser.add_argument(
        "--tile-batch-size", type=int, default=None, help="tiles run together (default: as many as fit the budget)"
    )
    parser.add_argument(
        "--max-tile-pixels",
        type=int,
        default=DEFAULT_MAX_TILE_PIXELS,
        help=f"memory budget: network-grid pixels per evaluation (default {DEFAULT_MAX_TILE_PIXELS}, activations "
        "estimated at about 1 GB with the photos_x4 network)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="runtime of the network: torch (default), or onnx: ONNX Runtime fp32 on the CPU, exported once and "
        'cached (pip install "diffusers-sr3[onnx]")',
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no per-file lines")
    add_save_process_argument(
        parser,
        "also write <name>_process.png: the condition and N noisy images along the refinement (default N: 8)",
    )


def _output_path(output: str, source: str, single: bool) -> str:
    if single and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS:
        return output
    return os.path.join(output, os.path.splitext(os.path.basename(source))[0] + "_sr.png")


def _batches(images: List[PIL.Image.Image], batch_size: int) -> List[Tuple[int, int]]:
    """`(start, stop)` ranges of consecutive images of one size, at most `batch_size` long."""
    ranges, start = [], 0
    for index in range(1, len(images) + 1):
        if index == len(images) or index - start == batch_size or images[index].size != images[start].size:
            ranges.append((start, index))
            start = index
    return ranges


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.save_process < 0:
        raise ValueError("--save-process takes a positive number of frames")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    paths = find_images(args.inputs)
    images = [load_image(path) for path in paths]  # read everything first: bad files fail before any work
    packaged = args.model is None
    pipeline = load_pipeline(args, SR3Pipeline)
    pipeline.set_progress_bar_config(disable=True)  # our own bar counts steps and tiles
    steps = args.steps or (DEFAULT_STEPS if packaged and not args.scheduler else 50)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    single = len(paths) == 1
    tiling = dict(
        tile_size=args.tile_size,
        overlap=args.tile_overlap,
        tile_batch_size=args.tile_batch_size,
        max_tile_pixels=args.max_tile_pixels,
    )
    with (
        use_backend(pipeline, args.backend, threads=args.threads) as network,
        tqdm(total=len(paths), desc="images", unit="image", disable=args.quiet or single) as overall,
    ):
        for start, stop in _batches(images, args.batch_size):
            crops = _crops_per_step(pipeline, network, images[start], stop - start, tiling)
            name = os.path.basename(paths[start]) + (f" (+{stop - start - 1})" if stop - start > 1 else "")
            with UpscaleProgress(
                network,
                evaluations_per_crop(args.mode, steps),
                crops,
                description=name,
                disable=args.quiet,
                leave=single,
                position=0 if single else 1,
            ) as progress:
                output = tiled_super_resolve(
                    pipeline,
                    images[start:stop],
                    progress=progress,
                    num_inference_steps=steps,
                    mode=args.mode,
                    generator=generator,
                    num_intermediates=args.save_process,
                    **tiling,
                )
            for offset, result in enumerate(output.images):
                path = paths[start + offset]
                destination = _output_path(args.output, path, single)
                os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
                result.save(destination)
                if args.save_process:
                    condition = tensor_to_pil(pipeline.prepare_condition(images[start + offset]))[0]
                    frames = [condition] + [snapshot[offset] for snapshot in output.intermediates]
                    grid([frames]).save(os.path.splitext(destination)[0] + "_process.png")
                if not args.quiet:
                    overall.write(f"{path} -> {destination} ({result.width}x{result.height})")
                overall.update(1)
    return 0


def _crops_per_step(pipeline: SR3Pipeline, network, image: PIL.Image.Image, images: int, tiling: dict) -> int:
    """(image, tile) crops the network sees per refinement step for `images` inputs of `image`'s size."""
    factor = pipeline.config.upscale_factor
    multiple = network.downsampling_factor
    height, width = (-(-image.height * factor // multiple) * multiple, -(-image.width * factor // multiple) * multiple)
    tiled = TiledNetwork(
        network,
        tiling["tile_size"],
        tiling["overlap"],
        tiling["tile_batch_size"],
        max_pixels=tiling["max_tile_pixels"],
    )
    return tiled.count_evaluations(height, width, images)[0]
