"""Autoguidance: a weaker model of the same task (`guidance_unet`) guides detail mode, saved with the pipeline."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import needs_bfloat16_kernels
from test_quality_recipe import ConstantNetwork, RecordingNetwork, bicubic_of, lowres_unet

from diffusers_sr3 import SR3Pipeline, make_scheduler
from diffusers_sr3.backends import AutocastUNet, use_backend
from diffusers_sr3.cli import main
from diffusers_sr3.pipelines.base import guided_prediction
from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS, evaluations_per_crop
from diffusers_sr3.tiling import TiledNetwork, tiled_unet


def guided_pipeline(guidance_scale=2.0, seed=1, **overrides):
    """A residual, clean-image-predicting pipeline whose guide is the same architecture with other weights."""
    torch.manual_seed(seed)
    guide = lowres_unet()
    for parameter in guide.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    schedule = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    options = dict(residual=True, residual_scale=8.0, guidance_unet=guide, guidance_scale=guidance_scale)
    pipeline = SR3Pipeline(unet=lowres_unet(), scheduler=schedule, **{**options, **overrides})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, image, **options):
    options = {"num_inference_steps": 4, "eta": 1.0, **options}
    return pipeline(image, generator=torch.Generator().manual_seed(0), output_type="pt", **options).images


def test_each_step_extrapolates_the_prediction_away_from_the_guide():
    image = torch.rand(1, 3, 8, 8)
    pipeline = guided_pipeline()
    unet, guide = ConstantNetwork(pipeline.unet, 0.8), ConstantNetwork(pipeline.guidance_unet, 0.2)
    vars(pipeline).update(unet=unet, guidance_unet=guide)
    # Deterministic DDIM with a constant clean-image prediction ends at that prediction: 0.2 + 2 x (0.8 - 0.2).
    result = sample(pipeline, image, eta=0.0)
    assert torch.allclose(result, (bicubic_of(image) + 1.4 / 8 / 2).clamp(0, 1), atol=1e-6)
    assert len(unet.levels) == len(guide.levels) == 4 and unet.levels == guide.levels
    # A scale of 0 is the guide alone; a call's scale overrides the pipeline's.
    result = sample(pipeline, image, eta=0.0, guidance_scale=0.0)
    assert torch.allclose(result, (bicubic_of(image) + 0.2 / 8 / 2).clamp(0, 1), atol=1e-6)


def test_the_parallel_weight_scales_only_the_update_along_the_prediction():
    torch.manual_seed(0)
    prediction, guide = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    # Weight 1 is plain autoguidance, to the bit.
    assert torch.equal(guided_prediction(prediction, guide, 3.0, 1.0), guide + 3.0 * (prediction - guide))
    # Per image, the update splits into a multiple of the prediction and a rest orthogonal to it.
    dot = lambda a, b: (a * b).sum((1, 2, 3))  # noqa: E731
    update = prediction - guide
    along = (dot(update, prediction) / dot(prediction, prediction)).view(2, 1, 1, 1) * prediction
    perpendicular = guided_prediction(prediction, guide, 3.0, 0.0) - prediction
    assert dot(perpendicular, prediction).abs().max() < 1e-3
    torch.testing.assert_close(perpendicular, 2.0 * (update - along))
    torch.testing.assert_close(
        guided_prediction(prediction, guide, 3.0, 0.25), prediction + 2.0 * (update - 0.75 * along)
    )
    # An all-zero prediction has no direction: the update stays whole.
    zero = torch.zeros(1, 3, 8, 8)
    torch.testing.assert_close(guided_prediction(zero, guide[:1], 3.0, 0.0), -2.0 * guide[:1])


def test_the_parallel_weight_steers_every_guided_step_and_is_saved(tmp_path):
    image = torch.rand(1, 3, 8, 8)
    pipeline = guided_pipeline(parallel_guidance_weight=0.5)
    vars(pipeline).update(
        unet=ConstantNetwork(pipeline.unet, 0.8), guidance_unet=ConstantNetwork(pipeline.guidance_unet, 0.2)
    )
    # A constant update along a constant prediction is all parallel: 0.8 + (2 - 1) x 0.5 x 0.6 at each step, and
    # deterministic DDIM ends at the prediction; weight 0 is the UNet alone, a call's weight overrides the saved one.
    for weight, expected in ((None, 1.1), (0.0, 0.8), (1.0, 1.4)):
        result = sample(pipeline, image, eta=0.0, parallel_guidance_weight=weight)
        assert torch.allclose(result, (bicubic_of(image) + expected / 8 / 2).clamp(0, 1), atol=1e-6)
    saved = guided_pipeline(parallel_guidance_weight=0.5)
    expected = sample(saved, image, guidance_scale=3.0)
    assert not torch.equal(expected, sample(saved, image, guidance_scale=3.0, parallel_guidance_weight=1.0))
    saved.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text(encoding="utf-8"))
    assert index["parallel_guidance_weight"] == 0.5
    loaded = SR3Pipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.detail_settings()["parallel_guidance_weight"] == 0.5
    assert torch.equal(sample(loaded, image, guidance_scale=3.0), expected)
    # Folders saved before the key existed guide as before: weight 1.
    del index["parallel_guidance_weight"]
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    assert SR3Pipeline.from_pretrained(tmp_path / "model").config.parallel_guidance_weight == 1.0


def test_scale_one_never_runs_the_guide_and_a_guide_equal_to_the_unet_changes_nothing():
    image = torch.rand(1, 3, 8, 8)
    pipeline = guided_pipeline()
    plain = SR3Pipeline(pipeline.unet, pipeline.scheduler, residual=True, residual_scale=8.0)
    plain.set_progress_bar_config(disable=True)
    calls = []
    pipeline.guidance_unet.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(sample(pipeline, image, guidance_scale=1.0), sample(plain, image))
    assert not calls
    guided = sample(pipeline, image)
    assert len(calls) == 4 and not torch.equal(guided, sample(plain, image))
    # g + w (u - g) is u when the guide is the UNet itself.
    same = guided_pipeline(guidance_scale=3.0)
    same.guidance_unet.load_state_dict(same.unet.state_dict())
    assert torch.equal(sample(same, image), sample(plain, image))


@pytest.mark.parametrize("steps, strength", [(5, 1.0), (10, 0.3)])
def test_evaluations_per_crop_counts_the_guide(steps, strength):
    pipeline = guided_pipeline()
    unet = RecordingNetwork(pipeline.unet, 0.5)
    guide = RecordingNetwork(pipeline.guidance_unet, 0.1)
    vars(pipeline).update(unet=unet, guidance_unet=guide)
    sample(pipeline, torch.rand(1, 3, 8, 8), num_inference_steps=steps, strength=strength)
    # The fidelity answer that a strength below 1 starts from is unguided.
    refinement = steps if strength == 1 else len(unet.levels) - FIDELITY_STEPS
    assert len(guide.levels) == refinement
    total = len(unet.levels) + len(guide.levels)
    assert total == evaluations_per_crop("detail", steps, strength, pipeline.scheduler, guided=True)
    assert pipeline.guided() and not pipeline.guided(1.0)


def test_fidelity_mode_is_unguided():
    image = torch.rand(1, 3, 8, 8)
    pipeline = guided_pipeline()
    calls = []
    pipeline.guidance_unet.register_forward_hook(lambda *args: calls.append(1))
    plain = SR3Pipeline(pipeline.unet, pipeline.scheduler, residual=True, residual_scale=8.0)
    plain.set_progress_bar_config(disable=True)
    fidelity = pipeline(image, mode="fidelity", output_type="pt").images
    assert torch.equal(fidelity, plain(image, mode="fidelity", output_type="pt").images) and not calls
    with pytest.raises(ValueError, match="guidance_scale, parallel_guidance_weight and window_size apply to detail"):
        pipeline(image, mode="fidelity", guidance_scale=2.0)
    with pytest.raises(ValueError, match="parallel_guidance_weight and window_size apply to detail mode"):
        pipeline(image, mode="fidelity", parallel_guidance_weight=0.0)


def test_bad_guidance_is_refused_with_the_reason():
    pipeline = guided_pipeline()
    unet, scheduler = pipeline.unet, pipeline.scheduler
    with pytest.raises(ValueError, match="needs a guidance_unet"):
        SR3Pipeline(unet, scheduler, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs a guidance_unet"):
        SR3Pipeline(unet, scheduler)(torch.rand(1, 3, 8, 8), guidance_scale=2.0)
    with pytest.raises(ValueError, match="at least 0"):
        sample(pipeline, torch.rand(1, 3, 8, 8), guidance_scale=-1.0)
    with pytest.raises(ValueError, match="parallel_guidance_weight must be at least 0"):
        sample(pipeline, torch.rand(1, 3, 8, 8), parallel_guidance_weight=-0.5)
    with pytest.raises(ValueError, match="parallel_guidance_weight 0.5 needs a guidance_unet"):
        SR3Pipeline(unet, scheduler, parallel_guidance_weight=0.5)
    epsilon = make_scheduler("ddim", n_timestep=100, prediction_type="epsilon")
    with pytest.raises(ValueError, match="needs a model that predicts it .*predicts 'epsilon'"):
        SR3Pipeline(unet, epsilon, guidance_unet=pipeline.guidance_unet, guidance_scale=2.0, parallel_guidance_weight=0)
    plain_epsilon = SR3Pipeline(unet, epsilon, guidance_unet=pipeline.guidance_unet, guidance_scale=2.0)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        plain_epsilon(torch.rand(1, 3, 8, 8), parallel_guidance_weight=0.0)
    # Without a guide, that it needs one comes first: a model that predicts the clean image would need one too.
    with pytest.raises(ValueError, match="parallel_guidance_weight 0.5 needs a guidance_unet"):
        SR3Pipeline(unet, epsilon)(torch.rand(1, 3, 8, 8), parallel_guidance_weight=0.5)
    with pytest.raises(ValueError, match="parallel_guidance_weight 0.5 needs a guidance_unet"):
        SR3Pipeline(unet, epsilon).check_arguments(parallel_guidance_weight=0.5)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        plain_epsilon.check_arguments(parallel_guidance_weight=0.0)
    with pytest.raises(ValueError, match="in_channels=7 where the unet has 6"):
        SR3Pipeline(unet, scheduler, guidance_unet=lowres_unet(in_channels=7, out_channels=4))
    with pytest.raises(ValueError, match="downsampling factor"):
        SR3Pipeline(unet, scheduler, guidance_unet=lowres_unet(factor=2))
    with pytest.raises(ValueError, match="conditioning_type"):
        SR3Pipeline(unet, scheduler, guidance_unet=lowres_unet(conditioning_type="timestep"))
    # A guide that takes (or lacks) the condition's noise level would read the augmented condition otherwise.
    with pytest.raises(ValueError, match="condition_noise_embedding=True where the unet has False"):
        SR3Pipeline(unet, scheduler, guidance_unet=lowres_unet(condition_noise_embedding=True))


def test_the_guide_and_its_scale_are_saved_with_the_pipeline_and_older_folders_still_load(tmp_path):
    from diffusers import DiffusionPipeline

    image = torch.rand(1, 3, 8, 8)
    pipeline = guided_pipeline(guidance_scale=2.5)
    expected = sample(pipeline, image)
    pipeline.save_pretrained(tmp_path / "guided")
    index = json.loads((tmp_path / "guided" / "model_index.json").read_text(encoding="utf-8"))
    assert index["guidance_unet"] == ["unet_sr3", "SR3UNet2DModel"] and index["guidance_scale"] == 2.5
    assert (tmp_path / "guided" / "guidance_unet" / "diffusion_pytorch_model.safetensors").is_file()
    for loaded in (
        SR3Pipeline.from_pretrained(tmp_path / "guided"),
        DiffusionPipeline.from_pretrained(tmp_path / "guided", trust_remote_code=True),
    ):
        loaded.set_progress_bar_config(disable=True)
        assert loaded.config.guidance_scale == 2.5
        assert torch.equal(sample(loaded, image), expected)

    # A folder written before guidance existed names neither: no guide, scale 1.
    plain = SR3Pipeline(pipeline.unet, pipeline.scheduler, residual=True, residual_scale=8.0)
    plain.save_pretrained(tmp_path / "plain")
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text(encoding="utf-8"))
    assert index.pop("guidance_unet") == [None, None]
    del index["guidance_scale"]
    (tmp_path / "plain" / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    for loaded in (
        SR3Pipeline.from_pretrained(tmp_path / "plain"),
        DiffusionPipeline.from_pretrained(tmp_path / "plain", trust_remote_code=True),
    ):
        assert loaded.guidance_unet is None and loaded.config.guidance_scale == 1.0 and not loaded.guided()
    # A guide can be attached to a saved model at load time.
    attached = SR3Pipeline.from_pretrained(tmp_path / "plain", guidance_unet=pipeline.guidance_unet, guidance_scale=2.5)
    attached.set_progress_bar_config(disable=True)
    assert torch.equal(sample(attached, image), expected)


@needs_bfloat16_kernels
def test_tiles_and_backends_run_the_guide_too():
    image = torch.rand(1, 3, 12, 12)  # 48x48 output
    pipeline = guided_pipeline()
    untiled = sample(pipeline, image)
    with tiled_unet(pipeline, tile_size=48, overlap=None) as network:
        assert isinstance(pipeline.guidance_unet, TiledNetwork) and pipeline.unet is network
        assert torch.allclose(sample(pipeline, image), untiled, atol=1e-6)
    with tiled_unet(pipeline, tile_size=32, overlap=16):
        tiled = sample(pipeline, image)
    assert not isinstance(pipeline.guidance_unet, TiledNetwork)
    assert (tiled - untiled).abs().mean() < 0.05  # tiles blend at their seams, in both networks alike
    with use_backend(pipeline, "bf16"):
        assert isinstance(pipeline.unet, AutocastUNet) and isinstance(pipeline.guidance_unet, AutocastUNet)
        bf16 = sample(pipeline, image)
    assert not isinstance(pipeline.guidance_unet, AutocastUNet)
    assert (bf16 - untiled).abs().max() < 0.05


def test_the_onnx_backend_exports_and_runs_the_guide_too(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")  # the [onnx] extra, which CI installs
    from diffusers_sr3.backends import OnnxUNet

    monkeypatch.setenv("SR3_CACHE_DIR", str(tmp_path / "cache"))
    image = torch.rand(1, 3, 8, 8)
    pipeline = guided_pipeline()
    expected = sample(pipeline, image)
    with use_backend(pipeline, "onnx"):
        assert isinstance(pipeline.unet, OnnxUNet)  # the guide is exported when it first runs
        onnx = sample(pipeline, image)
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2  # one export per network
    assert not isinstance(pipeline.guidance_unet, OnnxUNet)
    torch.testing.assert_close(onnx, expected, atol=1e-4, rtol=0)


def test_upscale_guidance_scale_option(tmp_path, capsys):
    pipeline = guided_pipeline(guidance_scale=2.0)
    pipeline.save_pretrained(tmp_path / "model")
    photo = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(photo)

    def upscale(name, *extra):
        arguments = ["upscale", str(photo), "--output", str(tmp_path / name), "--model", str(tmp_path / "model")]
        assert main(arguments + ["--mode", "detail", "--steps", "3", "--quiet", "--eta", "0"] + list(extra)) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(int)

    default, off, saved = (
        upscale("a.png"),
        upscale("b.png", "--guidance-scale", "1"),
        upscale("c.png", "--guidance-scale", "2"),
    )
    assert np.array_equal(default, saved) and not np.array_equal(default, off)
    projected = upscale("d.png", "--guidance-scale", "3", "--parallel-guidance-weight", "0")
    assert not np.array_equal(projected, upscale("e.png", "--guidance-scale", "3"))
    arguments = ["upscale", str(photo), "--output", str(tmp_path / "f.png"), "--model", str(tmp_path / "model")]
    assert main(arguments + ["--mode", "detail", "--steps", "3", "--parallel-guidance-weight", "0.5"]) == 0
    assert "guidance scale 2, parallel guidance weight 0.5" in capsys.readouterr().out
    bad = ["upscale", str(photo), "--output", str(tmp_path / "bad.png"), "--model", str(tmp_path / "model")]
    assert main(bad + ["--mode", "fidelity", "--guidance-scale", "2"]) == 2
    assert "--guidance-scale" in capsys.readouterr().err
    assert main(bad + ["--mode", "fidelity", "--parallel-guidance-weight", "0"]) == 2
    assert "--parallel-guidance-weight" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_a_training_checkpoint_loads_as_the_guide_of_its_run(tmp_path):
    import shutil

    from safetensors.torch import load_file
    from test_benchmarks import load
    from test_training_resume import resume_options

    from diffusers_sr3.training import load_checkpoint_unet, train

    output = tmp_path / "run"
    train(resume_options(tmp_path, output))  # 8 steps, EMA, checkpoints at steps 4 and 8
    final = SR3Pipeline.from_pretrained(output)
    last = load_checkpoint_unet(str(output / "checkpoint-8"))
    # A checkpoint's EMA weights are what the run saves as its model at that step; use_ema=False gives the trained ones.
    for name, value in final.unet.state_dict().items():
        torch.testing.assert_close(last.state_dict()[name], value, rtol=0, atol=0, msg=name)
    trained = load_file(str(output / "checkpoint-8" / "model.safetensors"))
    raw = load_checkpoint_unet(str(output / "checkpoint-8"), use_ema=False).state_dict()
    assert all(torch.equal(raw[name], value) for name, value in trained.items())
    assert not all(torch.equal(raw[name], value) for name, value in last.state_dict().items())

    # The earlier checkpoint guides the final model; package_model takes the checkpoint folder as its guide too.
    guide = load_checkpoint_unet(str(output / "checkpoint-4"))
    assert not all(torch.equal(guide.state_dict()[name], value) for name, value in last.state_dict().items())
    pipeline = SR3Pipeline.from_pretrained(output, guidance_unet=guide, guidance_scale=2.0)
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 8, 8)
    guided, unguided = (sample(pipeline, image, eta=None, guidance_scale=scale) for scale in (2.0, 1.0))  # DDPM
    assert torch.isfinite(guided).all() and not torch.equal(guided, unguided)
    packaged = load("package_model").load_unet(str(output / "checkpoint-4"))
    assert all(torch.equal(packaged.state_dict()[name], value) for name, value in guide.state_dict().items())

    # A checkpoint carries its config: a copy away from its run loads alone.
    config = json.loads((output / "checkpoint-8" / "unet_config.json").read_text(encoding="utf-8"))
    assert config["block_out_channels"] == final.unet.config.block_out_channels
    alone = load_checkpoint_unet(shutil.copytree(output / "checkpoint-8", tmp_path / "elsewhere" / "checkpoint-8"))
    assert all(torch.equal(alone.state_dict()[name], value) for name, value in last.state_dict().items())

    # Checkpoints of earlier versions have no unet_config.json: the run's saved pipeline gives the config.
    (output / "checkpoint-4" / "unet_config.json").unlink()
    older = load_checkpoint_unet(str(output / "checkpoint-4"))
    assert all(torch.equal(older.state_dict()[name], value) for name, value in guide.state_dict().items())
    moved = shutil.move(str(output / "checkpoint-4"), str(tmp_path / "checkpoint-4"))
    with pytest.raises(FileNotFoundError, match="unet_config.json"):
        load_checkpoint_unet(moved)
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        load_checkpoint_unet(str(output / "unet"))
