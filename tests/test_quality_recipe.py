"""The pieces of the recipe that beats bicubic: a network at the low-resolution grid, a residual scaled to unit
variance (measured, saved, applied everywhere), and two ways to sample one model (fidelity and detail)."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_data import make_image_folder
from test_training import fast_options

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.noise import network_inputs_for_schedule, swap_scheduler, training_betas
from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS, evaluations_per_crop
from diffusers_sr3.presets import get_preset
from diffusers_sr3.tiling import tiled_super_resolve
from diffusers_sr3.training import TrainingConfig, train
from diffusers_sr3.training.objective import measure_residual_scale, noise_batch


def lowres_unet(factor=4, **overrides):
    config = dict(
        in_channels=6,
        out_channels=3,
        block_out_channels=8,
        channel_multipliers=(1, 2),
        layers_per_block=1,
        attention_resolutions=(4,),
        sample_size=32,
        norm_groups=4,
        pixel_unshuffle_factor=factor,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return SR3UNet2DModel(**config).eval()


class ConstantNetwork(torch.nn.Module):
    """Stands in for a UNet: predicts `value` everywhere, and records the levels it was asked at."""

    def __init__(self, unet, value):
        super().__init__()
        self.inner = unet
        self.value = value
        self.levels = []

    config = property(lambda self: self.inner.config)
    dtype = property(lambda self: self.inner.dtype)
    device = property(lambda self: self.inner.device)
    downsampling_factor = property(lambda self: self.inner.downsampling_factor)

    def forward(self, sample, noise_level, return_dict=True, **kwargs):
        self.levels.append(torch.as_tensor(noise_level).reshape(-1)[0].item())
        return (torch.full((sample.shape[0], 3, *sample.shape[-2:]), self.value),)


def test_a_low_resolution_network_runs_its_unet_on_the_coarse_grid():
    unet = lowres_unet(factor=4)
    assert unet.downsampling_factor == 4 * 2
    assert unet.conv_in.in_channels == 6 * 16 and unet.conv_out.conv.out_channels == 3 * 16
    seen = []
    unet.down_levels[0].blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    output = unet(torch.randn(2, 6, 32, 48), torch.rand(2)).sample
    assert output.shape == (2, 3, 32, 48)
    assert seen == [torch.Size([2, 8, 8, 12])]  # 32x48 image pixels, 8x12 grid cells
    # Attention sits where the grid (not the image) has the listed size: sample_size 32 / 4 = 8, then 4.
    assert unet.down_levels[0].blocks[0].attention is None and unet.down_levels[1].blocks[0].attention is not None
    with pytest.raises(ValueError, match="not divisible by 8"):
        unet(torch.randn(1, 6, 36, 32), 0.5)
    with pytest.raises(ValueError, match="pixel_unshuffle_factor must be a positive"):
        lowres_unet(factor=0)


def test_factor_one_is_the_original_architecture_and_old_configs_load(tmp_path):
    config = get_preset("tiny").unet_config()
    old = SR3UNet2DModel(**config)
    assert old.config.pixel_unshuffle_factor == 1 and old.downsampling_factor == 4
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del saved["pixel_unshuffle_factor"]  # a config written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    loaded = SR3UNet2DModel.from_pretrained(tmp_path)
    assert loaded.config.pixel_unshuffle_factor == 1
    x = torch.randn(1, 6, 32, 32)
    torch.testing.assert_close(loaded(x, 0.3).sample, old(x, 0.3).sample)


def test_low_resolution_presets():
    for name, factor, upscale in (("photos_x4", 4, 4), ("photos_x8", 8, 8)):
        preset = get_preset(name)
        unet = SR3UNet2DModel(**preset.unet_config())
        assert unet.config.pixel_unshuffle_factor == factor == preset.upscale_factor == upscale
        assert preset.resolution % unet.downsampling_factor == 0
        assert 14e6 < sum(p.numel() for p in unet.parameters()) < 16e6


def test_residual_scale_is_measured_and_scales_the_training_target():
    torch.manual_seed(0)
    condition = torch.rand(4, 3, 16, 16) * 2 - 1
    hr = condition + 0.1 * torch.randn(4, 3, 16, 16)
    scale = measure_residual_scale(hr, condition)
    assert scale == pytest.approx(10.0, rel=0.03)
    with pytest.raises(ValueError, match="residual of these images is zero"):
        measure_residual_scale(condition, condition)
    unet = lowres_unet()
    betas = training_betas(make_scheduler("ddpm", n_timestep=100))
    batch = noise_batch(unet, betas, hr, condition, prediction_type="sample", residual=True, residual_scale=scale)
    torch.testing.assert_close(batch.target, (hr - condition) * scale)
    assert float(batch.target.std()) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="residual_scale applies to residual training only"):
        noise_batch(unet, betas, hr, condition, residual_scale=scale)


def residual_pipeline(value, prediction_type="sample", scale=8.0, scheduler="ddim"):
    unet = ConstantNetwork(lowres_unet(), value)
    schedule = make_scheduler(scheduler, n_timestep=100, prediction_type=prediction_type, clip_sample=False)
    pipeline = SR3Pipeline(unet=lowres_unet(), scheduler=schedule, residual=True, residual_scale=scale)
    vars(pipeline)["unet"] = unet  # the constant network stands in for the UNet
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, unet


def bicubic_of(image):
    from diffusers_sr3.image_processing import images_to_tensor, upsample_condition

    low = images_to_tensor(image)
    return (upsample_condition(low, (low.shape[-2] * 4, low.shape[-1] * 4)) + 1) / 2


def test_fidelity_mode_is_deterministic_ddim_from_the_noise_mean_scaled_back():
    image = torch.rand(1, 3, 8, 8)
    pipeline, network = residual_pipeline(value=0.8, scheduler="ddpm")
    result = pipeline(image, mode="fidelity", output_type="pt").images
    # One DDIM step (FIDELITY_STEPS), though the pipeline's own scheduler is DDPM, at the schedule's noisiest level:
    # there the x0-predicting network's answer is its posterior mean.
    assert network.levels == pytest.approx([float(pipeline.scheduler.alphas_cumprod[-1].sqrt())])
    four = pipeline(image, mode="fidelity", num_inference_steps=4, output_type="pt").images
    ddim = swap_scheduler(pipeline.scheduler, "ddim", timestep_spacing="trailing")
    ddim.set_timesteps(4)
    assert network.levels[1:] == pytest.approx(network_inputs_for_schedule(ddim, "noise_level").tolist())
    torch.testing.assert_close(four, result, atol=1e-5, rtol=0)
    # The network predicts the scaled residual 0.8: the image is the upsample plus 0.8 / 8 in [-1, 1] units.
    expected = (bicubic_of(image) + 0.8 / 8 / 2).clamp(0, 1)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    # Seed-independent: it starts from the mean of the noise.
    again = pipeline(image, mode="fidelity", output_type="pt", generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(again, result)
    assert isinstance(pipeline.scheduler, type(make_scheduler("ddpm")))  # the pipeline keeps its scheduler
    assert len(network.levels) == 1 + 4 + 1


def test_temperature_scales_the_starting_noise_of_detail_mode():
    image = torch.rand(1, 3, 8, 8)
    pipeline, _ = residual_pipeline(value=0.0, prediction_type="v_prediction")
    # v = 0 and eta 0: each DDIM step keeps x_t on the ray of the starting noise, so the result is a multiple
    # of it, proportional to the temperature; at temperature 0 (or in fidelity mode) it is the upsample itself.
    outputs = [
        pipeline(
            image, num_inference_steps=3, temperature=t, output_type="pt", generator=torch.Generator().manual_seed(3)
        ).images
        for t in (0.0, 0.5, 1.0)
    ]
    fidelity = pipeline(image, mode="fidelity", output_type="pt").images
    torch.testing.assert_close(outputs[0], bicubic_of(image).clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(fidelity, outputs[0], atol=1e-6, rtol=0)
    interior = ((outputs[2] > 0) & (outputs[2] < 1) & (outputs[1] > 0) & (outputs[1] < 1)).all(dim=1, keepdim=True)
    interior = interior.expand_as(outputs[2])
    half, full = (outputs[1] - outputs[0])[interior], (outputs[2] - outputs[0])[interior]
    torch.testing.assert_close(half * 2, full, atol=1e-5, rtol=1e-3)
    assert full.abs().max() > 0
    with pytest.raises(ValueError, match="apply to detail mode"):
        pipeline(image, mode="fidelity", temperature=0.5)


class RecordingNetwork(ConstantNetwork):
    """A constant network that also records the noisy image it was given at each call."""

    def __init__(self, unet, value):
        super().__init__(unet, value)
        self.inputs = []

    def forward(self, sample, noise_level, return_dict=True, **kwargs):
        self.inputs.append(sample[:, 3:].clone())
        return super().forward(sample, noise_level, return_dict, **kwargs)


@pytest.mark.parametrize(
    "mode, steps, strength, scheduler",
    [
        ("fidelity", None, 1.0, "ddim"),
        ("fidelity", 6, 1.0, "ddim"),
        ("detail", 5, 1.0, "ddim"),
        ("detail", 10, 0.3, "ddim"),
        ("detail", 10, 0.15, "ddim"),  # one step, as Diffusers counts it: int(1.5)
        ("detail", 5, 1.0, "heun"),  # second order: most steps evaluate twice
        ("detail", 10, 0.3, "heun"),
    ],
)
def test_evaluations_per_crop_counts_the_network_calls(mode, steps, strength, scheduler):
    pipeline, _ = residual_pipeline(value=0.6, scheduler=scheduler)
    network = RecordingNetwork(pipeline.unet.inner, 0.6)
    vars(pipeline)["unet"] = network
    options = {} if mode == "fidelity" else {"strength": strength}
    pipeline(torch.rand(1, 3, 8, 8), num_inference_steps=steps, mode=mode, output_type="pt", **options)
    assert len(network.levels) == evaluations_per_crop(mode, steps, strength, pipeline.scheduler)
    if scheduler == "ddim":
        assert len(network.levels) == evaluations_per_crop(mode, steps, strength)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_strength_refines_the_fidelity_answer_over_the_last_part_of_the_schedule(scheduler):
    image = torch.rand(1, 3, 8, 8)
    pipeline, _ = residual_pipeline(value=0.6, scheduler=scheduler)
    network = RecordingNetwork(pipeline.unet.inner, 0.6)
    vars(pipeline)["unet"] = network
    result = pipeline(image, num_inference_steps=10, strength=0.3, temperature=0.0, output_type="pt").images
    # The fidelity answer (FIDELITY_STEPS DDIM steps), then the last 3 of the 10 detail steps: not 10 evaluations.
    assert len(network.levels) == FIDELITY_STEPS + 3
    detail = swap_scheduler(pipeline.scheduler, scheduler)
    detail.set_timesteps(10)
    refinement = network.levels[FIDELITY_STEPS:]
    assert refinement == pytest.approx(network_inputs_for_schedule(detail, "noise_level")[7:].tolist())
    # Without noise (temperature 0) the refinement starts from the fidelity answer (0.6, the scaled residual)
    # noised to its first step, which the network sees as sqrt(alpha_bar) * 0.6 (Euler: after its input scaling).
    first = network.inputs[FIDELITY_STEPS]
    torch.testing.assert_close(first, torch.full_like(first, 0.6 * refinement[0]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result, (bicubic_of(image) + 0.6 / 8 / 2).clamp(0, 1), atol=1e-4, rtol=0)
    # With noise, the start is the fidelity answer plus noise from the generator: the same seed repeats it.
    for seed in (1, 1, 2):
        pipeline(
            image,
            num_inference_steps=10,
            strength=0.5,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        )
    first_run = FIDELITY_STEPS + 3
    assert len(network.levels) == first_run + 3 * (FIDELITY_STEPS + 5)
    starts = [network.inputs[first_run + run * (FIDELITY_STEPS + 5) + FIDELITY_STEPS] for run in range(3)]
    torch.testing.assert_close(starts[0], starts[1])
    assert (starts[0] - starts[2]).abs().max() > 0.1


def test_strength_is_checked():
    image = torch.rand(1, 3, 8, 8)
    pipeline, _ = residual_pipeline(value=0.0)
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="strength must lie in"):
            pipeline(image, strength=strength)
    with pytest.raises(ValueError, match="apply to detail mode"):
        pipeline(image, mode="fidelity", strength=0.5)
    epsilon, _ = residual_pipeline(value=0.0, prediction_type="epsilon")
    # Already in detail mode: strength 1 is all it needs to hear.
    with pytest.raises(
        ValueError, match="strength below 1 needs a model that predicts the clean image.*: use strength 1$"
    ):
        epsilon(image, strength=0.5)
    epsilon(image, num_inference_steps=2, strength=1.0)  # full refinements need no clean-image prediction


def test_fidelity_mode_refuses_epsilon_models():
    image = torch.rand(1, 3, 8, 8)
    epsilon, _ = residual_pipeline(value=0.0, prediction_type="epsilon")
    with pytest.raises(ValueError, match="predicts the clean image.*: use mode='detail' with strength 1$"):
        epsilon(image, mode="fidelity")
    with pytest.raises(ValueError, match="mode must be"):
        epsilon(image, mode="sharp")


def test_eta_goes_to_schedulers_that_take_it():
    image = torch.rand(1, 3, 8, 8)
    unet = lowres_unet()
    ddim = SR3Pipeline(unet, make_scheduler("ddim", n_timestep=100, prediction_type="sample"))
    ddim.set_progress_bar_config(disable=True)
    runs = [
        ddim(image, num_inference_steps=3, eta=eta, generator=torch.Generator().manual_seed(0), output_type="pt")
        for eta in (0.0, 0.0, 1.0)
    ]
    torch.testing.assert_close(runs[0].images, runs[1].images)
    assert (runs[0].images - runs[2].images).abs().max() > 1e-3
    ddpm = SR3Pipeline(unet, make_scheduler("ddpm", n_timestep=100))
    with pytest.raises(ValueError, match="eta applies to schedulers that take it"):
        ddpm(image, num_inference_steps=2, eta=0.5)


def test_tiled_upscaling_applies_the_residual_scale():
    image = torch.rand(1, 3, 24, 24)  # 96x96 output: several 32-pixel tiles
    pipeline, _ = residual_pipeline(value=-0.4)
    tiled = tiled_super_resolve(pipeline, image, tile_size=32, overlap=8, mode="fidelity", output_type="pt").images
    torch.testing.assert_close(tiled, (bicubic_of(image) - 0.4 / 8 / 2).clamp(0, 1), atol=1e-5, rtol=0)


def test_training_measures_the_scale_saves_it_and_samples_with_it(tmp_path):
    data = make_image_folder(tmp_path / "images", count=4, bad=False)
    options = fast_options(tmp_path / "out", residual=True, prediction_type="sample")
    output = train(TrainingConfig(train_data_dir=str(data), **options))
    pipeline = SR3Pipeline.from_pretrained(output)
    assert pipeline.config.residual is True
    measured = pipeline.config.residual_scale
    assert 1.0 < measured < 1000.0
    # The x0 clipping range follows the scale: the scaled residual spans twice the image range.
    assert pipeline.scheduler.config.clip_sample_range == pytest.approx(2 * measured)
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["residual_scale"] == measured
    assert "on the residual x" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    # An explicit scale wins over the measurement.
    options = fast_options(tmp_path / "fixed", residual=True, prediction_type="sample", residual_scale=5.0)
    fixed = train(TrainingConfig(train_data_dir=str(data), **options))
    assert SR3Pipeline.from_pretrained(fixed).config.residual_scale == 5.0
    with pytest.raises(ValueError, match="applies to residual training"):
        TrainingConfig(residual_scale=5.0)


def test_the_scaled_residual_reaches_unit_variance_on_photos():
    """The reason for the scale: on real photos the x4 residual is ~10x smaller than the schedule's noise."""
    from diffusers_sr3.image_processing import degrade
    from diffusers_sr3.photos import packaged_photo_paths, photo_crops

    crops = photo_crops(packaged_photo_paths()[:4], 64, count=32, seed=0, max_side=512, output_type="pt")
    _, condition = degrade(crops, 4)
    scale = measure_residual_scale(crops, condition)
    assert 4 < scale < 40
    assert float(((crops - condition) * scale).std()) == pytest.approx(1.0, rel=0.01)
    assert F.mse_loss(crops, condition) < 0.05


def x0_lowres_pipeline():
    pipeline = SR3Pipeline(
        lowres_unet(), make_scheduler("ddim", n_timestep=100, prediction_type="sample"), residual=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_self_ensemble_averages_the_eight_orientations_turned_back():
    pipeline = x0_lowres_pipeline()
    image = torch.rand(2, 3, 8, 12)  # not square: a quarter-turn swaps height and width
    ensemble = pipeline(image, mode="fidelity", self_ensemble=True, output_type="pt").images
    assert ensemble.shape == (2, 3, 32, 48)

    # The 8 orientations' answers, each turned back: they differ (the network is not equivariant); their mean is it.
    def answer_turned_back(turns, mirror):
        oriented = (image.flip(-1) if mirror else image).rot90(turns, (2, 3))
        answer = pipeline(oriented, mode="fidelity", output_type="pt").images.rot90(-turns, (2, 3))
        return answer.flip(-1) if mirror else answer

    answers = [answer_turned_back(turns, mirror) for turns in range(4) for mirror in (False, True)]
    assert (answers[2] - answers[0]).abs().max() > 1e-3 and (answers[1] - answers[0]).abs().max() > 1e-3
    torch.testing.assert_close(ensemble, torch.stack(answers).mean(0), atol=1e-5, rtol=0)
    # The ensemble is equivariant: its answer for a turned or mirrored input is its answer turned or mirrored.
    for transform, inverse in (
        (lambda x: x.rot90(1, (2, 3)), lambda x: x.rot90(-1, (2, 3))),
        (lambda x: x.flip(-2), lambda x: x.flip(-2)),
    ):
        again = pipeline(transform(image), mode="fidelity", self_ensemble=True, output_type="pt").images
        torch.testing.assert_close(inverse(again), ensemble, atol=1e-5, rtol=0)
    pil = pipeline(image[:1], mode="fidelity", self_ensemble=True, output_size=(36, 40)).images[0]
    assert pil.size == (40, 36)


def test_self_ensemble_is_a_fidelity_mode_option():
    pipeline = x0_lowres_pipeline()
    image = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="needs mode='fidelity'"):
        pipeline(image, mode="detail", self_ensemble=True)
    with pytest.raises(ValueError, match="no num_intermediates"):
        pipeline(image, mode="fidelity", self_ensemble=True, num_intermediates=2)
    # Detail mode's settings are refused, not ignored, before any network runs.
    calls = []
    pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    for setting in (dict(eta=1.0), dict(temperature=0.5), dict(strength=0.6), dict(window_size=16)):
        with pytest.raises(ValueError, match="apply to detail mode"):
            pipeline(image, mode="fidelity", self_ensemble=True, **setting)
    assert not calls


def test_a_pipeline_saves_its_own_fidelity_steps_and_older_ones_load_with_one(tmp_path):
    schedule = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    SR3Pipeline(unet=lowres_unet(), scheduler=schedule, residual=True, fidelity_steps=3).save_pretrained(tmp_path)
    pipeline = SR3Pipeline.from_pretrained(tmp_path)
    assert pipeline.config.fidelity_steps == 3
    network = ConstantNetwork(pipeline.unet, 0.6)
    vars(pipeline)["unet"] = network
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 8, 8)
    pipeline(image, mode="fidelity", output_type="pt")
    trailing = swap_scheduler(pipeline.scheduler, "ddim", timestep_spacing="trailing")
    trailing.set_timesteps(3)
    assert network.levels == pytest.approx(network_inputs_for_schedule(trailing, "noise_level").tolist())
    assert len(network.levels) == evaluations_per_crop("fidelity", fidelity_steps=3)
    network.levels.clear()
    pipeline(image, num_inference_steps=10, strength=0.3, output_type="pt")  # starts from the 3-step answer
    assert len(network.levels) == 3 + 3 == evaluations_per_crop("detail", 10, 0.3, fidelity_steps=3)
    network.levels.clear()
    pipeline(image, mode="fidelity", num_inference_steps=1, output_type="pt")  # a call's own count wins
    assert len(network.levels) == 1

    # A pipeline saved before the key existed answers in one step.
    index = json.loads((tmp_path / "model_index.json").read_text(encoding="utf-8"))
    del index["fidelity_steps"]
    (tmp_path / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    assert SR3Pipeline.from_pretrained(tmp_path).config.fidelity_steps == FIDELITY_STEPS == 1


@pytest.mark.parametrize("steps", [0, 1.5])
def test_fidelity_steps_must_be_a_positive_integer(steps):
    schedule = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    with pytest.raises(ValueError, match="fidelity_steps must be a positive integer"):
        SR3Pipeline(unet=lowres_unet(), scheduler=schedule, fidelity_steps=steps)
