"""Making one training sample (HR crop, LR, upsampled condition) from a high-resolution image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..image_processing import degrade, resize_bicubic, upsample_condition
from .decoding import BadImageError


@dataclass
class PairMaker:
    """Turns one high-resolution image (and an optional stored low-resolution one) into a training sample.

    Args:
        resolution: the training (high-resolution) size; images are cropped square to it.
        upscale_factor: super-resolution factor, or None for unconditional training.
        random_flip: flip horizontally with probability 1/2.
        random_rotate: turn by a uniformly drawn multiple of 90 degrees. With `random_flip`, every sample is one of
            the square's 8 flips and quarter-turns with equal probability (EDSR's training augmentation).
        random_crop: take a random `resolution` crop at full scale; otherwise resize the shorter side to
            `resolution` and take the centre crop.
        lr_blur_sigma: if > 0, blur the low-resolution image with a Gaussian of sigma uniform in
            [0, lr_blur_sigma] (the SR3 paper's cascade augmentation).
        film_grain_max: if > 0, add film-like grain (`film_grain`) to the high-resolution crop before the
            low-resolution image is made from it, with a standard deviation uniform in [0, film_grain_max] 8-bit
            levels. Clean digital photos teach a model that photos have no grain, so on film scans it draws none;
            grainy crops let it learn to draw grain where the input carries its trace.
        film_grain_probability: the fraction of crops that get grain (with `film_grain_max`).
    """

    resolution: int
    upscale_factor: Optional[int] = None
    random_flip: bool = True
    random_crop: bool = False
    lr_blur_sigma: float = 0.0
    random_rotate: bool = False
    film_grain_max: float = 0.0
    film_grain_probability: float = 0.5

    def crop(self, image: torch.Tensor, generator: Optional[torch.Generator], name: str) -> torch.Tensor:
        """Square crop of `image` `(3, H, W)` to `resolution` (random, or centre without a generator, at full scale;
        or resized-centre); too small is bad."""
        height, width = image.shape[-2:]
        size = self.resolution
        if min(height, width) < size:
            raise BadImageError(f"{name}: {height}x{width} is smaller than the training resolution {size}", "small")
        if self.random_crop:
            if generator is None:  # no augmentation: the centre crop, at full scale like the random ones
                top, left = (height - size) // 2, (width - size) // 2
            else:
                top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
            return image[:, top : top + size, left : left + size]
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        image = resize_bicubic(image[None], new_size)[0]
        top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        return image[:, top : top + size, left : left + size]

    def __call__(
        self,
        high_resolution: torch.Tensor,
        low_resolution: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        augment: bool = True,
        name: str = "image",
    ) -> Dict[str, torch.Tensor]:
        """Make `{"hr": (3, R, R)}` (plus `"condition"` for super-resolution), all float32 in [-1, 1].

        A stored `low_resolution` image must be exactly `resolution / upscale_factor` square and its partner
        exactly `resolution`: stored pairs are never cropped, so they stay aligned.
        """
        size = self.resolution
        if low_resolution is not None:
            expected = size // self.upscale_factor
            if tuple(high_resolution.shape[-2:]) != (size, size) or tuple(low_resolution.shape[-2:]) != (
                expected,
                expected,
            ):
                raise BadImageError(
                    f"{name}: stored pair is {tuple(high_resolution.shape[-2:])} / {tuple(low_resolution.shape[-2:])}"
                    f", expected ({size}, {size}) / ({expected}, {expected})",
                    "size mismatch",
                )
        else:
            high_resolution = self.crop(high_resolution, generator if augment else None, name)
        if augment and self.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            high_resolution = high_resolution.flip(-1)
            low_resolution = None if low_resolution is None else low_resolution.flip(-1)
        # Drawn after the flip, and only when asked for, so runs without rotations keep their exact draws.
        if augment and self.random_rotate:
            quarter_turns = int(torch.randint(0, 4, (1,), generator=generator))
            high_resolution = torch.rot90(high_resolution, quarter_turns, dims=(-2, -1))
            if low_resolution is not None:
                low_resolution = torch.rot90(low_resolution, quarter_turns, dims=(-2, -1))
        if augment and self.film_grain_max > 0 and self.upscale_factor is not None:
            if low_resolution is not None:
                raise ValueError(
                    f"{name}: film grain is added to the HR before its LR is made; a stored pair's LR cannot follow"
                )
            if float(torch.rand((), generator=generator)) < self.film_grain_probability:
                std = float(torch.rand((), generator=generator)) * self.film_grain_max * 2 / 255
                grain = film_grain(high_resolution.shape, std, generator)
                high_resolution = (high_resolution + grain).clamp(-1, 1)
        sample = {"hr": high_resolution.float().contiguous()}
        if self.upscale_factor is None:
            return sample
        if low_resolution is None:
            low_resolution = degrade(high_resolution[None], self.upscale_factor)[0][0]
        if augment and self.lr_blur_sigma > 0:
            sigma = float(torch.rand((), generator=generator)) * self.lr_blur_sigma
            low_resolution = gaussian_blur(low_resolution, sigma)
        sample["lr"] = low_resolution.float().contiguous()
        sample["condition"] = upsample_condition(low_resolution[None], (size, size))[0].float().contiguous()
        return sample


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `(3, H, W)` with reflect padding; sigma below 0.05 px is a no-op."""
    if sigma < 0.05:
        return image
    from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

    radius = max(1, math.ceil(3 * sigma))
    kernel = min(2 * radius + 1, 2 * ((min(image.shape[-2:]) - 1) // 2) + 1)
    return tv_gaussian_blur(image[None], [kernel, kernel], [sigma, sigma])[0]


# Measured on the flattest fifth of Kodak film scans (pyiqa's reference photos): the grain's channels correlate
# 0.6-0.9, and neighbouring pixels 0.1-0.4 (median 0.3), which a 0.5-px Gaussian reproduces (0.26; 0.02 two apart).
GRAIN_SHARED_VARIANCE = 0.75
GRAIN_CLUMP_SIGMA = 0.5


def film_grain(shape: torch.Size, std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Film-like grain of `shape` `(3, H, W)` and standard deviation `std`: Gaussian, mostly shared by the three
    channels (variance fraction `GRAIN_SHARED_VARIANCE`) and slightly clumped (`GRAIN_CLUMP_SIGMA`)."""
    shared = torch.randn((1, *shape[-2:]), generator=generator)
    own = torch.randn(tuple(shape), generator=generator)
    grain = GRAIN_SHARED_VARIANCE**0.5 * shared + (1 - GRAIN_SHARED_VARIANCE) ** 0.5 * own
    grain = gaussian_blur(grain, GRAIN_CLUMP_SIGMA)
    return grain * (std / grain.std().clamp(min=1e-12))


def _position_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_000_007 + position


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The random source of one sample's augmentation: a function of (seed, epoch, position) only. A map-style
    dataset's position is the sample's index, so a resumed run, any number of dataloader workers and any process
    count give every sample the same draws. A stream has no index: its position is the item's place in what one
    worker reads, interleaved over the workers (`place * num_workers + worker_id`), so each sample draws its own
    and a resumed run with the same worker count draws as the first; another worker count reads a different
    share of the stream per worker, and so gives other draws."""
    return torch.Generator().manual_seed(_position_seed(seed, epoch, position))


def batch_generator(seed: int, epoch: int, batch_index: int) -> torch.Generator:
    """The random source of choices made per batch (its crop size), like [`sample_generator`] a function of
    (seed, epoch, batch index) only, and distinct from every sample's (their seeds are not negative)."""
    return torch.Generator().manual_seed(-1 - _position_seed(seed, epoch, batch_index))


def cut_into_crops(batch: Dict[str, torch.Tensor], size: int, upscale_factor: Optional[int]) -> Dict[str, torch.Tensor]:
    """Cut a batch of square training samples into their `(R / size)**2` crops of `size`, row by row.

    Every image entry of the batch is cut: `"hr"` into `size` crops, `"lr"` into `size / upscale_factor` crops,
    and the condition is the bicubic upsample of each LR crop, as [`PairMaker`] makes it for a sample of `size`.
    The LR crops are cut from the whole sample's LR, so their pixels near the cut keep their context (as in a
    large photo), and a stored or blurred LR stays what it was. Other entries (`"skipped"`) are kept as they are.
    """
    resolution = batch["hr"].shape[-1]
    if resolution % size or (upscale_factor and size % upscale_factor):
        raise ValueError(
            f"crops of {size} do not tile samples of {resolution}"
            + (f" at the LR's scale (x{upscale_factor})" if upscale_factor else "")
        )
    count = resolution // size

    def cut(images: torch.Tensor, crop: int) -> torch.Tensor:
        batch_size, channels = images.shape[:2]
        crops = images.reshape(batch_size, channels, count, crop, count, crop).permute(0, 2, 4, 1, 3, 5)
        return crops.reshape(batch_size * count * count, channels, crop, crop)

    cut_batch = dict(batch, hr=cut(batch["hr"], size))
    if batch.get("lr") is not None:
        cut_batch["lr"] = cut(batch["lr"], size // upscale_factor)
        cut_batch["condition"] = upsample_condition(cut_batch["lr"], (size, size))
    return cut_batch
