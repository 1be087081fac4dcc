"""Noise schedules and noise levels: the one place that knows how SR3's levels relate to schedules.

SR3 networks are conditioned on the continuous noise level `gamma = sqrt(alpha_bar)` in [0, 1]. This module
holds the original code's beta schedules, builds Diffusers schedulers from them, gives the level to feed the
network at any step of a Diffusers scheduler, and draws training levels the way SR3 trains.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Union

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .defaults import SCHEDULER_CLASS_NAMES, SR3_SCHEDULE

BETA_SCHEDULES = ("linear", "quad", "cosine", "warmup10", "warmup50", "const", "jsd")


# Diffusers' sigma schedulers (Euler, Heun, DPM-Solver, UniPC, DEIS) call `np.array` or `np.log` on their own torch
# tensors, so numpy 2 warns on every run that `Tensor.__array__` takes no `copy` keyword and `Tensor.__array_wrap__` no
# `context`, from code that no caller can change (and `-W error::DeprecationWarning` would fail every run). These two
# messages are ignored, from Diffusers' scheduler modules only, by filters in the process-wide list: a
# `catch_warnings` around each call would swap that list from several threads at once (leaking or dropping filters)
# and reset every module's once-per-location registry each step. At the front, so that `-W error` does not win.
_SCHEDULER_WARNING_MESSAGES = (
    "__array__ implementation doesn't accept a copy keyword",
    "__array_wrap__ must accept context",
)
_SCHEDULER_MODULES = r"diffusers\.schedulers\."
_A_SCHEDULER_MODULE = "diffusers.schedulers.scheduling_euler_discrete"
# The entries `warnings.filterwarnings` makes of them (compiled patterns compare by pattern and flags).
_SCHEDULER_WARNING_FILTERS = tuple(
    ("ignore", re.compile(re.escape(message), re.I), DeprecationWarning, re.compile(_SCHEDULER_MODULES), 0)
    for message in _SCHEDULER_WARNING_MESSAGES
)


def ignore_scheduler_warnings() -> None:
    """Put the filters for numpy's two scheduler warnings (above) back in front of any filter that would catch them
    first, where they are not: the package may have been imported inside `warnings.catch_warnings()` (as pytest
    collects tests), whose exit restored the list without them, or `warnings.resetwarnings()` dropped them, or a
    filter such as `simplefilter("error")` was put in front of them since. Called wherever this package builds, sets
    or steps a scheduler; in place, they are found among the list's first entries, and nothing changes (changing the
    list resets every module's once-per-location record of warnings shown)."""
    missing = list(_SCHEDULER_WARNING_FILTERS)
    for entry in warnings.filters:
        if entry in missing:
            missing.remove(entry)
            if not missing:
                return
            continue
        action, _, category, module, _ = entry
        # A plain string (Python's own `default::DeprecationWarning:__main__`) names a module exactly.
        in_schedulers = module is None or (
            module == _A_SCHEDULER_MODULE if isinstance(module, str) else module.match(_A_SCHEDULER_MODULE)
        )
        if action != "ignore" and issubclass(DeprecationWarning, category) and in_schedulers:
            break  # it would see the warnings first
    for message in _SCHEDULER_WARNING_MESSAGES:
        warnings.filterwarnings(
            "ignore", message=re.escape(message), category=DeprecationWarning, module=_SCHEDULER_MODULES
        )


ignore_scheduler_warnings()


class _SchedulerClasses(Mapping):
    """Sampler name -> Diffusers scheduler class, each imported on first use.

    Several Diffusers schedulers import `scipy.stats` (1.5 s); `sr3 upscale` with a DDIM model needs none of them.
    """

    _CLASS_NAMES = SCHEDULER_CLASS_NAMES

    def __getitem__(self, name: str) -> type:
        return getattr(diffusers, self._CLASS_NAMES[name])

    def __iter__(self):
        return iter(self._CLASS_NAMES)

    def __len__(self) -> int:
        return len(self._CLASS_NAMES)

    def __repr__(self) -> str:
        return f"SCHEDULERS({', '.join(self._CLASS_NAMES)})"


SCHEDULERS: Mapping[str, type] = _SchedulerClasses()


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """The original SR3 code's beta schedules, in float64, bit for bit.

    Args:
        schedule: one of `linear`, `quad`, `cosine`, `warmup10`, `warmup50`, `const`, `jsd`.
        n_timestep: number of diffusion steps T.
        linear_start: first beta of `linear`, `quad` and the warm-up schedules.
        linear_end: last beta of those; the constant beta of `const` and after the warm-up.
        cosine_s: offset of the `cosine` schedule (Nichol & Dhariwal).

    Returns:
        `(n_timestep,)` float64 array of betas.
    """
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be positive, got {n_timestep}")
    if schedule == "quad":
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule in ("warmup10", "warmup50"):
        betas = linear_end * np.ones(n_timestep, dtype=np.float64)
        warmup_time = int(n_timestep * (0.1 if schedule == "warmup10" else 0.5))
        betas[:warmup_time] = np.linspace(linear_start, linear_end, warmup_time, dtype=np.float64)
        return betas
    if schedule == "const":
        return linear_end * np.ones(n_timestep, dtype=np.float64)
    if schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        return 1.0 / np.linspace(n_timestep, 1, n_timestep, dtype=np.float64)
    if schedule == "cosine":
        timesteps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(timesteps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999).numpy()
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {BETA_SCHEDULES}")


# The original code's names for the four settings of `SR3_SCHEDULE` (its config's `beta_schedule` section).
ORIGINAL_SCHEDULE_NAMES = {
    "schedule": "beta_schedule",
    "n_timestep": "num_train_timesteps",
    "linear_start": "beta_start",
    "linear_end": "beta_end",
}


def make_scheduler(
    name: str = "ddpm",
    beta_schedule: Optional[str] = None,
    num_train_timesteps: Optional[int] = None,
    beta_start: Optional[float] = None,
    beta_end: Optional[float] = None,
    prediction_type: str = "epsilon",
    **scheduler_kwargs: Any,
) -> SchedulerMixin:
    """Build a Diffusers scheduler that runs one of the original's beta schedules.

    Settings not given are `SR3_SCHEDULE`'s: linear betas 1e-6..1e-2 over 2000 steps; epsilon prediction. DDPM
    uses the original's posterior ("fixed_small" variance, x0 clipped to [-1, 1]).

    Args:
        name: a key of `SCHEDULERS` (`ddpm`, `ddim`, `dpmsolver`, `unipc`, `deis`, `euler`, ...).
        beta_schedule, num_train_timesteps, beta_start, beta_end: the schedule (see [`make_beta_schedule`]). The
            original code's names `schedule`, `n_timestep`, `linear_start`, `linear_end` are accepted too.
        prediction_type: what the network predicts: `epsilon`, `v_prediction` or `sample`.
        **scheduler_kwargs: extra scheduler config (override the defaults here).

    Returns:
        The scheduler, with the betas stored as `trained_betas` so that `from_config` keeps them. Its config states
        the schedule truthfully beside them: `beta_schedule` is this module's name of it, `beta_start` / `beta_end`
        its first and last beta (Diffusers would otherwise show its unused defaults, 1e-4 and 0.02).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    ignore_scheduler_warnings()
    given = dict(
        beta_schedule=beta_schedule, num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end
    )
    for original, key in ORIGINAL_SCHEDULE_NAMES.items():
        if original in scheduler_kwargs:
            value = scheduler_kwargs.pop(original)
            if given[key] is not None and given[key] != value:
                raise ValueError(f"{original}={value!r} contradicts {key}={given[key]!r}; give one of them")
            given[key] = value
    schedule = {key: SR3_SCHEDULE[key] if value is None else value for key, value in given.items()}
    betas = make_beta_schedule(
        schedule["beta_schedule"], schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    )
    config: Dict[str, Any] = dict(
        num_train_timesteps=schedule["num_train_timesteps"],
        trained_betas=betas.tolist(),
        beta_schedule=schedule["beta_schedule"],
        beta_start=float(betas[0]),
        beta_end=float(betas[-1]),
        prediction_type=prediction_type,
    )
    if name in ("ddpm", "ddim"):
        config.update(clip_sample=True, clip_sample_range=1.0)
    if name == "ddpm":
        config.update(variance_type="fixed_small")
    if SCHEDULER_CLASS_NAMES[name] in SECOND_ORDER_SIGMA_SCHEDULERS:
        config.update(timestep_spacing="trailing")
    config.update(scheduler_kwargs)
    return SCHEDULERS[name].from_config(config)


def swap_scheduler(scheduler: SchedulerMixin, name: str, **scheduler_kwargs: Any) -> SchedulerMixin:
    """A scheduler of another kind (a `SCHEDULERS` key) on the same training schedule as `scheduler`.

    A second-order sigma scheduler (`heun`) gets `timestep_spacing="trailing"` unless `scheduler_kwargs` name
    one: see [`check_scheduler_fits`].

    Raises:
        ValueError: for an unknown name, or a scheduler that cannot sample the model's prediction type (see
            [`check_scheduler_fits`]).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    ignore_scheduler_warnings()
    if SCHEDULER_CLASS_NAMES[name] in SECOND_ORDER_SIGMA_SCHEDULERS:
        scheduler_kwargs.setdefault("timestep_spacing", "trailing")
    swapped = SCHEDULERS[name].from_config(scheduler.config, **scheduler_kwargs)
    check_scheduler_fits(swapped)
    return swapped


def scheduler_takes_eta(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler's `step` takes an `eta` (DDIM's stochasticity), so a saved eta applies to it."""
    return "eta" in inspect.signature(scheduler.step).parameters


# Schedulers of consistency-distilled networks (a few large jumps along the schedule), refused by name.
CONSISTENCY_SCHEDULERS = ("LCMScheduler", "TCDScheduler")

# Scheduler variance types whose variance the network outputs beside its prediction (improved DDPM, DeepFloyd IF).
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

# Second-order schedulers whose correction divides the network's clean-image error by the next step's sigma: with
# leading or linspace spacing their last correction lands at timestep 0 (sigma about 0.001 on SR3's schedule), and
# a model predicting the clean image (or v) gets its error amplified hundreds of times.
SECOND_ORDER_SIGMA_SCHEDULERS = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")

# Prediction types whose clean-image estimate those corrections divide by sigma (epsilon's noise estimate is not).
CLEAN_IMAGE_PREDICTION_TYPES = ("sample", "v_prediction")

# (scheduler class, settings) pairs that `check_scheduler_fits` has seen take a step.
_FITTING_SCHEDULERS: set = set()


def _extra_step_arguments(scheduler: SchedulerMixin) -> List[str]:
    """The arguments without a default that the scheduler's `step` takes besides the output, timestep and sample."""
    return [
        parameter.name
        for parameter in list(inspect.signature(scheduler.step).parameters.values())[3:]
        if parameter.default is inspect.Parameter.empty
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]


def check_trained_betas(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler config whose `trained_betas` are not `num_train_timesteps` long.

    Diffusers builds the betas from the list but its timestep table from the count: a hand-edited config with 100
    betas and `num_train_timesteps` 1e11 would allocate 745 GiB. Check the config before building a scheduler.
    """
    betas = config.get("trained_betas")
    count = config.get("num_train_timesteps")
    if betas is not None and count is not None and len(betas) != count:
        raise ValueError(
            f"the scheduler config has {len(betas)} trained_betas but num_train_timesteps={count!r}; they must agree"
        )


def check_scheduler_fits(scheduler: SchedulerMixin) -> None:
    """Refuse a scheduler that cannot turn the network's output (its config's `prediction_type`) into a step.

    Some Diffusers schedulers support only some prediction types (Euler ancestral has no `sample`, the clean image
    SR3's photo models predict) and say so only inside `step`, after the network's first evaluation. One step of a
    copy on a single pixel finds out up front, whatever the installed Diffusers supports. Remembered per scheduler
    class and settings (the betas aside): the tiled upscaler samples many times with one scheduler.

    Schedulers of another noise process are refused by what they are: SR3 networks are trained on a DDPM schedule
    (`alphas_cumprod`, from which every step's noise level is read), which EDM, consistency-model and
    flow-matching schedulers do not have, and inverse schedulers run it backwards (image to noise). So are the
    schedulers of consistency-distilled models (LCM, TCD): they have the schedule, but their steps assume a network
    distilled to jump along it, and an SR3 network's samples stay over-smoothed at any step count. And so are
    schedulers whose `step` needs more than the network's output, the timestep and the sample (video schedulers),
    and learned variance types (`variance_type` "learned" / "learned_range"), which read a variance from output
    channels that SR3 networks do not have.

    A second-order sigma scheduler (Heun, KDPM2) is refused for a `sample` or `v_prediction` model unless its
    `timestep_spacing` is "trailing": otherwise its last correction divides by the sigma of timestep 0 (measured
    on the packaged x4 photo model: 16.4 dB PSNR against 27.9 dB with trailing spacing). And a config whose
    `trained_betas` and `num_train_timesteps` disagree is refused (see [`check_trained_betas`]).
    """
    name = type(scheduler).__name__
    if not hasattr(scheduler, "alphas_cumprod"):
        problem = "it has no DDPM noise schedule (alphas_cumprod), it samples another noise process"
    elif name.endswith("InverseScheduler"):
        problem = "it runs the schedule backwards, from image to noise"
    elif name in CONSISTENCY_SCHEDULERS:
        problem = "it samples consistency-distilled models, which SR3 networks are not"
    elif required := _extra_step_arguments(scheduler):  # read after the tests above: SDE schedulers have no step
        problem = f"its step needs {', '.join(required)} besides the network's output"
    else:
        problem = None
    if problem:
        raise ValueError(
            f"{name} cannot sample an SR3 model: {problem}; pick a DDPM-family scheduler, e.g. ddim, ddpm, "
            "dpmsolver, unipc or euler"
        )
    check_trained_betas(scheduler.config)
    variance_type = scheduler.config.get("variance_type")
    if variance_type in LEARNED_VARIANCE_TYPES:
        raise ValueError(
            f"{name} with variance_type={variance_type!r} cannot sample an SR3 model: it reads a variance from extra "
            "output channels, which SR3 networks do not have; use variance_type='fixed_small' (SR3's)"
        )
    settings = (type(scheduler), repr(sorted((k, v) for k, v in scheduler.config.items() if k != "trained_betas")))
    if settings not in _FITTING_SCHEDULERS:
        _check_one_step(scheduler, settings)
    spacing = scheduler.config.get("timestep_spacing")
    prediction_type = scheduler.config.get("prediction_type")
    if name in SECOND_ORDER_SIGMA_SCHEDULERS and prediction_type in CLEAN_IMAGE_PREDICTION_TYPES:
        if spacing != "trailing":
            raise ValueError(
                f"{name} with timestep_spacing={spacing!r} cannot sample a model that predicts {prediction_type!r}: "
                "its last correction divides the network's error by the near-zero sigma of timestep 0; use "
                "timestep_spacing='trailing'"
            )


def _check_one_step(scheduler: SchedulerMixin, settings: tuple) -> None:
    """One step of a copy of `scheduler` on a single pixel (see [`check_scheduler_fits`]); `settings` are
    remembered when it takes it."""
    ignore_scheduler_warnings()
    trial = type(scheduler).from_config(scheduler.config)
    pixel = torch.zeros(1, 1, 1, 1)
    # A stochastic step draws from the global generator: the trial must not change what the real run draws.
    with torch.random.fork_rng(devices=[]):
        try:
            trial.set_timesteps(10)
            timestep = trial.timesteps[0]
            trial.step(pixel, timestep, trial.scale_model_input(pixel, timestep))
        except (NotImplementedError, ValueError) as error:
            # Diffusers says "prediction_type not implemented yet" (Euler ancestral, KDPM2), "Prediction type ... is
            # not supported" (EDM) or "prediction_type given as ... must be one of" (PNDM, Heun). Anything else the
            # one-pixel trial trips on is left to the real run to report.
            if "prediction type" not in str(error).lower().replace("_", " "):
                return
            prediction_type = scheduler.config.get("prediction_type")
            raise ValueError(
                f"{type(scheduler).__name__} cannot sample a model that predicts {prediction_type!r} (Diffusers: "
                f"{error}); pick another scheduler, e.g. ddim, ddpm, dpmsolver, unipc or euler"
            ) from None
        except Exception:  # noqa: BLE001  (a trial only: the real run reports its own errors)
            return
    _FITTING_SCHEDULERS.add(settings)


def _levels(scheduler: SchedulerMixin, timesteps: torch.Tensor, step_indices: torch.Tensor) -> torch.Tensor:
    """The noise levels `sqrt(alpha_bar)` at steps of `scheduler` (the one place a step becomes a level).

    Sigma-based schedulers (Euler, Heun, DPM-Solver, UniPC, DEIS; Karras sigmas included) track the exact sigma of
    each step, `sqrt((1 - alpha_bar) / alpha_bar)`: the level is `1 / sqrt(1 + sigma**2)`, at `step_indices` into
    `scheduler.sigmas`. Integer-timestep schedulers without sigmas (DDPM, DDIM) are at `sqrt(alphas_cumprod[t])`.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if hasattr(scheduler, "sigmas_interpol"):
        return _interleaved_levels(scheduler)[step_indices]
    if sigmas is not None and hasattr(scheduler, "index_for_timestep"):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()[step_indices]
        return (1.0 / torch.sqrt(1.0 + sigmas**2)).float()
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).cpu().double()
    return alphas_cumprod[timesteps.round().long()].sqrt().float()


def _interleaved_levels(scheduler: SchedulerMixin) -> torch.Tensor:
    """The levels of KDPM2-type schedulers, which evaluate the network twice a step, the second time at an
    interpolated sigma (`sigmas_interpol`) that `scheduler.sigmas` does not list, chosen by the scheduler's state.

    A copy runs the schedule dry (a zero network output) and reads the input scale `1 / sqrt(1 + sigma**2)` that its
    `scale_model_input` applies at each evaluation: that scale is the level.
    """
    # Kept on the scheduler for its current timesteps: a per-step lookup must not rerun the schedule each step.
    key = (scheduler.num_inference_steps, tuple(scheduler.timesteps.tolist()))
    cached = getattr(scheduler, "_sr3_interleaved_levels", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    ignore_scheduler_warnings()
    dry = copy.deepcopy(scheduler)
    dry.set_timesteps(scheduler.num_inference_steps)  # from the first evaluation, whatever the run's state
    probe = torch.ones(1, dtype=torch.float64)
    levels = []
    # An ancestral step draws noise: the dry run must not change what the real run draws.
    with torch.random.fork_rng(devices=[]):
        for timestep in dry.timesteps:
            levels.append(dry.scale_model_input(probe, timestep))
            dry.step(torch.zeros_like(probe), timestep, probe)
    levels = torch.cat(levels).cpu().float()
    scheduler._sr3_interleaved_levels = (key, levels)
    return levels


def network_inputs_for_schedule(scheduler: SchedulerMixin, conditioning_type: str) -> torch.Tensor:
    """What the network takes at every step of `scheduler.timesteps`, computed once before sampling.

    Args:
        scheduler: a Diffusers scheduler after `set_timesteps`.
        conditioning_type: the UNet's: `"noise_level"` (SR3: `sqrt(alpha_bar)`) or `"timestep"` (DDPM networks).

    Returns:
        `(len(scheduler.timesteps),)` float32 noise levels, or int64 timesteps for `"timestep"` networks, on
        the CPU.
    """
    timesteps = scheduler.timesteps.detach().cpu()
    if conditioning_type == "timestep":
        return timesteps.round().long()
    begin = getattr(scheduler, "begin_index", None) or 0
    return _levels(scheduler, timesteps, torch.arange(begin, begin + len(timesteps)))


def noise_level_for_step(scheduler: SchedulerMixin, timestep: Union[torch.Tensor, float, int]) -> torch.Tensor:
    """The noise level `sqrt(alpha_bar)` that the current step of `scheduler` denoises from.

    The same levels as [`network_inputs_for_schedule`], looked up for one step: sigma-based schedulers at their
    current step index (call it after `scheduler.scale_model_input` for the step), others at `timestep`.

    Args:
        scheduler: a Diffusers scheduler after `set_timesteps`.
        timestep: the current entry of `scheduler.timesteps`.

    Returns:
        0-dim float32 tensor.
    """
    step_index = getattr(scheduler, "step_index", None)
    if (
        step_index is None
        and hasattr(scheduler, "index_for_timestep")
        and getattr(scheduler, "sigmas", None) is not None
    ):
        step_index = scheduler.index_for_timestep(timestep)
    step_indices = torch.tensor([step_index or 0])
    return _levels(scheduler, torch.as_tensor(timestep).detach().cpu().reshape(1), step_indices)[0]


def sqrt_alphas_cumprod_prev(betas: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """`sqrt([1, alpha_bar_0, ..., alpha_bar_{T-1}])` in float64: the original's table of noise levels.

    Computed with numpy exactly as the original does, so the table is bit-identical to its buffers.
    """
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    return torch.from_numpy(np.sqrt(np.append(1.0, alphas_cumprod)))


def sample_training_noise_levels(
    betas: Union[np.ndarray, torch.Tensor],
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    per_sample_timestep: bool = False,
) -> torch.Tensor:
    """Draw continuous training noise levels the SR3 way.

    The original draws one integer `t` in `[1, T]` per batch, then a level per sample uniformly between the
    neighbouring table entries `sqrt_alphas_cumprod_prev[t - 1]` and `sqrt_alphas_cumprod_prev[t]`.
    With `per_sample_timestep=True` each sample gets its own `t`, which covers the schedule faster with
    the same expected distribution.

    Args:
        betas: the training beta schedule, `(T,)`.
        batch_size: number of levels to draw.
        generator: random source (on the CPU).
        device: where the returned tensor goes.
        per_sample_timestep: draw `t` per sample instead of per batch.

    Returns:
        `(batch_size,)` float32 levels in (0, 1].
    """
    table = sqrt_alphas_cumprod_prev(betas)
    num_steps = table.numel() - 1
    count = batch_size if per_sample_timestep else 1
    t = torch.randint(1, num_steps + 1, (count,), generator=generator).expand(batch_size)
    upper, lower = table[t - 1], table[t]
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return (lower + u * (upper - lower)).float().to(device)


def augment_condition(
    condition: torch.Tensor,
    level: Union[torch.Tensor, float],
    noise: Optional[torch.Tensor] = None,
    generator: Optional[Union[torch.Generator, list]] = None,
) -> torch.Tensor:
    """Noise-conditioning augmentation: `sqrt(1 - s^2) * condition + s * noise` at level `s` in [0, 1).

    Cascaded SR models are trained on conditions noised at random levels (and told the level) so that at
    sampling time they tolerate the artefacts of the stage before them (Ho et al., "Cascaded Diffusion Models").
    """
    level = torch.as_tensor(level, dtype=torch.float32, device=condition.device).reshape(-1, 1, 1, 1)
    if torch.any(level < 0) or torch.any(level >= 1):
        raise ValueError("condition noise levels must lie in [0, 1)")
    if noise is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(condition.shape, generator=generator, device=condition.device, dtype=torch.float32)
    augmented = (1 - level**2).sqrt() * condition.float() + level * noise
    return augmented.to(condition.dtype)


def training_betas(scheduler: SchedulerMixin) -> torch.Tensor:
    """The training betas of a Diffusers scheduler in float64 (exact when they were given as `trained_betas`)."""
    trained = scheduler.config.get("trained_betas")
    if trained is not None:
        return torch.as_tensor(trained, dtype=torch.float64)
    return torch.as_tensor(scheduler.betas, dtype=torch.float64)
