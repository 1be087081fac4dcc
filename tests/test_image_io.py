"""One image walker and one image opener: EXIF orientation, RGB, clear errors, through every entry point."""

import errno
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_sr3.cli import main
from diffusers_sr3.data import build_training_data
from diffusers_sr3.image_io import (
    IMAGE_EXTENSIONS,
    ImageTooLargeError,
    UnreadableImageError,
    _check_glob_folders_open,
    find_image_sources,
    find_images,
    image_size,
    inspect_image,
    is_grayscale,
    open_image,
    read_formats,
    walk_images,
)

ROTATE_90_CLOCKWISE = 6  # EXIF orientation: the stored pixels must be turned 90 degrees clockwise for display


def _pixels(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def phone_photo(folder, name, width, height, seed=0):
    """A PNG as a phone writes it: stored sideways (`width` x `height`) with an EXIF orientation tag, and the
    same picture stored upright without a tag (what every reader must see)."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = PIL.Image.fromarray(_pixels(width, height, seed))
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = ROTATE_90_CLOCKWISE
    tagged, upright = folder / f"{name}.png", folder.parent / f"{folder.name}_upright" / f"{name}.png"
    stored.save(tagged, exif=exif)
    upright.parent.mkdir(exist_ok=True)
    stored.transpose(PIL.Image.Transpose.ROTATE_270).save(upright)
    return tagged, upright


def test_open_image_turns_exif_rotated_photos_upright(tmp_path):
    tagged, upright = phone_photo(tmp_path / "phone", "portrait", 12, 6)
    assert PIL.Image.open(tagged).size == (12, 6)  # stored sideways
    image = open_image(tagged)
    assert image.size == (6, 12) and image.mode == "RGB" and image_size(tagged) == (6, 12)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(PIL.Image.open(upright)))
    np.testing.assert_array_equal(np.asarray(open_image(tagged.read_bytes())), np.asarray(image))


def test_open_image_converts_to_rgb_and_names_the_file_in_errors(tmp_path):
    PIL.Image.new("P", (4, 4)).save(tmp_path / "palette.png")
    PIL.Image.new("LA", (4, 4)).save(tmp_path / "gray.png")
    assert open_image(tmp_path / "palette.png").mode == open_image(tmp_path / "gray.png").mode == "RGB"
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    with pytest.raises(UnreadableImageError, match="cannot read image .*notes.png") as caught:
        open_image(tmp_path / "notes.png")
    assert caught.value.not_an_image and isinstance(caught.value, ValueError)
    PIL.Image.fromarray(_pixels(64, 64)).save(tmp_path / "whole.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match="truncated.png") as caught:
        open_image(tmp_path / "truncated.png")
    assert not caught.value.not_an_image
    with pytest.raises(ImageTooLargeError, match="64x64 = 4,096 pixels") as caught:
        open_image(tmp_path / "whole.png", max_pixels=4000)
    assert caught.value.size == (64, 64)
    # Beyond Pillow's decompression-bomb limit Pillow will not even open it: too large where a limit is set.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming_size(20000, 20000))
    with pytest.raises(ImageTooLargeError, match=r"bomb.png is over 178,956,970 pixels, more than 4,000") as caught:
        open_image(bomb, max_pixels=4000)
    assert caught.value.size is None
    with pytest.raises(UnreadableImageError, match="bomb.png: Image size"):
        open_image(bomb)


def png_claiming_size(width, height):
    """A tiny PNG whose header claims `width` x `height` pixels."""
    stream = io.BytesIO()
    PIL.Image.new("L", (1, 1)).save(stream, format="PNG")
    data = bytearray(stream.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def test_16_bit_and_float_images_keep_their_brightness_everywhere(tmp_path, tiny_pipeline):
    """PIL's convert("RGB") clips 16-bit gray at 255 (a scanner's 16-bit PNG came out white): every reader scales."""
    from diffusers_sr3.image_processing import images_to_tensor
    from diffusers_sr3.metrics import to_uint8_rgb

    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).round().astype(np.uint16)
    PIL.Image.fromarray(ramp).save(tmp_path / "scan16.png")
    PIL.Image.fromarray(ramp).save(tmp_path / "scan16.tif")
    expected = np.rint(ramp / 257).astype(np.uint8)
    for name in ("scan16.png", "scan16.tif"):
        assert PIL.Image.open(tmp_path / name).mode.startswith("I")  # what PIL opens them as
        opened = np.asarray(open_image(tmp_path / name))
        assert opened.shape == (48, 64, 3) and np.array_equal(opened[..., 1], expected)
        assert np.array_equal(to_uint8_rgb(PIL.Image.open(tmp_path / name)), opened)
    # The pipeline's input keeps all 16 bits.
    tensor = images_to_tensor(PIL.Image.open(tmp_path / "scan16.png"))  # in [-1, 1]
    torch.testing.assert_close((tensor[0, 2] + 1) / 2, torch.from_numpy(ramp / 65535).float())
    # 32-bit integer gray holding 16-bit values, and float images in [0, 1] or [0, 255].
    as_int32 = PIL.Image.fromarray(ramp.astype(np.int32))
    assert as_int32.mode == "I" and np.array_equal(np.asarray(open_image(as_int32))[..., 0], expected)
    half = PIL.Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert half.mode == "F" and (np.asarray(open_image(half)) == 128).all()
    assert (np.asarray(open_image(PIL.Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32)))) == 200).all()
    # End to end: `sr3 upscale` of a mid-gray 16-bit scan is mid-gray, not white.
    tiny_pipeline.save_pretrained(tmp_path / "model")
    PIL.Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "gray16.png")
    out = tmp_path / "gray16_sr.png"
    assert (
        main(["upscale", str(tmp_path / "gray16.png"), "--model", str(tmp_path / "model"), "--output", str(out)]) == 0
    )
    # Written 16-bit, as read; an untrained network adds noise only.
    assert PIL.Image.open(out).mode == "I;16" and abs(np.asarray(PIL.Image.open(out)).mean() - 30000) < 40 * 257


def test_one_walker_for_folders_files_and_globs(tmp_path):
    for relative in ("b.png", "a.JPG", "sub/c.webp", "sub/notes.txt", ".cache/d.png", "sub/.hidden/e.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    expected = [str(tmp_path / name) for name in ("a.JPG", "b.png", "sub/c.webp")]
    assert walk_images(tmp_path) == expected
    assert find_images([str(tmp_path), str(tmp_path / "b.png")]) == expected
    assert find_images([str(tmp_path / "*.png")]) == [str(tmp_path / "b.png")]
    with pytest.raises(FileNotFoundError, match="no such file, folder or matching glob"):
        find_images([str(tmp_path / "nothing*.png")])


def test_library_modules_do_not_import_the_command_line_layer():
    import pathlib
    import re

    import diffusers_sr3

    package = pathlib.Path(diffusers_sr3.__file__).parent
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "commands" not in path.parts
        and path.name not in ("cli.py", "__main__.py")
        and re.search(r"^\s*from\s+(\.+|diffusers_sr3\.)commands\b", path.read_text(encoding="utf-8"), re.M)
    ]
    assert offenders == []


def test_upscale_applies_the_exif_orientation(tiny_pipeline, tmp_path):
    model = tmp_path / "model"
    tiny_pipeline.save_pretrained(model)
    tagged, upright = phone_photo(tmp_path / "phone", "photo", 8, 4)
    outputs = {}
    for kind, source in (("tagged", tagged), ("upright", upright)):
        out = tmp_path / f"out_{kind}.png"
        arguments = ["upscale", str(source), "--model", str(model), "--output", str(out), "--steps", "2"]
        assert main(arguments + ["--scheduler", "ddim", "--device", "cpu"]) == 0
        outputs[kind] = np.asarray(PIL.Image.open(out))
    assert outputs["tagged"].shape == (32, 16, 3)  # 4x8 upright, x4
    np.testing.assert_array_equal(outputs["tagged"], outputs["upright"])


def test_prepare_applies_the_exif_orientation(tmp_path):
    tagged, upright = phone_photo(tmp_path / "phone", "photo", 48, 24)
    for folder in (tagged.parent, upright.parent):
        assert main(["prepare", str(folder), "--out", str(tmp_path / f"{folder.name}_out"), "--sizes", "4,16"]) == 0
    for kind in ("hr_16", "lr_4", "sr_4_16"):
        np.testing.assert_array_equal(
            np.asarray(PIL.Image.open(tmp_path / "phone_out" / kind / "00000.png")),
            np.asarray(PIL.Image.open(tmp_path / "phone_upright_out" / kind / "00000.png")),
        )


def test_eval_applies_the_exif_orientation(tmp_path):
    tagged, upright = phone_photo(tmp_path / "phone", "photo", 32, 16)
    report = tmp_path / "report.json"
    assert main(["eval", "--hr", str(upright.parent), "--sr", str(tagged.parent), "--json", str(report)]) == 0
    assert json.loads(report.read_text(encoding="utf-8"))["images"]["photo"]["psnr"] == "inf"  # identical once upright


def test_training_data_applies_the_exif_orientation(tmp_path):
    tagged, upright = phone_photo(tmp_path / "phone", "photo", 32, 16)
    options = dict(resolution=16, upscale_factor=4, random_flip=False)
    rotated = build_training_data(train_images=[str(tagged)], **options).dataset.sample(0, augment=False)
    plain = build_training_data(train_images=[str(upright)], **options).dataset.sample(0, augment=False)
    for key in ("hr", "lr", "condition"):
        np.testing.assert_array_equal(rotated[key].numpy(), plain[key].numpy())
    # The folder source and bytes (as `datasets` stores images) go through the same opener.
    from_folder = build_training_data(train_data_dir=str(tagged.parent), **options).dataset.sample(0, augment=False)
    np.testing.assert_array_equal(from_folder["hr"].numpy(), plain["hr"].numpy())
    from_bytes = build_training_data(train_dataset=[{"image": {"bytes": tagged.read_bytes()}}], **options)
    np.testing.assert_array_equal(from_bytes.dataset.sample(0, augment=False)["hr"].numpy(), plain["hr"].numpy())


def test_is_grayscale_knows_gray_modes_and_equal_channels():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    assert is_grayscale(PIL.Image.fromarray(gray))
    assert is_grayscale(PIL.Image.fromarray(gray.astype(np.uint16) * 257))
    assert is_grayscale(PIL.Image.fromarray(np.dstack([gray] * 3)))
    assert is_grayscale(PIL.Image.fromarray(np.dstack([gray] * 3 + [gray[::-1]]), "RGBA"))
    assert is_grayscale(PIL.Image.fromarray(gray).convert("P"))
    tinted = np.dstack([gray] * 3)
    tinted[2, 3, 1] ^= 1  # one pixel, one level off gray
    assert not is_grayscale(PIL.Image.fromarray(tinted))


def swapped_primaries_profile():
    """ICC profile bytes of an RGB space whose red and blue primaries are sRGB's blue and red: Pillow makes only
    sRGB, LAB and XYZ profiles in memory, and this one makes a wrong reading obvious (red comes out blue)."""
    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    entries = {}
    for index in range(struct.unpack(">I", data[128:132])[0]):
        start = 132 + 12 * index
        entries[bytes(data[start : start + 4])] = start
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red + 4 : red + 12], data[blue + 4 : blue + 12] = data[blue + 4 : blue + 12], data[red + 4 : red + 12]
    return bytes(data)


def test_open_image_converts_colour_profiles_to_srgb(tmp_path):
    """An Adobe RGB or Display P3 photo read as sRGB shifts colour: pixels are converted by their ICC profile."""
    from PIL import ImageCms

    red = PIL.Image.new("RGB", (4, 4), (200, 30, 30))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    red.save(tmp_path / "swapped.png", icc_profile=swapped_primaries_profile())
    red.save(tmp_path / "swapped.jpg", icc_profile=swapped_primaries_profile(), quality=100, subsampling=0)
    red.save(tmp_path / "srgb.png", icc_profile=srgb)
    red.save(tmp_path / "damaged.png", icc_profile=b"not a profile" * 10)
    for name in ("swapped.png", "swapped.jpg"):
        pixel = np.asarray(open_image(tmp_path / name))[0, 0].astype(int)
        assert pixel[2] > 150 and pixel[0] < 80, (name, pixel)  # the file's red channel is sRGB blue
    # sRGB-tagged pixels are unchanged; an unreadable profile is read as sRGB, as browsers do.
    for name in ("srgb.png", "damaged.png"):
        assert (np.asarray(open_image(tmp_path / name)) == (200, 30, 30)).all()
    # Transparency stays readable beside the converted colours.
    PIL.Image.new("RGBA", (4, 4), (200, 30, 30, 128)).save(tmp_path / "a.png", icc_profile=swapped_primaries_profile())
    assert open_image(tmp_path / "a.png").mode == "RGB" and inspect_image(tmp_path / "a.png").transparent


def test_open_image_keeps_16_bit_gray_on_request_and_inspect_image_reports(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16) * 7).reshape(8, 8)  # dark: all under 8-bit level 2
    for name in ("dark16.png", "dark16.tif"):
        PIL.Image.fromarray(ramp).save(tmp_path / name)
        kept = open_image(tmp_path / name, keep_16bit=True)
        assert kept.mode == "I;16" and np.array_equal(np.asarray(kept), ramp)
        assert open_image(tmp_path / name).mode == "RGB"  # the default is unchanged
        facts = inspect_image(tmp_path / name)
        assert facts.sixteen_bit and facts.grayscale and facts.size == (8, 8) and facts.frames == 1
    assert np.array_equal(
        np.asarray(open_image(PIL.Image.fromarray(ramp.astype(np.int32) * 100), keep_16bit=True)), ramp * 100
    )
    frames = [PIL.Image.new("RGB", (6, 4), (80 * index, 0, 0)) for index in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    PIL.Image.new("RGBA", (6, 4), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    assert inspect_image(tmp_path / "anim.gif").frames == 3
    opaque = inspect_image(tmp_path / "opaque.png")
    assert not opaque.transparent and not opaque.sixteen_bit and not opaque.grayscale
    (tmp_path / "cut.png").write_bytes((tmp_path / "opaque.png").read_bytes()[:-30])
    with pytest.raises(UnreadableImageError, match="cut.png"):
        inspect_image(tmp_path / "cut.png")


def test_folder_walks_skip_hidden_files_and_name_files_below_their_input(tmp_path):
    for relative in ("2023/IMG_0001.png", "2024/IMG_0001.png", "2024/._IMG_0001.png", "top.png"):
        (tmp_path / "t" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "t" / relative).write_bytes(b"")
    (tmp_path / "alone.png").write_bytes(b"")
    # macOS AppleDouble files (._name) are no images: a folder walk skips them, a named file is still listed.
    assert [path.split("/t/")[-1] for path in walk_images(tmp_path / "t")] == [
        "2023/IMG_0001.png",
        "2024/IMG_0001.png",
        "top.png",
    ]
    hidden = str(tmp_path / "t" / "2024" / "._IMG_0001.png")
    assert hidden in find_images([hidden])
    sources = dict(find_image_sources([str(tmp_path / "t"), str(tmp_path / "alone.png")]))
    assert sorted(sources.values()) == ["2023/IMG_0001.png", "2024/IMG_0001.png", "alone.png", "top.png"]
    assert sorted(dict(find_image_sources([str(tmp_path / "t" / "**" / "*.png")])).values()) == [
        "2023/IMG_0001.png",
        "2024/IMG_0001.png",
        "top.png",
    ]
    # Formats this Pillow reads are walked too.
    for extension in (".jfif", ".avif"):
        readable = PIL.Image.registered_extensions().get(extension) in PIL.Image.OPEN
        assert (extension in IMAGE_EXTENSIONS) == readable


def test_a_folder_that_cannot_be_listed_is_named_not_skipped(tmp_path, monkeypatch, capsys):
    """Another user's private subfolder (mode 700) inside a folder input: `os.walk` skips it silently, and a run
    would report success without its images; the run must stop and name it, before writing anything."""
    photos = tmp_path / "photos"
    for relative in ("mine/a.png", "theirs/b.png"):
        (photos / relative).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4)).save(photos / relative)
    private = photos / "theirs"
    private.chmod(0)
    if os.geteuid() == 0:  # root lists any folder: refuse the listing as for anyone else
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(private):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"cannot list the folder {private}: Permission denied")):
            walk_images(photos)
        for target in (photos, private):
            assert main(["upscale", str(target), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
            error = capsys.readouterr().err
            assert f"cannot list the folder {private}: Permission denied" in error and "Traceback" not in error
    finally:
        private.chmod(0o755)
    assert not (tmp_path / "out").exists()


def test_a_folder_a_glob_cannot_open_is_named_not_skipped(tmp_path, monkeypatch, capsys):
    """A glob input (`"photos/**/*.png"`, quoted) skipped another user's private subfolder silently, where a folder
    input stops and names it: globs stop too, whether glob lists the folder (`*`, `**`) or looks a name up in it
    (`*/raw/*.png`)."""
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    for relative in ("mine/a.png", "mine/raw/c.png", "theirs/raw/b.png"):
        (photos / relative).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4)).save(photos / relative)
    private = os.path.join("photos", "theirs")
    real_scandir, real_access = os.scandir, os.access

    def scandir(path="."):  # root lists any folder: refuse the listing as for anyone else
        if os.path.normpath(os.fspath(path)) == private:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def access(path, mode, **kwargs):
        return os.path.normpath(os.fspath(path)) != private and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "access", access)
    for pattern, verb in (
        ("photos/**/*.png", "list"),
        ("photos/*/*.png", "list"),
        ("photos/theirs/*.png", "list"),
        ("*/*/raw/*.png", "look into"),
    ):
        with pytest.raises(PermissionError, match=re.escape(f"cannot {verb} the folder {private}: Permission denied")):
            find_image_sources([pattern])
        assert main(["upscale", pattern, "--output", "out", "--device", "cpu"]) == 2
        error = capsys.readouterr().err
        assert f"cannot {verb} the folder {private}: Permission denied" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    # Where the pattern does not reach the folder, it is not looked at.
    found = os.path.join("photos", "mine", "raw", "c.png")
    assert find_image_sources(["photos/mine/*/*.png"]) == [(found, os.path.join("raw", "c.png"))]
    assert find_image_sources(["photos/m*/raw/*.png"]) == [(found, os.path.join("mine", "raw", "c.png"))]


def test_a_folder_a_glob_lists_but_cannot_look_into_is_named_not_skipped(tmp_path, monkeypatch):
    """Another user's folder of mode 744 (`r--` for this user): glob lists its names but cannot tell files from
    folders there, so its images were dropped without a word (`photos/*/*.png`), or the pattern naming it matched
    "no such file" (`photos/theirs/*.png`). The glob stops and names it."""
    monkeypatch.chdir(tmp_path)
    for relative in ("mine/a.png", "theirs/b.png"):
        (tmp_path / "photos" / relative).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4)).save(tmp_path / "photos" / relative)
    private = os.path.join("photos", "theirs")
    real_access = os.access

    def access(path, mode, **kwargs):  # root looks into any folder: refuse it as for anyone else
        searching = mode & os.X_OK and os.path.normpath(os.fspath(path)) == private
        return not searching and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    for pattern in ("photos/*/*.png", "photos/**/*.png", "photos/theirs/*.png"):
        with pytest.raises(PermissionError, match=re.escape(f"cannot look into the folder {private}: Permission")):
            find_image_sources([pattern])


def test_a_walk_lists_a_folder_it_holds_again_and_skips_linked_folders(tmp_path):
    """A folder whose lock the walk takes (`DATASET_HOLD`, a prepared dataset) was listed before the lock: a prepare
    that ended meanwhile may have written more, which the walk lists from the folder listed anew. A linked folder is
    not walked into (as `os.walk`), a linked image file is listed."""
    from diffusers_sr3.image_io import DATASET_HOLD

    dataset = tmp_path / "datasets" / "out"
    (dataset / "hr_16").mkdir(parents=True)
    (dataset / "hr_16" / "0.png").write_bytes(b"")
    (dataset / ".sr3_prepare.json").write_text("{}", encoding="utf-8")
    os.symlink(dataset / "hr_16", tmp_path / "datasets" / "linked_folder")
    os.symlink(dataset / "hr_16" / "0.png", tmp_path / "datasets" / "linked.png")
    offered = []

    def hold(folder, names):
        offered.append((os.path.relpath(folder, tmp_path), names is not None))
        if names is not None and ".sr3_prepare.json" in names:
            (dataset / "hr_32").mkdir()  # written between the folder's listing and its lock
            (dataset / "hr_32" / "0.png").write_bytes(b"")
            return True
        return False

    token = DATASET_HOLD.set(hold)
    try:
        found = walk_images(tmp_path / "datasets")
    finally:
        DATASET_HOLD.reset(token)
    assert [os.path.relpath(path, tmp_path / "datasets") for path in found] == [
        "linked.png",
        "out/hr_16/0.png",
        "out/hr_32/0.png",
    ]
    # Each folder walked, in order, with its file names; then the linked file's real folder and its parent.
    assert offered == [
        ("datasets", True),
        ("datasets/out", True),
        ("datasets/out/hr_16", True),
        ("datasets/out/hr_32", True),
        ("datasets/out/hr_16", False),
        ("datasets/out", False),
    ]
    assert walk_images(tmp_path / "datasets") == found  # nothing is offered where no reader holds datasets


def test_a_glob_checks_each_folder_in_one_walk(tmp_path, monkeypatch):
    """The check of a `**` glob walked the whole tree again for each component after it (twice for
    `photos/**/*.png`, then opened each folder, besides glob's own walk): each folder is listed once, besides the
    look that it opens."""
    monkeypatch.chdir(tmp_path)
    for relative in ("a/b/c.png", "a/d/e.png", "f/g.png"):
        (tmp_path / "photos" / relative).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4)).save(tmp_path / "photos" / relative)
    listings = []
    real_scandir = os.scandir

    def scandir(path="."):
        listings.append(os.path.normpath(os.fspath(path)))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for pattern in ("photos/**/*.png", "photos/**/b/*.png", "photos/*/*/*.png"):
        listings.clear()
        _check_glob_folders_open(pattern)
        counts = {folder: listings.count(folder) for folder in listings}
        assert counts and max(counts.values()) <= 2, (pattern, counts)


def test_a_disks_own_folders_are_not_searched_for_photos(tmp_path, monkeypatch):
    """A mounted data disk's top holds `lost+found` (mode 700, root's): a walk of it stopped there as at another
    user's private folder, so no folder input at a disk's top could be upscaled; before, it was skipped unread."""
    disk = tmp_path / "disk"
    for relative in ("a.png", "lost+found/#1234.png", "System Volume Information/b.png", "$RECYCLE.BIN/c.png"):
        (disk / relative).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (4, 4)).save(disk / relative)
    private = disk / "lost+found"
    private.chmod(0o700)
    real_scandir = os.scandir

    def scandir(path="."):  # as for an ordinary user, root too: lost+found is root's
        if os.fspath(path) == str(private):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert walk_images(disk) == [str(disk / "a.png")]


def test_one_file_spelled_several_ways_is_one_source(tmp_path, monkeypatch):
    """`./mixed` and `mixed/*.png`, `a.png` and its absolute path name one file: listed once, as first spelled,
    not as two inputs whose outputs clash."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "gray16.png").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    assert find_image_sources(["./mixed", "mixed/*.png"]) == [("./mixed/gray16.png", "gray16.png")]
    assert find_image_sources(["a.png", "./a.png", str(tmp_path / "a.png")]) == [("a.png", "a.png")]
    # Symlinks of other names to one file stay inputs of their own (distinct outputs, a dataset repeating an image).
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "pool" / "c.png").symlink_to(tmp_path / "a.png")
    assert find_image_sources(["pool"]) == [("pool/b.png", "b.png"), ("pool/c.png", "c.png")]


def test_an_srgb_profile_takes_no_colour_conversion():
    """Most tagged photos carry an sRGB profile: converting through it changes nothing and cost 3x the decoding."""
    from PIL import ImageCms

    from diffusers_sr3.image_io import _srgb_transform

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert _srgb_transform(srgb, "RGB") is None
    image = PIL.Image.new("RGB", (4, 4), (200, 30, 90))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", icc_profile=srgb)
    assert open_image(buffer.getvalue()).getpixel((0, 0)) == (200, 30, 90)


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n"


def fake_ghostscript(tmp_path, monkeypatch):
    """Puts a `gs` first on PATH that leaves a marker file wherever it is run (even for `gs --version`); returns the
    marker's path. Pillow's cached Ghostscript lookup is forgotten, so this `gs` is the one it would find."""
    import PIL.EpsImagePlugin

    marker = tmp_path / "gs_ran"
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    script = bin_folder / "gs"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> '{marker}'\necho 10.02.1\n", encoding="utf-8")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(PIL.EpsImagePlugin, "gs_binary", None)
    return marker


def test_postscript_named_as_an_image_is_refused_unread(tmp_path, monkeypatch, tiny_pipeline, capsys):
    """An EPS file named pic.png (or LMDB bytes holding one) would have Pillow run Ghostscript on it: it is refused
    as no image this reads, in one line naming it, and no `gs` runs."""
    from diffusers_sr3.data.decoding import decode_image

    marker = fake_ghostscript(tmp_path, monkeypatch)

    picture = tmp_path / "pic.png"
    picture.write_bytes(POSTSCRIPT)
    refusal = f"cannot read image {picture}: EPS data, not a format this reads (PNG, JPEG, "
    with pytest.raises(UnreadableImageError, match=re.escape(refusal)) as info:
        open_image(picture)
    assert info.value.not_an_image and "\n" not in str(info.value)
    with pytest.raises(UnreadableImageError, match=re.escape(refusal)):
        image_size(picture)
    with pytest.raises(ValueError, match=r"lmdb:hr_32_00000: cannot decode image \(EPS data, not a format this reads"):
        decode_image(POSTSCRIPT, "lmdb:hr_32_00000")
    model = tmp_path / "model"
    tiny_pipeline.save_pretrained(model)
    arguments = ["upscale", str(picture), "--model", str(model), "--output", str(tmp_path / "out.png")]
    assert main(arguments + ["--steps", "2", "--device", "cpu"]) != 0
    assert "pic.png: EPS data, not a format this reads" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize(
    "extension, mode",
    [(".png", "RGB"), (".jpg", "RGB"), (".jfif", "RGB"), (".webp", "RGB"), (".bmp", "RGB"), (".tif", "RGB")]
    + [(".gif", "P"), (".ppm", "RGB"), (".pgm", "L"), (".pbm", "1"), (".pfm", "F"), (".avif", "RGB")],
)
def test_every_format_read_opens(tmp_path, extension, mode):
    if PIL.Image.registered_extensions().get(extension) not in PIL.Image.SAVE:
        pytest.skip(f"this Pillow writes no {extension}")
    path = tmp_path / f"picture{extension}"
    PIL.Image.new(mode, (6, 4), 1 if mode in ("1", "F") else 200).save(path)
    assert PIL.Image.registered_extensions()[extension] in read_formats()
    assert open_image(path).size == (6, 4) and image_size(path) == (6, 4)


def test_formats_pillow_reads_but_this_does_not_are_refused_and_not_globbed(tmp_path):
    PIL.Image.new("RGB", (6, 4)).save(tmp_path / "scan.pcx")
    with pytest.raises(UnreadableImageError, match=r"scan\.pcx: PCX data, not a format this reads \(PNG, "):
        open_image(tmp_path / "scan.pcx")
    PIL.Image.new("RGB", (6, 4)).save(tmp_path / "scan.png")
    assert find_images([str(tmp_path / "*")]) == [str(tmp_path / "scan.png")]
    # A TGA has no magic bytes, and its header starts as a CUR's: no format is named rather than the wrong one.
    PIL.Image.new("RGB", (6, 4)).save(tmp_path / "render.tga")
    with pytest.raises(UnreadableImageError) as refused:
        open_image(tmp_path / "render.tga")
    assert "CUR" not in str(refused.value)


def test_a_camera_mpo_is_read_and_globbed(tmp_path):
    # Cameras write a second picture into some JPEGs (MPO); Pillow opens those through its JPEG reader.
    first, second = PIL.Image.new("RGB", (6, 4), "red"), PIL.Image.new("RGB", (6, 4), "blue")
    first.save(tmp_path / "IMG_0001.mpo", format="MPO", save_all=True, append_images=[second])
    assert find_images([str(tmp_path / "*.mpo")]) == [str(tmp_path / "IMG_0001.mpo")]
    assert open_image(tmp_path / "IMG_0001.mpo").size == (6, 4)


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_every_sideways_exif_orientation_swaps_the_sides_image_size_reports(tmp_path, orientation):
    """Transpose (5) and transverse (7) turn a photo sideways as the quarter-turns (6, 8) do."""
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = orientation
    PIL.Image.fromarray(_pixels(6, 4)).save(tmp_path / "photo.png", exif=exif)
    assert image_size(tmp_path / "photo.png") == open_image(tmp_path / "photo.png").size == (4, 6)


def test_a_draft_size_decodes_a_jpeg_reduced_but_no_smaller_than_asked(tmp_path):
    PIL.Image.fromarray(_pixels(256, 192)).save(tmp_path / "photo.jpg")
    # JPEG decodes at 1/2, 1/4 or 1/8: a quarter would make the shorter side 48.
    assert open_image(tmp_path / "photo.jpg", draft_size=64).size == (128, 96)
    assert open_image(tmp_path / "photo.jpg").size == (256, 192)


def test_is_grayscale_compares_blue_too():
    pixels = np.full((4, 4, 3), 100, dtype=np.uint8)
    pixels[1, 2, 2] = 101  # red and green gray, blue one level off
    assert not is_grayscale(PIL.Image.fromarray(pixels))
