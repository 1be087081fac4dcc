"""What an upscaled file keeps of its input's metadata (EXIF, DPI, ICC profile), and outputs named in formats Pillow
cannot write."""

import io
import struct
import zlib

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.TiffImagePlugin
import pytest
from PIL import ImageCms
from test_image_io import swapped_primaries_profile

from diffusers_sr3 import image_io, image_metadata
from diffusers_sr3.cli import main
from diffusers_sr3.image_io import open_image
from diffusers_sr3.image_processing import images_to_tensor

Base, IFD = PIL.ExifTags.Base, PIL.ExifTags.IFD
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture
def model_dir(tiny_pipeline, tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline.save_pretrained(folder)
    return folder


def upscale(model_dir, source, destination, *extra):
    return main(
        ["upscale", str(source), "--output", str(destination), "--model", str(model_dir), "--steps", "2", *extra]
    )


def colours(width, height, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def camera_exif(orientation=1):
    exif = PIL.Image.Exif()
    exif[Base.Make], exif[Base.Model], exif[Base.DateTime] = "Canon", "EOS R5", "2024:05:01 10:00:00"
    exif[Base.Orientation] = orientation
    exif[Base.XResolution], exif[Base.YResolution], exif[Base.ResolutionUnit] = 300.0, 200.0, 2
    exif[IFD.Exif] = {Base.DateTimeOriginal: "2024:05:01 09:59:58", Base.ExifImageWidth: 8, Base.ExifImageHeight: 6}
    exif[IFD.GPSInfo] = {PIL.ExifTags.GPS.GPSLatitude: (48.0, 51.0, 24.0), PIL.ExifTags.GPS.GPSLatitudeRef: "N"}
    return exif


@pytest.mark.parametrize("extension", [".jpg", ".png", ".webp", ".tif"])
def test_upscale_keeps_camera_and_date_without_orientation_or_location_and_scales_the_dpi(
    model_dir, tmp_path, extension
):
    # Stored 8x6 and turned a quarter (orientation 6): upright 6x8, its 300x200 DPI becomes 200x300.
    colours(8, 6).save(tmp_path / "photo.jpg", exif=camera_exif(orientation=6), dpi=(300, 200), quality=95)
    destination = tmp_path / f"out{extension}"
    assert upscale(model_dir, tmp_path / "photo.jpg", destination, "--quiet") == 0
    written = PIL.Image.open(destination)
    exif = written.getexif()
    assert written.size == (24, 32)
    assert (exif[Base.Make], exif[Base.Model], exif[Base.DateTime]) == ("Canon", "EOS R5", "2024:05:01 10:00:00")
    assert Base.Orientation not in exif  # already applied: a viewer would turn the upright output again
    assert IFD.GPSInfo not in exif and not exif.get_ifd(IFD.GPSInfo)
    # Printed at the input's size: 4x the pixels at 4x the DPI, in the EXIF as in the format's own field.
    assert (float(exif[Base.XResolution]), float(exif[Base.YResolution])) == (800.0, 1200.0)
    if extension != ".webp":  # WebP has no DPI field
        assert written.info["dpi"] == pytest.approx((800, 1200), rel=1e-4)
    exif_ifd = exif.get_ifd(IFD.Exif)
    assert exif_ifd[Base.DateTimeOriginal] == "2024:05:01 09:59:58"
    assert (exif_ifd[Base.ExifImageWidth], exif_ifd[Base.ExifImageHeight]) == (24, 32)


def test_upscale_of_a_tiff_keeps_its_camera_not_its_file_layout(model_dir, tmp_path):
    exif = PIL.Image.Exif()
    exif[Base.Make] = "Nikon"
    colours(8, 8).save(tmp_path / "scan.tif", exif=exif, dpi=(600, 600))
    assert upscale(model_dir, tmp_path / "scan.tif", tmp_path / "out.jpg", "--quiet") == 0
    written = PIL.Image.open(tmp_path / "out.jpg")
    exif = written.getexif()
    assert exif[Base.Make] == "Nikon" and written.info["dpi"] == (2400, 2400)
    # The TIFF's strips, sizes and bits per sample describe the input file, not the JPEG.
    assert not {Base.StripOffsets, Base.ImageWidth, Base.BitsPerSample, Base.Compression} & set(exif)
    # BMP holds DPI and no EXIF; an input without either gives an output without either.
    assert upscale(model_dir, tmp_path / "scan.tif", tmp_path / "out.bmp", "--quiet") == 0
    assert PIL.Image.open(tmp_path / "out.bmp").info["dpi"] == pytest.approx((2400, 2400), rel=1e-3)
    colours(8, 8).save(tmp_path / "plain.png")
    assert upscale(model_dir, tmp_path / "plain.png", tmp_path / "plain_out.png", "--quiet") == 0
    assert not {"dpi", "exif", "icc_profile"} & set(PIL.Image.open(tmp_path / "plain_out.png").info)


@pytest.mark.parametrize("extension", [".png", ".jpg", ".webp", ".tif"])
def test_upscale_tags_outputs_with_the_colour_space_their_values_are_in(model_dir, tmp_path, extension):
    """Pixels are converted to sRGB when read: the output states sRGB where the input's profile was another, and
    keeps the input's own sRGB profile; untagged stays untagged."""
    colours(8, 8).save(tmp_path / "wide.png", icc_profile=swapped_primaries_profile())
    colours(8, 8).save(tmp_path / "srgb.png", icc_profile=SRGB)
    colours(8, 8).save(tmp_path / "untagged.png")
    written = {}
    for name in ("wide", "srgb", "untagged"):
        destination = tmp_path / f"{name}_out{extension}"
        assert upscale(model_dir, tmp_path / f"{name}.png", destination, "--quiet") == 0
        written[name] = PIL.Image.open(destination).info.get("icc_profile")
    assert written["srgb"] == SRGB  # the input's own, byte for byte
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(written["wide"]))).strip() == (
        "sRGB built-in"
    )
    assert written["untagged"] is None
    # A colour photo's profile is not put on a black-and-white output (an RGB profile on gray is invalid).
    PIL.Image.new("RGB", (8, 8), (90, 90, 90)).save(tmp_path / "gray.png", icc_profile=swapped_primaries_profile())
    assert upscale(model_dir, tmp_path / "gray.png", tmp_path / "gray_out.png", "--quiet") == 0
    written = PIL.Image.open(tmp_path / "gray_out.png")
    assert written.mode == "L" and "icc_profile" not in written.info


def test_a_gray_profile_is_kept_on_gray_outputs_only(monkeypatch):
    monkeypatch.setattr(image_metadata, "_profile_space", lambda profile: "GRAY")
    assert image_metadata.output_profile(b"gray profile", "L") == b"gray profile"
    assert image_metadata.output_profile(b"gray profile", "I;16") == b"gray profile"
    assert image_metadata.output_profile(b"gray profile", "RGB") is None


def test_the_pipeline_reads_a_pil_image_with_a_colour_profile_in_srgb(tmp_path):
    """`pipe(PIL.Image.open("p3.jpg"))` fed the profile's values as sRGB ones: red came out blue here."""
    colours(8, 8).save(tmp_path / "wide.png", icc_profile=swapped_primaries_profile())
    as_opened = PIL.Image.open(tmp_path / "wide.png")
    assert np.array_equal(images_to_tensor(as_opened), images_to_tensor(open_image(tmp_path / "wide.png")))
    assert not np.array_equal(images_to_tensor(as_opened), images_to_tensor(colours(8, 8)))


def test_an_output_named_in_a_format_pillow_cannot_write_is_refused_before_any_work(model_dir, tmp_path, capsys):
    colours(8, 8).save(tmp_path / "a.png")
    assert upscale(model_dir, tmp_path / "a.png", tmp_path / "out.heic") == 2
    assert "--output " + str(tmp_path / "out.heic") + ": this Pillow cannot write .heic images" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out.heic").exists()
    # A name with a dot that names no image format is a folder, as before.
    assert upscale(model_dir, tmp_path / "a.png", tmp_path / "results.v2", "--quiet") == 0
    assert (tmp_path / "results.v2" / "a_sr.png").is_file()


def png_16bit_rgb(values):
    """PNG bytes of a 16-bit RGB image (Pillow writes none)."""
    height, width, _ = values.shape
    rows = b"".join(b"\0" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_upscale_says_that_16_bit_colour_is_read_at_8_bits(model_dir, tmp_path, capsys):
    values = np.random.default_rng(0).integers(0, 65536, (8, 8, 3))
    (tmp_path / "deep.png").write_bytes(png_16bit_rgb(values))
    assert upscale(model_dir, tmp_path / "deep.png", tmp_path / "out.png", "--quiet") == 0
    assert "deep.png is 16-bit colour, which Pillow reads at 8 bits" in capsys.readouterr().err
    colours(8, 8).save(tmp_path / "plain.png")
    assert upscale(model_dir, tmp_path / "plain.png", tmp_path / "plain_out.png", "--quiet") == 0
    assert "16-bit" not in capsys.readouterr().err


def test_exif_that_cannot_be_read_is_left_out_with_a_warning(model_dir, tmp_path, monkeypatch, caplog):
    colours(8, 8).save(tmp_path / "garbled.jpg", exif=camera_exif())

    def garbled(self):
        raise SyntaxError("not a TIFF directory")

    monkeypatch.setattr(PIL.Image.Image, "getexif", garbled)
    with caplog.at_level("WARNING"):
        assert upscale(model_dir, tmp_path / "garbled.jpg", tmp_path / "out.jpg", "--quiet") == 0
    assert "garbled.jpg: its EXIF could not be read (not a TIFF directory)" in caplog.text
    monkeypatch.undo()
    assert "exif" not in PIL.Image.open(tmp_path / "out.jpg").info


def test_exif_too_long_for_a_jpeg_is_left_out_of_it_with_a_warning(model_dir, tmp_path, caplog):
    """A PNG's 70 kB of EXIF made Pillow refuse the JPEG after the upscale ran."""
    exif = camera_exif()
    exif[Base.ImageDescription] = "x" * 70000
    colours(8, 8).save(tmp_path / "long.png", exif=exif)
    with caplog.at_level("WARNING"):
        assert upscale(model_dir, tmp_path / "long.png", tmp_path / "out.jpg", "--quiet") == 0
    assert "long.png: its EXIF (70," in caplog.text and "more than a JPEG holds" in caplog.text
    assert "exif" not in PIL.Image.open(tmp_path / "out.jpg").info
    assert upscale(model_dir, tmp_path / "long.png", tmp_path / "out.png", "--quiet") == 0
    assert len(PIL.Image.open(tmp_path / "out.png").getexif()[Base.ImageDescription]) == 70000


def bmp_rgb565(width, height):
    """BMP bytes of a 16-bit-a-pixel (5-6-5 bits) colour image, as old screenshots and embedded cameras write."""
    rows = struct.pack("<H", 0xF800) * width * height
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    dib += struct.pack("<3I", 0xF800, 0x07E0, 0x001F)
    return struct.pack("<2sIHHI", b"BM", 14 + len(dib) + len(rows), 0, 0, 14 + len(dib)) + dib + rows


def test_a_5_6_5_bmp_is_not_called_16_bit_colour(model_dir, tmp_path, capsys):
    """Its raw mode `BGR;16` holds 16 bits a pixel, 5 or 6 a channel: nothing is lost reading it at 8."""
    (tmp_path / "screen.bmp").write_bytes(bmp_rgb565(8, 8))
    assert upscale(model_dir, tmp_path / "screen.bmp", tmp_path / "out.png", "--quiet") == 0
    assert "16-bit" not in capsys.readouterr().err


def test_16_bit_colour_is_told_from_tiles_as_pillow_before_11_stores_them(tmp_path):
    """Pillow before 11 keeps `image.tile` as plain tuples, without `.args`: every upscale of an RGB file failed."""
    (tmp_path / "deep.png").write_bytes(png_16bit_rgb(np.zeros((8, 8, 3), np.uint16)))
    for name, deep in (("deep.png", True), ("plain.png", False)):
        if not deep:
            colours(8, 8).save(tmp_path / name)
        with PIL.Image.open(tmp_path / name) as image:
            image.tile = [tuple(tile) for tile in image.tile]
            assert image_io._colour_read_at_8_bits(image) is deep


def test_an_exif_resolution_of_0_over_0_is_left_out_not_a_stop_after_the_work(model_dir, tmp_path):
    """Scaled, 0/0 was NaN, which Pillow cannot write: the run stopped at that file ("cannot convert NaN to integer
    ratio"), its output and those of the files after it lost."""
    exif = PIL.Image.Exif()
    exif[Base.Make] = "Scanner"
    exif[Base.XResolution] = exif[Base.YResolution] = PIL.TiffImagePlugin.IFDRational(0, 0)
    (tmp_path / "in").mkdir()
    colours(8, 8).save(tmp_path / "in" / "a.jpg", exif=exif)
    colours(8, 8).save(tmp_path / "in" / "b.jpg")
    assert upscale(model_dir, tmp_path / "in", tmp_path / "out", "--quiet") == 0
    assert (tmp_path / "out" / "b_sr.png").is_file()
    for destination in (tmp_path / "out" / "a_sr.png", tmp_path / "a.jpg"):
        if not destination.exists():
            assert upscale(model_dir, tmp_path / "in" / "a.jpg", destination, "--quiet") == 0
        exif = PIL.Image.open(destination).getexif()
        assert exif[Base.Make] == "Scanner" and Base.XResolution not in exif


def test_maker_notes_and_a_tiffs_location_layers_and_page_pointers_are_not_carried(model_dir, tmp_path):
    """Maker notes were copied verbatim to a new place (their offsets then point elsewhere; Nikon's hold a preview of
    the photo); a GeoTIFF's georeferencing (a location, at the input's pixel scale), its IPTC, its Photoshop layers
    (the input again) and its SubIFDs pointer (into the input file) went into the output."""
    preview = b"\xff\xd8 a preview of the photo \xff\xd9"
    exif = camera_exif()
    exif[IFD.Exif] = {Base.MakerNote: b"Nikon\0\x02\x10\0\0MM\0*\0\0\0\x08" + preview, Base.ExposureTime: 0.004}
    colours(8, 8).save(tmp_path / "photo.jpg", exif=exif)
    tags = PIL.TiffImagePlugin.ImageFileDirectory_v2()
    tags[Base.Make] = "Scanner"
    tags[33550], tags[33922] = (0.5, 0.5, 0.0), (0.0, 0.0, 0.0, 2.35, 48.85, 0.0)  # ModelPixelScale, ModelTiepoint
    tags[34735] = (1, 1, 0, 1, 1024, 0, 1, 2)  # GeoKeyDirectory
    tags[Base.IPTCNAA] = b"\x1c\x02\x5a\x00\x05Paris"  # City
    tags[37724] = b"Adobe Photoshop Document Data Block\0"
    tags[Base.SubIFDs] = (8,)
    colours(8, 8).save(tmp_path / "map.tif", tiffinfo=tags)
    for source, extension in (("photo.jpg", ".jpg"), ("photo.jpg", ".png"), ("map.tif", ".tif"), ("map.tif", ".jpg")):
        destination = tmp_path / f"out_{source}{extension}"
        assert upscale(model_dir, tmp_path / source, destination, "--quiet") == 0
        exif = PIL.Image.open(destination).getexif()
        assert exif[Base.Make] in ("Canon", "Scanner")
        assert not {33550, 33922, 34735, Base.IPTCNAA, 37724, Base.SubIFDs} & set(exif)
        assert Base.MakerNote not in exif.get_ifd(IFD.Exif)
        assert preview not in destination.read_bytes() and b"Paris" not in destination.read_bytes()
    assert float(PIL.Image.open(tmp_path / "out_photo.jpg.jpg").getexif().get_ifd(IFD.Exif)[Base.ExposureTime]) == 0.004


def test_a_palette_image_with_a_colour_profile_is_converted_as_an_rgb_one(model_dir, tmp_path):
    """A palette PNG's iCCP applies to its colours: they were read unconverted, as sRGB (red where a colour-managed
    viewer shows the input blue), and the output was tagged sRGB all the same."""
    red = PIL.Image.new("RGB", (8, 8), (200, 30, 30))
    red.convert("P", palette=PIL.Image.ADAPTIVE, colors=4).save(
        tmp_path / "palette.png", icc_profile=swapped_primaries_profile()
    )
    red.save(tmp_path / "rgb.png", icc_profile=swapped_primaries_profile())
    assert open_image(tmp_path / "palette.png").getpixel((0, 0)) == open_image(tmp_path / "rgb.png").getpixel((0, 0))
    opened = PIL.Image.open(tmp_path / "palette.png")
    assert np.array_equal(images_to_tensor(opened), images_to_tensor(open_image(tmp_path / "rgb.png")))
    for name in ("palette", "rgb"):
        assert upscale(model_dir, tmp_path / f"{name}.png", tmp_path / f"{name}_out.png", "--quiet") == 0
    palette_out, rgb_out = (PIL.Image.open(tmp_path / f"{name}_out.png") for name in ("palette", "rgb"))
    assert np.array_equal(np.asarray(palette_out), np.asarray(rgb_out))
    assert palette_out.info["icc_profile"] == rgb_out.info["icc_profile"]


def test_a_jpeg_that_states_no_resolution_gives_an_output_without_one(model_dir, tmp_path):
    """Pillow reads 72 DPI where a JPEG with EXIF states none (its output stated 288), and the EXIF's x resolution
    for both sides where it states two."""
    exif = PIL.Image.Exif()
    exif[Base.Make] = "Phone"
    colours(8, 8).save(tmp_path / "phone.jpg", exif=exif)
    assert PIL.Image.open(tmp_path / "phone.jpg").info["dpi"] == (72, 72)  # what Pillow makes of it
    assert upscale(model_dir, tmp_path / "phone.jpg", tmp_path / "out.png", "--quiet") == 0
    written = PIL.Image.open(tmp_path / "out.png")
    assert "dpi" not in written.info and Base.XResolution not in written.getexif()
    assert image_metadata.read_metadata(tmp_path / "phone.jpg").dpi is None
    # A JFIF density, or an EXIF resolution (here 300x200 per inch, then 100x50 per cm), is scaled.
    colours(8, 8).save(tmp_path / "stated.jpg", dpi=(72, 72))
    colours(8, 8).save(tmp_path / "in_exif.jpg", exif=camera_exif())
    exif = camera_exif()
    exif[Base.XResolution], exif[Base.YResolution], exif[Base.ResolutionUnit] = 100.0, 50.0, 3
    colours(8, 8).save(tmp_path / "per_cm.jpg", exif=exif)
    for name, dpi in (("stated", (288, 288)), ("in_exif", (1200, 800)), ("per_cm", (1016, 508))):
        assert upscale(model_dir, tmp_path / f"{name}.jpg", tmp_path / f"{name}.png", "--quiet") == 0
        assert PIL.Image.open(tmp_path / f"{name}.png").info["dpi"] == pytest.approx(dpi, rel=1e-4)


def with_jfif_density(jpeg, unit, x, y):
    """`jpeg` (bytes) with its JFIF header's density unit (0: aspect ratio, 1: per inch, 2: per cm) and density set."""
    data = bytearray(jpeg)
    start = data.index(b"JFIF\0")
    data[start + 7 : start + 12] = struct.pack(">BHH", unit, x, y)
    return bytes(data)


def test_a_jpeg_resolution_without_a_unit_is_no_dpi_and_one_per_cm_or_beside_a_blank_jfif_density_is(
    model_dir, tmp_path
):
    """An EXIF ResolutionUnit of 1 (none) makes its resolutions a pixel aspect ratio: 1/1 came out as 4 DPI. A JFIF
    density of 0 per inch stated nothing, and its EXIF's 300x200 DPI were lost; Pillow before 11 reads no JFIF
    density per cm, and such a photo's output stated none."""
    exif = camera_exif()
    exif[Base.XResolution], exif[Base.YResolution], exif[Base.ResolutionUnit] = 1.0, 1.0, 1
    colours(8, 8).save(tmp_path / "aspect.jpg", exif=exif)
    plain = io.BytesIO()
    colours(8, 8).save(plain, "JPEG")
    (tmp_path / "per_cm.jpg").write_bytes(with_jfif_density(plain.getvalue(), 2, 100, 50))
    stated = io.BytesIO()
    colours(8, 8).save(stated, "JPEG", exif=camera_exif())
    (tmp_path / "blank.jpg").write_bytes(with_jfif_density(stated.getvalue(), 1, 0, 0))
    assert image_metadata.read_metadata(tmp_path / "aspect.jpg").dpi is None
    for name, dpi in (("per_cm", (254, 127)), ("blank", (300, 200))):
        assert image_metadata.read_metadata(tmp_path / f"{name}.jpg").dpi == pytest.approx(dpi, rel=1e-4), name
    assert upscale(model_dir, tmp_path / "aspect.jpg", tmp_path / "aspect.png", "--quiet") == 0
    written = PIL.Image.open(tmp_path / "aspect.png")
    assert "dpi" not in written.info
    assert written.getexif()[Base.ResolutionUnit] == 1 and written.getexif()[Base.XResolution] == 4
    assert upscale(model_dir, tmp_path / "per_cm.jpg", tmp_path / "per_cm.png", "--quiet") == 0
    assert PIL.Image.open(tmp_path / "per_cm.png").info["dpi"] == pytest.approx((1016, 508), rel=1e-4)
