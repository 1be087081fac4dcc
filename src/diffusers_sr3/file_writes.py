"""Writing a file so that a failure (a full disk, a read-only folder, an interrupt) never leaves it truncated: the
library's and the commands' writes of results, reports, cards and pictures."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import BinaryIO, Iterator

# What `os.link` raises where the filesystem has no hard links (FAT, some network mounts) or refuses them. EINVAL:
# Windows on exFAT/FAT32 ("[WinError 1] Incorrect function").
_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EINVAL}
_NO_HARD_LINKS_WINERRORS = {1}  # ERROR_INVALID_FUNCTION
# What `fcntl.flock` raises on filesystems without locks (NFS mounted `nolock`, some FUSE and CIFS mounts): there the
# saves' and the training runs' locks lock nothing, as on Windows, which has no `fcntl`.
NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def _already_exists(destination: str) -> FileExistsError:
    error = FileExistsError(f"{destination} already exists; pass --overwrite to replace it, or choose another --output")
    # Named already: an `atomic_file` around the one that raised it passes it on as it is.
    error.destination = destination  # type: ignore[attr-defined]
    return error


def _put_in_place(temporary: str, destination: str, overwrite: bool) -> None:
    """Move the finished `temporary` to `destination`; without `overwrite`, never over a file that appeared there
    since the run checked (another run writing into the same folder)."""
    if overwrite:
        os.replace(temporary, destination)
        return
    try:
        # A hard link fails if `destination` exists, atomically: a check then a rename could replace a file that
        # another run put there in between.
        os.link(temporary, destination)
    except FileExistsError:
        raise _already_exists(destination) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS and getattr(error, "winerror", None) not in _NO_HARD_LINKS_WINERRORS:
            raise
        # Best-effort only: another run can still write `destination` between this check and the rename.
        if os.path.lexists(destination):
            raise _already_exists(destination) from None
        os.replace(temporary, destination)
        return
    os.remove(temporary)


def _naming(destination: str, error: OSError) -> OSError:
    """`error` (same errno, so the same OSError subclass) saying that `destination` could not be written."""
    if error.errno is None:
        named = OSError(f"cannot write {destination}: {error}")
    else:
        named = OSError(error.errno, f"cannot write {destination}: {error.strerror}")
    # Not the `filename` attribute, which str() would add: an `atomic_file` around this one (several files put in
    # place together) passes it on as it is.
    named.destination = destination  # type: ignore[attr-defined]
    return named


@contextlib.contextmanager
def atomic_file(destination: str, overwrite: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `destination` through: a fresh temporary beside it (same filesystem, so the rename is
    atomic), put in place when the block ends, removed when it fails. An interrupted or failing write leaves
    `destination` as it was (absent, or the previous file), never a truncated one.

    Args:
        destination: the file to write.
        overwrite: replace a file already at `destination`. When False, a file there (also one another process
            wrote while this one worked) is kept and FileExistsError names it.

    An OSError of the write names `destination`, with its errno where it has one: one that names no file (Pillow
    and json write to the stream, so a full disk names none; Pillow's "cannot write mode I;16 as JPEG" has no errno
    either) or names the hidden temporary (a read-only folder). One about another file (an input it read, with its
    name) is left as it is. So is one already naming its destination (an `atomic_file` inside this one). An error
    without a name from an input decoded while the block writes (Pillow's "image file is truncated" of an image
    loaded lazily) cannot be told from one of the write, and names `destination` too.
    """
    folder = os.path.dirname(destination) or "."
    # Not named after `destination`: a name near the filesystem's limit (255 bytes) would leave no room for more.
    temporary = os.path.join(folder, f".sr3-{uuid.uuid4().hex[:12]}.tmp")
    try:
        try:
            with open(temporary, "xb") as stream:
                yield stream
        except OSError as error:
            if error.filename not in (None, temporary) or hasattr(error, "destination"):
                raise
            raise _naming(destination, error) from error
        try:
            _put_in_place(temporary, destination, overwrite)
        except OSError as error:
            if error.filename != temporary:  # `_already_exists`, which names `destination`
                raise
            raise _naming(destination, error) from error
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
