"""Probe: frequency-split autoguidance, run through a benchmark script (see README.md beside this file).

Each step's prediction becomes `guide + low * lowpass(unet - guide) + guidance_scale * highpass(unet - guide)`, the
low-pass a Gaussian of FDG_SIGMA output pixels. FDG="3.5=1.5;3=1.5" maps each entry's guidance_scale (the fine
band's) to its coarse band's scale `low`.

    FDG="3=1.5" FDG_SIGMA=2 python probe.py samplers <benchmarks/samplers.py arguments>
"""

import os
import sys
from pathlib import Path

from diffusers_sr3.image_processing import lowpass

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_with_guidance, setting_per_scale  # noqa: E402

COARSE_SCALE = setting_per_scale("FDG")
SIGMA = float(os.environ.get("FDG_SIGMA", 2))


def frequency_split_guidance(prediction, guide_prediction, guidance_scale):
    update = prediction - guide_prediction
    coarse = lowpass(update, SIGMA)
    return guide_prediction + COARSE_SCALE(guidance_scale) * coarse + guidance_scale * (update - coarse)


run_with_guidance(frequency_split_guidance)
