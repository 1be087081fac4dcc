"""Saved configs and cards state what is really used, and nothing of the machine that saved them."""

import json
import os

import pytest
import yaml

from diffusers_sr3 import SR3Pipeline, make_scheduler
from diffusers_sr3.model_card import write_model_card
from diffusers_sr3.pretrained import default_model_card, default_model_path


def json_configs(folder):
    """`{relative path: parsed JSON}` of every JSON file under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".json"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    found[os.path.relpath(path, folder)] = json.load(handle)
    return found


def absolute_paths(value):
    """Every string inside a JSON value that is an absolute file-system path."""
    if isinstance(value, str):
        return [value] if os.path.isabs(value) else []
    if isinstance(value, dict):
        return [path for item in value.values() for path in absolute_paths(item)]
    if isinstance(value, list):
        return [path for item in value for path in absolute_paths(item)]
    return []


def assert_truthful(folder):
    configs = json_configs(folder)
    assert "model_index.json" in configs
    for name, config in configs.items():
        assert "_name_or_path" not in config, f"{name} records where it was loaded from"
        assert not absolute_paths(config), f"{name} holds paths of the machine that saved it"
        if "trained_betas" in config:
            betas = config["trained_betas"]
            assert (config["beta_start"], config["beta_end"]) == (betas[0], betas[-1]), name


def test_a_reloaded_and_resaved_pipeline_states_only_what_it_uses(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "first")
    # An older save: Diffusers' default betas beside the trained ones.
    scheduler_path = tmp_path / "first" / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text(encoding="utf-8"))
    scheduler.update(beta_start=0.0001, beta_end=0.02)
    scheduler_path.write_text(json.dumps(scheduler), encoding="utf-8")
    loaded = SR3Pipeline.from_pretrained(str(tmp_path / "first"))
    assert loaded.config._name_or_path == str(tmp_path / "first")  # known while loaded
    loaded.save_pretrained(tmp_path / "second")
    assert_truthful(tmp_path / "second")
    reloaded = SR3Pipeline.from_pretrained(str(tmp_path / "second"))
    assert reloaded.scheduler.config.trained_betas == loaded.scheduler.config.trained_betas


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quad"])
def test_new_schedulers_name_their_schedule(schedule):
    config = make_scheduler("ddim", schedule=schedule, n_timestep=50).config
    assert config.beta_schedule == schedule
    assert (config.beta_start, config.beta_end) == (config.trained_betas[0], config.trained_betas[-1])


def test_the_packaged_model_tells_the_truth():
    assert_truthful(default_model_path())
    metrics = yaml.safe_load(default_model_card().split("---")[1])["model-index"][0]["results"][0]["metrics"]
    consistency = next(metric for metric in metrics if metric["type"] == "consistency")
    # An MSE of 1e-4 (x4 photos) is 10 in units of 1e-5; the raw MSE under that name would be ~1e-4.
    assert "units of 1e-5" in consistency["name"] and 0.1 < consistency["value"] < 1000


def test_model_cards_state_consistency_in_the_unit_they_name(tmp_path):
    write_model_card(
        str(tmp_path), task="sr", upscale_factor=4, resolution=32, metrics={"psnr": 30.0, "consistency": 8.6e-5}
    )
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    metrics = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"][0]["metrics"]
    consistency = next(metric for metric in metrics if metric["type"] == "consistency")
    assert consistency["name"] == "Consistency (MSE in units of 1e-5, lower is better)"
    assert consistency["value"] == pytest.approx(8.6)
    assert "| Consistency (MSE in units of 1e-5, lower is better) | 8.60 |" in card


def test_unconditional_cards_state_an_unconditional_models_limitations(tmp_path):
    """A generator has no degradation and no high-resolution truth; its card says what it can get wrong instead."""
    for task, data_description in (("uncond", "32x32 flowers"), ("uncond", ""), ("sr", "photos")):
        folder = tmp_path / f"{task}-{bool(data_description)}"
        folder.mkdir()
        write_model_card(str(folder), task=task, resolution=32, data_description=data_description)
        limitations = (folder / "README.md").read_text(encoding="utf-8").split("## Limitations")[1].split("##")[0]
        assert ("degradation" in limitations) == (task == "sr")
        assert ("generates new images like" in limitations) == (task == "uncond")
        assert ("the data above" in limitations) == bool(data_description)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_model_cards_usage_runs_as_written(tmp_path, tiny_unet, monkeypatch, prediction_type):
    """The card's Python example loads the folder and samples at the model's own settings; models that predict the
    clean image also show fidelity mode."""
    import re

    import PIL.Image

    scheduler = make_scheduler("ddim", n_timestep=50, prediction_type=prediction_type)
    folder = tmp_path / "model"
    SR3Pipeline(tiny_unet, scheduler, detail_steps=2).save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32)
    card = (folder / "README.md").read_text(encoding="utf-8")
    usage = re.search(r"```python\n(from PIL import Image.*?)```", card, re.S).group(1)
    assert ('mode="fidelity"' in usage) == (prediction_type == "sample")
    monkeypatch.chdir(tmp_path)
    PIL.Image.new("RGB", (8, 8), (90, 120, 200)).save("input.png")
    exec(compile(usage.replace('"model"', repr(str(folder))), "card", "exec"), {})
    assert PIL.Image.open("output.png").size == (32, 32)
    assert (tmp_path / "output_fidelity.png").exists() == (prediction_type == "sample")


def test_cards_install_from_source_and_load_with_diffusers(tmp_path, tiny_pipeline):
    """diffusers-sr3 is not on PyPI: no card may send users to a name there that anyone could register. Its
    Diffusers loading example runs as written."""
    import re

    folder = tmp_path / "model"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32)
    card = (folder / "README.md").read_text(encoding="utf-8")
    for text in (card, default_model_card()):
        assert "pypi.org" not in text and "pip install diffusers-sr3" not in text
        assert "not on PyPI" in text and "```bash\npip install -e .\n```" in text
    diffusers_usage = re.search(r"```python\n(from diffusers import DiffusionPipeline.*?)```", card, re.S).group(1)
    namespace = {}
    exec(compile(diffusers_usage.replace('"model"', repr(str(folder))), "card", "exec"), namespace)
    assert type(namespace["pipe"]).__name__ == "SR3Pipeline"
