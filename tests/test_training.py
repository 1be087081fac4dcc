"""The training scripts and the shared training core, end to end on CPU with tiny models."""

import argparse
import glob
import json
import os
import runpy
import sys

import PIL.Image
import pytest
import torch
from conftest import needs_bfloat16_kernels
from safetensors.torch import load_file
from test_data import make_image_folder, make_lmdb, make_parquet, make_prepared_layout

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline
from diffusers_sr3.presets import PRESETS, get_preset
from diffusers_sr3.training import Trainer, TrainingConfig, add_training_arguments, config_from_args, train
from diffusers_sr3.training.checkpointing import list_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR_SCRIPT = os.path.join(REPO, "examples", "train_sr3.py")
UNCOND_SCRIPT = os.path.join(REPO, "examples", "train_uncond.py")


def fast_options(output_dir, **overrides):
    """A few-second run: tiny model, batch 2, 4 steps, 2-step validation sampling, no tracker."""
    options = dict(
        preset="tiny",
        output_dir=str(output_dir),
        train_batch_size=2,
        max_train_steps=4,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=2,
        validation_steps_count=2,
        report_to="none",
        lr_warmup_steps=1,
        seed=0,
    )
    options.update(overrides)
    return options


def as_argv(options):
    argv = []
    for name, value in options.items():
        if value is True:
            argv.append(f"--{name}")
        elif value is False:
            argv.append(f"--no-{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def run_script(script, argv, monkeypatch):
    """Run an example script as `python script.py argv...` in this process; return its exit status."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    return exit_info.value.code


def event_contents(log_dir):
    """Scalar tags (with values) and image tags found in the TensorBoard event files under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, set()
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
        images.update(accumulator.Tags()["images"])
    return scalars, images


def test_train_sr3_script_end_to_end(tmp_path, monkeypatch):
    """Local folder with bad images, EMA, checkpoints with a limit, validation to TensorBoard, model card."""
    data = make_image_folder(str(tmp_path / "images"), count=5)
    output = tmp_path / "out"
    options = fast_options(
        output,
        train_data_dir=data,
        use_ema=True,
        ema_decay=0.9,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        validation_steps=2,
        report_to="tensorboard",
        random_flip=False,
    )
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0

    # The pipeline loads and super-resolves; the EMA weights (not the raw ones) were saved.
    pipeline = SR3Pipeline.from_pretrained(str(output))
    assert pipeline.config.upscale_factor == 4
    image = pipeline(torch.rand(1, 3, 8, 8), num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    checkpoints = [os.path.basename(path) for path in list_checkpoints(str(output))]
    assert checkpoints == ["checkpoint-3", "checkpoint-4"]
    raw = load_file(str(output / "checkpoint-4" / "model.safetensors"))
    saved = load_file(str(output / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(output / "checkpoint-4" / "ema.safetensors"))
    assert any(not torch.equal(raw[name], saved[name]) for name in saved), "final weights must be the EMA's"
    # EMA shadow tensors are stored in parameter order.
    for index, (name, _) in enumerate(pipeline.unet.named_parameters()):
        torch.testing.assert_close(saved[name], ema[f"{index:05d}"])

    summary = json.loads((output / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["global_step"] == 4 and summary["num_processes"] == 1
    assert summary["skipped_at_scan"] == {"unreadable": 1, "small": 1}
    assert summary["skipped_during_training"] >= 1  # the truncated file, found when decoded
    assert set(summary["validation"]) == {"psnr", "ssim", "consistency"}

    scalars, images = event_contents(str(output / "logs"))
    assert len(scalars["train/loss"]) == 4 and len(scalars["train/lr"]) == 4
    assert len(scalars["val/psnr"]) == 3  # steps 2 and 4, and the final one
    assert {"val/ssim", "val/consistency", "train/ema_decay"} <= set(scalars)
    assert "validation" in images

    card = (output / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: diffusers" in card and "super-resolution" in card
    assert "PSNR" in card and "validation.png" in card and "SR3Pipeline.from_pretrained" in card
    # Without --validation_images they are training images: the card must not present them as held out.
    assert "## Validation metrics (the first 2 training images, not held out)" in card
    assert (output / "validation.png").is_file()


def test_train_uncond_script_end_to_end(tmp_path, monkeypatch):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(
        output, preset="tiny_uncond", train_data_dir=data, validation_steps=2, report_to="tensorboard"
    )
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 0
    pipeline = SR3UnconditionalPipeline.from_pretrained(str(output))
    assert pipeline(batch_size=1, num_inference_steps=2, output_type="pt").images.shape == (1, 3, 32, 32)
    _, images = event_contents(str(output / "logs"))
    assert "validation" in images
    assert "unconditional-image-generation" in (output / "README.md").read_text(encoding="utf-8")
    # The unconditional script refuses a super-resolution model with a clear message.
    options = fast_options(tmp_path / "bad", preset="tiny", train_data_dir=data)
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 2


def test_script_errors_are_clear(tmp_path, monkeypatch, capsys):
    options = fast_options(tmp_path / "out", dataset_name="someone/faces")
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    assert "offline mode is on" in capsys.readouterr().err
    options = fast_options(tmp_path / "out", train_data_dir=str(tmp_path / "nothing"))
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    assert "is not a folder" in capsys.readouterr().err
    if "wandb" not in sys.modules:
        try:
            import wandb  # noqa: F401
        except ImportError:
            options = fast_options(tmp_path / "out", train_data_dir=str(tmp_path), report_to="wandb")
            assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
            assert "pip install wandb" in capsys.readouterr().err


def test_bad_values_files_and_data_are_one_line_errors_before_training(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for index in range(3):
        good = open(os.path.join(data, sorted(os.listdir(data))[0]), "rb").read()
        (corrupt / f"c{index}.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "a_file").write_text("not a folder", encoding="utf-8")
    output = tmp_path / "out"
    refused = {
        "upscale_factor must be at least 1, got 0": dict(upscale_factor=0),
        "resolution must be at least 1, got -32": dict(resolution=-32),
        "validation_steps_count must be at least 1, got 0": dict(validation_steps_count=0),
        "--validation_scheduler 'nosuch' is not a scheduler": dict(validation_scheduler="nosuch"),
        "EulerAncestralDiscreteScheduler cannot sample a model that predicts 'sample'": dict(
            prediction_type="sample", validation_scheduler="euler_ancestral"
        ),
        f"--validation_images: {tmp_path / 'nothere.png'}: file not found": dict(
            validation_images=[str(tmp_path / "nothere.png")]
        ),
        "none of the 3 images of": dict(train_data_dir=str(corrupt)),
        "max_train_samples must be at least 1, got 0": dict(max_train_samples=0),
        f"--output_dir {tmp_path / 'a_file'} is a file, not a folder": dict(output_dir=str(tmp_path / "a_file")),
        # Validation measures SSIM, with an 11x11 window: before, this trained, then failed at the first validation.
        "resolution 8 is too small for super-resolution": dict(resolution=8),
    }
    for message, overrides in refused.items():
        overrides = {"train_data_dir": data, "checkpointing_steps": 1, **overrides}
        options = fast_options(overrides.pop("output_dir", output), **overrides)
        assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2, message
        err = capsys.readouterr().err
        assert message in err, err
        assert "usage:" not in err and "Traceback" not in err  # the options parsed: no usage text, one line
        assert not output.exists(), f"{message}: a failed run left {list(output.iterdir())}"
    # An empty stream: the trainer's message, not Accelerate's "Batch does not contain any data".
    import datasets

    empty = str(tmp_path / "empty.parquet")
    datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()})).to_parquet(empty)
    options = fast_options(output, train_data_files=[empty], streaming=True)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    assert "(streamed) gave no batch in epoch 0: no usable training images" in capsys.readouterr().err


def test_a_new_run_does_not_write_into_an_earlier_runs_checkpoints(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    earlier = fast_options(output, train_data_dir=data, max_train_steps=2, checkpointing_steps=2)
    assert run_script(SR_SCRIPT, as_argv(earlier), monkeypatch) == 0
    before = (output / "checkpoint-2" / "model.safetensors").read_bytes()
    # Before, this overwrote checkpoint-2, and the limit then pruned the new run's checkpoint-1 for the old one.
    again = fast_options(output, train_data_dir=data, checkpointing_steps=1, checkpoints_total_limit=2)
    assert run_script(SR_SCRIPT, as_argv(again), monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"{output} holds checkpoints of an earlier run (the newest: checkpoint-2)" in err
    assert "--resume_from_checkpoint latest" in err
    assert (output / "checkpoint-2" / "model.safetensors").read_bytes() == before
    assert run_script(SR_SCRIPT, as_argv({**again, "resume_from_checkpoint": "latest"}), monkeypatch) == 0


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no permission bits to compare")
def test_checkpoints_get_the_permissions_of_new_files(tmp_path, monkeypatch):
    """safetensors writes the trained and the EMA weights of a checkpoint readable by their owner alone, and an
    earlier checkpoint is loaded as a model (the guide, `load_checkpoint_unet`) by whoever may read the run's folder."""
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        options = fast_options(output, train_data_dir=data, max_train_steps=2, checkpointing_steps=2, use_ema=True)
        assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0
    finally:
        os.umask(previous)
    checkpoint = output / "checkpoint-2"
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in checkpoint.rglob("*") if path.is_file()}
    assert "model.safetensors" in modes and "ema.safetensors" in modes
    assert set(modes.values()) == {oct(0o644)}, modes


def test_a_trained_pipeline_without_checkpoints_is_not_trained_over(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(output, train_data_dir=data, max_train_steps=1)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0
    weights = output / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    # Before, both started from scratch and overwrote the trained model, with an INFO line at most.
    for again in (options, {**options, "resume_from_checkpoint": "latest"}):
        assert run_script(SR_SCRIPT, as_argv(again), monkeypatch) == 2
        err = capsys.readouterr().err
        assert f"{output} holds a trained pipeline and no checkpoint to resume" in err, err
        assert f"--pretrained_model_name_or_path {output} --output_dir <another folder>" in err
        assert "Traceback" not in err
    assert weights.read_bytes() == before


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import tempfile

    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "read-only"
    output.mkdir()
    output.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: make the write fail as it would for anyone else

        def denied(*args, dir=None, **kwargs):
            raise PermissionError(13, "Permission denied", dir)

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    started = []
    monkeypatch.setattr("diffusers_sr3.training.trainer.build_model", lambda config: started.append(config))
    try:
        options = fast_options(output, train_data_dir=data, checkpointing_steps=2)
        assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    finally:
        output.chmod(0o755)
    err = capsys.readouterr().err
    assert f"--output_dir {output} is not writable (Permission denied)" in err, err
    assert not started and "Traceback" not in err


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    def disk_full(self, output_dir=None, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as handle:
            handle.write(b"part of a file")
        # What torch.save raises when the disk fills up.
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write "
            "failed"
        )

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    output.mkdir()  # kept after the failure, to look into
    options = fast_options(output, train_data_dir=data, max_train_steps=2, checkpointing_steps=1)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"cannot write checkpoint-1 in {output} (" in err and " GiB free there): [enforce fail" in err, err
    assert "Traceback" not in err
    assert not [name for name in os.listdir(output) if "checkpoint" in name]


def test_image_options_of_super_resolution_are_refused_for_unconditional_training(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    image = os.path.join(data, sorted(name for name in os.listdir(data) if name.endswith(".png"))[0])
    options = fast_options(tmp_path / "out", preset="tiny_uncond", train_data_dir=data, validation_images=[image])
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 2
    assert "--validation_images applies to super-resolution only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resuming_refuses_another_models_or_a_damaged_checkpoint(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    source = tmp_path / "uncond"
    options = fast_options(source, preset="tiny_uncond", train_data_dir=data, max_train_steps=1, checkpointing_steps=1)
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 0
    checkpoint = source / "checkpoint-1"

    def resume(expected):
        options = fast_options(tmp_path / "sr", train_data_dir=data, resume_from_checkpoint=str(checkpoint))
        assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err

    resume(f"{checkpoint} was saved by a run of another model (in_channels 3 there, 6 here")
    # The super-resolution run's own checkpoint, damaged in four ways.
    checkpoint = tmp_path / "sr" / "checkpoint-1"
    options = fast_options(tmp_path / "sr", train_data_dir=data, max_train_steps=1, checkpointing_steps=1)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0
    random_states = (checkpoint / "random_states_0.pkl").read_bytes()
    (checkpoint / "random_states_0.pkl").unlink()  # resumed without it, the run would not be exact
    resume(f"{checkpoint} is incomplete, it has no random_states_0.pkl")
    # accelerate would only log that it could not load them, and go on with other randomness.
    (checkpoint / "random_states_0.pkl").write_bytes(random_states[: len(random_states) // 2])
    resume(
        f"cannot resume from {checkpoint}: a file in it is damaged or does not fit this model "
        "(UnpicklingError('random_states_0.pkl is damaged"
    )
    (checkpoint / "random_states_0.pkl").write_bytes(random_states)
    model = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(model[:100])
    resume(f"cannot resume from {checkpoint}: a file in it is damaged")
    (checkpoint / "model.safetensors").write_bytes(model)
    (checkpoint / "training_state.json").write_text("{}", encoding="utf-8")
    resume(f"cannot resume from {checkpoint}: a file in it is damaged")


def test_ctrl_c_says_where_to_resume(tmp_path, monkeypatch, capsys):
    import diffusers_sr3.training.trainer as trainer

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    output = tmp_path / "out"
    argv = as_argv(fast_options(output, train_data_dir=str(tmp_path)))
    assert run_script(SR_SCRIPT, argv, monkeypatch) == 130
    assert "holds no complete checkpoint yet, so a new run starts over" in capsys.readouterr().err
    for step in (20, 40):
        (output / f"checkpoint-{step}").mkdir(parents=True)
    (output / "checkpoint-20" / "training_state.json").write_text(
        "{}", encoding="utf-8"
    )  # checkpoint-40 is half-written
    assert run_script(SR_SCRIPT, argv, monkeypatch) == 130
    message = capsys.readouterr().err
    assert f"the last complete checkpoint is {output / 'checkpoint-20'}: go on from it with " in message
    assert "--resume_from_checkpoint latest" in message


# What safetensors raises when the disk fills up: no OSError.
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_under_safetensors_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator
    from safetensors import SafetensorError

    save_state = Accelerator.save_state

    def full_at_step_2(self, output_dir=None, **kwargs):
        if output_dir.endswith("-2"):
            raise SafetensorError(DISK_FULL)
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_step_2)
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(output, train_data_dir=data, max_train_steps=2, checkpointing_steps=1)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"cannot write checkpoint-2 in {output} (" in err and f" GiB free there): {DISK_FULL}" in err, err
    assert "Traceback" not in err
    assert sorted(name for name in os.listdir(output) if "checkpoint" in name) == ["checkpoint-1"]


def test_a_full_disk_at_the_final_save_is_one_line_naming_the_checkpoint_to_go_on_from(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from diffusers_sr3 import SR3UNet2DModel

    def disk_full(self, *args, **kwargs):
        raise SafetensorError(DISK_FULL)

    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(output, train_data_dir=data, max_train_steps=2, checkpointing_steps=1)
    with monkeypatch.context() as patch:
        patch.setattr(SR3UNet2DModel, "save_pretrained", disk_full)
        assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"cannot write the trained pipeline in {output} (" in err and f" GiB free there): {DISK_FULL}" in err, err
    assert f"go on from {output / 'checkpoint-2'} with --resume_from_checkpoint latest" in err, err
    assert "Traceback" not in err
    # Going on as the message says writes the pipeline.
    assert run_script(SR_SCRIPT, as_argv(dict(options, resume_from_checkpoint="latest")), monkeypatch) == 0
    assert (output / "model_index.json").is_file() and (output / "unet").is_dir()


def test_a_safetensors_error_outside_the_checkpoints_is_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    import diffusers_sr3.training.trainer as trainer

    def disk_full(config):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(trainer, "train", disk_full)
    argv = as_argv(fast_options(tmp_path / "out", train_data_dir=str(tmp_path)))
    assert run_script(SR_SCRIPT, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"error: {DISK_FULL}" in err and "Traceback" not in err, err


def test_sigterm_stops_training_as_ctrl_c_does_and_exits_143(tmp_path, monkeypatch, capsys):
    import signal

    from diffusers_sr3.training.trainer import Trainer

    class Unhandled(Exception):
        pass

    def unhandled(signum, frame):
        raise Unhandled("SIGTERM reached the handler that was there before the run")

    train_step, steps = Trainer._train_step, []

    def terminated_at_step_2(self, loop, batch):
        steps.append(loop.global_step)
        if len(steps) == 2:  # what a scheduler sends before killing the job
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, loop, batch)

    monkeypatch.setattr(Trainer, "_train_step", terminated_at_step_2)
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(output, train_data_dir=data, max_train_steps=4, checkpointing_steps=1)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the run's handler is gone with it
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert f"interrupted; the last complete checkpoint is {output / 'checkpoint-1'}: go on from it with " in err, err
    assert not (output / "model_index.json").exists() and "Traceback" not in err


@pytest.mark.parametrize("kind", ["parquet", "imagefolder"])
def test_streamed_local_datasets(tmp_path, kind):
    if kind == "parquet":
        source = dict(dataset_name="parquet", train_data_files=[make_parquet(str(tmp_path / "t.parquet"), count=4)])
    else:
        source = dict(dataset_name="imagefolder", train_data_dir=make_image_folder(str(tmp_path / "i"), bad=False))
    output = train(TrainingConfig(**fast_options(tmp_path / "out", streaming=True, max_train_steps=3, **source)))
    summary = json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())
    assert summary["global_step"] == 3
    assert summary["skipped_during_training"] == (1 if kind == "parquet" else 0)
    assert SR3Pipeline.from_pretrained(output).config.upscale_factor == 4
    with pytest.raises(ValueError, match="--max_train_steps"):
        train(TrainingConfig(**fast_options(tmp_path / "o2", streaming=True, max_train_steps=None, **source)))
    with pytest.raises(ValueError, match="--dataset_repeats 2: .*streamed.* has no passes to repeat"):
        train(
            TrainingConfig(
                **fast_options(tmp_path / "o3", streaming=True, max_train_steps=3, dataset_repeats=2, **source)
            )
        )
    with pytest.raises(ValueError, match="--cache_images: .*streamed.* has no end to cache up to"):
        train(
            TrainingConfig(
                **fast_options(tmp_path / "o4", streaming=True, max_train_steps=3, cache_images=True, **source)
            )
        )


@pytest.mark.parametrize("layout", ["folders", "lmdb"])
def test_original_prepared_layout(tmp_path, layout):
    if layout == "folders":
        root = make_prepared_layout(str(tmp_path / "ffhq_8_32"), count=4)
    else:
        root = make_lmdb(str(tmp_path / "ffhq_8_32_lmdb"), count=4)
    # Two dataloader workers: each opens the LMDB itself (an environment must not cross a fork).
    options = fast_options(tmp_path / "out", train_data_dir=root, max_train_steps=2, dataloader_num_workers=2)
    output = train(TrainingConfig(**options))
    summary = json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())
    assert summary["global_step"] == 2 and summary["epochs"] == 1


@needs_bfloat16_kernels
def test_programmatic_sources_and_options(tmp_path):
    """A list of PIL images as a torch dataset, with the objective's options, accumulation and checkpointing."""
    from test_data import random_image

    images = [random_image(40, 40, index) for index in range(4)]
    random_image(64, 64, 9).save(tmp_path / "val.png")
    output = train(
        TrainingConfig(
            **fast_options(
                tmp_path / "out",
                train_dataset=images,
                prediction_type="v_prediction",
                loss_type="l2",
                snr_gamma=5.0,
                per_sample_timestep=True,
                noise_level_embedding_scale=1000.0,
                beta_schedule="cosine",
                num_train_timesteps=50,
                gradient_accumulation_steps=2,
                gradient_checkpointing=True,
                lr_blur_sigma=1.0,
                max_train_steps=2,
                lr_scheduler="cosine",
                mixed_precision="bf16",
                validation_images=[os.path.join(str(tmp_path), "val.png")],
            )
        )
    )
    pipeline = SR3Pipeline.from_pretrained(output)
    assert pipeline.unet.dtype == torch.float32  # bf16 autocast in training, float32 weights saved
    # What sampling needs is stored with the model.
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.scheduler.config.num_train_timesteps == 50
    assert pipeline.unet.config.noise_level_embedding_scale == 1000.0
    summary = json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())
    assert summary["total_batch_size"] == 4 and summary["global_step"] == 2
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    # One validation image given: the grid has one row of LR | bicubic | SR3 | HR cells.
    from PIL import Image

    assert Image.open(os.path.join(output, "validation.png")).size == (4 * 32, 32)
    assert (
        "## Validation metrics (validation images)" in open(os.path.join(output, "README.md"), encoding="utf-8").read()
    )


def test_the_summary_says_how_much_of_the_training_waited_for_data(tmp_path):
    """`data_wait_fraction`: the share of the training time spent waiting for the data loader's next batch, which
    tells a device starved by its loader (more --dataloader_num_workers) from a busy one."""
    import time

    from test_data import random_image

    class SlowImages(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            time.sleep(1.5)
            return random_image(40, 40, index)

    output = train(TrainingConfig(**fast_options(tmp_path / "out", train_dataset=SlowImages(), max_train_steps=2)))
    summary = json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())
    # Most of the time on an idle machine; a loaded one (CI beside other jobs) computes several times slower, so waits
    # less of it: with 0.5 s sleeps it measured 0.13-0.27 at loads of 5-7 on 2 cores. A loader that is not timed
    # measures 0.
    assert summary["global_step"] == 2 and 0.15 < summary["data_wait_fraction"] <= 1


def test_model_sources(tmp_path):
    """--model_config_name_or_path, --pretrained_model_name_or_path and --resume_from_original."""
    from conftest import FIXTURES, tiny_unet_config
    from test_data import random_image

    images = [random_image(32, 32, index) for index in range(2)]
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(tiny_unet_config(dropout=0.1)), encoding="utf-8")
    first = train(
        TrainingConfig(
            **fast_options(
                tmp_path / "a",
                preset=None,
                model_config_name_or_path=str(config_dir),
                train_dataset=images,
                max_train_steps=1,
            )
        )
    )
    assert SR3Pipeline.from_pretrained(first).unet.config.dropout == 0.1
    # Fine-tuning a saved pipeline starts from its weights and keeps its schedule.
    second = train(
        TrainingConfig(
            **fast_options(
                tmp_path / "b",
                preset=None,
                pretrained_model_name_or_path=first,
                train_dataset=images,
                max_train_steps=1,
                learning_rate=1e-12,
            )
        )
    )
    before = load_file(os.path.join(first, "unet", "diffusion_pytorch_model.safetensors"))
    after = load_file(os.path.join(second, "unet", "diffusion_pytorch_model.safetensors"))
    for name in before:
        torch.testing.assert_close(before[name], after[name], atol=1e-6, rtol=0)
    # The original checkpoint: its own network, factor (x4) and 100-step schedule.
    third = train(
        TrainingConfig(
            **fast_options(
                tmp_path / "c",
                preset=None,
                resume_from_original=str(FIXTURES / "sr3_tiny_I10_E1_gen.pth"),
                original_config=str(FIXTURES / "sr3_tiny_config.json"),
                train_dataset=images,
                max_train_steps=1,
            )
        )
    )
    pipeline = SR3Pipeline.from_pretrained(third)
    assert pipeline.unet.config.block_out_channels == 8 and pipeline.config.upscale_factor == 4
    assert pipeline.scheduler.config.num_train_timesteps == 100
    with pytest.raises(ValueError, match="go together"):
        TrainingConfig(resume_from_original="x.pth")
    with pytest.raises(ValueError, match="conditional UNet"):
        train(TrainingConfig(**fast_options(tmp_path / "d", preset="tiny_uncond", train_dataset=images)))


def test_an_original_checkpoint_of_the_other_task_is_refused_naming_its_script(tmp_path):
    from conftest import FIXTURES
    from test_data import random_image

    options = fast_options(
        tmp_path / "out",
        preset=None,
        task="uncond",
        resume_from_original=str(FIXTURES / "sr3_tiny_I10_E1_gen.pth"),
        original_config=str(FIXTURES / "sr3_tiny_config.json"),
        train_dataset=[random_image(32, 32, index) for index in range(2)],
    )
    message = r"--resume_from_original .*_gen.pth is a super-resolution model .*train_sr3.py \(task='sr'\)"
    with pytest.raises(ValueError, match=message):
        train(TrainingConfig(**options))
    assert not (tmp_path / "out").exists()


def test_presets_match_the_original_configurations():
    sr = get_preset("sr_16_128")
    assert sr.unet["channel_multipliers"] == (1, 2, 4, 8, 8) and sr.unet["dropout"] == 0.2
    assert (sr.resolution, sr.upscale_factor, sr.unet["layers_per_block"]) == (128, 8, 2)
    big = get_preset("sr_64_512")  # config/sr_sr3_64_512.json: inner 32, attn_res commented out, 2 res blocks
    assert big.unet["channel_multipliers"] == (1, 2, 4, 8, 8, 16, 16) and big.unet["layers_per_block"] == 2
    assert (big.unet["block_out_channels"], big.unet["attention_resolutions"]) == (32, ())
    assert (big.resolution, big.upscale_factor, big.unet["dropout"]) == (512, 8, 0.0)
    uncond = get_preset("uncond_128")
    assert uncond.unet["in_channels"] == 3 and uncond.upscale_factor is None
    assert uncond.unet["channel_multipliers"] == (1, 1, 2, 2, 4, 4)
    for preset in PRESETS.values():
        assert preset.unet["sample_size"] == preset.resolution
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


def test_command_line_maps_onto_the_config():
    import argparse
    import dataclasses

    parser = add_training_arguments(argparse.ArgumentParser(), num_validation_images=2)
    args = parser.parse_args(
        ["--no-random_flip", "--use_ema", "--train_images", "a.png", "b.png", "--snr_gamma", "5", "--seed", "3"]
    )
    config = config_from_args(args, task="uncond")
    assert config.num_validation_images == 2
    config.num_validation_images = 4
    assert config.task == "uncond" and config.random_flip is False and config.use_ema is True
    assert config.train_images == ["a.png", "b.png"] and config.snr_gamma == 5.0 and config.seed == 3
    defaults = TrainingConfig(task="uncond")
    for field in dataclasses.fields(TrainingConfig):
        if field.name not in ("random_flip", "use_ema", "train_images", "snr_gamma", "seed", "train_dataset"):
            assert getattr(config, field.name) == getattr(defaults, field.name), field.name
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss_type", "l3"])
    with pytest.raises(ValueError, match="train_batch_size must be at least 1"):
        TrainingConfig(train_batch_size=0)


def test_a_tilde_in_path_options_is_the_home_folder(tmp_path, monkeypatch):
    # As given by a shell that does not expand it: `--output_dir=~/...`, a quoted "~/...", cmd.exe.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    parser = add_training_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--output_dir=~/run", "--train_data_dir", "~/photos", "--validation_images", "~/a.png", "~/b.png"]
    )
    config = config_from_args(args)
    assert config.output_dir == str(tmp_path / "run") and config.train_data_dir == str(tmp_path / "photos")
    assert config.validation_images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    # Not a path: a value that merely starts with `~` is kept.
    assert parser.parse_args(["--tracker_project_name", "~mine"]).tracker_project_name == "~mine"


def test_film_grain_options_are_checked_and_reach_the_config():
    import argparse

    parser = add_training_arguments(argparse.ArgumentParser(), num_validation_images=2)
    config = config_from_args(parser.parse_args(["--film_grain_max", "6", "--film_grain_probability", "0.3"]))
    assert config.film_grain_max == 6.0 and config.film_grain_probability == 0.3
    assert TrainingConfig().film_grain_max == 0.0
    with pytest.raises(ValueError, match="film_grain_max must not be negative"):
        TrainingConfig(film_grain_max=-1)
    with pytest.raises(ValueError, match="film_grain_probability must lie in"):
        TrainingConfig(film_grain_max=6, film_grain_probability=1.5)
    with pytest.raises(ValueError, match="--film_grain_max applies to super-resolution only"):
        TrainingConfig(task="uncond", film_grain_max=6)


@pytest.mark.parametrize("fmt", ["lmdb", "folder", "parquet"])
def test_trains_on_what_sr3_prepare_writes(tmp_path, fmt):
    """The readers against the real writer: `sr3 prepare` output (LMDB, folders, parquet) trains directly."""
    from diffusers_sr3.cli import main as sr3

    source = make_image_folder(str(tmp_path / "photos"), count=4, size=(48, 40), bad=False)
    prepared = str(tmp_path / "prepared")
    assert sr3(["prepare", source, "--out", prepared, "--sizes", "8,32", "--n_worker", "0", "--format", fmt]) == 0
    if fmt == "parquet":
        data = dict(train_data_files=sorted(glob.glob(os.path.join(prepared, "data", "*.parquet"))))
    else:
        data = dict(train_data_dir=prepared)
    output = train(TrainingConfig(**fast_options(tmp_path / "out", max_train_steps=2, **data)))
    summary = json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())
    assert summary["global_step"] == 2 and summary["skipped_during_training"] == 0


def test_channels_last_and_fused_optimizer_train_the_same_model(tmp_path):
    from test_data import make_image_folder

    data = make_image_folder(tmp_path / "images", count=4)
    outputs = {}
    for name, overrides in {
        "plain": dict(channels_last=False, fused_optimizer=False),
        "fast": dict(channels_last=True, fused_optimizer=True),
    }.items():
        output = train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / name, **overrides)))
        outputs[name] = SR3Pipeline.from_pretrained(output).unet.state_dict()
    for key, value in outputs["plain"].items():
        torch.testing.assert_close(outputs["fast"][key], value, atol=1e-5, rtol=1e-4)


def test_cpu_training_takes_the_cores_that_accelerate_launch_left_it_one_of(tmp_path, monkeypatch):
    """`accelerate launch` without --cpu sets OMP_NUM_THREADS=1, which would train on one core: training on CPU then
    uses the cores this process may run on, shared among the machine's processes; `num_threads` decides when given; a
    plain Python call keeps torch's setting; the caller's thread count is restored afterwards."""
    data = make_image_folder(tmp_path / "images", count=4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    caller_threads = torch.get_num_threads()

    def trained_with(name, starting_threads, **overrides):
        torch.set_num_threads(starting_threads)
        try:
            output = train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / name, **overrides)))
            assert torch.get_num_threads() == starting_threads
        finally:
            torch.set_num_threads(caller_threads)
        return json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())["cpu_threads"]

    assert trained_with("plain-call", 1) == 1
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert trained_with("launched", 1) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert trained_with("two-processes-per-machine", 1) == 2
    assert trained_with("asked-for-three", 1, num_threads=3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert trained_with("launched-with-threads-given", 2) == 2
    with pytest.raises(ValueError, match="num_threads must be at least 1"):
        TrainingConfig(num_threads=0)


def test_allow_tf32_lasts_only_as_long_as_the_run(tmp_path, monkeypatch):
    """`train(TrainingConfig(allow_tf32=True))` from a notebook leaves the process's float32 matmul precision as the
    caller had it, after a finished run and after one interrupted (TF32 would go on lowering every later sampling's
    precision in that kernel)."""
    import diffusers_sr3.training.trainer as trainer

    data = make_image_folder(tmp_path / "images", count=4)
    caller_precision = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / precision, allow_tf32=True)))
            assert torch.get_float32_matmul_precision() == precision
        torch.set_float32_matmul_precision("highest")

        def interrupted(output_dir):
            assert torch.backends.cuda.matmul.allow_tf32  # the run had switched TF32 on
            raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "remove_stale_temporaries", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / "stopped", allow_tf32=True)))
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(caller_precision)


@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch before 2.9 has no per-backend TF32 API"
)
def test_a_run_takes_tf32_switched_on_with_torchs_per_backend_api(tmp_path):
    """torch 2.9's TF32 setting, `torch.backends.cuda.matmul.fp32_precision = "tf32"` (the one its docs recommend),
    makes `torch.get_float32_matmul_precision()` raise ("mix of the legacy and new APIs"): `train()` must not read
    it, with or without `allow_tf32`, and puts the per-backend settings back exactly as they were."""
    data = make_image_folder(tmp_path / "images", count=4)
    backends = (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn, torch.backends.mkldnn.matmul)
    caller_settings = [backend.fp32_precision for backend in backends]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        settings = [backend.fp32_precision for backend in backends]
        for allow_tf32 in (False, True):
            options = fast_options(tmp_path / f"tf32-{allow_tf32}", allow_tf32=allow_tf32, max_train_steps=1)
            train(TrainingConfig(train_data_dir=str(data), **options))
            assert [backend.fp32_precision for backend in backends] == settings
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / "ieee", allow_tf32=True)))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        for backend, setting in zip(backends, caller_settings):
            backend.fp32_precision = setting


@needs_bfloat16_kernels
def test_bf16_training_on_a_cpu_without_bfloat16_units_warns(tmp_path, monkeypatch, caplog):
    """bfloat16 autocast is emulated on AVX2-only CPUs, many times slower than float32: the run says so."""
    import diffusers_sr3.training.trainer as trainer

    data = make_image_folder(tmp_path / "images", count=4)
    for fast, name in ((True, "amx"), (False, "avx2")):
        monkeypatch.setattr(trainer, "fast_bfloat16", lambda device, fast=fast: fast)
        caplog.clear()
        with caplog.at_level("WARNING", logger=trainer.logger.name):
            train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / name, mixed_precision="bf16")))
        warned = [record.getMessage() for record in caplog.records if "bfloat16 is emulated" in record.getMessage()]
        assert len(warned) == (0 if fast else 1)


def test_bf16_training_where_torchs_kernels_are_held_below_avx512_is_refused(tmp_path, monkeypatch, caplog):
    """`ATEN_CPU_CAPABILITY=avx2` on a CPU with AMX: torch's bfloat16 attention fails there, so the run stops before
    the model is built, saying why and what to do, as `sr3 upscale --backend bf16` does; before, it warned and went on
    to torch's traceback."""
    import diffusers_sr3.training.trainer as trainer

    data = make_image_folder(tmp_path / "images", count=4)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # read by torch at start: its own kernels stay as they are
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer.Trainer, "_prepare_model", no_model)
    message = (
        r"--mixed_precision bf16: torch's CPU kernels are held at AVX2 \(ATEN_CPU_CAPABILITY=avx2\), .*: unset "
        r"ATEN_CPU_CAPABILITY, or use --mixed_precision no"
    )
    with pytest.raises(ValueError, match=message):
        train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / "out", mixed_precision="bf16")))


def test_residual_training_targets_the_detail_and_is_saved(tmp_path):
    from test_data import make_image_folder

    from diffusers_sr3.noise import make_scheduler, training_betas
    from diffusers_sr3.training.objective import noise_batch

    data = make_image_folder(tmp_path / "images", count=4)
    output = train(TrainingConfig(train_data_dir=str(data), **fast_options(tmp_path / "out", residual=True)))
    pipeline = SR3Pipeline.from_pretrained(output)
    assert pipeline.config.residual is True
    hr, condition = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    betas = training_betas(make_scheduler("ddpm", n_timestep=100))
    batch = noise_batch(pipeline.unet, betas, hr, condition, prediction_type="sample", residual=True)
    torch.testing.assert_close(batch.target, hr - condition)
    with pytest.raises(ValueError, match="residual training needs a condition"):
        noise_batch(pipeline.unet, betas, hr, None, residual=True)


def test_model_card_has_metadata_results_command_and_both_loaders(tmp_path, monkeypatch):
    import yaml
    from test_data import make_image_folder

    data = make_image_folder(tmp_path / "images", count=4)
    options = fast_options(tmp_path / "out")
    argv = as_argv(dict(options, train_data_dir=str(data)))
    assert run_script(SR_SCRIPT, argv, monkeypatch) in (0, None)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and "sr3" in metadata["tags"]
    assert metadata["license"] == "apache-2.0"
    results = metadata["model-index"][0]["results"][0]
    assert {metric["type"] for metric in results["metrics"]} == {"psnr", "ssim", "consistency"}
    assert "accelerate launch " in card and "train_sr3.py" in card and "--max_train_steps 4" in card
    assert "SR3Pipeline.from_pretrained" in card and "trust_remote_code=True" in card
    assert "## Limitations" in card and "![LR | bicubic | SR3 | HR](validation.png)" in card


def test_training_command_of_a_python_call():
    from diffusers_sr3.training.config import training_command

    command = training_command(TrainingConfig(preset="tiny", learning_rate=3e-4), argv=["python"])
    assert "train(TrainingConfig(" in command and "learning_rate=0.0003" in command and "preset='tiny'" in command


def test_a_unet_config_dict_needs_no_file(tmp_path):
    """TrainingConfig(unet_config=...) builds that network (Python only), exclusive with the other model sources."""
    from conftest import tiny_unet_config

    from diffusers_sr3.training.config import add_training_arguments
    from diffusers_sr3.training.trainer import build_model

    config = tiny_unet_config(dropout=0.1)
    setup = build_model(TrainingConfig(unet_config=config, resolution=32, upscale_factor=4))
    assert setup.unet.config.dropout == 0.1 and setup.description == "the given UNet config"
    assert setup.unet.config.block_out_channels == config["block_out_channels"]
    assert setup.scheduler.config.num_train_timesteps == 2000  # SR3's schedule
    with pytest.raises(ValueError, match="at most one of unet_config"):
        TrainingConfig(unet_config=config, model_config_name_or_path="cfg/")
    parser = add_training_arguments(__import__("argparse").ArgumentParser())
    assert "--unet_config" not in parser.format_help()


def test_the_saved_pipeline_samples_with_the_chosen_sampler_and_sampling_settings(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler

    from diffusers_sr3.training.trainer import build_model

    data = make_image_folder(tmp_path / "images", count=4)
    chosen = dict(
        sampler="ddim", fidelity_steps=3, detail_steps=5, detail_strength=0.5, detail_eta=1.0, detail_window_size=16
    )
    options = fast_options(tmp_path / "out", residual=True, prediction_type="sample", **chosen)
    assert run_script(SR_SCRIPT, as_argv(dict(options, train_data_dir=str(data))), monkeypatch) in (0, None)
    pipeline = SR3Pipeline.from_pretrained(tmp_path / "out")
    assert type(pipeline.scheduler) is DDIMScheduler
    assert pipeline.scheduler.config.prediction_type == "sample"
    assert pipeline.detail_settings() == dict(
        num_inference_steps=5, strength=0.5, eta=1.0, guidance_scale=1.0, window_size=16, parallel_guidance_weight=1.0
    )
    assert pipeline.config.fidelity_steps == 3
    # Unset, the saved pipeline keeps the defaults (the training DDPM, 50 steps from noise).
    assert build_model(TrainingConfig(preset="tiny")).sampling_settings == {}

    # Settings the saved pipeline would refuse are refused before any training, naming the option.
    refused = {
        "detail_strength 0.5 starts detail mode from the fidelity answer": dict(detail_strength=0.5),
        "--detail_eta applies to samplers that take eta": dict(prediction_type="sample", detail_eta=1.0),
        "detail_steps must be a positive integer": dict(detail_steps=0),
        "fidelity_steps must be a positive integer": dict(fidelity_steps=0),
        "detail_window_size must be 0 \\(off\\) or a positive multiple": dict(detail_window_size=6),
        "EulerAncestralDiscreteScheduler cannot sample a model that predicts 'sample'": dict(
            sampler="euler_ancestral", prediction_type="sample"
        ),
        "--sampler 'fast' is not a scheduler": dict(sampler="fast"),
    }
    for message, change in refused.items():
        with pytest.raises(ValueError, match=message):
            build_model(TrainingConfig(**fast_options(tmp_path / "refused", **change)))
    with pytest.raises(ValueError, match="--detail_steps apply to super-resolution only"):
        TrainingConfig(task="uncond", preset="tiny_uncond", detail_steps=5)
    with pytest.raises(ValueError, match="--fidelity_steps apply to super-resolution only"):
        TrainingConfig(task="uncond", preset="tiny_uncond", fidelity_steps=2)
    assert not (tmp_path / "refused").exists()


def test_an_x1_model_trains_validates_and_saves(tmp_path, monkeypatch):
    # Its validation input is the output's size: consistency takes a factor of 1 (a refusal lost the whole run).
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    options = fast_options(tmp_path / "x1", train_data_dir=data, upscale_factor=1, max_train_steps=1)
    assert run_script(SR_SCRIPT, as_argv(options), monkeypatch) == 0
    assert SR3Pipeline.from_pretrained(str(tmp_path / "x1")).config.upscale_factor == 1


def test_a_cascade_is_refused_naming_the_stage_folders_to_fine_tune(tmp_path, monkeypatch, capsys):
    from conftest import tiny_unet_config

    from diffusers_sr3 import SR3CascadePipeline, SR3UNet2DModel, make_scheduler

    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    scheduler = make_scheduler("ddpm")
    base = SR3UnconditionalPipeline(SR3UNet2DModel(**tiny_unet_config(in_channels=3)), scheduler)
    stage = SR3Pipeline(SR3UNet2DModel(**tiny_unet_config()), scheduler, upscale_factor=4)
    cascade = tmp_path / "cascade"
    SR3CascadePipeline.from_stages(base, [stage, stage]).save_pretrained(cascade)
    for script, expected in (
        (UNCOND_SCRIPT, f"fine-tune one of its models instead: {cascade / 'base'}"),
        (SR_SCRIPT, f"instead: {cascade / 'stage_1'} or {cascade / 'stage_2'}"),
    ):
        options = fast_options(tmp_path / "out", pretrained_model_name_or_path=str(cascade), train_data_dir=data)
        del options["preset"]
        assert run_script(script, as_argv(options), monkeypatch) == 2
        error = capsys.readouterr().err.strip()
        assert "holds a SR3CascadePipeline" in error and error.endswith(expected) and "\n" not in error
    # The folders it names are what to fine-tune.
    options = fast_options(tmp_path / "out", preset=None, pretrained_model_name_or_path=str(cascade / "stage_1"))
    assert SR3Pipeline.from_pretrained(train(TrainingConfig(**dict(options, train_data_dir=data, max_train_steps=1))))
    SR3CascadePipeline.from_stages(None, [stage]).save_pretrained(tmp_path / "sr_only")
    options = fast_options(tmp_path / "out2", preset=None, pretrained_model_name_or_path=str(tmp_path / "sr_only"))
    with pytest.raises(ValueError, match="it has no unconditional generator to fine-tune here .*sr_only.stage_1"):
        train(TrainingConfig(**dict(options, train_data_dir=data, task="uncond")))


def test_an_unconditional_model_trained_at_another_resolution_validates_and_is_shown_at_it(tmp_path, monkeypatch):
    """--resolution below the preset's sample_size: validation samples and the card's snippet use the trained size."""
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    output = tmp_path / "out"
    options = fast_options(output, preset="tiny_uncond", train_data_dir=data, resolution=16)
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 0
    # Two 16x16 samples side by side.
    assert PIL.Image.open(output / "validation.png").size == (32, 16)
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "unconditional 16x16" in card and "pipe(batch_size=4, num_inference_steps=100, height=16, width=16)" in card
    # At its own sample_size the snippet needs no size.
    output = tmp_path / "own"
    options = fast_options(output, preset="tiny_uncond", train_data_dir=data, max_train_steps=1)
    assert run_script(UNCOND_SCRIPT, as_argv(options), monkeypatch) == 0
    assert "pipe(batch_size=4, num_inference_steps=100).images" in (output / "README.md").read_text(encoding="utf-8")


def test_a_python_script_card_records_its_python_call(tmp_path, monkeypatch):
    """`python t.py` calling train(TrainingConfig(...)): the card shows that call, not `accelerate launch t.py`,
    which would record no option and claim a launcher that was never used."""
    data = make_image_folder(str(tmp_path / "images"), count=4, bad=False)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "t.py")])
    output = train(TrainingConfig(train_data_dir=data, **fast_options(tmp_path / "out")))
    card = open(os.path.join(output, "README.md"), encoding="utf-8").read()
    assert "accelerate launch" not in card and "t.py" not in card
    assert "```python\nfrom diffusers_sr3.training import TrainingConfig, train" in card
    assert "train(TrainingConfig(" in card and "preset='tiny'," in card and f"train_data_dir={data!r}," in card


def test_only_the_command_line_that_was_parsed_is_recorded(monkeypatch):
    from diffusers_sr3.training.config import training_command

    parser = add_training_arguments(argparse.ArgumentParser())
    monkeypatch.setattr(sys, "argv", ["examples/train_sr3.py", "--preset", "tiny", "--train_data_dir", "faces/"])
    command = training_command(config_from_args(parser.parse_args(), task="sr"))
    assert command == "accelerate launch examples/train_sr3.py --preset tiny --train_data_dir faces/"
    # A Python caller's own arguments, not the process's: its command line would not train this.
    command = training_command(config_from_args(parser.parse_args(["--preset", "photos_x4"]), task="sr"))
    assert "accelerate launch" not in command and "preset='photos_x4'" in command
    # A config built in Python, in a process started as a .py script.
    monkeypatch.setattr(sys, "argv", ["t.py"])
    command = training_command(TrainingConfig(train_data_dir="faces/", preset="tiny"))
    assert "accelerate launch" not in command and "train_data_dir='faces/'" in command


def test_help_lists_every_preset(monkeypatch, capsys):
    assert run_script(SR_SCRIPT, ["--help"], monkeypatch) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    options = help_text.split("options:", 1)[1]
    listed = options.split("--preset PRESET", 1)[1].split("--model_config_name_or_path", 1)[0]
    assert all(name in listed.replace(",", " ").split() for name in PRESETS), listed


def test_help_shows_the_example_command_as_typed(monkeypatch, capsys):
    # A plain docstring's backslash-newline ran the command's two lines together ("--use_ema         --train...").
    for script in (SR_SCRIPT, UNCOND_SCRIPT):
        assert run_script(script, ["--help"], monkeypatch) == 0
        assert " --use_ema \\\n        --train_batch_size 16 " in capsys.readouterr().out


def test_the_end_of_run_summary_names_the_images_skipped_at_scan(tmp_path, capsys):
    trainer = Trainer(TrainingConfig(**fast_options(tmp_path)))
    trainer.summary = dict(
        global_step=4,
        steps_this_run=4,
        train_seconds=1.0,
        steps_per_second=4.0,
        data_wait_fraction=0.1,
        num_processes=1,
        cpu_threads=2,
        total_batch_size=2,
        stopped_by_time_limit=False,
        final_loss=0.5,
        skipped_at_scan={},
        skipped_during_training=0,
        checkpoints=[],
        output_dir=str(tmp_path),
    )
    trainer._print_summary()
    assert "  skipped images: 0 at scan, 0 read failures during training\n" in capsys.readouterr().out
    trainer.summary["skipped_at_scan"] = {"small": 2}
    trainer._print_summary()
    assert "  skipped images: 2 at scan {'small': 2}, 0 read failures during training\n" in capsys.readouterr().out


def test_training_help_states_each_default_once():
    import argparse
    import re

    parser = add_training_arguments(argparse.ArgumentParser())
    for action in parser._actions:
        if action.help and action.dest != "help":
            assert len(re.findall(r"\(default", action.help)) <= 1, action.help
            assert "(default: None)" not in action.help, action.help


def test_super_resolution_model_options_are_refused_for_unconditional_training():
    import dataclasses

    parser = add_training_arguments(argparse.ArgumentParser())
    for option, value in (("upscale_factor", "4"), ("condition_noise_level", "0.1")):
        args = parser.parse_args([f"--{option}", value])
        with pytest.raises(ValueError, match=f"--{option} applies to super-resolution only"):
            config_from_args(args, task="uncond")
        assert config_from_args(args, task="sr").task == "sr"
    # Training records level 0 for every unconditional model (dataclasses.replace checks the config again).
    config = dataclasses.replace(TrainingConfig(task="uncond"), condition_noise_level=0.0)
    assert config.condition_noise_level == 0.0 and config.upscale_factor is None
