"""Per-process caches of open data handles (LMDB environments), safe across dataloader worker forks."""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

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
