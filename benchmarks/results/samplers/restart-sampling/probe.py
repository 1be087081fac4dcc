"""Probe: restart sampling in detail mode, run through a benchmark script (see README.md beside this file).

A refinement below strength 1 runs RESTARTS times: each run starts from the last one's answer noised back to the
strength's level, with fresh noise (Xu et al., *Restart Sampling for Improving Generative Processes*, 2023, with the
restart interval the strength's). RESTARTS="2=3" maps each entry's guidance scale to its number of runs.

    RESTARTS="2=3" python probe.py samplers <benchmarks/samplers.py arguments>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_benchmark, setting_per_scale  # noqa: E402

from diffusers_sr3.pipelines.base import SR3BasePipeline  # noqa: E402

RESTARTS = setting_per_scale("RESTARTS")
single_run = SR3BasePipeline._denoise


def restarted(self, *args, **kwargs):
    if kwargs.get("init_sample") is None:  # from noise (strength 1), or the fidelity answer itself
        return single_run(self, *args, **kwargs)
    for _ in range(int(RESTARTS(kwargs.get("guidance_scale", 1.0)))):
        result, snapshots = single_run(self, *args, **kwargs)
        kwargs["init_sample"] = result
    return result, snapshots


run_benchmark(replacements={(SR3BasePipeline, "_denoise"): restarted})
