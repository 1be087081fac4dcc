"""`sr3 convert --overwrite` replaces the whole model, and the converter names wrongly typed config values."""

import copy
import json
import os

import pytest
import torch
from conftest import FIXTURES

from diffusers_sr3 import SR3CascadePipeline, SR3Pipeline, SR3UnconditionalPipeline
from diffusers_sr3.cli import main
from diffusers_sr3.convert import CheckpointError, convert_original_checkpoint


def _convert_arguments(output, variant="sr3"):
    return [
        "convert",
        "--checkpoint",
        str(FIXTURES / f"{variant}_tiny_I10_E1_gen.pth"),
        "--config",
        str(FIXTURES / f"{variant}_tiny_config.json"),
        "--output",
        str(output),
    ]


def _first_weight(pipeline):
    return pipeline.unet.conv_in.weight.flatten()[0].item()


def _converted_and_another(folder):
    """`sr3 convert` into `folder`: the converted pipeline, and another model (its weights moved) to save there."""
    assert main(_convert_arguments(folder, "uncond")) == 0
    converted = SR3UnconditionalPipeline.from_pretrained(folder)
    other = SR3UnconditionalPipeline.from_pretrained(folder)
    with torch.no_grad():
        for parameter in other.unet.parameters():
            parameter.add_(1.0)
    return converted, other


@pytest.mark.filterwarnings("ignore:There are modules in SR3UNet2DModel")
def test_convert_overwrite_drops_the_replaced_models_other_variants(tmp_path, capsys):
    folder = tmp_path / "model"
    converted, old = _converted_and_another(folder)
    old.save_pretrained(folder)
    old.to(torch.float16).save_pretrained(folder, variant="fp16")
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    capsys.readouterr()

    assert main(_convert_arguments(folder, "uncond") + ["--overwrite"]) == 0
    assert sorted(path.name for path in (folder / "unet").glob("diffusion_pytorch_model*")) == [
        "diffusion_pytorch_model.safetensors"
    ]
    assert "removed unet/diffusion_pytorch_model.fp16.safetensors: the replaced model's" in capsys.readouterr().out
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine"
    loaded = SR3UnconditionalPipeline.from_pretrained(folder)
    assert _first_weight(loaded) == _first_weight(converted)


def test_convert_overwrite_drops_a_replaced_cascades_and_guides_folders(tmp_path, capsys):
    sr3 = convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", FIXTURES / "sr3_tiny_config.json")
    uncond = convert_original_checkpoint(FIXTURES / "uncond_tiny_I10_E1_gen.pth", FIXTURES / "uncond_tiny_config.json")
    folder = tmp_path / "model"
    SR3CascadePipeline.from_stages(uncond, [sr3]).save_pretrained(folder)
    capsys.readouterr()
    assert main(_convert_arguments(folder) + ["--overwrite"]) == 0
    layout = ["model_index.json", "pipeline_sr3.py", "scheduler", "unet"]
    assert sorted(path.name for path in folder.iterdir()) == layout
    assert "removed base/, pipeline_sr3_cascade.py, stage_1/: the replaced model's" in capsys.readouterr().out
    assert isinstance(SR3Pipeline.from_pretrained(folder), SR3Pipeline)

    guided = SR3Pipeline(sr3.unet, sr3.scheduler, guidance_unet=copy.deepcopy(sr3.unet), guidance_scale=2.0)
    guided.save_pretrained(folder)
    assert (folder / "guidance_unet").is_dir()
    assert main(_convert_arguments(folder) + ["--overwrite"]) == 0
    assert not (folder / "guidance_unet").exists() and SR3Pipeline.from_pretrained(folder).guidance_unet is None
    assert "removed guidance_unet/: the replaced model's" in capsys.readouterr().out


def _set(section, key, value):
    return lambda config: config["model"][section].update({key: value})


def _set_schedule(key, value):
    return lambda config: config["model"]["beta_schedule"]["val"].update({key: value})


@pytest.mark.parametrize(
    "variant, change, message",
    [
        ("uncond", _set("unet", "channel_multiplier", [1, 2, "4"]), "channel_multiplier must be a list of whole num"),
        ("uncond", _set("unet", "channel_multiplier", [1, 2, 4.0]), r"channel_multiplier must .*, got \[1, 2, 4.0\]"),
        ("sr3", _set("unet", "attn_res", [True]), "model.unet.attn_res must be a list of whole numbers"),
        ("uncond", _set("unet", "norm_groups", "4"), 'model.unet.norm_groups must be a whole number, got "4"'),
        ("uncond", _set("unet", "dropout", "0.1"), 'model.unet.dropout must be a number, got "0.1"'),
        ("uncond", _set("unet", "dropout", True), "model.unet.dropout must be a number, got true"),
        ("uncond", _set_schedule("linear_start", "1e-6"), "model.beta_schedule.val.linear_start must be a number"),
        ("uncond", _set_schedule("linear_end", 2.0), r"val gives betas from 1e-06 to 2, outside \(0, 1\]"),
        ("sr3", _set_schedule("linear_start", 0), r"val gives betas from 0 to 0.01, outside \(0, 1\]"),
        ("uncond", _set("diffusion", "conditional", "false"), 'conditional must be true or false, got "false"'),
        ("uncond", _set("diffusion", "conditional", True), r"\(true\) does not fit model.unet.in_channel 3"),
        ("sr3", _set("diffusion", "conditional", False), r"\(false\) does not fit model.unet.in_channel 6: a cond"),
    ],
)
def test_wrongly_typed_config_values_are_named(variant, change, message):
    config = json.loads((FIXTURES / f"{variant}_tiny_config.json").read_text(encoding="utf-8"))
    change(config)
    with pytest.raises(CheckpointError, match=message):
        convert_original_checkpoint(FIXTURES / f"{variant}_tiny_I10_E1_gen.pth", config)


def test_convert_command_names_a_wrongly_typed_setting_in_one_line(tmp_path, capsys):
    config = json.loads((FIXTURES / "uncond_tiny_config.json").read_text(encoding="utf-8"))
    config["model"]["unet"]["channel_multiplier"] = [1, 2, "4"]
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    arguments = _convert_arguments(tmp_path / "out", "uncond")
    arguments[arguments.index("--config") + 1] = str(tmp_path / "config.json")
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "model.unet.channel_multiplier must be a list of whole numbers" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant, kind", [("sr3", SR3Pipeline), ("uncond", SR3UnconditionalPipeline)])
def test_absent_optional_settings_take_the_originals_defaults(variant, kind):
    """The original's configs always state `conditional`; without it the network's channels tell."""
    config = json.loads((FIXTURES / f"{variant}_tiny_config.json").read_text(encoding="utf-8"))
    del config["model"]["diffusion"]["conditional"]
    config["model"]["unet"]["dropout"] = None
    config["model"]["unet"]["norm_groups"] = None  # 32, which divides no width of 8 channels
    with pytest.raises(ValueError, match="norm_groups=32 does not divide"):
        convert_original_checkpoint(FIXTURES / f"{variant}_tiny_I10_E1_gen.pth", config)
    config["model"]["unet"]["norm_groups"] = 4
    pipeline = convert_original_checkpoint(FIXTURES / f"{variant}_tiny_I10_E1_gen.pth", config)
    assert type(pipeline) is kind and pipeline.unet.config.dropout == 0.0


def test_convert_overwrite_checks_the_folders_it_removes_before_it_saves(tmp_path, monkeypatch, capsys):
    """A copied model's read-only guide folder, which the converted pipeline lacks: the command failed after the new
    pipeline was in place, naming a file without its folder, and left the old guide beside it."""
    sr3 = convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", FIXTURES / "sr3_tiny_config.json")
    folder = tmp_path / "model"
    SR3Pipeline(sr3.unet, sr3.scheduler, guidance_unet=copy.deepcopy(sr3.unet), guidance_scale=2.0).save_pretrained(
        folder
    )
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    locked = folder / "guidance_unet"
    locked.chmod(0o555)
    real_access = os.access

    def access(path, mode, **kwargs):  # read-only for root too
        return not (os.path.abspath(path) == str(locked) and mode & os.W_OK) and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    capsys.readouterr()
    try:
        assert main(_convert_arguments(folder) + ["--overwrite"]) == 2
    finally:
        locked.chmod(0o755)
    assert capsys.readouterr().err.strip().endswith(f"{locked} is not a writable folder")
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


def test_resolutions_that_are_no_whole_factor_apart_are_refused():
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    config["datasets"]["val"]["r_resolution"] = 36
    with pytest.raises(CheckpointError, match="r_resolution 36 is not a multiple of l_resolution 8"):
        convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", config)


def test_an_absent_linear_range_takes_the_originals_defaults():
    """The original's make_beta_schedule: linear_start 1e-4, linear_end 2e-2."""
    config = json.loads((FIXTURES / "sr3_tiny_config.json").read_text(encoding="utf-8"))
    for schedule in config["model"]["beta_schedule"].values():
        del schedule["linear_start"], schedule["linear_end"]
    betas = convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", config).scheduler.betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)
