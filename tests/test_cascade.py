"""SR3CascadePipeline and noise-conditioning augmentation."""

import copy
import dataclasses
import json
import os
import pickle
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_sr3 import (
    SR3CascadePipeline,
    SR3Pipeline,
    SR3UnconditionalPipeline,
    SR3UNet2DModel,
    make_scheduler,
)
from diffusers_sr3.backends import swap_unet
from diffusers_sr3.noise import augment_condition, training_betas
from diffusers_sr3.training.objective import diffusion_loss, noise_batch, predict


def unet(in_channels, sample_size, **overrides):
    torch.manual_seed(0)
    config = dict(
        in_channels=in_channels,
        block_out_channels=8,
        channel_multipliers=(1, 2),
        layers_per_block=1,
        attention_resolutions=(),
        mid_attention=False,
        norm_groups=4,
        sample_size=sample_size,
    )
    config.update(overrides)
    return SR3UNet2DModel(**config).eval()


def faces_cascade():
    """Three tiny stages shaped like the paper's: 64x64 generator, 64->256, 256->1024."""
    base = SR3UnconditionalPipeline(unet(3, 64, mid_attention=True), make_scheduler("ddim", n_timestep=50))
    stage_1 = SR3Pipeline(
        unet(6, 256, condition_noise_embedding=True),
        make_scheduler("dpmsolver", n_timestep=50),
        upscale_factor=4,
        condition_noise_level=0.1,
    )
    stage_2 = SR3Pipeline(unet(6, 1024), make_scheduler("ddim", n_timestep=50), upscale_factor=4)
    cascade = SR3CascadePipeline.from_stages(base, [stage_1, stage_2])
    cascade.set_progress_bar_config(disable=True)
    return cascade


@pytest.mark.slow
def test_three_stage_cascade_makes_a_1024_image_and_round_trips(tmp_path):
    cascade = faces_cascade()
    output = cascade(
        num_inference_steps=[2, 2, 1],
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        return_all_stages=True,
    )
    assert output.images.shape == (1, 3, 1024, 1024)
    assert [tuple(stage.shape[-2:]) for stage in output.stage_images] == [(64, 64), (256, 256), (1024, 1024)]
    assert torch.isfinite(output.images).all()

    cascade.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == ["pipeline_sr3_cascade", "SR3CascadePipeline"]
    assert index["stage_1"] == ["pipeline_sr3", "SR3Pipeline"] and index["stage_3"] == [None, None]
    assert (tmp_path / "stage_2" / "unet" / "unet_sr3.py").exists()
    for loaded in (
        SR3CascadePipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True),
    ):
        assert type(loaded) is SR3CascadePipeline and loaded.stage_3 is None
        assert loaded.stage_1.config.condition_noise_level == 0.1
        assert type(loaded.stage_1.scheduler).__name__ == "DPMSolverMultistepScheduler"
        loaded.set_progress_bar_config(disable=True)
        # From a user's image: the generator is skipped; only the first SR stage, to keep this fast.
        small = SR3CascadePipeline.from_stages(None, [loaded.stage_1])
        small.set_progress_bar_config(disable=True)
        reference = SR3CascadePipeline.from_stages(None, [cascade.stage_1])
        reference.set_progress_bar_config(disable=True)
        start = output.stage_images[0]
        ours = small(image=start, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt")
        theirs = reference(
            image=start, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt"
        )
        torch.testing.assert_close(ours.images, theirs.images)
    # A dtype by stage, as Diffusers takes one by component.
    mixed = SR3CascadePipeline.from_pretrained(tmp_path, dtype={"stage_1": torch.bfloat16, "default": torch.float32})
    assert mixed.stage_1.unet.conv_in.weight.dtype == torch.bfloat16
    assert mixed.base.unet.conv_in.weight.dtype == mixed.stage_2.unet.conv_in.weight.dtype == torch.float32
    nested = SR3CascadePipeline.from_pretrained(tmp_path, dtype={"stage_2": {"unet": torch.bfloat16}})
    assert nested.stage_2.unet.conv_in.weight.dtype == torch.bfloat16
    assert nested.stage_1.unet.conv_in.weight.dtype == torch.float32
    # Keyed by the stages' own components: every stage's.
    by_component = SR3CascadePipeline.from_pretrained(tmp_path, dtype={"unet": torch.bfloat16})
    assert by_component.base.unet.conv_in.weight.dtype == by_component.stage_2.unet.conv_in.weight.dtype
    assert by_component.stage_1.unet.conv_in.weight.dtype == torch.bfloat16


def test_cascade_starts_from_an_image_and_checks_its_arguments():
    base = SR3UnconditionalPipeline(unet(3, 16), make_scheduler("ddim", n_timestep=50))
    stage = SR3Pipeline(unet(6, 32), make_scheduler("ddim", n_timestep=50), upscale_factor=2)
    cascade = SR3CascadePipeline.from_stages(base, [stage, stage])
    cascade.set_progress_bar_config(disable=True)
    images = cascade(image=torch.rand(2, 3, 8, 8), num_inference_steps=[1, 1], output_type="np").images
    assert images.shape == (2, 32, 32, 3)
    generated = cascade(batch_size=1, num_inference_steps=1, output_type="pt").images
    assert generated.shape == (1, 3, 64, 64)
    # Steps left unset: each SR stage samples with its own detail settings.
    own = SR3Pipeline(stage.unet, stage.scheduler, upscale_factor=2, detail_steps=3)
    evaluations = []
    hook = stage.unet.register_forward_hook(lambda module, args, output: evaluations.append(1))
    SR3CascadePipeline.from_stages(None, [own])(image=torch.rand(1, 3, 8, 8))
    hook.remove()
    assert len(evaluations) == 3
    with pytest.raises(ValueError, match="2 entries for 3 stages"):
        cascade(num_inference_steps=[1, 1])
    with pytest.raises(ValueError, match=r"base: num_inference_steps must lie in \[1, 50\], got 0"):
        cascade(num_inference_steps=[0, 1, 1])  # the base generator too, not its default of 100 steps
    with pytest.raises(ValueError, match="no base generator"):
        SR3CascadePipeline.from_stages(None, [stage])()
    with pytest.raises(ValueError, match="without gaps"):
        SR3CascadePipeline(stage_2=stage)
    with pytest.raises(TypeError, match="stage_1 must be an SR3Pipeline"):
        SR3CascadePipeline(stage_1=base)
    with pytest.raises(ValueError, match="at most 4"):
        SR3CascadePipeline.from_stages(None, [stage] * 5)


def test_noise_conditioning_augmentation_in_the_model_and_sampling():
    model = unet(6, 32, condition_noise_embedding=True)
    sample = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        clean = model(sample, 0.5).sample
        explicit_clean = model(sample, 0.5, condition_noise_level=0.0).sample
        noisy = model(sample, 0.5, condition_noise_level=torch.tensor([0.3, 0.3])).sample
    torch.testing.assert_close(clean, explicit_clean)
    assert (clean - noisy).abs().max() > 1e-4  # the level reaches the network
    with pytest.raises(ValueError, match="no condition_noise_embedding"):
        unet(6, 32)(sample, 0.5, condition_noise_level=0.2)

    pipeline = SR3Pipeline(model, make_scheduler("ddim", n_timestep=50), upscale_factor=2, condition_noise_level=0.2)
    pipeline.set_progress_bar_config(disable=True)
    seen = []
    original_forward = model.forward
    model.forward = lambda *args, **kwargs: (
        seen.append(kwargs["condition_noise_level"]) or original_forward(*args, **kwargs)
    )
    image = torch.rand(3, 16, 16)
    pipeline(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pipeline(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), condition_noise_level=0.0)
    assert seen == [0.2, 0.2, 0.0, 0.0]
    plain = SR3Pipeline(unet(6, 32), make_scheduler("ddim", n_timestep=50), upscale_factor=2)
    with pytest.raises(ValueError, match="needs a UNet trained with condition_noise_embedding"):
        plain(image, num_inference_steps=1, condition_noise_level=0.3)


def test_noise_conditioning_augmentation_in_training():
    model = unet(6, 32, condition_noise_embedding=True).train()
    betas = training_betas(make_scheduler("ddpm", n_timestep=50))
    target, condition = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    batch = noise_batch(model, betas, target, condition, condition_noise_max=0.5, generator=generator)
    levels = batch.condition_noise_level
    assert levels.shape == (4,) and torch.all((levels >= 0) & (levels < 0.5)) and levels.std() > 0
    # The condition the network sees is the augmented one.
    assert not torch.allclose(batch.network_input[:, :3], condition)
    # The network is told each sample's condition noise level (a clean condition is level 0, not these).
    prediction = predict(model, batch)
    told_clean = predict(model, dataclasses.replace(batch, condition_noise_level=torch.zeros(4)))
    assert not torch.allclose(prediction, told_clean)
    loss = diffusion_loss(prediction, batch)
    loss.backward()
    assert model.condition_noise_level_embedding.linear_1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="condition_noise_max needs"):
        noise_batch(unet(6, 32), betas, target, condition, condition_noise_max=0.5)


def test_augment_condition_keeps_variance_and_checks_levels():
    condition = torch.randn(1, 1, 64, 64)
    augmented = augment_condition(condition, 0.6, generator=torch.Generator().manual_seed(0))
    condition, augmented = condition.flatten(), augmented.flatten()
    assert abs(augmented.std().item() - 1.0) < 0.05
    correlation = torch.corrcoef(torch.stack([condition, augmented]))[0, 1]
    assert abs(correlation.item() - 0.8) < 0.03  # sqrt(1 - 0.6^2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        augment_condition(condition, 1.0)


def test_training_with_noise_conditioning_augmentation(tmp_path):
    from test_data import make_image_folder
    from test_training import fast_options

    from diffusers_sr3.training import TrainingConfig, train

    data = make_image_folder(tmp_path / "images", count=4)
    output = train(
        TrainingConfig(
            train_data_dir=str(data),
            **fast_options(tmp_path / "out", condition_noise_max=0.3, condition_noise_level=0.1, lr_blur_sigma=0.5),
        )
    )
    pipeline = SR3Pipeline.from_pretrained(output)
    assert pipeline.unet.config.condition_noise_embedding and pipeline.config.condition_noise_level == 0.1
    assert pipeline.unet.condition_noise_level_embedding is not None
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        TrainingConfig(**fast_options(tmp_path / "bad", condition_noise_max=1.5))


def test_cascade_tiles_large_stages_when_asked():
    """With a tile size, SR stages refine in overlapping tiles; on a deterministic sampler the result matches."""
    stage = SR3Pipeline(unet(6, 32), make_scheduler("ddim", n_timestep=50), upscale_factor=4)
    cascade = SR3CascadePipeline.from_stages(None, [stage])
    cascade.set_progress_bar_config(disable=True)
    image = torch.linspace(0, 1, 3 * 16 * 16).reshape(3, 16, 16)
    whole = cascade(image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    tiled = cascade(
        image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", tile_size=32
    )
    assert tiled.images.shape == whole.images.shape == (1, 3, 64, 64)
    assert (tiled.images - whole.images).abs().mean() < 0.05  # a smooth input: tiles agree with the whole


def small_cascade():
    base = SR3UnconditionalPipeline(unet(3, 16), make_scheduler("ddim", n_timestep=50))
    stage_1 = SR3Pipeline(unet(6, 32), make_scheduler("ddim", n_timestep=50), upscale_factor=2)
    stage_2 = SR3Pipeline(
        unet(6, 64, condition_noise_embedding=True),
        make_scheduler("ddim", n_timestep=50),
        upscale_factor=2,
        condition_noise_level=0.1,
    )
    cascade = SR3CascadePipeline.from_stages(base, [stage_1, stage_2])
    cascade.set_progress_bar_config(disable=True)
    return cascade


def run_cascade(cascade, **kwargs):
    return cascade(num_inference_steps=[1, 2, 1], generator=torch.Generator().manual_seed(0), **kwargs).images


def test_cascade_reports_the_device_and_dtype_of_its_stages():
    cascade = small_cascade()
    assert cascade.device.type == "cpu" and cascade.dtype == torch.float32
    cascade.to(torch.bfloat16)
    assert cascade.dtype == torch.bfloat16
    cascade.to("meta")  # any device that is not the CPU: the cascade must report it, not a default
    assert cascade.device.type == "meta" and cascade.stage_2.unet.device.type == "meta"


def test_cascade_model_cpu_offload_across_stages():
    cascade = small_cascade()
    reference = run_cascade(cascade, output_type="pt")
    cascade.enable_model_cpu_offload(device="cpu")
    for pipeline in (cascade.base, cascade.stage_1, cascade.stage_2):
        assert hasattr(pipeline.unet, "_hf_hook")  # accelerate's offload hook on every stage's network
    torch.testing.assert_close(run_cascade(cascade, output_type="pt"), reference)
    assert cascade._execution_device.type == "cpu"
    cascade.remove_all_hooks()


def test_cascade_hands_tensors_between_stages_without_a_cpu_round_trip(monkeypatch):
    """Stage outputs stay on the stages' device: nothing calls `.cpu()` between stages (only the final `"np"`)."""
    cascade = small_cascade()
    reference = run_cascade(cascade, output_type="pt")
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        if self.ndim == 4:  # images; the schedule's few step values are read on the host once per stage
            calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    torch.testing.assert_close(run_cascade(cascade, output_type="pt"), reference)
    image = torch.rand(1, 3, 8, 8)
    cascade(image=image, num_inference_steps=[1, 1], output_type="pt")
    assert calls == []
    run_cascade(cascade, output_type="np")
    assert calls == [(1, 64, 64, 3)]  # the final conversion to numpy only


def counting_evaluations(cascade):
    """A list that grows by one at every network evaluation of any of the cascade's pipelines."""
    evaluations = []
    for pipeline in cascade._pipelines():
        pipeline.unet.register_forward_hook(lambda module, args, output: evaluations.append(1))
    return evaluations


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_inference_steps=[1, 1, 0]), r"stage_2: num_inference_steps must lie in \[1, 50\], got 0"),
        (dict(num_inference_steps=[1, 1, 100]), r"stage_2: num_inference_steps must lie in \[1, 50\], got 100"),
        (dict(num_inference_steps=[1, 1.5, 1]), "stage_1: num_inference_steps must be an integer, got 1.5"),
        (dict(num_inference_steps=[1, 1, "2"]), "stage_2: num_inference_steps must be an integer, got '2'"),
        (dict(condition_noise_level=[0.2, None]), "stage_1: condition_noise_level needs a UNet trained with"),
        (dict(condition_noise_level=[None, 1.5]), r"stage_2: condition noise levels must lie in \[0, 1\), got 1.5"),
        (dict(condition_noise_level=1.0), r"stage_2: condition noise levels must lie in \[0, 1\)"),
        (dict(tile_size=5), "stage_1: tile_size 5 is not a positive multiple"),
        (dict(mode=[None, "sharp"]), "stage_2: mode must be 'detail' or 'fidelity', got 'sharp'"),
        (dict(mode="fidelity"), "stage_1: fidelity mode needs a model that predicts the clean image"),
        (dict(eta=[None, 1.5]), r"stage_2: eta must lie in \[0, 1\]"),
        (dict(strength=0), r"stage_1: strength must lie in \(0, 1\], got 0"),
        # The model's refusal, not "give more steps", which would only lead to it.
        (dict(strength=[0.5, None]), "stage_1: strength below 1 needs a model that predicts the clean image"),
        (dict(guidance_scale=[1, 2]), "stage_2: guidance_scale 2 needs a guidance_unet"),
        (dict(mode="fidelity", temperature=0.5), "stage_1: .* apply to detail mode"),
        (dict(eta=[0.1, 0.2, 0.3]), "eta has 3 entries for 2 stages"),
    ],
)
def test_cascade_checks_every_stage_before_any_work(arguments, message):
    cascade = small_cascade()
    evaluations = counting_evaluations(cascade)
    arguments = {"num_inference_steps": [1, 1, 1], **arguments}
    with pytest.raises(ValueError, match=message):
        cascade(output_type="pt", **arguments)
    assert evaluations == []  # not the generator, nor an earlier stage


def test_cascade_gives_one_condition_noise_level_to_the_stages_trained_with_it():
    cascade = small_cascade()  # stage_1 without condition_noise_embedding, stage_2 with it
    levels = []
    for stage in cascade.stages:
        stage.unet.register_forward_hook(
            lambda module, args, kwargs, output: levels.append(kwargs.get("condition_noise_level")), with_kwargs=True
        )
    images = cascade(num_inference_steps=[1, 1, 1], condition_noise_level=0.3, output_type="pt").images
    assert images.shape == (1, 3, 64, 64)
    assert levels == [None, 0.3]
    cascade.stage_2.unet.register_to_config(condition_noise_embedding=False)
    with pytest.raises(ValueError, match=r"^base: num_inference_steps must lie in \[1, 50\], got 100$"):
        cascade()  # the generator's default step count, checked before any stage runs
    with pytest.raises(ValueError, match="condition_noise_level 0.3 needs an SR stage trained with"):
        cascade(num_inference_steps=[1, 1, 1], condition_noise_level=0.3)
    # 0 is no augmentation, which a stage without the embedding takes (as it did before levels were given per stage).
    assert cascade(num_inference_steps=[1, 1, 1], condition_noise_level=0.0, output_type="pt").images.shape[-1] == 64


def test_cascade_passes_per_stage_call_arguments(monkeypatch):
    cascade = small_cascade()
    calls = []
    original = SR3Pipeline.__call__

    def recording(stage, *args, **kwargs):
        calls.append({key: kwargs.get(key) for key in ("mode", "eta", "temperature", "strength", "guidance_scale")})
        return original(stage, *args, **kwargs)

    monkeypatch.setattr(SR3Pipeline, "__call__", recording)
    evaluations = counting_evaluations(cascade)
    cascade(num_inference_steps=np.array([1, 2, 3]), eta=[0.5, None], temperature=0.9, output_type="pt")
    assert len(evaluations) == 1 + 2 + 3  # a numpy array gives one step count per stage
    assert calls == [
        dict(mode=None, eta=0.5, temperature=0.9, strength=None, guidance_scale=None),
        dict(mode=None, eta=None, temperature=0.9, strength=None, guidance_scale=None),  # None: the stage's default
    ]
    calls.clear()
    cascade(image=torch.rand(1, 3, 16, 16), num_inference_steps=[1, 1], mode=["detail", "detail"], strength=1)
    assert [call["mode"] for call in calls] == ["detail", "detail"] and calls[0]["strength"] == 1


def test_from_stages_takes_one_stage_or_any_iterable():
    stages = small_cascade().stages
    assert SR3CascadePipeline.from_stages(None, stages[0]).stages == [stages[0]]
    assert SR3CascadePipeline.from_stages(None, (stage for stage in stages)).stages == stages
    for bad in (None, 3, "stage_1"):
        with pytest.raises(TypeError, match="stages must be an SR3Pipeline or an iterable of them"):
            SR3CascadePipeline.from_stages(None, bad)


@pytest.mark.parametrize("copied", [None, copy.deepcopy, lambda cascade: pickle.loads(pickle.dumps(cascade))])
def test_a_block_on_one_stage_and_a_cascade_call_in_two_threads_do_not_wait_for_each_other(copied):
    # Thread A's cascade call is in stage_1 when thread B holds a block on stage_2 and calls the cascade: with a lock
    # per pipeline, A (holding the cascade's) waits for stage_2's and B (holding stage_2's) for the cascade's. A copy
    # is not built by __init__, and must share its lock too.
    cascade = small_cascade() if copied is None else copied(small_cascade())
    image = torch.rand(1, 3, 8, 8)
    b_trying, errors = threading.Event(), []

    def in_stage_1(module, args, output):
        b_trying.wait(5)
        time.sleep(0.2)  # B now tries for the lock

    hook = cascade.stage_1.unet.register_forward_hook(in_stage_1)

    def thread_a():
        try:
            cascade(image=image, num_inference_steps=1, output_type="pt")
        except Exception as error:
            errors.append(error)

    def thread_b():
        try:
            b_trying.set()
            with swap_unet(cascade.stage_2, cascade.stage_2.unet):
                hook.remove()
                cascade(image=image, num_inference_steps=1, output_type="pt")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=thread_a, daemon=True), threading.Thread(target=thread_b, daemon=True)]
    threads[0].start()
    threads[1].start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    assert not errors, errors


@pytest.mark.parametrize("steps", [1.5, "2", np.array([1, 2])])
def test_single_pipelines_refuse_steps_that_are_not_integers(steps):
    cascade = small_cascade()
    with pytest.raises(ValueError, match="num_inference_steps must be an integer, got"):
        cascade.stage_1(torch.rand(1, 3, 8, 8), num_inference_steps=steps)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer, got"):
        cascade.base(num_inference_steps=steps)
    images = cascade.base(num_inference_steps=np.int64(1), output_type="pt").images  # numpy integers are integers
    assert images.shape == (1, 3, 16, 16)
    images = cascade.stage_1(torch.rand(1, 3, 8, 8), num_inference_steps=2.0, output_type="pt").images  # so is 2.0
    assert images.shape == (1, 3, 16, 16)


def test_a_cascade_fidelity_stage_does_not_depend_on_the_seed():
    noised = SR3Pipeline(
        unet(6, 32, condition_noise_embedding=True),
        make_scheduler("ddim", n_timestep=50, prediction_type="sample", clip_sample=False),
        upscale_factor=2,
        condition_noise_level=0.1,
    )
    detail = SR3Pipeline(unet(6, 64), make_scheduler("ddim", n_timestep=50), upscale_factor=2)
    cascade = SR3CascadePipeline.from_stages(None, [noised, detail])
    cascade.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def stages(seed):
        generator = torch.Generator().manual_seed(seed)
        call = dict(mode=["fidelity", "detail"], num_inference_steps=[1, 1], output_type="pt", return_all_stages=True)
        return cascade(image=image, generator=generator, **call).stage_images

    one, two = stages(1), stages(2)
    assert torch.equal(one[0], two[0])  # the fidelity stage, seed-independent
    assert not torch.equal(one[1], two[1])  # the detail stage after it still follows the seed
    # ... with the draws it had before fidelity mode stopped using the generator: the fidelity stage still draws its
    # condition noise from it (left unused) and its starting noise, as it did.
    generator = torch.Generator().manual_seed(1)
    for _ in ("condition noise", "starting noise"):
        torch.randn(1, 3, 32, 32, generator=generator)
    alone = detail(one[0], generator=generator, num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(one[1], alone, rtol=0, atol=1e-6)


def test_a_resave_over_a_stage_linked_to_a_read_only_copy_replaces_the_link(tmp_path, monkeypatch):
    """A cascade folder whose stage is a link to a read-only copy (another user's, or a shared one): the save replaces
    the link with the new stage and writes nothing through it, so the copy's read-only folders must not refuse it."""
    base = SR3UnconditionalPipeline(unet(3, 16), make_scheduler("ddim", n_timestep=50))
    cascade = SR3CascadePipeline.from_stages(base, [SR3Pipeline(unet(6, 64), make_scheduler("ddim"), upscale_factor=4)])
    copy_folder, target = tmp_path / "read-only copy", tmp_path / "mine"
    cascade.save_pretrained(copy_folder)
    cascade.save_pretrained(target)
    shutil.rmtree(target / "stage_1")
    (target / "stage_1").symlink_to(copy_folder / "stage_1", target_is_directory=True)
    before = {path: path.read_bytes() for path in copy_folder.rglob("*") if path.is_file()}
    real_access = os.access

    def access(path, mode, **kwargs):  # the copy's folders are read-only, for root too
        inside = os.path.realpath(path).startswith(str(copy_folder.resolve()))
        return not (inside and mode & os.W_OK) and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    cascade.save_pretrained(target)
    assert not (target / "stage_1").is_symlink() and (target / "stage_1" / "unet" / "config.json").is_file()
    assert {path: path.read_bytes() for path in copy_folder.rglob("*") if path.is_file()} == before
    SR3CascadePipeline.from_pretrained(target)
