"""Probe: FreeU (Si et al., *FreeU: Free Lunch in Diffusion U-Net*, CVPR 2024) in the SR3 UNet and its guide, run
through a benchmark script (see README.md beside this file).

On the way up, at each of the first levels named (FreeU's recipe: the two lowest resolutions), the first half of the
backbone's channels is scaled by B (FreeU_v2: by `1 + (B - 1) * m`, with `m` the channel mean normalised to [0, 1] per
image) and the skip connection's lowest frequencies (the centre 2x2 of its Fourier transform, FreeU's threshold 1) by
S. FREEU="B0,B1[,B2];S0,S1[,S2]", level 0 the lowest resolution.

    FREEU="1.3,1.4;0.9,0.2" python probe.py samplers <benchmarks/samplers.py arguments>
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_benchmark  # noqa: E402

from diffusers_sr3.models.unet_sr3 import SR3UNet2DModel  # noqa: E402

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


def install_freeu(model: SR3UNet2DModel) -> None:
    """Hooks on `model`'s way up: each block of the first `len(BACKBONE)` levels gets its input, the backbone and the
    skip concatenated, with FreeU applied to each side. Where the two split is the channel count of what ran just
    before the block (the middle, the previous block or an upsampler), recorded by the other hooks."""
    backbone_channels = {}

    def record(module, inputs, output):
        backbone_channels["last"] = output.shape[1]

    def freeu(index):
        def pre_hook(module, args):
            joined, embedding = args
            split = backbone_channels["last"]
            backbone = scaled_backbone(joined[:, :split], BACKBONE[index])
            skip = fourier_filter(joined[:, split:], SKIP[index])
            return torch.cat([backbone, skip], dim=1), embedding

        return pre_hook

    model.mid_blocks[-1].register_forward_hook(record)
    for index, level in enumerate(model.up_levels):
        for block in level.blocks:
            if index < len(BACKBONE):
                block.register_forward_pre_hook(freeu(index))
            block.register_forward_hook(record)
        if level.upsampler is not None:
            level.upsampler.register_forward_hook(record)


unhooked_forward = SR3UNet2DModel.forward


def forward_with_freeu(self, *args, **kwargs):
    if not getattr(self, "freeu_installed", False):
        install_freeu(self)
        self.freeu_installed = True
    return unhooked_forward(self, *args, **kwargs)


run_benchmark(replacements={(SR3UNet2DModel, "forward"): forward_with_freeu})
