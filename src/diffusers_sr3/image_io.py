"""Finding and opening image files: the one place every entry point reads images through.

`sr3 upscale`, `sr3 prepare`, `sr3 eval`, the training data, `photos` and the Space all list images with
[`find_images`] / [`walk_images`] and open them with [`open_image`], so they agree on which files are images,
turn phone photos upright (EXIF orientation), convert to RGB, and fail with errors that name the file.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageChops
import PIL.ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")

ImageData = Union[str, os.PathLike, bytes, bytearray, PIL.Image.Image]


class UnreadableImageError(ValueError):
    """The data cannot be decoded as an image.

    Attributes:
        not_an_image: True when the data is no image format PIL knows; False for a damaged (e.g. truncated) or
            unsupported image.
        detail: the decoder's own message.
    """

    def __init__(self, message: str, detail: str = "", not_an_image: bool = False):
        super().__init__(message)
        self.detail, self.not_an_image = detail, not_an_image


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (checked from the header, before decoding); `size` is `(W, H)`, or None
    for an image beyond Pillow's decompression-bomb limit, whose size Pillow does not tell."""

    def __init__(self, message: str, size: Optional[Tuple[int, int]]):
        super().__init__(message)
        self.size = size


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    """Whether a file name has one of the `IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def walk_images(folder: Union[str, os.PathLike]) -> List[str]:
    """Image files under `folder`, recursively, as sorted paths (hidden folders such as `.cache/` are skipped)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found.extend(os.path.join(root, name) for name in files if is_image_file(name))
    return sorted(found)


def find_images(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Expand files, folders (recursively, see [`walk_images`]) and glob patterns into a sorted list of files."""
    found: List[str] = []
    for item in map(os.fspath, inputs):
        if os.path.isdir(item):
            found.extend(walk_images(item))
        elif os.path.isfile(item):
            found.append(item)
        else:
            matches = [path for path in glob.glob(item, recursive=True) if os.path.isfile(path)]
            if not matches:
                raise FileNotFoundError(f"no such file, folder or matching glob: {item}")
            found.extend(matches)
    if not found:
        raise FileNotFoundError(f"no images found in {' '.join(map(os.fspath, inputs))}")
    return sorted(dict.fromkeys(found))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as 8-bit RGB, alpha dropped, gray repeated.

    PIL's own `convert("RGB")` clips 16- and 32-bit gray and float images at 255: a 16-bit PNG or TIFF comes out
    white. These are scaled from their range instead: 16-bit (`I;16*`, and `I` holding values above 255) by 1/257,
    float (`F`) from [0, 1] (from [0, 255] when values exceed 1).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        scale = 257.0 if image.mode != "I" or values.max() > 255 else 1.0
        image = PIL.Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        scale = 255.0 if values.max() <= 1 else 1.0
        image = PIL.Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _upright_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # Phone photos record their orientation in EXIF: turn them upright, as image viewers and browsers show them.
    return to_rgb(PIL.ImageOps.exif_transpose(image))


@contextlib.contextmanager
def _opened(source: Union[str, os.PathLike, io.BytesIO], name: str) -> Iterator[PIL.Image.Image]:
    """`PIL.Image.open(source)`, with every decoding failure turned into an error that names the image."""
    try:
        with PIL.Image.open(source) as image:
            yield image
    except ImageTooLargeError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {name}") from None
    except PIL.UnidentifiedImageError as error:
        raise UnreadableImageError(f"cannot read image {name}: {error}", str(error), not_an_image=True) from None
    except PIL.Image.DecompressionBombError as error:
        raise _TooLargeToOpen(f"cannot read image {name}: {error}", str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"cannot read image {name}: {error}", str(error)) from None


class _TooLargeToOpen(UnreadableImageError):
    """Beyond Pillow's decompression-bomb limit: unreadable, and too large wherever a pixel limit is set."""


def open_image(
    source: ImageData,
    name: Optional[str] = None,
    *,
    max_pixels: Optional[int] = None,
    draft_size: Optional[int] = None,
) -> PIL.Image.Image:
    """Open an image fully (so truncated files fail here), upright by its EXIF orientation, as RGB.

    Args:
        source: a file path, encoded bytes, or a PIL image (only turned upright and converted).
        name: what error messages call it (default: the path, or "image").
        max_pixels: refuse images with more pixels, from the header, before decoding.
        draft_size: let the decoder reduce the image while keeping both sides at least this (JPEG decodes much
            faster at a reduced scale; other formats ignore it).

    Raises:
        FileNotFoundError: no such file.
        UnreadableImageError: not an image, or a damaged one (a `ValueError`).
        ImageTooLargeError: more than `max_pixels` pixels (a `ValueError`), also for images too large for Pillow to
            open at all.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image"
    if isinstance(source, PIL.Image.Image):
        return _upright_rgb(source)
    try:
        with _opened(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, name) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name} is {width}x{height} = {width * height:,} pixels, more than {max_pixels:,}", image.size
                )
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return _upright_rgb(image)
    except _TooLargeToOpen:
        if max_pixels is None:
            raise
        bomb_limit = 2 * PIL.Image.MAX_IMAGE_PIXELS  # Pillow refuses to open images over twice its warning limit
        raise ImageTooLargeError(f"{name} is over {bomb_limit:,} pixels, more than {max_pixels:,}", None) from None


GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def is_grayscale(image: PIL.Image.Image) -> bool:
    """Whether `image` is a black-and-white picture: a gray mode, or colour channels that are all equal (a
    black-and-white photo saved as RGB, or the RGB [`open_image`] makes of a gray file).

    The networks see RGB and may tint such a picture slightly; a caller writing the result turns it back to gray.
    """
    if image.mode in GRAYSCALE_MODES:
        return True
    red, green, blue = to_rgb(image).split()
    return (
        PIL.ImageChops.difference(red, green).getbbox() is None
        and PIL.ImageChops.difference(green, blue).getbbox() is None
    )


def open_alpha(path: Union[str, os.PathLike]) -> Optional[PIL.Image.Image]:
    """The transparency of an image file as an upright `L` image, or None when it has none.

    [`open_image`] gives RGB, which is what the networks take; a caller that writes a result in a format with
    transparency puts this back. Files without transparency (known from the header) are not decoded.
    """
    name = os.fspath(path)
    with _opened(path, name) as image:
        if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in image.info:
            return None
        image.load()
        return PIL.ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")


def image_size(path: Union[str, os.PathLike]) -> Tuple[int, int]:
    """`(width, height)` of an image file as displayed (EXIF orientation applied), without decoding the pixels.

    Raises the same errors as [`open_image`] for files that are no image; damaged pixel data is found only when
    the image is opened.
    """
    with _opened(path, os.fspath(path)) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(PIL.ExifTags.Base.Orientation, 1)
        except (OSError, SyntaxError, ValueError):  # metadata past a truncation: the decoder reports it later
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
