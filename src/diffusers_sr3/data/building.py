"""Choosing the data source from the training options, and what the training loop gets back."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from torch.utils.data import IterableDataset

from ..image_io import find_images
from .dataset import EpochSampler, PairDataset
from .pairs import PairMaker
from .sources import (
    FileListSource,
    ImageSource,
    MemoryCachedSource,
    SubsetSource,
    TorchDatasetSource,
    load_datasets_source,
    prepared_resolutions,
    prepared_source,
)
from .streaming import StreamingPairDataset

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """What the training loop needs: the dataset, its sampler (None for streams) and the skip counts so far."""

    dataset: Union[PairDataset, StreamingPairDataset]
    sampler: Optional[EpochSampler]
    description: str
    skipped_at_scan: Counter = field(default_factory=Counter)

    def spread_samples(self, count: int) -> List[Dict[str, Any]]:
        """Up to `count` usable samples evenly spread over the dataset (the first ones when streamed), unaugmented,
        each image once."""
        if isinstance(self.dataset, StreamingPairDataset):
            return self.validation_samples(count)
        size = len(self.dataset)
        indices = sorted({int(index) for index in np.linspace(0, size - 1, min(count, size)).round()})
        samples, taken = [], set()
        for index in indices:
            sample = self.dataset.sample(index, augment=False)
            # An unreadable image is replaced by the next usable one, which a later index may also land on.
            position = (index + sample["skipped"]) % size
            if position not in taken:
                taken.add(position)
                samples.append(sample)
        return samples

    def validation_samples(self, count: int) -> List[Dict[str, Any]]:
        """The first `count` usable samples, distinct images without augmentation (the fixed validation set)."""
        if isinstance(self.dataset, StreamingPairDataset):
            samples = []
            for sample in self.dataset.samples(augment=False):
                samples.append(sample)
                if len(samples) == count:
                    break
            return samples
        samples: List[Dict[str, Any]] = []
        index = 0
        while len(samples) < count and index < len(self.dataset):
            sample = self.dataset.sample(index, augment=False)
            # An unreadable image is replaced by the next usable one: go on after that one, never take it twice.
            position = index + sample["skipped"]
            if position >= len(self.dataset):  # wrapped around to images already taken
                break
            samples.append(sample)
            index = position + 1
        return samples


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
    random_rotate: bool = False,
    film_grain_max: float = 0.0,
    film_grain_probability: float = 0.5,
    repeats: int = 1,
    cache_images: bool = False,
) -> TrainingData:
    """Pick the data source from the options and wrap it for training (see the module docstring).

    Exactly one of `train_images`, `train_dataset`, `dataset_name` / `train_data_files`, or `train_data_dir` is
    used, in that order of precedence (`train_data_dir` is the `data_dir` of `dataset_name` when both are given).
    `repeats` passes over map-style data make one epoch ([`EpochSampler`]); `cache_images` decodes its images once,
    into memory ([`MemoryCachedSource`]). A stream has neither passes to repeat nor an end to cache up to.
    """
    pair_maker = PairMaker(
        resolution,
        upscale_factor,
        random_flip,
        random_crop,
        lr_blur_sigma,
        random_rotate,
        film_grain_max,
        film_grain_probability,
    )
    if upscale_factor is not None and resolution % upscale_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the upscale factor {upscale_factor}")

    def streamed(stream: StreamingPairDataset, description: str) -> TrainingData:
        if repeats != 1:
            raise ValueError(f"--dataset_repeats {repeats}: {description} has no passes to repeat")
        if cache_images:
            raise ValueError(f"--cache_images: {description} has no end to cache up to")
        return TrainingData(stream, None, description)

    scan: Counter = Counter()
    source: Optional[ImageSource] = None
    if train_images is not None:
        source = FileListSource(train_images, "train_images")
    elif train_dataset is not None:
        if isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
            stream = StreamingPairDataset(train_dataset, image_column, pair_maker, seed, description="train_dataset")
            return streamed(stream, "train_dataset (iterable)")
        source = TorchDatasetSource(train_dataset, image_column, "train_dataset")
    elif dataset_name is not None or train_data_files or (streaming and train_data_dir is not None):
        loaded, name = load_datasets_source(
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
            return streamed(stream, f"{name} (streamed)")
        source = TorchDatasetSource(loaded, image_column, name)
    elif train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder")
        if prepared_resolutions(train_data_dir) is not None:
            source = prepared_source(train_data_dir, resolution, upscale_factor)
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
        source = SubsetSource(source, max_train_samples)
    if not len(source):
        raise ValueError(f"{source.description} is empty")
    if cache_images:
        started = time.perf_counter()
        source = MemoryCachedSource(source)
        logger.info(
            "decoded %d images of %s into memory (%.0f MB) in %.1f s",
            len(source),
            source.description,
            source.nbytes / 2**20,
            time.perf_counter() - started,
        )
    return TrainingData(
        PairDataset(source, pair_maker, seed),
        EpochSampler(len(source), seed, repeats=repeats),
        source.description,
        scan,
    )
