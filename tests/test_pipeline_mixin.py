"""Diffusers' pipeline test patterns (`PipelineTesterMixin`-style), run on tiny SR3 pipelines.

Each check is written once in `PipelineTesterMixin` and runs for `SR3Pipeline` and `SR3UnconditionalPipeline`:
save/load round trips (variants, pickle weights, Diffusers' loading options), dtype, step callbacks (functions,
`PipelineCallback`, `MultiPipelineCallbacks`, `interrupt`, `num_timesteps`), batching with generator lists,
progress-bar configuration and given starting noise (`latents=`).
"""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import needs_bfloat16_kernels, tiny_unet_config
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler

STEPS = 3


class ScaleLatents(PipelineCallback):
    """A Diffusers callback object: scales the latents at one step and records what the pipeline exposes."""

    tensor_inputs = ["latents"]

    def __init__(self, factor=0.5, cutoff_step_ratio=1.0, cutoff_step_index=None):
        super().__init__(cutoff_step_ratio=cutoff_step_ratio, cutoff_step_index=cutoff_step_index)
        self.factor, self.seen = factor, []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append((step_index, pipeline.num_timesteps, sorted(callback_kwargs)))
        if step_index == self.config.cutoff_step_index:
            callback_kwargs["latents"] = callback_kwargs["latents"] * self.factor
        return callback_kwargs


class PipelineTesterMixin:
    pipeline_class = None

    def get_dummy_components(self):
        raise NotImplementedError

    def get_dummy_inputs(self, seed=0, batch=1):
        raise NotImplementedError

    def latent_shape(self, batch=1):
        raise NotImplementedError

    def pipeline(self, **overrides):
        pipeline = self.pipeline_class(**{**self.get_dummy_components(), **overrides})
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def run(self, pipeline, **overrides):
        return pipeline(**{**self.get_dummy_inputs(), **overrides})

    def test_save_load_local_round_trip(self, tmp_path):
        pipeline = self.pipeline()
        reference = self.run(pipeline).images
        pipeline.save_pretrained(tmp_path)
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(self.run(loaded).images, reference)
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(pipeline.config)

    def test_save_load_variant_and_pickle_weights(self, tmp_path):
        pipeline = self.pipeline()
        reference = self.run(pipeline).images
        pipeline.save_pretrained(tmp_path / "variant", variant="fp16")
        assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
        loaded = self.pipeline_class.from_pretrained(tmp_path / "variant", variant="fp16")
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(self.run(loaded).images, reference)
        pipeline.save_pretrained(tmp_path / "pickle", safe_serialization=False)
        assert (tmp_path / "pickle" / "unet" / "diffusion_pytorch_model.bin").is_file()
        assert (tmp_path / "pickle" / "unet" / "unet_sr3.py").is_file()  # still the custom-code layout
        loaded = self.pipeline_class.from_pretrained(tmp_path / "pickle", use_safetensors=False)
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(self.run(loaded).images, reference)

    def test_from_pretrained_takes_diffusers_loading_options(self, tmp_path):
        pipeline = self.pipeline()
        reference = self.run(pipeline).images
        pipeline.save_pretrained(tmp_path)
        loaded = self.pipeline_class.from_pretrained(
            tmp_path,
            torch_dtype=torch.float32,
            variant=None,
            use_safetensors=True,
            low_cpu_mem_usage=True,
            device_map="cpu",
            revision=None,
            cache_dir=str(tmp_path / "cache"),
            local_files_only=True,
        )
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(self.run(loaded).images, reference)
        # Diffusers refuses it for the float32 level embeddings, blaming an argument the caller never gave.
        with pytest.raises(ValueError, match="low_cpu_mem_usage=False cannot load these UNets: .* in float32"):
            self.pipeline_class.from_pretrained(tmp_path, low_cpu_mem_usage=False)

    @needs_bfloat16_kernels
    def test_dtype(self, tmp_path):
        pipeline = self.pipeline()
        pipeline.save_pretrained(tmp_path)
        for loaded in (
            self.pipeline_class.from_pretrained(tmp_path, torch_dtype=torch.bfloat16),
            self.pipeline_class.from_pretrained(tmp_path, dtype={"unet": torch.bfloat16, "default": torch.float32}),
            self.pipeline().to(torch.bfloat16),
        ):
            loaded.set_progress_bar_config(disable=True)
            assert loaded.unet.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
            images = self.run(loaded, output_type="pt").images
            assert images.dtype == torch.float32 and torch.isfinite(images).all()

    def test_callback_function_sees_and_replaces_latents(self):
        pipeline = self.pipeline()
        seen = []

        def callback(pipe, step, timestep, tensors):
            seen.append((step, pipe.num_timesteps, tuple(tensors)))
            return {"latents": tensors["latents"] * 0} if step == STEPS - 1 else {}

        images = self.run(pipeline, output_type="pt", callback_on_step_end=callback).images
        assert seen == [(step, STEPS, ("latents",)) for step in range(STEPS)]
        torch.testing.assert_close(images, torch.full_like(images, 0.5))  # zero latents: mid-gray
        assert pipeline.num_timesteps == STEPS

    def test_pipeline_callback_objects(self):
        pipeline = self.pipeline()
        plain = self.run(pipeline, output_type="pt").images
        last = ScaleLatents(factor=0.0, cutoff_step_ratio=None, cutoff_step_index=STEPS - 1)
        images = self.run(pipeline, output_type="pt", callback_on_step_end=last).images
        assert last.seen == [(step, STEPS, ["latents"]) for step in range(STEPS)]
        torch.testing.assert_close(images, torch.full_like(images, 0.5))
        # Several callbacks run in order, each seeing what the previous one returned.
        first, second = ScaleLatents(2.0, None, 0), ScaleLatents(0.5, None, 0)
        both = self.run(pipeline, output_type="pt", callback_on_step_end=MultiPipelineCallbacks([first, second]))
        torch.testing.assert_close(both.images, plain, atol=1e-5, rtol=0)
        assert len(first.seen) == len(second.seen) == STEPS

    def test_interrupt_skips_the_remaining_steps(self):
        pipeline = self.pipeline()
        steps = []

        def stop_after_first(pipe, step, timestep, tensors):
            steps.append(step)
            pipe._interrupt = True
            return {}

        assert pipeline.interrupt is False
        self.run(pipeline, callback_on_step_end=stop_after_first)
        assert steps == [0] and pipeline.interrupt is True
        steps.clear()
        self.run(pipeline, callback_on_step_end=lambda *args: steps.append(args[1]) or {})
        assert steps == list(range(STEPS))  # a new call starts uninterrupted

    def test_generator_lists_make_images_independent_of_their_batch(self):
        pipeline = self.pipeline()
        generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
        inputs = {**self.get_dummy_inputs(batch=2), "generator": generators, "output_type": "pt"}
        batch = pipeline(**inputs).images
        assert batch.shape[0] == 2
        alone = self.run(pipeline, generator=torch.Generator().manual_seed(4), output_type="pt").images
        torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)
        assert (batch[0] - batch[1]).abs().max() > 1e-3

    def test_progress_bar_config(self, capsys):
        pipeline = self.pipeline()
        pipeline.set_progress_bar_config(disable=False, desc="refining")
        self.run(pipeline)
        err = capsys.readouterr().err
        assert "refining" in err and f"{STEPS}/{STEPS}" in err
        pipeline.set_progress_bar_config(disable=True)
        self.run(pipeline)
        assert capsys.readouterr().err == ""

    def test_given_latents_replace_the_drawn_noise(self):
        pipeline = self.pipeline(scheduler=make_scheduler("ddim", n_timestep=100))  # DDIM: no noise after the start
        reference = self.run(pipeline, output_type="pt").images
        latents = randn_tensor(self.latent_shape(), generator=torch.Generator().manual_seed(0))
        other_seed = torch.Generator().manual_seed(99)
        given = self.run(pipeline, latents=latents, generator=other_seed, output_type="pt").images
        torch.testing.assert_close(given, reference)
        different = self.run(pipeline, latents=torch.zeros_like(latents), output_type="pt").images
        assert (different - reference).abs().max() > 1e-3
        with pytest.raises(ValueError, match="latents have shape"):
            self.run(pipeline, latents=latents[:, :, :8])

    def test_return_dict_false(self):
        pipeline = self.pipeline()
        images, intermediates = self.run(pipeline, return_dict=False)
        np.testing.assert_array_equal(images, self.run(pipeline).images)
        assert intermediates is None


def _sr_components():
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    return {"unet": unet, "scheduler": make_scheduler("ddpm", n_timestep=100), "upscale_factor": 4}


class TestSR3Pipeline(PipelineTesterMixin):
    pipeline_class = SR3Pipeline

    def get_dummy_components(self):
        return _sr_components()

    def get_dummy_inputs(self, seed=0, batch=1):
        rng = np.random.default_rng(batch)
        images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(batch)]
        return {
            "image": images if batch > 1 else images[0],
            "num_inference_steps": STEPS,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "np",
        }

    def latent_shape(self, batch=1):
        return (batch, 3, 32, 32)

    def test_generator_lists_make_images_independent_of_their_batch(self):
        pipeline = self.pipeline()
        image = self.get_dummy_inputs()["image"]
        generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
        batch = self.run(pipeline, image=[image, image], generator=generators, output_type="pt").images
        alone = self.run(pipeline, generator=torch.Generator().manual_seed(4), output_type="pt").images
        torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)
        assert (batch[0] - batch[1]).abs().max() > 1e-3

    def test_a_callback_can_replace_the_condition(self):
        pipeline = self.pipeline()
        plain = self.run(pipeline, output_type="pt").images
        conditions = []

        def record(pipe, step, timestep, tensors):
            conditions.append(tensors["condition"])
            return {"condition": tensors["condition"]}

        same = self.run(
            pipeline, output_type="pt", callback_on_step_end=record, callback_on_step_end_tensor_inputs=["condition"]
        ).images
        torch.testing.assert_close(same, plain)  # handing the condition back unchanged changes nothing
        assert conditions[0].shape == (1, 3, 32, 32)
        conditions.clear()

        def blank_after_first_step(pipe, step, timestep, tensors):
            conditions.append(tensors["condition"].clone())
            return {"condition": torch.zeros_like(tensors["condition"])} if step == 0 else {}

        blanked = self.run(
            pipeline,
            output_type="pt",
            callback_on_step_end=blank_after_first_step,
            callback_on_step_end_tensor_inputs=["latents", "condition"],
        ).images
        assert (blanked - plain).abs().max() > 1e-4  # the later steps saw the replacement ...
        assert conditions[0].abs().max() > 0 and conditions[1].abs().max() == 0  # ... and so did the callback

    def test_latents_in_fidelity_mode(self):
        pipeline = self.pipeline(scheduler=make_scheduler("ddim", n_timestep=100, prediction_type="sample"))
        latents = randn_tensor(self.latent_shape(), generator=torch.Generator().manual_seed(0))
        reference = self.run(pipeline, mode="fidelity", output_type="pt").images
        other_seed = torch.Generator().manual_seed(5)
        given = self.run(pipeline, mode="fidelity", latents=latents, generator=other_seed, output_type="pt").images
        torch.testing.assert_close(given, reference)


class TestSR3UnconditionalPipeline(PipelineTesterMixin):
    pipeline_class = SR3UnconditionalPipeline

    def get_dummy_components(self):
        torch.manual_seed(0)
        unet = SR3UNet2DModel(
            in_channels=3,
            block_out_channels=8,
            channel_multipliers=(1, 2),
            attention_resolutions=(8,),
            norm_groups=4,
            sample_size=16,
        ).eval()
        return {"unet": unet, "scheduler": make_scheduler("ddpm", n_timestep=50)}

    def get_dummy_inputs(self, seed=0, batch=1):
        return {
            "batch_size": batch,
            "num_inference_steps": STEPS,
            "generator": torch.Generator().manual_seed(seed),
            "output_type": "np",
        }

    def latent_shape(self, batch=1):
        return (batch, 3, 16, 16)
