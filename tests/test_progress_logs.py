"""Progress bars written to a log (stderr redirected to a file, a pipe, CI) show a state every LOG_REFRESH_SECONDS and
their last one, not tqdm's ten redraws a second; on a terminal they redraw as tqdm does."""

import os
import re
import subprocess
import sys
import types

import numpy as np
import PIL.Image
from conftest import REPO, tiny_unet_config
from test_data import make_image_folder

from diffusers_sr3.progress import LOG_REFRESH_SECONDS, bar_options


def _run_with_stderr_in_a_file(tmp_path, arguments):
    """Run `python arguments` with stderr redirected to a file, as `cmd 2> log` does; return the log's text."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TQDM_MININTERVAL", None)
    log = tmp_path / "stderr.log"
    with open(log, "w", encoding="utf-8") as stderr:
        result = subprocess.run(
            [sys.executable, *arguments], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=600
        )
    text = log.read_text(encoding="utf-8")
    assert result.returncode == 0, text
    return text


def _bar_states(log, label):
    """The states of the bar labelled `label` written into `log` (each redraw starts with a carriage return)."""
    return [state for state in re.split(r"[\r\n]", log) if state.startswith(f"{label}:")]


def _at_most_one_state_per_interval(states):
    """Whether `states` are the first, the last, and at most one per LOG_REFRESH_SECONDS of the run between."""
    minutes, seconds = re.search(r"\[(\d+):(\d+)", states[-1]).groups()  # the last state's elapsed time
    return 2 <= len(states) <= 2 + (60 * int(minutes) + int(seconds)) // LOG_REFRESH_SECONDS


def test_a_training_runs_bar_in_a_log_shows_a_few_states_not_one_per_step(tmp_path):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    options = dict(preset="tiny", output_dir=str(tmp_path / "out"), train_data_dir=data, train_batch_size=2)
    options.update(max_train_steps=60, validation_steps=0, report_to="none", lr_warmup_steps=1, seed=0)
    argv = [item for name, value in options.items() for item in (f"--{name}", str(value))]
    log = _run_with_stderr_in_a_file(tmp_path, [str(REPO / "examples" / "train_sr3.py"), *argv])
    states = _bar_states(log, "steps")
    assert _at_most_one_state_per_interval(states), states  # each step redrew it before: 60 steps, 60+ states
    assert "60/60" in states[-1] and "loss=" in states[-1]  # the log still tells how far the run got


def test_an_upscales_bar_in_a_log_shows_a_few_states_not_one_per_evaluation(tmp_path):
    from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler

    SR3Pipeline(SR3UNet2DModel(**tiny_unet_config()).eval(), make_scheduler("ddpm", n_timestep=100)).save_pretrained(
        tmp_path / "model"
    )
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "photo.png")
    arguments = ["-m", "diffusers_sr3", "upscale", str(tmp_path / "photo.png"), "--model", str(tmp_path / "model")]
    arguments += ["--output", str(tmp_path / "up.png"), "--mode", "detail", "--steps", "40", "--strength", "1"]
    arguments += ["--window-size", "0", "--threads", "1", "--no-memory-check"]
    states = _bar_states(_run_with_stderr_in_a_file(tmp_path, arguments), "photo.png")
    assert _at_most_one_state_per_interval(states), states  # one per evaluation before: 40 evaluations, 40+
    assert "100%" in states[-1] and "step 40/40" in states[-1]


class _Stream:
    def __init__(self, terminal):
        self.terminal = terminal

    def isatty(self):
        return self.terminal


def test_a_bar_redraws_as_tqdm_does_on_a_terminal_and_rarely_elsewhere(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert bar_options(_Stream(True)) == {}
    assert bar_options(_Stream(False)) == {"mininterval": LOG_REFRESH_SECONDS, "miniters": 0}
    assert bar_options(object())["mininterval"] == LOG_REFRESH_SECONDS  # no isatty: not a terminal
    monkeypatch.setenv("TQDM_MININTERVAL", "1")  # tqdm's own setting wins
    # The clock alone still decides: tqdm's adaptive miniters would let its monitor add a state after each interval.
    assert bar_options(_Stream(False)) == {"miniters": 0}
    assert bar_options(_Stream(True)) == {}
    monkeypatch.setenv("TQDM_MINITERS", "5")
    assert bar_options(_Stream(False)) == {}


def test_a_bar_on_a_notebook_kernels_stream_redraws_as_tqdm_does(monkeypatch):
    # Without ipywidgets, tqdm.auto gives a notebook the text bar, written to ipykernel's OutStream: no terminal by
    # its isatty, but the notebook shows each redraw in place of the last.
    kernel_streams = types.ModuleType("ipykernel.iostream")

    class OutStream(_Stream):
        pass

    kernel_streams.OutStream = OutStream
    monkeypatch.setitem(sys.modules, "ipykernel.iostream", kernel_streams)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert bar_options(OutStream(False)) == {}
    assert bar_options(_Stream(False))["mininterval"] == LOG_REFRESH_SECONDS  # another stream: a log
