"""What scripts rely on from `sr3` and the training scripts: the exit status in every command's --help, results on
stdout and notes on stderr, a reader that goes away (`| head -1`) ending no run, Ctrl-C's 130 in a real process."""

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import tiny_unet_config

from diffusers_sr3.cli import COMMANDS, build_parser, main, readers_may_leave
from diffusers_sr3.training import cli as training_cli

REPO = Path(__file__).resolve().parents[1]


def write_images(folder, count, size, seed=0, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 250, (size, size, 3), dtype=np.uint8) + shift
        PIL.Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.fixture
def model_dir(tiny_pipeline, tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline.save_pretrained(folder)
    return folder


def stdout_into_a_closed_pipe(monkeypatch):
    """sys.stdout as a pipe whose reader has gone, as `sr3 ... | head -1` leaves it once head has its line; line
    buffered, so the loss shows at the first line the command prints, mid-run. Set in the test itself: pytest puts
    its own capture back in place as the test starts."""
    reader, writer = os.pipe()
    os.close(reader)
    stream = open(writer, "w", encoding="utf-8", buffering=1)
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def _help(parser, command):
    subparsers = next(action for action in parser._actions if action.dest == "command")
    return subparsers.choices[command].format_help()


def test_every_commands_help_gives_the_exit_status(capsys):
    parser = build_parser()
    for command in COMMANDS:
        text = " ".join(_help(parser, command).split())
        assert "Exit status: 0 done; 2 bad options or input" in text, command
        assert "130 Ctrl-C; 143 SIGTERM" in text and "progress bars, notes and errors to stderr" in text, command
    assert "one that cannot be read stops the run with status 2" in " ".join(_help(parser, "upscale").split())
    assert "Unreadable files are skipped" in " ".join(_help(parser, "prepare").split())
    assert "Exit status" in " ".join(parser.format_help().split())
    with pytest.raises(SystemExit) as stopped:
        training_cli.main(["--help"], prog="train_sr3.py")
    assert stopped.value.code == 0
    training_help = " ".join(capsys.readouterr().out.split())
    assert (
        "Exit status: 0 done; 2 bad options, data or files" in training_help and "1 the run finished" in training_help
    )


def test_a_reader_that_goes_away_ends_no_upscale(model_dir, tmp_path, capsys, monkeypatch):
    closed_pipe = stdout_into_a_closed_pipe(monkeypatch)
    inputs = write_images(tmp_path / "inputs", 3, 8)
    out = tmp_path / "out"
    arguments = ["upscale", str(inputs), "--model", str(model_dir), "--output", str(out), "--steps", "1"]
    assert main(arguments + ["--threads", "1"]) == 0
    # Every result written, although the list of them had no reader from its first line on.
    assert sorted(path.name for path in out.iterdir()) == ["0_sr.png", "1_sr.png", "2_sr.png"]
    assert "Broken pipe" not in capsys.readouterr().err
    assert sys.stdout is closed_pipe  # put back
    closed_pipe.close()


def test_a_reader_that_goes_away_ends_no_training(tmp_path, capsys, monkeypatch):
    from diffusers_sr3.training import trainer

    def train(config):  # the run's printed summary, then the work that follows it
        print(f"pipeline saved to {config.output_dir}")
        (tmp_path / "after the summary").write_text("saved", encoding="utf-8")

    monkeypatch.setattr(trainer, "train", train)
    stdout_into_a_closed_pipe(monkeypatch)
    data = write_images(tmp_path / "data", 1, 40)
    arguments = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--preset", "tiny"]
    assert training_cli.main(arguments, prog="train_sr3.py") == 0
    assert (tmp_path / "after the summary").is_file()
    assert "Broken pipe" not in capsys.readouterr().err


def test_a_log_handler_set_up_during_a_run_writes_to_the_console_after_it(tmp_path, capsys, monkeypatch):
    """The training command's logging.basicConfig (and Diffusers' handler, where Diffusers is first imported in a
    run) take sys.stderr as it is while the command runs: a second run in the same process (a notebook) must still
    find that handler's stream among the console's, and print its log lines above the progress bar."""
    from diffusers_sr3.training import trainer

    made, seen = [], []

    def train(config):
        if not made:  # as basicConfig does on the first run, in a process whose root logger has no handler yet
            made.append(logging.StreamHandler())
            logging.getLogger().addHandler(made[0])
        seen.append(type(made[0].stream).__name__)

    monkeypatch.setattr(trainer, "train", train)
    data = write_images(tmp_path / "data", 1, 40)
    try:
        for run in ("first", "second"):
            arguments = ["--train_data_dir", str(data), "--output_dir", str(tmp_path / run), "--preset", "tiny"]
            assert training_cli.main(arguments, prog="train_sr3.py") == 0
            assert made[0].stream is sys.stderr  # the console's own, not a wrapper of the run that ended
    finally:
        logging.getLogger().removeHandler(made[0])
    assert seen == ["_ReaderMayLeave", "_AboveProgressBars"]


def test_the_console_streams_come_back_when_the_last_flush_fails(monkeypatch):
    class Unwritable(io.StringIO):  # a disk that fills up as the last line is written out
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    stream = Unwritable()
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(OSError), readers_may_leave():
        print("result")
    assert sys.stdout is stream


def _sr3(*arguments, **options):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "diffusers_sr3", *arguments], env=env, **options)


@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_sr3_eval_into_a_closed_pipe_exits_0_without_a_traceback(tmp_path, quiet):
    hr = write_images(tmp_path / "hr", 2, 16)
    sr = write_images(tmp_path / "sr", 2, 16, shift=3)
    reader, writer = os.pipe()
    os.close(reader)  # `sr3 eval ... | head -1` with head gone before the table is printed
    arguments = ["eval", "--hr", str(hr), "--sr", str(sr), "--json", str(tmp_path / "r.json"), *quiet]
    process = _sr3(*arguments, stdout=writer, stderr=subprocess.PIPE, text=True)
    os.close(writer)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 0, error
    assert "Traceback" not in error and "Broken pipe" not in error and "Exception ignored" not in error
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["count"] == 2


def test_ctrl_c_exits_130_with_one_line_and_no_result(tmp_path):
    # A process of its own: the signal arrives wherever the command is, as a terminal's Ctrl-C does.
    from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler

    SR3Pipeline(SR3UNet2DModel(**tiny_unet_config()).eval(), make_scheduler("ddpm", n_timestep=1000)).save_pretrained(
        tmp_path / "model"
    )
    inputs = write_images(tmp_path / "inputs", 1, 32)
    out = tmp_path / "out"
    arguments = ["upscale", str(inputs), "--model", str(tmp_path / "model"), "--output", str(out)]
    arguments += ["--mode", "detail", "--steps", "1000", "--window-size", "0", "--threads", "1", "--no-memory-check"]
    process = _sr3(*arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    error = bytearray()

    def read_stderr():
        for byte in iter(lambda: process.stderr.read(1), b""):
            error.extend(byte)

    reading = threading.Thread(target=read_stderr, daemon=True)
    reading.start()
    deadline = time.monotonic() + 120
    while b"step " not in error and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # until it refines: the progress bar counts steps
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reading.join(timeout=10)
    message = error.decode("utf-8", "replace")
    assert process.returncode == 130, message
    assert message.rstrip().splitlines()[-1].endswith("sr3 upscale: interrupted") and "Traceback" not in message
    assert not out.exists() or not list(out.iterdir())


def test_quiet_sample_and_prepare_print_no_progress_bar(tmp_path, capsys):
    from diffusers_sr3 import SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler

    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3, sample_size=16))
    SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50)).save_pretrained(tmp_path / "model")
    arguments = ["sample", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "g.png"), "-n", "2"]
    assert main(arguments + ["--steps", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == f"wrote 2 images to {tmp_path / 'g.png'}\n"
    source = write_images(tmp_path / "photos", 2, 16)
    (source / "broken.png").write_bytes(b"not an image")
    assert main(["prepare", str(source), "--out", str(tmp_path / "data"), "--sizes", "4,16", "--n_worker", "0"]) == 0
    assert "preparing" in capsys.readouterr().err  # the bar, without --quiet
    arguments = ["prepare", str(source), "--out", str(tmp_path / "quiet"), "--sizes", "4,16", "--n_worker", "0"]
    assert main(arguments + ["--quiet"]) == 0
    captured = capsys.readouterr()
    # A skipped file is a problem, told even with --quiet; the bar is not.
    assert captured.err.startswith("skipped unreadable") and "broken.png" in captured.err
    assert "preparing" not in captured.err and captured.err.count("\n") == 1
    assert captured.out.startswith("wrote 2 images (4 -> 16)")
