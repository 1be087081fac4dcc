"""SR3UNet2DModel: shapes, both conditioning kinds, Diffusers attention and memory features, save/load."""

import logging
import math
import re

import numpy as np
import pytest
import torch
from conftest import REPO, needs_bfloat16_kernels, tiny_unet_config
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from diffusers_sr3 import SR3UNet2DModel
from diffusers_sr3.models import unet_sr3
from diffusers_sr3.presets import PRESETS


def test_forward_shapes_and_level_forms(tiny_unet):
    sample = torch.randn(2, 6, 32, 32)
    levels = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        out = tiny_unet(sample, levels).sample
        out_2d = tiny_unet(sample, levels[:, None]).sample
        out_tuple = tiny_unet(sample, levels, return_dict=False)[0]
        out_scalar = tiny_unet(sample[:1], 0.3).sample
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, out_2d)
    torch.testing.assert_close(out, out_tuple)
    torch.testing.assert_close(out_scalar, out[:1])
    # The level matters: a network that ignored it would pass the shape checks above.
    assert (out[0] - tiny_unet(sample[:1], 0.9).sample[0].detach()).abs().max() > 1e-4


def test_bad_inputs_are_named(tiny_unet):
    with pytest.raises(ValueError, match="channels"):
        tiny_unet(torch.randn(1, 3, 32, 32), 0.5)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_unet(torch.randn(1, 6, 30, 32), 0.5)
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        tiny_unet(torch.randn(2, 6, 32, 32), torch.rand(3))
    with pytest.raises(ValueError, match=r"sample must be \(batch, channels, height, width\), got shape \(6, 32, 32\)"):
        tiny_unet(torch.randn(6, 32, 32), 0.5)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="conditioning_type"):
        SR3UNet2DModel(**tiny_unet_config(conditioning_type="sigma"))
    with pytest.raises(ValueError, match="norm_groups=3"):
        SR3UNet2DModel(**tiny_unet_config(norm_groups=3))
    with pytest.raises(ValueError, match="sample_size=30"):
        SR3UNet2DModel(**tiny_unet_config(sample_size=30))
    # At construction, not as a shape error deep inside the first forward pass.
    refused = {
        "block_out_channels must be even": dict(block_out_channels=5, norm_groups=1),
        r"norm_groups=8 does not divide the width 12 \(block_out_channels=12 x multiplier 1\)": dict(
            block_out_channels=12, channel_multipliers=(2, 4), norm_groups=8
        ),
        "norm_groups must be a positive integer, got 0": dict(norm_groups=0),
        "attention_heads must be a positive integer, got 0": dict(attention_heads=0),
        "out_channels must be a positive integer, got 0": dict(out_channels=0),
        r"channel_multipliers must be one or more positive integers, got \(1, 0\)": dict(channel_multipliers=(1, 0)),
        r"channel_multipliers must be one or more positive integers, got \(\)": dict(channel_multipliers=()),
    }
    for message, overrides in refused.items():
        with pytest.raises(ValueError, match=message):
            SR3UNet2DModel(**tiny_unet_config(**overrides))


def test_scheduler_timesteps_are_refused_as_levels(tiny_unet):
    sample = torch.randn(2, 6, 32, 32)
    message = r"signal_level must be sqrt\(alpha_bar\) in \[0, 1\] for conditioning_type='noise_level'.*noise_level_for"
    for timestep in (torch.tensor([75, 50]), torch.tensor(75), 75, 1.5, -0.1, [75, 50]):
        with pytest.raises(ValueError, match=message):
            tiny_unet(sample, timestep)
    with torch.no_grad():  # the ends of the range as Python numbers, ints included, are levels
        torch.testing.assert_close(tiny_unet(sample, 1).sample, tiny_unet(sample, 1.0).sample)
        tiny_unet(sample, 0)
    timestep_unet = SR3UNet2DModel(**tiny_unet_config(conditioning_type="timestep")).eval()
    with torch.no_grad():
        assert timestep_unet(sample, torch.tensor([75, 50])).sample.shape == (2, 3, 32, 32)


def test_float_levels_outside_the_range_are_refused_on_the_cpu(tiny_unet, monkeypatch):
    sample = torch.randn(2, 6, 32, 32)
    message = r"signal_level must be sqrt\(alpha_bar\) in \[0, 1\] for conditioning_type='noise_level' models, got "
    refused = {
        "999.0": torch.tensor([999.0]),
        "1.5": torch.tensor([0.5, 1.5]),
        "-0.25": torch.tensor([[-0.25], [0.5]], dtype=torch.float64),
        "nan": torch.tensor(float("nan")),
        "2.0": torch.tensor([2.0], dtype=torch.bfloat16),
        "75.0": [75.0, 0.5],
    }
    for shown, level in refused.items():
        with pytest.raises(ValueError, match=message + shown + ": a scheduler timestep is not a level"):
            tiny_unet(sample, level)
    with torch.no_grad():  # the ends of the range are levels
        torch.testing.assert_close(
            tiny_unet(sample, torch.tensor([0.0, 1.0])).sample, tiny_unet(sample, [0.0, 1.0]).sample
        )
        # Compiling (or tracing for ONNX) reads no values: a data-dependent branch would break the graph.
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        tiny_unet(sample, torch.tensor([999.0]))


class OnAnAccelerator(torch.Tensor):
    """A CPU tensor that says it lies on a GPU: the level check takes the path it takes on an accelerator."""

    @property
    def device(self):
        return torch.device("cuda")


def test_float_levels_outside_the_range_are_refused_on_an_accelerator_too(tiny_unet):
    """They were range-checked on the CPU only (reading them elsewhere waits for the device), so on a GPU an Euler
    scheduler's float timesteps went in as levels without a word. Now one read per call checks them everywhere, but
    for a caller that checked its levels once and calls inside `levels_checked` (a pipeline's sampling loop)."""
    sample = torch.randn(2, 6, 32, 32)
    timesteps = torch.tensor([999.0, 0.5]).as_subclass(OnAnAccelerator)
    assert timesteps.device.type == "cuda"
    message = (
        r"signal_level must be sqrt\(alpha_bar\) in \[0, 1\] for conditioning_type='noise_level' models, got 999.0: "
    )
    with pytest.raises(ValueError, match=message + "a scheduler timestep is not a level"):
        tiny_unet(sample, timesteps)
    with unet_sr3.levels_checked():
        SR3UNet2DModel.check_signal_levels(timesteps)  # not read: the caller checked them
        with pytest.raises(ValueError, match=message):  # reading CPU levels waits for nothing: checked all the same
            tiny_unet(sample, torch.tensor([999.0, 0.5]))
    with pytest.raises(ValueError, match=message):
        SR3UNet2DModel.check_signal_levels(timesteps)
    SR3UNet2DModel.check_signal_levels(torch.full((2,), 999.0, device="meta"))  # no values to read


def test_a_pipeline_checks_its_levels_once_and_its_steps_wait_for_no_device(tiny_pipeline):
    checked_by_caller = []
    hook = tiny_pipeline.unet.register_forward_pre_hook(
        lambda *_: checked_by_caller.append(unet_sr3._LEVELS_CHECKED.get())
    )
    try:
        tiny_pipeline(torch.rand(1, 3, 8, 8), num_inference_steps=3, output_type="pt")
        tiny_pipeline.unet(torch.randn(1, 6, 32, 32), 0.5)
    finally:
        hook.remove()
    assert checked_by_caller == [True, True, True, False]


def test_a_pipeline_refuses_a_level_table_outside_the_range_before_any_step(tiny_pipeline, monkeypatch):
    """The once-per-call check is what stands for the steps' own on an accelerator: a table with a level outside
    [0, 1] (a scheduler's timestep) is refused before the network runs, not by the network at the first step."""
    from diffusers_sr3.pipelines import base

    real = base.network_inputs_for_schedule
    monkeypatch.setattr(
        base, "network_inputs_for_schedule", lambda *args: torch.cat([real(*args)[:-1], torch.tensor([999.0])])
    )
    calls = []
    hook = tiny_pipeline.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"got 999.0: a scheduler timestep is not a level"):
            tiny_pipeline(torch.rand(1, 3, 8, 8), num_inference_steps=3, output_type="pt")
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch: attention loops
def test_the_unet_runs_under_vmap(tiny_unet):
    """`torch.func.vmap` batches no data-dependent indexing or `.item()`: the level check is skipped for its tensors."""
    sample, levels = torch.randn(2, 6, 32, 32), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        mapped = torch.func.vmap(lambda x, level: tiny_unet(x[None], level[None]).sample[0])(sample, levels)
        torch.testing.assert_close(mapped, tiny_unet(sample, levels).sample, rtol=1e-4, atol=1e-5)


def test_absurd_sizes_are_refused_before_building():
    # A config.json asking for a model no memory holds: refused at once, not by the allocator (or after minutes).
    message = "make a model of .* parameters, over the 20 billion any SR3 model may have"
    with pytest.raises(ValueError, match=r"block_out_channels=1000000, .*" + message):
        SR3UNet2DModel.from_config(tiny_unet_config(block_out_channels=1000000))
    with pytest.raises(ValueError, match=r"layers_per_block=100 " + message):
        SR3UNet2DModel.from_config(tiny_unet_config(block_out_channels=1024, layers_per_block=100))


def test_enormous_block_counts_are_refused_before_building():
    # Tiny widths stay under the parameter cap however many blocks there are, which would take hours to build.
    message = r"make (\d+) blocks, over the 1000 any SR3 model may have: a damaged or wrong config"
    tiny = dict(block_out_channels=2, norm_groups=1, attention_resolutions=())
    with pytest.raises(ValueError, match=r"^layers_per_block=1000000 and 3 channel_multipliers " + message):
        SR3UNet2DModel.from_config(tiny_unet_config(layers_per_block=10**6, **tiny))
    many_levels = dict(channel_multipliers=[1] * 10**6, sample_size=2**20, layers_per_block=0)
    with pytest.raises(ValueError, match=r"^layers_per_block=0 and 1000000 channel_multipliers " + message):
        SR3UNet2DModel.from_config(tiny_unet_config(**many_levels, **tiny))
    # Every preset (the original's configs among them) is far below the limit, counted as built.
    built = (unet_sr3.ResnetAttentionBlock, unet_sr3.Downsample, unet_sr3.Upsample)
    for preset in PRESETS.values():
        config = preset.unet_config()
        with torch.device("meta"):
            model = SR3UNet2DModel(**config)
        blocks = sum(isinstance(module, built) for module in model.modules())
        assert blocks == unet_sr3._block_count(len(config["channel_multipliers"]), config["layers_per_block"])
        assert blocks * 10 < unet_sr3.MAX_BLOCKS


def test_the_parameter_count_checked_is_that_of_the_model_built(monkeypatch):
    counted, count = [], unet_sr3._parameter_count

    def counting(*args):
        counted.append(count(*args))
        return counted[-1]

    monkeypatch.setattr(unet_sr3, "_parameter_count", counting)
    configs = [preset.unet_config() for preset in PRESETS.values()] + [
        tiny_unet_config(**overrides)
        for overrides in (
            dict(layers_per_block=0),
            dict(layers_per_block=3, channel_multipliers=(1, 3, 2), film_affine=True),
            dict(condition_noise_embedding=True, mid_attention=False, attention_resolutions=(32, 8)),
            dict(pixel_unshuffle_factor=2, in_channels=1, out_channels=1, conditioning_type="timestep"),
        )
    ]
    for config in configs:
        with torch.device("meta"):  # the count, without the memory or time of the weights
            model = SR3UNet2DModel(**config)
        assert counted[-1] == sum(parameter.numel() for parameter in model.parameters()), config


def test_config_values_of_the_wrong_kind_are_named():
    refused = {
        "noise_level_embedding_scale must be a finite non-zero number, got 0": dict(noise_level_embedding_scale=0),
        "noise_level_embedding_scale must be a finite non-zero number, got inf": dict(
            noise_level_embedding_scale=float("inf")
        ),
        "noise_level_embedding_scale must be a finite non-zero number, got nan": dict(
            noise_level_embedding_scale=float("nan")
        ),
        "layers_per_block must be 0 or more, got -1": dict(layers_per_block=-1),
        r"sample_size must be an integer, got \(32, 32\)": dict(sample_size=(32, 32)),
        "attention_resolutions must be a list of integers, got 8": dict(attention_resolutions=8),
        "block_out_channels must be an integer, got 8.0": dict(block_out_channels=8.0),
        "pixel_unshuffle_factor must be an integer, got 2.0": dict(pixel_unshuffle_factor=2.0),
        "upscale_factor must be an integer, got 2.5": dict(upscale_factor=2.5),
        r"channel_multipliers must be a list of integers, got \(1, 2.0\)": dict(channel_multipliers=(1, 2.0)),
    }
    for message, overrides in refused.items():
        with pytest.raises(ValueError, match=message):
            SR3UNet2DModel(**tiny_unet_config(**overrides))
    # Lists (JSON configs) and numpy integers stay fine.
    SR3UNet2DModel(**tiny_unet_config(channel_multipliers=[1, 2, 2], sample_size=np.int64(32)))


def test_layers_per_block_0_keeps_the_blocks_of_the_way_up():
    unet = SR3UNet2DModel(**tiny_unet_config(layers_per_block=0)).eval()
    assert all(len(level.blocks) == 0 for level in unet.down_levels)
    assert all(len(level.blocks) == 1 for level in unet.up_levels)
    assert sum(isinstance(module, Attention) for module in unet.modules()) == 2  # the 8x8 level on the way up, mid
    with torch.no_grad():
        assert unet(torch.randn(1, 6, 32, 32), 0.5).sample.shape == (1, 3, 32, 32)


def test_non_square_inputs():
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    with torch.no_grad():
        assert unet(torch.randn(1, 6, 16, 40), 0.5).sample.shape == (1, 3, 16, 40)


def test_weights_trained_while_fused_are_kept_by_unfuse_and_by_save(tmp_path):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config())
    unet.fuse_qkv_projections()
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.5)
    sample = torch.randn(2, 6, 32, 32)
    for _ in range(2):
        optimizer.zero_grad()
        unet(sample, 0.5).sample.square().mean().backward()
        optimizer.step()
    unet.eval()
    with torch.no_grad():
        trained = unet(sample, 0.5).sample
        unet.save_pretrained(tmp_path)
        reloaded = SR3UNet2DModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(sample, 0.5).sample, trained)
        unet.unfuse_qkv_projections()
        torch.testing.assert_close(unet(sample, 0.5).sample, trained)


def test_weights_loaded_into_a_fused_model_are_the_ones_it_runs_and_keeps(tmp_path):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    other = SR3UNet2DModel(**tiny_unet_config()).eval()  # other weights, unfused: its state dict has no to_qkv
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        expected = other(sample, 0.5).sample
        unet.fuse_qkv_projections()
        assert unet.load_state_dict(other.state_dict()).missing_keys == []  # strict: to_qkv counts as loaded
        torch.testing.assert_close(unet(sample, 0.5).sample, expected)
        unet.save_pretrained(tmp_path)
        torch.testing.assert_close(SR3UNet2DModel.from_pretrained(tmp_path).eval()(sample, 0.5).sample, expected)
        unet.unfuse_qkv_projections()
        torch.testing.assert_close(unet(sample, 0.5).sample, expected)


def test_fusing_twice_then_unfusing_restores_the_model(tiny_unet):
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        reference = tiny_unet(sample, 0.5).sample
        tiny_unet.fuse_qkv_projections()
        tiny_unet.fuse_qkv_projections()
        tiny_unet.unfuse_qkv_projections()
        assert all(isinstance(p, AttnProcessor2_0) for p in tiny_unet.attn_processors.values())
        torch.testing.assert_close(tiny_unet(sample, 0.5).sample, reference)


def _reference_attention(attention, hidden_states):
    """The original SR3 SelfAttention formula (einsum, scale 1/sqrt(C), one head), from the 1x1-conv weights."""
    batch, channels, height, width = hidden_states.shape
    qkv_weight = torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight])[:, :, None, None]
    qkv = torch.nn.functional.conv2d(attention.group_norm(hidden_states), qkv_weight)
    query, key, value = qkv.view(batch, 1, channels * 3, height, width).chunk(3, dim=2)
    weights = torch.einsum("bnchw, bncyx -> bnhwyx", query, key) / math.sqrt(channels)
    weights = torch.softmax(weights.reshape(batch, 1, height, width, -1), -1).view(
        batch, 1, height, width, height, width
    )
    out = torch.einsum("bnhwyx, bncyx -> bnchw", weights, value).reshape(batch, channels, height, width)
    proj = torch.nn.functional.conv2d(out, attention.to_out[0].weight[:, :, None, None], attention.to_out[0].bias)
    return proj + hidden_states


def test_diffusers_attention_matches_the_original_formula(tiny_unet):
    attention = tiny_unet.mid_blocks[0].attention
    assert isinstance(attention, Attention) and isinstance(attention.processor, AttnProcessor2_0)
    hidden = torch.randn(2, attention.group_norm.num_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(attention(hidden), _reference_attention(attention, hidden), atol=1e-5, rtol=1e-5)


def test_attention_processors_can_be_swapped_and_fused(tiny_unet):
    sample, levels = torch.randn(2, 6, 32, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        reference = tiny_unet(sample, levels).sample
        processors = tiny_unet.attn_processors
        layers = [module for module in tiny_unet.modules() if isinstance(module, Attention)]
        assert len(layers) == 4  # 8x8 level: one block down, the middle, two blocks up
        assert len(processors) == 4 and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
        tiny_unet.set_attn_processor(AttnProcessor())  # the plain (non-SDPA) Diffusers processor
        assert all(isinstance(p, AttnProcessor) for p in tiny_unet.attn_processors.values())
        torch.testing.assert_close(tiny_unet(sample, levels).sample, reference, atol=1e-5, rtol=1e-5)
        tiny_unet.set_default_attn_processor()
        tiny_unet.fuse_qkv_projections()
        assert all(isinstance(p, FusedAttnProcessor2_0) for p in tiny_unet.attn_processors.values())
        torch.testing.assert_close(tiny_unet(sample, levels).sample, reference, atol=1e-5, rtol=1e-5)
        tiny_unet.unfuse_qkv_projections()
        assert all(isinstance(p, AttnProcessor2_0) for p in tiny_unet.attn_processors.values())
        assert not [key for key in tiny_unet.state_dict() if "to_qkv" in key]
        torch.testing.assert_close(tiny_unet(sample, levels).sample, reference)


def _legacy(values):
    """Tensors by current name -> by the names (and shapes) of diffusers-sr3 0.1.0's 1x1-conv attention."""
    legacy = {}
    for key, value in values.items():
        path, _, rest = key.partition(".attention.")
        if not rest:
            legacy[key] = value.clone()
        elif rest.startswith("group_norm."):
            legacy[f"{path}.attention.norm.{rest.split('.')[-1]}"] = value.clone()
        elif rest.startswith("to_out.0."):
            kind = rest.split(".")[-1]
            legacy[f"{path}.attention.proj_out.{kind}"] = value[:, :, None, None] if kind == "weight" else value
        elif rest == "to_q.weight":
            parts = [values[f"{path}.attention.to_{name}.weight"] for name in "qkv"]
            legacy[f"{path}.attention.qkv.weight"] = torch.cat(parts)[:, :, None, None].clone()
    return legacy


def _legacy_state_dict(unet):
    """The state dict as diffusers-sr3 0.1.0 saved it (`attention.norm`, a 1x1-conv `qkv`, `proj_out`)."""
    return _legacy(unet.state_dict())


def test_training_checkpoints_of_0_1_0_resume_ema_and_optimizer():
    from diffusers_sr3.models.unet_sr3 import (
        convert_legacy_optimizer_state,
        convert_legacy_parameter_list,
        legacy_parameter_names,
    )

    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config()).train()
    names = [name for name, _ in unet.named_parameters()]
    legacy_names = legacy_parameter_names(unet)
    assert len(legacy_names) == len(names) - 2 * 4  # 4 attention layers: 7 parameters each, 5 before
    assert legacy_names == list(_legacy({name: p for name, p in unet.named_parameters()}))
    # EMA shadow weights: a list in 0.1.0's order.
    legacy_ema = list(_legacy({name: p.detach() * 2 for name, p in unet.named_parameters()}).values())
    for converted, (name, parameter) in zip(convert_legacy_parameter_list(unet, legacy_ema), unet.named_parameters()):
        torch.testing.assert_close(converted, parameter.detach() * 2, msg=name)
    # AdamW state after one step, as a 0.1.0 checkpoint stores it, loads into the current optimizer.
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet(torch.randn(1, 6, 32, 32), 0.5).sample.square().mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    moments = {field: {n: state["state"][i][field] for i, n in enumerate(names)} for field in ("exp_avg", "exp_avg_sq")}
    legacy_moments = {field: list(_legacy(values).values()) for field, values in moments.items()}
    legacy_state = {
        "state": {
            i: {"step": state["state"][0]["step"].clone(), **{f: legacy_moments[f][i] for f in legacy_moments}}
            for i in range(len(legacy_names))
        },
        "param_groups": [{**state["param_groups"][0], "params": list(range(len(legacy_names)))}],
    }
    fresh = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    with pytest.raises(ValueError):
        fresh.load_state_dict(legacy_state)  # what a resume did without the conversion
    fresh.register_load_state_dict_pre_hook(lambda _, loaded: convert_legacy_optimizer_state(unet, loaded))
    fresh.load_state_dict(legacy_state)
    for index, name in enumerate(names):
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fresh.state_dict()["state"][index][field], moments[field][name], msg=name)
    steps = [entry["step"] for entry in fresh.state_dict()["state"].values()]
    assert len({id(step) for step in steps}) == len(steps)  # step counts are not shared between parameters
    assert convert_legacy_optimizer_state(unet, state) is state  # current checkpoints pass unchanged


def test_weights_saved_before_diffusers_attention_still_load(tmp_path, tiny_unet):
    from safetensors.torch import save_file

    legacy = _legacy_state_dict(tiny_unet)
    assert "mid_blocks.0.attention.qkv.weight" in legacy and not [k for k in legacy if "to_q" in k]
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        reference = tiny_unet(sample, 0.6).sample
    # A 0.1.0 folder, loaded by from_pretrained (low_cpu_mem_usage=False is refused: _keep_in_fp32_modules) ...
    tiny_unet.save_config(tmp_path)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded, info = SR3UNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.6).sample, reference)
    # ... and a 0.1.0 state dict (accelerate's resume, hand-written scripts) by load_state_dict.
    fresh = SR3UNet2DModel(**tiny_unet_config()).eval()
    fresh.load_state_dict(legacy, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(sample, 0.6).sample, reference)
    # New saves use Diffusers' attention names.
    tiny_unet.save_pretrained(tmp_path / "new")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "mid_blocks.0.attention.to_q.weight" in keys and not [k for k in keys if ".qkv." in k]


def test_the_packaged_model_saved_with_old_names_loads_completely(tmp_path):
    """The packaged network written as diffusers-sr3 0.1.0 wrote attention weights loads with nothing missing."""
    import shutil

    from safetensors.torch import save_file

    folder = REPO / "src" / "diffusers_sr3" / "pretrained" / "sr3-photos-x4" / "unet"
    current = SR3UNet2DModel.from_pretrained(folder)
    old = tmp_path / "unet"
    old.mkdir()
    shutil.copy(folder / "config.json", old / "config.json")
    save_file(_legacy_state_dict(current), str(old / "diffusion_pytorch_model.safetensors"))
    loaded, info = SR3UNet2DModel.from_pretrained(old, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sample = torch.randn(1, 6, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.5).sample, current(sample, 0.5).sample)


def test_signal_level_keyword_and_the_deprecated_noise_level(tiny_unet):
    sample, levels = torch.randn(2, 6, 32, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        positional = tiny_unet(sample, levels).sample
        torch.testing.assert_close(tiny_unet(sample, signal_level=levels).sample, positional)
        with pytest.warns(FutureWarning, match="signal_level"):
            torch.testing.assert_close(tiny_unet(sample, noise_level=levels).sample, positional)
        with pytest.raises(TypeError, match="not both"):
            tiny_unet(sample, levels, noise_level=levels)
        with pytest.raises(TypeError, match="needs signal_level"):
            tiny_unet(sample)
        with pytest.raises(TypeError, match="unexpected keyword"):
            tiny_unet(sample, levels, timestep=levels)


def test_layerwise_casting_keeps_embeddings_and_norms_in_float32(tiny_unet):
    sample, levels = torch.randn(1, 6, 32, 32), torch.tensor([0.5])
    with torch.no_grad():
        reference = tiny_unet(sample, levels).sample
    tiny_unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert tiny_unet.conv_in.weight.dtype == torch.bfloat16
    assert tiny_unet.mid_blocks[0].attention.to_q.weight.dtype == torch.bfloat16
    for kept in (
        tiny_unet.noise_level_embedding.linear_1.weight,
        tiny_unet.mid_blocks[0].attention.group_norm.weight,
        tiny_unet.mid_blocks[0].resnet.block1.norm.weight,
        tiny_unet.conv_out.norm.weight,
    ):
        assert kept.dtype == torch.float32
    with torch.no_grad():
        out = tiny_unet(sample, levels).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_on_cpu(tiny_unet, offload_type):
    sample, levels = torch.randn(1, 6, 32, 32), torch.tensor([0.5])
    with torch.no_grad():
        reference = tiny_unet(sample, levels).sample
        cpu = torch.device("cpu")
        options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        tiny_unet.enable_group_offload(cpu, offload_device=cpu, offload_type=offload_type, **options)
        torch.testing.assert_close(tiny_unet(sample, levels).sample, reference)


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}])
def test_device_map_and_low_cpu_mem_usage_loading(tmp_path, tiny_unet, device_map):
    tiny_unet.save_pretrained(tmp_path)
    assert "ResnetAttentionBlock" in SR3UNet2DModel._no_split_modules
    sample = torch.randn(1, 6, 32, 32)
    loaded = SR3UNet2DModel.from_pretrained(tmp_path, device_map=device_map, low_cpu_mem_usage=True)
    assert loaded.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.4).sample, tiny_unet(sample, 0.4).sample)


def test_attention_placement_follows_attention_resolutions():
    unet = SR3UNet2DModel(**tiny_unet_config(attention_resolutions=(16,)))
    has_attention = [block.attention is not None for level in unet.down_levels for block in level.blocks]
    assert has_attention == [False, True, False]  # 32, 16, 8
    assert unet.mid_blocks[0].attention is not None and unet.mid_blocks[1].attention is None


def test_timestep_conditioning_and_film_affine_change_the_network():
    torch.manual_seed(0)
    timestep_unet = SR3UNet2DModel(**tiny_unet_config(conditioning_type="timestep"))
    block = timestep_unet.down_levels[0].blocks[0].resnet
    assert isinstance(block.embedding_act, torch.nn.SiLU)
    affine_unet = SR3UNet2DModel(**tiny_unet_config(film_affine=True))
    proj = affine_unet.down_levels[0].blocks[0].resnet.embedding_proj
    assert proj.out_features == 2 * 8
    with torch.no_grad():
        out = timestep_unet(torch.randn(2, 6, 32, 32), torch.tensor([10, 900])).sample
    assert out.shape == (2, 3, 32, 32)


def test_affine_film_scales_by_one_plus_its_first_half_and_shifts_by_its_second():
    """The order and form that saved film_affine weights were trained with: a zero scale passes the features through."""
    from diffusers_sr3.models.unet_sr3 import ResnetBlock

    settings = dict(
        in_channels=8,
        out_channels=8,
        embedding_channels=4,
        norm_groups=4,
        dropout=0.0,
        embedding_act=False,
    )
    torch.manual_seed(0)
    affine = ResnetBlock(**settings, film_affine=True).eval()
    additive = ResnetBlock(**settings, film_affine=False).eval()
    shared = {key: value for key, value in affine.state_dict().items() if not key.startswith("embedding_proj.")}
    additive.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for block in (affine, additive):
            block.embedding_proj.weight.zero_()
            block.embedding_proj.bias.zero_()
        affine.embedding_proj.bias[8:] = 0.5  # shift; the scale half stays 0
        additive.embedding_proj.bias[:] = 0.5
        features, embedding = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
        torch.testing.assert_close(affine(features, embedding), additive(features, embedding))


def test_both_level_embeddings_stay_float32_in_a_half_precision_load(tmp_path):
    """The condition's level embedding must resolve nearby levels as the signal level's does."""
    torch.manual_seed(0)
    SR3UNet2DModel(**tiny_unet_config(condition_noise_embedding=True)).save_pretrained(tmp_path)
    loaded = SR3UNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.conv_in.weight.dtype == torch.bfloat16
    for embedding in (loaded.noise_level_embedding, loaded.condition_noise_level_embedding):
        assert {parameter.dtype for parameter in embedding.parameters()} == {torch.float32}


def test_embedding_scale_separates_nearby_levels():
    torch.manual_seed(0)
    plain = SR3UNet2DModel(**tiny_unet_config()).noise_level_embedding
    torch.manual_seed(0)
    scaled = SR3UNet2DModel(**tiny_unet_config(noise_level_embedding_scale=1000.0)).noise_level_embedding
    levels = torch.tensor([0.990, 0.995])
    with torch.no_grad():
        plain_gap = (plain(levels)[0] - plain(levels)[1]).norm()
        scaled_gap = (scaled(levels)[0] - scaled(levels)[1]).norm()
    assert scaled_gap > 20 * plain_gap


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(dropout=0.0)).train()
    sample, levels = torch.randn(2, 6, 32, 32), torch.tensor([0.2, 0.7])

    def gradients():
        unet.zero_grad()
        unet(sample, levels).sample.square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = gradients()
    unet.enable_gradient_checkpointing()
    assert all(block.gradient_checkpointing for block in unet.mid_blocks)
    checkpointed = gradients()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@needs_bfloat16_kernels
def test_save_and_load_round_trip_with_safetensors_and_bfloat16(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = SR3UNet2DModel.from_pretrained(tmp_path)
    public = lambda config: {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k[0] != "_"}  # noqa: E731
    assert public(loaded.config) == public(tiny_unet.config)
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.4).sample, tiny_unet(sample, 0.4).sample)
        bf16 = SR3UNet2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert bf16.conv_in.weight.dtype == torch.bfloat16
        assert bf16.noise_level_embedding.linear_1.weight.dtype == torch.float32  # kept accurate
        out = bf16(sample.bfloat16(), 0.4).sample.float()
        reference = tiny_unet(sample, 0.4).sample
    assert (out - reference).abs().max() < 0.05 * reference.abs().max() + 0.05


def test_attention_resolutions_that_match_no_level_are_warned_about(caplog):
    with caplog.at_level("WARNING"):
        SR3UNet2DModel(**tiny_unet_config(attention_resolutions=(7, 8)))
    assert "attention_resolutions [7] match no level (at sample_size 32 the levels are [32, 16, 8])" in caplog.text


def test_compile_repeated_blocks_raises_the_limit_under_its_older_name(monkeypatch):
    import types

    import torch._dynamo
    from diffusers import ModelMixin

    # Before torch 2.7 the setting was `cache_size_limit`; there is no `recompile_limit` to raise.
    older = types.SimpleNamespace(cache_size_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", older)
    monkeypatch.setattr(ModelMixin, "compile_repeated_blocks", lambda self, *args, **kwargs: None)
    SR3UNet2DModel(**tiny_unet_config()).compile_repeated_blocks(fullgraph=True)
    assert older.cache_size_limit == 11 and not hasattr(older, "recompile_limit")  # the tiny model's blocks


def test_compile_repeated_blocks_with_fullgraph_matches_eager(monkeypatch):
    import torch._dynamo
    from torch._inductor import cpu_vec_isa

    # Torch's own bug, outside this package (a plain compiled Conv2d or SiLU does it too): its FX graph cache key
    # leaves out the vector ISA that ATEN_CPU_CAPABILITY picks for inductor, so under the override the graphs cached
    # by runs without it come back with wrong values (NaN here), and the graphs it caches crash later runs without it.
    isas = cpu_vec_isa.valid_vec_isa_list()
    if isas and cpu_vec_isa.pick_vec_isa() != isas[0]:
        pytest.skip(
            f"ATEN_CPU_CAPABILITY holds inductor at {cpu_vec_isa.pick_vec_isa()!s} below this CPU's {isas[0]!s}: "
            "torch's FX graph cache is not keyed on it, and graphs cached without the override run wrong under it"
        )
    # The tiny model's 11 blocks: more structures than dynamo's default limit of 8 recompilations.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    sample, levels = torch.randn(2, 6, 32, 32), torch.tensor([0.3, 0.8])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = unet(sample, levels).sample
            unet.compile_repeated_blocks(fullgraph=True)
            torch.testing.assert_close(unet(sample, levels).sample, expected, atol=1e-5, rtol=1e-5)
        assert torch._dynamo.config.recompile_limit == 11
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
        unet.compile_repeated_blocks(fullgraph=True)
        assert torch._dynamo.config.recompile_limit == 64  # raised where needed, never lowered
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["tiny", "tiny_uncond"])
def test_tiny_preset_descriptions_give_their_parameter_count(name):
    from diffusers_sr3.presets import get_preset

    preset = get_preset(name)
    stated = int(re.search(r"~(\d+)k-parameter", preset.description).group(1)) * 1000
    actual = sum(parameter.numel() for parameter in SR3UNet2DModel(**preset.unet_config()).parameters())
    assert abs(actual - stated) < 0.05 * actual, (stated, actual)


def test_automodel_loads_a_saved_unet_and_loading_does_not_warn_about_auto_map(tmp_path, tiny_unet, monkeypatch):
    import json

    import diffusers.configuration_utils
    from diffusers import AutoModel

    from diffusers_sr3 import SR3Pipeline, make_scheduler

    warned = []
    monkeypatch.setattr(
        diffusers.configuration_utils.logger, "warning", lambda message, *_, **__: warned.append(message)
    )
    SR3Pipeline(tiny_unet, make_scheduler("ddpm", n_timestep=100)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "unet" / "config.json").read_text(encoding="utf-8"))
    assert config["auto_map"] == {"AutoModel": "unet_sr3.SR3UNet2DModel"}
    loaded = AutoModel.from_pretrained(str(tmp_path / "unet"), trust_remote_code=True)
    assert type(loaded).__name__ == "SR3UNet2DModel"
    reloaded = SR3UNet2DModel.from_pretrained(tmp_path / "unet")
    SR3UNet2DModel.from_config(SR3UNet2DModel.load_config(tmp_path / "unet"))
    assert "auto_map" not in reloaded.config and not warned
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.5).sample, tiny_unet(sample, 0.5).sample)
    # A UNet saved alone has the same re-export and auto_map (tested in test_automodel_loads_a_unet_saved_alone).
    tiny_unet.save_pretrained(tmp_path / "alone")
    assert (
        json.loads((tmp_path / "alone" / "config.json").read_text(encoding="utf-8"))["auto_map"] == config["auto_map"]
    )
    # Folders saved before the key load as they did.
    del config["auto_map"]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert "auto_map" not in SR3UNet2DModel.from_pretrained(tmp_path / "unet").config and not warned


@pytest.mark.parametrize(
    "options", [{}, {"variant": "fp16"}, {"safe_serialization": False}], ids=["default", "variant", "pickle"]
)
def test_automodel_loads_a_unet_saved_alone(tmp_path, tiny_unet, monkeypatch, options):
    import diffusers.configuration_utils
    from diffusers import AutoModel

    warned = []
    monkeypatch.setattr(
        diffusers.configuration_utils.logger, "warning", lambda message, *_, **__: warned.append(message)
    )
    tiny_unet.save_pretrained(tmp_path, **options)
    assert (
        (tmp_path / "unet_sr3.py")
        .read_text(encoding="utf-8")
        .endswith("from diffusers_sr3 import SR3UNet2DModel  # noqa: F401\n")
    )
    variant = {"variant": options["variant"]} if "variant" in options else {}
    loaded = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True, **variant)
    assert type(loaded) is SR3UNet2DModel and "auto_map" not in loaded.config
    sample = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 0.5).sample, tiny_unet(sample, 0.5).sample, rtol=0, atol=0)
    # This package's own loader drops the key without a word.
    assert "auto_map" not in SR3UNet2DModel.from_pretrained(tmp_path, **variant).config and not warned


def test_a_subclass_saves_no_auto_map_and_no_reexport(tmp_path):
    """`auto_map` names this package's `unet_sr3.SR3UNet2DModel`: a subclass (of any name, in any module) is not that
    class, and has no re-export that could load it."""
    import json

    class MyUNet(SR3UNet2DModel):
        pass

    class Renamed(SR3UNet2DModel):
        pass

    Renamed.__name__ = Renamed.__qualname__ = "SR3UNet2DModel"  # a same-named subclass in another module
    for cls in (MyUNet, Renamed):
        torch.manual_seed(0)
        folder = tmp_path / cls.__name__ / str(id(cls))
        cls(**tiny_unet_config()).save_pretrained(folder)
        assert "auto_map" not in json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert sorted(path.name for path in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    # Registering SR3UNet2DModel itself (as Diffusers' docs show for any model) changes neither.
    SR3UNet2DModel.register_for_auto_class("AutoModel")
    assert SR3UNet2DModel._auto_class == "AutoModel" and MyUNet._auto_class is None
    MyUNet(**tiny_unet_config()).save_config(tmp_path / "after")
    assert "auto_map" not in json.loads((tmp_path / "after" / "config.json").read_text(encoding="utf-8"))
    # A subclass that registers itself gets Diffusers' own auto_map, as any model does; its siblings do not.
    MyUNet.register_for_auto_class("AutoModel")
    MyUNet(**tiny_unet_config()).save_config(tmp_path / "registered")
    assert "auto_map" in json.loads((tmp_path / "registered" / "config.json").read_text(encoding="utf-8"))
    assert Renamed._auto_class is None and SR3UNet2DModel._auto_class == "AutoModel"
    with pytest.raises(ValueError, match="AutoModel"):
        SR3UNet2DModel.register_for_auto_class("AutoModelForSomething")


def test_save_config_on_a_file_gives_diffusers_error(tmp_path, tiny_unet):
    path = tmp_path / "config"
    path.write_text("", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"Provided path \(.*config\) should be a directory, not a file"):
        tiny_unet.save_config(path)
    assert path.read_text(encoding="utf-8") == ""


def test_training_steps_wait_for_no_device_for_their_levels():
    """The training objective draws its levels in [0, 1] itself: its network calls take them unread, as a sampling
    loop's do, or every training step on a GPU would wait for the device to read them back."""
    from diffusers_sr3.noise import make_scheduler, training_betas
    from diffusers_sr3.training.objective import noise_batch, predict

    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config())
    betas = training_betas(make_scheduler("ddpm", n_timestep=100))
    hr, condition = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    checked_by_caller = []
    hook = unet.register_forward_pre_hook(lambda *_: checked_by_caller.append(unet_sr3._LEVELS_CHECKED.get()))
    try:
        predict(unet, noise_batch(unet, betas, hr, condition))
    finally:
        hook.remove()
    assert checked_by_caller == [True]


def test_training_levels_given_to_the_objective_are_checked_where_they_enter():
    """The objective's network call takes its levels unread (`levels_checked`), as it draws them in [0, 1]: levels a
    caller gives it instead (`noise_level=`) went in unchecked on an accelerator. `noise_batch` checks those."""
    from diffusers_sr3.noise import make_scheduler, training_betas
    from diffusers_sr3.training.objective import noise_batch

    unet = SR3UNet2DModel(**tiny_unet_config())
    betas = training_betas(make_scheduler("ddpm", n_timestep=100))
    hr, condition = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    timesteps = torch.tensor([999.0, 0.5]).as_subclass(OnAnAccelerator)
    with pytest.raises(ValueError, match=r"got 999.0: a scheduler timestep is not a level"):
        noise_batch(unet, betas, hr, condition, noise_level=timesteps)
    noise_batch(unet, betas, hr, condition, noise_level=torch.tensor([0.0, 1.0]))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("cast", [lambda pipeline: pipeline.to(torch.bfloat16), lambda p: p.to(dtype=torch.float16)])
def test_a_cast_to_half_precision_keeps_the_level_embeddings_in_float32_as_loading_does(
    guided_pipeline, tmp_path, cast
):
    from diffusers_sr3 import SR3Pipeline

    guided_pipeline.save_pretrained(tmp_path / "model")
    records = _Records()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(records)
    try:
        cast(guided_pipeline)
    finally:
        diffusers_logger.removeHandler(records)
    # Diffusers warns of a cast that puts them in half precision; this one keeps them in float32.
    assert not [message for message in records.messages if "kept in float32" in message]
    dtype = guided_pipeline.unet.dtype
    loaded = SR3Pipeline.from_pretrained(tmp_path / "model", torch_dtype=dtype)
    for name in ("unet", "guidance_unet"):
        cast_state, loaded_state = getattr(guided_pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        cast_dtypes = {key: value.dtype for key, value in cast_state.items()}
        assert cast_dtypes == {key: value.dtype for key, value in loaded_state.items()}
        assert cast_dtypes["noise_level_embedding.linear_1.weight"] == torch.float32
        assert cast_dtypes["conv_in.weight"] == dtype != torch.float32
        # The same values too: the embeddings' float32 weights, not their half-precision rounding held in float32.
        assert [key for key, value in cast_state.items() if not torch.equal(value, loaded_state[key])] == []
    loaded.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    cast_images, loaded_images = (
        pipeline(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
        for pipeline in (guided_pipeline, loaded)
    )
    assert torch.equal(cast_images, loaded_images)
    guided_pipeline.to(torch.float32)  # and back: all of it
    assert {value.dtype for value in guided_pipeline.unet.state_dict().values()} == {torch.float32}
