"""Decoding one training image to a tensor, and what makes an image unusable (skipped and counted)."""

from __future__ import annotations

import os
from typing import Any, Union

import numpy as np
import PIL.Image
import torch

from ..image_io import UnreadableImageError, open_image
from ..image_processing import images_to_tensor

# How many consecutive bad images a sample may skip before the run stops with an error.
MAX_CONSECUTIVE_BAD = 64


class UnusableDataError(ValueError):
    """The data has too few usable images to go on: raised instead of skipping forever."""


class BadImageError(ValueError):
    """One image cannot be used (unreadable, truncated, too small); `reason` is a short category."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: Union[bytes, str, PIL.Image.Image, np.ndarray, torch.Tensor], name: str) -> torch.Tensor:
    """Decode an image (encoded bytes, a file path, a PIL image, an array or a tensor) to `(3, H, W)` in [-1, 1]."""
    if isinstance(data, (bytes, bytearray, str, os.PathLike, PIL.Image.Image)):
        try:
            data = open_image(data, name, keep_16bit=True)  # as `sr3 upscale` reads it: all of a 16-bit image's levels
        except FileNotFoundError:
            raise BadImageError(f"{name}: file not found", "missing") from None
        except UnreadableImageError as error:
            raise BadImageError(f"{name}: cannot decode image ({error.detail})", "unreadable") from None
    try:
        return images_to_tensor(data, what=name)[0]
    except (TypeError, ValueError) as error:
        raise BadImageError(f"{name}: {error}", "unreadable") from None


def item_name(name: str, item: Any, image_column: str) -> str:
    """`name` (`dataset[3]`), with the file a `datasets` item was read from where it records one: one bad image
    among thousands of an imagefolder is found by its path, not its position."""
    image = item.get(image_column) if isinstance(item, dict) else None
    path = image.get("path") if isinstance(image, dict) else None
    return f"{name} ({path})" if isinstance(path, str) and path else name


def extract_image(item: Any, image_column: str) -> Any:
    """The image of a dataset item: the item itself, or `item[image_column]` (a `datasets` `Image` value)."""
    if isinstance(item, dict):
        if image_column not in item:
            raise ValueError(f"dataset items have no column {image_column!r} (columns: {sorted(item)}); --image_column")
        item = item[image_column]
        if isinstance(item, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
    return item
