"""A super-resolution UNet's config records what its output means (factor, residual, residual scale), so that a
pipeline built from the networks alone, as Diffusers users build one from `pipe.components`, reads it right."""

import json

import pytest
import torch
from conftest import low_resolution_unet

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.pretrained import default_model_path


def residual_pipeline(**settings):
    scheduler = make_scheduler("ddim", n_timestep=50, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(low_resolution_unet(), scheduler, **settings)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def fidelity(pipeline, image):
    return pipeline(image, mode="fidelity", output_type="pt").images


def test_a_saved_unet_records_its_output_meaning_and_pipelines_built_from_it_read_it(tmp_path):
    pipeline = residual_pipeline(upscale_factor=2, residual=True, residual_scale=6.5)
    guide = low_resolution_unet(seed=1)
    pipeline = SR3Pipeline(**{**pipeline.components, "guidance_unet": guide}, **pipeline.parameters)
    pipeline.save_pretrained(tmp_path)
    meaning = {"upscale_factor": 2, "residual": True, "residual_scale": 6.5}
    for folder in ("unet", "guidance_unet"):
        saved = json.loads((tmp_path / folder / "config.json").read_text(encoding="utf-8"))
        assert {key: saved[key] for key in meaning} == meaning, folder
    # The networks in memory keep their own config (a training run compares it with its checkpoints').
    assert pipeline.unet.config.residual is None and guide.config.residual_scale is None

    loaded = SR3Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    expected = fidelity(loaded, image)
    assert expected.shape[-1] == 32  # x2
    components = SR3Pipeline(**loaded.components)
    unet = SR3UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    from_folders = SR3Pipeline(unet=unet, scheduler=loaded.scheduler)
    for built in (components, from_folders):
        assert {key: built.config[key] for key in meaning} == meaning
        built.set_progress_bar_config(disable=True)
        torch.testing.assert_close(fidelity(built, image), expected)
    # Without the record, the same UNet read as an image model gives another answer: the record is what counts.
    plain = SR3Pipeline(unet=unet, scheduler=loaded.scheduler, upscale_factor=2, residual=False)
    plain.set_progress_bar_config(disable=True)
    assert (fidelity(plain, image) - expected).abs().max() > 0.05


def test_arguments_win_over_the_record_and_unrecorded_unets_take_the_defaults(tmp_path):
    residual_pipeline(upscale_factor=2, residual=True, residual_scale=6.5).save_pretrained(tmp_path)
    unet = SR3UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    scheduler = make_scheduler("ddim", n_timestep=50, prediction_type="sample")
    told = SR3Pipeline(unet, scheduler, upscale_factor=4, residual=False)
    assert (told.config.upscale_factor, told.config.residual, told.config.residual_scale) == (4, False, 6.5)
    # A UNet saved before the record existed: the pipeline's defaults, as before.
    config = json.loads((tmp_path / "unet" / "config.json").read_text(encoding="utf-8"))
    for key in ("upscale_factor", "residual", "residual_scale"):
        del config[key]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    earlier = SR3Pipeline(SR3UNet2DModel.from_pretrained(tmp_path, subfolder="unet"), scheduler)
    assert (earlier.config.upscale_factor, earlier.config.residual, earlier.config.residual_scale) == (4, False, 1.0)
    # ... while its folder's model_index.json still says how to read it.
    assert SR3Pipeline.from_pretrained(tmp_path).config.residual_scale == 6.5


def test_the_packaged_model_built_from_its_components_reads_its_residual():
    packaged = SR3Pipeline.from_pretrained(default_model_path())
    rebuilt = SR3Pipeline(**packaged.components)
    keys = ("upscale_factor", "residual", "residual_scale")
    assert [rebuilt.config[key] for key in keys] == [packaged.config[key] for key in keys] == [4, True, 14.2]


@pytest.mark.parametrize(("option", "value"), [("residual_scale", 0.0), ("upscale_factor", 0)])
def test_the_recorded_meaning_is_checked(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        SR3UNet2DModel(**dict(low_resolution_unet().config, **{option: value}))
