"""Probe: autoguidance with a scale of its own at each refinement step, run through a benchmark script (see README.md
beside this file).

SCALES="3.2,3.2,3.2,3.2,3.2,1,1,1,1,1" gives the steps of every pipeline call these scales in turn (the call must run
that many steps); 1 leaves a step unguided. The entry's guidance_scale must differ from 1, so that the guide runs.

    SCALES="..." python probe.py samplers <benchmarks/samplers.py arguments>
"""

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_with_guidance  # noqa: E402

SCALES = itertools.cycle(float(scale) for scale in os.environ["SCALES"].split(","))


def scale_per_step(prediction, guide_prediction, guidance_scale):
    return guide_prediction + next(SCALES) * (prediction - guide_prediction)


run_with_guidance(scale_per_step)
