"""Seamless tiled super-resolution of images larger than the size an SR3 model was trained at.

The pipeline refines ONE full-size noisy image, so every tile shares the same noise field and the same scheduler
state. At each refinement step the network sees overlapping `tile_size` crops of its input (noisy image + upsampled
condition), in batches, and its per-tile predictions are blended back into one full-size prediction with
raised-cosine weights that fall smoothly to zero towards the inner tile edges. The scheduler then updates the whole
image at once, so overlapping tiles cannot drift apart and no seam forms (MultiDiffusion-style blending).
For a network whose output at a pixel depends only on nearby pixels, the result equals the untiled one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, List, Optional, Tuple

import torch

from .image_processing import ImageInput


def _check_tiles(tile: int, overlap: int) -> None:
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile_size >= 1 and 0 <= overlap < tile_size, got {tile} and {overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, evenly spread, neighbours overlapping >= `overlap`.

    A length that fits in one tile gives `[0]` (the tile is then clipped to `length`).
    """
    _check_tiles(tile, overlap)
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


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


class TiledNetwork(torch.nn.Module):
    """Runs an SR3 UNet over overlapping tiles of its input and blends the outputs (see the module docstring).

    Stands in for the pipeline's UNet during one call: same `config`, `dtype`, `device` and call signature.

    Args:
        network: the SR3 UNet.
        tile_size: tile height and width (the size the network was trained at; a multiple of its downsampling
            factor).
        overlap: minimum overlap of neighbouring tiles in pixels; blending happens across it.
        batch_size: tiles run through the network together.
    """

    def __init__(self, network: torch.nn.Module, tile_size: int, overlap: int, batch_size: int = 4):
        super().__init__()
        factor = network.downsampling_factor
        if tile_size % factor:
            raise ValueError(f"tile_size {tile_size} is not a multiple of the UNet's downsampling factor {factor}")
        if batch_size < 1:
            raise ValueError(f"the tile batch size must be at least 1, got {batch_size}")
        _check_tiles(tile_size, overlap)
        self.network = network
        self.tile_size = tile_size
        self.overlap = overlap
        self.batch_size = batch_size

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

    def tiles(self, height: int, width: int) -> List[Tuple[slice, slice, torch.Tensor]]:
        """The tiles of a `height x width` input: `(rows, columns, weights)` with `(h, w)` float64 weights."""
        tiles = []
        rows, columns = (
            tile_starts(height, self.tile_size, self.overlap),
            tile_starts(width, self.tile_size, self.overlap),
        )
        for i, top in enumerate(rows):
            tile_height = min(self.tile_size, height)
            vertical = _ramp(tile_height, self.overlap, rise=i > 0, fall=i < len(rows) - 1)
            for j, left in enumerate(columns):
                tile_width = min(self.tile_size, width)
                horizontal = _ramp(tile_width, self.overlap, rise=j > 0, fall=j < len(columns) - 1)
                tiles.append(
                    (slice(top, top + tile_height), slice(left, left + tile_width), vertical[:, None] * horizontal)
                )
        return tiles

    def forward(self, sample: torch.Tensor, noise_level: torch.Tensor, return_dict: bool = False, **kwargs: Any):
        """Blend the network's outputs over the tiles of `sample` `(B, C, H, W)`; returns `(output,)`."""
        batch, _, height, width = sample.shape
        tiles = self.tiles(height, width)
        if len(tiles) == 1:
            return (self.network(sample, noise_level, return_dict=False, **kwargs)[0],)
        per_sample = {
            name: value
            for name, value in {"noise_level": noise_level, **kwargs}.items()
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
        }
        # Every (image, tile) pair in a row: crops of all images at one tile position sit next to each other.
        jobs = [(index, tile) for tile in range(len(tiles)) for index in range(batch)]
        output = None
        total = torch.zeros((1, 1, height, width), dtype=torch.float32, device=sample.device)
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            crops = torch.stack([sample[index, :, tiles[tile][0], tiles[tile][1]] for index, tile in chunk])
            arguments = {name: value for name, value in kwargs.items() if name not in per_sample}
            arguments.update({name: value[[index for index, _ in chunk]] for name, value in per_sample.items()})
            level = arguments.pop("noise_level", noise_level)
            predicted = self.network(crops, level, return_dict=False, **arguments)[0].float()
            if output is None:
                output = torch.zeros((batch, predicted.shape[1], height, width), device=sample.device)
            for (index, tile), prediction in zip(chunk, predicted):
                rows, columns, weights = tiles[tile]
                weights = weights.to(device=sample.device, dtype=torch.float32)
                output[index, :, rows, columns] += prediction * weights
        for rows, columns, weights in tiles:
            total[0, 0, rows, columns] += weights.to(device=sample.device, dtype=torch.float32)
        return ((output / total).to(sample.dtype),)


@contextlib.contextmanager
def tiled_unet(pipeline: Any, tile_size: int, overlap: int, batch_size: int = 4) -> Iterator[TiledNetwork]:
    """Let `pipeline` refine in tiles for the duration of the `with` block.

    The UNet is swapped in the instance dictionary, not with `setattr`, so the pipeline's config (what
    save_pretrained writes) never sees the wrapper.
    """
    network = pipeline.unet
    wrapper = TiledNetwork(network, tile_size, overlap, batch_size)
    vars(pipeline)["unet"] = wrapper
    try:
        yield wrapper
    finally:
        vars(pipeline)["unet"] = network


def model_tile_size(pipeline: Any) -> int:
    """The size the pipeline's UNet was trained at (`unet.config.sample_size`, the larger side if a pair)."""
    size = pipeline.unet.config.sample_size
    return int(max(size) if isinstance(size, (tuple, list)) else size)


def tiled_super_resolve(
    pipeline: Any,
    image: ImageInput,
    tile_size: Optional[int] = None,
    overlap: Optional[int] = None,
    tile_batch_size: int = 4,
    **call_kwargs: Any,
):
    """Super-resolve `image` with `pipeline` (an `SR3Pipeline`), in overlapping tiles when the output is larger
    than a tile.

    Args:
        pipeline: the SR3 super-resolution pipeline.
        image: the low-resolution input(s), anything the pipeline accepts.
        tile_size: tile size at the output resolution; defaults to the UNet's `sample_size`.
        overlap: overlap of neighbouring tiles; defaults to a quarter of the tile size.
        tile_batch_size: tiles run through the UNet together.
        **call_kwargs: passed to the pipeline call (`num_inference_steps`, `generator`, `output_type`,
            `num_intermediates`, ...).

    Returns:
        The pipeline's output (an `SR3PipelineOutput`, or a tuple with `return_dict=False`).
    """
    tile_size = tile_size or model_tile_size(pipeline)
    overlap = tile_size // 4 if overlap is None else overlap
    with tiled_unet(pipeline, tile_size, overlap, tile_batch_size):
        return pipeline(image, **call_kwargs)
