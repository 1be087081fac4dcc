"""SR3Pipeline and SR3UnconditionalPipeline behaviour: inputs, sizes, outputs, generators, callbacks."""

import functools

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.noise import SCHEDULERS, check_scheduler_fits, swap_scheduler

STEPS = 3


def run(pipeline, image, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipeline(image, **kwargs)


def test_every_input_kind_gives_the_same_result(tiny_pipeline):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    reference = run(tiny_pipeline, PIL.Image.fromarray(array), output_type="np").images
    assert reference.shape == (1, 32, 32, 3) and reference.dtype == np.float32
    as_numpy = run(tiny_pipeline, array, output_type="np").images
    as_float = run(tiny_pipeline, array.astype(np.float32) / 255, output_type="np").images
    as_tensor = run(tiny_pipeline, torch.from_numpy(array).permute(2, 0, 1).float() / 255, output_type="np").images
    for other in (as_numpy, as_float, as_tensor):
        np.testing.assert_allclose(other, reference, atol=1e-5)


def test_gray_and_rgba_inputs_are_converted(tiny_pipeline):
    gray = PIL.Image.fromarray(np.full((8, 8), 100, dtype=np.uint8), mode="L")
    rgba = PIL.Image.fromarray(np.full((8, 8, 4), 100, dtype=np.uint8), mode="RGBA")
    rgb = PIL.Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8))
    outputs = [run(tiny_pipeline, image, output_type="np").images for image in (gray, rgba, rgb)]
    np.testing.assert_allclose(outputs[0], outputs[2], atol=1e-5)
    np.testing.assert_allclose(outputs[1], outputs[2], atol=1e-5)
    # Arrays and tensors with alpha drop the fourth channel, whatever the other three hold.
    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    reference = run(tiny_pipeline, colours[..., :3], output_type="np").images
    for with_alpha in (colours, torch.from_numpy(colours).permute(2, 0, 1).float() / 255):
        np.testing.assert_allclose(run(tiny_pipeline, with_alpha, output_type="np").images, reference, atol=1e-5)
    two_channel = np.zeros((8, 8, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 channels"):
        run(tiny_pipeline, two_channel)


def test_batches_lists_and_generator_lists(tiny_pipeline):
    images = [PIL.Image.new("RGB", (8, 8), color) for color in ("red", "green", "blue")]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = run(tiny_pipeline, images, generator=generators, output_type="pt").images
    assert batch.shape == (3, 3, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    # A per-image generator makes each image independent of its batch mates.
    alone = run(tiny_pipeline, images[1], generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        run(tiny_pipeline, images, generator=generators[:2])
    with pytest.raises(ValueError, match="same size"):
        run(tiny_pipeline, [images[0], PIL.Image.new("RGB", (9, 8))])


def test_same_seed_same_image_and_pil_output(tiny_pipeline):
    image = PIL.Image.new("RGB", (8, 8), "orange")
    first = run(tiny_pipeline, image).images[0]
    second = run(tiny_pipeline, image).images[0]
    assert isinstance(first, PIL.Image.Image) and first.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_non_square_and_indivisible_sizes_are_padded_and_cropped(tiny_pipeline):
    image = PIL.Image.new("RGB", (7, 5), "white")  # x4 -> 28x20; the UNet divides by 4 only after padding
    result = run(tiny_pipeline, image, output_type="pt").images
    assert result.shape == (1, 3, 20, 28)
    odd = run(tiny_pipeline, image, output_size=(23, 30), output_type="pt").images
    assert odd.shape == (1, 3, 23, 30)
    square = run(tiny_pipeline, image, output_size=16, output_type="pt").images
    assert square.shape == (1, 3, 16, 16)


def test_padding_does_not_change_the_inside_of_a_divisible_image(tiny_pipeline):
    """Padding goes to the right/bottom only: a divisible input is untouched, so its result is the reference."""
    image = PIL.Image.new("RGB", (8, 8), "teal")
    reference = run(tiny_pipeline, image, output_type="pt").images
    padded = run(tiny_pipeline, image, output_size=(32, 32), output_type="pt").images
    torch.testing.assert_close(padded, reference)


def test_intermediates_and_callbacks(tiny_pipeline):
    image = PIL.Image.new("RGB", (8, 8), "gray")
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors)))
        return {"latents": tensors["latents"] * 0} if step == STEPS - 1 else {}

    output = run(
        tiny_pipeline,
        image,
        num_intermediates=2,
        output_type="pt",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "condition"],
    )
    assert [step for step, _, _ in seen] == [0, 1, 2]
    assert seen[0][2] == ("latents", "condition")
    assert len(output.intermediates) == 2 and output.intermediates[0].shape == (1, 3, 32, 32)
    # The callback zeroed the final latents: the result is mid-gray.
    torch.testing.assert_close(output.images, torch.full_like(output.images, 0.5))
    images, intermediates = run(tiny_pipeline, image, return_dict=False)
    assert len(images) == 1 and intermediates is None
    # More snapshots asked for than steps run: one after every step.
    assert len(run(tiny_pipeline, image, num_intermediates=STEPS + 5, output_type="pt").intermediates) == STEPS
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(tiny_pipeline, image, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver", "unipc", "euler", "heun", "euler_ancestral"])
def test_schedulers_swap_with_from_config(tiny_pipeline, name):
    tiny_pipeline.scheduler = swap_scheduler(tiny_pipeline.scheduler, name)
    result = run(tiny_pipeline, PIL.Image.new("RGB", (8, 8), "pink"), num_inference_steps=4, output_type="np")
    assert result.images.shape == (1, 32, 32, 3) and np.isfinite(result.images).all()


@pytest.mark.parametrize(
    "name, problem",
    [
        ("EDMEulerScheduler", "no DDPM noise schedule"),
        ("EDMDPMSolverMultistepScheduler", "no DDPM noise schedule"),
        ("CMStochasticIterativeScheduler", "no DDPM noise schedule"),
        ("FlowMatchEulerDiscreteScheduler", "no DDPM noise schedule"),
        ("DDIMInverseScheduler", "backwards"),
    ],
)
def test_a_scheduler_of_another_noise_process_is_refused_before_any_evaluation(tiny_pipeline, name, problem):
    # These accept an SR3 config and would sample silently wrong levels (or fail deep inside a step).
    import diffusers

    tiny_pipeline.scheduler = getattr(diffusers, name).from_config(tiny_pipeline.scheduler.config)
    evaluations = []
    tiny_pipeline.unet.register_forward_hook(lambda *_: evaluations.append(1))
    with pytest.raises(ValueError, match=f"{name} cannot sample an SR3 model: .*{problem}"):
        run(tiny_pipeline, PIL.Image.new("RGB", (8, 8)), mode="detail")
    assert evaluations == []


def test_a_scheduler_that_cannot_sample_the_prediction_type_is_refused_before_any_evaluation(tiny_pipeline):
    clean_image = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    refused = "EulerAncestralDiscreteScheduler cannot sample a model that predicts 'sample'"
    with pytest.raises(ValueError, match=refused):
        swap_scheduler(clean_image, "euler_ancestral")
    assert swap_scheduler(clean_image, "euler").config.prediction_type == "sample"
    from diffusers import PNDMScheduler

    with pytest.raises(ValueError, match="PNDMScheduler cannot sample a model that predicts 'sample'"):
        check_scheduler_fits(PNDMScheduler.from_config(clean_image.config))
    check_scheduler_fits(PNDMScheduler.from_config({**clean_image.config, "prediction_type": "epsilon"}))

    class Quirky(type(clean_image)):  # a trial step that fails for another reason: left to the real run
        def step(self, *args, **kwargs):
            raise RuntimeError("not about prediction types")

    check_scheduler_fits(Quirky.from_config(clean_image.config))
    # Assigned directly, as Diffusers users do: refused by the pipeline before the network runs.
    tiny_pipeline.scheduler = SCHEDULERS["euler_ancestral"].from_config(clean_image.config)
    evaluations = []
    tiny_pipeline.unet.register_forward_hook(lambda *_: evaluations.append(1))
    with pytest.raises(ValueError, match="pick another scheduler"):
        run(tiny_pipeline, PIL.Image.new("RGB", (8, 8)), mode="detail")
    assert evaluations == []


def test_bad_arguments_are_named(tiny_pipeline, tiny_unet):
    image = PIL.Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="output_type"):
        run(tiny_pipeline, image, output_type="jpeg")
    with pytest.raises(ValueError, match="num_inference_steps"):
        run(tiny_pipeline, image, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        run(tiny_pipeline, torch.full((3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(tiny_pipeline, torch.full((3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="num_intermediates must be 0 or more"):
        run(tiny_pipeline, image, num_intermediates=-1)
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        run(tiny_pipeline, "face.png")
    with pytest.raises(ValueError, match="conditional UNet"):
        SR3Pipeline(SR3UNet2DModel(**{**tiny_unet.config, "in_channels": 3}), tiny_pipeline.scheduler)


def unconditional_pipeline(channels=3):
    torch.manual_seed(0)
    unet = SR3UNet2DModel(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=8,
        channel_multipliers=(1, 2),
        attention_resolutions=(),
        norm_groups=4,
        sample_size=16,
    )
    pipeline = SR3UnconditionalPipeline(unet, make_scheduler("ddpm", n_timestep=50))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_unconditional_pipeline():
    pipeline = unconditional_pipeline()
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    output = pipeline(
        batch_size=2, num_inference_steps=STEPS, generator=generator, output_type="np", num_intermediates=3
    )
    assert output.images.shape == (2, 16, 16, 3) and len(output.intermediates) == 3
    wide = pipeline(batch_size=1, num_inference_steps=STEPS, height=16, width=24, output_type="pt").images
    assert wide.shape == (1, 3, 16, 24)
    pil = pipeline(num_inference_steps=STEPS).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipeline(num_inference_steps=STEPS, height=15)
    with pytest.raises(ValueError, match="unconditional UNet"):
        SR3UnconditionalPipeline(SR3UNet2DModel(in_channels=6, block_out_channels=8, norm_groups=4), pipeline.scheduler)


def test_residual_models_refine_the_upsample(tiny_unet):
    """A residual pipeline adds the refined residual to the bicubic upsample; a zero residual gives the upsample."""
    from diffusers_sr3.image_processing import images_to_tensor, upsample_condition

    pipeline = SR3Pipeline(tiny_unet, make_scheduler("ddim", n_timestep=100), upscale_factor=4, residual=True)
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(3, 8, 8)

    def zero_residual(pipe, step, timestep, tensors):
        return {"latents": tensors["latents"] * 0}

    output = run(pipeline, image, output_type="pt", callback_on_step_end=zero_residual, num_intermediates=1)
    upsample = (upsample_condition(images_to_tensor(image), (32, 32)) + 1) / 2
    torch.testing.assert_close(output.images, upsample, atol=1e-6, rtol=0)
    torch.testing.assert_close(output.intermediates[0], upsample, atol=1e-6, rtol=0)
    plain = SR3Pipeline(tiny_unet, make_scheduler("ddim", n_timestep=100), upscale_factor=4)
    plain.set_progress_bar_config(disable=True)
    zero_image = run(plain, image, output_type="pt", callback_on_step_end=zero_residual).images
    torch.testing.assert_close(zero_image, torch.full_like(zero_image, 0.5))


def test_detail_mode_defaults_come_from_the_pipeline_config_and_survive_saving(tiny_unet, tmp_path):
    """`detail_steps`, `detail_strength` and `detail_eta` are what `pipe(image, mode="detail")` runs with; models saved
    before these keys existed load with 50 steps, strength 1 and the scheduler's eta; a scheduler without eta runs."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(tiny_unet, scheduler, detail_steps=4, detail_strength=0.5, detail_eta=1.0)
    pipeline.set_progress_bar_config(disable=True)
    evaluations = []
    tiny_unet.register_forward_hook(lambda module, args, output: evaluations.append(1))
    image = torch.rand(3, 8, 8)

    def detail(pipe, **kwargs):
        evaluations.clear()
        generator = torch.Generator().manual_seed(0)
        return pipe(image, mode="detail", generator=generator, output_type="pt", **kwargs).images

    by_default = detail(pipeline)
    assert len(evaluations) == FIDELITY_STEPS + 2  # the fidelity answer, then the last half of 4 steps
    torch.testing.assert_close(by_default, detail(pipeline, num_inference_steps=4, strength=0.5, eta=1.0))
    assert not torch.equal(by_default, detail(pipeline, eta=0.0))  # the saved eta was applied
    assert len(evaluations) == FIDELITY_STEPS + 2
    detail(pipeline, num_inference_steps=6, strength=1.0)  # call arguments win over the config
    assert len(evaluations) == 6
    assert pipeline.detail_settings(strength=0.25) == {
        "num_inference_steps": 4,
        "strength": 0.25,
        "eta": 1.0,
        "guidance_scale": 1.0,
        "window_size": 0,
        "parallel_guidance_weight": 1.0,
    }

    pipeline.save_pretrained(tmp_path / "new")
    reloaded = SR3Pipeline.from_pretrained(tmp_path / "new")
    reloaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(detail(reloaded), by_default)

    # A model saved by an earlier version has no detail keys in its model_index.json.
    index_path = tmp_path / "new" / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for key in ("detail_steps", "detail_strength", "detail_eta", "detail_window_size"):
        del index[key]
    index_path.write_text(json.dumps(index), encoding="utf-8")
    earlier = SR3Pipeline.from_pretrained(tmp_path / "new")
    assert earlier.detail_settings() == {
        "num_inference_steps": 50,
        "strength": 1.0,
        "eta": None,
        "guidance_scale": 1.0,
        "window_size": 0,
        "parallel_guidance_weight": 1.0,
    }

    # A sampler without eta keeps the other settings and leaves the saved eta out; an explicit eta is refused.
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    assert pipeline.detail_settings()["eta"] is None
    detail(pipeline)
    assert len(evaluations) == FIDELITY_STEPS + 2
    with pytest.raises(ValueError, match="eta applies to schedulers that take it"):
        detail(pipeline, eta=1.0)


def test_eta_outside_zero_one_is_refused(tiny_unet):
    """Above 1, DDIM's last step takes the square root of a negative number and returns NaN images."""
    pipeline = SR3Pipeline(unet=tiny_unet, scheduler=make_scheduler("ddim", n_timestep=100, prediction_type="sample"))
    low_resolution = torch.rand(1, 3, 8, 8)
    for eta in (1.5, -0.5):
        with pytest.raises(ValueError, match="eta must lie in \\[0, 1\\]"):
            pipeline(low_resolution, mode="detail", num_inference_steps=2, eta=eta, output_type="pt")
    # A pipeline saved with a detail_eta above 1 still loads (a DDPM sampler ignores it); DDIM refuses it when it runs.
    saved = SR3Pipeline(unet=tiny_unet, scheduler=pipeline.scheduler, detail_eta=1.5)
    with pytest.raises(ValueError, match="eta must lie in \\[0, 1\\]"):
        saved(low_resolution, mode="detail", num_inference_steps=2, output_type="pt")
    image = pipeline(low_resolution, mode="detail", num_inference_steps=2, eta=1.0, output_type="pt").images
    assert torch.isfinite(image).all()


def test_bad_detail_defaults_are_named(tiny_unet):
    clean_image = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    for settings, message in (
        ({"detail_steps": 0}, "detail_steps must be a positive integer"),
        ({"detail_steps": 2.5}, "detail_steps must be a positive integer"),
        ({"detail_strength": 0.0}, r"detail_strength must lie in \(0, 1\]"),
        ({"detail_strength": 1.5}, r"detail_strength must lie in \(0, 1\]"),
        ({"detail_eta": -1.0}, "detail_eta must be at least 0"),
    ):
        with pytest.raises(ValueError, match=message):
            SR3Pipeline(tiny_unet, clean_image, **settings)
    with pytest.raises(ValueError, match="detail_strength 0.5 starts detail mode from the fidelity answer"):
        SR3Pipeline(tiny_unet, make_scheduler("ddim", n_timestep=100), detail_strength=0.5)


def test_a_one_channel_unconditional_model_gives_gray_images():
    pipeline = unconditional_pipeline(channels=1)
    output = pipeline(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert [image.mode for image in output.images] == ["L", "L"] and output.images[0].size == (16, 16)
    unit = pipeline(
        batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert unit.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(np.asarray(output.images[1]), unit[1, 0].numpy() * 255, atol=0.51)
    array = pipeline(num_inference_steps=STEPS, output_type="np", num_intermediates=2)
    assert array.images.shape == (1, 16, 16, 1) and array.intermediates[0].shape == (1, 16, 16, 1)


@pytest.mark.parametrize("output_type", ["latent", "PIL", "numpy"])
def test_an_unsupported_output_type_is_refused_before_any_evaluation(tiny_pipeline, output_type, monkeypatch):
    from diffusers_sr3 import SR3CascadePipeline

    evaluations = []

    def count(network):
        monkeypatch.setattr(network, "forward", lambda *args, **kwargs: evaluations.append(1))

    unconditional = unconditional_pipeline()
    cascade = SR3CascadePipeline.from_stages(unconditional, [tiny_pipeline])
    count(tiny_pipeline.unet)
    count(unconditional.unet)
    calls = [
        lambda: run(tiny_pipeline, PIL.Image.new("RGB", (8, 8)), output_type=output_type),
        lambda: run(tiny_pipeline, PIL.Image.new("RGB", (8, 8)), output_type=output_type, mode="fidelity"),
        lambda: unconditional(num_inference_steps=STEPS, output_type=output_type),
        lambda: cascade(num_inference_steps=STEPS, output_type=output_type),
        lambda: cascade(PIL.Image.new("RGB", (8, 8)), num_inference_steps=STEPS, output_type=output_type),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"output_type must be 'pil', 'np' or 'pt', got '{output_type}'"):
            call()
    assert not evaluations


def condition_noise_pipeline():
    """A residual model that predicts the clean image, trained with noise-conditioning augmentation (level 0.1)."""
    from conftest import low_resolution_unet

    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    unet = low_resolution_unet(condition_noise_embedding=True)
    pipeline = SR3Pipeline(unet, scheduler, residual=True, condition_noise_level=0.1)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_fidelity_mode_does_not_depend_on_the_seed_for_condition_noise_models():
    from diffusers_sr3.tiling import tiled_super_resolve

    pipeline = condition_noise_pipeline()
    images = [np.random.RandomState(seed).rand(16, 16, 3).astype(np.float32) for seed in (0, 1)]

    def fidelity(image, *seeds, call=pipeline, **kwargs):
        generator = [torch.Generator().manual_seed(seed) for seed in seeds]
        return call(image, mode="fidelity", generator=generator, output_type="np", **kwargs).images

    first = fidelity(images[0], 1)
    assert np.array_equal(first, fidelity(images[0], 2))
    # Each image of a batch is noised as it is alone, whatever its generator (the batched network's rounding aside).
    batch = fidelity(images, 3, 4)
    np.testing.assert_allclose(batch, np.concatenate([first, fidelity(images[1], 5)]), atol=1e-5)
    assert np.array_equal(fidelity(images[0], 1, self_ensemble=True), fidelity(images[0], 2, self_ensemble=True))
    tiled = functools.partial(tiled_super_resolve, pipeline, tile_size=32)  # 4 tiles of the 64-pixel output
    assert np.array_equal(fidelity(images[0], 1, call=tiled), fidelity(images[0], 2, call=tiled))
    # Detail mode keeps drawing the condition noise from the seed: below strength 1 it starts from a fidelity answer
    # computed on that noised condition.
    detail = dict(mode="detail", num_inference_steps=2, strength=0.5, eta=0.0, output_type="np")
    one = pipeline(images[0], generator=torch.Generator().manual_seed(1), **detail).images
    two = pipeline(images[0], generator=torch.Generator().manual_seed(2), **detail).images
    assert not np.array_equal(one, two)


def test_zero_scales_factors_and_sizes_are_refused(tiny_unet):
    """Only positive values mean something here: the refined residual is divided by the residual scale, and the
    output size is the input's times the upscale factor."""
    scheduler = make_scheduler("ddpm", n_timestep=100)
    with pytest.raises(ValueError, match="residual_scale must be positive, got 0"):
        SR3Pipeline(tiny_unet, scheduler, residual=True, residual_scale=0.0)
    with pytest.raises(ValueError, match="upscale_factor must be a positive integer, got 0"):
        SR3Pipeline(tiny_unet, scheduler, upscale_factor=0)
    pipeline = SR3Pipeline(tiny_unet, scheduler, upscale_factor=4)
    for size in (0, (0, 32), (32, 0)):
        with pytest.raises(ValueError, match="output_size must be positive"):
            run(pipeline, PIL.Image.new("RGB", (8, 8)), output_size=size)


def test_a_v_prediction_model_can_default_to_a_strength_below_one(tiny_unet):
    """v-prediction models predict the clean image too: they start detail mode from the fidelity answer."""
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="v_prediction")
    pipeline = SR3Pipeline(tiny_unet, scheduler, upscale_factor=4, detail_strength=0.5, detail_steps=4)
    pipeline.set_progress_bar_config(disable=True)
    steps = []
    image = torch.rand(3, 8, 8)
    pipeline(image, output_type="pt", callback_on_step_end=lambda pipe, i, t, tensors: steps.append(i) or {})
    assert pipeline.detail_settings()["strength"] == 0.5 and steps == [0, 1]  # the last half of the 4 steps


def test_fidelity_mode_noises_each_images_condition_from_the_documented_seed():
    """`FIDELITY_CONDITION_NOISE_SEED` (0) seeds one CPU generator per image: a fidelity answer saved by one version
    is the next version's, whatever the call's generator."""
    from diffusers_sr3.image_processing import images_to_tensor, upsample_condition
    from diffusers_sr3.noise import augment_condition

    pipeline = condition_noise_pipeline()
    images = torch.rand(2, 3, 16, 16)
    conditions = []

    def keep_condition(pipe, step, timestep, tensors):
        conditions.append(tensors["condition"].clone())
        return {}

    pipeline(
        images,
        mode="fidelity",
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        callback_on_step_end=keep_condition,
        callback_on_step_end_tensor_inputs=["condition"],
    )
    clean = upsample_condition(images_to_tensor(images), (64, 64))
    noise = torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(0))  # the same for both images
    torch.testing.assert_close(conditions[0], augment_condition(clean, 0.1, noise=noise.expand_as(clean)))
