"""`sr3 sample`: generate images with an unconditional pipeline, written as a grid."""

from __future__ import annotations

import argparse
import math
import os

import torch

from ..image_processing import grid
from ..pipelines import SR3UnconditionalPipeline
from .common import add_model_arguments, load_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-n", "--num-images", type=int, default=16, help="number of images")
    parser.add_argument("--output", required=True, help="grid image file (PNG)")
    parser.add_argument("--batch-size", type=int, default=4, help="images generated together")
    parser.add_argument("--size", type=int, default=None, help="output size (default: the model's)")


def run(args: argparse.Namespace) -> int:
    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1")
    pipeline = load_pipeline(args, SR3UnconditionalPipeline)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    images = []
    while len(images) < args.num_images:
        count = min(args.batch_size, args.num_images - len(images))
        images += pipeline(
            batch_size=count,
            num_inference_steps=args.steps or 100,
            generator=generator,
            height=args.size,
            width=args.size,
        ).images
    columns = math.ceil(math.sqrt(len(images)))
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    grid(rows).save(args.output)
    print(f"wrote {len(images)} images to {args.output}")
    return 0
