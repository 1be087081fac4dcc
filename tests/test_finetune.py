"""Fine-tuning keeps the model's objective: residual, residual scale, prediction type, levels, schedule, factor.

Written against whatever model ships in the package: every expectation is read from the packaged pipeline itself;
the journey of a user's own photos runs on a tiny pipeline laid out like it.
"""

import argparse
import json
import logging
import os

import PIL.Image
import pytest
import torch
from conftest import low_resolution_unet
from safetensors.torch import load_file
from test_data import random_image

from diffusers_sr3 import SR3Pipeline, make_scheduler
from diffusers_sr3.commands.upscale import _SavedConfigs
from diffusers_sr3.image_processing import degrade
from diffusers_sr3.metrics import image_quality
from diffusers_sr3.noise import training_betas
from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_split
from diffusers_sr3.pipelines.pipeline_sr3 import SAMPLING_CONFIG_KEYS
from diffusers_sr3.pretrained import DEFAULT_MODEL, DEFAULT_STEPS, default_model_path
from diffusers_sr3.training import TrainingConfig, add_training_arguments, config_from_args, train
from diffusers_sr3.training.trainer import build_model


def fine_tune_options(output_dir, **overrides):
    options = dict(
        pretrained_model_name_or_path=default_model_path(),
        output_dir=str(output_dir),
        train_batch_size=2,
        max_train_steps=2,
        learning_rate=1e-5,
        lr_warmup_steps=1,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=1,
        validation_steps_count=2,
        report_to="none",
        seed=0,
    )
    options.update(overrides)
    return options


def held_out_psnr(pipeline, hr):
    lr, _ = degrade(hr, pipeline.config.upscale_factor)
    generator = torch.Generator().manual_seed(0)
    sr = pipeline((lr + 1) / 2, num_inference_steps=DEFAULT_STEPS, generator=generator, output_type="pt").images
    return image_quality(sr * 2 - 1, hr, lr)["psnr"]


@pytest.mark.slow
def test_fine_tuning_the_packaged_model_keeps_its_objective_and_quality(tmp_path):
    packaged = SR3Pipeline.from_pretrained(default_model_path())
    packaged.set_progress_bar_config(disable=True)
    size = packaged.unet.config.sample_size
    train_paths, heldout_paths = photo_split(packaged_photo_paths(), heldout=0.25)
    crops = photo_crops(train_paths, size, count=4, seed=0, max_side=512)
    output = train(TrainingConfig(**fine_tune_options(tmp_path / "tuned", train_dataset=crops)))

    tuned = SR3Pipeline.from_pretrained(output)
    tuned.set_progress_bar_config(disable=True)
    # Saved from a loaded pipeline, it names neither the folder it came from nor the one it went to.
    from test_metadata import assert_truthful

    assert_truthful(output)
    with open(os.path.join(output, "training_summary.json"), encoding="utf-8") as handle:
        assert json.load(handle)["output_dir"] == "tuned"
    for key in ("residual", "upscale_factor", "condition_noise_level"):
        assert tuned.config[key] == packaged.config[key], key
    if packaged.config.residual:
        assert tuned.config.residual_scale == pytest.approx(packaged.config.residual_scale)
    assert tuned.scheduler.config.prediction_type == packaged.scheduler.config.prediction_type
    assert type(tuned.scheduler) is type(packaged.scheduler)  # it samples the way it did
    for key in SAMPLING_CONFIG_KEYS:  # ... with its studied detail settings
        assert tuned.config[key] == packaged.config[key], key
    torch.testing.assert_close(training_betas(tuned.scheduler), training_betas(packaged.scheduler))
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(tuned.unet.config) == public(packaged.unet.config)

    # A few steps of fine-tuning leave the model sampling like itself on held-out crops.
    hr = photo_crops(heldout_paths, size, count=3, seed=1, max_side=512, output_type="pt")
    before, after = held_out_psnr(packaged, hr), held_out_psnr(tuned, hr)
    assert abs(after - before) < 0.5, (before, after)


def test_explicit_objective_changes_are_refused_unless_allowed(tmp_path):
    packaged = SR3Pipeline.from_pretrained(default_model_path())
    own_prediction = packaged.scheduler.config.prediction_type
    other_prediction = "epsilon" if own_prediction != "epsilon" else "v_prediction"
    changes = {
        "residual": dict(residual=not packaged.config.residual),
        "prediction_type": dict(prediction_type=other_prediction),
        # An x8 fine-tune of an x4 model (the network's weights learnt x4's missing detail).
        "upscale_factor": dict(upscale_factor=2 * packaged.config.upscale_factor),
    }
    for name, change in changes.items():
        with pytest.raises(ValueError, match=rf"--(no-)?{name}\b.*would change the objective.*allow_objective_change"):
            build_model(TrainingConfig(**fine_tune_options(tmp_path, **change)))
        setup = build_model(TrainingConfig(**fine_tune_options(tmp_path, allow_objective_change=True, **change)))
        assert getattr(setup, name) == next(iter(change.values()))
        assert setup.sampling_settings == {}  # studied for the old objective: the new model starts from the defaults
    # The scale the network reads its noise level through (a UNet setting, so its own check).
    own_scale = packaged.unet.config.noise_level_embedding_scale
    with pytest.raises(ValueError, match=r"--noise_level_embedding_scale 1 \(the model's own: .*would change"):
        build_model(TrainingConfig(**fine_tune_options(tmp_path, noise_level_embedding_scale=1.0)))
    options = fine_tune_options(tmp_path, noise_level_embedding_scale=1.0, allow_objective_change=True)
    assert build_model(TrainingConfig(**options)).unet.config.noise_level_embedding_scale == 1.0
    assert build_model(TrainingConfig(**fine_tune_options(tmp_path, noise_level_embedding_scale=own_scale)))
    # Options equal to the model's own, and the sampling default condition_noise_level, are no change.
    same = dict(residual=packaged.config.residual, prediction_type=own_prediction, condition_noise_level=0.0)
    setup = build_model(TrainingConfig(**fine_tune_options(tmp_path, **same)))
    assert (setup.residual, setup.prediction_type) == (packaged.config.residual, own_prediction)
    assert setup.sampling_settings == {key: packaged.config[key] for key in SAMPLING_CONFIG_KEYS}
    # An option given wins over the model's own; the others are kept.
    setup = build_model(TrainingConfig(**fine_tune_options(tmp_path, detail_steps=7)))
    assert setup.sampling_settings == {
        "detail_steps": 7,
        **{key: packaged.config[key] for key in SAMPLING_CONFIG_KEYS if key != "detail_steps"},
    }


def test_unset_objective_options_mean_inherit_or_new_model_defaults():
    parser = add_training_arguments(argparse.ArgumentParser())
    config = config_from_args(parser.parse_args([]), task="sr")
    assert (config.residual, config.prediction_type, config.condition_noise_level) == (None, None, None)
    assert config_from_args(parser.parse_args(["--no-residual"])).residual is False
    # A new model trains as before: image (not residual) diffusion, epsilon prediction, clean condition.
    setup = build_model(TrainingConfig(preset="tiny"))
    assert (setup.residual, setup.prediction_type, setup.condition_noise_level) == (False, "epsilon", 0.0)
    assert setup.scheduler.config.prediction_type == "epsilon"
    setup = build_model(TrainingConfig(preset="tiny", residual=True, prediction_type="sample"))
    assert (setup.residual, setup.prediction_type) == (True, "sample")
    with pytest.raises(ValueError, match="--residual_scale applies to residual training"):
        TrainingConfig(preset="tiny", residual_scale=2.0)


def test_the_packaged_model_is_fine_tuned_and_loaded_by_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setup = build_model(
        TrainingConfig(**fine_tune_options(tmp_path / "tuned", pretrained_model_name_or_path=DEFAULT_MODEL))
    )
    packaged = SR3Pipeline.from_pretrained(DEFAULT_MODEL)
    assert packaged.config._name_or_path == default_model_path()
    for name, tensor in packaged.unet.state_dict().items():
        assert torch.equal(setup.unet.state_dict()[name], tensor), name
    assert setup.description == f"fine-tuned from {DEFAULT_MODEL}"
    # `sr3 upscale --model sr3-photos-x4` reads its settings before loading it.
    assert _SavedConfigs(DEFAULT_MODEL).get("model_index.json")["detail_steps"] == packaged.config.detail_steps
    # A folder of that name where the user works is theirs, and wins.
    os.mkdir(DEFAULT_MODEL)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        SR3Pipeline.from_pretrained(DEFAULT_MODEL)


def save_guided_photo_model(folder):
    """A tiny pipeline laid out like the packaged one: x4 residual with its own scale, x0 prediction, DDIM, studied
    detail and fidelity settings, an autoguidance guide."""
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(
        low_resolution_unet(),
        scheduler,
        residual=True,
        residual_scale=3.5,
        guidance_unet=low_resolution_unet(seed=1),
        guidance_scale=2.0,
        fidelity_steps=2,
        detail_steps=4,
        detail_strength=0.6,
        detail_eta=1.0,
        detail_window_size=64,
    )
    pipeline.save_pretrained(folder)
    return folder


def my_photos(folder):
    """A user's folder: JPEG and PNG photos, a grayscale one, one stored on its side with an EXIF turn, a tiny one."""
    os.makedirs(folder)
    random_image(80, 96, 0).save(os.path.join(folder, "a.jpg"), quality=95)
    random_image(96, 72, 1).save(os.path.join(folder, "b.png"))
    random_image(72, 72, 2).convert("L").save(os.path.join(folder, "gray.png"))
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    random_image(64, 88, 3).save(os.path.join(folder, "turned.jpg"), exif=exif)
    random_image(40, 40, 4).save(os.path.join(folder, "tiny.jpg"))
    return folder


def test_fine_tuning_a_guided_photo_model_on_a_folder_of_photos_keeps_what_it_carries(tmp_path, caplog):
    base = save_guided_photo_model(str(tmp_path / "base"))
    photos = my_photos(str(tmp_path / "my photos"))
    options = fine_tune_options(
        tmp_path / "tuned",
        pretrained_model_name_or_path=base,
        train_data_dir=photos,
        random_crop=True,
        train_batch_size=8,
        dataset_repeats=2,  # 4 usable photos fill a batch of 8 in two passes
        learning_rate=1e-9,
        use_ema=True,
        ema_use_warmup=True,
        checkpointing_steps=1,
    )
    with caplog.at_level(logging.WARNING):
        output = train(TrainingConfig(**options))
    assert any("autoguidance guide" in record.getMessage() for record in caplog.records)
    summary = json.loads(open(os.path.join(output, "training_summary.json"), encoding="utf-8").read())
    assert summary["global_step"] == 2 and summary["skipped_at_scan"] == {"small": 1}

    before, after = (SR3Pipeline.from_pretrained(folder) for folder in (base, output))
    for key in ("upscale_factor", "residual", "residual_scale", "fidelity_steps", *SAMPLING_CONFIG_KEYS):
        assert after.config[key] == before.config[key], key
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(after.unet.config) == public(before.unet.config)  # pixel-unshuffle network, factor, scale
    assert type(after.scheduler) is type(before.scheduler)
    assert after.scheduler.config.prediction_type == before.scheduler.config.prediction_type
    torch.testing.assert_close(training_betas(after.scheduler), training_betas(before.scheduler))
    # The guide belongs to the model it was an earlier checkpoint of: not carried over, and the scale with it.
    assert after.guidance_unet is None and after.config.guidance_scale == 1
    # The saved (EMA) weights start from the model's own, never from a fresh network.
    saved = load_file(os.path.join(output, "unet", "diffusion_pytorch_model.safetensors"))
    for name, tensor in before.unet.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)
    card = open(os.path.join(output, "README.md"), encoding="utf-8").read()
    assert "fine-tuned from" in card and "my photos" in card and "| 64 px, random, at the images' full scale |" in card

    # An interrupted fine-tune goes on from its latest checkpoint.
    resumed = train(TrainingConfig(**dict(options, max_train_steps=3, resume_from_checkpoint="latest")))
    summary = json.loads(open(os.path.join(resumed, "training_summary.json"), encoding="utf-8").read())
    assert (summary["global_step"], summary["steps_this_run"]) == (3, 1)
    assert summary["resumed_from"].endswith("checkpoint-2")


def test_too_few_photos_for_a_batch_name_the_two_ways_out(tmp_path):
    photos = my_photos(str(tmp_path / "photos"))
    options = fine_tune_options(
        tmp_path / "out", pretrained_model_name_or_path=save_guided_photo_model(str(tmp_path / "base"))
    )
    with pytest.raises(ValueError, match=r"4 usable images, fewer than --train_batch_size 9: .*--dataset_repeats 3"):
        train(TrainingConfig(**dict(options, train_data_dir=photos, train_batch_size=9)))
    with pytest.raises(ValueError, match=r"4 usable images x 2 passes \(--dataset_repeats\), fewer than"):
        train(TrainingConfig(**dict(options, train_data_dir=photos, train_batch_size=9, dataset_repeats=2)))


def test_a_warm_up_longer_than_the_run_is_said(tmp_path, caplog):
    options = fine_tune_options(
        tmp_path / "out",
        pretrained_model_name_or_path=save_guided_photo_model(str(tmp_path / "base")),
        train_data_dir=my_photos(str(tmp_path / "photos")),
        lr_warmup_steps=500,
    )
    learning_rates = []  # the rate each optimizer step runs at
    step = torch.optim.AdamW.step
    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torch.optim.AdamW,
            "step",
            lambda self, *a, **k: learning_rates.append(self.param_groups[0]["lr"]) or step(self, *a, **k),
        )
        train(TrainingConfig(**options))
    warned = [record.getMessage() for record in caplog.records if "--lr_warmup_steps" in record.getMessage()]
    assert warned == [
        "--lr_warmup_steps 500 is no shorter than the run's 2 steps: the learning rate never reaches "
        "--learning_rate 1e-05 (at most 2e-08); give a run this short (a fine-tune, say) a shorter "
        "warm-up"
    ]
    assert learning_rates == pytest.approx([0, 2e-08])  # the highest is the one said
    # A warm-up exactly as long as the run never reaches the rate either, and says the highest it reaches.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(TrainingConfig(**dict(options, output_dir=str(tmp_path / "out2"), lr_warmup_steps=2)))
    assert "--learning_rate 1e-05 (at most 5e-06)" in caplog.text


def test_a_run_of_minutes_stopped_inside_its_warm_up_says_so(tmp_path, caplog):
    # As README's recipe runs: --max_train_minutes ends it long before --max_train_steps.
    options = fine_tune_options(
        tmp_path / "out",
        pretrained_model_name_or_path=save_guided_photo_model(str(tmp_path / "base")),
        train_data_dir=my_photos(str(tmp_path / "photos")),
        max_train_steps=100_000,
        max_train_minutes=1e-9,  # stops after its first step
        lr_warmup_steps=500,
    )
    with caplog.at_level(logging.WARNING):
        train(TrainingConfig(**options))
    warned = [record.getMessage() for record in caplog.records if "--lr_warmup_steps" in record.getMessage()]
    assert warned == [
        "--max_train_minutes 1e-09 stopped the run at step 1, inside its warm-up of 500 steps (--lr_warmup_steps): "
        "the learning rate reached at most 0 of --learning_rate 1e-05; give a run of minutes a shorter warm-up"
    ]
    # Not when the clock stops it after its warm-up, nor without one.
    for name, change in (("after", dict(lr_warmup_steps=1)), ("constant", dict(lr_scheduler="constant"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train(TrainingConfig(**dict(options, output_dir=str(tmp_path / name), **change)))
        assert "--lr_warmup_steps" not in caplog.text


def test_a_fine_tune_never_writes_into_the_installed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = default_model_path()
    package = os.path.dirname(os.path.dirname(packaged))  # diffusers_sr3/, which holds pretrained/sr3-photos-x4
    os.symlink(os.path.dirname(packaged), "link")
    before = {folder: sorted(os.listdir(folder)) for folder in (packaged, package)}
    for output in (
        packaged,
        os.path.join(packaged, "tuned"),
        os.path.join("link", DEFAULT_MODEL, "tuned"),  # through a symlink
        os.path.join(packaged, "..", "..", "tuned"),  # the package itself, beside its models
        package,
    ):
        options = fine_tune_options(
            output, pretrained_model_name_or_path=DEFAULT_MODEL, resume_from_checkpoint="latest"
        )
        with pytest.raises(ValueError, match="inside the installed package .*a folder of its own"):
            train(TrainingConfig(**options))
    # not even a lock file
    assert {folder: sorted(os.listdir(folder)) for folder in (packaged, package)} == before
    # A folder named like the packaged model would be loaded in its place by the name it was fine-tuned from, however
    # the output folder is spelt.
    for output in (DEFAULT_MODEL, os.path.abspath(DEFAULT_MODEL), os.path.join("sub", "..", DEFAULT_MODEL) + os.sep):
        with pytest.raises(ValueError, match="is the name of the packaged model being fine-tuned"):
            train(TrainingConfig(**fine_tune_options(output, pretrained_model_name_or_path=DEFAULT_MODEL)))
        assert not os.path.exists(DEFAULT_MODEL)
