"""The phase-free texture loss: what it measures, how it enters the objective, and that training applies it."""

import argparse

import pytest
import torch
from test_data import make_image_folder
from test_training import fast_options

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.training import TrainingConfig, train
from diffusers_sr3.training.config import add_training_arguments, config_from_args
from diffusers_sr3.training.objective import (
    diffusion_loss,
    local_amplitude_spectra,
    noise_batch,
    predicted_clean,
    texture_loss,
)


def periodic_texture(seed=0, period=8, size=32):
    """One random `period`-pixel patch tiled over the image: every patch of the grid is the same texture."""
    patch = torch.randn(1, 3, period, period, generator=torch.Generator().manual_seed(seed))
    return patch.repeat(1, 1, size // period, size // period)


def test_texture_loss_sees_how_much_texture_not_where_it_lies():
    texture = periodic_texture()
    # Shifted, every patch is a circular shift of the same texture: other pixels, the same local spectrum.
    shifted = torch.roll(texture, shifts=(3, 5), dims=(2, 3))
    assert (shifted - texture).abs().mean() > 0.5
    assert texture_loss(shifted, texture).item() < 1e-5
    # The regression's answer to uncertain texture, its mean (flat), is what the loss penalises; half the ripple's
    # amplitude costs exactly half as much.
    flat = texture_loss(torch.zeros_like(texture), texture)
    assert flat.item() > 0.5
    assert texture_loss(0.5 * texture, texture).item() == pytest.approx(0.5 * flat.item(), rel=1e-5)
    # The patch means are left to the main loss: a brightness offset is not texture.
    assert texture_loss(texture + 0.3, texture).item() < 1e-5
    assert texture_loss(texture, texture).shape == (1,)


def test_local_spectra_cover_whole_patches_and_drop_their_means():
    images = torch.randn(2, 3, 20, 17)
    spectra = local_amplitude_spectra(images, 8)
    # 20 x 17 holds 2 x 2 whole 8-pixel patches; each has 8 x 5 rfft coefficients, less its mean.
    assert spectra.shape == (2, 3, 2, 2, 8 * 5 - 1)
    # Parseval, against the full two-sided spectrum: with orthonormal scaling its energy without the mean term is the
    # patch's energy about its mean; the stored half holds the columns 0..4 of it.
    patch = images[0, 0, :8, :8]
    full = torch.fft.fft2(patch, norm="ortho").abs() ** 2
    assert (full.sum() - full[0, 0]).item() == pytest.approx((patch - patch.mean()).pow(2).sum().item(), rel=1e-5)
    half = full[:, :5].flatten()[1:]
    assert spectra[0, 0, 0, 0].pow(2).sum().item() == pytest.approx(half.sum().item(), rel=1e-5)
    with pytest.raises(ValueError, match="patches of 32 pixels do not fit in 20x17 images"):
        local_amplitude_spectra(images, 32)
    # An image one patch wide fits exactly.
    assert local_amplitude_spectra(images[..., :8, :8], 8).shape == (2, 3, 1, 1, 8 * 5 - 1)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_the_clean_estimate_follows_the_prediction_target(tiny_unet, prediction_type):
    hr = torch.rand(3, 3, 16, 16) * 2 - 1
    condition = torch.rand(3, 3, 16, 16) * 2 - 1
    betas = torch.linspace(1e-4, 2e-2, 50, dtype=torch.float64)
    batch = noise_batch(
        tiny_unet, betas, hr, condition, prediction_type=prediction_type, residual=True, residual_scale=4.0
    )
    assert torch.allclose(batch.clean, (hr - condition) * 4.0)
    # The exact prediction maps back to the image that was noised.
    assert torch.allclose(predicted_clean(batch.target, batch, prediction_type), batch.clean, atol=1e-3)


def test_diffusion_loss_adds_the_texture_term_weighted_by_signal_share(tiny_unet):
    hr = torch.rand(4, 3, 16, 16) * 2 - 1
    condition = torch.rand(4, 3, 16, 16) * 2 - 1
    levels = torch.tensor([0.0, 0.3, 0.7, 0.99])
    betas = torch.linspace(1e-4, 2e-2, 50, dtype=torch.float64)
    batch = noise_batch(tiny_unet, betas, hr, condition, prediction_type="sample", noise_level=levels)
    prediction = torch.zeros_like(hr, requires_grad=True)
    base = diffusion_loss(prediction, batch, prediction_type="sample")
    with_texture = diffusion_loss(prediction, batch, prediction_type="sample", texture_weight=2.0)
    expected = base + 2.0 * (levels**2 * texture_loss(prediction, batch.clean)).mean()
    assert with_texture.item() == pytest.approx(expected.item(), rel=1e-5)
    assert with_texture.item() > base.item()
    # A flat estimate has zero amplitudes, where |z| has no derivative: the gradient must stay finite.
    with_texture.backward()
    assert torch.isfinite(prediction.grad).all()


def test_training_applies_the_texture_loss_and_records_it(tmp_path):
    data = make_image_folder(tmp_path / "images", count=4, bad=False)
    weights = {}
    for weight in (0.0, 5.0):
        options = fast_options(tmp_path / f"w{weight:g}", residual=True, prediction_type="sample", residual_scale=4.0)
        output = train(TrainingConfig(train_data_dir=str(data), texture_loss_weight=weight, **options))
        weights[weight] = SR3Pipeline.from_pretrained(output).unet.state_dict()
    changed = [name for name in weights[0.0] if not torch.equal(weights[0.0][name], weights[5.0][name])]
    assert changed  # same seed, same data: only the loss differs
    assert "texture loss x5" in (tmp_path / "w5" / "README.md").read_text(encoding="utf-8")
    assert "texture loss" not in (tmp_path / "w0" / "README.md").read_text(encoding="utf-8")


def test_texture_loss_options_are_parsed_and_checked():
    parser = add_training_arguments(argparse.ArgumentParser(), num_validation_images=2)
    config = config_from_args(parser.parse_args(["--texture_loss_weight", "2", "--texture_loss_patch_size", "16"]))
    assert config.texture_loss_weight == 2.0 and config.texture_loss_patch_size == 16
    assert TrainingConfig().texture_loss_weight == 0.0
    with pytest.raises(ValueError, match="texture_loss_weight must not be negative"):
        TrainingConfig(texture_loss_weight=-1)
    with pytest.raises(ValueError, match="texture_loss_patch_size must be at least 2"):
        TrainingConfig(texture_loss_weight=1, texture_loss_patch_size=1)
