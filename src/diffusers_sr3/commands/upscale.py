"""`sr3 upscale`: super-resolve image files, folders and globs, in seamless tiles when larger than the model."""

from __future__ import annotations

import argparse
import os
import uuid
from typing import List, Tuple

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..image_io import IMAGE_EXTENSIONS, find_images, open_image
from ..image_processing import grid, tensor_to_pil
from ..pipelines import SR3Pipeline
from ..pretrained import DEFAULT_STEPS
from ..tiling import model_tile_size, tiled_super_resolve
from .common import add_model_arguments, add_save_process_argument, load_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="output folder (or a file name for a single input)")
    add_model_arguments(parser, default_model="the x4 photo model that ships with the package")
    parser.add_argument("--batch-size", type=int, default=1, help="images (or tiles of a large image) refined together")
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="tile size at the output resolution for images larger than the model (default: the UNet's sample_size)",
    )
    parser.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in pixels (default: tile/4)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    add_save_process_argument(
        parser,
        "also write <name>_process.png: the condition and N noisy images along the refinement (default N: 8)",
    )


def _output_path(output: str, source: str, single: bool) -> str:
    if single and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS:
        return output
    return os.path.join(output, os.path.splitext(os.path.basename(source))[0] + "_sr.png")


def _check_destinations(writes: List[Tuple[str, str]], overwrite: bool) -> None:
    """Refuse, before any work, `(input, output)` writes to existing files (unless `overwrite`) or one file twice."""
    seen = {}
    for path, destination in writes:
        if destination in seen:
            raise ValueError(
                f"{seen[destination]} and {path} would both be written to {destination}; upscale them into "
                "separate --output folders"
            )
        seen[destination] = path
        if os.path.exists(destination) and not overwrite:
            raise FileExistsError(
                f"{destination} already exists; pass --overwrite to replace it, or choose another --output"
            )


def save_atomically(image: PIL.Image.Image, destination: str) -> None:
    """Write `image` to `destination` through a temporary file in the same folder, then rename it into place.

    An interrupted or failing write leaves `destination` as it was (absent, or the previous file), never a
    truncated image; the rename is atomic on one filesystem.
    """
    folder = os.path.dirname(destination) or "."
    os.makedirs(folder, exist_ok=True)
    extension = os.path.splitext(destination)[1].lower()
    image_format = PIL.Image.registered_extensions().get(extension, "PNG")
    # A fresh name beside the destination (same filesystem: the rename is atomic), created with the usual permissions.
    temporary = os.path.join(folder, f".{os.path.basename(destination)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "xb") as stream:
            image.save(stream, format=image_format)
        os.replace(temporary, destination)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _process_path(destination: str) -> str:
    return os.path.splitext(destination)[0] + "_process.png"


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
    paths = find_images(args.inputs)
    single = len(paths) == 1
    destinations = [_output_path(args.output, path, single) for path in paths]
    writes = list(zip(paths, destinations))
    if args.save_process:
        writes += [(path, _process_path(destination)) for path, destination in writes]
    _check_destinations(writes, args.overwrite)
    images = [open_image(path) for path in paths]  # read everything first: bad files fail before any work
    packaged = args.model is None
    pipeline = load_pipeline(args, SR3Pipeline)
    pipeline.set_progress_bar_config(leave=False)
    tile_size = args.tile_size or model_tile_size(pipeline)
    overlap = tile_size // 4 if args.tile_overlap is None else args.tile_overlap
    steps = args.steps or (DEFAULT_STEPS if packaged and not args.scheduler else 50)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with tqdm(total=len(paths), desc="upscaling", unit="image") as progress:
        for start, stop in _batches(images, args.batch_size):
            output = tiled_super_resolve(
                pipeline,
                images[start:stop],
                tile_size=tile_size,
                overlap=overlap,
                tile_batch_size=args.batch_size,
                num_inference_steps=steps,
                generator=generator,
                num_intermediates=args.save_process,
            )
            for offset, result in enumerate(output.images):
                path, destination = paths[start + offset], destinations[start + offset]
                save_atomically(result, destination)
                if args.save_process:
                    condition = tensor_to_pil(pipeline.prepare_condition(images[start + offset]))[0]
                    frames = [condition] + [snapshot[offset] for snapshot in output.intermediates]
                    save_atomically(grid([frames]), _process_path(destination))
                progress.write(f"{path} -> {destination} ({result.width}x{result.height})")
                progress.update(1)
    return 0
