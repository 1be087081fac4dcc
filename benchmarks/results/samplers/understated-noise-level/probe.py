"""Probe: detail mode's networks told less noise than the sample has (as Stable Diffusion's "Detail Daemon" does),
run through a benchmark script (see README.md beside this file).

At a step of signal level `g` the noise-to-signal ratio is `sigma = sqrt(1 - g^2) / g`. The UNet and its guide are
told `(1 - AMOUNT) * sigma` instead, i.e. the signal level `g' = 1 / sqrt(1 + ((1 - AMOUNT) * sigma)^2)`, and the
noisy channels are scaled by `g' / g`, so that the signal has the size the network expects while the noise is larger
than it is told: the network should keep the excess as detail. Fidelity steps (temperature 0, including those a
refinement of `strength` below 1 starts from) are left alone.

    AMOUNT=0.1 python probe.py samplers <benchmarks/samplers.py arguments>
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_benchmark  # noqa: E402

from diffusers_sr3.models.unet_sr3 import SR3UNet2DModel  # noqa: E402
from diffusers_sr3.pipelines.base import SR3BasePipeline  # noqa: E402

AMOUNT = float(os.environ["AMOUNT"])
plain_forward, plain_denoise = SR3UNet2DModel.forward, SR3BasePipeline._denoise
in_detail_steps = False


def forward(self, sample, signal_level=None, *args, **kwargs):
    if not in_detail_steps:
        return plain_forward(self, sample, signal_level, *args, **kwargs)
    level = torch.as_tensor(signal_level, dtype=torch.float32, device=sample.device).reshape(-1)
    level = level.expand(sample.shape[0]) if level.numel() == 1 else level
    sigma = (1 - level**2).clamp_min(0).sqrt() / level.clamp_min(1e-6)
    told = 1 / (1 + ((1 - AMOUNT) * sigma) ** 2).sqrt()
    noisy = self.config.out_channels  # the noisy image follows the condition on the channel axis
    ratio = (told / level.clamp_min(1e-6)).view(-1, 1, 1, 1).to(sample.dtype)
    sample = torch.cat([sample[:, :-noisy], sample[:, -noisy:] * ratio], dim=1)
    return plain_forward(self, sample, told.to(sample.dtype), *args, **kwargs)


def denoise(self, *args, **kwargs):
    global in_detail_steps
    outer, in_detail_steps = in_detail_steps, kwargs.get("temperature", 1.0) != 0
    try:
        return plain_denoise(self, *args, **kwargs)
    finally:
        in_detail_steps = outer


run_benchmark(replacements={(SR3UNet2DModel, "forward"): forward, (SR3BasePipeline, "_denoise"): denoise})
