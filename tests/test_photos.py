"""The packaged-photo dataset: discovery, the held-out split of whole photos, and crops."""

import dataclasses
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_sr3 import photos
from diffusers_sr3.photos import (
    PACKAGED_MODEL_HELDOUT,
    PhotoSource,
    heldout_crops,
    load_photo,
    packaged_model_heldout,
    packaged_photo_paths,
    photo_crops,
    photo_name,
    photo_split,
    random_crop_positions,
    register_photo_source,
    study_crops,
)


def _write_photo(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_packaged_photos_are_real_colour_photographs():
    paths = packaged_photo_paths()
    names = [photo_name(path) for path in paths]
    assert "astronaut" in names and "coffee" in names  # scikit-image is a test dependency
    assert len(set(names)) == len(names)
    assert names == sorted(names)
    for excluded in ("camera", "motorcycle_right", "logo", "chessboard_RGB", "text"):
        assert excluded not in names
    for path in paths:
        with PIL.Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) >= 256, path


def _sources_moved_to(monkeypatch, folder):
    """The default photo sources, with nothing installed and the Debian folders moved under `folder`."""
    monkeypatch.setattr(photos, "_package_dir", lambda package: None)
    moved = [
        dataclasses.replace(source, folder=folder / pathlib.Path(source.folder).name)
        if source.package is None
        else source
        for source in photos.PHOTO_SOURCES
    ]
    monkeypatch.setattr(photos, "PHOTO_SOURCES", moved)


def test_packaged_photos_missing_names_providers(monkeypatch, tmp_path):
    _sources_moved_to(monkeypatch, tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="scikit-image.*mate-backgrounds"):
        packaged_photo_paths()


def test_plasma_wallpaper_name_and_largest_landscape_rendition(monkeypatch, tmp_path):
    images = tmp_path / "wallpapers" / "Path" / "contents" / "images"
    images.mkdir(parents=True)
    for name in ("640x480.jpg", "1280x800.jpg", "720x1440.jpg"):
        _write_photo(images / name, 8, 8)
    _sources_moved_to(monkeypatch, tmp_path)
    assert packaged_photo_paths() == [images / "1280x800.jpg"]
    assert photo_name(images / "1280x800.jpg") == "Path"


@pytest.mark.parametrize("listing", [sorted, lambda paths: sorted(paths, reverse=True)])
def test_a_wallpaper_with_two_renditions_of_one_size_gives_the_same_file_in_any_listing_order(
    monkeypatch, tmp_path, listing
):
    images = tmp_path / "wallpapers" / "Path" / "contents" / "images"
    images.mkdir(parents=True)
    for name in ("1920x1080.png", "1920x1080.jpg", "640x480.jpg"):
        _write_photo(images / name, 8, 8)
    _sources_moved_to(monkeypatch, tmp_path)
    real_glob = pathlib.Path.glob
    # Filesystems list a folder in their own order (ext4 by hash, others by creation): both orders are tried.
    monkeypatch.setattr(pathlib.Path, "glob", lambda self, pattern: iter(listing(real_glob(self, pattern))))
    assert packaged_photo_paths() == [images / "1920x1080.jpg"]


def test_split_is_deterministic_disjoint_and_whole_photo(tmp_path):
    paths = [tmp_path / f"photo{i}.png" for i in range(10)]
    train, held = photo_split(paths, heldout=3)
    assert len(held) == 3 and len(train) == 7
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(paths)
    assert photo_split(list(reversed(paths)), heldout=3)[1] == held  # order of the input does not matter
    assert photo_split(paths, heldout=0.3)[1] == held
    # Adding photos never moves an already held-out photo out of a larger held-out set of the same rank.
    assert set(held) <= set(photo_split(paths + [tmp_path / "extra.png"], heldout=4)[1]) | {tmp_path / "extra.png"}
    train, held = photo_split(paths, heldout=["photo2", "photo5"])
    assert [photo_name(p) for p in held] == ["photo2", "photo5"]


def test_split_takes_numpy_counts_and_one_name_and_refuses_a_bool(tmp_path):
    paths = [tmp_path / f"photo{i}.png" for i in range(10)]
    assert photo_split(paths, heldout=np.int64(3)) == photo_split(paths, heldout=3)
    assert photo_split(paths, heldout=np.float64(0.3)) == photo_split(paths, heldout=0.3)
    # One name is that photo, not a set of its characters.
    assert [photo_name(p) for p in photo_split(paths, heldout="photo2")[1]] == ["photo2"]
    with pytest.raises(ValueError, match="count, a fraction or photo names, not True"):
        photo_split(paths, heldout=True)


def test_the_packaged_model_is_evaluated_on_its_own_heldout_photos_whichever_are_installed(tmp_path):
    """A fraction's held-out photos depend on which photo packages are installed: with scikit-image, matplotlib
    and scikit-learn alone, 0.25 held out 'china', which the packaged model trained on."""
    skimage = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "ihc", "motorcycle_left", "retina", "rocket"]
    paths = [tmp_path / f"{name}.jpg" for name in [*skimage, "grace_hopper", "china", "flower"]]
    assert not {photo_name(p) for p in photo_split(paths, heldout=0.25)[1]} <= set(PACKAGED_MODEL_HELDOUT)
    assert packaged_model_heldout(paths) == ["chelsea", "coffee"]
    _, held = photo_split(paths, heldout=packaged_model_heldout(paths))
    assert [photo_name(p) for p in held] == ["chelsea", "coffee"]
    with pytest.raises(FileNotFoundError, match="none of the packaged model's held-out photos"):
        packaged_model_heldout([tmp_path / "china.jpg", tmp_path / "flower.jpg"])


@pytest.mark.parametrize(
    "heldout, message",
    [(0, "cannot hold out"), (10, "cannot hold out"), (1.5, "fraction"), (["nope"], "not among"), ([], "each side")],
)
def test_split_rejects_bad_requests(tmp_path, heldout, message):
    paths = [tmp_path / f"photo{i}.png" for i in range(10)]
    with pytest.raises(ValueError, match=message):
        photo_split(paths, heldout=heldout)


def test_split_rejects_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        photo_split([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], heldout=1)


def test_grid_crops_cover_the_photo_exactly(tmp_path):
    path = _write_photo(tmp_path / "a.png", 40, 24)
    crops = photo_crops([path], size=8, stride=8)
    assert len(crops) == 5 * 3
    source = np.asarray(PIL.Image.open(path))
    np.testing.assert_array_equal(np.asarray(crops[6]), source[8:16, 8:16])  # row 1, column 1
    tensor = photo_crops([path], size=8, stride=8, output_type="pt")
    assert tensor.shape == (15, 3, 8, 8) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_allclose(((tensor[6].permute(1, 2, 0) + 1) * 127.5).numpy(), source[8:16, 8:16], atol=1e-3)


def test_random_crops_are_seeded_and_skip_small_photos(tmp_path):
    paths = [_write_photo(tmp_path / "big.png", 64, 48, 1), _write_photo(tmp_path / "tiny.png", 8, 8, 2)]
    first = photo_crops(paths, size=16, count=12, seed=3, output_type="pt")
    assert first.shape == (12, 3, 16, 16)
    assert torch.equal(first, photo_crops(paths, size=16, count=12, seed=3, output_type="pt"))
    assert not torch.equal(first, photo_crops(paths, size=16, count=12, seed=4, output_type="pt"))
    with pytest.raises(ValueError, match="at least 32x32"):
        photo_crops([paths[1]], size=32, count=1)


def test_random_crop_positions_on_a_grid_cover_every_photo_in_proportion():
    positions = random_crop_positions([(100, 72), (64, 64)], 32, 400, seed=0, step=4)
    # 18 x 11 places in the first photo, 9 x 9 in the second: drawn in proportion, all on the 4-pixel grid.
    assert all(top % 4 == 0 and left % 4 == 0 for _, top, left in positions)
    assert all(top + 32 <= (100, 64)[photo] and left + 32 <= (72, 64)[photo] for photo, top, left in positions)
    share = sum(photo == 0 for photo, _, _ in positions) / len(positions)
    assert abs(share - 198 / 279) < 0.07
    assert random_crop_positions([(100, 72), (64, 64)], 32, 400, seed=0, step=4) == positions
    with pytest.raises(ValueError, match="at least 128x128"):
        random_crop_positions([(100, 72)], 128, 1, seed=0)


def test_max_side_downscales_before_cropping(tmp_path):
    path = _write_photo(tmp_path / "wide.jpg", 200, 100)
    assert load_photo(path, max_side=50).size == (50, 25)
    assert len(photo_crops([path], size=25, stride=25, max_side=50)) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=8), "exactly one"),
        (dict(size=8, count=2, stride=2), "exactly one"),
        (dict(size=0, count=2), "positive"),
        (dict(size=8, count=2, output_type="np"), "output_type"),
    ],
)
def test_crop_arguments_are_checked(tmp_path, kwargs, message):
    path = _write_photo(tmp_path / "a.png", 16, 16)
    with pytest.raises(ValueError, match=message):
        photo_crops([path], **kwargs)


def test_unreadable_photo_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_photo(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_photo(tmp_path / "missing.png")


def test_users_register_their_own_photo_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(photos, "PHOTO_SOURCES", list(photos.PHOTO_SOURCES))
    (tmp_path / "mine" / "nested").mkdir(parents=True)
    for index in range(4):
        _write_photo(tmp_path / "mine" / "nested" / f"mine{index}.png", 40, 30, seed=index)
    (tmp_path / "mine" / "notes.txt").write_text("not a photo", encoding="utf-8")
    register_photo_source(PhotoSource("my photos", folder=tmp_path / "mine"))
    with pytest.raises(ValueError, match="already registered"):
        register_photo_source(PhotoSource("my photos", folder=tmp_path))
    found = packaged_photo_paths()
    assert {f"mine{index}" for index in range(4)} <= {photo_name(path) for path in found}
    only_mine = packaged_photo_paths(sources=[photos.PHOTO_SOURCES[-1]])
    assert [photo_name(path) for path in only_mine] == [f"mine{index}" for index in range(4)]
    # A package source: a folder inside an installed package (found without importing it), named files only.
    package = tmp_path / "site" / "photo_package"
    (package / "images").mkdir(parents=True)
    _write_photo(package / "images" / "kept.png", 20, 20)
    _write_photo(package / "images" / "other.png", 20, 20)
    (package / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    source = PhotoSource("package photos", "images", ("kept.png", "absent.png"), package="photo_package")
    assert source.paths() == [package / "images" / "kept.png"]
    assert PhotoSource("not installed", "images", package="no_such_package_here").paths() == []


def test_heldout_and_training_crops_follow_the_shared_recipe(tmp_path):
    paths = [_write_photo(tmp_path / f"photo{i}.png", 48, 40, seed=i) for i in range(4)]
    crops, held = heldout_crops(16, count=3, seed=5, heldout=0.25, max_side=None, paths=paths)
    assert held == photo_split(paths, heldout=0.25)[1]
    expected = photo_crops(held, 16, count=3, seed=6, max_side=None, output_type="pt")
    torch.testing.assert_close(crops, expected, rtol=0, atol=0)
    study = study_crops(16, 5, 3, seed=5, heldout=0.25, max_side=None, paths=paths)
    torch.testing.assert_close(study.heldout, crops, rtol=0, atol=0)
    assert study.heldout_photos == held and study.train_photos == photo_split(paths, heldout=0.25)[0]
    assert set(study.train_photos).isdisjoint(held) and len(study.train) == 5 and study.train[0].size == (16, 16)
    expected_train = photo_crops(study.train_photos, 16, count=5, seed=5, max_side=None)
    assert [np.asarray(a).tolist() for a in study.train] == [np.asarray(b).tolist() for b in expected_train]
