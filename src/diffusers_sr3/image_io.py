"""Finding and opening image files: the one place every entry point reads images through.

`sr3 upscale`, `sr3 prepare`, `sr3 eval`, the training data, `photos` and the Space all list images with
[`find_images`] / [`walk_images`] and open them with [`open_image`], so they agree on which files are images,
turn phone photos upright (EXIF orientation), convert colour-managed images (Adobe RGB, Display P3, CMYK with a
profile) to sRGB, convert to RGB, and fail with errors that name the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import glob
import io
import logging
import os
import struct
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageChops
import PIL.ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif") + tuple(
    # Formats only some Pillow builds read (AVIF since Pillow 11.2).
    extension
    for extension in (".jfif", ".avif")
    if PIL.Image.registered_extensions().get(extension) in PIL.Image.OPEN
)

# The formats `open_image` decodes: those of `IMAGE_EXTENSIONS` (PPM also reads .pgm, .pbm, .pnm and .pfm). Pillow
# otherwise tries every plugin it has on whatever the file holds, whatever its name: PostScript (EPS) runs
# Ghostscript, and rarely used parsers (FLI, PCX, SGI, ...) meet untrusted uploads and datasets.
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "PPM", "GIF")
# Formats read where a plugin registered them (AVIF is built into Pillow 11.2 and later; pillow-heif and
# pillow-avif-plugin register HEIF and AVIF when imported, which may be after this module).
_PLUGIN_FORMATS = ("AVIF", "HEIF")


def read_formats() -> Tuple[str, ...]:
    """The Pillow format names [`open_image`] reads: PNG, JPEG, WEBP, BMP, TIFF, PPM (also PGM, PBM), GIF, and
    AVIF and HEIF where this Pillow or a plugin reads them. Files in any other format are refused unread."""
    PIL.Image.init()
    return _READ_FORMATS + tuple(name for name in _PLUGIN_FORMATS if name in PIL.Image.OPEN)


ImageData = Union[str, os.PathLike, bytes, bytearray, PIL.Image.Image]

logger = logging.getLogger(__name__)

# Float pixels this far outside their range (half an 8-bit step) are rounding overshoot, from resampling or
# converting an image: clipped. Beyond it they hold what clipping loses (HDR or linear-light highlights).
FLOAT_OVERSHOOT = 0.5 / 255
# Float pixels are read as 0..255 only where the largest value reaches this: an HDR or linear-light image's highlights
# reach a few units, while a 0..255 image whose brightest pixel is below it is nearly black.
FLOAT_WHITE_255_FROM = 16.0


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


def _globbed_image(name: str) -> bool:
    """Whether a glob's match of this name is read: not hidden, with an extension Pillow reads. Wider than a folder
    walk: a pattern that names an extension (`scans/*.pgm`) asks for those files, of the formats [`read_formats`]."""
    extension = os.path.splitext(name)[1].lower()
    image_format = PIL.Image.registered_extensions().get(extension)
    # A camera's MPO (a JPEG with a second picture) opens through JPEG's reader, which is not registered as MPO's.
    readable = ("JPEG" if image_format == "MPO" else image_format) in read_formats()
    return not name.startswith(".") and (is_image_file(name) or readable)


# Folders that a filesystem makes at a disk's top for itself (ext4's `lost+found`, mode 700 for root; Windows' own on
# every NTFS or FAT drive, `$RECYCLE.BIN` holding each user's private folder): a walk of a disk's top, such as a
# mounted data disk or a camera card, would otherwise stop at them as at another user's private folder.
FILESYSTEM_FOLDERS = frozenset({"lost+found", "System Volume Information", "$RECYCLE.BIN"})


def _unlisted(error: OSError) -> None:
    """Raise `error`, a folder's listing that failed, as one that names the folder."""
    raise type(error)(error.errno, f"cannot list the folder {error.filename}: {error.strerror}") from error


# Set while a reader holds the prepared datasets it reads (`training.output_lock.hold_folders_for_reading`): called
# with each folder that a listing of images looks into, and the names of its files where the listing has them, before
# anything below the folder is listed; True where it took that folder's lock just then. A dataset below an input
# folder (`sr3 upscale datasets/`) or reached through a link is found by the listing itself, which walks the tree once.
DATASET_HOLD: contextvars.ContextVar[Optional[Callable[[str, Optional[Sequence[str]]], bool]]] = contextvars.ContextVar(
    "DATASET_HOLD", default=None
)


def _listing(folder: str) -> Tuple[List[str], List[str], List[str]]:
    """`folder`'s subfolders to walk into (no links: a walk does not follow them, as `os.walk`), its files, and
    those of its files that are links, by name."""
    try:
        with os.scandir(folder) as listed:
            entries = list(listed)
    except OSError as error:
        _unlisted(error)
    folders, files, links = [], [], []
    for entry in entries:
        try:
            is_folder = entry.is_dir()
        except OSError:  # as `os.walk`: what cannot be told a folder is listed as a file
            is_folder = False
        if is_folder:
            if not entry.is_symlink():
                folders.append(entry.name)
        else:
            files.append(entry.name)
            if entry.is_symlink():
                links.append(entry.name)
    return folders, files, links


def _hold_datasets_of(real_paths: Sequence[str]) -> None:
    """Offer [`DATASET_HOLD`] the folder of each of `real_paths` (files, links resolved) and its parent: a link or a
    file input may reach a prepared dataset (`OUT/hr_16/x.png`) that no folder the listing looked into holds."""
    hold = DATASET_HOLD.get()
    if hold is None:
        return
    for folder in dict.fromkeys(os.path.dirname(path) for path in real_paths):
        for candidate in (folder, os.path.dirname(folder)):
            hold(candidate, None)


def walk_images(folder: Union[str, os.PathLike]) -> List[str]:
    """Image files under `folder`, recursively, as sorted paths.

    Hidden folders such as `.cache/` and hidden files are skipped: macOS writes `._IMG_0001.png` (AppleDouble
    metadata, no image) beside every file it copies to a foreign disk. So are the folders a filesystem keeps for
    itself at a disk's top (`FILESYSTEM_FOLDERS`: `lost+found`, readable by root alone), which hold no one's photos.
    Links to folders are not followed; links to image files are listed.

    Raises:
        OSError: naming a folder (`folder` or one below it) that cannot be listed, such as another user's private
            folder: `os.walk` would skip it without a word, and a run would miss its images as if it had none.
        OutputFolderBusyError, ValueError: while a reader holds its datasets ([`DATASET_HOLD`]), a prepared dataset
            below `folder`, or one a linked file lies in, is being written or unfinished.
    """
    hold = DATASET_HOLD.get()
    found, linked, pending = [], [], [os.fspath(folder)]
    while pending:
        root = pending.pop()
        folders, files, links = _listing(root)
        if hold is not None and hold(root, files):
            # Listed before its lock: a prepare that ended meanwhile may have written more.
            folders, files, links = _listing(root)
        # Walked in sorted order, as `os.walk` with sorted folders: the first folder that fails is always the same.
        below = sorted(name for name in folders if not name.startswith(".") and name not in FILESYSTEM_FOLDERS)
        pending.extend(os.path.join(root, name) for name in reversed(below))
        found.extend(os.path.join(root, name) for name in files if is_image_file(name) and not name.startswith("."))
        linked.extend(os.path.join(root, name) for name in links if is_image_file(name) and not name.startswith("."))
    _hold_datasets_of([os.path.realpath(path) for path in linked])
    return sorted(found)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard (`photos/**/*.png` -> `photos`)."""
    root = pattern
    while glob.escape(root) != root:
        root = os.path.dirname(root)
    return root


def _check_glob_folders_open(pattern: str) -> None:
    """Raise OSError naming a folder that `glob.glob(pattern, recursive=True)` would look into and cannot, as
    [`walk_images`] does for a folder input: glob skips such a folder (another user's private one) without a word.

    Glob lists the folders that the pattern's part before a wildcard component matches (before `**`: they and every
    folder below them), and looks a name up in those matched before a plain component. They are followed here one
    component at a time, as glob does, so that each folder is listed once (a `**` walks the tree once, not once per
    later component); a folder glob cannot open is still matched, from its parent's listing. A listed folder must
    also let names be looked up in it: glob lists one of mode `r--` (another user's 744) but cannot tell its files
    from folders, and they were dropped as if it held none. `FILESYSTEM_FOLDERS` are left to glob, as a folder walk
    leaves them out. The folders glob will look into are offered to [`DATASET_HOLD`] where it is set.
    """
    root = _glob_root(pattern)
    parts, head = [], pattern
    while head != root:
        head, part = os.path.split(head)
        parts.insert(0, part)
    # "" stands for the current folder, so that the folders found are named as glob names its matches.
    folders = [root] if os.path.isdir(root or os.curdir) else []
    listed, searched = [], []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if part == "**":  # the folders and every folder below them (matches of `folder/**/` end in a separator)
            below = [
                os.path.dirname(match)
                for folder in folders
                for match in glob.glob(os.path.join(glob.escape(folder), "**", ""), recursive=True)
            ]
            folders = list(dict.fromkeys(folders + below))
            listed += folders
        elif glob.has_magic(part):
            listed += folders
            if not last:  # the folders it matches (a trailing separator matches folders only)
                folders = [
                    os.path.dirname(match)
                    for folder in folders
                    for match in glob.glob(os.path.join(glob.escape(folder), part, ""))
                ]
        elif part:
            searched += folders
            folders = [os.path.join(folder, part) for folder in folders if os.path.isdir(os.path.join(folder, part))]
    for folder in dict.fromkeys(listed):
        if os.path.basename(folder) not in FILESYSTEM_FOLDERS:
            try:
                with os.scandir(folder or os.curdir):
                    pass
            except OSError as error:
                _unlisted(error)
            searched.append(folder)
    for folder in dict.fromkeys(searched):
        if os.path.basename(folder) not in FILESYSTEM_FOLDERS and not os.access(folder or os.curdir, os.X_OK):
            raise PermissionError(errno.EACCES, f"cannot look into the folder {folder or os.curdir}: Permission denied")
    hold = DATASET_HOLD.get()
    if hold is not None:  # before glob lists their files, as a folder walk holds a dataset before it lists below it
        for folder in dict.fromkeys(searched):
            hold(folder or os.curdir, None)


def find_image_sources(inputs: Sequence[Union[str, os.PathLike]]) -> List[Tuple[str, str]]:
    """Like [`find_images`], each file with its name relative to the input that found it: its path below a folder
    input (`2023/IMG_0001.png` for the folder `photos`) or below the fixed part of a glob, its file name for a file
    input. Outputs written under these names keep same-named files of different subfolders apart.

    Folders list the files [`walk_images`] would (image extensions, not hidden); globs their matches that are not
    hidden and have an extension Pillow reads; a file named as an input is listed whatever its name. A folder that
    cannot be listed, under a folder input or where a glob looks, is an error naming it (OSError), not skipped.

    Returns:
        `(path, relative_name)` pairs sorted by path; a file found by several inputs is listed once, with the
        path and name the first of them gives it. A file is told by its real path and its name: `a.png`, `./a.png`
        and its absolute path are one input, upscaled once, and so are a folder and a glob over it; symlinks of
        other names to one file stay inputs of their own (a dataset may repeat an image so).
    """
    # Keyed by real path and name: two spellings of one file would otherwise read as a name clash in the outputs.
    found = {}
    for item in map(os.fspath, inputs):
        if os.path.isdir(item):
            matches, root = walk_images(item), item
        elif os.path.isfile(item):
            matches, root = [item], os.path.dirname(item)
        else:
            _check_glob_folders_open(item)
            files = [path for path in glob.glob(item, recursive=True) if os.path.isfile(path)]
            if not files:
                raise FileNotFoundError(f"no such file, folder or matching glob: {item}")
            # `photos/*` also matches the Thumbs.db and .DS_Store a folder input skips.
            matches, root = sorted(path for path in files if _globbed_image(os.path.basename(path))), _glob_root(item)
        real_paths = [os.path.realpath(path) for path in matches]
        if not os.path.isdir(item):  # a folder's walk held its datasets as it went
            _hold_datasets_of(real_paths)
        for path, real_path in zip(matches, real_paths):
            relative = os.path.relpath(path, root or os.curdir)
            found.setdefault((os.path.normcase(real_path), relative), (path, relative))
    if not found:
        raise FileNotFoundError(f"no images found in {' '.join(map(os.fspath, inputs))}")
    return sorted(found.values())


def hold_datasets_in(inputs: Sequence[Union[str, os.PathLike]]) -> None:
    """Hold the prepared datasets under `inputs` (folders, files, glob patterns) that another library will list and
    read, as `datasets.load_dataset` does a training run's `--dataset_name` folder or `--train_data_files`: listed
    here only to find them, while [`DATASET_HOLD`] is set (nothing is listed otherwise).

    Raises:
        OSError: as [`find_image_sources`], naming a folder that cannot be listed.
        OutputFolderBusyError, ValueError: a dataset among them is being written, or unfinished.
    """
    if DATASET_HOLD.get() is None:
        return
    for item in map(os.fspath, inputs):
        if os.path.isdir(item):
            walk_images(item)
            continue
        if not os.path.isfile(item):
            _check_glob_folders_open(item)
        _hold_datasets_of([os.path.realpath(path) for path in glob.glob(item, recursive=True)])


def input_folders(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """The folders that [`find_image_sources`] lists files of: each folder input, and the fixed part of each glob (the
    folder before its first wildcard); a file input is no folder's listing."""
    folders = []
    for item in map(os.fspath, inputs):
        if os.path.isdir(item):
            folders.append(item)
        elif not os.path.isfile(item) and os.path.isdir(_glob_root(item) or os.curdir):
            folders.append(_glob_root(item) or os.curdir)
    return folders


def find_images(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Expand files, folders (recursively, see [`walk_images`]) and glob patterns into a sorted list of files."""
    return [path for path, _ in find_image_sources(inputs)]


def _integer_gray_top(image: PIL.Image.Image) -> int:
    """The largest value of a 32-bit integer gray (`I`) image, whose values must lie in 0..65535.

    Raises:
        UnreadableImageError: for values outside 0..65535 (signed or 32-bit data: a depth map, a raw sensor dump),
            which have no known black and white; reading them as 16-bit wrapped them around, as 8-bit clipped them.
    """
    low, high = image.getextrema()
    if low < 0 or high > 65535:
        raise UnreadableImageError(
            f"32-bit integer gray with values {low}..{high}: only 0..255 (8-bit) and 0..65535 (16-bit) have a known "
            "white; save it as 16-bit, or as float in [0, 1]"
        )
    return high


def _float_white(image: PIL.Image.Image) -> float:
    """The value that means white in a float (`F`) image: 1, or 255 when values reach `FLOAT_WHITE_255_FROM` (16).

    Raises:
        UnreadableImageError: for NaN or infinite values; values outside 0..1 (0..255) by more than
            `FLOAT_OVERSHOOT` of white (an HDR or linear-light image, a depth map): clipping them lost their
            highlights and shadows without a word, and NaN came out black; and a largest value above 1 but below
            16: a 0..1 image that resampling overshot (ringing), or an HDR or linear-light image whose highlights
            reach a few units, far more often than a 0..255 one whose brightest pixel is under 16/255 (nearly
            black): read as 0..255 it came out black.
    """
    values = np.asarray(image)
    if not values.size:
        return 1.0
    if not np.isfinite(values).all():
        raise UnreadableImageError("float gray holding NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    white = 1.0 if high <= 1 + FLOAT_OVERSHOOT else 255.0
    if (
        low < -FLOAT_OVERSHOOT * white
        or high > white * (1 + FLOAT_OVERSHOOT)
        or 1 + FLOAT_OVERSHOOT < high < FLOAT_WHITE_255_FROM
    ):
        raise UnreadableImageError(
            f"float gray with values {low:g}..{high:g}: only 0..1 (or 0..255, where values reach "
            f"{FLOAT_WHITE_255_FROM:g}) has a known "
            "white; clip a 0..1 image that resampling overshot, scale others into 0..1 (tone-map an HDR image)"
        )
    return white


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as 8-bit RGB, alpha dropped, gray repeated.

    PIL's own `convert("RGB")` clips 16- and 32-bit gray and float images at 255: a 16-bit PNG or TIFF comes out
    white. These are scaled from their range instead: 16-bit (`I;16*`, and `I` holding values above 255) by 1/257,
    float (`F`) from [0, 1] (from [0, 255] when values reach 16).

    Raises:
        UnreadableImageError: an `I` image with values outside 0..65535, an `F` image with values outside its range
            or not finite (a `ValueError`, see `_float_white`).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        scale = 257.0 if image.mode != "I" or _integer_gray_top(image) > 255 else 1.0
        image = PIL.Image.fromarray(np.clip(np.rint(values / scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image).astype(np.float64) * (255.0 / _float_white(image))
        image = PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


# The ICC colour space a profile must describe for images of each mode to be converted through it.
# A palette's colours are in its file's RGB profile too (a PNG's iCCP applies to them).
_PROFILE_SPACES = {"RGB": "RGB", "RGBA": "RGB", "RGBX": "RGB", "P": "RGB", "PA": "RGB", "CMYK": "CMYK"}


# Every level of each channel alone and of gray, and a colour cube: what a profile that changes nothing must keep.
_PROBE = PIL.Image.fromarray(
    np.concatenate(
        [
            np.stack([np.arange(256), np.zeros(256), np.zeros(256)], -1),
            np.stack([np.zeros(256), np.arange(256), np.zeros(256)], -1),
            np.stack([np.zeros(256), np.zeros(256), np.arange(256)], -1),
            np.stack([np.arange(256)] * 3, -1),
            np.stack(np.meshgrid(*[np.linspace(0, 255, 16)] * 3, indexing="ij"), -1).reshape(-1, 3)[: 256 * 16],
        ]
    )
    .round()
    .astype(np.uint8)[None]
)


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc_profile: bytes, mode: str):
    """A LittleCMS transform from `mode` pixels in `icc_profile` to sRGB, or None where there is none to make."""
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without LittleCMS: colours are read as sRGB, as before
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if profile.profile.xcolor_space.strip() != _PROFILE_SPACES[mode]:
            return None
        transform = ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, "RGB")
        if mode == "RGB":
            moved = np.abs(np.asarray(ImageCms.applyTransform(_PROBE, transform), np.int16) - np.asarray(_PROBE))
            # An sRGB profile (most tagged photos carry one; LittleCMS rounds a few levels of its own by one):
            # converting would cost 3x the decoding and change nothing.
            if moved.max() <= 1:
                return None
        return transform
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a damaged profile: read as sRGB, as browsers do


def to_srgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` converted to sRGB (as `RGB`) when it carries an ICC colour profile (`info["icc_profile"]`) for its
    mode (RGB, RGBA, palette, CMYK); otherwise, or when the profile cannot be read, `image` itself.

    The networks work in sRGB: an Adobe RGB or Display P3 photo read as sRGB comes out with shifted colours; outputs
    are tagged sRGB (`image_metadata.output_profile`), as Pillow tags the converted image. An sRGB-tagged image
    converts to itself (checked with the IEC 61966-2.1 profile). Alpha is dropped, as [`to_rgb`] drops it.
    """
    icc_profile = image.info.get("icc_profile")
    if not icc_profile or image.mode not in _PROFILE_SPACES:
        return image
    source = image if image.mode in ("RGB", "CMYK") else image.convert("RGB")
    transform = _srgb_transform(bytes(icc_profile), source.mode)
    if transform is None:
        return image
    from PIL import ImageCms

    return ImageCms.applyTransform(source, transform)


def is_16bit_gray(image: PIL.Image.Image) -> bool:
    # Mode "I" holds 16-bit PNGs in older Pillow versions; its values tell 16-bit from 8-bit, as in `to_rgb`. Float
    # gray (scientific TIFFs) has more than 8 bits of precision: it is kept at 16 bits too.
    return image.mode.startswith("I;16") or image.mode == "F" or (image.mode == "I" and _integer_gray_top(image) > 255)


def to_gray16(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit or float gray image (one `is_16bit_gray` accepts: it refuses `I` values outside 0..65535) as `I;16`
    at full precision, float (`F`) scaled to 0..65535 from its white as [`to_rgb`] scales it to 0..255: what files
    are read as with `keep_16bit`, and what the pipelines make of such PIL images."""
    if image.mode == "I;16":
        return image
    if image.mode == "F":
        values = np.rint(np.asarray(image).astype(np.float64) * (65535.0 / _float_white(image)))
        return PIL.Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16))
    return PIL.Image.fromarray(np.asarray(image).astype(np.uint16))


@functools.cache
def _warn_once(message: str) -> None:
    # A file is read several times (checked before any work, then decoded; every epoch of training): one warning.
    logger.warning(message)


_TRANSPOSITIONS = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}
_SIDEWAYS = tuple(_TRANSPOSITIONS[orientation] for orientation in (5, 6, 7, 8))  # they swap width and height


def _orientation(image: PIL.Image.Image, name: str) -> Optional[PIL.Image.Transpose]:
    """How to turn `image` upright by its EXIF orientation, or None where it is stored upright.

    Garbled EXIF that cannot be read (Pillow raises SyntaxError, TypeError, struct.error, ...) gives None, with a
    warning naming `name` (once per name): viewers show such a photo as stored, and its pixels may be whole.
    """
    try:
        orientation = image.getexif().get(PIL.ExifTags.Base.Orientation, 1)
    except _DECODING_ERRORS as error:
        _warn_once(f"{name}: its EXIF orientation could not be read ({error}); read as stored, not turned upright")
        return None
    return _TRANSPOSITIONS.get(orientation) if isinstance(orientation, int) else None


def _upright(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A copy of `image` turned upright by its EXIF orientation (see `_orientation`): phone photos record how the
    camera was held, and viewers and browsers show them turned."""
    image.load()  # damaged pixels fail here, as such, not as damaged metadata below
    method = _orientation(image, name)
    if method is None:
        return image.copy()
    try:
        # Also drops the orientation from the copy's metadata: saved with it, the copy is not turned twice.
        return PIL.ImageOps.exif_transpose(image)
    except _DECODING_ERRORS:
        # Rewriting the metadata without the orientation fails on garbled tags; the orientation itself was read.
        upright = image.transpose(method)
        upright.info.pop("exif", None)
        return upright


def _upright_rgb(image: PIL.Image.Image, name: str, keep_16bit: bool = False) -> PIL.Image.Image:
    """`image` upright, as 8-bit RGB in sRGB, or as `I;16` with `keep_16bit` where it is 16-bit or float gray;
    warnings name it `name`."""
    upright = _upright(image, name)
    if keep_16bit and is_16bit_gray(upright):
        return to_gray16(upright)
    return to_rgb(to_srgb(upright))


# What Pillow raises on damaged data: besides OSError and SyntaxError, its parsers let the errors of a truncated or
# garbled file through as they meet them (seeking a cut GIF: IndexError, struct.error; a TIFF page missing tags:
# TypeError, KeyError; reading or rewriting garbled EXIF: SyntaxError, TypeError, struct.error).
_DECODING_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)


# TIFF's magic bytes: little- and big-endian, classic and BigTIFF.
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_UNDECODABLE_TIFF = (
    "a TIFF layout Pillow cannot decode (such as 32-bit float RGB): save it as 8- or 16-bit RGB or float gray"
)


def _format_of(source: Union[str, os.PathLike, io.BytesIO]) -> Optional[str]:
    """The format Pillow would take the data for, from its first bytes only (no plugin parses more), or None where
    no format, or more than one, accepts them, or the file's extension names a format without magic bytes to check
    (TGA, whose header starts as CUR's)."""
    try:
        if isinstance(source, io.BytesIO):
            prefix = source.getvalue()[:16]
        else:
            named = PIL.Image.registered_extensions().get(os.path.splitext(os.fspath(source))[1].lower())
            if named in PIL.Image.OPEN and PIL.Image.OPEN[named][1] is None:
                return None
            with open(source, "rb") as handle:
                prefix = handle.read(16)
    except OSError:
        return None
    accepting = []
    for name, (_, accept) in PIL.Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                accepting.append(name)
        except _DECODING_ERRORS:  # a check written for longer data
            continue
    return accepting[0] if len(accepting) == 1 else None


def _is_tiff(source: Union[str, os.PathLike, io.BytesIO]) -> bool:
    """Whether the data starts with TIFF's magic bytes."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:4] in _TIFF_MAGIC
    try:
        with open(source, "rb") as handle:
            return handle.read(4) in _TIFF_MAGIC
    except OSError:
        return False


@contextlib.contextmanager
def _opened(source: Union[str, os.PathLike, io.BytesIO], name: str) -> Iterator[PIL.Image.Image]:
    """`PIL.Image.open(source)` of the formats [`read_formats`] reads, with every decoding failure turned into an
    error that names the image."""
    formats = read_formats()
    try:
        with PIL.Image.open(source, formats=formats) as image:
            yield image
    except ImageTooLargeError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {name}") from None
    except PIL.UnidentifiedImageError as error:
        if _is_tiff(source):  # an image, in a layout Pillow lacks: "not an image" would send the user astray
            raise UnreadableImageError(f"cannot read image {name}: {_UNDECODABLE_TIFF}", _UNDECODABLE_TIFF) from None
        image_format = _format_of(source)
        if image_format is not None and image_format not in formats:  # one of them, damaged: Pillow's message
            detail = f"{image_format} data, not a format this reads ({', '.join(formats)})"
            raise UnreadableImageError(f"cannot read image {name}: {detail}", detail, not_an_image=True) from None
        raise UnreadableImageError(f"cannot read image {name}: {error}", str(error), not_an_image=True) from None
    except PIL.Image.DecompressionBombError as error:
        raise _TooLargeToOpen(f"cannot read image {name}: {error}", str(error)) from None
    except _DECODING_ERRORS as error:
        raise UnreadableImageError(f"cannot read image {name}: {error}", str(error)) from None


class _TooLargeToOpen(UnreadableImageError):
    """Beyond Pillow's decompression-bomb limit: unreadable, and too large wherever a pixel limit is set."""


def open_image(
    source: ImageData,
    name: Optional[str] = None,
    *,
    max_pixels: Optional[int] = None,
    draft_size: Optional[int] = None,
    keep_16bit: bool = False,
) -> PIL.Image.Image:
    """Open an image fully (so truncated files fail here), upright by its EXIF orientation, in sRGB (see
    [`to_srgb`]), as RGB.

    Args:
        source: a file path, encoded bytes, or a PIL image (only turned upright and converted).
        name: what error messages call it (default: the path, or "image").
        max_pixels: refuse images with more pixels, from the header, before decoding.
        draft_size: let the decoder reduce the image while keeping both sides at least this (JPEG decodes much
            faster at a reduced scale; other formats ignore it).
        keep_16bit: return 16-bit gray images (PNG, TIFF) as `I;16` at full precision instead of 8-bit RGB (the
            pipelines take `I;16`); float gray (`F`, TIFF) too, scaled to 0..65535 as [`to_rgb`] scales it to 0..255.

    Raises:
        FileNotFoundError: no such file.
        UnreadableImageError: not an image, a damaged one, 32-bit integer gray outside 0..65535 or float gray
            outside 0..1 (0..255) or not finite, which have no known white (a `ValueError`). Garbled EXIF whose
            orientation cannot be read is no error: the image is read as stored, with a warning (logged once per
            `name`).
        ImageTooLargeError: more than `max_pixels` pixels (a `ValueError`), also for images too large for Pillow to
            open at all.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image"
    if isinstance(source, PIL.Image.Image):
        try:
            return _upright_rgb(source, name, keep_16bit)
        except UnreadableImageError as error:  # 32-bit or float gray out of range: named, with a detail, as files are
            raise UnreadableImageError(f"cannot read image {name}: {error}", str(error)) from None
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
            return _upright_rgb(image, name, keep_16bit)
    except _TooLargeToOpen:
        if max_pixels is None:
            raise
        bomb_limit = 2 * PIL.Image.MAX_IMAGE_PIXELS  # Pillow refuses to open images over twice its warning limit
        raise ImageTooLargeError(f"{name} is over {bomb_limit:,} pixels, more than {max_pixels:,}", None) from None


ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
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
        if image.mode not in ALPHA_MODES and "transparency" not in image.info:
            return None
        return _upright(image, name).convert("RGBA").getchannel("A")


class ImageFacts(NamedTuple):
    """What [`inspect_image`] found out about an image file.

    Attributes:
        size: `(width, height)` as displayed (EXIF orientation applied).
        frames: frames in the file (animated GIF, WebP, multi-page TIFF); readers take the first. 1 where the
            frames after the first are damaged (they cannot be counted, and are never read).
        transparent: whether some pixel is less than fully opaque.
        grayscale: whether it is a black-and-white picture ([`is_grayscale`]).
        sixteen_bit: whether it is 16-bit or float gray ([`open_image`] with `keep_16bit` keeps its precision).
        sixteen_bit_colour: whether it is colour at 16 bits per channel, which Pillow reads at 8.
    """

    size: Tuple[int, int]
    frames: int
    transparent: bool
    grayscale: bool
    sixteen_bit: bool
    sixteen_bit_colour: bool = False


def _colour_read_at_8_bits(image: PIL.Image.Image) -> bool:
    """Whether `image` (opened, not yet loaded) stores colour at 16 bits per channel: Pillow has no such mode and
    decodes it to 8-bit `RGB` or `RGBA` (its raw mode, such as PNG's `RGB;16B`, tells; BMP's `BGR;16` is 5-6-5
    bits a pixel, no loss)."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    for tile in image.tile:
        args = tile[3]  # a plain tuple before Pillow 11, which has no `.args`
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and rawmode.endswith((";16B", ";16L", ";16N")):
            return True
    return False


def inspect_image(path: Union[str, os.PathLike]) -> ImageFacts:
    """Decode an image file fully (so damaged files fail here, with [`open_image`]'s errors), note what a caller
    writing a result needs to know, and drop the pixels: a folder of photos can be checked before any work without
    holding them all in memory."""
    name = os.fspath(path)
    with _opened(path, name) as image:
        try:
            frames = getattr(image, "n_frames", 1)
        except Exception:  # counting seeks through every frame; only the first is read, and it may be whole
            frames = 1
            image.seek(0)
        sixteen_bit_colour = _colour_read_at_8_bits(image)
        image.load()
        transparent = (image.mode in ALPHA_MODES or "transparency" in image.info) and (
            image.convert("RGBA").getchannel("A").getextrema()[0] < 255
        )
        picture = _upright_rgb(image, name, keep_16bit=True)
    return ImageFacts(
        picture.size, frames, transparent, is_grayscale(picture), picture.mode == "I;16", sixteen_bit_colour
    )


def image_size(path: Union[str, os.PathLike]) -> Tuple[int, int]:
    """`(width, height)` of an image file as displayed (EXIF orientation applied, as [`open_image`] applies it: not
    where the EXIF cannot be read), without decoding the pixels.

    Raises the same errors as [`open_image`] for files that are no image; damaged pixel data is found only when
    the image is opened.
    """
    name = os.fspath(path)
    with _opened(path, name) as image:
        width, height = image.size
        method = _orientation(image, name)
    return (height, width) if method in _SIDEWAYS else (width, height)
