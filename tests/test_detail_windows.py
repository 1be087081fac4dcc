"""Detail mode in training-sized windows (`diffusers_sr3.detail_windows`, `SR3Pipeline(window_size=...)`)."""

import json

import pytest
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.detail_windows import WindowedNetwork, lowpass, lowpass_sigma, window_offset
from diffusers_sr3.tiling import TiledNetwork, tiled_super_resolve


class SizeDependentNetwork(torch.nn.Module):
    """Returns its noisy image (the last 3 channels), plus `offset` and a checkerboard of `detail` where the input is
    exactly `window` pixels square: a network that draws detail, and settles its colour, on small inputs only."""

    def __init__(self, window=32, factor=8, offset=0.0, detail=0.0):
        super().__init__()
        self.config = {"sample_size": window}
        self.downsampling_factor = factor
        self.window, self.offset, self.detail = window, offset, detail
        self.shapes, self.levels = [], []

    def forward(self, sample, signal_level, return_dict=False, **kwargs):
        self.shapes.append(tuple(sample.shape))
        self.levels.append(signal_level)
        output = sample[:, -3:].clone()
        if sample.shape[-2:] == (self.window, self.window):
            rows = torch.arange(self.window)
            checkerboard = ((rows[:, None] + rows[None, :]) % 2 * 2 - 1).to(output.dtype)
            output = output + self.offset + self.detail * checkerboard
        return (output,)


def test_the_windows_reassemble_the_input_at_every_grid_offset():
    """Cut into windows on a shifted, reflection-padded grid and put back: each pixel comes back where it was, and
    the network sees nothing but window-sized inputs."""
    network = SizeDependentNetwork()
    windowed = WindowedNetwork(network, 32, sigma=1.0)
    sample = torch.randn(2, 6, 40, 72)
    for level in torch.linspace(0.05, 0.95, 12):
        network.shapes.clear()
        torch.testing.assert_close(windowed.windows(sample, level.expand(2), {}), sample[:, 3:], rtol=0, atol=0)
        assert {shape[-2:] for shape in network.shapes} == {(32, 32)}
    # The grid moves in steps of the downsampling factor, and not every step puts it in the same place.
    offsets = {window_offset(level, 32, 8) for level in torch.linspace(0.05, 0.95, 12)}
    assert len(offsets) > 1 and all(top % 8 == 0 == left % 8 and max(top, left) < 32 for top, left in offsets)


def test_windows_give_the_fine_detail_and_the_whole_image_the_coarse():
    """What the windows settle on their own (a colour offset) is dropped; the detail they draw (a checkerboard, above
    the low-pass) is kept; for a network that does the same on any input the result is its own output."""
    sample = torch.randn(1, 6, 64, 96)
    level = torch.tensor([0.5])
    plain = WindowedNetwork(SizeDependentNetwork(), 32, sigma=2.0, min_windows_across=2)(sample, level)[0]
    torch.testing.assert_close(plain, sample[:, 3:])

    offset = WindowedNetwork(SizeDependentNetwork(offset=0.5), 32, sigma=2.0, min_windows_across=2)(sample, level)[0]
    torch.testing.assert_close(offset, sample[:, 3:], atol=1e-5, rtol=0)

    windowed = WindowedNetwork(SizeDependentNetwork(detail=0.25), 32, sigma=2.0, min_windows_across=2)
    detail = windowed(sample, level)[0] - sample[:, 3:]
    rows, columns = torch.arange(64), torch.arange(96)
    checkerboard = (rows[:, None] + columns[None, :]) % 2 * 2 - 1
    interior = detail[..., 8:-8, 8:-8]  # the low-pass reflects at the image's edges
    top, left = window_offset(level, 32, 8)
    # A window whose origin is odd would flip the board; the grid is on the factor's multiples, so none is.
    assert top % 2 == 0 == left % 2
    torch.testing.assert_close(interior, 0.25 * checkerboard[8:-8, 8:-8].expand_as(interior).float(), atol=2e-3, rtol=0)


def test_an_input_under_four_windows_across_runs_whole():
    """Windows are for images many training crops large; a smaller one (a 128-pixel face, two 64-pixel windows
    across) runs whole, whatever its other side."""
    level = torch.tensor([0.5])
    for height, width in ((24, 64), (96, 320)):
        network = SizeDependentNetwork(detail=1.0)
        sample = torch.randn(1, 6, height, width)
        torch.testing.assert_close(WindowedNetwork(network, 32, sigma=2.0)(sample, level)[0], sample[:, 3:])
        assert network.shapes == [(1, 6, height, width)]
    network = SizeDependentNetwork(detail=1.0)
    sample = torch.randn(1, 6, 128, 128)
    assert not torch.allclose(WindowedNetwork(network, 32, sigma=2.0)(sample, level)[0], sample[:, 3:])
    assert (1, 6, 128, 128) in network.shapes and any(shape[-2:] == (32, 32) for shape in network.shapes)


def test_lowpass_keeps_constants_and_removes_the_finest_pattern():
    constant = torch.full((1, 3, 20, 30), 0.3)
    torch.testing.assert_close(lowpass(constant, 2.0), constant)
    rows = torch.arange(20)
    checkerboard = ((rows[:, None] + torch.arange(30)[None, :]) % 2 * 2 - 1).float().expand(1, 3, 20, 30)
    assert lowpass(checkerboard, 2.0)[..., 6:-6, 6:-6].abs().max() < 1e-3


def test_windows_batch_within_the_budget_and_per_sample_arguments_follow_their_windows():
    network = SizeDependentNetwork()
    # 32-pixel windows are 32x32 network-grid pixels (no pixel-unshuffle): a budget of 3 windows per evaluation.
    windowed = WindowedNetwork(network, 32, sigma=1.0, max_pixels=3 * 32 * 32)
    sample = torch.randn(2, 6, 64, 64)
    levels = torch.tensor([0.25, 0.75])
    windowed.windows(sample, levels, {})
    top, left = window_offset(levels, 32, 8)
    per_image = (2 + (top > 0)) * (2 + (left > 0))
    assert [shape[0] for shape in network.shapes] == [3] * (2 * per_image // 3) + [2 * per_image % 3] * bool(
        2 * per_image % 3
    )
    seen = torch.cat(network.levels)
    torch.testing.assert_close(seen, levels.repeat_interleave(per_image))


def test_windowed_network_refuses_sizes_the_network_cannot_run():
    with pytest.raises(ValueError, match="not a positive multiple of the UNet's downsampling factor 8"):
        WindowedNetwork(SizeDependentNetwork(), 20, sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        WindowedNetwork(SizeDependentNetwork(), 32, sigma=0.0)
    with pytest.raises(ValueError, match="min_windows_across must be at least 1, got 0"):
        WindowedNetwork(SizeDependentNetwork(), 32, sigma=1.0, min_windows_across=0)


def _spy(network, calls, name):
    def record(module, args, output):
        calls.append((name, tuple(args[0].shape), float(args[1].flatten()[0])))

    return network.register_forward_hook(record)


def test_pipeline_runs_the_unet_and_its_guide_on_the_same_windows_and_only_in_the_refinement(guided_pipeline):
    """Every refinement step runs the UNet and the guide on the whole image and on the step's windows (the same
    grid for both); the fidelity answer that strength below 1 starts from runs whole; a seed gives one image."""
    calls = []
    _spy(guided_pipeline.unet, calls, "unet")
    _spy(guided_pipeline.guidance_unet, calls, "guide")
    image = torch.rand(3, 32, 48)  # a 128x192 output: 32-pixel windows on a moving grid

    def detail(**kwargs):
        calls.clear()
        generator = torch.Generator().manual_seed(0)
        return guided_pipeline(image, generator=generator, output_type="pt", **kwargs).images

    whole = detail()
    assert {shape for _, shape, _ in calls} == {(1, 6, 128, 192)}
    windowed = detail(window_size=32)
    assert not torch.allclose(windowed, whole)
    torch.testing.assert_close(detail(window_size=32), windowed, rtol=0, atol=0)
    steps = sorted({level for _, _, level in calls})
    assert len(steps) == 4
    for level in steps:
        step_calls = [(name, shape) for name, shape, seen in calls if seen == level]
        for name in ("unet", "guide"):
            assert (name, (1, 6, 128, 192)) in step_calls
            window_shapes = {shape[1:] for who, shape in step_calls if who == name and shape[-1] == 32}
            assert window_shapes == {(6, 32, 32)}
        top, left = window_offset(torch.tensor(level), 32, guided_pipeline.unet.downsampling_factor)
        windows = -(-(128 + top) // 32) * -(-(192 + left) // 32)
        for name in ("unet", "guide"):
            assert sum(shape[0] for who, shape in step_calls if who == name and shape[-1] == 32) == windows
    assert len({window_offset(torch.tensor(level), 32, 16) for level in steps}) > 1

    detail(window_size=32, strength=0.5)
    from diffusers_sr3.pipelines.pipeline_sr3 import FIDELITY_STEPS

    assert all(shape == (1, 6, 128, 192) for _, shape, _ in calls[:FIDELITY_STEPS])
    assert any(shape[-1] == 32 for _, shape, _ in calls[FIDELITY_STEPS:])


def test_window_size_is_a_saved_detail_default_refused_where_it_cannot_apply(guided_pipeline, tmp_path):
    image = torch.rand(3, 32, 48)
    guided_pipeline.register_to_config(detail_window_size=32)
    assert guided_pipeline.detail_settings()["window_size"] == 32
    generator = torch.Generator().manual_seed(0)
    by_default = guided_pipeline(image, generator=generator, output_type="pt").images
    guided_pipeline.save_pretrained(tmp_path / "saved")
    reloaded = SR3Pipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.detail_window_size == 32
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(reloaded(image, generator=generator, output_type="pt").images, by_default)

    # A model saved before the key existed runs its detail mode on the whole image.
    index_path = tmp_path / "saved" / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    del index["detail_window_size"]
    index_path.write_text(json.dumps(index), encoding="utf-8")
    assert SR3Pipeline.from_pretrained(tmp_path / "saved").detail_settings()["window_size"] == 0

    with pytest.raises(ValueError, match="window_size apply to detail mode"):
        guided_pipeline(image, mode="fidelity", window_size=32)
    with pytest.raises(ValueError, match="window_size must be 0 \\(off\\) or a positive multiple .* factor 16, got 40"):
        guided_pipeline(image, window_size=40)
    # The same refusals before any work (sr3 upscale checks its options this way before it prints them).
    with pytest.raises(ValueError, match="window_size must be 0 \\(off\\) or a positive multiple .* factor 16, got 40"):
        guided_pipeline.check_arguments(window_size=40)
    with pytest.raises(ValueError, match="window_size apply to detail mode"):
        guided_pipeline.check_arguments(mode="fidelity", window_size=32)
    guided_pipeline.check_arguments(window_size=32)
    with pytest.raises(ValueError, match="detail_window_size must be 0 \\(off\\) or a positive multiple"):
        SR3Pipeline(guided_pipeline.unet, guided_pipeline.scheduler, detail_window_size=-16)


def test_tiled_super_resolve_runs_the_windows_on_the_network_itself(guided_pipeline):
    """With tiles (sr3 upscale's path for large images), the whole image runs in tiles and the windows run on the
    UNet itself: the result equals the untiled one for tiles that cover the image in one."""
    image = torch.rand(3, 32, 48)
    generator = torch.Generator().manual_seed(0)
    untiled = guided_pipeline(image, generator=generator, output_type="pt", window_size=32).images
    generator = torch.Generator().manual_seed(0)
    tiled = tiled_super_resolve(
        guided_pipeline, image, tile_size=192, generator=generator, output_type="pt", window_size=32
    ).images
    torch.testing.assert_close(tiled, untiled)
    assert WindowedNetwork(TiledNetwork(guided_pipeline.unet, 64), 64, 2.0).local_network is guided_pipeline.unet


def test_upscale_command_line_takes_window_size_in_detail_mode_only(tmp_path, capsys):
    import numpy as np
    import PIL.Image

    from diffusers_sr3.cli import main

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)

    def upscale(name, *extra):
        arguments = ["upscale", str(photo), "--output", str(tmp_path / name), "--backend", "torch", "--steps", "2"]
        assert main(arguments + ["--mode", "detail", "--strength", "1", *extra]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name)).astype(float)

    whole = upscale("whole.png")
    capsys.readouterr()
    windowed = upscale("windowed.png", "--window-size", "32")
    assert "window size 32" in capsys.readouterr().out
    assert windowed.shape == whole.shape == (128, 128, 3) and np.abs(windowed - whole).mean() > 0.5
    torch.testing.assert_close(upscale("again.png", "--window-size", "32"), windowed)
    for bad, message in ((["--mode", "fidelity", "--window-size", "64"], "--window-size apply to detail mode"),
                         (["--mode", "detail", "--window-size", "40"], "--window-size must be 0 (off)")):  # fmt: skip
        assert main(["upscale", str(photo), "--output", str(tmp_path / "bad.png"), *bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_windows_batch_within_the_budget_of_the_tiled_network_they_wrap():
    network = SizeDependentNetwork()
    # sr3 upscale --max-tile-pixels: a TiledNetwork's budget of 2 windows per evaluation holds for the windows too.
    tiled = TiledNetwork(network, tile_size=None, batch_size=None, max_pixels=2 * 32 * 32)
    assert WindowedNetwork(tiled, 32, sigma=1.0).windows_per_batch == 2
    assert WindowedNetwork(tiled, 32, sigma=1.0, max_pixels=5 * 32 * 32).windows_per_batch == 5
    assert WindowedNetwork(network, 32, sigma=1.0).windows_per_batch == 64
    WindowedNetwork(tiled, 32, sigma=1.0).windows(torch.randn(1, 6, 64, 64), torch.tensor([0.5]), {})
    assert max(shape[0] for shape in network.shapes) == 2


def test_windows_count_the_unpadded_output_size(guided_pipeline):
    """A 124-pixel output (padded to 128 for the UNet) is under four 32-pixel windows across and runs whole; a
    128-pixel one runs windows; the progress count agrees."""
    from diffusers_sr3.detail_windows import window_crops_per_step

    calls = []
    _spy(guided_pipeline.unet, calls, "unet")
    for side, windowed in ((31, False), (32, True)):
        calls.clear()
        guided_pipeline(torch.rand(3, side, side), window_size=32, generator=torch.Generator().manual_seed(0))
        assert any(shape[-1] == 32 for _, shape, _ in calls) is windowed, side
        assert {shape for _, shape, _ in calls if shape[-1] != 32} == {(1, 6, 128, 128)}
        assert (window_crops_per_step(guided_pipeline, (side, side), 32) > 0) is windowed, side


def test_the_low_pass_is_half_an_input_pixel():
    # docs/quality.md measured detail mode at x4 with sigma 2 output pixels.
    assert lowpass_sigma(4) == 2.0 and lowpass_sigma(2) == 1.0


def test_windows_larger_than_the_budget_run_one_per_evaluation():
    network = SizeDependentNetwork()
    windowed = WindowedNetwork(network, 32, sigma=1.0, max_pixels=16 * 16)
    assert windowed.windows_per_batch == 1
    sample = torch.randn(1, 6, 64, 64)
    torch.testing.assert_close(windowed.windows(sample, torch.tensor([0.5]), {}), sample[:, 3:], rtol=0, atol=0)
    assert network.shapes and {shape[0] for shape in network.shapes} == {1}
