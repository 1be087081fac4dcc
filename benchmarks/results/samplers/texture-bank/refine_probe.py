"""Probe: the bank's texture (`probe.py` beside this file) put into the fidelity answer that detail mode's refinement
starts from, so that the refinement (strength < 1) redraws it as the network sees fit, run through a benchmark script:

    TB_GAIN=2 python benchmarks/results/samplers/texture-bank/refine_probe.py samplers --whole-photos \
        --photos pyiqa_ref_dir/ --crops 1024 --batch-size 32 --fid \
        --entries ddim:10:eta=1:strength=0.6:guidance_scale=2:window_size=64 --output never-seen

TB_GAIN is the gain of `probe.with_texture`, applied to the refinement's start in the network's (scaled) residual.
"""

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE))
import probe  # noqa: E402
from sampler_probe import run_benchmark  # noqa: E402

from diffusers_sr3 import SR3Pipeline  # noqa: E402

GAIN = float(os.environ["TB_GAIN"])
BANK = probe.build_bank(512, 200_000, seed=0)
fidelity_estimate = SR3Pipeline._fidelity_estimate


def fidelity_with_texture(self, shape, condition, steps, condition_noise_level):
    estimate = fidelity_estimate(self, shape, condition, steps, condition_noise_level)
    scale = self.config.get("residual_scale", 1.0)
    upsampled = condition.float().cpu()
    output = upsampled + estimate.float().cpu() / scale
    textured = probe.with_texture(upsampled, output, probe.bank_detail(upsampled, BANK), GAIN)
    return ((textured - upsampled) * scale).to(estimate.device, estimate.dtype)


with torch.no_grad():
    run_benchmark(replacements={(SR3Pipeline, "_fidelity_estimate"): fidelity_with_texture})
