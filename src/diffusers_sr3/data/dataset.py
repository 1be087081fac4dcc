"""The map-style training dataset (bad images skipped) and its epoch-keyed shuffling sampler."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, Tuple, Union

import torch
from torch.utils.data import Dataset, Sampler

from .decoding import MAX_CONSECUTIVE_BAD, BadImageError, UnusableDataError
from .pairs import PairMaker, sample_generator
from .sources import ImageSource

logger = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """A shuffled order fixed by (seed, epoch), yielding `(epoch, index)` keys so samples know their epoch.

    With `repeats` above 1, one epoch of the loader is that many passes over the data, each shuffled and keyed (so
    augmented) as an epoch of its own: pass `p` of epoch `e` is data epoch `e * repeats + p`. A small dataset at a
    large batch then makes epochs long enough that data loader workers rarely stand idle at an epoch's end.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.size, self.seed, self.shuffle, self.repeats, self.epoch = size, seed, shuffle, repeats, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size * self.repeats

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        first = self.epoch * self.repeats  # read now: the keys are made as the loader asks for them
        return (key for data_epoch in range(first, first + self.repeats) for key in self._pass(data_epoch))

    def _pass(self, data_epoch: int) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + data_epoch))
        else:
            order = torch.arange(self.size)
        return ((data_epoch, index) for index in order.tolist())


class PairDataset(Dataset):
    """Map-style training samples: a source's images through a [`PairMaker`], bad images skipped.

    An unusable image is replaced by the next usable one (in index order), so batches keep their size and every
    process keeps the same step count; each sample reports in `"skipped"` how many it stepped over. The draws are
    keyed by the index asked for, so a replacement is cut and flipped otherwise than its neighbour's own sample.
    """

    def __init__(self, source: ImageSource, pair_maker: PairMaker, seed: int = 0):
        if len(source) == 0:
            raise UnusableDataError(f"{source.description} holds no images")
        self.source, self.pair_maker, self.seed = source, pair_maker, seed

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, index: int, epoch: int = 0, augment: bool = True) -> Dict[str, Any]:
        attempts = min(MAX_CONSECUTIVE_BAD, len(self.source))
        for skipped in range(attempts):
            position = (index + skipped) % len(self.source)
            try:
                high, low = self.source.load(position)
                # Keyed by the index asked for: a replacement draws its own crop and flip, not its neighbour's.
                generator = sample_generator(self.seed, epoch, index)
                sample = self.pair_maker(high, low, generator, augment, self.source.name(position))
            except BadImageError as error:
                logger.warning("skipping %s", error)
                last_error = error
                continue
            sample["skipped"] = skipped
            return sample
        if attempts == len(self.source):
            raise UnusableDataError(
                f"none of the {attempts} images of {self.source.description} is usable (the last: {last_error})"
            )
        raise UnusableDataError(
            f"{attempts} images in a row of {self.source.description} are unusable (from index {index}; the last: "
            f"{last_error}); check the data"
        )

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.sample(index, epoch)
