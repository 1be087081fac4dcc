"""The map-style training dataset (bad images skipped) and its epoch-keyed shuffling sampler."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, Tuple, Union

import torch
from torch.utils.data import Dataset, Sampler

from .decoding import MAX_CONSECUTIVE_BAD, BadImageError
from .pairs import PairMaker, sample_generator
from .sources import ImageSource

logger = logging.getLogger(__name__)


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
