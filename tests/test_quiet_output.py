"""Clean console output: no library warnings that this package's own calls trigger, no log lines repeated per file."""

import logging
import re
import sys
import warnings

import PIL.Image
import pytest
import torch
from conftest import tiny_unet_config
from test_data import make_image_folder

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.defaults import evaluations_per_crop
from diffusers_sr3.noise import SCHEDULERS, swap_scheduler
from diffusers_sr3.training.cli import main as train_main

# The project's pytest settings ignore these warnings everywhere: the tests here turn them back into errors.
pytestmark = [
    pytest.mark.filterwarnings("error::DeprecationWarning"),
    pytest.mark.filterwarnings("error::FutureWarning"),
]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("how", ["make", "swap"])
def test_every_sampler_builds_loads_and_runs_without_deprecation_warnings(name, how, tmp_path):
    """Diffusers' sigma schedulers call numpy on torch tensors (numpy 2 warns that `Tensor.__array__` takes no
    `copy`, DEIS's `np.log` that `__array_wrap__` takes no `context`): building, loading and sampling stay quiet."""
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    if how == "make":
        scheduler = make_scheduler(name, n_timestep=50)
    else:
        scheduler = swap_scheduler(make_scheduler("ddpm", n_timestep=50), name)
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path / "model")
    pipeline = SR3Pipeline.from_pretrained(tmp_path / "model")
    pipeline.set_progress_bar_config(disable=True)
    assert evaluations_per_crop("detail", 3, 1.0, pipeline.scheduler) >= 3
    image = pipeline(PIL.Image.new("RGB", (8, 8)), num_inference_steps=3, mode="detail").images[0]
    assert image.size == (32, 32)


def test_a_checkpoint_is_logged_once_not_once_per_file(tmp_path, caplog):
    """Accelerate logs each file of a checkpoint at INFO, under the temporary folder's name: the training command
    keeps its warnings only, beside the trainer's one line per checkpoint. The validation sampler stays quiet too."""
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    options = dict(preset="tiny", output_dir=str(tmp_path / "out"), train_data_dir=data, train_batch_size=2)
    options.update(max_train_steps=2, checkpointing_steps=1, validation_steps=0, num_validation_images=1)
    options.update(validation_steps_count=2, report_to="none", lr_warmup_steps=1, seed=0)
    argv = [item for name, value in options.items() for item in (f"--{name}", str(value))]
    accelerate_logger = logging.getLogger("accelerate")
    caplog.set_level(logging.INFO)
    try:
        assert train_main(argv) == 0
    finally:
        accelerate_logger.setLevel(logging.NOTSET)  # the command's setting, not this process's for later tests
    names = [record.name for record in caplog.records]
    assert not [name for name in names if name.startswith("accelerate")]
    assert [record.getMessage() for record in caplog.records].count(
        f"saved checkpoint {tmp_path / 'out'}/checkpoint-1"
    ) == 1


class _AlsoOnCheckpoint(logging.Filter):
    """On the trainer's checkpoint line, logged while the steps bar shows, also log through Diffusers' own logger
    (its console handler, not propagating) and warn as Python code does."""

    def filter(self, record):
        if record.getMessage().startswith("saved checkpoint"):
            logging.getLogger("diffusers").warning("diffusers says")
            warnings.warn("python warns", UserWarning)
        return True


def test_training_log_lines_print_above_the_progress_bar_not_into_it(tmp_path, capsys):
    """A checkpoint's log line, Diffusers' log lines and Python's warnings, while the steps bar shows, each start a
    line of their own; the handlers' streams and the warnings' printer come back afterwards."""
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    options = dict(preset="tiny", output_dir=str(tmp_path / "out"), train_data_dir=data, train_batch_size=2)
    options.update(max_train_steps=2, checkpointing_steps=1, validation_steps=0, num_validation_images=1)
    options.update(validation_steps_count=2, report_to="none", lr_warmup_steps=1, seed=0)
    argv = [item for name, value in options.items() for item in (f"--{name}", str(value))]
    # What the command's logging.basicConfig installs outside pytest, which holds the root logger's handlers here.
    console = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO)
    # Diffusers' handler writes to the stderr of when Diffusers was imported: here, to pytest's capture.
    diffusers_console = logging.getLogger("diffusers").handlers[0]
    diffusers_stream = diffusers_console.setStream(sys.stderr)
    trainer_logger = logging.getLogger("diffusers_sr3.training.trainer")
    also = _AlsoOnCheckpoint()
    trainer_logger.addFilter(also)
    show_warning = warnings.showwarning
    try:
        assert train_main(argv) == 0
    finally:
        trainer_logger.removeFilter(also)
        root.removeHandler(console)
        root.setLevel(level)
        logging.getLogger("accelerate").setLevel(logging.NOTSET)
        after = diffusers_console.setStream(diffusers_stream)
    assert after is sys.stderr and console.stream is sys.stderr and warnings.showwarning is show_warning
    shown = re.split(r"[\r\n]", capsys.readouterr().err)
    for text in ("saved checkpoint", "diffusers says", "python warns"):
        assert [line for line in shown if text in line]
        assert not [line for line in shown if text in line and "steps:" in line]


def test_training_that_logs_to_a_file_only_prints_no_log_lines(tmp_path, capsys):
    """A program that runs the training command with the root logger writing to a file (so basicConfig adds no
    console handler) gets its log lines in the file, and none on the console."""
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    options = dict(preset="tiny", output_dir=str(tmp_path / "out"), train_data_dir=data, train_batch_size=2)
    options.update(max_train_steps=1, validation_steps=0, report_to="none", lr_warmup_steps=1, seed=0)
    argv = [item for name, value in options.items() for item in (f"--{name}", str(value))]
    log_file = logging.FileHandler(tmp_path / "train.log")
    root = logging.getLogger()
    root.addHandler(log_file)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        assert train_main(argv) == 0
    finally:
        root.removeHandler(log_file)
        log_file.close()
        root.setLevel(level)
        logging.getLogger("accelerate").setLevel(logging.NOTSET)
    logged = (tmp_path / "train.log").read_text().splitlines()
    shown = capsys.readouterr().err
    assert logged and not [line for line in logged if line in shown]
