"""Helpers shared by the subcommands: loading pipelines, choosing devices and dtypes.

Light at import (torch, Diffusers and the pipelines are imported where used): every command's parser uses it.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    Union,
)

from ..defaults import DTYPE_NAMES, SCHEDULER_CLASS_NAMES

# atomic_file lived here before: still imported from here by the commands and by others.
from ..file_writes import _already_exists, atomic_file  # noqa: F401

if TYPE_CHECKING:
    import torch

    from ..pipelines import SR3BasePipeline


class _Dtypes(Mapping):
    """`--dtype` name -> torch dtype, torch imported on first use."""

    def __getitem__(self, name: str) -> torch.dtype:
        import torch

        return getattr(torch, DTYPE_NAMES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(DTYPE_NAMES)

    def __len__(self) -> int:
        return len(DTYPE_NAMES)


DTYPES: Mapping[str, torch.dtype] = _Dtypes()


# The pipelines' arguments that their refusals name (`SR3Pipeline.check_arguments`, a cascade's for each stage), as
# the options of `sr3 upscale` and `sr3 sample` that give them.
PIPELINE_OPTIONS = {
    "num_inference_steps": "--steps",
    "eta": "--eta",
    "strength": "--strength",
    "guidance_scale": "--guidance-scale",
    "parallel_guidance_weight": "--parallel-guidance-weight",
    "window_size": "--window-size",
}


def __getattr__(name: str) -> Any:
    # Re-exported (they lived here before) on first use: image_io imports numpy and Pillow, which parsers do not need.
    if name in ("IMAGE_EXTENSIONS", "find_images"):
        from .. import image_io

        return getattr(image_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a step count of 0 would silently mean the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def per_stage(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: one value by `parse`, or a comma list of them, one per stage of a cascade (`0.6,,1`), where
    an empty entry keeps that stage's default (None).

    Args:
        parse: the argparse type of one value.
    """

    def parse_per_stage(text: str) -> Any:
        if "," not in text:
            return parse(text)
        return [parse(part) if part.strip() else None for part in text.split(",")]

    # Argparse names the type in its message for a ValueError: "invalid float value: 'x'".
    parse_per_stage.__name__ = getattr(parse, "__name__", "value")
    return parse_per_stage


def step_counts(text: str) -> Union[int, List[Optional[int]]]:
    """An argparse type: a step count of at least 1 (`at_least_one`), or a comma list of them, one per stage of a
    cascade (`100,50,25`; `100,,25` keeps the second stage's default)."""
    return per_stage(at_least_one)(text)


def whole_number(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (inclusive; no upper bound when None).

    Argparse names the option in front of the message, so an out-of-range value is refused before any work, not
    met later as an error of the code it reaches (a seed past 64 bits: "Overflow when unpacking long long")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


# What `torch.Generator.manual_seed` takes; image i of a run takes seed + i (`image_generators` checks the last).
SEED = whole_number(-(2**63), 2**64 - 1)


# The options (argparse dests) of the sr3 commands that name files or folders. Hub repo ids never start with `~`,
# so --model is one.
PATH_OPTIONS = frozenset(
    {"inputs", "output", "model", "json", "hr", "sr", "lr", "results", "checkpoint", "config", "path", "path_option"}
)


def expand_user_in_paths(parser: argparse.ArgumentParser) -> None:
    """Expand `~` in the values of `parser`'s `PATH_OPTIONS`: no shell does it in `--output=~/out`, a quoted
    "~/out" or on Windows, and the result would go to a folder named `~` in the current one.

    Args:
        parser: a command's parser, its arguments added.
    """
    for action in parser._actions:
        if action.dest in PATH_OPTIONS and action.type is None:
            action.type = os.path.expanduser


def add_model_arguments(
    parser: argparse.ArgumentParser,
    steps_help: str,
    default_model: Optional[str] = None,
    steps_type: Callable[[str], object] = at_least_one,
    seed_note: str = "",
) -> None:
    """--model (required unless `default_model` names a fallback), --variant, --scheduler, --steps (`steps_help`,
    parsed by `steps_type`), --seed (its help says where the command shows an image's seed: `seed_note`, such as
    " (shown in ...)"), --device, --dtype."""
    if default_model:
        parser.add_argument(
            "--model", help=f"pipeline folder, Hub repo id, or sr3-photos-x4 (default: {default_model})"
        )
    else:
        # Only `sr3 sample` asks for a model, which the packaged super-resolution model is not.
        parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument(
        "--variant",
        default=None,
        help="weights variant to load, e.g. fp16 (saved with save_pretrained(variant=...)); a network without it "
        "loads its main weights (default: the main weights)",
    )
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULER_CLASS_NAMES), help="sampler to use instead of the saved one"
    )
    parser.add_argument(
        "--steps",
        type=steps_type,
        default=None,
        help=steps_help,
    )
    parser.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help=f"random seed: image i of the run draws from seed + i{seed_note}, and a run of that image alone with "
        "that seed reproduces it; the draws do not depend on --batch-size, but the batched network can change a "
        "pixel by a rounding step: use the same --batch-size and thread count where runs must match bit for bit",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="network precision")


def add_save_process_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--save-process [N]`: also write N snapshots along the refinement (8 when N is omitted, 0 = off)."""
    parser.add_argument(
        "--save-process", type=whole_number(0), nargs="?", const=8, default=0, metavar="N", help=help_text
    )


def image_generators(seed: int, start: int, stop: int) -> List[torch.Generator]:
    """One CPU generator per image of a run's batch (images `start` to `stop`), image `i` seeded with `seed + i`.

    The pipelines draw each image's noise from its own generator of a list, so an image's noise is the same whatever
    `--batch-size` puts beside it, and the same as that image's run alone with seed `seed + i`. The result may still
    differ by a rounding step in a pixel: the network's batched forward does not round as its single passes do.

    Args:
        seed: the run's `--seed`.
        start: the index in the run of the batch's first image.
        stop: the index after the batch's last image.
    """
    import torch

    if seed + stop - 1 > 2**64 - 1:
        raise ValueError(
            f"--seed {seed} + image {stop - 1} is beyond 2**64 - 1, the largest seed: choose a smaller one"
        )
    return [torch.Generator("cpu").manual_seed(seed + index) for index in range(start, stop)]


class ModelOutOfMemoryError(MemoryError):
    """Loading a model ran out of memory: the model is too large for this machine, whatever the images."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch running out of accelerator memory (CUDA, MPS), the CPU allocator failing or Python's
    MemoryError."""
    import torch  # here, not at the top: this module stays light, and a Ctrl-C while torch loads is caught in `main`

    if isinstance(error, MemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message
    )


def load_pipeline(
    args: argparse.Namespace, expected: Optional[Union[Type, Tuple[Type, ...]]] = None
) -> SR3BasePipeline:
    """Load `args.model` with the requested scheduler, device and dtype; refuse one that is not of the `expected`
    class (or of one of a tuple of classes).

    Raises:
        ModelOutOfMemoryError: the model does not fit this machine's memory (on `args.device`).
    """
    try:
        return _load_pipeline(args, expected)
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        cause = f" ({error})" if str(error) else ""
        raise ModelOutOfMemoryError(
            f"{args.model} needs more memory than there is on this machine to load{cause}"
        ) from None


def check_dtype_runs(args: argparse.Namespace) -> None:
    """Refuse `--dtype bf16` on `args.device` where torch cannot run bfloat16 there (`check_bfloat16_runs`)."""
    import torch

    from ..backends import check_bfloat16_runs, resolve_device

    if DTYPES[args.dtype] == torch.bfloat16:
        check_bfloat16_runs(resolve_device(args.device), f"--dtype {args.dtype}", "--dtype float32")


def _load_pipeline(args: argparse.Namespace, expected: Optional[Union[Type, Tuple[Type, ...]]]) -> SR3BasePipeline:
    """`load_pipeline`, out-of-memory errors as they come."""
    from ..backends import resolve_device
    from ..noise import swap_scheduler
    from ..pipelines import SR3BasePipeline, SR3CascadePipeline
    from ..pipelines.base import VariantOnlyError

    device = resolve_device(args.device)
    check_dtype_runs(args)
    if args.model is None:
        from ..pretrained import default_model_path

        args.model = default_model_path()
    try:
        pipeline = SR3BasePipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], variant=args.variant)
    except VariantOnlyError as error:
        raise VariantOnlyError(error.path, error.variants, "--variant {}") from None
    if expected is not None and not isinstance(pipeline, expected):
        names = " or ".join(kind.__name__ for kind in (expected if isinstance(expected, tuple) else (expected,)))
        raise ValueError(f"{args.model} holds a {type(pipeline).__name__}; this command needs a {names}")
    if args.scheduler:
        # A cascade has no scheduler of its own: each of its pipelines has one.
        parts = [pipeline.base, *pipeline.stages] if isinstance(pipeline, SR3CascadePipeline) else [pipeline]
        for part in parts:
            if part is not None:
                part.scheduler = swap_scheduler(part.scheduler, args.scheduler)
    # Diffusers warns, once per network, that float16 on the CPU "will fail"; SR3's networks run there (slowly),
    # within 1/255 of float32.
    return pipeline.to(device, silence_dtype_warnings=True)


def destination_clash(writes: Iterable[Tuple[str, str]]) -> Optional[str]:
    """Why two of the `(input, output)` writes would end in one file, or None.

    Names that differ only in case (a.png, A.png) count as one file on every platform: they are one on the
    case-insensitive filesystems of macOS and Windows, where one result would replace the other.
    """
    seen: dict = {}
    for path, destination in writes:
        # lower(), not casefold(): those file systems keep ß and ss apart.
        key = os.path.normcase(destination).lower()
        if key in seen:
            first, written = seen[key]
            if written == destination:
                return f"{first} and {path} would both be written to {destination}"
            return (
                f"{first} and {path} would be written to {written} and {destination}, one file on "
                "case-insensitive filesystems (macOS, Windows)"
            )
        seen[key] = (path, destination)
    return None


def check_destinations(writes: List[Tuple[str, str]], overwrite: bool) -> None:
    """Refuse, before any work, `(input, output)` writes to existing files (unless `overwrite`) or one file twice
    (also under names that differ only in case: see `destination_clash`)."""
    clash = destination_clash(writes)
    if clash is not None:
        raise ValueError(f"{clash}; write them into separate --output folders")
    for _, destination in writes:
        # lexists: a dangling symlink there is refused now, as putting the result in place would refuse it later.
        if os.path.lexists(destination) and not overwrite:
            raise _already_exists(destination)


def nearest_entry(folder: str) -> str:
    """The absolute path of `folder`, or of the nearest folder above it, that is there: a dangling symbolic link
    counts, so that it can be named (a walk that follows links would pass over it). At worst the root."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def not_a_folder(path: str) -> str:
    """Why `path`, there but not a folder, cannot hold a file: a file, or a link to nothing."""
    return f"{path} is a file, not a folder" if os.path.exists(path) else f"{path} is a link to nothing"


def check_file_destination(path: str, option: str, example: str) -> None:
    """Refuse, before any work, a file destination (`option`'s value) that is a folder, lies below a file or a
    dangling link, or in a folder without write access. Missing folders are fine: they are created when the file is
    written."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; give a file name such as {os.path.join(path, example)}")
    parent = nearest_entry(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path} cannot be written: {not_a_folder(parent)}")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path} cannot be written: {parent} is not a writable folder")


def options_given(args: argparse.Namespace) -> List[str]:
    """The `PIPELINE_OPTIONS` arguments whose options the command line gave (`--guidance-scale`: guidance_scale)."""
    return [
        name
        for name, option in PIPELINE_OPTIONS.items()
        if vars(args).get(option.lstrip("-").replace("-", "_")) is not None
    ]


def in_option_words(error: ValueError, given: Iterable[str]) -> ValueError:
    """`error`, a pipeline's refusal of its arguments, naming the command's options where it names the arguments
    `given` (`window_size 3 ...` as `--window-size 3 ...`), as the commands' own checks word their refusals.

    Args:
        error: the refusal.
        given: the `PIPELINE_OPTIONS` arguments whose values came from the command line: a value the model saved
            (its `detail_steps`) is none of the command line's, and keeps the pipeline's name.
    """
    text = str(error)
    for name in set(given) & set(PIPELINE_OPTIONS):
        # Where the refusal names the value; later mentions are prose ("give more steps at this strength").
        text = re.sub(rf"\b{name}\b", PIPELINE_OPTIONS[name], text, count=1)
    return ValueError(text)
