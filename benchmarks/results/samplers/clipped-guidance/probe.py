"""Probe: autoguidance whose update is capped pixel by pixel, run through a benchmark script (see README.md beside
this file).

Each step's prediction becomes `unet + (guidance_scale - 1) * s * (unet - guide)`, where `s = min(1, tau / |unet -
guide|)` per pixel (the update's norm over the channels) and `tau` is LIMIT times the update's root mean square over
the image. LIMIT="4=1.5;4.5=1.5" maps each entry's guidance_scale to its LIMIT.

    LIMIT="4=1.5" python probe.py samplers <benchmarks/samplers.py arguments>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_with_guidance, setting_per_scale  # noqa: E402

LIMIT = setting_per_scale("LIMIT")


def clipped_guidance(prediction, guide_prediction, guidance_scale):
    update = prediction - guide_prediction
    norm = update.norm(dim=1, keepdim=True)
    limit = LIMIT(guidance_scale) * norm.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    capped = (limit / norm.clamp_min(1e-12)).clamp(max=1.0)
    return prediction + (guidance_scale - 1) * capped * update


run_with_guidance(clipped_guidance)
