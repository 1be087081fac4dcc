"""The `sr3` command line (also `python -m diffusers_sr3`). Each subcommand lives in `diffusers_sr3.commands`.

The subcommand modules are light to import (torch, Diffusers and the pipelines are imported by their `run`), so
`--help` and argument errors print at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import textwrap
from typing import Iterator, List, Optional, Tuple

from .commands.common import ModelOutOfMemoryError, expand_user_in_paths, is_out_of_memory
from .interrupts import Terminated, sigterm_as_interrupt

# Subcommand name -> module in diffusers_sr3.commands with `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "convert": "Convert an original SR3 checkpoint (+ its JSON config) into a pipeline folder.",
    "upscale": "Super-resolve image files, folders or globs with an SR3 pipeline.",
    "sample": "Generate images with an unconditional SR3 pipeline.",
    "prepare": "Resize a folder of images into the original's lr_<M>/hr_<N>/sr_<M>_<N> layout, LMDB or parquet.",
    "demo": "Train a small SR3 model on packaged photos (CPU, minutes) and compare it with bicubic on held-out ones.",
    "eval": "PSNR/SSIM (as the original computes them), consistency and FID of super-resolved images.",
}


# What scripts may rely on, in every command's --help (README's "Exit status and output streams" says it at length).
EXIT_STATUS = (
    "Exit status: 0 done; 2 bad options or input (a missing or unreadable file, a model of another kind, an option "
    "the model refuses, a busy or full output folder, out of memory), said in one line on stderr, with nothing "
    "half-written left behind; 130 Ctrl-C; 143 SIGTERM; a traceback only for a bug. Results and the files written "
    "go to stdout; progress bars, notes and errors to stderr. A reader that stops reading (| head) ends no run."
)

# How each command that reads many inputs treats one it cannot read.
UNREADABLE_INPUTS = {
    "upscale": "Every input is read before the model loads: one that cannot be read stops the run with status 2, "
    "naming it, before any image is written.",
    "eval": "An image that cannot be read stops the run with status 2, naming it; --json is not written.",
    "prepare": "Unreadable files are skipped: each is named on stderr, the summary counts them, OUT/.sr3_prepare.json "
    "lists them, and the run exits 0 (a source where no image can be read exits 2).",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sr3", description="SR3 super-resolution on Hugging Face Diffusers.", epilog=EXIT_STATUS
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"diffusers_sr3.commands.{name}")
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        # Filled here, after the command's own epilog: a command whose help keeps its line breaks keeps these too.
        exit_status = textwrap.fill(" ".join(filter(None, [UNREADABLE_INPUTS.get(name), EXIT_STATUS])), width=78)
        subparser.epilog = "\n\n".join(filter(None, [subparser.epilog, exit_status]))
        expand_user_in_paths(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of `parser`'s subcommand `command`."""
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command]


def _safetensors_error(error: Exception) -> bool:
    """Whether `error` is safetensors' SafetensorError (a full or read-only disk while weights are saved, a damaged
    weights file), which subclasses Exception only."""
    # Not imported here: raised, it is already loaded; not raised, the start stays free of it.
    safetensors = sys.modules.get("safetensors")
    return safetensors is not None and isinstance(error, safetensors.SafetensorError)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _memory_hint(args: argparse.Namespace) -> str:
    """What to lower when a command runs out of memory."""
    if hasattr(args, "max_tile_pixels"):  # sr3 upscale: the tile budget bounds each network evaluation, no more
        from .commands.upscale import BYTES_PER_OUTPUT_PIXEL

        fewer = "one image at a time (--batch-size 1) or " if getattr(args, "batch_size", 1) > 1 else ""
        return (
            f"the full-size images take about {BYTES_PER_OUTPUT_PIXEL} bytes per output pixel whatever the tiles "
            f"(twice that with detail mode's windows): upscale {fewer}smaller images; --max-tile-pixels lowers the "
            "network's activations"
        )
    if hasattr(args, "batch_size"):
        return "lower --batch-size or the image size"
    return "use smaller images"


@contextlib.contextmanager
def printable_file_names() -> Iterator[None]:
    """Let sys.stdout and sys.stderr print any text, in their encoding, while the block runs.

    A console or redirected output whose encoding lacks a file name's characters (cp1252 on Windows, for `写真.png`),
    or a name's undecodable bytes (kept by Python as surrogates), would otherwise stop a run part-way on a line that
    only reports progress: those characters print as backslash escapes instead. Only strict streams change (a POSIX
    locale's `surrogateescape` already writes a name's own bytes), and their handler comes back afterwards, so a
    caller's streams (pytest's captures, a notebook's) are left as they were.
    """
    restore = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and not stream.closed and stream.errors == "strict":
            restore.append((stream, stream.errors))
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        for stream, errors in restore:
            if not stream.closed:
                stream.reconfigure(errors=errors)


class _ReaderMayLeave:
    """A console stream that drops what it is given once its reader has gone, as `sr3 ... | head -1` does.

    The commands' results are files and their output is a log (`sr3 eval` writes its table last): a reader that
    stops reading must not stop the work part-way, nor turn into an error. Everything else is the stream's own.
    """

    def __init__(self, stream: io.TextIOBase) -> None:
        self._stream = stream
        self.reader_left = False

    def write(self, text: str) -> int:
        if not self.reader_left:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop_from_now_on()
        return len(text)

    def flush(self) -> None:
        if not self.reader_left:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop_from_now_on()

    def _drop_from_now_on(self) -> None:
        self.reader_left = True
        # The interpreter flushes the stream's buffer once more as it exits, which would print "Exception ignored
        # ... BrokenPipeError" and exit 120: on the null device that flush succeeds.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def console_streams() -> Tuple[object, ...]:
    """The streams that are the console: sys.stdout and sys.stderr, the ones `readers_may_leave` wraps (which a log
    handler set up before it still holds), and the interpreter's own."""
    current = (sys.stdout, sys.stderr)
    wrapped = tuple(stream._stream for stream in current if isinstance(stream, _ReaderMayLeave))
    return current + wrapped + (sys.__stdout__, sys.__stderr__)


def as_console(stream: object) -> object:
    """`stream`, or sys.stdout or sys.stderr where `readers_may_leave` wraps it: what the progress bars write to."""
    for console in (sys.stdout, sys.stderr):
        if isinstance(console, _ReaderMayLeave) and console._stream is stream:
            return console
    return stream


@contextlib.contextmanager
def readers_may_leave() -> Iterator[None]:
    """While the block runs, sys.stdout and sys.stderr drop their output, without an error, once the program
    reading them has gone ([`_ReaderMayLeave`]); they are put back afterwards."""
    streams = sys.stdout, sys.stderr
    wrapped = [None if stream is None else _ReaderMayLeave(stream) for stream in streams]
    sys.stdout, sys.stderr = wrapped
    try:
        yield
    finally:
        try:
            # What is still buffered goes out now: a reader that has gone is found while its loss is still handled.
            for stream in wrapped:
                if stream is not None:
                    stream.flush()
        finally:
            sys.stdout, sys.stderr = streams
            _give_log_handlers_their_streams_back(wrapped)


def _give_log_handlers_their_streams_back(wrapped: List[Optional[_ReaderMayLeave]]) -> None:
    """Log handlers set up while the block ran (the training scripts' `logging.basicConfig`, Diffusers' handler where
    it was first imported there) took the wrappers as their stream: given theirs back, a handler outlives the block
    writing to the console, where a later run finds it (`console_streams`), not through a wrapper of a run that
    ended."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # a placeholder for a logger's children has none
            if isinstance(handler, logging.StreamHandler) and any(handler.stream is stream for stream in wrapped):
                handler.setStream(handler.stream._stream)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message for bad input, 130 when
    interrupted, also while the subcommands are imported or their `run` imports torch and the pipelines, 143 when
    terminated by SIGTERM, which gets Ctrl-C's cleanup). File names print whatever the console's encoding
    (`printable_file_names`); a reader of the output that goes away (`| head -1`) is no error
    (`readers_may_leave`): the command finishes its work and its status is its own."""
    with printable_file_names(), readers_may_leave(), sigterm_as_interrupt():
        return _main(argv)


def _main(argv: Optional[List[str]]) -> int:
    """`main` with SIGTERM's handler in place: parse `argv`, run the subcommand, report its errors."""
    prog = "sr3"
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # told by the subcommand's parser: its usage, and `sr3 <command>: error:` as every other error
            _subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
        prog = f"sr3 {args.command}"
        try:
            return int(args.run(args) or 0)
        except (ValueError, OSError, ImportError) as error:
            # OSError: unwritable or full outputs, and the EnvironmentError (several lines, joined) that Diffusers
            # raises for a damaged model folder.
            print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
            return 2
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            if isinstance(error, ModelOutOfMemoryError):  # smaller images would not help
                print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
            else:
                print(f"{prog}: error: out of memory; {_memory_hint(args)} ({_one_line(error)})", file=sys.stderr)
            return 2
        except Exception as error:
            if not _safetensors_error(error):
                raise
            print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
            return 2
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, Terminated):
            print(f"{prog}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
