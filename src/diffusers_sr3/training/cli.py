"""The command line of the example training scripts: options generated from `TrainingConfig`, clear errors."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import textwrap
import warnings
from typing import Iterator, List, Optional, TextIO

from ..cli import as_console, console_streams, printable_file_names, readers_may_leave
from ..interrupts import Terminated, sigterm_as_interrupt
from ..redaction import install_log_redaction, redact
from .config import add_training_arguments, config_from_args
from .hub import HubUploadError

# As `sr3`'s (README's "Exit status and output streams"), in --help.
EXIT_STATUS = textwrap.fill(
    "Exit status: 0 done; 2 bad options, data or files, said in one line on stderr; 1 the run finished and saved, "
    "but the Hub upload failed; 130 Ctrl-C and 143 SIGTERM, both saying where to resume from; a traceback only for "
    "a bug. Logs, progress bars and warnings go to stderr; a reader of the output that goes away (| head) does not "
    "stop the training.",
    width=78,
)


def main(argv: Optional[List[str]] = None, task: str = "sr", description: str = "", prog: Optional[str] = None) -> int:
    """Parse `argv`, train, return the exit status (2: bad options or data; 1: the Hub upload failed; 130: stopped
    with Ctrl-C, saying where to resume from, also while the trainer is imported; 143: stopped by SIGTERM, likewise).
    Paths print whatever the console's encoding (`diffusers_sr3.cli.printable_file_names`); a reader of the output
    that goes away (`| head`) does not stop the training (`diffusers_sr3.cli.readers_may_leave`)."""
    with printable_file_names(), readers_may_leave():
        return _main(argv, task, description, prog)


def _main(argv: Optional[List[str]], task: str, description: str, prog: Optional[str]) -> int:
    """`main` with the console's streams made to print any path."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # At INFO, Accelerate logs each of the five files of every checkpoint, under the temporary folder that is then
    # renamed; the trainer's own line names the checkpoint. Its warnings still show.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    install_log_redaction()
    try:
        config = config_from_args(args, task=task)
        try:
            # Imported once the options are checked: `--help` and bad options answer without the seconds that
            # torch, Diffusers and Accelerate take to load.
            from .trainer import train
        except KeyboardInterrupt:
            # Nothing ran yet, so there is nothing to resume (and the checkpoint listing would import torch again).
            print(f"{parser.prog}: interrupted", file=sys.stderr)
            return 130
        from safetensors import SafetensorError  # loaded with the trainer: no start-up cost

        try:
            with sigterm_as_interrupt(), _print_above_progress_bars():
                train(config)
        except SafetensorError as error:
            # An I/O error (a full disk) that safetensors does not raise as one.
            raise OSError(str(error)) from None
    except HubUploadError as error:
        print(f"{parser.prog}: error: {redact(str(error))}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as error:
        # One line, without the usage: the options parsed, so what is wrong is a value, a file or the data.
        print(f"{parser.prog}: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # On a line of its own: the progress bar of the interrupted run still holds the cursor.
        print(f"\n{parser.prog}: interrupted; {_where_to_resume(args.output_dir)}", file=sys.stderr)
        # The shell's status of a process ended by the signal (128 + its number), which schedulers look for.
        return 128 + signal.SIGTERM if isinstance(interrupt, Terminated) else 130
    return 0


class _AboveProgressBars:
    """A console stream whose writes go through `tqdm.write`: above the progress bars showing, not into their line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _print_above_progress_bars() -> Iterator[None]:
    """While the block runs, print the console's log lines and Python's warnings above the steps bar, not appended
    to its line: the console handlers of the root logger and of Diffusers' (which does not propagate) write through
    `tqdm.write`, keeping their level, formatter and filters, and so do warnings while Python's own printer shows
    them. A program that logs to files only, or shows warnings its own way, prints nothing new."""
    consoles = console_streams()
    # Once each: a handler on both loggers would otherwise be given back the wrapper it was given.
    handlers = list(
        dict.fromkeys(
            handler
            for logger in (logging.getLogger(), logging.getLogger("diffusers"))
            for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and handler.stream in consoles
        )
    )
    streams = [handler.setStream(_AboveProgressBars(as_console(handler.stream))) for handler in handlers]
    show_warning = warnings.showwarning

    def show_above_progress_bars(message, category, filename, lineno, file=None, line=None) -> None:
        file = sys.stderr if file is None else file
        if file is not None:  # no console (pythonw): Python's own printer shows nothing either
            _AboveProgressBars(file).write(warnings.formatwarning(message, category, filename, lineno, line))

    # Replaced only where it is Python's own: `logging.captureWarnings` already sends them through the handlers.
    replace_warnings = show_warning is getattr(warnings, "_showwarning_orig", None)
    if replace_warnings:
        warnings.showwarning = show_above_progress_bars
    try:
        yield
    finally:
        if replace_warnings and warnings.showwarning is show_above_progress_bars:
            warnings.showwarning = show_warning
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)


def _where_to_resume(output_dir: str) -> str:
    """One sentence on the newest complete checkpoint in `output_dir`: what an interrupted run goes on from."""
    from .checkpointing import list_checkpoints

    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return f"{output_dir} holds no complete checkpoint yet, so a new run starts over (see --checkpointing_steps)"
    return f"the last complete checkpoint is {checkpoints[-1]}: go on from it with --resume_from_checkpoint latest"
