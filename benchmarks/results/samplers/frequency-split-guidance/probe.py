"""Probe: frequency-split autoguidance, run through a benchmark script (see README.md beside this file).

Each step's prediction becomes `guide + low * lowpass(unet - guide) + guidance_scale * highpass(unet - guide)`, the
low-pass a Gaussian of FDG_SIGMA output pixels. FDG="3.5=1.5;3=1.5" maps each entry's guidance_scale (the fine
band's) to its coarse band's scale `low`.

    FDG="3=1.5" FDG_SIGMA=2 python probe.py samplers <benchmarks/samplers.py arguments>
"""

import os
import runpy
import sys
from pathlib import Path

from diffusers_sr3.image_processing import lowpass
from diffusers_sr3.pipelines import base

BENCHMARKS = Path(__file__).resolve().parents[3]
COARSE_SCALES = {round(float(k), 4): float(v) for k, v in (item.split("=") for item in os.environ["FDG"].split(";"))}
SIGMA = float(os.environ.get("FDG_SIGMA", 2))


def frequency_split_guidance(prediction, guide_prediction, guidance_scale, parallel_weight=1.0):
    if parallel_weight != 1:
        raise ValueError("the probe splits plain autoguidance only (parallel_guidance_weight 1)")
    update = prediction - guide_prediction
    coarse = lowpass(update, SIGMA)
    fine_scale = guidance_scale
    return guide_prediction + COARSE_SCALES[round(float(fine_scale), 4)] * coarse + fine_scale * (update - coarse)


base.guided_prediction = frequency_split_guidance
sys.path.insert(0, str(BENCHMARKS))
sys.argv = [str(BENCHMARKS / f"{sys.argv[1]}.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
