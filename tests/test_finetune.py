"""Fine-tuning keeps the model's objective: residual, residual scale, prediction type, levels, schedule, factor.

Written against whatever model ships in the package: every expectation is read from the packaged pipeline itself.
"""

import argparse
import json
import os

import pytest
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.image_processing import degrade
from diffusers_sr3.metrics import image_quality
from diffusers_sr3.noise import training_betas
from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_split
from diffusers_sr3.pipelines.pipeline_sr3 import SAMPLING_CONFIG_KEYS
from diffusers_sr3.pretrained import DEFAULT_STEPS, default_model_path
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
    }
    for name, change in changes.items():
        with pytest.raises(ValueError, match=rf"--(no-)?{name}\b.*would change the objective.*allow_objective_change"):
            build_model(TrainingConfig(**fine_tune_options(tmp_path, **change)))
        setup = build_model(TrainingConfig(**fine_tune_options(tmp_path, allow_objective_change=True, **change)))
        assert getattr(setup, name) == next(iter(change.values()))
        assert setup.sampling_settings == {}  # studied for the old objective: the new model starts from the defaults
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
