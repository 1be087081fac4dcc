"""Training samples from a streamed dataset (no length; shuffled with a buffer), bad images skipped."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, Tuple

from torch.utils.data import IterableDataset, get_worker_info

from .decoding import MAX_CONSECUTIVE_BAD, BadImageError, UnusableDataError, decode_image, extract_image, item_name
from .pairs import PairMaker, sample_generator

logger = logging.getLogger(__name__)


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

    def items(self, shuffle: bool) -> Iterator[Tuple[int, str, Any]]:
        """`(position, name, image)` of every item of this epoch's stream (shuffled with `shuffle`)."""
        stream = self.stream
        if shuffle and hasattr(stream, "shuffle"):  # a `datasets` stream; plain torch iterables keep their order
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(self.epoch)
        for position, item in enumerate(stream):
            yield (
                position,
                item_name(f"{self.description}[{position}]", item, self.image_column),
                extract_image(item, self.image_column),
            )

    def samples(self, augment: bool) -> Iterator[Dict[str, Any]]:
        # Each data loader worker numbers its own share of the stream from 0, so the draws are keyed by the worker
        # too (with no worker, or one, `key == position`: a run's draws do not depend on being read by one worker).
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        skipped = 0
        for position, name, image in self.items(shuffle=augment):
            key = position * num_workers + worker_id
            try:
                sample = self.pair_maker(
                    decode_image(image, name), None, sample_generator(self.seed, self.epoch, key), augment, name
                )
            except BadImageError as error:
                logger.warning("skipping %s", error)
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_BAD:
                    raise UnusableDataError(
                        f"{skipped} images in a row of {self.description} are unusable (the last: {error})"
                    ) from None
                continue
            sample["skipped"] = skipped
            skipped = 0
            yield sample

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self.samples(augment=True)
