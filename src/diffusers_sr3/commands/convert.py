"""`sr3 convert`: original SR3 checkpoint + JSON config -> pipeline folder."""

from __future__ import annotations

import argparse
import os

from ..convert import convert_original_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the original I{iter}_E{epoch}_gen.pth file")
    parser.add_argument("--config", required=True, help="the original JSON config it was trained with")
    parser.add_argument("--output", required=True, help="folder to write the pipeline to")
    parser.add_argument("--overwrite", action="store_true", help="replace a pipeline already in --output")


def run(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.output, "model_index.json")) and not args.overwrite:
        raise FileExistsError(f"{args.output} already holds a pipeline; pass --overwrite to replace it")
    pipeline = convert_original_checkpoint(args.checkpoint, args.config, args.output)
    parameters = sum(p.numel() for p in pipeline.unet.parameters())
    print(f"wrote {type(pipeline).__name__} ({parameters:,} parameters) to {args.output}")
    return 0
