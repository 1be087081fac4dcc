"""Map-style image sources: `len()` and `load(index) -> (high_resolution, low_resolution or None)`.

Image files (a list or a folder searched recursively), the original project's prepared layout (folders or LMDB),
torch / `datasets` map-style datasets, and loading a `datasets` dataset (Hub or local builders).
"""

from __future__ import annotations

import abc
import logging
import os
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..image_io import IMAGE_EXTENSIONS, UnreadableImageError, image_size, is_image_file
from ..image_processing import images_to_tensor
from .caching import open_lmdb
from .decoding import BadImageError, decode_image, extract_image, item_name

logger = logging.getLogger(__name__)

# Builders of `datasets` that read local files rather than a Hub repository.
LOCAL_BUILDERS = ("imagefolder", "parquet", "arrow", "webdataset", "json", "csv")


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
        if self.length <= 0:
            raise ValueError(f"{path}: the 'length' key holds {self.length}, not a positive count")
        # A length beyond the images (edited or damaged) would have training draw indices of images that are not
        # there, and a huge one allocate gigabytes for the epoch's order. Gaps are the original's (it names images
        # by their files' numbers) and are skipped, so only a count above the entries is refused.
        entries = open_lmdb(path).stat()["entries"]
        if self.length > entries:
            raise ValueError(
                f"{path}: the 'length' key holds {self.length}, more images than its {entries} entries can hold"
            )

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

    def name(self, index: int) -> str:
        # With the file the item came from, as `load` found it last: reading the item again would copy its bytes.
        loaded = getattr(self, "_loaded_name", None)
        return loaded[1] if loaded is not None and loaded[0] == index else super().name(index)

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        item = self.dataset[index]
        self._loaded_name = (index, item_name(super().name(index), item, self.image_column))
        return decode_image(extract_image(item, self.image_column), self._loaded_name[1]), None


class SubsetSource(ImageSource):
    """The first `count` images of a source (`--max_train_samples`)."""

    def __init__(self, source: ImageSource, count: int):
        self.source, self.count, self.description = source, count, source.description

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return self.source.name(index)

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.source.load(index)


def available_memory() -> Optional[int]:
    """Bytes of memory available now (psutil, which Accelerate brings), or None where it cannot be told."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


class MemoryCachedSource(ImageSource):
    """Another source's images decoded once and kept in memory, 8-bit images as their 8-bit pixels (a quarter of the
    decoded size; each loads back bit for bit as decoding gave it), others as decoded. Training then cuts its samples
    from memory instead of decoding a file for each. Built before the data loader's workers fork, which share it. An
    image that failed to decode fails again, with the same error, each time it is asked for.

    Raises:
        MemoryError: the images decoded so far already take `memory_fraction` of the memory that was available when
            caching began (a clear error early, instead of the machine running out after a long wait).
    """

    def __init__(self, source: ImageSource, memory_fraction: float = 0.8):
        self.source, self.description = source, source.description
        available = available_memory()
        self.images: List[Any] = []
        self.nbytes = 0  # the memory the cached pixels take
        for index in range(len(source)):
            self.images.append(self._cached(index))
            if isinstance(self.images[-1], tuple):
                self.nbytes += sum(self._size(image) for image in self.images[-1] if image is not None)
            if available is not None and self.nbytes > memory_fraction * available:
                raise MemoryError(
                    f"--cache_images: the first {index + 1} of {len(source)} images of {self.description} already "
                    f"take {self.nbytes / 2**30:.2f} GiB, over {memory_fraction:.0%} of the {available / 2**30:.2f} "
                    "GiB available; train without --cache_images, or on fewer or smaller images"
                )

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def load(self, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        cached = self.images[index]
        if isinstance(cached, BadImageError):
            raise cached
        return tuple(None if image is None else self._decoded(image) for image in cached)

    @staticmethod
    def _size(image: Any) -> int:
        return image.nbytes if isinstance(image, np.ndarray) else image.numel() * image.element_size()

    def _cached(self, index: int) -> Any:
        try:
            return tuple(None if image is None else self._pixels(image) for image in self.source.load(index))
        except BadImageError as error:
            return error

    @staticmethod
    def _pixels(image: torch.Tensor) -> Any:
        pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return pixels if torch.equal(MemoryCachedSource._decoded(pixels), image) else image

    @staticmethod
    def _decoded(image: Any) -> torch.Tensor:
        return images_to_tensor(image)[0] if isinstance(image, np.ndarray) else image.clone()


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
    if not high and (low or any(re.fullmatch(r"sr_\d+_\d+_.*", key) for key in keys)):
        # Read as a plain image folder, its bicubic sr_ images would become the high-resolution targets.
        raise ValueError(
            f"{folder} holds the original's prepared layout (lr_ / sr_ images) without its hr_<size> images, the "
            "high-resolution targets; prepare it again with `sr3 prepare`"
        )
    return (high, low) if high else None


def prepared_source(folder: str, resolution: int, upscale_factor: Optional[int]) -> ImageSource:
    sizes = prepared_resolutions(folder)
    if sizes is None:
        raise ValueError(
            f"{folder} is not a prepared folder (no hr_<size> images, or no such folder); run `sr3 prepare` on your "
            "images first, or train on them as a plain image folder"
        )
    high_sizes, low_sizes = sizes
    # Pairs of another factor (an x8 dataset for an x4 model) are never trained on: the HR images are degraded by the
    # model's own factor instead, which is said, since the stored LR images the user prepared then go unused.
    other_factor = (
        f"but its lr_{'/'.join(map(str, low_sizes))} images are not x{upscale_factor} inputs of them: training "
        f"would make its own from the hr images; to train on stored x{upscale_factor} pairs, prepare them with "
        f"`sr3 prepare PHOTOS --out FOLDER --sizes {resolution // upscale_factor},{resolution}`"
        if upscale_factor is not None
        and low_sizes
        and not any(high // upscale_factor in low_sizes for high in high_sizes if high % upscale_factor == 0)
        else None
    )
    if resolution not in high_sizes:
        raise ValueError(
            f"{folder} holds the original prepared layout with hr sizes {high_sizes}, not the training "
            f"resolution {resolution}; pass --resolution {high_sizes[0]}"
            + (f" ({other_factor})" if other_factor else "")
        )
    low = None
    if upscale_factor is not None and resolution // upscale_factor in low_sizes:
        low = resolution // upscale_factor
    elif upscale_factor is not None and low_sizes:
        logger.warning(
            "%s: its lr_%s images are not x%d inputs of hr_%d; training makes them from the hr images",
            folder,
            "/".join(map(str, low_sizes)),
            upscale_factor,
            resolution,
        )
    is_lmdb = os.path.isfile(os.path.join(folder, "data.mdb"))
    return (LmdbSource if is_lmdb else PreparedFolderSource)(folder, resolution, low)


def check_hub_reachable(dataset_name: str) -> None:
    """Fail fast, with a clear message, when a Hub dataset cannot be reached (instead of hanging on retries).

    The probe goes through huggingface_hub's own HTTP client (the one `datasets` downloads with), so it honours the
    same settings: HF_ENDPOINT, HTTPS_PROXY / HTTP_PROXY / NO_PROXY, and the client factory a user may install. Any
    HTTP answer means the Hub is reachable; only a transport failure (DNS, refused, proxy, timeout) stops training.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ConnectionError(
            f"--dataset_name {dataset_name!r} needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE); train from local data with --train_data_dir or --train_data_files instead"
        )
    try:
        get_session().head(constants.ENDPOINT, timeout=5, follow_redirects=False)
    except Exception as error:  # the client's transport errors have no common public base class across versions
        reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise ConnectionError(
            f"--dataset_name {dataset_name!r}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}); "
            "check the network (and HTTPS_PROXY) or train from local data with --train_data_dir or --train_data_files"
        ) from None


def load_dataset_reads_saved_dicts() -> bool:
    """Whether the installed `datasets.load_dataset` reads a `DatasetDict.save_to_disk` folder (datasets>=5)."""
    import datasets
    from packaging.version import Version

    return Version(datasets.__version__).major >= 5


def load_datasets_source(
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
            builders = {"parquet": "parquet", "arrow": "arrow", "tar": "webdataset", "json": "json", "jsonl": "json"}
            builders.update({suffix.lstrip("."): "imagefolder" for suffix in IMAGE_EXTENSIONS})
            dataset_name = builders.get(extension)
            if dataset_name is None:
                raise ValueError(
                    f"cannot tell the format of {data_files[0]}; pass --dataset_name (parquet, arrow, json, "
                    "imagefolder, webdataset)"
                )
        else:
            dataset_name = "imagefolder"
    local = dataset_name in LOCAL_BUILDERS or os.path.isdir(dataset_name)
    if not local:
        check_hub_reachable(dataset_name)
    kwargs: Dict[str, Any] = dict(split=split, streaming=streaming, cache_dir=cache_dir)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    if data_files:
        kwargs["data_files"] = list(data_files)
    # A folder that `Dataset.save_to_disk` wrote (its `state.json`), which `load_dataset` refuses to read, or one that
    # `DatasetDict.save_to_disk` wrote (its `dataset_dict.json`), which `load_dataset` before datasets 5 reads as JSON;
    # from datasets 5 on, `load_dataset` reads the latter itself, split slices and combinations included.
    saved_dataset = os.path.isfile(os.path.join(dataset_name, "state.json"))
    saved_dict = os.path.isfile(os.path.join(dataset_name, "dataset_dict.json"))
    if saved_dataset or (saved_dict and not load_dataset_reads_saved_dicts()):
        try:
            loaded = datasets.load_from_disk(dataset_name)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ValueError(f"cannot load dataset {dataset_name!r}: {error}") from None
        if isinstance(loaded, datasets.DatasetDict):  # the split is picked as from a Hub dataset
            if split not in loaded and any(mark in split for mark in "[+"):
                raise ValueError(
                    f"--dataset_split {split!r}: split slices and combinations of a save_to_disk folder need "
                    f"datasets>=5 (installed: {datasets.__version__}); pass one split name ({', '.join(loaded)})"
                )
            if split not in loaded:
                raise ValueError(f"dataset {dataset_name!r} has no split {split!r} (its splits: {', '.join(loaded)})")
            loaded = loaded[split]
        return (loaded.to_iterable_dataset() if streaming else loaded), dataset_name
    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise ValueError(f"cannot load dataset {dataset_name!r}: {error}") from None
    except datasets.exceptions.DatasetGenerationError as error:  # its message is generic: the cause says what
        raise ValueError(f"cannot load dataset {dataset_name!r}: {error.__cause__ or error}") from None
    return loaded, dataset_name
