"""Probe: autoguidance whose update is capped pixel by pixel, run through a benchmark script (see README.md beside
this file).

Each step's prediction becomes `unet + (guidance_scale - 1) * s * (unet - guide)`, where `s = min(1, tau / |unet -
guide|)` per pixel (the update's norm over the channels) and `tau` is LIMIT times the update's root mean square over
the image. LIMIT="4=1.5;4.5=1.5" maps each entry's guidance_scale to its LIMIT.

    LIMIT="4=1.5" python probe.py samplers <benchmarks/samplers.py arguments>
"""

import os
import runpy
import sys
from pathlib import Path

from diffusers_sr3.pipelines import base

BENCHMARKS = Path(__file__).resolve().parents[3]
LIMITS = {round(float(k), 4): float(v) for k, v in (item.split("=") for item in os.environ["LIMIT"].split(";"))}


def clipped_guidance(prediction, guide_prediction, guidance_scale, parallel_weight=1.0):
    if parallel_weight != 1:
        raise ValueError("the probe caps plain autoguidance only (parallel_guidance_weight 1)")
    update = prediction - guide_prediction
    norm = update.norm(dim=1, keepdim=True)
    limit = LIMITS[round(float(guidance_scale), 4)] * norm.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    capped = (limit / norm.clamp_min(1e-12)).clamp(max=1.0)
    return prediction + (guidance_scale - 1) * capped * update


base.guided_prediction = clipped_guidance
sys.path.insert(0, str(BENCHMARKS))
sys.argv = [str(BENCHMARKS / f"{sys.argv[1]}.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
