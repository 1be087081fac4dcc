"""The SR3 training objective: noise the target image, ask the network, compare with the target.

Kept apart from the training loop so that the loss is one small function that can be tested against the
original code and reused by every training script and study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..models.unet_sr3 import SR3UNet2DModel, levels_checked
from ..noise import augment_condition, sample_training_noise_levels, sqrt_alphas_cumprod_prev

LOSS_TYPES = ("l1", "l2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class NoisedBatch:
    """One training batch after noising: what the network sees and what it should predict."""

    network_input: torch.Tensor  # condition (if any) concatenated in front of the noisy image
    network_level: torch.Tensor  # (B,) noise levels, or integer timesteps for "timestep" networks
    noise_level: torch.Tensor  # (B,) sqrt(alpha_bar) of each sample, float32
    target: torch.Tensor
    condition_noise_level: Optional[torch.Tensor] = None  # (B,) for noise-conditioning augmentation
    clean: Optional[torch.Tensor] = None  # the image that was noised (the scaled residual for residual training)


def predict(unet: SR3UNet2DModel, batch: NoisedBatch) -> torch.Tensor:
    """The network's prediction for a noised batch."""
    # The levels come from `noise_batch`, which draws them in [0, 1] (or checks those it is given): reading them back
    # would wait for an accelerator at every training step.
    with levels_checked():
        return unet(batch.network_input, batch.network_level, condition_noise_level=batch.condition_noise_level).sample


def noise_batch(
    unet: SR3UNet2DModel,
    betas: torch.Tensor,
    target_images: torch.Tensor,
    condition: Optional[torch.Tensor] = None,
    prediction_type: str = "epsilon",
    noise: Optional[torch.Tensor] = None,
    noise_level: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    per_sample_timestep: bool = True,
    condition_noise_max: float = 0.0,
    residual: bool = False,
    residual_scale: float = 1.0,
) -> NoisedBatch:
    """Noise `target_images` at a random level (SR3's continuous levels, or DDPM's integer timesteps).

    Args:
        unet: the network being trained (its config says which kind of level it takes).
        betas: the training beta schedule, float64 `(T,)` (see `noise.training_betas`).
        target_images: `(B, C, H, W)` clean images in [-1, 1].
        condition: `(B, 3, H, W)` upsampled low-resolution images, or None for unconditional training.
        prediction_type: `epsilon`, `v_prediction` or `sample`.
        noise, noise_level: fix the draw (tests); otherwise drawn from `generator` / the global RNG.
        generator: random source, on the CPU; without it, the global RNGs, and the noise is drawn on the images'
            device.
        per_sample_timestep: draw an independent step per sample (the original draws one per batch).
        condition_noise_max: for models with `condition_noise_embedding`: noise each condition at a level drawn
            uniformly from [0, condition_noise_max) (noise-conditioning augmentation).
        residual: diffuse `target_images - condition` (the detail bicubic upsampling misses) instead of the images.
        residual_scale: multiplies the residual before noising, so that it is not drowned by the schedule's noise
            (the residual of x4 photos has a standard deviation of ~0.1; see `measure_residual_scale`).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if residual:
        if condition is None:
            raise ValueError("residual training needs a condition (super-resolution)")
        target_images = (target_images - condition) * residual_scale
    elif residual_scale != 1.0:
        raise ValueError("residual_scale applies to residual training only")
    batch = target_images.shape[0]
    device = target_images.device
    timestep_network = unet.config.conditioning_type == "timestep"
    if noise_level is not None:
        if not timestep_network:  # given, not drawn: the network takes the batch's levels unread (`predict`)
            SR3UNet2DModel.check_signal_levels(noise_level)
        noise_level = noise_level.reshape(-1).float().to(device)
        network_level = noise_level
    elif timestep_network:
        # The original DDPM variant: integer t per sample in [0, T), level sqrt(alpha_bar_t).
        timesteps = torch.randint(0, betas.numel(), (batch,), generator=generator)
        noise_level = sqrt_alphas_cumprod_prev(betas)[timesteps + 1].float().to(device)
        network_level = timesteps.to(device)
    else:
        noise_level = sample_training_noise_levels(
            betas, batch, generator=generator, device=device, per_sample_timestep=per_sample_timestep
        )
        network_level = noise_level
    if noise is None:
        # On a GPU, a batch of noise drawn on the CPU and copied over costs tens of milliseconds a step.
        source = generator.device if generator is not None else device
        noise = torch.randn(target_images.shape, generator=generator, dtype=torch.float32, device=source).to(device)
    level = noise_level.view(-1, 1, 1, 1)
    sigma = (1 - level**2).clamp(min=0).sqrt()
    noisy = level * target_images + sigma * noise
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = level * noise - sigma * target_images
    else:
        target = target_images
    condition_noise_level = None
    if unet.config.get("condition_noise_embedding", False) and condition is not None:
        condition_noise_level = torch.rand(batch, generator=generator).to(device) * condition_noise_max
        condition = augment_condition(condition, condition_noise_level, generator=generator)
    elif condition_noise_max > 0:
        raise ValueError("condition_noise_max needs a conditional model with condition_noise_embedding=True")
    network_input = noisy if condition is None else torch.cat([condition, noisy], dim=1)
    return NoisedBatch(network_input, network_level, noise_level, target, condition_noise_level, target_images)


def measure_residual_scale(high_resolution: torch.Tensor, condition: torch.Tensor) -> float:
    """The residual scale that gives the residual `high_resolution - condition` unit standard deviation.

    Like latent diffusion's scaling factor: the diffusion schedule assumes data of unit scale, and SR residuals
    are ~10x smaller, so without it the noise hides the residual at nearly every training level and the model
    learns its mean (the bicubic upsample). Rounded to 3 significant digits, so that it reads well in configs.
    """
    std = float((high_resolution.double() - condition.double()).std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError("cannot measure a residual scale: the residual of these images is zero")
    return float(f"{1.0 / std:.3g}")


def min_snr_weights(noise_level: torch.Tensor, prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the chosen prediction target, on the device of
    `noise_level`."""
    # In float64 on the CPU: Apple's MPS has no float64, and the CPU gives what CUDA's float64 gives.
    alpha_bar = noise_level.to("cpu", torch.float64) ** 2
    snr = alpha_bar / (1 - alpha_bar).clamp(min=1e-12)
    clipped = snr.clamp(max=snr_gamma)
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:
        weights = clipped
    return weights.float().to(noise_level.device)


def predicted_clean(prediction: torch.Tensor, batch: NoisedBatch, prediction_type: str) -> torch.Tensor:
    """The network's estimate of the clean image (x0) of a noised batch, whatever its prediction target."""
    if prediction_type == "sample":
        return prediction
    level = batch.noise_level.view(-1, 1, 1, 1)
    sigma = (1 - level**2).clamp(min=0).sqrt()
    noisy = batch.network_input[:, -prediction.shape[1] :]
    if prediction_type == "v_prediction":
        return level * noisy - sigma * prediction
    return (noisy - sigma * prediction) / level.clamp(min=1e-4)


def local_amplitude_spectra(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """|FFT| of each non-overlapping `patch_size` patch but its mean (DC) term: `(B, C, H/p, W/p, p * (p/2 + 1) - 1)`.

    The amplitudes say how much texture of each frequency a patch holds and nothing of where it lies (the phase).
    """
    height, width = images.shape[-2:]
    if min(height, width) < patch_size:
        raise ValueError(f"texture loss patches of {patch_size} pixels do not fit in {height}x{width} images")
    images = images[..., : height - height % patch_size, : width - width % patch_size]
    patches = images.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
    amplitudes = torch.fft.rfft2(patches.float(), norm="ortho").abs()
    # The patch mean (the DC term) is where the texture sits, not texture: the main loss keeps it, signed.
    return amplitudes.flatten(-2)[..., 1:]


def texture_loss(estimate: torch.Tensor, clean: torch.Tensor, patch_size: int = 8) -> torch.Tensor:
    """Per-sample L1 between the local amplitude spectra of `estimate` and `clean` (see `local_amplitude_spectra`).

    Where the noisy input leaves a texture's exact pixels uncertain, the regression target's optimum is their mean,
    which is flat; this term is indifferent to where the texture's ripples lie and asks only for their energy.
    """
    error = local_amplitude_spectra(estimate, patch_size) - local_amplitude_spectra(clean, patch_size)
    return error.abs().flatten(1).mean(dim=1)


def diffusion_loss(
    prediction: torch.Tensor,
    batch: NoisedBatch,
    loss_type: str = "l1",
    snr_gamma: Optional[float] = None,
    prediction_type: str = "epsilon",
    texture_weight: float = 0.0,
    texture_patch_size: int = 8,
) -> torch.Tensor:
    """Mean L1 (SR3's choice) or L2 between prediction and target, optionally min-SNR weighted per sample.

    `texture_weight` adds `texture_loss` on the predicted clean image, weighted per sample by alpha_bar (the share
    of the noisy input that is signal), so that it acts where the input still shows the image and leaves the
    noisiest levels, whose answer is the posterior mean that fidelity mode returns, to the regression.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    prediction = prediction.float()
    error = F.l1_loss(prediction, batch.target, reduction="none")
    if loss_type == "l2":
        error = error**2
    per_sample = error.flatten(1).mean(dim=1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(batch.noise_level, prediction_type, snr_gamma)
    if texture_weight:
        if batch.clean is None:
            raise ValueError("the texture loss needs the clean images of the batch (NoisedBatch.clean)")
        texture = texture_loss(predicted_clean(prediction, batch, prediction_type), batch.clean, texture_patch_size)
        per_sample = per_sample + texture_weight * batch.noise_level**2 * texture
    return per_sample.mean()
