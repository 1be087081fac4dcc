"""Seamless tiled super-resolution of images larger than the size an SR3 model was trained at.

The pipeline refines ONE full-size noisy image, so every tile shares the same noise field and the same scheduler
state. At each refinement step the network sees overlapping `tile_size` crops of its input (noisy image + upsampled
condition), in batches, and its per-tile predictions are blended back into one full-size prediction with
raised-cosine weights that fall smoothly to zero towards the inner tile edges. The scheduler then updates the whole
image at once, so overlapping tiles cannot drift apart and no seam forms (MultiDiffusion-style blending).
For a pointwise network the result equals the untiled one; for a network that sees a few pixels around each, it
is close, not equal: a tile's blending weight is small but not zero where its crop edge cuts that reach.

Speed: the network is convolutional, so an image that fits the memory budget (`DEFAULT_MAX_TILE_PIXELS` network-grid
pixels per evaluation) runs untiled, in one evaluation per step; a larger one is cut into as few evenly sized
tiles as the budget allows, batched up to the budget. Tile origins sit on multiples of the UNet's downsampling
factor, so every tile sees the same pixel-unshuffle and stride phase as the untiled network. The tile layout and
blending weights are computed once per image size, not per step.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch

from .defaults import DEFAULT_MAX_TILE_PIXELS
from .image_processing import ImageInput


def _check_tiles(tile: int, overlap: int, align: int = 1) -> None:
    # Distinct starts on a grid of `align` lie at least `align` apart, so neighbours overlap by `tile - align` at most.
    if tile < 1 or not 0 <= overlap <= tile - align:
        raise ValueError(
            f"need tile_size >= 1 and 0 <= overlap <= tile_size - {align} (tile starts are multiples of {align}), "
            f"got {tile} and {overlap}"
        )


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> List[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, evenly spread, neighbours overlapping >= `overlap`.

    A length that fits in one tile gives `[0]` (the tile is then clipped to `length`). With `align`, every start is
    a multiple of `align` (`length` and `tile` should then be multiples of it, so the last tile ends at `length`);
    `overlap` is then at most `tile - align`. No start appears twice.
    """
    _check_tiles(tile, overlap, align)
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    while True:
        starts = [align * round(index * (length - tile) / (count - 1) / align) for index in range(count)]
        if all(left + tile - right >= overlap for left, right in zip(starts, starts[1:])) or count >= length:
            # Rounding to the grid can put two tiles at one start (a length off the grid): one of them does.
            return list(dict.fromkeys(starts))
        count += 1


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D weights: raised-cosine rise over the first `ramp` pixels, fall over the last, 1 in between."""
    weights = torch.ones(length, dtype=torch.float64)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        # Sample the half cosine at pixel centres so no weight is exactly zero.
        edge = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp)
        if rise:
            weights[:ramp] = edge
        if fall:
            weights[-ramp:] = edge.flip(0)
    return weights


class TilePlan(NamedTuple):
    """How an image is cut: square tiles of `tile_size` (clipped to the image), `overlap`, `batch_size` per batch."""

    tile_size: int
    overlap: int
    batch_size: int


def _unshuffle_factor(network: Any) -> int:
    return int(network.config.get("pixel_unshuffle_factor", 1) or 1)


def _largest_tile(network: Any, max_pixels: int) -> int:
    """Side of the largest square tile, on the downsampling factor's grid, within `max_pixels` network-grid pixels."""
    factor = network.downsampling_factor
    return max(factor, int(math.isqrt(max_pixels * _unshuffle_factor(network) ** 2)) // factor * factor)


def largest_overlap(network: Any, tile_size: Optional[int] = None, max_pixels: int = DEFAULT_MAX_TILE_PIXELS) -> int:
    """The largest tile overlap `network` can run: `tile_size` minus its downsampling factor (tile starts are
    multiples of the factor), or, without `tile_size`, that of the largest tile [`plan_tiles`] plans within
    `max_pixels`."""
    return (_largest_tile(network, max_pixels) if tile_size is None else tile_size) - network.downsampling_factor


def _check_settings(network: Any, tile_size: Optional[int], overlap: Optional[int], max_pixels: int) -> None:
    """Refuse tile settings `network` cannot run, whatever the image size."""
    factor = network.downsampling_factor
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if tile_size is not None and (tile_size < 1 or tile_size % factor):
        raise ValueError(f"tile_size {tile_size} is not a positive multiple of the UNet's downsampling factor {factor}")
    if overlap is not None:
        limit = largest_overlap(network, tile_size, max_pixels)
        tiles = (
            f"{tile_size}-pixel tiles" if tile_size is not None else f"the largest tile max_pixels {max_pixels} allows"
        )
        if not 0 <= overlap <= limit:
            raise ValueError(
                f"the tile overlap must lie in 0-{limit} for {tiles} (tile size minus the UNet's downsampling factor "
                f"{factor}), got {overlap}"
            )


def default_overlap(network: Any) -> int:
    """Overlap of automatically planned tiles: half the training crop (`sample_size // 2`), on the factor grid."""
    factor = network.downsampling_factor
    size = network.config.sample_size
    size = int(max(size) if isinstance(size, (tuple, list)) else size)
    return max(factor, (size // 2) // factor * factor)


def plan_tiles(
    network: Any,
    height: int,
    width: int,
    tile_size: Optional[int] = None,
    overlap: Optional[int] = None,
    batch_size: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_TILE_PIXELS,
) -> TilePlan:
    """The tiles for a `height x width` network input (already padded to the downsampling factor).

    Without `tile_size`, the image runs untiled when it holds at most `max_pixels` network-grid pixels; otherwise
    it is cut into the fewest evenly sized tiles that each fit the budget. Without `batch_size`, as many tiles as fit
    the budget run together. `overlap` defaults to [`default_overlap`] (a quarter of an explicit `tile_size`, at most
    `tile_size` minus the downsampling factor); a given one is at most [`largest_overlap`].
    """
    _check_settings(network, tile_size, overlap, max_pixels)
    factor = network.downsampling_factor
    budget = max_pixels * _unshuffle_factor(network) ** 2  # image pixels per evaluation
    if tile_size is None:
        overlap = default_overlap(network) if overlap is None else overlap
        if height * width <= budget:
            tile_size = math.ceil(max(height, width) / factor) * factor
        else:
            largest = _largest_tile(network, max_pixels)
            overlap = min(overlap, largest - factor)  # only a default can be larger: tiles overlap by less than a tile
            needed = []
            for length in (height, width):
                if length <= largest:
                    needed.append(length)
                    continue
                count = math.ceil((length - overlap) / max(1, largest - overlap - factor))
                needed.append(math.ceil((length + (count - 1) * (overlap + factor)) / count))
            tile_size = min(largest, math.ceil(max(needed) / factor) * factor)
        # One tile covers a small image whole, so its overlap never applies; it only has to be a valid one.
        overlap = max(0, min(overlap, tile_size - factor))
    elif overlap is None:
        overlap = min(tile_size // 4, tile_size - factor)
    if batch_size is None:
        batch_size = max(1, budget // (min(tile_size, height) * min(tile_size, width)))
    return TilePlan(int(tile_size), int(overlap), int(batch_size))


class NetworkStandIn(torch.nn.Module):
    """Stands in for an SR3 UNet (`network`) during a pipeline call: same `config`, `dtype`, `device`,
    `downsampling_factor` and call signature; subclasses decide how `forward` runs the network."""

    def __init__(self, network: Any):
        super().__init__()
        self.network = network

    @property
    def config(self):
        return self.network.config

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def downsampling_factor(self) -> int:
        return self.network.downsampling_factor


class TiledNetwork(NetworkStandIn):
    """Runs an SR3 UNet over overlapping tiles of its input and blends the outputs (see the module docstring).

    Args:
        network: the SR3 UNet (or a stand-in with the same call signature, such as an ONNX Runtime backend).
        tile_size: tile height and width (a multiple of its downsampling factor); None plans tiles per image size
            with [`plan_tiles`] (untiled when the image fits `max_pixels`).
        overlap: minimum overlap of neighbouring tiles in pixels; blending happens across it. At most
            [`largest_overlap`]: `tile_size` minus the downsampling factor.
        batch_size: tiles run through the network together; None fills `max_pixels`.
        max_pixels: network-grid pixels per evaluation for planned tiles and batches.
        progress: an object with an `evaluation(count)` context manager, entered around every network call with
            the number of (image, tile) crops in it (see `diffusers_sr3.progress.UpscaleProgress`), and by detail
            mode's windows ([`diffusers_sr3.detail_windows.WindowedNetwork`]) with the crops their pixels fill.
    """

    def __init__(
        self,
        network: Any,
        tile_size: Optional[int],
        overlap: Optional[int] = None,
        batch_size: Optional[int] = 4,
        max_pixels: int = DEFAULT_MAX_TILE_PIXELS,
        progress: Optional[Any] = None,
    ):
        super().__init__(network)
        _check_settings(network, tile_size, overlap, max_pixels)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"the tile batch size must be at least 1, got {batch_size}")
        self.tile_size = tile_size
        self.overlap = overlap
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.progress = progress
        self._layouts: Dict[Tuple[int, int, str], Tuple[TilePlan, list, torch.Tensor]] = {}

    def plan(self, height: int, width: int) -> TilePlan:
        """The tile size, overlap and batch size used for a `height x width` input."""
        return plan_tiles(
            self.network, height, width, self.tile_size, self.overlap, self.batch_size, max_pixels=self.max_pixels
        )

    def tiles(self, height: int, width: int) -> List[Tuple[slice, slice, torch.Tensor]]:
        """The tiles of a `height x width` input: `(rows, columns, weights)` with `(h, w)` float64 weights."""
        tile_size, overlap, _ = self.plan(height, width)
        factor = self.downsampling_factor
        tiles = []
        rows, columns = tile_starts(height, tile_size, overlap, factor), tile_starts(width, tile_size, overlap, factor)
        for i, top in enumerate(rows):
            tile_height = min(tile_size, height)
            vertical = _ramp(tile_height, overlap, rise=i > 0, fall=i < len(rows) - 1)
            for j, left in enumerate(columns):
                tile_width = min(tile_size, width)
                horizontal = _ramp(tile_width, overlap, rise=j > 0, fall=j < len(columns) - 1)
                tiles.append(
                    (slice(top, top + tile_height), slice(left, left + tile_width), vertical[:, None] * horizontal)
                )
        return tiles

    def _layout(self, height: int, width: int, device: torch.device) -> Tuple[TilePlan, list, torch.Tensor]:
        """Plan, tiles with float32 weights on `device`, and the blending normaliser: computed once per size."""
        key = (height, width, str(device))
        if key not in self._layouts:
            tiles = [
                (rows, columns, weights.to(device=device, dtype=torch.float32))
                for rows, columns, weights in self.tiles(height, width)
            ]
            total = torch.zeros((height, width), dtype=torch.float32, device=device)
            for rows, columns, weights in tiles:
                total[rows, columns] += weights
            self._layouts[key] = (self.plan(height, width), tiles, total)
        return self._layouts[key]

    def count_evaluations(self, height: int, width: int, images: int = 1) -> Tuple[int, int]:
        """`(crops, network calls)` per refinement step for `images` inputs of `height x width`."""
        tiles, batch_size = len(self.tiles(height, width)), self.plan(height, width).batch_size
        if tiles == 1 and images <= batch_size:
            return images, 1
        return images * tiles, math.ceil(images * tiles / batch_size)

    def crop_pixels(self, height: int, width: int) -> int:
        """Pixels of one crop the network sees of a `height x width` input: the unit `progress` counts in."""
        tile_size = self.plan(height, width).tile_size
        return min(tile_size, height) * min(tile_size, width)

    def _evaluation(self, count: Union[int, Fraction]):
        return self.progress.evaluation(count) if self.progress is not None else contextlib.nullcontext()

    def forward(self, sample: torch.Tensor, noise_level: torch.Tensor, return_dict: bool = False, **kwargs: Any):
        """Blend the network's outputs over the tiles of `sample` `(B, C, H, W)`; returns `(output,)`."""
        batch, _, height, width = sample.shape
        plan, tiles, total = self._layout(height, width, sample.device)
        # A batch larger than the plan's would exceed the budget in one call: it runs in chunks like tiles do.
        if len(tiles) == 1 and batch <= plan.batch_size:
            with self._evaluation(batch):
                return (self.network(sample, noise_level, return_dict=False, **kwargs)[0],)
        per_sample = {
            name: value
            for name, value in {"noise_level": noise_level, **kwargs}.items()
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
        }
        # Every (image, tile) pair in a row: crops of all images at one tile position sit next to each other.
        jobs = [(index, tile) for tile in range(len(tiles)) for index in range(batch)]
        output = None
        for start in range(0, len(jobs), plan.batch_size):
            chunk = jobs[start : start + plan.batch_size]
            crops = torch.stack([sample[index, :, tiles[tile][0], tiles[tile][1]] for index, tile in chunk])
            arguments = {name: value for name, value in kwargs.items() if name not in per_sample}
            arguments.update({name: value[[index for index, _ in chunk]] for name, value in per_sample.items()})
            level = arguments.pop("noise_level", noise_level)
            with self._evaluation(len(chunk)):
                predicted = self.network(crops, level, return_dict=False, **arguments)[0].float()
            if output is None:
                output = torch.zeros((batch, predicted.shape[1], height, width), device=sample.device)
            for (index, tile), prediction in zip(chunk, predicted):
                rows, columns, weights = tiles[tile]
                output[index, :, rows, columns] += prediction * weights
        return ((output / total).to(sample.dtype),)


@contextlib.contextmanager
def tiled_unet(
    pipeline: Any,
    tile_size: Optional[int],
    overlap: Optional[int] = None,
    batch_size: Optional[int] = 4,
    max_pixels: int = DEFAULT_MAX_TILE_PIXELS,
    progress: Optional[Any] = None,
) -> Iterator[TiledNetwork]:
    """Let `pipeline` refine in tiles for the duration of the `with` block; yields the UNet's tiled stand-in.

    A pipeline's guidance UNet (autoguidance) is tiled the same way, counting into the same `progress`; neither
    stand-in reaches the pipeline's config ([`diffusers_sr3.pipelines.base.stand_ins`]).
    """

    def tiled(network: Any) -> TiledNetwork:
        return TiledNetwork(network, tile_size, overlap, batch_size, max_pixels=max_pixels, progress=progress)

    # Here: the pipelines import this module, so importing them at its top is circular when it is imported first.
    from .pipelines.base import stand_ins

    with stand_ins(pipeline, tiled):
        yield pipeline.unet


def model_tile_size(pipeline: Any) -> int:
    """The size the pipeline's UNet was trained at (`unet.config.sample_size`, the larger side if a pair). Kept for
    code written against earlier versions (the Space called it); the tiling reads the size itself."""
    size = pipeline.unet.config.sample_size
    return int(max(size) if isinstance(size, (tuple, list)) else size)


def crops_per_step(
    pipeline: Any,
    image_size: Tuple[int, int],
    images: int = 1,
    self_ensemble: bool = False,
    network: Any = None,
    tile_size: Optional[int] = None,
    overlap: Optional[int] = None,
    tile_batch_size: Optional[int] = None,
    max_tile_pixels: int = DEFAULT_MAX_TILE_PIXELS,
) -> int:
    """(image, tile) crops the network sees per refinement step when [`tiled_super_resolve`] runs `pipeline` on
    `images` inputs of `image_size` `(width, height)` with these tiling settings: what a progress meter counts.

    A self-ensemble refines each input in 8 orientations, one after another: 4 of its shape, 4 turned a quarter.
    `network` is the network that runs (a backend's); defaults to the pipeline's UNet.
    """
    network = pipeline.unet if network is None else network
    factor, multiple = pipeline.config.upscale_factor, network.downsampling_factor
    width, height = (-(-length * factor // multiple) * multiple for length in image_size)
    tiled = TiledNetwork(network, tile_size, overlap, tile_batch_size, max_pixels=max_tile_pixels)
    crops = tiled.count_evaluations(height, width, images)[0]
    if not self_ensemble:
        return crops
    return 4 * (crops + tiled.count_evaluations(width, height, images)[0])


def tiled_super_resolve(
    pipeline: Any,
    image: ImageInput,
    tile_size: Optional[int] = None,
    overlap: Optional[int] = None,
    tile_batch_size: Optional[int] = None,
    max_tile_pixels: int = DEFAULT_MAX_TILE_PIXELS,
    progress: Optional[Any] = None,
    **call_kwargs: Any,
):
    """Super-resolve `image` with `pipeline` (an `SR3Pipeline`): untiled when it fits the memory budget, otherwise
    in overlapping tiles.

    Args:
        pipeline: the SR3 super-resolution pipeline.
        image: the low-resolution input(s), anything the pipeline accepts.
        tile_size: tile size at the output resolution; defaults to the whole image when it holds at most
            `max_tile_pixels` network-grid pixels, else the fewest evenly sized tiles that fit ([`plan_tiles`]).
        overlap: overlap of neighbouring tiles, at most [`largest_overlap`]; defaults to half the UNet's
            `sample_size` (a quarter of an explicit `tile_size`).
        tile_batch_size: tiles run through the UNet together; defaults to as many as fit `max_tile_pixels`.
        max_tile_pixels: network-grid pixels (image pixels / pixel_unshuffle_factor**2) per evaluation.
        progress: see [`TiledNetwork`].
        **call_kwargs: passed to the pipeline call (`num_inference_steps`, `mode`, `generator`, `output_type`,
            `num_intermediates`, ...).

    Returns:
        The pipeline's output (an `SR3PipelineOutput`, or a tuple with `return_dict=False`).
    """
    with tiled_unet(pipeline, tile_size, overlap, tile_batch_size, max_tile_pixels, progress):
        return pipeline(image, **call_kwargs)
