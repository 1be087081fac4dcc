"""Sampling settings that cannot give the right image are refused before (or instead of) a wrong result.

Each case here once ran silently: a single "leading" step from pure noise at the clean end of the schedule, a strength
that rounds to steps Diffusers' image-to-image would not run, KDPM2's midpoint evaluations at the wrong level,
schedulers of consistency-distilled networks, a loop that ends in NaN, a save while the UNet is a backend's stand-in,
and a folder of pickled weights that the default loader could only say "no file named ... safetensors" about.
"""

import json

import pytest
import torch
from conftest import low_resolution_unet, needs_bfloat16_kernels
from diffusers import (
    CogVideoXDPMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    ScoreSdeVeScheduler,
    TCDScheduler,
)

from diffusers_sr3 import SR3Pipeline, make_scheduler
from diffusers_sr3.backends import use_backend
from diffusers_sr3.noise import (
    check_scheduler_fits,
    network_inputs_for_schedule,
    noise_level_for_step,
    swap_scheduler,
)
from diffusers_sr3.pipelines.base import steps_to_run


def pipeline_with(scheduler, unet=None):
    pipeline = SR3Pipeline(unet or low_resolution_unet(), scheduler, upscale_factor=4)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_strength_counts_steps_as_diffusers_image_to_image():
    # int(num_inference_steps * strength), as Diffusers' img2img pipelines: round() gave 4 and 8 here.
    assert steps_to_run(10, 0.35) == 3 and steps_to_run(10, 0.75) == 7 and steps_to_run(10, 0.6) == 6
    assert steps_to_run(4, 1.0) == 4
    with pytest.raises(ValueError, match="runs no step .*give at least 2 steps at this strength"):
        steps_to_run(1, 0.6)
    # 3 * 0.333333 rounds down: the advice is a count that runs a step, not the one given.
    with pytest.raises(ValueError, match="give at least 4 steps"):
        steps_to_run(3, 0.333333)
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100, prediction_type="sample"))
    with pytest.raises(ValueError, match="runs no step"):
        pipeline(torch.rand(1, 3, 16, 16), num_inference_steps=1, strength=0.5, output_type="pt")


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_first_step_at_the_clean_end_of_the_schedule_is_refused(spacing):
    # Diffusers puts the only step of 1 at t = 0 with these spacings: "sampling" from pure noise there returns it.
    scheduler = DDIMScheduler.from_config(make_scheduler("ddim").config, timestep_spacing=spacing)
    pipeline = pipeline_with(scheduler)
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"starts 1 step\(s\) at timestep 0.*timestep_spacing='trailing'"):
        pipeline(image, num_inference_steps=1, output_type="pt")
    pipeline(image, num_inference_steps=10, output_type="pt")  # the first of 10 is near the noisiest level
    pipeline.scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    assert pipeline(image, num_inference_steps=1, output_type="pt").images.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("scheduler_class", [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_kdpm2_midpoint_evaluations_get_the_level_the_scheduler_scales_by(scheduler_class):
    # KDPM2 evaluates twice a step, the second time at an interpolated sigma that `sigmas` does not list; its
    # input scale 1 / sqrt(1 + sigma^2) at each evaluation is the level the network must be told.
    scheduler = scheduler_class.from_config(make_scheduler("ddim", n_timestep=200).config)
    scheduler.set_timesteps(5)
    precomputed = network_inputs_for_schedule(scheduler, "noise_level")
    probe = torch.ones(1, 1, 1, 1)
    scales, looked_up = [], []
    for t in scheduler.timesteps:
        scales.append(scheduler.scale_model_input(probe, t).reshape(()))
        looked_up.append(noise_level_for_step(scheduler, t))
        scheduler.step(torch.zeros_like(probe), t, probe)
    torch.testing.assert_close(precomputed, torch.stack(scales), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.stack(looked_up), torch.stack(scales), rtol=1e-5, atol=0)
    if scheduler_class is KDPM2DiscreteScheduler:  # its midpoints are far from the listed sigmas
        listed = 1 / (1 + scheduler.sigmas[: len(precomputed)] ** 2).sqrt()
        assert (precomputed - listed).abs().max() > 0.01


@pytest.mark.parametrize(
    "scheduler_class, problem",
    [
        (LCMScheduler, "consistency-distilled"),
        (TCDScheduler, "consistency-distilled"),
        (CogVideoXDPMScheduler, "its step needs timestep_back"),
    ],
)
def test_schedulers_that_cannot_sample_an_sr3_network_are_refused(scheduler_class, problem):
    scheduler = scheduler_class.from_config(make_scheduler("ddim", n_timestep=100).config)
    with pytest.raises(ValueError, match=problem):
        check_scheduler_fits(scheduler)


class NaNNetwork(torch.nn.Module):
    """Stands in for a UNet whose output overflows."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, sample, noise_level, return_dict=True, **kwargs):
        return (torch.full_like(sample[:, -3:], float("nan")),)


def test_a_run_that_ends_in_nan_is_an_error_not_a_black_image():
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100))
    vars(pipeline)["unet"] = NaNNetwork(pipeline.unet)
    with pytest.raises(ValueError, match=r"DDIMScheduler \(3 steps\) produced NaN or infinite values"):
        pipeline(torch.rand(1, 3, 16, 16), num_inference_steps=3)


@needs_bfloat16_kernels
def test_saving_inside_a_backend_block_is_refused_and_the_folder_kept(tmp_path):
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100))
    pipeline.save_pretrained(tmp_path / "model")
    index = (tmp_path / "model" / "model_index.json").read_text(encoding="utf-8")
    with use_backend(pipeline, "bf16"):
        with pytest.raises(ValueError, match="save the pipeline outside the use_backend"):
            pipeline.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").read_text(encoding="utf-8") == index
    assert json.loads(index)["unet"][1] == "SR3UNet2DModel"
    assert pipeline.config.unet[1] == "SR3UNet2DModel"  # Diffusers' save did not record the stand-in as missing
    SR3Pipeline.from_pretrained(tmp_path / "model")


def test_a_folder_of_pickled_weights_names_the_option_that_loads_it(tmp_path):
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100))
    pipeline.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError, match=r"unet holds pickled weights \(.bin\).*use_safetensors=False"):
        SR3Pipeline.from_pretrained(tmp_path / "pickled")
    loaded = SR3Pipeline.from_pretrained(tmp_path / "pickled", use_safetensors=False)
    for name, tensor in pipeline.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], tensor)


def test_a_step_count_the_scheduler_cannot_take_is_named():
    # PNDM's warm-up needs 4 steps; Diffusers fails inside numpy ("operands could not be broadcast").
    scheduler = PNDMScheduler.from_config(make_scheduler("ddim").config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="PNDMScheduler cannot take 2 steps"):
        pipeline_with(scheduler)(torch.rand(1, 3, 16, 16), num_inference_steps=2)


def test_a_compiled_unet_is_saved_as_the_model_it_wraps(tmp_path):
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100))
    pipeline.unet = torch.compile(pipeline.unet)  # compiles on first call: saving must not need it
    pipeline.save_pretrained(tmp_path / "compiled")
    loaded = SR3Pipeline.from_pretrained(tmp_path / "compiled")
    assert type(loaded.unet).__name__ == "SR3UNet2DModel"


def test_kdpm2_levels_are_computed_once_per_schedule(monkeypatch):
    import copy

    from diffusers_sr3 import noise

    copies, deepcopy = [], copy.deepcopy

    def counting(obj, memo=None):
        if isinstance(obj, KDPM2DiscreteScheduler):  # the dry run's copy; nested objects are copied too
            copies.append(1)
        return deepcopy(obj, memo)

    monkeypatch.setattr(noise.copy, "deepcopy", counting)
    scheduler = KDPM2DiscreteScheduler.from_config(make_scheduler("ddim", n_timestep=200).config)
    scheduler.set_timesteps(8)
    probe = torch.ones(1, 1, 1, 1)
    for t in scheduler.timesteps:
        scheduler.scale_model_input(probe, t)
        noise_level_for_step(scheduler, t)
        scheduler.step(torch.zeros_like(probe), t, probe)
    assert len(copies) == 1  # one dry run for the schedule, not one per step
    scheduler.set_timesteps(5)
    network_inputs_for_schedule(scheduler, "noise_level")
    assert len(copies) == 2  # a new schedule, a new dry run


def test_the_fidelity_line_of_a_written_card_names_one_evaluation(tmp_path):
    from diffusers_sr3.model_card import write_pipeline_card

    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100, prediction_type="sample"))
    pipeline.save_pretrained(tmp_path / "model")
    card = open(write_pipeline_card(str(tmp_path / "model"), pipeline, "me/x"), encoding="utf-8").read()
    assert "no invented texture, one evaluation" in card and "4 steps" not in card


def test_a_scheduler_of_another_noise_process_is_refused_in_one_line_in_detail_mode():
    # ScoreSdeVeScheduler has no `step` (it predicts and corrects): reading its signature first was an AttributeError.
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100))
    pipeline.scheduler = ScoreSdeVeScheduler()
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler cannot sample an SR3 model: it has no DDPM noise"):
        pipeline(torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt")
    with pytest.raises(ValueError, match="no DDPM noise schedule"):
        check_scheduler_fits(ScoreSdeVeScheduler())


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_a_learned_variance_is_refused_before_the_network_runs(variance_type, monkeypatch):
    pipeline = pipeline_with(make_scheduler("ddpm", n_timestep=100))
    pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, variance_type=variance_type)
    evaluations = []
    monkeypatch.setattr(pipeline.unet, "forward", lambda *args, **kwargs: evaluations.append(1))
    with pytest.raises(ValueError, match=f"variance_type='{variance_type}' cannot sample an SR3 model"):
        pipeline(torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt")
    assert not evaluations


def count_evaluations(pipeline, monkeypatch):
    evaluations = []
    monkeypatch.setattr(pipeline.unet, "forward", lambda *args, **kwargs: evaluations.append(1))
    return evaluations


@pytest.mark.parametrize(
    "scheduler_class, prediction_type",
    [
        (HeunDiscreteScheduler, "sample"),
        (HeunDiscreteScheduler, "v_prediction"),
        (KDPM2DiscreteScheduler, "v_prediction"),
        (KDPM2AncestralDiscreteScheduler, "v_prediction"),
    ],
)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_second_order_scheduler_ending_at_timestep_0_is_refused_for_a_clean_image_model(
    scheduler_class, prediction_type, spacing, monkeypatch
):
    # Its last correction divides the network's clean-image error by sigma(0), about 0.03 here, 0.001 in SR3's.
    pipeline = pipeline_with(make_scheduler("ddim", n_timestep=100, prediction_type=prediction_type))
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, timestep_spacing=spacing)
    evaluations = count_evaluations(pipeline, monkeypatch)
    with pytest.raises(ValueError, match=f"timestep_spacing='{spacing}' cannot .* use timestep_spacing='trailing'$"):
        pipeline(torch.rand(1, 3, 16, 16), num_inference_steps=2, output_type="pt")
    assert not evaluations
    check_scheduler_fits(scheduler_class.from_config(pipeline.scheduler.config, timestep_spacing="trailing"))


def test_a_second_order_scheduler_at_any_spacing_samples_an_epsilon_model():
    config = make_scheduler("ddim", n_timestep=100, prediction_type="epsilon").config
    for spacing in ("leading", "linspace", "trailing"):
        check_scheduler_fits(HeunDiscreteScheduler.from_config(config, timestep_spacing=spacing))


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_heun_is_swapped_in_and_built_with_trailing_spacing_unless_told_otherwise(prediction_type):
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type=prediction_type)
    assert scheduler.config.timestep_spacing == "leading"
    assert swap_scheduler(scheduler, "heun").config.timestep_spacing == "trailing"
    assert make_scheduler("heun", n_timestep=100, prediction_type=prediction_type).config.timestep_spacing == "trailing"
    assert make_scheduler("heun", n_timestep=100, timestep_spacing="linspace").config.timestep_spacing == "linspace"
    if prediction_type == "epsilon":
        assert swap_scheduler(scheduler, "heun", timestep_spacing="leading").config.timestep_spacing == "leading"
    else:
        with pytest.raises(ValueError, match="use timestep_spacing='trailing'"):
            swap_scheduler(scheduler, "heun", timestep_spacing="leading")


@pytest.mark.parametrize("name", ["dpmsolver", "unipc", "euler", "ddim"])
def test_more_steps_than_training_timesteps_are_refused_before_the_network_runs(name, monkeypatch):
    # DPM-Solver and UniPC would repeat timesteps, divide 0 by 0 and end in NaN; Euler would repeat evaluations.
    pipeline = pipeline_with(make_scheduler(name, n_timestep=100, prediction_type="sample"))
    evaluations = count_evaluations(pipeline, monkeypatch)
    with pytest.raises(ValueError, match=r"^num_inference_steps must lie in \[1, 100\], got 101$"):
        pipeline(torch.rand(1, 3, 16, 16), num_inference_steps=101, output_type="pt")
    assert not evaluations


def test_trained_betas_that_disagree_with_the_step_count_are_refused_before_the_scheduler_is_built(
    tmp_path, monkeypatch
):
    pipeline_with(make_scheduler("ddim", n_timestep=100)).save_pretrained(tmp_path)
    path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    # Diffusers would allocate a timestep table of this length (745 GiB at 1e11) before any check of its own.
    path.write_text(json.dumps(dict(config, num_train_timesteps=1000)), encoding="utf-8")
    built = []
    original_init = DDIMScheduler.__init__
    monkeypatch.setattr(
        DDIMScheduler, "__init__", lambda self, *a, **k: built.append(1) or original_init(self, *a, **k)
    )
    with pytest.raises(ValueError, match="has 100 trained_betas but num_train_timesteps=1000; they must agree$"):
        SR3Pipeline.from_pretrained(tmp_path)
    assert not built


def test_a_built_scheduler_whose_trained_betas_disagree_with_the_step_count_is_refused():
    betas = make_scheduler("ddim", n_timestep=100).config.trained_betas
    with pytest.raises(ValueError, match="has 100 trained_betas but num_train_timesteps=200"):
        check_scheduler_fits(DDIMScheduler(num_train_timesteps=200, trained_betas=betas))
