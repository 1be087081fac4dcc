"""SR3UNet2DModel: shapes, both conditioning kinds, attention, checkpointing, save/load."""

import math

import pytest
import torch
from conftest import tiny_unet_config

from diffusers_sr3 import SR3UNet2DModel


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


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="conditioning_type"):
        SR3UNet2DModel(**tiny_unet_config(conditioning_type="sigma"))
    with pytest.raises(ValueError, match="norm_groups=3"):
        SR3UNet2DModel(**tiny_unet_config(norm_groups=3))
    with pytest.raises(ValueError, match="sample_size=30"):
        SR3UNet2DModel(**tiny_unet_config(sample_size=30))


def test_non_square_inputs():
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    with torch.no_grad():
        assert unet(torch.randn(1, 6, 16, 40), 0.5).sample.shape == (1, 3, 16, 40)


def _reference_attention(attention, hidden_states):
    """The original SR3 SelfAttention formula (einsum, scale 1/sqrt(C), one head)."""
    batch, channels, height, width = hidden_states.shape
    qkv = attention.qkv(attention.norm(hidden_states)).view(batch, 1, channels * 3, height, width)
    query, key, value = qkv.chunk(3, dim=2)
    weights = torch.einsum("bnchw, bncyx -> bnhwyx", query, key) / math.sqrt(channels)
    weights = torch.softmax(weights.reshape(batch, 1, height, width, -1), -1).view(
        batch, 1, height, width, height, width
    )
    out = torch.einsum("bnhwyx, bncyx -> bnchw", weights, value)
    return attention.proj_out(out.reshape(batch, channels, height, width)) + hidden_states


def test_sdpa_attention_matches_the_original_formula(tiny_unet):
    attention = tiny_unet.mid_blocks[0].attention
    hidden = torch.randn(2, attention.norm.num_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(attention(hidden), _reference_attention(attention, hidden), atol=1e-5, rtol=1e-5)


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
