"""Detail mode in training-sized windows: the texture a network draws on its training crops, inside a large image.

A UNet trained on small crops draws texture where its coarsest features feel the zero-padded border: everywhere on a
training crop, only near the edges of a large photo (docs/quality.md, "Why the network draws more on small inputs").
Run on training-sized windows alone, it draws the texture but each window settles its own colours and outlines
(blotches, colour shifts, dark edges). `WindowedNetwork` takes each part from where it is right: at every refinement
step the network runs on the whole input and on non-overlapping windows of the training crop's size (one batch, each
window normalised on its own, exactly as a crop alone), and the prediction is the whole input's below a Gaussian
low-pass and the windows' above it. The window grid moves from step to step, so no window border stays in place.

The grid of a step is drawn from that step's noise level, so the UNet and its guide see the same windows, and a call
with a seeded generator gives the same image every time.

Windows are for images many training crops large. An image under `MIN_WINDOWS_ACROSS` windows on its shorter side runs
whole: it has little interior for the border to miss, and its subject may not fit a window (a 128-pixel face is two
64-pixel windows across, and windows drew each half of it on its own: docs/quality.md).
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .defaults import MIN_WINDOWS_ACROSS
from .image_processing import lowpass
from .tiling import DEFAULT_MAX_TILE_PIXELS, NetworkStandIn, TiledNetwork, _unshuffle_factor


def lowpass_sigma(upscale_factor: int) -> float:
    """The low-pass that splits whole image from windows: half an input pixel, in output pixels.

    What the input shows (down to a few of its pixels) stays the whole image's; detail finer than it, which the input
    cannot show and the network invents, comes from the windows. At x4 (sigma 2) this is the setting measured in
    docs/quality.md; other factors and sigmas are untested.
    """
    return upscale_factor / 2


def window_offset(signal_level: Any, window_size: int, factor: int) -> Tuple[int, int]:
    """Where the window grid of the step at `signal_level` starts: `(top, left)`, multiples of `factor` below
    `window_size`, drawn from the level (the same for every network of that step, different from step to step)."""
    level = float(signal_level.flatten()[0]) if isinstance(signal_level, torch.Tensor) else float(signal_level)
    generator = torch.Generator().manual_seed(int(level * 2**30))
    top, left = torch.randint(0, window_size // factor, (2,), generator=generator).tolist()
    return top * factor, left * factor


class WindowedNetwork(NetworkStandIn):
    """Stands in for an SR3 UNet in detail mode: the whole input's coarse prediction, the windows' fine detail.

    Same `config`, `dtype`, `device`, `downsampling_factor` and call signature as the network.

    Args:
        network: the SR3 UNet, or a stand-in for it (a [`TiledNetwork`], whose own network then runs the windows,
            or a backend).
        window_size: the windows' side in pixels: the network's training crop (`unet.config.sample_size`); a multiple
            of its downsampling factor.
        sigma: the Gaussian low-pass's standard deviation in output pixels; detail finer than it comes from the
            windows.
        max_pixels: network-grid pixels per evaluation of windows; defaults to the budget of the [`TiledNetwork`]
            it wraps (`sr3 upscale --max-tile-pixels`), else `DEFAULT_MAX_TILE_PIXELS`.
        min_windows_across: an input with fewer windows than this on its shorter side runs whole.
        image_size: `(height, width)` of the output that the inputs are padded from (to the network's multiple):
            what `min_windows_across` counts windows across, so padding never turns windows on; None: the input's.
    """

    def __init__(
        self,
        network: Any,
        window_size: int,
        sigma: float,
        max_pixels: Optional[int] = None,
        min_windows_across: int = MIN_WINDOWS_ACROSS,
        image_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__(network)
        factor = network.downsampling_factor
        if window_size < factor or window_size % factor:
            raise ValueError(
                f"window_size {window_size} is not a positive multiple of the UNet's downsampling factor {factor}"
            )
        if not sigma > 0:
            raise ValueError(f"the low-pass sigma must be positive, got {sigma}")
        if min_windows_across < 1:
            raise ValueError(f"min_windows_across must be at least 1, got {min_windows_across}")
        tiled = isinstance(network, TiledNetwork)
        if max_pixels is None:
            max_pixels = network.max_pixels if tiled else DEFAULT_MAX_TILE_PIXELS
        self.local_network = network.network if tiled else network
        self.window_size = int(window_size)
        self.sigma = float(sigma)
        self.min_windows_across = int(min_windows_across)
        self.image_size = image_size
        per_window = (self.window_size // _unshuffle_factor(network)) ** 2
        self.windows_per_batch = max(1, max_pixels // per_window)

    def windows(self, sample: torch.Tensor, signal_level: Any, kwargs: Dict[str, Any]) -> torch.Tensor:
        """The network's prediction for `sample` run as windows of `window_size` on the step's grid."""
        batch, channels, height, width = sample.shape
        size = self.window_size
        top, left = window_offset(signal_level, size, self.downsampling_factor)
        bottom, right = -(height + top) % size, -(width + left) % size
        # Reflection keeps the photo's edges inside a window's content; a window's own border is zero-padded by the
        # network, as a training crop's is.
        padded = F.pad(sample, (left, right, top, bottom), mode="reflect")
        rows, columns = padded.shape[-2] // size, padded.shape[-1] // size
        windows = (
            padded.view(batch, channels, rows, size, columns, size)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch * rows * columns, channels, size, size)
        )
        per_sample = {"signal_level": signal_level, **kwargs}
        repeated = {
            name: value.repeat_interleave(rows * columns, dim=0)
            for name, value in per_sample.items()
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
        }
        # A progress meter counts the windows as the crops of the whole image's pass their pixels fill: each image's
        # windows as its area (the padding's overlap is left out, so the count is the same at every step).
        counting = isinstance(self.network, TiledNetwork) and self.network.progress is not None
        tiled = self.network if counting else None
        share = Fraction(height * width, windows.shape[0] // batch * tiled.crop_pixels(height, width)) if tiled else 0
        outputs = []
        for start in range(0, windows.shape[0], self.windows_per_batch):
            chunk = slice(start, start + self.windows_per_batch)
            arguments = {**per_sample, **{name: value[chunk] for name, value in repeated.items()}}
            level = arguments.pop("signal_level")
            counted = tiled._evaluation(share * len(windows[chunk])) if tiled else contextlib.nullcontext()
            with counted:
                outputs.append(self.local_network(windows[chunk], level, return_dict=False, **arguments)[0].float())
        predicted = torch.cat(outputs)
        predicted = (
            predicted.view(batch, rows, columns, -1, size, size)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(batch, -1, rows * size, columns * size)
        )
        return predicted[..., top : top + height, left : left + width]

    def forward(self, sample: torch.Tensor, signal_level: Any = None, return_dict: bool = False, **kwargs: Any):
        """The whole input's prediction below the low-pass plus the windows' above it; returns `(output,)`."""
        whole = self.network(sample, signal_level, return_dict=False, **kwargs)[0].float()
        if min(self.image_size or sample.shape[-2:]) < self.min_windows_across * self.window_size:
            return (whole.to(sample.dtype),)
        local = self.windows(sample, signal_level, kwargs)
        return ((lowpass(whole, self.sigma) + local - lowpass(local, self.sigma)).to(sample.dtype),)


def window_crops_per_step(
    pipeline: Any,
    image_size: Tuple[int, int],
    window_size: int,
    images: int = 1,
    network: Any = None,
    tile_size: Optional[int] = None,
    overlap: Optional[int] = None,
    tile_batch_size: Optional[int] = None,
    max_tile_pixels: int = DEFAULT_MAX_TILE_PIXELS,
    min_windows_across: int = MIN_WINDOWS_ACROSS,
) -> Fraction:
    """What a progress meter counts for the windows of one windowed evaluation (one step of the UNet, or of its guide)
    when `tiled_super_resolve` runs `pipeline` in detail mode with `window_size` on `images` inputs of `image_size`
    `(width, height)`: the crops of [`diffusers_sr3.tiling.crops_per_step`] that their pixels fill, a fraction
    (1 per image for an image that runs untiled); 0 without windows (`window_size` 0, or an image under
    `min_windows_across` windows on its shorter side, which runs whole). Other arguments as `crops_per_step`.

    Windows run in the refinement's evaluations only: not in the fidelity answer a strength below 1 starts from.
    """
    network = pipeline.unet if network is None else network
    factor, multiple = pipeline.config.upscale_factor, network.downsampling_factor
    if not window_size or min(image_size) * factor < min_windows_across * window_size:
        return Fraction(0)
    width, height = (-(-length * factor // multiple) * multiple for length in image_size)
    tiled = TiledNetwork(network, tile_size, overlap, tile_batch_size, max_pixels=max_tile_pixels)
    return Fraction(images * height * width, tiled.crop_pixels(height, width))


def windowed_evaluations(evaluations: int, strength: float, fidelity_steps: int, window_size: int) -> int:
    """How many of a detail-mode call's `evaluations` per crop also run the windows: the last ones. Below strength 1
    the fidelity answer's `fidelity_steps` come first, on the whole image only; none without windows."""
    if not window_size:
        return 0
    return evaluations - (fidelity_steps if strength < 1 else 0)


@contextlib.contextmanager
def windowed_networks(
    pipeline: Any,
    window_size: int,
    sigma: float,
    max_pixels: Optional[int] = None,
    image_size: Optional[Tuple[int, int]] = None,
) -> Iterator[None]:
    """Let `pipeline`'s UNet and guide run as [`WindowedNetwork`]s for the duration of the `with` block (neither
    reaches the pipeline's config: [`diffusers_sr3.pipelines.base.stand_ins`]); `max_pixels` and `image_size` (the
    unpadded output's `(height, width)`) as there."""
    # Here: the pipelines import this module, so importing them at its top is circular when it is imported first.
    from .pipelines.base import stand_ins

    with stand_ins(
        pipeline, lambda network: WindowedNetwork(network, window_size, sigma, max_pixels, image_size=image_size)
    ):
        yield
