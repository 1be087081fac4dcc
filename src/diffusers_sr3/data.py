"""Training data for SR3: image sources, on-the-fly training pairs, and bad-image skipping.

Sources (all yield high-resolution images, some with a stored low-resolution partner):

- a list of image files, or a local folder searched recursively (`--train_data_dir`);
- the original project's prepared layout: `hr_<N>/`, `lr_<M>/` (and `sr_<M>_<N>/`) folders of equally named
  images, or its LMDB (keys `length`, `hr_<N>_<idx:05d>`, `lr_<M>_<idx:05d>`, `sr_<M>_<N>_<idx:05d>`);
- a `datasets` dataset: a Hub dataset by name, or local `imagefolder` / `parquet` files, streamed or not;
- a torch `Dataset` of high-resolution images (PIL images, arrays or tensors, or dicts holding one).

Pairs are made from the high-resolution image with `image_processing.degrade`, the same degradation used at
inference and evaluation. A stored low-resolution image is used as is (bicubic-upsampled as the condition).
Unreadable, truncated or too-small images are skipped and counted; nothing usable left is a clear error.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from .image_io import UnreadableImageError, find_images, image_size, is_image_file, open_image
from .image_processing import degrade, images_to_tensor, resize_bicubic, upsample_condition

logger = logging.getLogger(__name__)

# Builders of `datasets` that read local files rather than a Hub repository.
LOCAL_BUILDERS = ("imagefolder", "parquet", "arrow", "webdataset", "json", "csv")
# How many consecutive bad images a sample may skip before the run stops with an error.
MAX_CONSECUTIVE_BAD = 64


class BadImageError(ValueError):
    """One image cannot be used (unreadable, truncated, too small); `reason` is a short category."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: Union[bytes, str, PIL.Image.Image, np.ndarray, torch.Tensor], name: str) -> torch.Tensor:
    """Decode an image (encoded bytes, a file path, a PIL image, an array or a tensor) to `(3, H, W)` in [-1, 1]."""
    if isinstance(data, (bytes, bytearray, str, os.PathLike, PIL.Image.Image)):
        try:
            data = open_image(data, name)
        except FileNotFoundError:
            raise BadImageError(f"{name}: file not found", "missing") from None
        except UnreadableImageError as error:
            raise BadImageError(f"{name}: cannot decode image ({error.detail})", "unreadable") from None
    try:
        return images_to_tensor(data, what=name)[0]
    except (TypeError, ValueError) as error:
        raise BadImageError(f"{name}: {error}", "unreadable") from None


@dataclass
class PairMaker:
    """Turns one high-resolution image (and an optional stored low-resolution one) into a training sample.

    Args:
        resolution: the training (high-resolution) size; images are cropped square to it.
        upscale_factor: super-resolution factor, or None for unconditional training.
        random_flip: flip horizontally with probability 1/2.
        random_crop: take a random `resolution` crop at full scale; otherwise resize the shorter side to
            `resolution` and take the centre crop.
        lr_blur_sigma: if > 0, blur the low-resolution image with a Gaussian of sigma uniform in
            [0, lr_blur_sigma] (the SR3 paper's cascade augmentation).
    """

    resolution: int
    upscale_factor: Optional[int] = None
    random_flip: bool = True
    random_crop: bool = False
    lr_blur_sigma: float = 0.0

    def crop(self, image: torch.Tensor, generator: Optional[torch.Generator], name: str) -> torch.Tensor:
        """Square crop of `image` `(3, H, W)` to `resolution` (random, or centre without a generator, at full scale;
        or resized-centre); too small is bad."""
        height, width = image.shape[-2:]
        size = self.resolution
        if min(height, width) < size:
            raise BadImageError(f"{name}: {height}x{width} is smaller than the training resolution {size}", "small")
        if self.random_crop:
            if generator is None:  # no augmentation: the centre crop, at full scale like the random ones
                top, left = (height - size) // 2, (width - size) // 2
            else:
                top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
            return image[:, top : top + size, left : left + size]
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
        image = resize_bicubic(image[None], new_size)[0]
        top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        return image[:, top : top + size, left : left + size]

    def __call__(
        self,
        high_resolution: torch.Tensor,
        low_resolution: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        augment: bool = True,
        name: str = "image",
    ) -> Dict[str, torch.Tensor]:
        """Make `{"hr": (3, R, R)}` (plus `"condition"` for super-resolution), all float32 in [-1, 1].

        A stored `low_resolution` image must be exactly `resolution / upscale_factor` square and its partner
        exactly `resolution`: stored pairs are never cropped, so they stay aligned.
        """
        size = self.resolution
        if low_resolution is not None:
            expected = size // self.upscale_factor
            if tuple(high_resolution.shape[-2:]) != (size, size) or tuple(low_resolution.shape[-2:]) != (
                expected,
                expected,
            ):
                raise BadImageError(
                    f"{name}: stored pair is {tuple(high_resolution.shape[-2:])} / {tuple(low_resolution.shape[-2:])}"
                    f", expected ({size}, {size}) / ({expected}, {expected})",
                    "size mismatch",
                )
        else:
            high_resolution = self.crop(high_resolution, generator if augment else None, name)
        if augment and self.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            high_resolution = high_resolution.flip(-1)
            low_resolution = None if low_resolution is None else low_resolution.flip(-1)
        sample = {"hr": high_resolution.float().contiguous()}
        if self.upscale_factor is None:
            return sample
        if low_resolution is None:
            low_resolution = degrade(high_resolution[None], self.upscale_factor)[0][0]
        if augment and self.lr_blur_sigma > 0:
            sigma = float(torch.rand((), generator=generator)) * self.lr_blur_sigma
            low_resolution = gaussian_blur(low_resolution, sigma)
        sample["lr"] = low_resolution.float().contiguous()
        sample["condition"] = upsample_condition(low_resolution[None], (size, size))[0].float().contiguous()
        return sample


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `(3, H, W)` with reflect padding; sigma below 0.05 px is a no-op."""
    if sigma < 0.05:
        return image
    from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

    radius = max(1, math.ceil(3 * sigma))
    kernel = min(2 * radius + 1, 2 * ((min(image.shape[-2:]) - 1) // 2) + 1)
    return tv_gaussian_blur(image[None], [kernel, kernel], [sigma, sigma])[0]


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The random source of one sample's augmentation: a function of (seed, epoch, position) only, so a
    resumed run, any number of dataloader workers and any process count give every sample the same draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + position)


# ---------------------------------------------------------------------------------------------------------------
# Map-style sources: `len()` and `load(index) -> (high_resolution, low_resolution or None)`.


class ImageSource(abc.ABC):
    """A map-style collection of training images (see the module docstring for the kinds)."""

    description = "images"

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of images."""

    @abc.abstractmethod
    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The high-resolution image and the stored low-resolution one (or None), `(3, H, W)` in [-1, 1]."""

    def name(self, index: int) -> str:
        return f"{self.description}[{index}]"


class FileListSource(ImageSource):
    """Image files. `scan()` drops unreadable and too-small files by their headers and counts them."""

    def __init__(self, paths: Sequence[str], description: str = "image files"):
        self.paths = [os.fspath(path) for path in paths]
        self.description = description

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return decode_image(self.paths[index], self.paths[index]), None

    def scan(self, min_size: int) -> Counter:
        """Keep only files whose header is readable and whose shorter side is at least `min_size`."""
        bad: Counter = Counter()
        kept = []
        for path in self.paths:
            try:
                width, height = image_size(path)
            except FileNotFoundError:
                bad["missing"] += 1
                logger.warning("skipping %s: file not found", path)
                continue
            except UnreadableImageError as error:
                bad["unreadable"] += 1
                logger.warning("skipping %s: cannot read image (%s)", path, error.detail)
                continue
            if min(width, height) < min_size:
                bad["small"] += 1
                logger.warning("skipping %s: %dx%d is smaller than %d", path, width, height, min_size)
                continue
            kept.append(path)
        self.paths = kept
        return bad


class PreparedFolderSource(ImageSource):
    """The original's prepared folders: `hr_<N>/NAME` with `lr_<M>/NAME` partners (when `M` is given)."""

    def __init__(self, root: str, high: int, low: Optional[int]):
        self.root, self.high, self.low = root, high, low
        hr_dir = os.path.join(root, f"hr_{high}")
        self.names = sorted(name for name in os.listdir(hr_dir) if is_image_file(name))
        self.description = f"prepared folder {root}"
        if low is not None:
            lr_dir = os.path.join(root, f"lr_{low}")
            missing = [name for name in self.names if not os.path.exists(os.path.join(lr_dir, name))]
            if missing:
                raise FileNotFoundError(
                    f"{root}: {len(missing)} images of hr_{high}/ have no partner in lr_{low}/ (e.g. {missing[0]})"
                )

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return os.path.join(self.root, f"hr_{self.high}", self.names[index])

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        name = self.names[index]
        high = decode_image(os.path.join(self.root, f"hr_{self.high}", name), self.name(index))
        if self.low is None:
            return high, None
        path = os.path.join(self.root, f"lr_{self.low}", name)
        return high, decode_image(path, path)


_LMDB_ENVIRONMENTS: Dict[Tuple[int, str], Any] = {}


def open_lmdb(path: str) -> Any:
    """A read-only LMDB environment for `path`, opened once per process (LMDB forbids opening one twice, and an
    environment must not cross a fork: dataloader workers open their own)."""
    import lmdb

    key = (os.getpid(), os.path.realpath(path))
    if key not in _LMDB_ENVIRONMENTS:
        for inherited in [other for other in _LMDB_ENVIRONMENTS if other[1] == key[1]]:
            # Opened by the parent before a fork: close this process's copy (the parent's stays open), since
            # LMDB refuses to open a path that this process already has open.
            _LMDB_ENVIRONMENTS.pop(inherited).close()
        _LMDB_ENVIRONMENTS[key] = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    return _LMDB_ENVIRONMENTS[key]


class LmdbSource(ImageSource):
    """The original's LMDB: `length` -> count, `hr_<N>_<idx:05d>` / `lr_<M>_<idx:05d>` -> encoded images."""

    def __init__(self, path: str, high: int, low: Optional[int]):
        self.path, self.high, self.low = path, high, low
        self.description = f"LMDB {path}"
        with open_lmdb(path).begin(write=False) as txn:
            length = txn.get(b"length")
        if length is None:
            raise ValueError(f"{path} is not an SR3 LMDB: it has no 'length' key")
        try:
            self.length = int(length.decode("utf-8"))
        except ValueError:
            raise ValueError(f"{path}: the 'length' key holds {length[:20]!r}, not a count") from None

    def __len__(self) -> int:
        return self.length

    def name(self, index: int) -> str:
        return f"{self.path}:hr_{self.high}_{index:05d}"

    def _get(self, key: str) -> bytes:
        with open_lmdb(self.path).begin(write=False) as txn:
            value = txn.get(key.encode("utf-8"))
        if value is None:
            raise BadImageError(f"{self.path}: key {key!r} is missing", "missing")
        return value

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        high = decode_image(self._get(f"hr_{self.high}_{index:05d}"), self.name(index))
        if self.low is None:
            return high, None
        key = f"lr_{self.low}_{index:05d}"
        return high, decode_image(self._get(key), f"{self.path}:{key}")


class TorchDatasetSource(ImageSource):
    """A torch/`datasets` map-style dataset whose items are images, or dicts holding one under `image_column`."""

    def __init__(self, dataset: Any, image_column: str = "image", description: str = "dataset"):
        self.dataset, self.image_column, self.description = dataset, image_column, description

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return decode_image(extract_image(self.dataset[index], self.image_column), self.name(index)), None


def extract_image(item: Any, image_column: str) -> Any:
    """The image of a dataset item: the item itself, or `item[image_column]` (a `datasets` `Image` value)."""
    if isinstance(item, dict):
        if image_column not in item:
            raise ValueError(f"dataset items have no column {image_column!r} (columns: {sorted(item)}); --image_column")
        item = item[image_column]
        if isinstance(item, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
    return item


# ---------------------------------------------------------------------------------------------------------------
# Torch datasets for the training loop.


class EpochSampler(Sampler):
    """A shuffled order fixed by (seed, epoch), yielding `(epoch, index)` keys so samples know their epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        return iter([(self.epoch, int(index)) for index in order])


class PairDataset(Dataset):
    """Map-style training samples: a source's images through a [`PairMaker`], bad images skipped.

    An unusable image is replaced by the next usable one (in index order), so batches keep their size and every
    process keeps the same step count; each sample reports in `"skipped"` how many it stepped over.
    """

    def __init__(self, source: ImageSource, pair_maker: PairMaker, seed: int = 0):
        self.source, self.pair_maker, self.seed = source, pair_maker, seed

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, index: int, epoch: int = 0, augment: bool = True) -> Dict[str, Any]:
        skipped = 0
        for attempt in range(MAX_CONSECUTIVE_BAD):
            position = (index + attempt) % len(self.source)
            try:
                high, low = self.source.load(position)
                generator = sample_generator(self.seed, epoch, position)
                sample = self.pair_maker(high, low, generator, augment, self.source.name(position))
            except BadImageError as error:
                logger.warning("skipping %s", error)
                skipped += 1
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_BAD} images in a row of {self.source.description} are unusable (from index {index}); "
            "check the data"
        )

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.sample(index, epoch)


class StreamingPairDataset(IterableDataset):
    """Training samples from a streamed `datasets.IterableDataset` (shuffled with a buffer, decoded here)."""

    def __init__(
        self,
        stream: Any,
        image_column: str,
        pair_maker: PairMaker,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        description: str = "stream",
    ):
        self.stream, self.image_column, self.pair_maker = stream, image_column, pair_maker
        self.seed, self.shuffle_buffer, self.description, self.epoch = seed, shuffle_buffer, description, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def items(self, shuffle: bool) -> Iterator[Tuple[int, Any]]:
        stream = self.stream
        if shuffle and hasattr(stream, "shuffle"):  # a `datasets` stream; plain torch iterables keep their order
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(self.epoch)
        for position, item in enumerate(stream):
            yield position, extract_image(item, self.image_column)

    def samples(self, augment: bool) -> Iterator[Dict[str, Any]]:
        skipped = 0
        for position, image in self.items(shuffle=augment):
            name = f"{self.description}[{position}]"
            try:
                sample = self.pair_maker(
                    decode_image(image, name), None, sample_generator(self.seed, self.epoch, position), augment, name
                )
            except BadImageError as error:
                logger.warning("skipping %s", error)
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_BAD:
                    raise RuntimeError(f"{skipped} images in a row of {self.description} are unusable") from None
                continue
            sample["skipped"] = skipped
            skipped = 0
            yield sample

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self.samples(augment=True)


# ---------------------------------------------------------------------------------------------------------------
# Choosing the source from the options.


@dataclass
class TrainingData:
    """What the training loop needs: the dataset, its sampler (None for streams) and the skip counts so far."""

    dataset: Union[PairDataset, StreamingPairDataset]
    sampler: Optional[EpochSampler]
    description: str
    skipped_at_scan: Counter = field(default_factory=Counter)

    def spread_samples(self, count: int) -> List[Dict[str, Any]]:
        """`count` usable samples evenly spread over the dataset (the first ones when streamed), unaugmented."""
        if isinstance(self.dataset, StreamingPairDataset):
            return self.validation_samples(count)
        size = len(self.dataset)
        indices = sorted({int(index) for index in np.linspace(0, size - 1, min(count, size)).round()})
        return [self.dataset.sample(index, augment=False) for index in indices]

    def validation_samples(self, count: int) -> List[Dict[str, Any]]:
        """The first `count` usable samples, without augmentation (the fixed validation set)."""
        if isinstance(self.dataset, StreamingPairDataset):
            samples = []
            for sample in self.dataset.samples(augment=False):
                samples.append(sample)
                if len(samples) == count:
                    break
            return samples
        return [self.dataset.sample(index, augment=False) for index in range(min(count, len(self.dataset)))]


def prepared_resolutions(folder: str) -> Optional[Tuple[List[int], List[int]]]:
    """`(hr sizes, lr sizes)` of the original's prepared layout in `folder` (folders or LMDB), else None."""
    if os.path.isfile(os.path.join(folder, "data.mdb")):
        with open_lmdb(folder).begin(write=False) as txn:
            keys = [key.decode("utf-8", "replace") for key in txn.cursor().iternext(keys=True, values=False)]
    elif os.path.isdir(folder):
        keys = [name + "_" for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))]
    else:
        return None
    high = sorted({int(m.group(1)) for key in keys if (m := re.fullmatch(r"hr_(\d+)_.*", key))})
    low = sorted({int(m.group(1)) for key in keys if (m := re.fullmatch(r"lr_(\d+)_.*", key))})
    return (high, low) if high else None


def _prepared_source(folder: str, resolution: int, upscale_factor: Optional[int]) -> ImageSource:
    high_sizes, low_sizes = prepared_resolutions(folder)
    if resolution not in high_sizes:
        raise ValueError(
            f"{folder} holds the original prepared layout with hr sizes {high_sizes}, not the training "
            f"resolution {resolution}; pass --resolution {high_sizes[0]}"
        )
    low = None
    if upscale_factor is not None and resolution // upscale_factor in low_sizes:
        low = resolution // upscale_factor
    is_lmdb = os.path.isfile(os.path.join(folder, "data.mdb"))
    return (LmdbSource if is_lmdb else PreparedFolderSource)(folder, resolution, low)


def _check_hub_reachable(dataset_name: str) -> None:
    """Fail fast, with a clear message, when a Hub dataset cannot be reached (instead of hanging on retries)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ConnectionError(
            f"--dataset_name {dataset_name!r} needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE); train from local data with --train_data_dir or --train_data_files instead"
        )
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as error:
        raise ConnectionError(
            f"--dataset_name {dataset_name!r}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({error}); "
            "check the network or train from local data with --train_data_dir or --train_data_files"
        ) from None


def _load_datasets_source(
    dataset_name: Optional[str],
    dataset_config_name: Optional[str],
    data_dir: Optional[str],
    data_files: Optional[List[str]],
    split: str,
    streaming: bool,
    cache_dir: Optional[str],
) -> Tuple[Any, str]:
    import datasets

    if dataset_name is None:
        if data_files:
            extension = os.path.splitext(data_files[0])[1].lstrip(".").lower()
            dataset_name = {"parquet": "parquet", "arrow": "arrow", "tar": "webdataset"}.get(extension)
            if dataset_name is None:
                raise ValueError(f"cannot tell the format of {data_files[0]}; pass --dataset_name parquet (or arrow)")
        else:
            dataset_name = "imagefolder"
    local = dataset_name in LOCAL_BUILDERS or os.path.isdir(dataset_name)
    if not local:
        _check_hub_reachable(dataset_name)
    kwargs: Dict[str, Any] = dict(split=split, streaming=streaming, cache_dir=cache_dir)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    if data_files:
        kwargs["data_files"] = list(data_files)
    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise ValueError(f"cannot load dataset {dataset_name!r}: {error}") from None
    return loaded, dataset_name


def build_training_data(
    *,
    resolution: int,
    upscale_factor: Optional[int],
    train_data_dir: Optional[str] = None,
    train_images: Optional[Sequence[str]] = None,
    train_dataset: Optional[Any] = None,
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_files: Optional[Sequence[str]] = None,
    dataset_split: str = "train",
    image_column: str = "image",
    streaming: bool = False,
    cache_dir: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    random_flip: bool = True,
    random_crop: bool = False,
    lr_blur_sigma: float = 0.0,
    seed: int = 0,
) -> TrainingData:
    """Pick the data source from the options and wrap it for training (see the module docstring).

    Exactly one of `train_images`, `train_dataset`, `dataset_name` / `train_data_files`, or `train_data_dir` is
    used, in that order of precedence (`train_data_dir` is the `data_dir` of `dataset_name` when both are given).
    """
    pair_maker = PairMaker(resolution, upscale_factor, random_flip, random_crop, lr_blur_sigma)
    if upscale_factor is not None and resolution % upscale_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the upscale factor {upscale_factor}")
    scan: Counter = Counter()
    source: Optional[ImageSource] = None
    if train_images is not None:
        source = FileListSource(train_images, "train_images")
    elif train_dataset is not None:
        if isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
            stream = StreamingPairDataset(train_dataset, image_column, pair_maker, seed, description="train_dataset")
            return TrainingData(stream, None, "train_dataset (iterable)")
        source = TorchDatasetSource(train_dataset, image_column, "train_dataset")
    elif dataset_name is not None or train_data_files or (streaming and train_data_dir is not None):
        loaded, name = _load_datasets_source(
            dataset_name, dataset_config_name, train_data_dir, train_data_files, dataset_split, streaming, cache_dir
        )
        import datasets

        columns = loaded.column_names or []
        if columns and image_column not in columns:
            raise ValueError(f"dataset {name!r} has no column {image_column!r} (columns: {columns}); --image_column")
        if isinstance(loaded.features, datasets.Features) and isinstance(
            loaded.features.get(image_column), datasets.Image
        ):
            # Decode ourselves, so a corrupt image is skipped and counted instead of raising inside `datasets`.
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        if streaming:
            if max_train_samples is not None:
                loaded = loaded.take(max_train_samples)
            stream = StreamingPairDataset(loaded, image_column, pair_maker, seed, description=f"{name} (streamed)")
            return TrainingData(stream, None, f"{name} (streamed)")
        source = TorchDatasetSource(loaded, image_column, name)
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder")
        if prepared_resolutions(train_data_dir) is not None:
            source = _prepared_source(train_data_dir, resolution, upscale_factor)
        else:
            source = FileListSource(find_images([train_data_dir]), train_data_dir)
    else:
        raise ValueError(
            "no training data: give --train_data_dir, --dataset_name, --train_data_files, "
            "or (from Python) train_images / train_dataset"
        )

    if isinstance(source, FileListSource):
        # Random crops need full-size images; resized crops may also come from larger ones only (never upscaled).
        scan = source.scan(min_size=resolution)
        if not len(source):
            listed = ", ".join(f"{count} {reason}" for reason, count in sorted(scan.items()))
            raise ValueError(f"no usable training images in {source.description} ({listed or 'none found'})")
    if max_train_samples is not None and max_train_samples < len(source):
        source = _Subset(source, max_train_samples)
    if not len(source):
        raise ValueError(f"{source.description} is empty")
    return TrainingData(
        PairDataset(source, pair_maker, seed), EpochSampler(len(source), seed), source.description, scan
    )


class _Subset(ImageSource):
    """The first `count` images of a source (`--max_train_samples`)."""

    def __init__(self, source: ImageSource, count: int):
        self.source, self.count, self.description = source, count, source.description

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return self.source.name(index)

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.source.load(index)
