"""Helpers shared by the subcommands: loading pipelines, choosing devices and dtypes, finding images."""

from __future__ import annotations

import argparse
import glob
import os
from typing import List, Optional

import torch

from ..noise import SCHEDULERS, swap_scheduler
from ..pipelines import SR3BasePipeline

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def add_model_arguments(parser: argparse.ArgumentParser, default_model: Optional[str] = None) -> None:
    """--model (required unless `default_model` names a fallback), --scheduler, --steps, --seed, --device, --dtype."""
    if default_model:
        parser.add_argument("--model", help=f"pipeline folder or Hub repo id (default: {default_model})")
    else:
        parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler to use instead of the saved one")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="refinement steps (default: 50; 10 with the packaged model and its sampler)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="network precision")


def add_save_process_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--save-process [N]`: also write N snapshots along the refinement (8 when N is omitted, 0 = off)."""
    parser.add_argument("--save-process", type=int, nargs="?", const=8, default=0, metavar="N", help=help_text)


def load_pipeline(args: argparse.Namespace, expected: Optional[type] = None) -> SR3BasePipeline:
    """Load `args.model` with the requested scheduler, device and dtype."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is None:
        from ..pretrained import default_model_path

        args.model = default_model_path()
    pipeline = SR3BasePipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    if expected is not None and not isinstance(pipeline, expected):
        raise ValueError(f"{args.model} holds a {type(pipeline).__name__}; this command needs a {expected.__name__}")
    if args.scheduler:
        pipeline.scheduler = swap_scheduler(pipeline.scheduler, args.scheduler)
    return pipeline.to(device)


def find_images(inputs: List[str]) -> List[str]:
    """Expand files, folders (recursively) and glob patterns into a sorted list of image files."""
    found: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in os.walk(item):
                found.extend(os.path.join(root, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found.append(item)
        else:
            matches = [path for path in glob.glob(item, recursive=True) if os.path.isfile(path)]
            if not matches:
                raise FileNotFoundError(f"no such file, folder or matching glob: {item}")
            found.extend(matches)
    if not found:
        raise FileNotFoundError(f"no images found in {' '.join(inputs)}")
    return sorted(dict.fromkeys(found))
