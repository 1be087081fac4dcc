"""diffusers_sr3.noise: the original's schedules, schedulers built from them, and SR3 noise levels."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from diffusers_sr3.noise import (
    BETA_SCHEDULES,
    SCHEDULERS,
    make_beta_schedule,
    make_scheduler,
    network_inputs_for_schedule,
    noise_level_for_step,
    sample_training_noise_levels,
    sqrt_alphas_cumprod_prev,
    swap_scheduler,
    training_betas,
)


@pytest.fixture(scope="module")
def recorded_schedules():
    return torch.load(FIXTURES / "schedule.pt", weights_only=True)


def test_beta_schedules_match_the_original_bit_for_bit(recorded_schedules):
    for name, recorded in recorded_schedules.items():
        options = recorded["schedule_opt"]
        betas = make_beta_schedule(
            options["schedule"], options["n_timestep"], options["linear_start"], options["linear_end"]
        )
        np.testing.assert_array_equal(betas, recorded["betas"].numpy(), err_msg=name)
        torch.testing.assert_close(
            sqrt_alphas_cumprod_prev(betas), recorded["sqrt_alphas_cumprod_prev"], rtol=0, atol=0
        )


def test_every_original_schedule_is_valid():
    for name in BETA_SCHEDULES:
        betas = make_beta_schedule(name, 1000, 1e-4, 2e-2)
        assert betas.shape == (1000,) and betas.dtype == np.float64, name
        assert np.all(betas > 0) and np.all(betas <= 1), name
    assert make_beta_schedule("jsd", 4)[-1] == 1.0
    assert make_beta_schedule("warmup10", 100, 1e-4, 2e-2)[10] == 2e-2
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
        make_beta_schedule("sigmoid", 10)


def test_scheduler_keeps_the_float64_betas_through_from_config():
    scheduler = make_scheduler("ddpm", n_timestep=100)
    assert scheduler.config.variance_type == "fixed_small" and scheduler.config.clip_sample
    expected = make_beta_schedule("linear", 100, 1e-6, 1e-2)
    for name in SCHEDULERS:
        swapped = swap_scheduler(scheduler, name)
        np.testing.assert_array_equal(training_betas(swapped).numpy(), expected, err_msg=name)
    with pytest.raises(ValueError, match="unknown scheduler 'plms'"):
        make_scheduler("plms")
    assert len(SCHEDULERS) == len(set(SCHEDULERS)) > 1


def test_ddpm_noise_level_is_the_one_the_original_feeds():
    io = torch.load(FIXTURES / "sr3_tiny_io.pt", weights_only=True)
    scheduler = make_scheduler("ddpm", n_timestep=100)
    scheduler.set_timesteps(100)
    level = noise_level_for_step(scheduler, io["post_t"])
    torch.testing.assert_close(level, io["post_noise_level"][0, 0], rtol=0, atol=1e-7)


def test_sigma_and_timestep_schedulers_agree_on_the_level():
    """Euler (sigmas) and DDIM (integer timesteps) step through the same levels on the same timesteps."""
    base = make_scheduler("ddpm")
    ddim, euler = swap_scheduler(base, "ddim"), swap_scheduler(base, "euler", timestep_spacing="leading")
    ddim.set_timesteps(20)
    euler.set_timesteps(20)
    for t_ddim, t_euler in zip(ddim.timesteps, euler.timesteps):
        euler.scale_model_input(torch.zeros(1), t_euler)
        torch.testing.assert_close(noise_level_for_step(euler, t_euler), noise_level_for_step(ddim, t_ddim))
        euler.step(torch.zeros(1), t_euler, torch.zeros(1))


def test_training_levels_lie_between_neighbouring_table_entries():
    betas = torch.as_tensor(make_beta_schedule("linear", 50, 1e-4, 0.2))
    table = sqrt_alphas_cumprod_prev(betas).float()
    generator = torch.Generator().manual_seed(0)
    per_batch = sample_training_noise_levels(betas, 64, generator=generator)
    # One step per batch: all levels fall in one interval [table[t], table[t-1]].
    t = int(torch.searchsorted(-table, -per_batch.max()))
    assert torch.all(per_batch <= table[t - 1]) and torch.all(per_batch >= table[t])
    per_sample = sample_training_noise_levels(betas, 4096, generator=generator, per_sample_timestep=True)
    assert per_sample.min() >= table[-1] and per_sample.max() <= 1.0
    assert per_sample.std() > 0.2  # spread over the whole schedule, not one interval
    # Uniform in t: the fraction below the middle level is about a half.
    middle = table[25]
    assert abs((per_sample < middle).float().mean() - 0.5) < 0.05


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_precomputed_levels_equal_the_per_step_levels(name):
    """The sampling loop precomputes every step's level; it must equal the level looked up at each step."""
    scheduler = swap_scheduler(make_scheduler("ddpm", n_timestep=200), name)
    scheduler.set_timesteps(12)
    precomputed = network_inputs_for_schedule(scheduler, "noise_level")
    sample = torch.zeros(1, 3, 2, 2)
    looked_up = []
    for t in scheduler.timesteps:
        scheduler.scale_model_input(sample, t)
        looked_up.append(noise_level_for_step(scheduler, t))
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample
    torch.testing.assert_close(precomputed, torch.stack(looked_up))
    assert precomputed.shape == (len(scheduler.timesteps),)
    timesteps = network_inputs_for_schedule(scheduler, "timestep")
    assert timesteps.dtype == torch.int64


def test_the_sr3_schedule_is_defined_once_and_both_spellings_build_it():
    from diffusers_sr3.noise import SR3_SCHEDULE
    from diffusers_sr3.presets import get_preset
    from diffusers_sr3.training import trainer

    assert dict(SR3_SCHEDULE) == dict(beta_schedule="linear", num_train_timesteps=2000, beta_start=1e-6, beta_end=1e-2)
    assert trainer.SR3_SCHEDULE is SR3_SCHEDULE and get_preset("sr_16_128").scheduler == dict(SR3_SCHEDULE)
    assert get_preset("tiny").scheduler == dict(SR3_SCHEDULE, num_train_timesteps=100)
    with pytest.raises(TypeError):
        SR3_SCHEDULE["beta_end"] = 0.02  # read-only: nobody changes the one definition by accident
    default = make_scheduler("ddpm")
    np.testing.assert_array_equal(training_betas(default).numpy(), make_beta_schedule("linear", 2000, 1e-6, 1e-2))
    new = make_scheduler("ddim", beta_schedule="quad", num_train_timesteps=30, beta_start=1e-4, beta_end=0.02)
    old = make_scheduler("ddim", schedule="quad", n_timestep=30, linear_start=1e-4, linear_end=0.02)
    positional = make_scheduler("ddim", "quad", 30, 1e-4, 0.02)
    assert new.config == old.config == positional.config and new.config.num_train_timesteps == 30
    with pytest.raises(ValueError, match="n_timestep=30 contradicts num_train_timesteps=40"):
        make_scheduler("ddpm", num_train_timesteps=40, n_timestep=30)


def test_one_path_from_a_step_to_a_level():
    import diffusers_sr3.noise as noise

    assert not hasattr(noise, "network_input_for_step")  # the per-step duplicate is gone
    scheduler = make_scheduler("ddim", n_timestep=100)
    scheduler.set_timesteps(5)
    levels = network_inputs_for_schedule(scheduler, "noise_level")
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    expected = alphas_cumprod[scheduler.timesteps].sqrt().float()
    torch.testing.assert_close(levels, expected, rtol=0, atol=0)
    torch.testing.assert_close(noise_level_for_step(scheduler, scheduler.timesteps[2]), expected[2], rtol=0, atol=0)


def test_the_scheduler_trial_leaves_the_global_generator_alone():
    """A DDPM trial step draws noise; samples that use the global generator must not shift because of it."""
    from diffusers_sr3.noise import check_scheduler_fits

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_scheduler_fits(make_scheduler("ddpm", n_timestep=37))  # settings no other test checks: the trial runs
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_training_betas_of_a_scheduler_built_without_trained_betas():
    """A plain Diffusers scheduler (no `trained_betas` in its config) trains on the betas it computed itself."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=10, beta_schedule="scaled_linear", beta_start=1e-3, beta_end=0.1)
    betas = training_betas(scheduler)
    assert betas.dtype == torch.float64
    expected = torch.linspace(1e-3**0.5, 0.1**0.5, 10, dtype=torch.float32) ** 2
    torch.testing.assert_close(betas, expected.double())


def test_only_schedulers_whose_step_takes_an_eta_are_given_one():
    """A saved DDIM eta is passed to a step that takes it, and to no other (their `step` has no such argument)."""
    from diffusers_sr3.noise import scheduler_takes_eta

    base = make_scheduler("ddpm", n_timestep=20)
    assert scheduler_takes_eta(swap_scheduler(base, "ddim")) is True
    assert scheduler_takes_eta(base) is False
    assert scheduler_takes_eta(swap_scheduler(base, "euler")) is False


class _StepRaises:
    """A DDIM scheduler whose `step` raises `error`, standing for a scheduler the one-pixel trial trips on."""

    @staticmethod
    def scheduler(error: Exception):
        from diffusers import DDIMScheduler

        class Failing(DDIMScheduler):
            def step(self, *args, **kwargs):
                raise error

        return Failing.from_config(make_scheduler("ddim", n_timestep=23).config)


def test_the_scheduler_trial_refuses_only_prediction_type_errors():
    """Diffusers' own "prediction type" errors are turned into a refusal naming the scheduler; anything else the trial
    trips on is the real run's to report, not a refusal of the scheduler."""
    from diffusers_sr3.noise import check_scheduler_fits

    check_scheduler_fits(_StepRaises.scheduler(ValueError("the pixel is too small")))  # not refused
    with pytest.raises(ValueError, match="Failing cannot sample a model that predicts 'epsilon'"):
        check_scheduler_fits(_StepRaises.scheduler(ValueError("prediction_type sample is not supported")))


def test_putting_the_scheduler_warning_filters_back_changes_nothing_when_they_are_in_place():
    """Changing the filter list resets every module's record of warnings already shown (a "default" warning would
    print again at the same place), so a call that finds the filters in front must leave the list as it is, also
    beside Python's plain-string module filters; and the filters must silence the scheduler warnings."""
    import warnings

    from diffusers_sr3.noise import ignore_scheduler_warnings

    shown = []
    registry = {}

    def warn(message, category=UserWarning, module="user_module"):
        warnings.warn_explicit(message, category, "user_module.py", 7, module=module, registry=registry)

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
        warnings.resetwarnings()
        warnings.filters.insert(0, ("default", None, DeprecationWarning, "__main__", 0))  # Python's, a plain string
        warnings.simplefilter("default", UserWarning)
        ignore_scheduler_warnings()
        in_place = list(warnings.filters)
        warn("shown once")
        ignore_scheduler_warnings()
        warn("shown once")
        assert shown == ["shown once"] and warnings.filters == in_place
        warn(
            "__array__ implementation doesn't accept a copy keyword, so passing copy=False failed.",
            DeprecationWarning,
            "diffusers.schedulers.scheduling_euler_discrete",
        )
        assert shown == ["shown once"]
