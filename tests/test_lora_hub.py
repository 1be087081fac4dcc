"""LoRA on the Hub (the loopback Hub of tests/hub_server.py): a `--lora_rank` run pushed with a card whose metadata
and examples fit a fused pipeline with its adapter beside it, and adapters loaded from Hub repos, online and from the
cache offline."""

import os
import re

import PIL.Image
import pytest
import torch
import yaml
from conftest import tiny_unet_config
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)
from test_hub_loading import go_offline, publish
from test_lora_training import lora_options, predict, pretrained

from diffusers_sr3 import SR3UNet2DModel
from diffusers_sr3.model_card import card_for_repo, write_model_card
from diffusers_sr3.training import TrainingConfig, train
from diffusers_sr3.training.checkpointing import add_training_adapter

pytest.importorskip("peft")

ADAPTER = "pytorch_lora_weights.safetensors"


@pytest.fixture(autouse=True)
def fresh_default_cache(tmp_path, monkeypatch):
    """huggingface_hub's default cache, read at import time: one per test here."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))


def card_parts(card):
    """The YAML metadata and the Python examples of "How to use" in the model card `card`."""
    metadata = yaml.safe_load(card.split("---\n", 2)[1])
    return metadata, re.findall(r"```python\n(.*?)```", card.split("## How to use", 1)[1], flags=re.S)


def test_a_pushed_lora_runs_card_says_what_it_is_and_both_of_its_examples_run(hub, tmp_path, monkeypatch):  # noqa: F811
    pretrained(tmp_path / "published-base")
    publish(hub, "someone/base", tmp_path / "published-base")
    output = tmp_path / "out"
    options = lora_options(
        tmp_path, output, pretrained_model_name_or_path="someone/base", push_to_hub=True, hub_model_id="someone/lora"
    )
    train(TrainingConfig(**options))
    repo = hub.repos["someone/lora"]
    assert {ADAPTER, "unet/diffusion_pytorch_model.safetensors", "README.md"} <= set(repo)
    metadata, examples = card_parts(repo["README.md"].decode())
    # A whole pipeline fine-tuned from the base (which a repo with a LoRA file would otherwise be taken for an
    # adapter of), made with LoRA.
    assert metadata["base_model"] == "someone/base" and metadata["base_model_relation"] == "finetune"
    assert "lora" in metadata["tags"]

    # Every example of the card runs as it is, against the Hub: the fused pipeline, then the adapter on the base.
    monkeypatch.chdir(tmp_path)
    PIL.Image.new("RGB", (8, 8), (90, 120, 40)).save("input.png")
    fused, adapter_example = examples[0], examples[-1]
    assert 'from_pretrained("someone/lora")' in fused
    assert f'load_lora_adapter("someone/lora", weight_name="{ADAPTER}")' in adapter_example
    for example in (fused, *examples[1:]):
        exec(example, {})
    with_adapter = {}
    exec(adapter_example, with_adapter)
    namespace = {}
    exec(fused.split("low_res =")[0], namespace)
    # The adapter on the base model gives what the fused pipeline gives.
    torch.testing.assert_close(predict(with_adapter["pipe"].unet), predict(namespace["pipe"].unet))

    # And offline, from the cache.
    go_offline(monkeypatch)
    offline = {}
    exec(adapter_example, offline)
    torch.testing.assert_close(predict(offline["pipe"].unet), predict(namespace["pipe"].unet))


def test_a_lora_card_written_before_the_repo_was_named_names_it_in_both_examples(tiny_pipeline, tmp_path):
    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(
        str(folder), task="sr", upscale_factor=4, resolution=32, lora_adapter=(ADAPTER, str(tmp_path / "my-base"))
    )
    card = (folder / "README.md").read_text(encoding="utf-8")
    metadata, _ = card_parts(card)
    assert "lora" in metadata["tags"] and "base_model_relation" not in metadata  # no Hub base model: nothing to relate
    # The base model's folder on the training machine is named by its name alone.
    assert 'SR3Pipeline.from_pretrained("my-base")' in card and str(tmp_path) not in card
    renamed = card_for_repo(str(folder), "someone/renamed")
    assert 'SR3Pipeline.from_pretrained("someone/renamed")' in renamed
    assert f'load_lora_adapter("someone/renamed", weight_name="{ADAPTER}")' in renamed
    assert 'from_pretrained("my-base")' in renamed


@pytest.mark.parametrize("base", [os.path.join("models", "my-base"), os.path.join("models", "my-base", ""), "."])
def test_a_lora_cards_base_given_by_a_relative_path_is_named_by_its_name(tiny_pipeline, tmp_path, monkeypatch, base):
    (tmp_path / "models" / "my-base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models" / "my-base" if base == "." else tmp_path)
    folder = tmp_path / "run"
    tiny_pipeline.save_pretrained(folder)
    write_model_card(str(folder), task="sr", upscale_factor=4, resolution=32, lora_adapter=(ADAPTER, base))
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert 'SR3Pipeline.from_pretrained("my-base")' in card and "models" not in card


def test_a_plain_fine_tunes_card_is_no_lora_card(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    write_model_card(str(tmp_path), task="sr", upscale_factor=4, resolution=32, base_model="someone/base")
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    metadata, _ = card_parts(card)
    assert metadata["base_model_relation"] == "finetune" and "lora" not in metadata["tags"]
    assert "load_lora_adapter" not in card


@pytest.fixture
def adapter_repos(hub, tiny_pipeline, tmp_path):  # noqa: F811
    """`someone/adapter`: an adapter alone (trained-looking: B not zero); `someone/whole`: a pipeline without one."""
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config())
    add_training_adapter(unet, 2, None)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()
    unet.save_lora_adapter(str(tmp_path / "adapter"), weight_name=ADAPTER)
    publish(hub, "someone/adapter", tmp_path / "adapter")
    tiny_pipeline.save_pretrained(tmp_path / "whole")
    publish(hub, "someone/whole", tmp_path / "whole")
    return predict(unet)


def base_unet():
    torch.manual_seed(0)
    return SR3UNet2DModel(**tiny_unet_config())


def test_an_adapter_loads_from_the_hub_and_offline_from_the_cache(adapter_repos, monkeypatch):
    online = base_unet()
    online.load_lora_adapter("someone/adapter", weight_name=ADAPTER)
    torch.testing.assert_close(predict(online), adapter_repos)
    go_offline(monkeypatch)
    offline = base_unet()
    offline.load_lora_adapter("someone/adapter", weight_name=ADAPTER)
    torch.testing.assert_close(predict(offline), adapter_repos)
    # Offline, an adapter never fetched is named, and the model is left as it was.
    unet = base_unet()
    with pytest.raises(OSError, match="someone/whole does not appear to have a file named pytorch_lora_weights"):
        unet.load_lora_adapter("someone/whole", weight_name=ADAPTER)
    assert not getattr(unet, "peft_config", None)


def test_a_repo_without_the_adapter_file_is_named(adapter_repos, monkeypatch):
    unet = base_unet()
    with pytest.raises(OSError, match="someone/adapter does not appear to have a file named nope.safetensors"):
        unet.load_lora_adapter("someone/adapter", weight_name="nope.safetensors")
    with pytest.raises(OSError, match="someone/whole does not appear to have a file named pytorch_lora_weights"):
        unet.load_lora_adapter("someone/whole", weight_name=ADAPTER)
    assert not getattr(unet, "peft_config", None)


def test_a_whole_models_weights_are_refused_as_an_adapter_saying_so(adapter_repos, monkeypatch):
    import diffusers.loaders.lora_base

    # Diffusers read the offline setting of the test session at import; this test is online.
    monkeypatch.setattr(diffusers.loaders.lora_base, "HF_HUB_OFFLINE", False)
    unet = base_unet()
    reference = predict(unet)
    # Without a weight_name, Diffusers' guess picks the pipeline's UNet weights.
    with pytest.raises(ValueError, match=r"someone/whole \(.*\) holds no LoRA adapter weights .*weight_name"):
        unet.load_lora_adapter("someone/whole")
    message = r"diffusion_pytorch_model.safetensors\) holds no LoRA adapter weights"
    with pytest.raises(ValueError, match=message):
        unet.load_lora_adapter("someone/whole", weight_name="unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="the state dict holds no LoRA adapter weights"):
        unet.load_lora_adapter(base_unet().state_dict())
    assert not getattr(unet, "peft_config", None)
    torch.testing.assert_close(predict(unet), reference)
    # Without a weight_name, an adapter repo loads by Diffusers' guess.
    unet.load_lora_adapter("someone/adapter")
    torch.testing.assert_close(predict(unet), adapter_repos)
