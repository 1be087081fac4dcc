"""`sr3 convert` takes the checkpoint forms other code saves, says what to pass otherwise, and saves variants."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.cli import main
from diffusers_sr3.convert import convert_original_checkpoint, load_original_config

CHECKPOINT = FIXTURES / "sr3_tiny_I10_E1_gen.pth"
CONFIG = FIXTURES / "sr3_tiny_config.json"


def _convert(checkpoint, output, *extra):
    return main(["convert", "--checkpoint", str(checkpoint), "--config", str(CONFIG), "--output", str(output), *extra])


def _first_weight(pipeline):
    return pipeline.unet.conv_in.weight.flatten()[0].item()


@pytest.fixture(scope="module")
def reference():
    return _first_weight(convert_original_checkpoint(CHECKPOINT, CONFIG))


def test_the_resume_state_stem_converts_its_gen_file(tmp_path, capsys, reference):
    shutil.copy(CHECKPOINT, tmp_path / "I10_E1_gen.pth")
    assert _convert(tmp_path / "I10_E1", tmp_path / "out") == 0
    assert f"note: converting {tmp_path / 'I10_E1_gen.pth'}" in capsys.readouterr().err
    assert _first_weight(SR3Pipeline.from_pretrained(tmp_path / "out")) == reference


def test_a_folder_is_named_as_one_with_its_checkpoint(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    assert _convert(folder, tmp_path / "out") == 2
    assert f"checkpoint {folder} is a folder, not an I{{iter}}_E{{epoch}}_gen.pth file\n" in capsys.readouterr().err
    shutil.copy(CHECKPOINT, folder / "I10_E1_gen.pth")
    assert _convert(folder, tmp_path / "out") == 2
    assert f"pass the checkpoint file in it, {folder / 'I10_E1_gen.pth'}" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["state_dict", "model", "netG", "bare", "data_parallel"])
def test_wrapped_and_bare_state_dicts_convert(tmp_path, form, reference):
    state = torch.load(CHECKPOINT, weights_only=True)
    if form == "bare":
        state = {key[len("denoise_fn.") :]: value for key, value in state.items() if key.startswith("denoise_fn.")}
        assert "downs.0.weight" in state
    elif form == "data_parallel":  # saved from a `DataParallel` / `DistributedDataParallel` wrapper
        state = {f"module.{key}": value for key, value in state.items()}
    else:
        state = {form: state}
    torch.save(state, tmp_path / "other.pth")
    assert _first_weight(convert_original_checkpoint(tmp_path / "other.pth", CONFIG)) == reference


def test_convert_saves_a_variant_in_a_dtype(tmp_path, capfd, reference):
    output = tmp_path / "out"
    assert _convert(CHECKPOINT, output, "--variant", "fp16", "--dtype", "fp16") == 0
    assert "kept in float32" not in capfd.readouterr().err
    assert [path.name for path in (output / "unet").glob("*.safetensors")] == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]
    saved = load_file(output / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert saved["conv_in.weight"].dtype == torch.float16
    # As from_pretrained(torch_dtype=torch.float16) keeps them, and Diffusers saves them.
    assert saved["noise_level_embedding.linear_1.weight"].dtype == torch.float32
    loaded = SR3Pipeline.from_pretrained(output, variant="fp16", torch_dtype=torch.float16)
    assert loaded.unet.conv_in.weight.dtype == torch.float16
    assert _first_weight(loaded) == torch.tensor(reference).half().item()


def test_overwrite_with_a_variant_drops_the_replaced_main_weights(tmp_path, capsys):
    output = tmp_path / "out"
    assert _convert(CHECKPOINT, output) == 0
    assert _convert(CHECKPOINT, output, "--variant", "fp16", "--dtype", "fp16", "--overwrite") == 0
    assert "removed unet/diffusion_pytorch_model.safetensors" in capsys.readouterr().out
    assert [path.name for path in (output / "unet").glob("*.safetensors")] == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]


@pytest.mark.parametrize("variant", ["fp16.x", "x/y", "x\\y"])
def test_a_variant_name_no_loader_reads_is_refused_before_any_work(tmp_path, capsys, variant):
    assert _convert(CHECKPOINT, tmp_path / "out", "--variant", variant) == 2
    assert f"--variant {variant}: a variant name cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_plain_conversion_casts_nothing_and_logs_no_float32_warning(tmp_path, capfd, reference):
    assert _convert(CHECKPOINT, tmp_path / "out") == 0
    assert "kept in float32" not in capfd.readouterr().err
    assert _first_weight(SR3Pipeline.from_pretrained(tmp_path / "out")) == reference


def test_a_double_slash_after_an_escaped_quote_is_inside_the_string(tmp_path):
    config = json.loads(CONFIG.read_text(encoding="utf-8"))
    config["name"] = 'the "tiny // model'  # written as "the \\"tiny // model": the string goes on past the quote
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    assert load_original_config(tmp_path / "config.json") == config
