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

The package is split by job (every name is importable from `diffusers_sr3.data` itself):

- `decoding`: one image (file, bytes, PIL image, array, tensor) to a tensor; what makes an image unusable;
- `pairs`: `PairMaker`, one training sample from a high-resolution image;
- `sources`: the map-style image sources and loading a `datasets` dataset;
- `caching`: per-process handles (LMDB environments) that survive dataloader worker forks;
- `dataset`: the map-style training dataset and its epoch-keyed sampler;
- `streaming`: training samples from a streamed dataset;
- `building`: `build_training_data`, choosing the source from the options.
"""

from .building import TrainingData, build_training_data
from .caching import open_lmdb
from .dataset import EpochSampler, PairDataset
from .decoding import MAX_CONSECUTIVE_BAD, BadImageError, UnusableDataError, decode_image, extract_image
from .pairs import PairMaker, batch_generator, cut_into_crops, gaussian_blur, sample_generator
from .sources import (
    LOCAL_BUILDERS,
    FileListSource,
    ImageSource,
    LmdbSource,
    PreparedFolderSource,
    SubsetSource,
    TorchDatasetSource,
    load_datasets_source,
    prepared_resolutions,
    prepared_source,
)
from .streaming import StreamingPairDataset

__all__ = [
    "LOCAL_BUILDERS",
    "MAX_CONSECUTIVE_BAD",
    "BadImageError",
    "UnusableDataError",
    "EpochSampler",
    "FileListSource",
    "ImageSource",
    "LmdbSource",
    "PairDataset",
    "PairMaker",
    "PreparedFolderSource",
    "StreamingPairDataset",
    "SubsetSource",
    "TorchDatasetSource",
    "TrainingData",
    "batch_generator",
    "build_training_data",
    "cut_into_crops",
    "decode_image",
    "extract_image",
    "gaussian_blur",
    "load_datasets_source",
    "open_lmdb",
    "prepared_resolutions",
    "prepared_source",
    "sample_generator",
]
