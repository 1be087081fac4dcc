"""Defaults, names and step counts that the `sr3` parsers show, kept free of torch, Diffusers and numpy.

`sr3 --help`, each command's `--help` and argument errors import only this and the command modules' other light
imports, so they print at once instead of after the seconds torch and Diffusers take. The modules that use these
names import them from here, and keep them under their old names (`diffusers_sr3.tiling.DEFAULT_MAX_TILE_PIXELS`).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# The SR3 noise schedule (the paper's and the original code's default): linear betas 1e-6..1e-2 over 2000 steps.
# The one definition; keys are Diffusers' scheduler-config names, the spelling for new code.
SR3_SCHEDULE: Mapping[str, Any] = MappingProxyType(
    dict(beta_schedule="linear", num_train_timesteps=2000, beta_start=1e-6, beta_end=1e-2)
)

# Sampler name (`--scheduler`) -> Diffusers scheduler class name (`noise.SCHEDULERS` imports the class).
SCHEDULER_CLASS_NAMES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}

# Network precision (`--dtype`) -> the name of its torch dtype (`commands.common.DTYPES` gives the dtype).
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

BACKENDS = ("auto", "torch", "bf16", "onnx")

# Network-grid pixels (image pixels / pixel_unshuffle_factor**2) per evaluation: a tile's area times the tiles in
# one batch. 256x256 is a whole 1024x1024 output of the x4 photo model (pixel_unshuffle_factor 4) in one
# evaluation (activations estimated at about 1 GB; benchmarks/upscale.py measures the peak).
DEFAULT_MAX_TILE_PIXELS = 256 * 256

# Detail mode's windows run on images at least this many windows across their shorter side; smaller ones run whole.
MIN_WINDOWS_ACROSS = 4

# Default steps of the two sampling modes, for pipelines saved without their own `fidelity_steps` / `detail_steps`.
# Fidelity mode's one DDIM step from the noisiest level measured as well as 4 or more on the packaged model
# (docs/quality.md, "Fidelity in one evaluation"); a model trained for minutes gains from a few more.
DETAIL_STEPS = 50
FIDELITY_STEPS = 1
# The pipeline config's detail-mode defaults (a model's studied sampling settings, kept when it is fine-tuned).
DETAIL_CONFIG_KEYS = ("detail_steps", "detail_strength", "detail_eta", "detail_window_size")
# All of its sampling defaults: detail mode's and the fidelity answer's number of steps.
SAMPLING_CONFIG_KEYS = ("fidelity_steps",) + DETAIL_CONFIG_KEYS
# The call arguments that only detail mode takes; a fidelity call refuses them.
DETAIL_ARGUMENTS = ("eta", "temperature", "strength", "guidance_scale", "parallel_guidance_weight", "window_size")
# The self-ensemble's 8 orientations: the input and its quarter-turn, each with its three mirror images (flips of
# these dims; a flip is its own inverse).
MIRRORS = ((), (-1,), (-2,), (-2, -1))
SELF_ENSEMBLE_SIZE = 2 * len(MIRRORS)


def steps_to_run(num_inference_steps: int, strength: float = 1.0) -> int:
    """Scheduler steps a refinement of `strength` runs: the last `strength` of `num_inference_steps`, counted as
    Diffusers' image-to-image pipelines count them (`int(num_inference_steps * strength)`).

    Raises:
        ValueError: when that is no step at all.
    """
    steps = min(int(num_inference_steps * strength), num_inference_steps)
    if steps < 1:
        fewest = math.ceil(1 / strength)
        while int(fewest * strength) < 1:  # 1 / strength can round below the count that runs a step
            fewest += 1
        raise ValueError(
            f"strength {strength:g} of {num_inference_steps} steps runs no step (Diffusers' image-to-image count, "
            f"int(steps * strength)): give at least {fewest} steps at this strength, or a higher strength"
        )
    return steps


def evaluations_per_crop(
    mode: str,
    num_inference_steps: Optional[int] = None,
    strength: float = 1.0,
    scheduler: Optional[SchedulerMixin] = None,
    guided: bool = False,
    fidelity_steps: int = FIDELITY_STEPS,
) -> int:
    """Network evaluations of one crop in one [`SR3Pipeline`] call with these arguments.

    Fidelity mode runs its steps (by default the pipeline's `fidelity_steps`, passed here); detail mode runs its
    steps from noise, or below strength 1 the fidelity answer's `fidelity_steps` and then the last `strength` of its
    steps. Detail mode counts the timesteps that `scheduler`
    (the pipeline's) lists, one evaluation each: a second-order scheduler (Heun) lists most steps twice. Without a
    scheduler, one evaluation per step. `guided` (a guidance scale other than 1 with a `guidance_unet`) doubles
    detail mode's refinement steps: the guide runs beside the UNet. Progress bars and time estimates count with it.
    """
    if mode == "fidelity":
        return fidelity_steps if num_inference_steps is None else num_inference_steps
    steps = DETAIL_STEPS if num_inference_steps is None else num_inference_steps
    listed, order = steps, 1
    if scheduler is not None:
        from .noise import ignore_scheduler_warnings  # here: this module stays free of torch for a fast start

        ignore_scheduler_warnings()
        trial = type(scheduler).from_config(scheduler.config)  # set_timesteps must not touch the pipeline's own
        trial.set_timesteps(steps)
        listed, order = len(trial.timesteps), scheduler.order
    per_step = 2 if guided else 1
    if strength >= 1:
        return per_step * listed
    return fidelity_steps + per_step * (listed - (steps - steps_to_run(steps, strength)) * order)
