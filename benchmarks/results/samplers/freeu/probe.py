"""Probe: FreeU (Si et al., *FreeU: Free Lunch in Diffusion U-Net*, CVPR 2024) in the SR3 UNet and its guide, run
through a benchmark script (see README.md beside this file).

On the way up, at the two lowest-resolution levels, the first half of the backbone's channels is scaled by B (FreeU_v2:
by `1 + (B - 1) * m`, with `m` the channel mean normalised to [0, 1] per image) and the skip connection's lowest
frequencies (the centre 2x2 of its Fourier transform, FreeU's threshold 1) by S. FREEU="B1,B2,S1,S2", level 0 the
lowest resolution.

    FREEU="1.1,1.05,0.9,0.95" python probe.py samplers <benchmarks/samplers.py arguments>
"""

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_benchmark  # noqa: E402

from diffusers_sr3.models.unet_sr3 import SR3UNet2DModel, SR3UNet2DOutput  # noqa: E402

BACKBONE, SKIP = ([float(value) for value in part.split(",")] for part in os.environ["FREEU"].split(";"))


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """`x` with its lowest frequencies (FreeU's `threshold` around the centre) scaled by `scale`."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.ones_like(spectrum.real)
    centre_row, centre_col = height // 2, width // 2
    mask[..., centre_row - threshold : centre_row + threshold, centre_col - threshold : centre_col + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


def scaled_backbone(hidden_states: torch.Tensor, factor: float) -> torch.Tensor:
    """FreeU_v2: the first half of the channels times `1 + (factor - 1) * m`, `m` the normalised channel mean."""
    mean = hidden_states.mean(dim=1, keepdim=True)
    low = mean.amin(dim=(-2, -1), keepdim=True)
    high = mean.amax(dim=(-2, -1), keepdim=True)
    weight = 1 + (factor - 1) * (mean - low) / (high - low).clamp_min(1e-6)
    half = hidden_states.shape[1] // 2
    return torch.cat([hidden_states[:, :half] * weight, hidden_states[:, half:]], dim=1)


def freeu_forward(self, sample, signal_level=None, condition_noise_level=None, return_dict=True):
    batch = sample.shape[0]
    signal_level = self._per_sample(signal_level, batch, sample.device, "signal_level")
    embedding = self.noise_level_embedding(signal_level).to(sample.dtype)
    unshuffle = self.config.get("pixel_unshuffle_factor", 1)
    if unshuffle > 1:
        sample = F.pixel_unshuffle(sample, unshuffle)
    hidden_states = self.conv_in(sample)
    skips = [hidden_states]
    for level in self.down_levels:
        for block in level.blocks:
            hidden_states = block(hidden_states, embedding)
            skips.append(hidden_states)
        if level.downsampler is not None:
            hidden_states = level.downsampler(hidden_states)
            skips.append(hidden_states)
    for block in self.mid_blocks:
        hidden_states = block(hidden_states, embedding)
    for index, level in enumerate(self.up_levels):
        for block in level.blocks:
            skip = skips.pop()
            if index < len(BACKBONE):
                hidden_states = scaled_backbone(hidden_states, BACKBONE[index])
                skip = fourier_filter(skip, SKIP[index])
            hidden_states = block(torch.cat([hidden_states, skip], dim=1), embedding)
        if level.upsampler is not None:
            hidden_states = level.upsampler(hidden_states)
    output = self.conv_out(hidden_states)
    if unshuffle > 1:
        output = F.pixel_shuffle(output, unshuffle)
    return SR3UNet2DOutput(sample=output) if return_dict else (output,)


run_benchmark(replacements={(SR3UNet2DModel, "forward"): freeu_forward})
