"""Tiled super-resolution: tile layout, exactness for local networks, and no seams on a smooth image."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet_config

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.tiling import TiledNetwork, tile_starts, tiled_super_resolve


class LocalNetwork(SR3UNet2DModel):
    """A deterministic stand-in for a trained UNet that predicts the clean image (prediction_type="sample").

    Its prediction is the condition averaged over a `window` x `window` neighbourhood with zero padding, so, like a
    real CNN, it is wrong near the edges of whatever crop it sees: naive tiling shows those edges as seams.
    """

    window = 3

    def forward(self, sample, noise_level, return_dict=True, **kwargs):
        condition = sample[:, :3]
        prediction = F.avg_pool2d(condition, self.window, stride=1, padding=self.window // 2, count_include_pad=True)
        prediction = prediction + 0.01 * noise_level.view(-1, 1, 1, 1).to(prediction.dtype)
        return (prediction,)


def local_pipeline(window):
    network = LocalNetwork(**tiny_unet_config()).eval()
    network.window = window
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample")
    pipeline = SR3Pipeline(network, scheduler, upscale_factor=4)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def smooth_image(size=24):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.4 + 0.4 * x * y])[None]


def seam_ratio(image, tile, overlap):
    """Squared differences between neighbouring pixels at inner tile edges (the boundary itself and the pixel
    boundaries next to it), relative to the median over all pixel boundaries."""
    width = image.shape[-1]
    starts = tile_starts(width, tile, overlap)
    edges = {s for s in starts[1:]} | {s + tile for s in starts[:-1]}  # first pixel past each inner edge
    edges = sorted({line for edge in edges for line in (edge - 2, edge - 1, edge)})
    ratios = []
    for axis in (-1, -2):
        differences = image.diff(dim=axis).pow(2)
        other = [d for d in range(1, 4) if d != image.ndim + axis]
        per_line = differences.mean(dim=[0, *other])
        ratios.append(float(per_line[edges].mean() / per_line.median()))
    return max(ratios)


@pytest.mark.parametrize("length,tile,overlap", [(96, 32, 8), (100, 32, 8), (33, 32, 4), (20, 32, 8), (64, 32, 0)])
def test_tile_starts_cover_with_the_requested_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert min(starts[-1] + tile, length) == length
    for left, right in zip(starts, starts[1:]):
        assert left + tile - right >= overlap
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(length, tile, tile)


def test_tiles_equal_the_whole_for_a_pointwise_network():
    network = LocalNetwork(**tiny_unet_config()).eval()
    network.window = 1
    sample = torch.rand(2, 6, 72, 100) * 2 - 1
    level = torch.tensor([0.3, 0.7])
    tiled = TiledNetwork(network, tile_size=32, overlap=8, batch_size=3)
    assert len(tiled.tiles(72, 100)) == 3 * 4
    expected = network(sample, level)[0]
    assert torch.allclose(tiled(sample, level)[0], expected, atol=1e-6)


def test_tiled_upscale_has_no_seams_on_a_smooth_image():
    pipeline = local_pipeline(window=3)
    image = smooth_image()  # 24x24 -> 96x96, tiles of 32 (the UNet's sample_size)

    def run(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return tiled_super_resolve(
            pipeline, image, num_inference_steps=4, generator=generator, output_type="pt", **kwargs
        ).images

    whole = pipeline(image, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    blended = run(overlap=8)
    hard = run(overlap=0)  # abutting tiles, no blending: what naive tiling does
    # Blending: equal to the untiled result to well under one grey level, and no seam.
    assert (blended - whole.images).abs().max() < 1 / 255
    assert seam_ratio(blended, 32, 8) < 1.5
    # The same measure finds the seams of naive tiling, so the check above can fail.
    assert seam_ratio(hard, 32, 0) > 10
    # The UNet is restored after the call.
    assert type(pipeline.unet) is LocalNetwork


def test_tiled_refinement_with_a_real_unet_and_intermediates(tiny_pipeline):
    generator = torch.Generator().manual_seed(0)
    output = tiled_super_resolve(
        tiny_pipeline,
        torch.rand(1, 3, 12, 10),
        tile_size=32,
        overlap=8,
        num_inference_steps=2,
        generator=generator,
        output_type="pt",
        num_intermediates=2,
    )
    assert output.images.shape == (1, 3, 48, 40)
    assert torch.isfinite(output.images).all()
    assert len(output.intermediates) == 2
    assert type(tiny_pipeline.unet) is SR3UNet2DModel


def test_bad_tile_settings():
    network = SR3UNet2DModel(**tiny_unet_config())
    with pytest.raises(ValueError, match="multiple of the UNet's downsampling factor"):
        TiledNetwork(network, tile_size=30, overlap=4)
    with pytest.raises(ValueError, match="overlap"):
        TiledNetwork(network, tile_size=32, overlap=32)
