"""Folders saved by newer versions: a newer on-disk format is refused by every loader, keys and classes this version
does not know are named, and folders of this format load as before, with the format recorded or not."""

import json
import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import low_resolution_unet
from diffusers import DiffusionPipeline

from diffusers_sr3 import SR3BasePipeline, SR3CascadePipeline, SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.cli import main
from diffusers_sr3.disk_format import FORMAT_KEY, FORMAT_VERSION, NewerFormatError

UPGRADE = "pip install -U diffusers-sr3"
LOADERS = {
    "SR3Pipeline": SR3Pipeline.from_pretrained,
    "SR3BasePipeline": SR3BasePipeline.from_pretrained,
    "DiffusionPipeline": lambda folder: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
}


@pytest.fixture
def folder(tmp_path):
    """A residual pipeline saved by this version, whose meaning a reader that ignored `residual_scale` would miss."""
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    SR3Pipeline(low_resolution_unet(), scheduler, residual=True, residual_scale=3.0).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def edit(path, **changes):
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def fidelity(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    return pipeline(torch.rand(1, 3, 16, 16), mode="fidelity", output_type="pt").images


class DiffusersLog:
    """Diffusers' log lines: its loggers do not propagate to the root logger (nor to caplog)."""

    def __enter__(self):
        self.messages = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        logging.getLogger("diffusers").addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc_info):
        logging.getLogger("diffusers").removeHandler(self.handler)


@pytest.mark.parametrize("recorded_in", ["model_index.json", "unet/config.json"])
def test_a_folder_in_a_newer_format_is_refused_by_every_loader_and_the_command_line(
    folder, tmp_path, recorded_in, capsys
):
    # What a newer version writes when it adds a key that this one would ignore, reading another model.
    edit(folder / recorded_in, **{FORMAT_KEY: FORMAT_VERSION + 1, "output_gain": 2.0})
    newer = rf"on-disk format {FORMAT_VERSION + 1}; diffusers-sr3 \S+ reads formats up to {FORMAT_VERSION} .*{UPGRADE}"
    for name, load in LOADERS.items():
        with pytest.raises(NewerFormatError, match=newer) as refusal:
            load(folder)
        if name != "DiffusionPipeline":  # Diffusers' loader gives no folder to the pipeline class's config check
            assert f"{folder}/{recorded_in} was saved in" in str(refusal.value), name
        elif recorded_in == "model_index.json":
            assert "model_index.json" in str(refusal.value)
        else:  # the UNet's own check, where Diffusers loads it
            assert f"{folder / 'unet'}: the SR3UNet2DModel config" in str(refusal.value)
    if recorded_in == "unet/config.json":
        with pytest.raises(NewerFormatError, match=newer):
            SR3UNet2DModel.from_pretrained(folder, subfolder="unet")
        with pytest.raises(NewerFormatError, match=newer):
            SR3UNet2DModel.from_config(SR3UNet2DModel.load_config(folder / "unet"))

    image = tmp_path / "in.png"
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert main(["upscale", str(image), "--model", str(folder), "--output", str(tmp_path / "out.png")]) == 2
    error = capsys.readouterr().err
    assert f"{folder}/{recorded_in} was saved in" in error and UPGRADE in error
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("value", ["2", 0, True, 1.5, None])
def test_a_format_that_is_no_positive_integer_is_refused(folder, value):
    edit(folder / "model_index.json", **{FORMAT_KEY: value})
    with pytest.raises(ValueError, match=f"{FORMAT_KEY} .*which is no format version"):
        SR3Pipeline.from_pretrained(folder)


def test_this_format_loads_the_same_recorded_or_not_and_is_not_written(folder, caplog):
    # Nothing in this version's saves needs a newer reader: their files stay as before the format existed.
    for config in ("model_index.json", "unet/config.json"):
        assert FORMAT_KEY not in json.loads((folder / config).read_text(encoding="utf-8"))
    expected = fidelity(SR3Pipeline.from_pretrained(folder))
    edit(folder / "model_index.json", **{FORMAT_KEY: FORMAT_VERSION})
    edit(folder / "unet" / "config.json", **{FORMAT_KEY: FORMAT_VERSION})
    with DiffusersLog() as diffusers_log, caplog.at_level(logging.WARNING):
        for load in LOADERS.values():
            assert torch.equal(fidelity(load(folder)), expected)
        assert SR3UNet2DModel.from_pretrained(folder / "unet").config.residual_scale == 3.0
    assert not [message for message in diffusers_log + caplog.messages if FORMAT_KEY in message]


def test_keys_this_version_does_not_take_are_named_and_ignored(folder, caplog):
    expected = fidelity(SR3Pipeline.from_pretrained(folder))
    # Keys a newer version adds at their neutral values (as every key so far), with no newer format: they load.
    edit(folder / "model_index.json", detail_sharpness=0.0, refiner_unet=[None, None])
    edit(folder / "unet" / "config.json", attention_scale=1.0)
    with DiffusersLog() as diffusers_log, caplog.at_level(logging.WARNING):
        for name, load in LOADERS.items():
            caplog.clear()
            assert torch.equal(fidelity(load(folder)), expected), name
            if name != "DiffusionPipeline":  # which warns in its own words
                assert "model_index.json holds detail_sharpness, refiner_unet, which SR3Pipeline" in caplog.text
    assert any("attention_scale" in message for message in diffusers_log)


def test_a_folder_of_this_version_loads_without_a_warning(folder, caplog):
    with caplog.at_level(logging.WARNING):
        SR3Pipeline.from_pretrained(folder)
    assert not caplog.messages


@pytest.mark.parametrize(
    "component, entry, refusal",
    [
        ("_class_name", ["pipeline_sr3_fancy", "SR3FancyPipeline"], "holds a SR3FancyPipeline, which diffusers-sr3 "),
        ("unet", ["unet_sr3", "SR3FancyUNet2DModel"], "'unet' is unet_sr3.SR3FancyUNet2DModel, which diffusers-sr3 "),
    ],
)
def test_an_sr3_class_of_a_newer_version_asks_for_an_upgrade(folder, component, entry, refusal):
    edit(folder / "model_index.json", **{component: entry})
    for loader in (SR3Pipeline, SR3BasePipeline):
        with pytest.raises(ValueError, match=f"{refusal}.*{UPGRADE}"):
            loader.from_pretrained(folder)


def test_another_librarys_pipeline_is_still_named_as_not_sr3(folder):
    edit(folder / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline, not a SR3Pipeline; load it with Stable"):
        SR3Pipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline, which is not an SR3 pipeline$"):
        SR3BasePipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "recorded_in", ["guidance_unet/config.json", "stage_2/unet/config.json", "stage_2/model_index.json"]
)
def test_a_component_in_a_newer_format_is_refused_before_any_weights_are_read(guided_pipeline, tmp_path, recorded_in):
    """A network may record the format in its own config.json alone (a nested pipeline in its model_index.json): the
    pipeline loaders check every component's before reading any weights (here unreadable: reading them fails)."""
    model = tmp_path / "model"
    cascade = recorded_in.startswith("stage_2")
    saved = SR3CascadePipeline.from_stages(None, [guided_pipeline, guided_pipeline]) if cascade else guided_pipeline
    saved.save_pretrained(model)
    edit(model / recorded_in, **{FORMAT_KEY: FORMAT_VERSION + 1})
    for weights in model.rglob("*.safetensors"):
        weights.write_bytes(b"weights that a load must not read")
    for loader in (SR3BasePipeline, SR3CascadePipeline if cascade else SR3Pipeline):
        with pytest.raises(NewerFormatError, match=f"^{re.escape(str(model / recorded_in))} was saved in .*{UPGRADE}"):
            loader.from_pretrained(model)
