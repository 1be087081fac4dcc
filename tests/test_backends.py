"""The ONNX Runtime backend (optional extra): its output matches eager PyTorch on tiny models."""

import os

import pytest
import torch
from conftest import low_resolution_unet

from diffusers_sr3 import SR3Pipeline, make_scheduler
from diffusers_sr3.backends import OnnxUNet, swap_unet, unet_fingerprint, use_backend
from diffusers_sr3.tiling import tiled_super_resolve

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SR3_CACHE_DIR", str(tmp_path / "cache"))


def test_onnx_unet_matches_eager_for_any_batch_and_size():
    unet = low_resolution_unet()
    onnx_unet = OnnxUNet.from_unet(unet)
    assert onnx_unet.downsampling_factor == unet.downsampling_factor == 16
    assert onnx_unet.config == unet.config and onnx_unet.dtype == torch.float32
    for batch, height, width in [(1, 64, 64), (3, 48, 112), (2, 128, 16)]:
        sample = torch.randn(batch, 6, height, width, generator=torch.Generator().manual_seed(batch))
        level = torch.rand(batch, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = unet(sample, level).sample
        got = onnx_unet(sample, level).sample
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    # A single level applies to the whole batch, as with the eager UNet.
    sample = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(onnx_unet(sample, 0.5, return_dict=False)[0], unet(sample, 0.5)[0], atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        onnx_unet(torch.randn(1, 6, 40, 40), 0.5)


def test_condition_noise_models_export_their_second_level():
    unet = low_resolution_unet(condition_noise_embedding=True)
    onnx_unet = OnnxUNet.from_unet(unet)
    sample, level = torch.randn(2, 6, 32, 48), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = unet(sample, level, condition_noise_level=torch.tensor([0.0, 0.2]))[0]
    assert torch.allclose(onnx_unet(sample, level, torch.tensor([0.0, 0.2]))[0], expected, atol=1e-5)


def test_exports_are_cached_by_weights(tmp_path):
    unet = low_resolution_unet()
    first = OnnxUNet.from_unet(unet)
    modified = os.path.getmtime(first.path)
    assert OnnxUNet.from_unet(unet).path == first.path and os.path.getmtime(first.path) == modified
    assert first.path.startswith(str(tmp_path / "cache" / "onnx"))
    with torch.no_grad():
        unet.conv_in.bias.add_(0.1)
    assert OnnxUNet.from_unet(unet).path != first.path
    assert unet_fingerprint(unet) in OnnxUNet.from_unet(unet).path


@pytest.mark.parametrize("mode", ["fidelity", "detail"])
def test_pipeline_on_the_onnx_backend_matches_eager(mode):
    unet = low_resolution_unet()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4, residual=True, residual_scale=2.0)
    pipeline.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 20, 36, generator=torch.Generator().manual_seed(3))

    def run(**tiling):
        generator = torch.Generator().manual_seed(0)
        return tiled_super_resolve(
            pipeline, image, mode=mode, num_inference_steps=3, generator=generator, output_type="pt", **tiling
        ).images

    eager = run()
    eager_tiled = run(tile_size=64, overlap=16)
    with use_backend(pipeline, "onnx") as network:
        assert isinstance(pipeline.unet, OnnxUNet) and network is pipeline.unet
        onnx = run()
        onnx_tiled = run(tile_size=64, overlap=16)
    assert pipeline.unet is unet and "unet" in pipeline.config
    assert torch.allclose(onnx, eager, atol=1e-5) and torch.allclose(onnx_tiled, eager_tiled, atol=1e-5)
    with swap_unet(pipeline, OnnxUNet.from_unet(unet)):
        assert torch.allclose(run(), eager, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be"):
        with use_backend(pipeline, "tensorrt"):
            pass


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_a_missing_onnx_package_is_one_line_naming_the_extra(missing, monkeypatch, tmp_path, capsys):
    import sys

    import PIL.Image

    from diffusers_sr3.cli import main

    pipeline = SR3Pipeline(low_resolution_unet(), make_scheduler("ddim", n_timestep=100), upscale_factor=4)
    pipeline.save_pretrained(tmp_path / "model")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    argv = ["upscale", str(tmp_path / "small.png"), "--model", str(tmp_path / "model"), "--backend", "onnx"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert f'the ONNX backend needs {missing}: pip install "diffusers-sr3[onnx]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
