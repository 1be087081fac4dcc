"""What an upscaled image keeps of its input file's metadata, and the one function that writes it with them.

A photographer's file says more than its pixels: the camera and the date (EXIF), its print size (DPI), the colour
space its values are in (an ICC profile). An output written without them loses the camera and date, prints at the
wrong size, and is shown in a colour-managed viewer with colours the file no longer states. [`read_metadata`] reads
what an output should keep, and [`save_options`] turns it into Pillow save options for the output's format:

- EXIF: kept (camera, lens, exposure, date), without the orientation (the pixels were turned upright when read), the
  location (GPS, a TIFF's GeoTIFF tags and IPTC: upscaled photos are shared, and the location would go with them
  unasked), the thumbnail (a picture of the input) and the maker notes (which may hold another, and offsets that
  break when moved); the image size and resolution tags are set to the output's.
- DPI: multiplied by the upscale factor, so that the output prints at the input's size, as a scan at 4x the DPI.
- ICC profile: the pixels are converted to sRGB when read (the networks work in sRGB, see `image_io.to_srgb`), so an
  output is tagged with the profile its values are in: the input's own where it is sRGB (or gray, which is not
  converted), sRGB's where the input's was another (Adobe RGB, Display P3, CMYK). Untagged inputs give untagged outputs.

JPEG, PNG, WebP, TIFF and AVIF hold all three (WebP no DPI); BMP the DPI only; GIF, PPM, TGA none.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import PIL.ExifTags
import PIL.Image

from .image_io import _DECODING_ERRORS, _SIDEWAYS, _opened, _orientation, _srgb_transform

logger = logging.getLogger(__name__)

# The formats whose files Pillow writes each kind of metadata into.
EXIF_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "AVIF")
ICC_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "AVIF")
DPI_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
# The most EXIF a JPEG holds (one APP1 segment): Pillow's limit on `Exif.tobytes()`, its "Exif\0\0" header included.
JPEG_EXIF_BYTES = 65533

_Base, _IFD = PIL.ExifTags.Base, PIL.ExifTags.IFD
# Tags (of the main and Exif directories) that describe the input file's layout (a TIFF's EXIF is its own directory:
# strips, bits per sample, compression), its thumbnail, or what the output gets anew (its orientation, size and
# resolution; its profile, XMP and Photoshop blocks, which may repeat the orientation and the location), and those
# below: never copied.
_NOT_CARRIED = frozenset(
    {
        _Base.NewSubfileType,
        _Base.SubfileType,
        _Base.ImageWidth,
        _Base.ImageLength,
        _Base.BitsPerSample,
        _Base.Compression,
        _Base.PhotometricInterpretation,
        _Base.FillOrder,
        _Base.StripOffsets,
        _Base.Orientation,
        _Base.SamplesPerPixel,
        _Base.RowsPerStrip,
        _Base.StripByteCounts,
        _Base.PlanarConfiguration,
        _Base.Predictor,
        _Base.ColorMap,
        _Base.TileWidth,
        _Base.TileLength,
        _Base.TileOffsets,
        _Base.TileByteCounts,
        _Base.ExtraSamples,
        _Base.SampleFormat,
        _Base.JpegIFOffset,
        _Base.JpegIFByteCount,
        _Base.YCbCrSubSampling,
        _Base.YCbCrPositioning,
        _Base.XMLPacket,
        _Base.ImageResources,
        _Base.InterColorProfile,
        _IFD.GPSInfo,
        _IFD.Interop,
        # A pointer into the input file (a TIFF's reduced-resolution pages): in the output it points at other bytes.
        _Base.SubIFDs,
        # The camera maker's private block, copied verbatim to another place: Canon's, Olympus's, Sony's offsets
        # count from the EXIF header and then point at other bytes, and Nikon's and Olympus's hold a preview image
        # of the photo, as the thumbnail does.
        _Base.MakerNote,
        # IPTC (caption, keywords, and the city and country shown), as the XMP and Photoshop blocks that repeat it.
        _Base.IPTCNAA,
        # A TIFF's GeoTIFF georeferencing (ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory,
        # GeoDoubleParams, GeoAsciiParams): a location, and its pixel scale no longer the output's.
        33550,
        33922,
        34264,
        34735,
        34736,
        34737,
        # Photoshop's layers in a TIFF (ImageSourceData): the whole input again, at its size.
        37724,
    }
)

ImageFile = Union[str, os.PathLike]


class InputMetadata(NamedTuple):
    """What [`read_metadata`] found in an input file for its output.

    Attributes:
        size: `(width, height)` upright (EXIF orientation applied, as the pixels are read).
        exif: the EXIF to carry (see the module's docstring), or None.
        dpi: `(x, y)` dots per inch upright, or None where the file states none.
        icc_profile: the input's ICC profile, or None.
        name: what warnings call the input.
    """

    size: Tuple[int, int]
    exif: Optional[PIL.Image.Exif]
    dpi: Optional[Tuple[float, float]]
    icc_profile: Optional[bytes]
    name: str = "image"


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _carried_exif(image: PIL.Image.Image, name: str) -> Optional[PIL.Image.Exif]:
    """The EXIF of `image` that an output keeps, or None where it has none or it cannot be read (with a warning)."""
    try:
        source = image.getexif()
        exif_ifd = dict(source.get_ifd(_IFD.Exif)) if _IFD.Exif in source else {}
    except _DECODING_ERRORS as error:
        _warn_once(f"{name}: its EXIF could not be read ({error}); the output is written without it")
        return None
    carried = PIL.Image.Exif()
    for tag, value in source.items():
        if tag not in _NOT_CARRIED and tag != _IFD.Exif:
            carried[tag] = value
    exif_ifd = {tag: value for tag, value in exif_ifd.items() if tag not in _NOT_CARRIED}
    if exif_ifd:
        carried[_IFD.Exif] = exif_ifd
    return carried if len(carried) else None


def _exif_dpi(exif: Optional[PIL.Image.Exif]) -> Optional[Tuple[float, float]]:
    """The `(x, y)` dots per inch `exif` states, or None (also where its unit is 1, none: a pixel aspect ratio)."""
    if exif is None:
        return None
    x, y = _positive(exif.get(_Base.XResolution)), _positive(exif.get(_Base.YResolution))
    inches = {2: 1.0, 3: 2.54}.get(exif.get(_Base.ResolutionUnit, 2))  # 2 (the default): per inch, 3: per cm
    if x is None or y is None or inches is None:
        return None
    return (x * inches, y * inches)


def _jfif_dpi(info: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """The `(x, y)` dots per inch a JPEG's JFIF density states (`info`: Pillow's), or None: its unit 0 gives a pixel
    aspect ratio. Read here, as Pillow before 11 reads no density per centimetre."""
    inches = {1: 1.0, 2: 2.54}.get(info.get("jfif_unit"))
    density = info.get("jfif_density")
    if inches is None or not (isinstance(density, tuple) and len(density) == 2):
        return None
    x, y = map(_positive, density)
    return None if x is None or y is None else (x * inches, y * inches)


def read_metadata(path: ImageFile) -> InputMetadata:
    """Read what an output of the image file at `path` keeps of its metadata (see the module's docstring), without
    decoding its pixels. Raises [`image_io.open_image`]'s errors for files that are no image."""
    name = os.fspath(path)
    with _opened(path, name) as image:
        width, height = image.size
        sideways = _orientation(image, name) in _SIDEWAYS
        exif = _carried_exif(image, name)
        dpi = image.info.get("dpi")
        if image.format in ("JPEG", "MPO"):
            # Without a JFIF density in inches or cm, Pillow takes the EXIF's XResolution for both sides, and 72
            # where there is none (or 0/0): an output stated 4x a DPI its input never did.
            dpi = _jfif_dpi(image.info) or _exif_dpi(exif)
        icc_profile = image.info.get("icc_profile") or None
    if not (isinstance(dpi, tuple) and len(dpi) == 2 and all(float(value) > 0 for value in dpi)):
        dpi = None
    elif sideways:
        dpi = dpi[::-1]
    if exif is not None and sideways and _Base.XResolution in exif and _Base.YResolution in exif:
        exif[_Base.XResolution], exif[_Base.YResolution] = exif[_Base.YResolution], exif[_Base.XResolution]
    size = (height, width) if sideways else (width, height)
    return InputMetadata(size, exif, None if dpi is None else tuple(map(float, dpi)), icc_profile, name)


@functools.cache
def _srgb_profile() -> Optional[bytes]:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@functools.lru_cache(maxsize=16)
def _profile_space(icc_profile: bytes) -> Optional[str]:
    """The colour space an ICC profile describes ("RGB", "GRAY", "CMYK", ...), or None where it cannot be read."""
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)).profile.xcolor_space.strip()
    except (ImportError, OSError, ValueError, TypeError, ImageCms.PyCMSError):
        return None


def output_profile(icc_profile: Optional[bytes], output_mode: str) -> Optional[bytes]:
    """The ICC profile that states the colour space of an output of mode `output_mode` made from an input with
    `icc_profile`: the input's own where its values were read unconverted (an sRGB profile; a gray one), sRGB's where
    they were converted to sRGB, None where the input had none (or a damaged one, read as sRGB) or the output's
    channels do not match the profile's (a colour photo written as gray)."""
    if not icc_profile:
        return None
    space = _profile_space(bytes(icc_profile))
    colour_output = output_mode in ("RGB", "RGBA")
    if space == "GRAY":
        return bytes(icc_profile) if output_mode in ("L", "LA", "I;16") else None
    if space == "RGB" and colour_output:
        converted = _srgb_transform(bytes(icc_profile), "RGB") is not None
        return _srgb_profile() if converted else bytes(icc_profile)
    if space == "CMYK" and colour_output and _srgb_transform(bytes(icc_profile), "CMYK") is not None:
        return _srgb_profile()
    return None


def _positive(value: Any) -> Optional[float]:
    """`value` as a positive finite number, or None (0/0, zero, a garbled tag holding several values)."""
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):  # 0/0: NaN in Pillow 12, ZeroDivisionError in 10
        return None
    return number if math.isfinite(number) and number > 0 else None


def save_options(metadata: Optional[InputMetadata], image_format: str, image: PIL.Image.Image) -> Dict[str, Any]:
    """Pillow save options that write `metadata` (of the input `image` was upscaled from) with `image` in
    `image_format`: as much of it as the format holds, sizes and resolutions scaled to `image`'s size."""
    if metadata is None:
        return {}
    scale_x, scale_y = image.width / metadata.size[0], image.height / metadata.size[1]
    options: Dict[str, Any] = {}
    if metadata.dpi is not None and image_format in DPI_FORMATS:
        options["dpi"] = (metadata.dpi[0] * scale_x, metadata.dpi[1] * scale_y)
    if metadata.exif is not None and image_format in EXIF_FORMATS:
        exif = PIL.Image.Exif()
        exif.update(metadata.exif)
        for tag, scale in ((_Base.XResolution, scale_x), (_Base.YResolution, scale_y)):
            if tag in exif:
                resolution = _positive(exif[tag])
                # 0/0 (some writers store it for "unknown") scaled was NaN, which Pillow cannot write: the run
                # stopped after the upscale. A resolution that states nothing is left out.
                if resolution is None:
                    del exif[tag]
                else:
                    exif[tag] = resolution * scale
        if _IFD.Exif in exif:
            exif_ifd = dict(exif[_IFD.Exif])
            for tag, length in ((_Base.ExifImageWidth, image.width), (_Base.ExifImageHeight, image.height)):
                if tag in exif_ifd:
                    exif_ifd[tag] = length
            exif[_IFD.Exif] = exif_ifd
        exif_bytes = exif.tobytes()  # TIFF's writer reads sub-directories back from bytes, not from dicts
        if image_format == "JPEG" and len(exif_bytes) > JPEG_EXIF_BYTES:
            # Pillow refuses the whole save ("EXIF data is too long"), after all the work: the pixels come first.
            _warn_once(
                f"{metadata.name}: its EXIF ({len(exif_bytes):,} bytes) is more than a JPEG holds "
                f"({JPEG_EXIF_BYTES:,}): the JPEG is written without it; write .png, .webp or .tif to keep it"
            )
        else:
            options["exif"] = exif_bytes
    profile = output_profile(metadata.icc_profile, image.mode)
    if profile is not None and image_format in ICC_FORMATS:
        options["icc_profile"] = profile
    return options
