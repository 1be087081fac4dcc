"""Device-agnostic checks: run on the CPU here, and on a GPU by benchmarks/gpu_check.sh (SR3_TEST_DEVICE=cuda).

Tiny models only; every check compares the device against the CPU or against the untiled path, never timings.
"""

import os

import pytest
import torch
from conftest import tiny_unet_config

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.progress import UpscaleProgress
from diffusers_sr3.tiling import TiledNetwork, tiled_super_resolve

DEVICE = torch.device(os.environ.get("SR3_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("SR3_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)


def low_resolution_unet():
    """A tiny UNet at the low-resolution grid, like the photos_x4 preset (pixel_unshuffle_factor 4)."""
    torch.manual_seed(0)
    return SR3UNet2DModel(**tiny_unet_config(sample_size=64, pixel_unshuffle_factor=4)).eval()


def pipeline_on(device, unet=None):
    unet = unet if unet is not None else low_resolution_unet()
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample_range=4.0)
    pipeline = SR3Pipeline(unet, scheduler, upscale_factor=4, residual=True, residual_scale=2.0).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_unet_on_the_device_matches_the_cpu():
    unet = low_resolution_unet()
    sample = torch.randn(2, 6, 64, 96, generator=torch.Generator().manual_seed(1))
    level = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        expected = unet(sample, level, return_dict=False)[0]
        got = unet.to(DEVICE)(sample.to(DEVICE), level.to(DEVICE), return_dict=False)[0].cpu()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["fidelity", "detail"])
def test_untiled_equals_one_tile_covering_the_image(mode):
    pipeline = pipeline_on(DEVICE)
    image = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(2))

    def run(**tiling):
        generator = torch.Generator().manual_seed(0)
        return tiled_super_resolve(
            pipeline, image, mode=mode, num_inference_steps=2, generator=generator, output_type="pt", **tiling
        ).images

    untiled = run()  # 96x80 fits the default budget: one evaluation per step
    assert untiled.shape == (1, 3, 96, 80)
    assert torch.equal(run(tile_size=96), untiled)
    tiled = run(tile_size=64, overlap=16)  # 2 x 2 tiles, blended
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()


def test_progress_counts_every_tile_of_every_step_on_the_device():
    pipeline = pipeline_on(DEVICE)
    tiled = TiledNetwork(pipeline.unet, tile_size=64, overlap=16, batch_size=3)
    crops, calls = tiled.count_evaluations(96, 80)
    assert (crops, calls) == (4, 2)
    with UpscaleProgress(pipeline.unet, steps=3, crops_per_step=crops, disable=False, leave=False) as progress:
        tiled_super_resolve(
            pipeline,
            torch.rand(1, 3, 24, 20),
            tile_size=64,
            overlap=16,
            tile_batch_size=3,
            progress=progress,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
        )
        assert progress.done == progress.total == 12
