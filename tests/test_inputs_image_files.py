"""Image files at the edges of what readers meet: damaged later frames and metadata, 32-bit and float gray, and the
non-image files a glob matches. Every entry point reads through `image_io`, so `sr3 upscale` stands for them all."""

import io
import logging
import struct

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from diffusers_sr3.cli import main
from diffusers_sr3.data.decoding import BadImageError, decode_image
from diffusers_sr3.image_io import (
    FLOAT_OVERSHOOT,
    UnreadableImageError,
    find_image_sources,
    find_images,
    image_size,
    inspect_image,
    open_alpha,
    open_image,
    to_rgb,
)
from diffusers_sr3.image_processing import images_to_tensor


def _frames(count, size=32):
    return [
        PIL.Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))
        for seed in range(count)
    ]


def _encoded(image, **options):
    stream = io.BytesIO()
    image.save(stream, **options)
    return stream.getvalue()


def test_a_gif_cut_after_its_first_frame_reads_as_that_frame(tmp_path, tiny_pipeline):
    """Counting frames seeks through all of them: Pillow raised IndexError or struct.error on a cut one, and
    `sr3 upscale` (the one reader that counts them) crashed where every other entry point read the first frame."""
    frames = _frames(4)
    whole = _encoded(frames[0], format="GIF", save_all=True, append_images=frames[1:])
    first_frame_only = len(_encoded(frames[0], format="GIF"))
    first = np.asarray(open_image(whole))
    cut = tmp_path / "cut.gif"
    for length in range(first_frame_only - 1, len(whole), 61):
        cut.write_bytes(whole[:length])
        facts = inspect_image(cut)
        assert facts.size == (32, 32) and 1 <= facts.frames <= 4, (length, facts)
        assert np.array_equal(np.asarray(open_image(cut)), first)
    cut.write_bytes(whole[: first_frame_only + 8])  # into the second frame's header
    assert inspect_image(cut).frames == 1
    tiny_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "cut_sr.png"
    command = ["upscale", str(cut), "--model", str(tmp_path / "model"), "--output", str(out), "--steps", "2"]
    assert main(command + ["--quiet"]) == 0 and PIL.Image.open(out).size == (128, 128)


def test_a_tiff_whose_second_page_lacks_its_size_reads_its_first_page(tmp_path):
    data = bytearray(_encoded(PIL.Image.new("RGB", (24, 20), "gray"), format="TIFF"))
    first_directory = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first_directory)[0]
    # A second page holding one tag (orientation), no width or height: Pillow's page count raised TypeError.
    data += struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 1) + b"\0\0\0\0"
    struct.pack_into("<I", data, first_directory + 2 + 12 * entries, len(data) - 18)
    (tmp_path / "two_pages.tif").write_bytes(data)
    facts = inspect_image(tmp_path / "two_pages.tif")
    assert facts.size == (24, 20) and facts.frames == 1 and facts.grayscale
    assert open_image(tmp_path / "two_pages.tif").getpixel((0, 0)) == (128, 128, 128)


def _garbled_exif_jpeg(path, pixels):
    """A JPEG whose EXIF (orientation 6) has its byte order garbled: Pillow's EXIF reader raises SyntaxError, the
    pixels decode. (The JFIF resolution keeps Pillow from reading the EXIF, and swallowing the error, on opening.)"""
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    data = _encoded(PIL.Image.fromarray(pixels), format="JPEG", exif=exif, dpi=(72, 72), quality=95)
    path.write_bytes(data.replace(b"Exif\0\0MM", b"Exif\0\0XX"))
    return path


def _orientation_warnings(caplog, path):
    return [r for r in caplog.records if str(path) in r.getMessage() and "EXIF orientation could not" in r.getMessage()]


def test_unreadable_exif_is_read_as_stored_with_one_warning(tmp_path, tiny_pipeline, caplog):
    """Garbled EXIF was refused ("cannot read image ...: not a TIFF file") though its pixels decode and viewers show
    it: it is read as stored, with one warning per file, and every reader (sizes for plans included) agrees."""
    caplog.set_level(logging.WARNING)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 12, 3), dtype=np.uint8)
    path = _garbled_exif_jpeg(tmp_path / "garbled.jpg", pixels)
    with pytest.raises(SyntaxError):
        PIL.Image.open(path).getexif()
    stored = np.asarray(PIL.Image.open(path).convert("RGB"))
    for image in (open_image(path), open_image(path, keep_16bit=True), open_image(path.read_bytes(), str(path))):
        assert image.size == (12, 6) and np.array_equal(np.asarray(image), stored)
    assert image_size(path) == inspect_image(path).size == (12, 6)
    [warning] = _orientation_warnings(caplog, path)
    assert warning.getMessage().startswith(f"{path}: its EXIF orientation could not be read (not a TIFF file")
    assert "\n" not in warning.getMessage()
    # Damaged pixels are still refused.
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:-60])
    with pytest.raises(UnreadableImageError, match="cannot read image .*cut.jpg: "):
        open_image(tmp_path / "cut.jpg")
    # sr3 upscale checks, decodes and upscales it: one warning, the size planned is the size decoded.
    photo = _garbled_exif_jpeg(tmp_path / "photo.jpg", pixels)
    tiny_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "photo_sr.png"
    command = ["upscale", str(photo), "--model", str(tmp_path / "model"), "--output", str(out), "--steps", "2"]
    assert main(command + ["--quiet"]) == 0 and PIL.Image.open(out).size == (48, 24)
    assert len(_orientation_warnings(caplog, photo)) == 1


def test_garbled_exif_with_a_readable_orientation_is_turned_upright(tmp_path, caplog):
    """EXIF whose Make tag was garbled into XPosition (a rational): rewriting the metadata when turning the picture
    upright raised TypeError, and the file was refused. Its orientation reads: it is turned by it, without a word."""
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    exif[PIL.Image.ExifTags.Base.Make] = "Cam"
    ascii_make = struct.pack(">HH", PIL.Image.ExifTags.Base.Make, 2)  # Pillow writes EXIF big-endian
    x_position = 0x011E  # a TIFF tag Pillow knows as rational
    garbled = exif.tobytes().replace(ascii_make, struct.pack(">HH", x_position, 2))
    path = tmp_path / "garbled.png"
    stored = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8))
    stored.save(path, exif=garbled)
    with pytest.raises(TypeError):
        PIL.ImageOps.exif_transpose(PIL.Image.open(path))
    upright = np.asarray(stored.transpose(PIL.Image.Transpose.ROTATE_270))
    assert np.array_equal(np.asarray(open_image(path)), upright)
    assert image_size(path) == inspect_image(path).size == (3, 4)
    assert open_alpha(path) is None and not _orientation_warnings(caplog, path)
    alpha = np.arange(12, dtype=np.uint8).reshape(3, 4)
    stored.putalpha(PIL.Image.fromarray(alpha))
    stored.save(path, exif=garbled)
    assert np.array_equal(np.asarray(open_alpha(path)), np.rot90(alpha, -1))  # turned as the pixels are


def test_32_bit_gray_beyond_16_bits_is_refused_not_wrapped_or_clipped(tmp_path, tiny_pipeline, capsys):
    """Read as 16-bit, 0..1,000,000 wrapped around modulo 65536 (and -1000 became 64536); as 8-bit it was white."""
    ramp = np.tile(np.linspace(0, 1_000_000, 16).astype(np.int32), (12, 1))
    PIL.Image.fromarray(ramp).save(tmp_path / "big.tif")
    PIL.Image.fromarray(np.tile(np.linspace(-1000, 1000, 6).astype(np.int32), (4, 1))).save(tmp_path / "signed.tif")
    for name, values in (("big.tif", "0..1000000"), ("signed.tif", "-1000..1000")):
        assert PIL.Image.open(tmp_path / name).mode == "I"
        message = rf"cannot read image .*{name}: 32-bit integer gray with values {values}: only 0..255"
        for keep_16bit in (False, True):
            with pytest.raises(UnreadableImageError, match=message):
                open_image(tmp_path / name, keep_16bit=keep_16bit)
        with pytest.raises(UnreadableImageError, match=message):
            inspect_image(tmp_path / name)
    in_memory = PIL.Image.fromarray(ramp)
    for convert in (to_rgb, images_to_tensor):
        with pytest.raises(ValueError, match="32-bit integer gray with values 0..1000000"):
            convert(in_memory)
    # 16-bit values in a 32-bit image are still read as 16-bit.
    in_range = PIL.Image.fromarray(ramp // 16)
    assert np.array_equal(np.asarray(open_image(in_range, keep_16bit=True)), ramp // 16)
    tiny_pipeline.save_pretrained(tmp_path / "model")
    command = ["upscale", str(tmp_path / "big.tif"), "--model", str(tmp_path / "model")]
    assert main(command + ["--output", str(tmp_path / "out.png"), "--quiet"]) != 0
    assert "32-bit integer gray with values 0..1000000" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_float_gray_is_kept_at_16_bits(tmp_path, tiny_pipeline):
    """A float TIFF (mode F) was cut to 8 bits without a note, where a 16-bit one keeps 16."""
    unit = np.linspace(0, 1, 16 * 12, dtype=np.float32).reshape(12, 16)
    PIL.Image.fromarray(unit).save(tmp_path / "unit.tif")
    PIL.Image.fromarray(unit * 255).save(tmp_path / "levels.tif")
    for name, white in (("unit.tif", 1.0), ("levels.tif", 255.0)):
        assert PIL.Image.open(tmp_path / name).mode == "F"
        kept = open_image(tmp_path / name, keep_16bit=True)
        expected = np.rint(np.asarray(PIL.Image.open(tmp_path / name), np.float64) * (65535 / white))
        assert kept.mode == "I;16" and np.array_equal(np.asarray(kept), expected.astype(np.uint16))
        assert open_image(tmp_path / name).mode == "RGB"  # the default stays 8-bit RGB
        assert inspect_image(tmp_path / name).sixteen_bit
    tiny_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "unit_sr.tif"
    command = ["upscale", str(tmp_path / "unit.tif"), "--model", str(tmp_path / "model"), "--output", str(out)]
    assert main(command + ["--steps", "2", "--quiet"]) == 0
    assert PIL.Image.open(out).mode == "I;16" and PIL.Image.open(out).size == (64, 48)


def test_float_gray_outside_its_range_is_refused_and_rounding_overshoot_clipped(tmp_path, tiny_pipeline, capsys):
    """Float gray beyond 0..255 (HDR, linear light) was clipped without a word, NaN came out black, and a 0..1 image
    overshooting 1 by a rounding error, or linear light reaching a few units, was read as 0..255 (black). Files, PIL
    images and arrays agree."""
    overshoot = np.array([[0, 0.5, 1 + 0.8 * FLOAT_OVERSHOOT, -0.8 * FLOAT_OVERSHOOT]], np.float32)
    PIL.Image.fromarray(overshoot).save(tmp_path / "overshoot.tif")
    kept = np.asarray(open_image(tmp_path / "overshoot.tif", keep_16bit=True))
    assert np.array_equal(kept, [[0, 32768, 65535, 0]])
    assert torch.equal(images_to_tensor(overshoot)[0, 0], torch.tensor(overshoot).clamp(0, 1) * 2 - 1)
    hdr = np.array([[-3, 0.5, 1000, 4]], np.float32)
    cases = {
        "hdr.tif": (hdr, "float gray with values -3..1000: only 0..1 "),
        "bright.tif": (hdr.clip(0, 256), "float gray with values 0..256: only 0..1 "),
        "dark.tif": (np.array([[-0.01, 0.5]], np.float32), "float gray with values -0.01..0.5: only 0..1 "),
        "nan.tif": (np.array([[np.nan, 0.5]], np.float32), "float gray holding NaN or infinite values"),
        # A 0..1 edge that bicubic resampling overshot: read as 0..255, it came out black.
        "ringing.tif": (
            np.array([[-0.0625, 1.0625]], np.float32),
            r"float gray with values -0.0625..1.0625: only 0..1 \(or 0..255, where values reach 16\)",
        ),
        # Linear light whose highlights reach a few units: read as 0..255 (it reached 2), it came out black.
        "linear.tif": (np.array([[0.016, 0.5, 3]], np.float32), r"float gray with values 0.016..3: only 0..1 "),
        "dim.tif": (np.array([[0, 15.9]], np.float32), r"float gray with values 0..15.9: only 0..1 "),
    }
    for name, (values, message) in cases.items():
        PIL.Image.fromarray(values).save(tmp_path / name)
        for read in (open_image, inspect_image):
            with pytest.raises(UnreadableImageError, match=f"cannot read image .*{name}: {message}"):
                read(tmp_path / name)
        with pytest.raises(UnreadableImageError, match=f"image 1: {message}"):
            images_to_tensor([PIL.Image.new("L", values.shape[::-1]), PIL.Image.fromarray(values)])
        with pytest.raises(ValueError, match="image: (float values must lie in|holds NaN)"):
            images_to_tensor(values)
    tiny_pipeline.save_pretrained(tmp_path / "model")
    command = ["upscale", str(tmp_path / "hdr.tif"), "--model", str(tmp_path / "model")]
    assert main(command + ["--output", str(tmp_path / "out.tif"), "--quiet"]) == 2
    assert "hdr.tif: float gray with values -3..1000" in capsys.readouterr().err
    assert not (tmp_path / "out.tif").exists()


def test_float_gray_reaching_16_is_read_as_0_to_255():
    values = np.array([[0, 16, 255]], np.float32)
    assert np.array_equal(np.asarray(open_image(PIL.Image.fromarray(values)))[..., 0], [[0, 16, 255]])


def float_rgb_tiff(width=4, height=3):
    """A little-endian TIFF of 32-bit float RGB (one strip), a layout Pillow cannot decode, built by hand."""
    pixels = np.linspace(0, 1, width * height * 3, dtype="<f4").tobytes()
    arrays = 8 + 2 + 12 * 10 + 4  # after the header and the directory of 10 entries: the two 3-SHORT arrays, pixels
    entries = [  # tag, type (3: SHORT, 4: LONG), count, value or offset
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, arrays),  # BitsPerSample: 32, 32, 32
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, arrays + 12),  # StripOffsets
        (277, 3, 1, 3),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, len(pixels)),
        (284, 3, 1, 1),  # PlanarConfiguration: chunky
        (339, 3, 3, arrays + 6),  # SampleFormat: IEEE float
    ]
    # (Little-endian: a SHORT value left-justified in its 4 bytes packs as a LONG does.)
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    return b"II*\0" + struct.pack("<I", 8) + directory + struct.pack("<I6H", 0, 32, 32, 32, 3, 3, 3) + pixels


def test_a_tiff_layout_pillow_cannot_decode_is_named(tmp_path, tiny_pipeline, capsys):
    """A 32-bit float RGB TIFF was "not an image": a user sent to check the file's format finds it is a TIFF."""
    path = tmp_path / "render.tif"
    path.write_bytes(float_rgb_tiff())
    message = r"cannot read image .*render\.tif: a TIFF layout Pillow cannot decode \(such as 32-bit float RGB\)"
    for read in (open_image, inspect_image, lambda source: open_image(source.read_bytes(), "render.tif")):
        with pytest.raises(UnreadableImageError, match=message) as caught:
            read(path)
        assert not caught.value.not_an_image
    (tmp_path / "notes.tif").write_bytes(b"not a TIFF at all")
    with pytest.raises(UnreadableImageError, match="cannot identify image file") as caught:
        open_image(tmp_path / "notes.tif")
    assert caught.value.not_an_image
    tiny_pipeline.save_pretrained(tmp_path / "model")
    command = ["upscale", str(path), "--model", str(tmp_path / "model"), "--output", str(tmp_path / "out.png")]
    assert main(command + ["--quiet"]) == 2
    assert "render.tif: a TIFF layout Pillow cannot decode (such as 32-bit float RGB): save it as 8- or 16-bit" in (
        capsys.readouterr().err
    )


def test_16_bit_and_float_pil_images_reach_the_pipeline_at_16_bits(tmp_path):
    """`pipe(image=PIL.Image.open("x16.png"))`: mode I (and F) went through 8 bits; I;16 alone kept 16."""
    ramp = np.tile(np.arange(0, 65536, 64, dtype=np.int32), (2, 1))  # 1024 levels
    PIL.Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "ramp.png")
    from_file = images_to_tensor(open_image(tmp_path / "ramp.png", keep_16bit=True))
    for image in (
        PIL.Image.open(tmp_path / "ramp.png"),
        PIL.Image.fromarray(ramp.astype(np.uint16)),
        PIL.Image.fromarray(ramp),
        PIL.Image.fromarray((ramp / 65535).astype(np.float32)),
        PIL.Image.fromarray((ramp / 257).astype(np.float32)),  # float in 0..255
    ):
        tensor = images_to_tensor(image)
        assert len(torch.unique(tensor)) == 1024, image.mode
        assert torch.allclose(tensor, from_file, atol=1 / 65535), image.mode
    assert len(torch.unique(images_to_tensor(PIL.Image.fromarray(ramp // 256)))) == 256  # 8-bit values in an I
    pil_batch = images_to_tensor([PIL.Image.fromarray(ramp), PIL.Image.fromarray(ramp.astype(np.uint16))])
    assert torch.equal(pil_batch[0], pil_batch[1])


def test_in_memory_images_out_of_range_are_errors_with_a_detail():
    """A PIL image given to the training data's decoder: its error said "cannot decode image ()"."""
    with pytest.raises(BadImageError, match=r"record 7: cannot decode image \(32-bit integer gray with values 0\.\.7"):
        decode_image(PIL.Image.fromarray(np.array([[0, 70000]], np.int32)), "record 7")
    with pytest.raises(UnreadableImageError, match="cannot read image image: float gray with values 0..300"):
        open_image(PIL.Image.fromarray(np.array([[0, 300]], np.float32)))


def test_a_glob_lists_the_files_a_folder_walk_lists(tmp_path):
    """`sr3 upscale 'photos/*'` read the Thumbs.db and notes a folder input skips, and failed on them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    PIL.Image.new("RGB", (4, 4)).save(folder / "a.png")
    for name in ("Thumbs.db", "notes.txt", ".DS_Store"):
        (folder / name).write_bytes(b"not an image")
    images = [str(folder / "a.png")]
    assert find_images([str(folder / "*")]) == find_images([str(folder)]) == images
    assert dict(find_image_sources([str(folder / "*")])) == {images[0]: "a.png"}
    assert find_images([str(folder / "Thumbs.db")]) == [str(folder / "Thumbs.db")]  # named: listed as asked
    with pytest.raises(FileNotFoundError, match="no images found in"):
        find_images([str(folder / "*.txt")])  # matches files, no images: as a folder without images
    with pytest.raises(FileNotFoundError, match="no such file, folder or matching glob"):
        find_images([str(folder / "*.jpg")])
    # A pattern naming a format Pillow reads beyond the folder walk's list (netpbm, Targa) finds those files.
    PIL.Image.new("L", (4, 4)).save(folder / "scan.pgm")
    assert find_images([str(folder / "*.pgm")]) == [str(folder / "scan.pgm")]
    assert find_images([str(folder / "*")]) == images + [str(folder / "scan.pgm")]
