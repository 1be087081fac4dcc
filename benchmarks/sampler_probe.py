"""The harness of the sampler probes (`results/samplers/*/probe.py`): run a benchmark script with a piece of the
pipeline replaced, so that a documented probe reruns exactly as it was measured. Its command line is the benchmark's
name and that benchmark's arguments:

    python results/samplers/<probe>/probe.py samplers <benchmarks/samplers.py arguments>

A guidance probe defines its rule, `rule(prediction, guide_prediction, guidance_scale)` returning the guided
prediction in place of `guide + guidance_scale * (prediction - guide)`, and calls `run_with_guidance(rule)`; other
probes name what they replace in `run_benchmark(replacements=...)`.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from diffusers_sr3.pipelines import base

BENCHMARKS = Path(__file__).resolve().parent
GuidanceRule = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
Replacements = Dict[Tuple[Any, str], Any]
_INHERITED = object()  # an attribute the owner does not hold itself (a class's inherited method)


def setting_per_scale(variable: str) -> Callable[[float], float]:
    """A probe's setting for each entry's guidance scale, read from an environment variable such as
    `"3.5=1.5;3=1.5"`: the returned function gives the setting of a guidance scale."""
    pairs = (item.split("=") for item in os.environ[variable].split(";"))
    settings = {round(float(scale), 4): float(setting) for scale, setting in pairs}
    return lambda guidance_scale: settings[round(float(guidance_scale), 4)]


def run_benchmark(argv: Optional[Sequence[str]] = None, replacements: Optional[Replacements] = None) -> None:
    """Run the benchmark script named by `argv[0]` (default: this process's arguments) on the rest of `argv`, with
    each `(owner, attribute)` of `replacements` (a module's function, a class's method or classmethod) set to its
    value for the run and put back after it."""
    name, *arguments = sys.argv[1:] if argv is None else argv
    replacements = replacements or {}
    # From the owner's own namespace, not getattr: an inherited classmethod comes back from getattr bound, and
    # setting that back would leave the owner a bound copy instead of its inherited method.
    originals = {(owner, attribute): vars(owner).get(attribute, _INHERITED) for owner, attribute in replacements}
    command_line = sys.argv
    for (owner, attribute), value in replacements.items():
        setattr(owner, attribute, value)
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import their siblings
    sys.argv = [str(BENCHMARKS / f"{name}.py"), *arguments]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        for (owner, attribute), value in originals.items():
            if value is _INHERITED:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, value)
        sys.argv = command_line
        sys.path.remove(str(BENCHMARKS))


def run_with_guidance(rule: GuidanceRule, argv: Optional[Sequence[str]] = None) -> None:
    """`run_benchmark` with every guided step's prediction made by `rule`. The rules guide plainly: they refuse a
    parallel guidance weight."""

    def guided_prediction(prediction, guide_prediction, guidance_scale, parallel_weight=1.0):
        if parallel_weight != 1:
            raise ValueError("the guidance probes replace plain autoguidance only (parallel_guidance_weight 1)")
        return rule(prediction, guide_prediction, guidance_scale)

    run_benchmark(argv, {(base, "guided_prediction"): guided_prediction})
