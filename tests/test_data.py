"""Training data sources (diffusers_sr3.data): folders, the original's prepared layout and LMDB, streamed
parquet/imagefolder datasets, torch datasets; pair making and bad-image skipping."""

import glob
import io
import logging
import os
import re
import shutil
import time

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_sr3.commands.common import find_images
from diffusers_sr3.data import (
    EpochSampler,
    FileListSource,
    PairDataset,
    PairMaker,
    UnusableDataError,
    build_training_data,
    decode_image,
    prepared_resolutions,
    prepared_source,
)
from diffusers_sr3.data.pairs import film_grain
from diffusers_sr3.image_processing import degrade, images_to_tensor, upsample_condition


def random_image(height, width, seed):
    """A smooth random RGB image (PIL), so downsampling and flips have visible effects."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, height // 8), max(2, width // 8), 3))
    image = PIL.Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), PIL.Image.BICUBIC)
    noise = rng.integers(-10, 10, (height, width, 3))
    return PIL.Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_image_folder(folder, count=5, size=(40, 48), bad=True, nested=True):
    """Good images (some in a subfolder) plus, with `bad`, a corrupt, a truncated and a too-small one."""
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    for index in range(count):
        where = os.path.join(folder, "sub") if nested and index % 2 else folder
        random_image(size[0] + index, size[1], index).save(os.path.join(where, f"img{index}.png"))
    if bad:
        with open(os.path.join(folder, "corrupt.png"), "wb") as handle:
            handle.write(b"this is not an image")
        data = png_bytes(random_image(64, 64, 99))
        with open(os.path.join(folder, "truncated.png"), "wb") as handle:
            handle.write(data[: len(data) // 2])
        random_image(12, 12, 7).save(os.path.join(folder, "small.png"))
    return folder


def make_prepared_layout(folder, count=4, high=32, low=8):
    """The original prepare.py's folder layout: hr_<N>/, lr_<M>/, sr_<M>_<N>/ with equally named images."""
    for sub in (f"hr_{high}", f"lr_{low}", f"sr_{low}_{high}"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for index in range(count):
        hr = random_image(high, high, index)
        lr = hr.resize((low, low), PIL.Image.BICUBIC)
        name = f"{index:05d}.png"
        hr.save(os.path.join(folder, f"hr_{high}", name))
        lr.save(os.path.join(folder, f"lr_{low}", name))
        lr.resize((high, high), PIL.Image.BICUBIC).save(os.path.join(folder, f"sr_{low}_{high}", name))
    return folder


def make_lmdb(path, count=4, high=32, low=8, missing=()):
    """The original prepare.py's LMDB: 'length' and hr_/lr_/sr_ keys with PNG bytes (indices in `missing` left out)."""
    import lmdb

    env = lmdb.open(path, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for index in range(count):
            if index in missing:
                continue
            hr = random_image(high, high, index)
            lr = hr.resize((low, low), PIL.Image.BICUBIC)
            txn.put(f"hr_{high}_{index:05d}".encode(), png_bytes(hr))
            txn.put(f"lr_{low}_{index:05d}".encode(), png_bytes(lr))
            txn.put(f"sr_{low}_{high}_{index:05d}".encode(), png_bytes(lr.resize((high, high), PIL.Image.BICUBIC)))
        txn.put(b"length", str(count).encode())
    env.close()
    return path


def make_parquet(path, count=4, size=40, corrupt=1):
    """A parquet file with an `image` column (datasets' Image struct) holding PNGs and `corrupt` broken entries."""
    import datasets

    images = [{"bytes": png_bytes(random_image(size, size, index)), "path": None} for index in range(count)]
    images += [{"bytes": b"broken", "path": None}] * corrupt
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)
    dataset.to_parquet(path)
    return path


def test_folder_source_is_recursive_and_skips_bad_images(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"))
    assert len(find_images([folder])) == 8
    data = build_training_data(resolution=32, upscale_factor=4, train_data_dir=folder, random_flip=False)
    # The header scan drops the corrupt and the too-small file; the truncated one fails only when decoded.
    assert dict(data.skipped_at_scan) == {"unreadable": 1, "small": 1}
    assert len(data.dataset) == 6
    samples = [data.dataset[(0, index)] for index in range(len(data.dataset))]
    assert sum(sample["skipped"] for sample in samples) == 1
    for sample in samples:
        assert sample["hr"].shape == (3, 32, 32) and sample["hr"].dtype == torch.float32
        assert sample["lr"].shape == (3, 8, 8)
        # The pair is exactly the package's degradation of the crop (the one inference and evaluation use).
        lr, condition = degrade(sample["hr"][None], 4)
        torch.testing.assert_close(sample["lr"], lr[0])
        torch.testing.assert_close(sample["condition"], condition[0])
        assert sample["hr"].min() >= -1 and sample["hr"].max() <= 1


def test_nothing_usable_is_a_clear_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"junk")
    random_image(8, 8, 0).save(folder / "b.png")
    with pytest.raises(ValueError, match=r"no usable training images .*1 small, 1 unreadable"):
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=str(folder))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="no images"):
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no training data"):
        build_training_data(resolution=32, upscale_factor=4)


def test_runtime_failures_are_skipped_until_the_limit(tmp_path):
    folder = tmp_path / "truncated"
    folder.mkdir()
    data = png_bytes(random_image(64, 64, 1))
    for index in range(3):
        (folder / f"t{index}.png").write_bytes(data[: len(data) // 2])
    training = build_training_data(resolution=32, upscale_factor=4, train_data_dir=str(folder))
    # A ValueError (the training scripts print it as one line), counting the images there are, naming the last.
    with pytest.raises(UnusableDataError, match=r"none of the 3 images .* usable \(the last: .*t2.png: cannot decode"):
        training.dataset[(0, 0)]
    for index in range(3, 70):
        (folder / f"t{index}.png").write_bytes(data[: len(data) // 2])
    (folder / "zz_good.png").write_bytes(data)
    training = build_training_data(resolution=32, upscale_factor=4, train_data_dir=str(folder))
    with pytest.raises(UnusableDataError, match="64 images in a row .* unusable"):
        training.dataset[(0, 0)]


def test_a_dataset_of_no_images_and_a_folder_not_prepared_are_refused_in_words(tmp_path):
    with pytest.raises(UnusableDataError, match="image files holds no images"):
        PairDataset(FileListSource([]), PairMaker(resolution=32, upscale_factor=4))
    folder = make_image_folder(str(tmp_path / "plain"), count=1, size=(64, 64), bad=False)
    assert prepared_resolutions(folder) is None
    with pytest.raises(ValueError, match="is not a prepared folder .*sr3 prepare"):
        prepared_source(folder, 64, 4)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"), count=4, size=(64, 64), bad=False)
    options = dict(resolution=32, upscale_factor=4, train_data_dir=folder, random_crop=True, lr_blur_sigma=1.5)
    data = build_training_data(seed=3, **options)
    again = build_training_data(seed=3, **options)
    for index in range(4):
        torch.testing.assert_close(data.dataset[(0, index)]["lr"], again.dataset[(0, index)]["lr"])
    differs = [not torch.equal(data.dataset[(0, i)]["hr"], data.dataset[(1, i)]["hr"]) for i in range(4)]
    assert any(differs), "a new epoch must draw new crops and flips"
    # Blur augmentation: the LR is no longer the plain downsample of the crop.
    sample = data.dataset[(0, 0)]
    assert not torch.allclose(sample["lr"], degrade(sample["hr"][None], 4)[0][0], atol=1e-3)
    # Validation samples are never augmented: centre crop of the resized image, plain degradation.
    plain = data.validation_samples(2)
    torch.testing.assert_close(plain[0]["lr"], degrade(plain[0]["hr"][None], 4)[0][0])


def test_epoch_sampler_orders_by_seed_and_epoch():
    sampler = EpochSampler(10, seed=1)
    first = list(sampler)
    assert sorted(index for _, index in first) == list(range(10)) and {epoch for epoch, _ in first} == {0}
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert [index for _, index in sampler] != [index for _, index in first]


def test_epoch_sampler_repeats_passes_as_epochs_of_their_own():
    single = EpochSampler(10, seed=1)
    repeated = EpochSampler(10, seed=1, repeats=3)
    assert len(repeated) == 30
    plain_epochs = []
    for epoch in range(6):
        single.set_epoch(epoch)
        plain_epochs += list(single)
    # Epoch e of the repeated sampler is plain epochs 3e to 3e + 2, in order: each pass shuffled and keyed anew.
    for epoch in range(2):
        repeated.set_epoch(epoch)
        assert list(repeated) == plain_epochs[30 * epoch : 30 * (epoch + 1)]
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        EpochSampler(10, seed=1, repeats=0)


def test_memory_cached_source_loads_what_decoding_gave(tmp_path, monkeypatch):
    from diffusers_sr3.data.decoding import BadImageError
    from diffusers_sr3.data.sources import FileListSource, MemoryCachedSource, TorchDatasetSource

    folder = make_image_folder(str(tmp_path / "images"))  # with a truncated image, which passes the header scan
    source = FileListSource(find_images([folder]), folder)
    source.scan(min_size=16)
    cached = MemoryCachedSource(source)
    assert len(cached) == len(source) and cached.name(1) == source.name(1)
    failures = 0
    for index in range(len(source)):
        try:
            expected = source.load(index)
        except BadImageError as error:
            failures += 1
            for _ in range(2):
                with pytest.raises(BadImageError, match=re.escape(str(error))):
                    cached.load(index)
            continue
        loaded = cached.load(index)
        assert torch.equal(loaded[0], expected[0]) and loaded[1] is None
        loaded[0].fill_(0)  # what a caller does to its copy does not reach the cache
        assert torch.equal(cached.load(index)[0], expected[0])
    assert failures == 1
    pixels = [image for image in cached.images if isinstance(image, tuple)]
    assert len(pixels) == len(source) - 1 and all(image[0].dtype == np.uint8 for image in pixels)
    assert cached.nbytes == sum(image[0].nbytes for image in pixels)
    # Images that are not 8-bit (float tensors in a torch dataset) are kept as decoded, not rounded to 8 bits.
    floats = MemoryCachedSource(TorchDatasetSource([torch.rand(3, 20, 24)], "image", "floats"))
    assert isinstance(floats.images[0][0], torch.Tensor) and floats.nbytes == 3 * 20 * 24 * 4
    assert torch.equal(floats.load(0)[0], floats.source.load(0)[0])
    # More than the machine has: a clear error once the images cached so far pass 80% of what was available.
    monkeypatch.setattr("diffusers_sr3.data.sources.available_memory", lambda: 2 * pixels[0][0].nbytes)
    with pytest.raises(MemoryError, match=r"--cache_images: the first 2 of 6 images of .* take .* GiB, over 80%"):
        MemoryCachedSource(source)


def test_pair_maker_flip_keeps_the_pair_aligned():
    hr = images_to_tensor(random_image(32, 32, 4))[0]
    maker = PairMaker(32, 4, random_flip=True)
    flips = 0
    for seed in range(6):
        sample = maker(hr, generator=torch.Generator().manual_seed(seed))
        flipped = torch.equal(sample["hr"], hr.flip(-1))
        flips += flipped
        torch.testing.assert_close(sample["condition"], upsample_condition(sample["lr"][None], (32, 32))[0])
    assert 0 < flips < 6
    unconditional = PairMaker(32, None)(hr)
    assert set(unconditional) == {"hr"}


def test_pair_maker_rotations_draw_all_eight_orientations_and_keep_stored_pairs_aligned():
    hr = images_to_tensor(random_image(32, 32, 5))[0]
    lr = degrade(hr[None], 4)[0][0]
    orientations = [torch.rot90(image, turns, dims=(-2, -1)) for image in (hr, hr.flip(-1)) for turns in range(4)]
    maker = PairMaker(32, 4, random_flip=True, random_rotate=True)
    seen = set()
    for seed in range(64):
        sample = maker(hr, lr, generator=torch.Generator().manual_seed(seed))
        (index,) = [i for i, image in enumerate(orientations) if torch.equal(sample["hr"], image)]
        seen.add(index)
        # The stored LR turned with its HR: it is still the HR's degradation.
        torch.testing.assert_close(sample["lr"], degrade(sample["hr"][None], 4)[0][0], atol=1e-5, rtol=0)
    assert seen == set(range(8))
    # Without rotations a stored pair draws the flip alone, as before the option existed (runs resume exactly).
    for seed in range(8):
        flip = float(torch.rand((), generator=torch.Generator().manual_seed(seed))) < 0.5
        sample = PairMaker(32, 4, random_flip=True)(hr, lr, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample["hr"], hr.flip(-1) if flip else hr)
    unaugmented = maker(hr, lr, generator=torch.Generator().manual_seed(0), augment=False)
    assert torch.equal(unaugmented["hr"], hr)


def test_random_crops_reach_every_position_and_unaugmented_crops_are_centred():
    rows, columns = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    image = (rows * 10 + columns).expand(3, -1, -1)  # each pixel tells where it is
    maker = PairMaker(4, None, random_flip=False, random_crop=True)
    corners = {int(maker(image, generator=torch.Generator().manual_seed(seed))["hr"][0, 0, 0]) for seed in range(64)}
    assert corners == {top * 10 + left for top in range(2) for left in range(4)}
    assert torch.equal(maker(image, augment=False)["hr"], image[:, 0:4, 1:5])


def test_lr_blur_draws_its_strength_and_fits_small_images():
    from diffusers_sr3.data.pairs import gaussian_blur

    hr = images_to_tensor(random_image(16, 16, 6))[0]
    maker = PairMaker(16, 4, random_flip=False, lr_blur_sigma=3.0)
    lrs = [maker(hr, generator=torch.Generator().manual_seed(seed))["lr"] for seed in range(3)]
    assert not torch.allclose(lrs[0], lrs[1]) and not torch.allclose(lrs[1], lrs[2])
    small = torch.rand(3, 4, 4)
    blurred = gaussian_blur(small, 3.0)  # the kernel is cut to the image
    assert blurred.shape == small.shape and float(blurred.std()) < float(small.std())


def test_grain_keeps_the_hr_in_range():
    white = torch.ones(3, 16, 16)
    maker = PairMaker(16, 4, random_flip=False, film_grain_max=40, film_grain_probability=1)
    hr = maker(white, generator=torch.Generator().manual_seed(0))["hr"]
    assert float(hr.max()) == 1 and float(hr.min()) < 1


def test_a_stored_pair_of_the_wrong_sizes_is_a_bad_image():
    from diffusers_sr3.data import BadImageError

    maker = PairMaker(8, 2)
    for high, low in ((torch.rand(3, 10, 10), torch.rand(3, 4, 4)), (torch.rand(3, 8, 8), torch.rand(3, 5, 5))):
        with pytest.raises(BadImageError, match="stored pair is"):
            maker(high, low, generator=torch.Generator())


def neighbour_correlation(grain):
    return float(torch.corrcoef(torch.stack([grain[..., :-1].flatten(), grain[..., 1:].flatten()]))[0, 1])


def test_film_grain_has_scanned_films_statistics():
    grain = film_grain(torch.Size((3, 256, 256)), 0.05, torch.Generator().manual_seed(0))
    assert abs(float(grain.std()) - 0.05) < 1e-6
    channels = torch.corrcoef(grain.reshape(3, -1))
    assert all(0.7 < float(channels[i, j]) < 0.8 for i, j in ((0, 1), (0, 2), (1, 2)))
    assert 0.2 < neighbour_correlation(grain) < 0.33
    again = film_grain(torch.Size((3, 256, 256)), 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(grain, again)


def test_film_grain_goes_into_the_hr_before_its_lr_is_made(tmp_path):
    grey = torch.zeros(3, 64, 64)
    maker = PairMaker(32, 4, random_crop=True, film_grain_max=6, film_grain_probability=1)
    levels = []
    for seed in range(24):
        sample = maker(grey, generator=torch.Generator().manual_seed(seed))
        levels.append(float(sample["hr"].std()) * 127.5)
        # The LR is the grainy HR's degradation: the model sees the grain's trace, and learns to draw it only then.
        torch.testing.assert_close(sample["lr"], degrade(sample["hr"][None], 4)[0][0])
    assert max(levels) <= 6 + 1e-4 and min(levels) < 2 and max(levels) > 4, levels
    half = PairMaker(32, 4, random_crop=True, film_grain_max=6)
    grainy = sum(bool(half(grey, generator=torch.Generator().manual_seed(seed))["hr"].any()) for seed in range(64))
    assert 20 < grainy < 44
    assert not maker(grey, augment=False)["hr"].any(), "validation samples get no grain"
    assert not PairMaker(32, 4, random_crop=True)(grey, generator=torch.Generator())["hr"].any()
    hr = images_to_tensor(random_image(32, 32, 5))[0]
    with pytest.raises(ValueError, match="stored pair's LR cannot follow"):
        maker(hr, degrade(hr[None], 4)[0][0], generator=torch.Generator())
    # Wired through the data builder, as the training script's --film_grain_max / --film_grain_probability.
    folder = tmp_path / "grey"
    folder.mkdir()
    PIL.Image.new("RGB", (48, 48), (128, 128, 128)).save(folder / "grey.png")
    options = dict(resolution=32, upscale_factor=4, train_data_dir=str(folder), random_crop=True, film_grain_max=6)
    assert build_training_data(film_grain_probability=1, **options).dataset[(0, 0)]["hr"].std() > 0
    assert build_training_data(film_grain_probability=0, **options).dataset[(0, 0)]["hr"].std() == 0


def test_a_prepared_folder_without_its_hr_images_is_refused(tmp_path):
    # Read as a plain image folder, its bicubic sr_8_32 images would have become the high-resolution targets.
    root = make_prepared_layout(str(tmp_path / "ffhq_8_32"))
    shutil.rmtree(os.path.join(root, "hr_32"))
    with pytest.raises(ValueError, match=r"prepared layout \(lr_ / sr_ images\) without its hr_<size> images"):
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=root)


def test_data_files_are_told_apart_by_extension_and_load_errors_name_their_cause(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"), count=4, size=(40, 40), bad=False, nested=False)
    images = sorted(glob.glob(os.path.join(folder, "*.png")))
    data = build_training_data(resolution=32, upscale_factor=4, train_data_files=images)  # an imagefolder
    assert len(data.dataset) == len(images)
    with pytest.raises(ValueError, match=r"cannot tell the format of .*notes.txt; pass --dataset_name \(parquet"):
        build_training_data(resolution=32, upscale_factor=4, train_data_files=[str(tmp_path / "notes.txt")])
    # Parquet files whose columns differ: the cause, not `datasets`' generic "An error occurred".
    import datasets

    first = make_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"other": [1, 2]}).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"cannot load dataset 'parquet': (?!An error occurred)"):
        build_training_data(resolution=32, upscale_factor=4, train_data_files=[first, str(tmp_path / "b.parquet")])


def test_original_prepared_folders_use_the_stored_low_resolution(tmp_path, caplog):
    root = make_prepared_layout(str(tmp_path / "ffhq_8_32"))
    assert prepared_resolutions(root) == ([32], [8])
    data = build_training_data(resolution=32, upscale_factor=4, train_data_dir=root, random_flip=False)
    assert len(data.dataset) == 4 and "prepared folder" in data.description
    sample = data.dataset[(0, 2)]
    stored_lr = images_to_tensor(PIL.Image.open(os.path.join(root, "lr_8", "00002.png")))[0]
    torch.testing.assert_close(sample["lr"], stored_lr)
    torch.testing.assert_close(sample["condition"], upsample_condition(stored_lr[None], (32, 32))[0])
    with pytest.raises(ValueError, match="hr sizes \\[32\\].*--resolution 32"):
        build_training_data(resolution=64, upscale_factor=4, train_data_dir=root)
    # A factor without a stored LR folder degrades the HR images on the fly, and says the stored ones go unused.
    with caplog.at_level(logging.WARNING):
        data_x2 = build_training_data(resolution=32, upscale_factor=2, train_data_dir=root, random_flip=False)
    assert data_x2.dataset[(0, 0)]["lr"].shape == (3, 16, 16)
    assert [record.getMessage() for record in caplog.records] == [
        f"{root}: its lr_8 images are not x2 inputs of hr_32; training makes them from the hr images"
    ]
    # Pairs of another factor than the model's (x4 pairs for an x2 model at its own crop size): what they are, and
    # how to prepare pairs of the model's factor.
    with pytest.raises(ValueError, match=r"--resolution 32 \(but its lr_8 images are not x2 inputs .*--sizes 8,16`"):
        build_training_data(resolution=16, upscale_factor=2, train_data_dir=root)
    os.remove(os.path.join(root, "lr_8", "00001.png"))
    with pytest.raises(FileNotFoundError, match="no partner in lr_8"):
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=root)


def test_original_lmdb(tmp_path):
    path = make_lmdb(str(tmp_path / "celeba_8_32"), count=5, missing=(3,))
    assert prepared_resolutions(path) == ([32], [8])
    data = build_training_data(resolution=32, upscale_factor=4, train_data_dir=path, random_flip=False)
    assert len(data.dataset) == 5 and "LMDB" in data.description
    import pickle

    dataset = pickle.loads(pickle.dumps(data.dataset))  # what a dataloader worker receives
    sample = dataset[(0, 3)]  # index 3 is missing: replaced by index 4, counted
    assert sample["skipped"] == 1
    expected = images_to_tensor(random_image(32, 32, 4))[0]
    torch.testing.assert_close(sample["hr"], expected)
    unconditional = build_training_data(resolution=32, upscale_factor=None, train_data_dir=path)
    assert set(unconditional.dataset[(0, 0)]) == {"hr", "skipped"}
    import lmdb

    env = lmdb.open(str(tmp_path / "nolength"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"hr_32_00000", png_bytes(random_image(32, 32, 0)))
    env.close()
    with pytest.raises(ValueError, match="no 'length' key"):
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=str(tmp_path / "nolength"))


@pytest.mark.parametrize("length", [b"-5", b"0", b"1000000000", b"17"])
def test_original_lmdb_length_beyond_its_images_is_refused(tmp_path, length):
    """A 'length' that is not positive or counts more images than the LMDB has entries is refused in one line naming
    the LMDB and the key, before training allocates an epoch's order for it."""
    import lmdb

    path = make_lmdb(str(tmp_path / "celeba_8_32"), count=5)
    with lmdb.open(path, map_size=1 << 26) as env, env.begin(write=True) as txn:
        txn.put(b"length", length)
    count = int(length)
    expected = "not a positive count" if count <= 0 else "more images than its 16 entries can hold"  # 5 x 3 + 1
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: the 'length' key holds {count}, .*{expected}") as info:
        build_training_data(resolution=32, upscale_factor=4, train_data_dir=path)
    assert "\n" not in str(info.value)


def test_original_lmdb_with_its_last_image_missing_still_trains(tmp_path):
    # The original names images by their files' numbers, so a gap may fall anywhere, the last index included.
    path = make_lmdb(str(tmp_path / "celeba_8_32"), count=5, missing=(4,))
    assert len(build_training_data(resolution=32, upscale_factor=4, train_data_dir=path).dataset) == 5


def test_streamed_parquet_skips_corrupt_rows(tmp_path):
    path = make_parquet(str(tmp_path / "train.parquet"), count=4, corrupt=1)
    data = build_training_data(
        resolution=32, upscale_factor=4, dataset_name="parquet", train_data_files=[path], streaming=True
    )
    assert data.sampler is None
    samples = list(data.dataset)
    assert len(samples) == 4
    assert sum(int(sample["skipped"]) for sample in samples) == 1
    assert all(sample["hr"].dtype == torch.float32 and sample["hr"].shape == (3, 32, 32) for sample in samples)
    # The format is inferred from the extension; without streaming it is a map-style source.
    mapped = build_training_data(resolution=32, upscale_factor=4, train_data_files=[path])
    assert len(mapped.dataset) == 5
    with pytest.raises(ValueError, match="no column 'picture'"):
        build_training_data(resolution=32, upscale_factor=4, train_data_files=[path], image_column="picture")


def test_streamed_samples_read_by_several_workers_draw_their_own_crops(tmp_path, monkeypatch):
    """Each worker numbers its share of the stream from 0: keyed by that place alone, the n-th image of every
    worker got the same crop (and flip and degradation)."""
    import datasets
    from torch.utils.data import DataLoader

    # datasets waits 5 s at the end of a stream of several shards, for Arrow's threads (apache/arrow#45214).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)  # from datasets 5

    def gradient(shade):
        y, x = np.mgrid[0:48, 0:48]
        return PIL.Image.fromarray(np.stack([x * 5, y * 5, np.full_like(x, shade * 20)], -1).astype(np.uint8))

    features = datasets.Features({"image": datasets.Image()})
    files = []
    for shard in range(2):  # one shard per worker
        rows = [{"bytes": png_bytes(gradient(shard * 4 + k)), "path": None} for k in range(4)]
        files.append(str(tmp_path / f"shard{shard}.parquet"))
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(files[-1])
    data = build_training_data(
        resolution=16, upscale_factor=4, train_data_files=files, streaming=True, random_crop=True, random_flip=False
    )

    def crops(num_workers):
        hr = [((batch["hr"][0] + 1) * 127.5).round() for batch in DataLoader(data.dataset, num_workers=num_workers)]
        return [(int(h[2, 0, 0]) // 20, int(h[1, 0, 0]) // 5, int(h[0, 0, 0]) // 5) for h in hr]

    alone, shared = crops(0), crops(2)
    assert sorted(image for image, _, _ in shared) == list(range(8))
    offsets = [(top, left) for _, top, left in shared]
    assert len(set(offsets)) == len(offsets), shared
    # Read by one process, a stream draws as before (streamed runs and their resumption are unchanged).
    assert [(top, left) for _, top, left in alone] == offsets


def test_training_reads_16_bit_gray_images_at_16_bits_as_upscaling_does(tmp_path):
    from diffusers_sr3.image_io import open_image

    levels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # 4096 levels, 16 apart
    path = str(tmp_path / "images" / "gray16.png")
    os.makedirs(os.path.dirname(path))
    PIL.Image.fromarray(levels).save(path)
    decoded = decode_image(path, path)
    assert torch.equal(decoded, images_to_tensor(open_image(path, keep_16bit=True))[0])
    assert decoded.unique().numel() > 256
    for cache_images in (False, True):
        data = build_training_data(
            resolution=64, upscale_factor=4, train_data_dir=str(tmp_path / "images"), cache_images=cache_images
        )
        assert data.dataset.sample(0, augment=False)["hr"].unique().numel() > 256, cache_images


def test_a_replaced_image_draws_its_own_crop_not_its_neighbours(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"))
    data = build_training_data(resolution=32, upscale_factor=4, train_data_dir=folder, random_crop=True)
    samples = [data.dataset[(0, index)] for index in range(len(data.dataset))]
    [replaced] = [index for index, sample in enumerate(samples) if sample["skipped"]]
    neighbour = samples[(replaced + 1) % len(samples)]
    assert not torch.equal(samples[replaced]["hr"], neighbour["hr"])


def test_streamed_imagefolder(tmp_path):
    folder = make_image_folder(str(tmp_path / "images"), count=3, bad=False)
    data = build_training_data(resolution=32, upscale_factor=4, train_data_dir=folder, streaming=True)
    samples = list(data.dataset)
    assert len(samples) == 3 and samples[0]["condition"].shape == (3, 32, 32)
    assert len(data.validation_samples(2)) == 2


def test_a_bad_image_of_a_datasets_imagefolder_is_named_by_its_file(tmp_path, caplog):
    """Named `imagefolder[3]` alone, one bad image among thousands could not be found."""
    folder = make_image_folder(str(tmp_path / "images"), count=3, bad=False, nested=False)
    random_image(12, 12, 7).save(tmp_path / "images" / "a_tiny.png")  # too small: a reason that names no file
    for streaming in (False, True):
        data = build_training_data(
            resolution=32, upscale_factor=4, dataset_name="imagefolder", train_data_dir=folder, streaming=streaming
        )
        caplog.clear()
        with caplog.at_level("WARNING"):
            samples = [data.dataset[(0, i)] for i in range(len(data.dataset))] if not streaming else list(data.dataset)
        assert sum(int(sample["skipped"]) for sample in samples) == 1, streaming
        assert re.search(r"skipping imagefolder[^\n]*\[\d\] \([^\n]*tiny\.png\): ", caplog.text), caplog.text


def test_torch_dataset_and_path_list_sources(tmp_path):
    images = [random_image(36, 36, index) for index in range(3)]
    data = build_training_data(resolution=32, upscale_factor=4, train_dataset=images)
    assert len(data.dataset) == 3 and data.dataset[(0, 1)]["hr"].shape == (3, 32, 32)
    as_dicts = build_training_data(resolution=32, upscale_factor=4, train_dataset=[{"image": im} for im in images])
    assert as_dicts.dataset[(0, 0)]["hr"].shape == (3, 32, 32)

    class Images(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from images

    streamed = build_training_data(resolution=32, upscale_factor=4, train_dataset=Images())
    assert streamed.sampler is None and [s["hr"].shape for s in streamed.dataset] == [(3, 32, 32)] * 3
    folder = make_image_folder(str(tmp_path / "images"), count=2, bad=False)
    paths = find_images([folder]) + [str(tmp_path / "missing.png")]
    listed = build_training_data(resolution=32, upscale_factor=4, train_images=paths)
    assert len(listed.dataset) == 2 and dict(listed.skipped_at_scan) == {"missing": 1}
    with pytest.raises(ValueError, match="not divisible by the upscale factor"):
        build_training_data(resolution=30, upscale_factor=4, train_dataset=images)


def test_decode_image_names_the_problem():
    with pytest.raises(ValueError, match="item: cannot decode image"):
        decode_image(b"nope", "item")
    tensor = decode_image(png_bytes(random_image(10, 12, 0)), "ok")
    assert tensor.shape == (3, 10, 12)


def test_hub_dataset_fails_fast_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="offline mode is on"):
        build_training_data(resolution=32, upscale_factor=4, dataset_name="someone/faces")
    # Online mode with an unreachable Hub: a quick connection failure, not minutes of retries. (Timed after the first
    # call, which imports `datasets`: that import alone can take a minute on a busy machine.)
    started = time.time()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub at http://127.0.0.1:9"):
        build_training_data(resolution=32, upscale_factor=4, dataset_name="someone/faces")
    assert time.time() - started < 15


def test_hub_check_goes_through_the_hub_client_and_its_proxy(monkeypatch):
    """Behind a proxy (HTTPS_PROXY / HTTP_PROXY) the Hub is reachable only through it: the check must use it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    from diffusers_sr3.data.sources import check_hub_reachable as _check_hub_reachable

    seen = []

    class Proxy(BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, proxy)
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        # A host that no resolver knows (RFC 2606): only the proxy can reach it.
        monkeypatch.setattr(constants, "ENDPOINT", "http://hub.invalid")
        close_session()  # the client reads the proxy settings when it is made
        _check_hub_reachable("someone/faces")
        assert seen == ["HEAD http://hub.invalid/"]
        # The proxy gone: the client's failure becomes the same clear message.
        server.shutdown()
        server.server_close()
        close_session()
        with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub at http://hub.invalid"):
            _check_hub_reachable("someone/faces")
    finally:
        server.shutdown()
        server.server_close()
        monkeypatch.undo()
        close_session()


def test_the_data_package_is_split_by_job_and_keeps_every_name():
    import importlib

    import diffusers_sr3.data as data

    jobs = {
        "decoding": ["BadImageError", "decode_image", "extract_image", "MAX_CONSECUTIVE_BAD"],
        "pairs": ["PairMaker", "gaussian_blur", "sample_generator"],
        "sources": ["ImageSource", "FileListSource", "PreparedFolderSource", "LmdbSource", "TorchDatasetSource"],
        "caching": ["open_lmdb"],
        "dataset": ["EpochSampler", "PairDataset"],
        "streaming": ["StreamingPairDataset"],
        "building": ["TrainingData", "build_training_data"],
    }
    for module_name, names in jobs.items():
        module = importlib.import_module(f"diffusers_sr3.data.{module_name}")
        for name in names:
            assert getattr(data, name) is getattr(module, name), name
    assert sorted(data.__all__) == sorted(set(data.__all__)) and all(hasattr(data, name) for name in data.__all__)
    # What the lead added stays: spread samples, and a centre crop without a generator for random crops.
    assert hasattr(data.TrainingData, "spread_samples")
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    crop = PairMaker(4, random_crop=True).crop(image, None, "x")
    torch.testing.assert_close(crop, image[:, 2:6, 2:6])


def test_validation_samples_are_distinct_images_when_the_first_are_unreadable(tmp_path):
    # Two truncated files first: their headers pass the scan, their pixels fail when decoded, and each is replaced by
    # the next usable image, which must not then be taken again for the following validation slot.
    data = png_bytes(random_image(64, 64, 99))
    paths = []
    for index in range(2):
        paths.append(str(tmp_path / f"truncated{index}.png"))
        with open(paths[-1], "wb") as handle:
            handle.write(data[: len(data) // 2])
    for index in range(3):
        paths.append(str(tmp_path / f"good{index}.png"))
        random_image(32, 32, index).save(paths[-1])
    training = build_training_data(resolution=32, upscale_factor=4, train_images=paths, random_flip=False)
    samples = training.validation_samples(3)
    expected = [training.dataset.sample(index, augment=False)["hr"] for index in (2, 3, 4)]
    assert len(samples) == 3
    for sample, hr in zip(samples, expected):
        torch.testing.assert_close(sample["hr"], hr)
    # More asked for than there are usable images: each usable one once.
    assert len(training.validation_samples(5)) == 3
    # The samples the residual scale is measured on too: the two truncated files' stand-in is the first good image,
    # which its own index would take again.
    spread = training.spread_samples(5)
    assert len(spread) == 3
    for sample, hr in zip(spread, expected):
        torch.testing.assert_close(sample["hr"], hr)


def test_a_dataset_saved_with_save_to_disk_loads(tmp_path):
    import datasets

    rows = [{"bytes": png_bytes(random_image(32, 32, index)), "path": None} for index in range(3)]
    saved = datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())
    saved.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=saved).save_to_disk(str(tmp_path / "splits"))
    for folder in ("single", "splits"):
        data = build_training_data(resolution=32, upscale_factor=4, dataset_name=str(tmp_path / folder))
        assert len(data.dataset) == 3
        assert data.dataset.sample(0, augment=False)["hr"].shape == (3, 32, 32)
    streamed = build_training_data(
        resolution=32, upscale_factor=4, dataset_name=str(tmp_path / "single"), streaming=True
    )
    assert len(streamed.validation_samples(5)) == 3


def saved_dataset_dict(folder, train=3, validation=2):
    import datasets

    def image_rows(count):
        rows = [{"bytes": png_bytes(random_image(32, 32, index)), "path": None} for index in range(count)]
        return datasets.Dataset.from_dict({"image": rows}).cast_column("image", datasets.Image())

    datasets.DatasetDict(train=image_rows(train), validation=image_rows(validation)).save_to_disk(folder)
    return folder


def test_a_dataset_dict_saved_with_save_to_disk_gives_the_chosen_split(tmp_path, monkeypatch):
    """`load_dataset` before datasets 5 reads a `DatasetDict.save_to_disk` folder as JSON data (its
    `dataset_dict.json`), so there such a folder is read with `load_from_disk`, one split name at a time."""
    import datasets

    from diffusers_sr3.data import sources

    folder = saved_dataset_dict(str(tmp_path / "splits"))

    def older_load_dataset(*args, **kwargs):
        raise AssertionError("load_dataset does not read save_to_disk folders before datasets 5")

    monkeypatch.setattr(sources, "load_dataset_reads_saved_dicts", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", older_load_dataset)
    for split, count in (("train", 3), ("validation", 2)):
        data = build_training_data(resolution=32, upscale_factor=4, dataset_name=folder, dataset_split=split)
        assert len(data.dataset) == count
    streamed = build_training_data(
        resolution=32, upscale_factor=4, dataset_name=folder, dataset_split="validation", streaming=True
    )
    assert len(streamed.validation_samples(5)) == 2
    with pytest.raises(ValueError, match=r"has no split 'test' \(its splits: train, validation\)$"):
        build_training_data(resolution=32, upscale_factor=4, dataset_name=folder, dataset_split="test")
    for spec in ("train[:2]", "train+validation"):
        with pytest.raises(ValueError, match=r"slices and combinations of a save_to_disk folder need datasets>=5"):
            build_training_data(resolution=32, upscale_factor=4, dataset_name=folder, dataset_split=spec)


def test_a_dataset_dict_saved_with_save_to_disk_takes_split_slices_and_combinations(tmp_path):
    """From datasets 5 on, `load_dataset` reads such a folder itself, so slices and "+" combinations keep working."""
    import datasets

    if int(datasets.__version__.split(".")[0]) < 5:
        pytest.skip("load_dataset reads save_to_disk folders from datasets 5 on")
    folder = saved_dataset_dict(str(tmp_path / "splits"))
    for split, count in (("validation", 2), ("train[:2]", 2), ("train+validation", 5), ("train[1:]+validation[:1]", 3)):
        data = build_training_data(resolution=32, upscale_factor=4, dataset_name=folder, dataset_split=split)
        assert len(data.dataset) == count, split
    streamed = build_training_data(
        resolution=32, upscale_factor=4, dataset_name=folder, dataset_split="train+validation", streaming=True
    )
    assert len(streamed.validation_samples(10)) == 5
