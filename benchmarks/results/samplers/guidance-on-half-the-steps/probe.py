"""Probe: autoguidance with a scale of its own at each refinement step, run through a benchmark script (see README.md
beside this file).

SCALES="3.2,3.2,3.2,3.2,3.2,1,1,1,1,1" gives the steps of every pipeline call these scales in turn (the call must run
that many steps); 1 leaves a step unguided. The entry's guidance_scale must differ from 1, so that the guide runs.

    SCALES="..." python probe.py samplers <benchmarks/samplers.py arguments>
"""

import itertools
import os
import runpy
import sys
from pathlib import Path

from diffusers_sr3.pipelines import base

BENCHMARKS = Path(__file__).resolve().parents[3]
SCALES = itertools.cycle(float(scale) for scale in os.environ["SCALES"].split(","))


def scale_per_step(prediction, guide_prediction, guidance_scale, parallel_weight=1.0):
    if parallel_weight != 1:
        raise ValueError("the probe schedules plain autoguidance only (parallel_guidance_weight 1)")
    return guide_prediction + next(SCALES) * (prediction - guide_prediction)


base.guided_prediction = scale_per_step
sys.path.insert(0, str(BENCHMARKS))
sys.argv = [str(BENCHMARKS / f"{sys.argv[1]}.py")] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
