"""`sr3 upscale`: super-resolve image files, folders and globs."""

from __future__ import annotations

import argparse
import os

import torch
from tqdm.auto import tqdm

from ..image_processing import load_image
from ..pipelines import SR3Pipeline
from .common import add_model_arguments, find_images, load_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="output folder (or a file name for a single input)")
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="images refined together (same size only)")


def _output_path(output: str, source: str, single: bool) -> str:
    if single and os.path.splitext(output)[1].lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        return output
    return os.path.join(output, os.path.splitext(os.path.basename(source))[0] + "_sr.png")


def run(args: argparse.Namespace) -> int:
    paths = find_images(args.inputs)
    images = [load_image(path) for path in paths]  # read everything first: bad files fail before any work
    pipeline = load_pipeline(args, SR3Pipeline)
    pipeline.set_progress_bar_config(leave=False)
    steps = args.steps or 50
    generator = torch.Generator("cpu").manual_seed(args.seed)
    single = len(paths) == 1
    for start in tqdm(range(0, len(paths), args.batch_size), desc="upscaling", unit="batch"):
        batch_paths = paths[start : start + args.batch_size]
        batch_images = images[start : start + args.batch_size]
        if len({image.size for image in batch_images}) > 1:
            outputs = [
                pipeline(image, num_inference_steps=steps, generator=generator).images[0] for image in batch_images
            ]
        else:
            outputs = pipeline(batch_images, num_inference_steps=steps, generator=generator).images
        for path, result in zip(batch_paths, outputs):
            destination = _output_path(args.output, path, single)
            os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
            result.save(destination)
            print(f"{path} -> {destination} ({result.width}x{result.height})")
    return 0
