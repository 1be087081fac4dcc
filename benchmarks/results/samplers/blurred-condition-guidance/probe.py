"""Probe: guidance away from what the network draws from a blurrier input, run through a benchmark script (see
README.md beside this file).

Autoguidance extrapolates each step away from a weaker model: `guide + w x (unet - guide)`. Here the weakness is in
the input instead: the guide is given the condition (the bicubic upsample of the input) blurred by a Gaussian of
standard deviation BLUR_SIGMA output pixels. Where the input is smooth, blurring changes nothing and the two agree;
where it holds fine structure, the step goes further towards what the network makes of that structure. GUIDE=self
uses the UNet itself as the blurred-input guide; GUIDE=guide keeps the model's guidance UNet and blurs its input.

    BLUR_SIGMA=2 GUIDE=self python probe.py samplers <benchmarks/samplers.py arguments>

BLUR_SIGMA may be given per guidance scale, `"2=1.5;3=2"` (`sampler_probe.setting_per_scale`).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_benchmark, setting_per_scale  # noqa: E402

from diffusers_sr3.image_processing import lowpass  # noqa: E402
from diffusers_sr3.pipelines.base import SR3BasePipeline  # noqa: E402

GUIDE = os.environ.get("GUIDE", "self")
if GUIDE not in ("self", "guide"):
    raise ValueError(f"GUIDE must be 'self' or 'guide', got {GUIDE!r}")
BLUR = os.environ["BLUR_SIGMA"]
sigma_for = setting_per_scale("BLUR_SIGMA") if "=" in BLUR else (lambda scale: float(BLUR))
CONDITION_CHANNELS = 3


def blurred_condition(model_input: torch.Tensor, sigma: float) -> torch.Tensor:
    """`model_input` (condition first, then the noisy image) with its condition blurred."""
    condition = lowpass(model_input[:, :CONDITION_CHANNELS], sigma)
    return torch.cat([condition, model_input[:, CONDITION_CHANNELS:]], dim=1)


original_denoise = SR3BasePipeline._denoise


def denoise_with_blurred_guide(self, *args, guide=None, guidance_scale=1.0, **kwargs):
    if guide is not None:
        network = self.unet if GUIDE == "self" else guide
        sigma = sigma_for(guidance_scale)

        def blurred_input_guide(model_input, signal_level, *rest, **options):
            return network(blurred_condition(model_input, sigma), signal_level, *rest, **options)

        guide = blurred_input_guide

    return original_denoise(self, *args, guide=guide, guidance_scale=guidance_scale, **kwargs)


run_benchmark(replacements={(SR3BasePipeline, "_denoise"): denoise_with_blurred_guide})
