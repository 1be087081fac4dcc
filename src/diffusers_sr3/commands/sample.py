"""`sr3 sample`: generate images with an unconditional pipeline, written as a grid."""

from __future__ import annotations

import argparse
import math
import os

import torch
from tqdm.auto import tqdm

from ..image_processing import grid
from ..pipelines import SR3UnconditionalPipeline
from .common import add_model_arguments, add_save_process_argument, load_pipeline

SAMPLE_STEPS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, steps_help=f"sampling steps (default: {SAMPLE_STEPS})")
    parser.add_argument("-n", "--num-images", type=int, default=16, help="number of images")
    parser.add_argument("--output", required=True, help="grid image file (PNG)")
    parser.add_argument("--batch-size", type=int, default=4, help="images generated together")
    parser.add_argument("--size", type=int, default=None, help="output size (default: the model's)")
    add_save_process_argument(
        parser,
        "also write <output>_process.png: N noisy images along the sampling of each image (default N: 8)",
    )


def run(args: argparse.Namespace) -> int:
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be at least 1")
    if args.save_process < 0:
        raise ValueError("--save-process takes a positive number of frames")
    pipeline = load_pipeline(args, SR3UnconditionalPipeline)
    pipeline.set_progress_bar_config(leave=False)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    images, processes = [], []
    with tqdm(total=args.num_images, desc="sampling", unit="image") as progress:
        while len(images) < args.num_images:
            count = min(args.batch_size, args.num_images - len(images))
            output = pipeline(
                batch_size=count,
                num_inference_steps=args.steps or SAMPLE_STEPS,
                generator=generator,
                height=args.size,
                width=args.size,
                num_intermediates=args.save_process,
            )
            images += output.images
            if args.save_process:
                processes += [[snapshot[index] for snapshot in output.intermediates] for index in range(count)]
            progress.update(count)
    columns = math.ceil(math.sqrt(len(images)))
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    grid(rows).save(args.output)
    if processes:
        grid(processes).save(os.path.splitext(args.output)[0] + "_process.png")
    print(f"wrote {len(images)} images to {args.output}")
    return 0
