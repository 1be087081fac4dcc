"""LoRA adapters on SR3UNet2DModel (PeftAdapterMixin): add, train, disable, save/load, fuse; peft is optional."""

import sys
import warnings

import pytest
import torch
from conftest import tiny_unet_config

from diffusers_sr3 import SR3UNet2DModel
from diffusers_sr3.models.unet_sr3 import LORA_TARGET_MODULES

peft = pytest.importorskip("peft")

ALL_TARGETS = [name for group in LORA_TARGET_MODULES.values() for name in group]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SR3UNet2DModel(**tiny_unet_config(**overrides)).eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 32, 32, generator=generator), torch.tensor([0.3, 0.9])


def predict(model):
    sample, level = inputs()
    with torch.no_grad():
        return model(sample, level).sample


def trained_adapter(model, targets=ALL_TARGETS, steps=3, rank=4, alpha=8):
    """Add a LoRA adapter on `targets` and train it a few steps (its B matrices start at 0: outputs unchanged)."""
    model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    sample, level = inputs()
    model.train()
    for _ in range(steps):
        loss = model(sample, level).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def lora_layer_names(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


@pytest.mark.parametrize("group", sorted(LORA_TARGET_MODULES))
def test_every_target_group_names_layers_of_the_unet(group):
    model = tiny_model(condition_noise_embedding=True)
    model.add_adapter(peft.LoraConfig(r=2, target_modules=list(LORA_TARGET_MODULES[group])))
    wrapped = lora_layer_names(model)
    for suffix in LORA_TARGET_MODULES[group]:
        assert any(name.endswith("." + suffix) for name in wrapped), (group, suffix, wrapped)
    if group == "embedding":  # both level embeddings, the condition's too
        assert {name.split(".")[0] for name in wrapped} == {"noise_level_embedding", "condition_noise_level_embedding"}


def test_only_adapter_weights_train_and_disable_adapters_restores_the_base_model():
    model = tiny_model()
    base_weights = {name: value.clone() for name, value in model.state_dict().items()}
    before = predict(model)
    trained_adapter(model)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    after = predict(model)
    assert (after - before).abs().max() > 1e-3
    for name, value in model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if plain in base_weights:
            torch.testing.assert_close(value, base_weights[plain], rtol=0, atol=0)
    model.disable_adapters()
    torch.testing.assert_close(predict(model), before, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(predict(model), after, rtol=0, atol=0)
    model.set_adapters("default", 0.5)
    halfway = predict(model)
    assert (halfway - before).abs().max() > 0 and (halfway - after).abs().max() > 0


def test_save_lora_adapter_round_trips_through_safetensors(tmp_path):
    from safetensors import safe_open

    model = trained_adapter(tiny_model(), alpha=2)  # alpha != rank: the scale must travel in the file's header
    expected = predict(model)
    model.save_lora_adapter(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as handle:
        assert all(".lora_" in key and not key.startswith("transformer.") for key in handle.keys())
    reloaded = tiny_model()
    reloaded.load_lora_adapter(tmp_path, adapter_name="reloaded")
    assert reloaded.peft_config["reloaded"].lora_alpha == 2
    torch.testing.assert_close(predict(reloaded), expected, rtol=0, atol=0)


def test_an_adapter_in_channels_last_layout_saves_and_keeps_its_layout(tmp_path):
    # Training with --channels_last moves the adapters' conv weights to a strided layout, which safetensors refuses.
    model = trained_adapter(tiny_model(), alpha=2).to(memory_format=torch.channels_last)
    strided = {name: parameter.data_ptr() for name, parameter in model.named_parameters() if "lora_" in name}
    strided = {name: pointer for name, pointer in strided.items() if not model.get_parameter(name).is_contiguous()}
    assert strided, "the conv adapters' weights are channels_last"
    expected = predict(model)
    model.save_lora_adapter(tmp_path)
    reloaded = tiny_model()
    reloaded.load_lora_adapter(tmp_path)
    # Not bit for bit: channels_last convolutions sum in another order.
    torch.testing.assert_close(predict(reloaded), expected, rtol=1e-5, atol=1e-5)
    for name, pointer in strided.items():  # the weights an optimizer holds, as they were
        parameter = model.get_parameter(name)
        assert parameter.data_ptr() == pointer and not parameter.is_contiguous(), name

    # Upcast before saving: every weight float32 afterwards (Diffusers' upcast stays), none put back in bfloat16.
    model.to(torch.bfloat16).save_lora_adapter(tmp_path / "upcast", upcast_before_saving=True)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_an_adapter_for_other_layers_is_refused(tmp_path):
    model = trained_adapter(tiny_model())
    model.save_lora_adapter(tmp_path)
    with pytest.raises(ValueError, match="no weights under the prefix 'unet'"):
        tiny_model().load_lora_adapter(tmp_path, prefix="unet")


def test_fuse_lora_gives_the_adapters_outputs_and_saves_as_a_plain_unet(tmp_path):
    model = trained_adapter(tiny_model())
    base = tiny_model()
    expected = predict(model)
    model.fuse_lora()
    torch.testing.assert_close(predict(model), expected, rtol=1e-5, atol=1e-5)
    model.unfuse_lora()
    torch.testing.assert_close(predict(model), expected, rtol=1e-5, atol=1e-5)
    model.disable_adapters()
    torch.testing.assert_close(predict(model), predict(base), rtol=1e-5, atol=1e-5)
    model.enable_adapters()

    with pytest.raises(ValueError, match="LoRA adapter layers .* save_lora_adapter"):
        model.save_pretrained(tmp_path / "unfused")
    assert not (tmp_path / "unfused").exists()
    model.fuse_lora()
    model.unload_lora()
    model.save_pretrained(tmp_path / "fused")
    loaded = SR3UNet2DModel.from_pretrained(tmp_path / "fused")
    assert not lora_layer_names(loaded)
    torch.testing.assert_close(predict(loaded), expected, rtol=1e-5, atol=1e-5)


def test_without_peft_the_error_names_the_lora_extra(monkeypatch, tmp_path):
    model = trained_adapter(tiny_model())
    model.save_lora_adapter(tmp_path)
    config = peft.LoraConfig(r=2, target_modules=["to_q"])
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    for call in (
        lambda: tiny_model().add_adapter(config),
        lambda: tiny_model().load_lora_adapter(tmp_path),
        lambda: model.save_lora_adapter(tmp_path / "again"),
    ):
        with pytest.raises(ImportError, match=r"pip install diffusers-sr3\[lora\]"):
            call()


def test_an_adapter_that_fits_in_part_only_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    from diffusers.utils import logging as diffusers_logging
    from safetensors import safe_open
    from safetensors.torch import save_file

    trained_adapter(tiny_model(), alpha=8).save_lora_adapter(tmp_path / "whole")
    with safe_open(tmp_path / "whole" / "pytorch_lora_weights.safetensors", "pt") as handle:
        header = handle.metadata()
        weights = {key: handle.get_tensor(key) for key in handle.keys()}
    first_a = sorted(key for key in weights if ".lora_A." in key)[0]
    partial = {
        # a layer's lora_A missing: PEFT's random initialisation would stay in its place
        "missing": {key: value for key, value in weights.items() if key != first_a},
        # layers this UNet does not have: their weights would be dropped
        "unexpected": {key.replace("down_levels.", "other_levels."): value for key, value in weights.items()},
    }
    expected = predict(tiny_model())
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the refusal must not depend on Diffusers' warnings being shown
    try:
        for name, state in partial.items():
            save_file(state, tmp_path / f"{name}.safetensors", metadata=header)
            model = tiny_model()
            with pytest.raises(ValueError, match="does not fit this SR3UNet2DModel, nothing was loaded"):
                model.load_lora_adapter(tmp_path, weight_name=f"{name}.safetensors")
            assert not lora_layer_names(model) and not getattr(model, "peft_config", None), name
            torch.testing.assert_close(predict(model), expected, rtol=0, atol=0)
    finally:
        diffusers_logging.set_verbosity(verbosity)

    # A load that fails in PEFT (an adapter of another width) leaves no empty adapter layers either: saved, they
    # would be written under PEFT's names, which no loader reads.
    wider = SR3UNet2DModel(**tiny_unet_config(block_out_channels=16)).eval()
    with pytest.raises(RuntimeError, match="size mismatch"):
        wider.load_lora_adapter(tmp_path / "whole")
    assert not lora_layer_names(wider)
    wider.save_pretrained(tmp_path / "wider")
    reloaded = SR3UNet2DModel.from_pretrained(tmp_path / "wider")
    sample, level = inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, level).sample, wider(sample, level).sample, rtol=0, atol=0)

    # A failed second adapter leaves the first one in place.
    model = trained_adapter(tiny_model())
    kept = predict(model)
    with pytest.raises(ValueError, match="does not fit"):
        model.load_lora_adapter(tmp_path, weight_name="missing.safetensors", adapter_name="second")
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(predict(model), kept, rtol=0, atol=0)


def test_save_lora_adapter_refuses_a_pickle_that_would_lose_the_alpha(tmp_path):
    model = trained_adapter(tiny_model(), alpha=8)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_lora_adapter(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_lora_adapter(tmp_path, "default", False, False)
    assert not list(tmp_path.iterdir())
    model.save_lora_adapter(tmp_path, "default", weight_name="adapter.safetensors")
    assert [path.name for path in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_adapters_with_short_names_load_side_by_side_and_a_refused_one_leaves_the_active_adapter(tmp_path):
    # Diffusers picks an adapter's missing keys by its name as a substring of the key: "b" is in "blocks", so the
    # keys of "a", loaded before, were taken for missing keys of "b" and the second adapter was refused.
    from safetensors import safe_open
    from safetensors.torch import save_file

    for name, steps in (("a", 3), ("b", 5)):
        trained_adapter(tiny_model(), steps=steps).save_lora_adapter(tmp_path / name)
    model = tiny_model()
    model.load_lora_adapter(tmp_path / "a", adapter_name="a")
    model.load_lora_adapter(tmp_path / "b", adapter_name="b")
    model.set_adapter("b")
    expected = predict(model)
    with safe_open(tmp_path / "a" / "pytorch_lora_weights.safetensors", "pt") as handle:
        metadata = handle.metadata()
        weights = {key: handle.get_tensor(key) for key in handle.keys()}
    first_lora_a = next(key for key in weights if ".lora_A." in key)
    partial = {key: value for key, value in weights.items() if key != first_lora_a}
    save_file(partial, tmp_path / "partial.safetensors", metadata=metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no note from PEFT that it activated another adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # PEFT's, on any second adapter
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # PEFT's own note of the misfit
        with pytest.raises(ValueError, match=r"does not fit .*: missing keys: .*\.lora_A\.c\.weight\.$"):
            model.load_lora_adapter(tmp_path, weight_name="partial.safetensors", adapter_name="c")
    assert list(model.peft_config) == ["a", "b"] and model.active_adapters() == ["b"]
    torch.testing.assert_close(predict(model), expected, rtol=0, atol=0)
