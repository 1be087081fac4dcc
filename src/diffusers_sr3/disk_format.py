"""The version of the on-disk format that this diffusers-sr3 reads, and the refusal of folders saved in a newer one.

Diffusers ignores config keys it does not know, with a warning, and so did every diffusers-sr3 before this check: a
folder saved by a newer version whose new key changes what the model means (as `residual_scale` once did) loaded
here without it and gave other images, silently. A save records `diffusers_sr3_format` (in `model_index.json`, and in
the `config.json` of each network that needs it) only when an older reader would misread it; this version's saves
never need it, so their files are unchanged. A folder without the key is format 1.

Adding a key whose neutral value keeps older versions' behaviour (as every key so far) needs no new format: it is
written on every save and an older version warns that it ignores it. A save whose value of a new key is not neutral,
or that a reader must not load without understanding, records the next format number, and this module's
`FORMAT_VERSION` becomes that number.

`DiffusionPipeline.from_pretrained` of a Hub repo downloads all its weights before it calls into this package with
the repo's model_index.json (`SR3BasePipeline.extract_init_dict`, which refuses a newer format). The only code of
ours it runs before that download is the repo's `pipeline_sr3.py` (imported to find the pipeline class), which the
saving version writes: a version that first records format 2 can make older readers refuse before any weights by
writing a `check_format({FORMAT_KEY: 2}, ...)` call into that file (`pipelines.base.write_remote_code_layout`).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

from . import __version__

FORMAT_KEY = "diffusers_sr3_format"
# The newest on-disk format this version reads.
FORMAT_VERSION = 1
UPGRADE = "upgrade with `pip install -U diffusers-sr3`"


class NewerFormatError(ValueError):
    """A folder saved in an on-disk format newer than this diffusers-sr3 reads."""


def check_format(config: Mapping[str, Any], where: str) -> None:
    """Refuse `config` (a pipeline's `model_index.json` or a network's `config.json`, read from `where`) where it was
    saved in a newer on-disk format than this version reads, or names its format in no form a save writes.

    Raises:
        NewerFormatError: the format is newer than `FORMAT_VERSION`.
        ValueError: the format is not a positive integer.
    """
    saved = config.get(FORMAT_KEY, 1)
    if isinstance(saved, bool) or not isinstance(saved, numbers.Integral) or saved < 1:
        raise ValueError(f"{where} has {FORMAT_KEY} {saved!r}, which is no format version (a positive integer)")
    if saved > FORMAT_VERSION:
        raise NewerFormatError(
            f"{where} was saved in diffusers-sr3's on-disk format {saved}; diffusers-sr3 {__version__} reads formats "
            f"up to {FORMAT_VERSION} and would misread it: {UPGRADE}"
        )
