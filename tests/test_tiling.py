"""Tiled super-resolution: tile layout, exactness for local networks, and no seams on a smooth image."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_unet_config

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.tiling import (
    TiledNetwork,
    TilePlan,
    crops_per_step,
    default_overlap,
    model_tile_size,
    plan_tiles,
    tile_starts,
    tiled_super_resolve,
)


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
            pipeline, image, tile_size=32, num_inference_steps=4, generator=generator, output_type="pt", **kwargs
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


def low_resolution_unet():
    """A tiny UNet at the low-resolution grid like the photos_x4 preset: downsampling factor 4 x 2**2 = 16."""
    torch.manual_seed(0)
    return SR3UNet2DModel(**tiny_unet_config(sample_size=64, pixel_unshuffle_factor=4)).eval()


def test_plan_runs_untiled_when_the_image_fits_the_budget():
    network = low_resolution_unet()
    assert network.downsampling_factor == 16
    # 1024x1024 output = 256x256 network-grid pixels: the default budget, one tile, one evaluation.
    assert plan_tiles(network, 1024, 1024) == TilePlan(1024, default_overlap(network), 1)
    assert plan_tiles(network, 1024, 1024, max_pixels=128 * 128).tile_size < 1024
    # An explicit tile size keeps the old defaults: a quarter overlap; the batch fills the budget.
    assert plan_tiles(network, 1024, 1024, tile_size=64) == TilePlan(64, 16, 256 * 256 * 16 // 64**2)


@pytest.mark.parametrize("height,width", [(2048, 2048), (2048, 1600), (1600, 3200), (1040, 1040)])
def test_planned_tiles_fit_the_budget_are_aligned_and_few(height, width):
    network = low_resolution_unet()
    budget = 256 * 256
    tiled = TiledNetwork(network, tile_size=None, overlap=None, batch_size=None, max_pixels=budget)
    plan = tiled.plan(height, width)
    tiles = tiled.tiles(height, width)
    assert plan.tile_size % 16 == 0 and plan.tile_size**2 <= budget * 16
    assert plan.batch_size * plan.tile_size**2 <= budget * 16
    for rows, columns, _ in tiles:
        assert rows.start % 16 == 0 and columns.start % 16 == 0  # the untiled network's unshuffle/stride phase
        assert rows.stop <= height and columns.stop <= width
    # Evenly sized tiles: far fewer covered pixels than the old fixed 64px tiles with a quarter overlap.
    covered = sum((r.stop - r.start) * (c.stop - c.start) for r, c, _ in tiles)
    assert covered < 1.35 * height * width
    assert len(tiles) < len(TiledNetwork(network, 64, 16).tiles(height, width)) / 10
    # Every pixel is covered, and the blending weights sum to a positive value everywhere.
    _, _, total = tiled._layout(height, width, torch.device("cpu"))
    assert total.min() > 0


def test_aligned_tile_starts():
    assert tile_starts(100, 32, 8, align=4) == [0, 24, 44, 68]
    for start in tile_starts(2048, 704, 32, align=16):
        assert start % 16 == 0
    starts = tile_starts(2048, 704, 32, align=16)
    assert starts[-1] + 704 == 2048 and all(a + 704 - b >= 32 for a, b in zip(starts, starts[1:]))


def test_layout_is_computed_once_per_size_not_per_step(monkeypatch):
    network = LocalNetwork(**tiny_unet_config()).eval()
    network.window = 1
    tiled = TiledNetwork(network, tile_size=32, overlap=8, batch_size=5)
    calls = []
    original = TiledNetwork.tiles
    monkeypatch.setattr(TiledNetwork, "tiles", lambda self, h, w: calls.append((h, w)) or original(self, h, w))
    sample = torch.rand(1, 6, 72, 100) * 2 - 1
    for level in (0.9, 0.5, 0.1):  # three refinement steps
        output = tiled(sample, torch.tensor([level]))[0]
        assert torch.allclose(output, network(sample, torch.tensor([level]))[0], atol=1e-6)
    assert calls == [(72, 100)]


def test_untiled_default_matches_the_plain_pipeline_and_counts_evaluations(tiny_pipeline):
    image = torch.rand(1, 3, 12, 10)
    calls = []
    unet = tiny_pipeline.unet
    handle = unet.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    try:
        tiled = tiled_super_resolve(
            tiny_pipeline, image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
    finally:
        handle.remove()
    plain = tiny_pipeline(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(tiled, plain.images)
    assert calls == [(1, 6, 48, 40)] * 3  # one whole-image evaluation per step


def test_progress_advances_inside_an_evaluation_and_snaps_to_whole_crops(tiny_pipeline):
    from diffusers_sr3.progress import UpscaleProgress, block_shares

    unet = tiny_pipeline.unet
    shares = block_shares(unet)
    assert len(shares) == 3 * 1 + 2 + 3 * 2 and sum(share for _, share in shares) == pytest.approx(1.0)
    assert block_shares(LocalNetwork(**tiny_unet_config())) != []  # subclasses keep their blocks
    assert block_shares(torch.nn.Conv2d(1, 1, 1)) == []
    seen = []
    with UpscaleProgress(unet, steps=2, crops_per_step=6, disable=False, leave=False) as progress:
        hook = unet.mid_blocks[0].register_forward_hook(lambda *_: seen.append(progress.bar.n))
        tiled_super_resolve(
            tiny_pipeline,
            torch.rand(1, 3, 20, 14),
            tile_size=32,
            overlap=8,
            tile_batch_size=2,
            progress=progress,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
        )
        hook.remove()
        assert progress.total == progress.done == 12 and progress.bar.n == 12  # 2 steps x 3 x 2 tiles
    # Mid-evaluation the bar already moved past the last whole count (the ETA exists before a call ends).
    assert seen and 0 < seen[0] < 2 and any(value % 1 for value in seen)
    assert not unet.mid_blocks[0]._forward_hooks  # hooks removed on close


def test_a_budget_tile_shorter_than_the_default_overlap_still_tiles(tiny_pipeline):
    # A 16x116 output whose tiles (8x8 grid pixels) are shorter than the default overlap: the overlap is cut to fit
    # the tile (it divided by zero).
    plan = plan_tiles(tiny_pipeline.unet, 16, 116, max_pixels=64)
    assert 0 <= plan.overlap < plan.tile_size
    output = tiled_super_resolve(
        tiny_pipeline, torch.rand(1, 3, 4, 29), max_tile_pixels=64, num_inference_steps=2, output_type="pt"
    )
    assert output.images.shape == (1, 3, 16, 116) and torch.isfinite(output.images).all()


def test_an_overlap_the_factor_grid_cannot_meet_is_refused_and_never_duplicates_tiles():
    network = low_resolution_unet()  # downsampling factor 16
    # Starts on multiples of 16 overlap by at most tile - 16: 56 on 64-pixel tiles planned 65536 tiles.
    with pytest.raises(ValueError, match="overlap must lie in 0-48 for 64-pixel tiles .* got 56"):
        TiledNetwork(network, tile_size=64, overlap=56)
    with pytest.raises(ValueError, match="overlap <= tile_size - 16"):
        tile_starts(1024, 64, 56, align=16)
    # The default overlap (a quarter of the tile) fits the grid: 16-pixel tiles tile without overlap.
    tiled = TiledNetwork(network, tile_size=16)
    assert tiled.plan(64, 64).overlap == 0 and len(tiled.tiles(64, 64)) == 16
    assert plan_tiles(network, 1024, 1024, tile_size=64).overlap == 16
    # A length off the grid rounds two starts together: one tile of them is kept.
    assert tile_starts(33, 16, 0, align=16) == [0, 16]


def test_a_given_overlap_is_checked_not_clamped():
    network = low_resolution_unet()
    for overlap in (-5, 100000):
        with pytest.raises(ValueError, match=f"overlap must lie in 0-1008 .* got {overlap}"):
            TiledNetwork(network, tile_size=None, overlap=overlap)
        with pytest.raises(ValueError, match="overlap must lie in"):
            plan_tiles(network, 2048, 2048, overlap=overlap)
    with pytest.raises(ValueError, match="0 <= overlap"):
        tile_starts(64, 32, -1)
    with pytest.raises(ValueError, match="tile_size 0 is not a positive multiple"):
        TiledNetwork(network, tile_size=0)


def test_an_untiled_batch_larger_than_the_budget_runs_in_budget_sized_calls():
    network = LocalNetwork(**tiny_unet_config()).eval()
    network.window = 3
    shapes = []
    handle = network.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    # A 32x32 image (pixel-unshuffle 1) fills a budget of 2 images: a batch of 5 runs as 2 + 2 + 1.
    tiled = TiledNetwork(network, tile_size=None, batch_size=None, max_pixels=2 * 32 * 32)
    sample, level = torch.rand(5, 6, 32, 32) * 2 - 1, torch.linspace(0.1, 0.9, 5)
    try:
        output = tiled(sample, level)[0]
        assert [shape[0] for shape in shapes] == [2, 2, 1]
        assert tiled.count_evaluations(32, 32, 5) == (5, 3)
        assert tiled.count_evaluations(32, 32, 2) == (2, 1)
    finally:
        handle.remove()
    torch.testing.assert_close(output, network(sample, level)[0])


def test_model_tile_size_is_the_size_the_unet_was_trained_at(tiny_pipeline):
    # Kept for code written against earlier versions: the larger side of a (height, width) pair.
    assert model_tile_size(tiny_pipeline) == tiny_pipeline.unet.config.sample_size
    tiny_pipeline.unet.register_to_config(sample_size=(16, 24))
    assert model_tile_size(tiny_pipeline) == 24


def test_blending_weights_sum_to_one_where_tiles_overlap_by_exactly_the_overlap():
    # Raised-cosine ramps sampled at pixel centres are complementary: neighbours that overlap by exactly `overlap`
    # hand over with weights summing to 1, and a tile keeps full weight up to the image's own edges.
    network = SR3UNet2DModel(**tiny_unet_config())
    assert tile_starts(56, 32, 8, align=network.downsampling_factor) == [0, 24]  # the fewest tiles, 8 apart
    tiled = TiledNetwork(network, tile_size=32, overlap=8)
    total = torch.zeros(56, 80, dtype=torch.float64)
    for rows, columns, weights in tiled.tiles(56, 80):
        assert weights.min() > 0 and weights.max() == 1
        total[rows, columns] += weights
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_a_tile_batch_of_one_runs_every_crop_alone():
    network = LocalNetwork(**tiny_unet_config()).eval()
    network.window = 1
    shapes = []
    handle = network.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    tiled = TiledNetwork(network, tile_size=32, overlap=8, batch_size=1)
    sample, level = torch.rand(1, 6, 56, 80) * 2 - 1, torch.tensor([0.4])
    try:
        output = tiled(sample, level)[0]
        assert shapes == [(1, 6, 32, 32)] * 6 and tiled.count_evaluations(56, 80) == (6, 6)
    finally:
        handle.remove()
    torch.testing.assert_close(output, network(sample, level)[0])


def test_default_overlap_is_half_the_larger_side_of_a_rectangular_training_crop():
    network = SR3UNet2DModel(**tiny_unet_config())
    assert default_overlap(network) == 16
    network.register_to_config(sample_size=(16, 24))
    assert default_overlap(network) == 12


def test_a_self_ensemble_counts_the_crops_of_all_eight_orientations(tiny_pipeline):
    # A 14x20 input is a 56x80 output: 2 x 3 tiles of 32, and 3 x 2 turned a quarter; 4 orientations of each.
    assert crops_per_step(tiny_pipeline, (20, 14), tile_size=32, overlap=8) == 6
    assert crops_per_step(tiny_pipeline, (20, 14), self_ensemble=True, tile_size=32, overlap=8) == 8 * 6
    # Untiled, every orientation is one crop.
    assert crops_per_step(tiny_pipeline, (20, 14), self_ensemble=True) == 8
