"""Probe: the network adapted to each photo before it is super-resolved (`adaptation.adapted_to` beside this file),
run through a benchmark script (see README.md beside this file).

Each photo's input is adapted to once, with ADAPT_STEPS steps at ADAPT_LR; every entry of the run then super-resolves
that photo with its adapted weights, and the packaged weights come back after each call. ADAPT_AUTOCAST=bf16 or float32
overrides adaptation.py's choice of precision (`bfloat16_training`: bfloat16 autocast on this machine).

    ADAPT_STEPS=300 ADAPT_LR=1e-4 python probe.py samplers <benchmarks/samplers.py --whole-photos arguments>
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sampler_probe import run_benchmark  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation as adaptation_module  # noqa: E402
from adaptation import adapted_to, weights_copy  # noqa: E402

from diffusers_sr3.pipelines.pipeline_sr3 import SR3Pipeline  # noqa: E402

STEPS = int(os.environ["ADAPT_STEPS"])
LEARNING_RATE = float(os.environ["ADAPT_LR"])
adapted_weights = {}


original_call = SR3Pipeline.__call__


def call_adapted(self, image, *args, **kwargs):
    if not isinstance(image, torch.Tensor) or image.shape[0] != 1:
        raise ValueError("the probe adapts to one tensor image at a time (samplers.py --whole-photos)")
    key = (tuple(image.shape), float(image.double().sum()), float((image.double() ** 2).sum()))
    if key not in adapted_weights:
        with adapted_to(self, image, steps=STEPS, learning_rate=LEARNING_RATE) as adaptation:
            adapted_weights[key] = weights_copy(self.unet)
        print(
            f"adapted to a {tuple(image.shape[-2:])} input in {adaptation.seconds:.0f} s, loss "
            f"{adaptation.first_loss:.4f} -> {adaptation.last_loss:.4f}",
            flush=True,
        )
    own = weights_copy(self.unet)
    self.unet.load_state_dict(adapted_weights[key])
    try:
        return original_call(self, image, *args, **kwargs)
    finally:
        self.unet.load_state_dict(own)


replacements = {(SR3Pipeline, "__call__"): call_adapted}
precision = os.environ.get("ADAPT_AUTOCAST")
if precision is not None:
    if precision not in ("bf16", "float32"):
        raise ValueError(f"ADAPT_AUTOCAST is bf16 or float32, got {precision!r}")
    replacements[(adaptation_module, "bfloat16_training")] = lambda device: precision == "bf16"

run_benchmark(replacements=replacements)
