"""`sr3 convert`: original SR3 checkpoint + JSON config -> pipeline folder."""

from __future__ import annotations

import argparse
import os
import re
from typing import List

from ..convert import convert_original_checkpoint
from ..image_io import IMAGE_EXTENSIONS
from ..model_card import images_shown

# Written by training beside the pipeline it saves (`training.trainer.SUMMARY_FILE`; importing it loads accelerate).
_TRAINING_SUMMARY = "training_summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the original I{iter}_E{epoch}_gen.pth file")
    parser.add_argument("--config", required=True, help="the original JSON config it was trained with")
    parser.add_argument("--output", required=True, help="folder to write the pipeline to")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a pipeline already in --output; once the conversion has succeeded, the files describing the "
        "replaced model are removed too (its model card README.md, the pictures the card shows and "
        "training_summary.json); other files are kept. A folder holding training checkpoints (checkpoint-*) is "
        "always refused",
    )


def _check_output(output: str, overwrite: bool) -> List[str]:
    """Refuse, before loading anything, an --output that cannot become the pipeline's folder: empty, a file or below
    one, a training run's folder (its checkpoints are never touched), or one holding a pipeline without `overwrite`.

    Returns:
        The files of the pipeline being replaced that describe it (paths relative to `output`): its model card, the
        pictures the card shows inside `output` and the training summary, to remove once the conversion succeeded.
    """
    if not output:
        raise ValueError("--output is empty: give the folder to write the pipeline to")
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output {output} is a file, not a folder")
    existing = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"--output {output} cannot be created: {existing} is a file")
    if not os.path.isdir(output):
        return []
    checkpoints = sorted(
        name
        for name in os.listdir(output)
        if re.fullmatch(r"checkpoint-\d+", name) and os.path.isdir(os.path.join(output, name))
    )
    if checkpoints:
        raise FileExistsError(
            f"{output} holds training checkpoints ({', '.join(checkpoints)}): it is a training run's folder; write "
            "the converted pipeline to another --output"
        )
    if not os.path.isfile(os.path.join(output, "model_index.json")):
        return []
    if not overwrite:
        raise FileExistsError(f"{output} already holds a pipeline; pass --overwrite to replace it")
    described = [name for name in ("README.md", _TRAINING_SUMMARY) if os.path.isfile(os.path.join(output, name))]
    if "README.md" in described:
        # Pictures only, and only inside the folder: a card may also link files that are not its own.
        inside = os.path.realpath(output) + os.sep
        described += {
            os.path.normpath(image)  # one file, however the card spells its path (`./a.png`, `a.png`)
            for image in images_shown(output)
            if image.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.realpath(os.path.join(output, image)).startswith(inside)
        }
    return sorted(described)


def run(args: argparse.Namespace) -> int:
    replaced_description = _check_output(args.output, args.overwrite)
    pipeline = convert_original_checkpoint(args.checkpoint, args.config, args.output)
    # Only now that the new pipeline is saved: a failed conversion leaves the folder as it was.
    for name in replaced_description:
        os.remove(os.path.join(args.output, name))
    parameters = sum(p.numel() for p in pipeline.unet.parameters())
    print(f"wrote {type(pipeline).__name__} ({parameters:,} parameters) to {args.output}")
    if replaced_description:
        print(f"removed {', '.join(replaced_description)}: they described the replaced model")
    return 0
