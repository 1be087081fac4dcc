"""Image files at the edges of what readers meet: damaged later frames and metadata, 32-bit and float gray, and the
non-image files a glob matches. Every entry point reads through `image_io`, so `sr3 upscale` stands for them all."""

import io
import struct

import numpy as np
import PIL.Image
import pytest

from diffusers_sr3.cli import main
from diffusers_sr3.image_io import (
    UnreadableImageError,
    find_image_sources,
    find_images,
    inspect_image,
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


def test_damaged_metadata_is_an_error_that_names_the_file(tmp_path):
    """EXIF whose Make tag was garbled into XPosition (a rational): turning the picture upright rewrites the
    metadata, and Pillow raised TypeError on the text it found there."""
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6
    exif[PIL.Image.ExifTags.Base.Make] = "Cam"
    ascii_make = struct.pack(">HH", PIL.Image.ExifTags.Base.Make, 2)  # Pillow writes EXIF big-endian
    x_position = 0x011E  # a TIFF tag Pillow knows as rational
    garbled = exif.tobytes().replace(ascii_make, struct.pack(">HH", x_position, 2))
    path = tmp_path / "garbled.png"
    PIL.Image.new("RGB", (4, 3)).save(path, exif=garbled)
    for read in (open_image, inspect_image):
        with pytest.raises(UnreadableImageError, match="cannot read image .*garbled.png: "):
            read(path)


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
