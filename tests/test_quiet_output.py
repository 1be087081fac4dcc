"""Clean console output: no library warnings that this package's own calls trigger, no log lines repeated per file."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import warnings

import PIL.Image
import pytest
import torch
from conftest import REPO, tiny_unet_config
from diffusers import DDIMScheduler
from test_data import make_image_folder

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.training.cli import main as train_main

# The project's pytest settings ignore these warnings everywhere: the tests here turn them back into errors. pytest
# puts its filters in front of the two that diffusers_sr3.noise installs, so those two are repeated after them.
pytestmark = [
    pytest.mark.filterwarnings("error::DeprecationWarning"),
    pytest.mark.filterwarnings("error::FutureWarning"),
    *[
        pytest.mark.filterwarnings(rf"ignore:{message}:DeprecationWarning:diffusers\.schedulers\.")
        for message in ("__array__ implementation doesn't accept a copy keyword", "__array_wrap__ must accept context")
    ],
]


# Builds, saves, loads and runs every sampler, made and swapped in: run by `python -W error::DeprecationWarning`, not
# under pytest, whose own warning filters (set per test, in front of all others) would decide instead.
EVERY_SAMPLER_SCRIPT = """
import json, sys, tempfile
import PIL.Image, torch
from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.defaults import evaluations_per_crop
from diffusers_sr3.noise import SCHEDULERS, swap_scheduler

for name in sorted(SCHEDULERS):
    for how in ("make", "swap"):
        torch.manual_seed(0)
        unet = SR3UNet2DModel(**json.loads(sys.argv[1])).eval()
        if how == "make":
            scheduler = make_scheduler(name, n_timestep=50)
        else:
            scheduler = swap_scheduler(make_scheduler("ddpm", n_timestep=50), name)
        pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4)
        with tempfile.TemporaryDirectory() as folder:
            pipeline.save_pretrained(folder)
            pipeline = SR3Pipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        assert evaluations_per_crop("detail", 3, 1.0, pipeline.scheduler) >= 3
        image = pipeline(PIL.Image.new("RGB", (8, 8)), num_inference_steps=3, mode="detail").images[0]
        assert image.size == (32, 32), (name, how, image.size)
"""


def test_every_sampler_builds_loads_and_runs_under_deprecation_warnings_as_errors():
    """Diffusers' sigma schedulers call numpy on torch tensors (numpy 2 warns that `Tensor.__array__` takes no
    `copy`, DEIS's `np.log` that `__array_wrap__` takes no `context`): building (by `make_scheduler` and by
    `swap_scheduler`), loading and sampling stay quiet. One process for all: importing torch and Diffusers is most of
    its time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c"]
    command += [EVERY_SAMPLER_SCRIPT, json.dumps(tiny_unet_config())]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


# The package imported first inside `catch_warnings` (as pytest's collection does), whose exit drops the filters
# noise.py installs at import: an Euler pipeline still runs quietly under `-W error::DeprecationWarning`.
IMPORTED_INSIDE_CATCH_WARNINGS_SCRIPT = """
import json, sys, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler  # noise.py among them
import PIL.Image
pipeline = SR3Pipeline(SR3UNet2DModel(**json.loads(sys.argv[1])).eval(), make_scheduler("euler", n_timestep=50))
pipeline.set_progress_bar_config(disable=True)
pipeline(PIL.Image.new("RGB", (8, 8)), num_inference_steps=3, mode="detail")
"""


def test_an_import_inside_catch_warnings_still_samples_quietly():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-W", "error::DeprecationWarning", "-c", IMPORTED_INSIDE_CATCH_WARNINGS_SCRIPT]
    result = subprocess.run(command + [json.dumps(tiny_unet_config())], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_a_pipeline_call_after_the_filters_were_reset_puts_them_back(tiny_pipeline):
    """A call sets and steps the scheduler with the two filters in front again (a test runner's reset or `-W error`
    filters added after the import dropped or outranked them); other filters stay as they were."""
    tiny_pipeline.scheduler = make_scheduler("euler", n_timestep=50)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("error", DeprecationWarning)
        tiny_pipeline(PIL.Image.new("RGB", (8, 8)), num_inference_steps=3, mode="detail")
        assert warnings.filters[2:] == [("error", None, DeprecationWarning, None, 0)]
        warnings.simplefilter("error", DeprecationWarning, append=False)  # in front of them now, without a reset
        warnings.simplefilter("error", UserWarning)
        tiny_pipeline(PIL.Image.new("RGB", (8, 8)), num_inference_steps=3, mode="detail")
        assert ("error", None, UserWarning, None, 0) in warnings.filters


def test_counting_a_schedulers_evaluations_puts_the_filters_back():
    """`sr3 upscale` and the Space count evaluations with a copy of the scheduler, set before the pipeline runs."""
    from diffusers_sr3.defaults import evaluations_per_crop

    scheduler = make_scheduler("euler", n_timestep=50)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("error", DeprecationWarning)
        assert evaluations_per_crop("detail", 3, 1.0, scheduler) == 3


class _LockstepDDIMScheduler(DDIMScheduler):
    """DDIM whose steps in two threads run together: each waits inside `step` until the other thread's is there."""

    barrier = threading.Barrier(2, timeout=30)

    def step(self, *args, **kwargs):
        self.barrier.wait()
        return super().step(*args, **kwargs)


def test_pipelines_sampling_in_two_threads_leave_the_warning_filters_as_they_were():
    """Saving and restoring the process-wide filter list around each step from two threads at once leaves one
    thread's filters installed for good (or drops a filter another thread sets)."""
    pipelines = []
    for _ in range(2):
        torch.manual_seed(0)
        scheduler = _LockstepDDIMScheduler.from_config(make_scheduler("ddim", n_timestep=50).config)
        pipeline = SR3Pipeline(SR3UNet2DModel(**tiny_unet_config()).eval(), scheduler, upscale_factor=4)
        pipeline.set_progress_bar_config(disable=True)
        pipelines.append(pipeline)
    before, errors = list(warnings.filters), []

    def sample(pipeline):
        try:
            pipeline(PIL.Image.new("RGB", (8, 8)), num_inference_steps=10, mode="detail")
        except Exception as error:  # the test reports it, not the thread
            errors.append(error)

    threads = [threading.Thread(target=sample, args=(pipeline,)) for pipeline in pipelines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert warnings.filters == before


class _StepWarning(UserWarning):
    pass


def test_a_once_per_location_warning_in_the_sampling_loop_shows_once(tiny_pipeline):
    """Changing the warning filters resets every module's record of warnings shown: done each step, a warning
    meant once per location would show every step."""

    def callback(pipeline, step, timestep, callback_kwargs):
        warnings.warn("a warning of the callback's", _StepWarning, stacklevel=1)
        return callback_kwargs

    tiny_pipeline.scheduler = make_scheduler("ddim", n_timestep=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", _StepWarning)
        tiny_pipeline(
            PIL.Image.new("RGB", (8, 8)), num_inference_steps=10, mode="detail", callback_on_step_end=callback
        )
    assert [type(warning.message) for warning in caught].count(_StepWarning) == 1


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
    logged = (tmp_path / "train.log").read_text(encoding="utf-8").splitlines()
    shown = capsys.readouterr().err
    assert logged and not [line for line in logged if line in shown]
