"""`sr3 convert`: original SR3 checkpoint + JSON config -> pipeline folder."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Any, Dict, List, Optional, Set, Tuple

from .common import DTYPES

# Written by training beside the pipeline it saves (`training.trainer.SUMMARY_FILE`; importing it loads accelerate).
_TRAINING_SUMMARY = "training_summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="the original I{iter}_E{epoch}_gen.pth file (or its stem, as the original config's resume_state names it)",
    )
    parser.add_argument("--config", required=True, help="the original JSON config it was trained with")
    parser.add_argument("--output", required=True, help="folder to write the pipeline to")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a pipeline already in --output; once the conversion has succeeded, the rest of the replaced "
        "model is removed too: its other variants' weights (e.g. fp16), its components the new one lacks (a "
        "cascade's stages, a guidance UNet), its model card README.md, the pictures the card shows and "
        "training_summary.json; other files are kept. A folder holding training checkpoints (checkpoint-*) is "
        "always refused",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="save the weights as this variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors; load it with "
        "--variant fp16); default: the main weights",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="precision to save the weights in (default float32, the original's; the noise-level embeddings stay "
        "float32, as from_pretrained(torch_dtype=...) loads them)",
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
        from ..image_io import IMAGE_EXTENSIONS
        from ..model_card import images_shown

        # Pictures only, and only inside the folder: a card may also link files that are not its own.
        inside = os.path.realpath(output) + os.sep
        described += {
            os.path.normpath(image)  # one file, however the card spells its path (`./a.png`, `a.png`)
            for image in images_shown(output)
            if image.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.realpath(os.path.join(output, image)).startswith(inside)
        }
    return sorted(described)


def _component_names(index: Dict[str, Any]) -> Set[str]:
    """The components (subfolders) that a model_index.json, or a pipeline's config, names."""
    return {
        name
        for name, value in index.items()
        # Plain folder names only: each is deleted, and the index is a file anyone may have edited.
        if not name.startswith("_")
        and isinstance(value, (list, tuple))
        and any(part is not None for part in value)
        and name not in (".", "..")
        and os.path.basename(name) == name
    }


def _check_removable(output: str, described: List[str], components: Set[str]) -> None:
    """Raise PermissionError naming a folder of `output` that a conversion replacing its pipeline would remove files
    from, once saved, and cannot: the replaced model's `described` files (its card, the pictures it shows) and its
    `components` that the new pipeline lacks. Checked before the save, as the save checks the folders it writes: a
    read-only one (a model copied from a read-only place) failed the command after the new pipeline was in place,
    naming only a file, with the replaced model's files left beside it."""
    from ..pipelines.base import _check_folders_writable, _files_under

    files = [path.replace(os.sep, "/") for path in described]
    for name in sorted(components):
        folder = os.path.join(output, name)
        if os.path.isdir(folder) and not os.path.islink(folder):  # a link is left, as `_remove_replaced_model` does
            files += [f"{name}/{path}" for path in _files_under(folder)]
    _check_folders_writable(output, files)


def _pipeline_layout(output: str) -> Tuple[Set[str], Optional[str]]:
    """The components (subfolders) that `output`'s model_index.json names, and the pipeline's re-export module
    (`pipeline_sr3*.py`, or None); nothing from an unreadable index."""
    from ..pipelines.base import REMOTE_CODE_STEMS

    try:
        with open(os.path.join(output, "model_index.json"), encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return set(), None
    if not isinstance(index, dict):
        return set(), None
    components = _component_names(index)
    class_name = index.get("_class_name")
    module = class_name[0] if isinstance(class_name, list) and len(class_name) == 2 else None
    return components, f"{module}.py" if module in REMOTE_CODE_STEMS.values() else None


def _remove_replaced_model(
    output: str, components: Set[str], module: Optional[str], variant: Optional[str] = None
) -> List[str]:
    """Remove from `output`, just written by a conversion, what remains of the pipeline it replaced (`components`
    and `module` from its model_index.json): its components the new pipeline lacks, its re-export module if the new
    one has another, and the weights of every variant but `variant` (the one the conversion wrote; None: the main
    weights) in the new pipeline's components (`save_pretrained` keeps other variants', which would load the replaced
    model).

    Returns:
        What was removed, as paths relative to `output` (folders ending with `/`).
    """
    from ..pipelines.base import weight_file_variant

    new_components, new_module = _pipeline_layout(output)
    removed = []
    for name in sorted(components - new_components):
        path = os.path.join(output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(f"{name}/")
    if module not in (None, new_module) and os.path.isfile(os.path.join(output, module)):
        os.remove(os.path.join(output, module))
        removed.append(module)
    for name in sorted(new_components):
        folder = os.path.join(output, name)
        for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            is_weights, entry_variant = weight_file_variant(entry)
            if is_weights and entry_variant != variant:
                os.remove(os.path.join(folder, entry))
                removed.append(f"{name}/{entry}")
    return sorted(removed)


def _save_error(output: str, error: Exception) -> OSError:
    """The one-line error when the converted pipeline cannot be written (a full or read-only disk), naming `output`:
    safetensors' error names no file."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return OSError(f"cannot write the converted pipeline in {output}: {reason}")


def run(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError

    from ..convert import checkpoint_file, convert_original_checkpoint

    if args.variant is not None and not args.variant:
        raise ValueError("--variant is empty: give a variant name such as fp16, or leave the option out")
    if args.variant is not None and any(character in args.variant for character in "./\\"):
        # Loaders read the variant between the dots of diffusion_pytorch_model.<variant>.safetensors.
        raise ValueError(f"--variant {args.variant}: a variant name cannot hold '.', '/' or '\\'")
    replaced_description = _check_output(args.output, args.overwrite)
    checkpoint = checkpoint_file(args.checkpoint)
    if checkpoint != args.checkpoint:
        print(f"note: converting {checkpoint} (the checkpoint of --checkpoint {args.checkpoint})", file=sys.stderr)
    # `_check_output` let a pipeline in --output through only with --overwrite: this conversion replaces it.
    replacing = os.path.isfile(os.path.join(args.output, "model_index.json"))
    replaced_layout = _pipeline_layout(args.output) if replacing else None
    pipeline = convert_original_checkpoint(checkpoint, args.config, dtype=DTYPES[args.dtype] if args.dtype else None)
    if replacing:
        _check_removable(args.output, replaced_description, replaced_layout[0] - _component_names(pipeline.config))
    try:
        pipeline.save_pretrained(args.output, variant=args.variant)
    except (OSError, SafetensorError) as error:
        raise _save_error(args.output, error) from None
    # Only now that the new pipeline is saved: a failed conversion leaves the folder as it was.
    for name in replaced_description:
        os.remove(os.path.join(args.output, name))
    replaced_files = _remove_replaced_model(args.output, *replaced_layout, args.variant) if replacing else []
    parameters = sum(p.numel() for p in pipeline.unet.parameters())
    print(f"wrote {type(pipeline).__name__} ({parameters:,} parameters) to {args.output}")
    if replaced_description:
        print(f"removed {', '.join(replaced_description)}: they described the replaced model")
    if replaced_files:
        print(f"removed {', '.join(replaced_files)}: the replaced model's, which the new one does not have")
    return 0
