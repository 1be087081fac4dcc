"""One writer per output folder: a training run (or `sr3 demo`, or `sr3 prepare`) holds an exclusive lock on
`LOCK_FILE` in its folder.

Two runs into one folder would replace each other's checkpoints, prune them, and delete each other's half-written
ones (two `sr3 prepare --overwrite` runs, each other's images); the second one is refused at once instead. They all
take the one lock file, so a prepare into a training run's folder (or the reverse) is refused too: the two would mix
their files there. The lock is `fcntl.flock`'s, so it ends with its process however that ends, and a stale lock file
never blocks a later run. Where there is no flock (Windows) or the filesystem has no locks (NFS mounted nolock),
nothing is locked, as before.

Readers of a prepared dataset (a training run's `--train_data_dir`, `sr3 eval`'s folders) take the same file's lock
shared (`hold_for_reading`): a dataset that `sr3 prepare` is still writing is refused to them, and while they read,
a prepare into the folder (which would replace or add images under them) is refused. Readers do not exclude each
other: two training runs may read one dataset. A dataset whose prepare stopped before the end (its progress record
says so) is refused to readers too, naming the command that finishes it.

A reader creates the lock file only in a folder of its own user: one it made in another user's dataset would be its
own, which that user's writers could not open for writing. A writer that meets such a file anyway (made by another
user's run) takes it over when no one holds it: flock needs no write access to find that out.
It removes the file by name only while it holds it and the name is still that file, so that two writers taking
over one file never both hold the folder.

A reader refused the lock reads the holder's record in the file. In two moments of a few system calls that record is
not the holder's: between a writer's lock and its writing its own record, and while a writer taking over another
user's file holds it (it cannot write it, and removes it). The record is then the previous holder's (a training run's,
or none in an empty file a reader made): read as such, a prepare in that moment would let the reader in, unlocked,
while it writes. So the reader checks the record against the holder that /proc/locks names, and while they differ it
looks again, at the file then at the name, for up to `_UNRECORDED_WAIT_S`; so does a reader that finds no lock file
in a dataset `sr3 prepare` made (which keeps one), as in the moment between a taking writer's removing the old file
and its creating its own. Where /proc/locks names no holder of the
file (another system, a filesystem whose numbers it gives otherwise) the record is taken as it is, as before; where
it names holders in another pid namespace the reader waits that long, then reads as beside another kind of writer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import stat
import time
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from ..file_writes import NO_LOCKING

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# A dot file: the Hub uploads (`UPLOAD_IGNORE_PATTERNS`' ".*") leave it out, and it is no `checkpoint-<step>`.
LOCK_FILE = ".sr3-train.lock"
# The progress record `sr3 prepare` keeps in its output folder: it marks a folder as a prepared dataset.
PREPARE_STATE_FILE = ".sr3_prepare.json"
PREPARE_WRITER = "sr3 prepare"
# How long a reader waits for a writer holding the lock file whose record is still another's to write its own or
# remove the file (a few system calls; longer only where /proc/locks names holders in another pid namespace).
_UNRECORDED_WAIT_S = 0.5
_UNRECORDED_POLL_S = 0.01
# A FIFO put in the lock file's place must not block the open.
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class OutputFolderBusyError(ValueError):
    """Another live run holds the output folder's lock."""


class FolderBeingReadError(OutputFolderBusyError):
    """Live readers (`hold_for_reading`) hold the folder's lock shared: no writer holds it."""


@contextlib.contextmanager
def claim_output_folder(folder: str, option: str = "--output_dir", writer: str = "training run") -> Iterator[None]:
    """Hold `folder`'s exclusive lock while the block runs (the folder is created if needed).

    Args:
        folder: the output folder.
        option: the command-line option that named it, for the messages.
        writer: what holds it ("training run", "sr3 demo", "sr3 prepare"), recorded for the message that refuses
            another.

    Raises:
        OutputFolderBusyError: another process holds the lock (nothing in `folder` is changed).
        ValueError: `folder` is a file, or its lock file is a link or not a regular file.
        OSError: `folder` or its lock file cannot be created.

    The lock file records the holder's process id and `writer`, which a refused run names. It stays after the run;
    when the block fails, a lock file this call created is removed again (a refused `sr3 prepare` leaves no file in a
    folder it does not write), and so is a folder this call created, if it is left empty.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{option} {folder} is a file, not a folder")
    new_folder = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OSError(f"{option} {folder} is not writable ({error.strerror or error})") from None
    # Another claim creating it meanwhile is refused by the lock; a later one opening the removed file locks anew.
    new_lock_file = not os.path.lexists(os.path.join(folder, LOCK_FILE))
    descriptor = _lock(folder, option, writer)
    try:
        yield
    except BaseException:
        # A failed run leaves no lock file or folder of its own behind.
        if new_lock_file:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, LOCK_FILE))
        if new_folder:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _lock(folder: str, option: str, writer: str) -> Optional[int]:
    """A descriptor holding `folder`'s lock, with this process's id and `writer` written in; None where nothing can be
    locked."""
    if fcntl is None:
        return None
    path = os.path.join(folder, LOCK_FILE)
    while True:
        try:
            descriptor = os.open(path, _FLAGS, 0o644)
        except OSError as error:
            if os.path.islink(path):  # O_NOFOLLOW's ELOOP
                raise ValueError(f"{path} is a link, not the lock file a run writes: remove it") from None
            if error.errno in (errno.EACCES, errno.EPERM) and os.path.isfile(path):
                _take_over(path, folder, option)
                continue
            raise OSError(f"{option} {folder} is not writable ({error.strerror or error})") from None
        held = False
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ValueError(f"{path} is not a file, not the lock file a run writes: remove it")
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _refuse(descriptor, folder, option)
            except OSError as error:
                if error.errno in NO_LOCKING:
                    return None
                raise
            # Locked, but maybe a file that a failed run removed with its new folder just before: lock the new one.
            with contextlib.suppress(FileNotFoundError):
                held = os.fstat(descriptor).st_ino == os.lstat(path).st_ino
            if held:
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, f"{os.getpid()}\n{writer}\n".encode("ascii"), 0)
        finally:
            if not held:
                os.close(descriptor)
        if held:
            return descriptor


def _refuse(descriptor: int, folder: str, option: str) -> None:
    """Raise the error that refuses a writer the lock that `descriptor`'s file holds for another process."""
    if _only_readers(descriptor):
        readers = _reader_pids(descriptor)
        raise FolderBeingReadError(
            f"{folder} is being read as training or evaluation data"
            + (f" (pid {', '.join(readers)})" if readers else "")
            + f"; wait for that to end or choose another {option}"
        ) from None
    pid, holder = _holder(descriptor)
    raise OutputFolderBusyError(
        f"{folder} is being written by another {holder} (pid {pid}); wait for it or choose another {option}"
    ) from None


def _take_over(path: str, folder: str, option: str) -> None:
    """Remove the lock file `path`, which this process cannot open for writing (another user's), where no one holds
    it, so that the writer creates its own; refuse the writer as `_lock` does where someone does.

    Raises:
        OutputFolderBusyError: another process holds the lock.
        OSError: the file cannot be opened even to read, or removed (the folder is not writable), naming it.
    """
    try:
        owner = f"uid {os.stat(path).st_uid}"
    except OSError:  # removed meanwhile: `_lock` tries again
        return
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise OSError(
            f"{option} {folder}: its lock file {path} belongs to {owner} and cannot be opened "
            f"({error.strerror or error}): remove it once no run of that user reads or writes the folder"
        ) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _refuse(descriptor, folder, option)
        except OSError as error:
            if error.errno not in NO_LOCKING:
                raise
        # Held (or nothing locks here): a process that opened the old file locks a removed one, which it notices.
        # Removed by name only while it is the file held: another writer may have taken it over since this one
        # opened it, and the name now be that writer's own lock file, held (`_lock` tries again).
        try:
            if os.lstat(path).st_ino != os.fstat(descriptor).st_ino:
                return
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise OSError(
                f"{option} {folder} is not writable ({error.strerror or error}): its lock file {path} belongs to "
                f"{owner}, and this user can neither write it nor replace it"
            ) from None
    finally:
        os.close(descriptor)


def _holder(descriptor: int) -> Tuple[str, str]:
    """The process id and the writer that the lock's holder wrote ("unknown" and "run" while it has not yet; a
    holder before writers were recorded wrote its id only, and was a training run or `sr3 demo`)."""
    try:
        lines = os.pread(descriptor, 128, 0).decode("ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return "unknown", "run"
    pid = lines[0].strip() if lines and lines[0].strip().isdigit() else "unknown"
    writer = lines[1].strip() if len(lines) > 1 and lines[1].strip().isprintable() and lines[1].strip() else "run"
    return pid, writer


def _only_readers(descriptor: int) -> bool:
    """Whether the lock that refused an exclusive claim is held shared only (by readers), not by a writer."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    return True


def _reader_pids(descriptor: int) -> List[str]:
    """The ids of the processes holding shared flocks on `descriptor`'s file, from Linux's /proc/locks; none where it
    cannot tell (another system, a filesystem whose numbers /proc/locks gives otherwise)."""
    return _lock_pids(descriptor, "READ") or []


def _lock_pids(descriptor: int, kind: str) -> Optional[List[str]]:
    """The ids of the processes holding flocks of `kind` ("READ": shared, "WRITE": exclusive) on `descriptor`'s file,
    from Linux's /proc/locks; None where there is none to read (another system)."""
    status = os.fstat(descriptor)
    file_id = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    try:
        with open("/proc/locks", encoding="utf-8") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    pids = []
    for line in lines:
        # "1: FLOCK  ADVISORY  READ  4242 08:01:1234 0 EOF"; waiting requests are marked "->" and hold nothing.
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == kind and fields[5] == file_id:
            pids.append(fields[4])
    return sorted(set(pids), key=int)


def _record_is_the_holders(descriptor: int, pid: str) -> bool:
    """Whether the lock file's record (its `pid`) names the writer holding it now, as far as /proc/locks tells: not
    where it names another holder, whose record is not written yet (a writer between its lock and its write) or never
    will be (one taking over another user's file, which it cannot write, to remove it)."""
    holders = _lock_pids(descriptor, "WRITE")
    return not holders or pid in holders


def is_prepared_dataset(folder: str) -> bool:
    """Whether `folder` holds a prepared dataset: `sr3 prepare`'s progress record, or the original's layout (`hr_<N>`
    folders or an LMDB)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return (
        PREPARE_STATE_FILE in names
        or "data.mdb" in names
        or any(re.fullmatch(r"hr_\d+", name) and os.path.isdir(os.path.join(folder, name)) for name in names)
    )


@contextlib.contextmanager
def hold_for_reading(folder: str, option: str, use: str = "training on it") -> Iterator[None]:
    """Read `folder` as data while the block runs, refused while `sr3 prepare` writes it.

    Args:
        folder: a folder the block reads images from.
        option: the command-line option that named it, for the message.
        use: what the block does with it ("training on it", "evaluating it"), for the message.

    Raises:
        OutputFolderBusyError: an `sr3 prepare` holds the folder's lock: its dataset is half-written.

        ValueError: the folder holds a dataset whose `sr3 prepare` stopped before the end (killed, interrupted).

    A prepared dataset (`is_prepared_dataset`) is held with a shared lock until the block ends, its lock file created
    if it has none and the folder is this user's, so that a prepare into it meanwhile is refused (two readers share
    it). Any other folder is only checked: a lock held there shared would refuse a training run's resume into its own
    folder while something reads its images. A folder that another kind of writer holds (a training run's output read
    as images) is read unlocked, as before; so is one whose lock file cannot be opened or created (a read-only mount,
    another user's dataset of the original's layout).
    """
    descriptor = _share(folder, option, use, is_prepared_dataset(folder))
    try:
        # Read under the lock: a prepare that is still running is refused above as such, not as a stopped one.
        unfinished = _unfinished_prepare(folder, option, use)
        if unfinished:
            raise ValueError(unfinished)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


def reading_folders(named: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The folders to hold (`hold_for_reading`) for reading the given `(folder, option)` pairs: each folder and its
    parent, once each (by real path), as a prepared dataset's lock and record lie in OUT, above the folders a reader
    may be given (`OUT/hr_256`, `OUT/lr_16`, `OUT/data` of its parquet files). A folder given through a link has two
    parents, the link's and its target's (`OUT/hr_256` may link to another dataset's): both are held, so that the
    lock taken is the one a prepare into either takes."""
    folders = {}
    for folder, option in named:
        if os.path.isdir(folder):
            real = os.path.realpath(folder)
            for candidate in (folder, os.path.dirname(os.path.abspath(folder)), os.path.dirname(real)):
                folders.setdefault(os.path.realpath(candidate), (candidate, option))
    return list(folders.values())


def _names_a_dataset(folder: str, names: Optional[Sequence[str]]) -> bool:
    """Whether `folder`, whose file names are `names` (None: unknown, looked up), holds a prepare's lock file or
    record: a dataset being written, or one written."""
    if names is not None:
        return LOCK_FILE in names or PREPARE_STATE_FILE in names
    return any(os.path.lexists(os.path.join(folder, name)) for name in (LOCK_FILE, PREPARE_STATE_FILE))


@contextlib.contextmanager
def hold_folders_for_reading(named: Iterable[Tuple[str, str]], use: str) -> Iterator[None]:
    """`hold_for_reading` for each of `reading_folders(named)` while the block runs, and for each prepared dataset
    that the block's listings of images (`image_io.walk_images`, `find_image_sources`: folder walks, globs) meet: one
    below a folder given (`sr3 upscale datasets/`), or reached through a link. They are held as the listing reaches
    them, before it lists what lies below (a dataset the listing meets last is refused before any image is read), by
    their real path, and named "folder" in the messages."""
    from ..image_io import DATASET_HOLD

    held = set()
    with contextlib.ExitStack() as holds:

        def hold(folder: str, option: str, names: Optional[Sequence[str]] = None, every: bool = True) -> bool:
            if not (every or _names_a_dataset(folder, names)):
                return False
            real = os.path.realpath(folder)
            if real in held:
                return False
            held.add(real)
            holds.enter_context(hold_for_reading(folder if every else real, option, use))
            return True

        for folder, option in reading_folders(named):
            hold(folder, option)
        token = DATASET_HOLD.set(lambda folder, names: hold(folder, "folder", names, every=False))
        try:
            yield
        finally:
            DATASET_HOLD.reset(token)


def _unfinished_prepare(folder: str, option: str, use: str) -> Optional[str]:
    """The message refusing `folder` where its `sr3 prepare` record says the dataset is unfinished; None for any other
    folder, and where the record is unreadable (`sr3 prepare` itself refuses a damaged one)."""
    try:
        with open(os.path.join(folder, PREPARE_STATE_FILE), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("complete") is not False:
        return None
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    written, position, files = record.get("written"), record.get("position"), settings.get("files")
    counts = [isinstance(value, int) and not isinstance(value, bool) for value in (written, position, files)]
    if all(counts):
        progress = f"{written} image(s) written from the first {position} of its {files} source files"
    else:
        progress = f"{written} image(s) written" if counts[0] else "part of it written"
    return (
        f"{option} {folder} holds a dataset that sr3 prepare did not finish ({progress}): {use} now would read part "
        f"of it; rerun the same sr3 prepare command to finish it{_prepare_command(folder, settings)}"
    )


def _prepare_command(folder: str, settings: dict) -> str:
    """` (sr3 prepare SOURCE --out FOLDER ...)`: the command of `settings` (a prepare record's, of any version) that
    finishes the dataset, or "" where they do not tell it."""
    source, sizes, fmt = settings.get("source"), settings.get("sizes"), settings.get("format", "folder")
    if not isinstance(source, str) or not (
        isinstance(sizes, list) and len(sizes) == 2 and all(isinstance(size, int) for size in sizes)
    ):
        return ""
    words = ["sr3", "prepare", source, "--out", folder, "--sizes", f"{sizes[0]},{sizes[1]}"]
    if settings.get("resample", "bicubic") != "bicubic":
        words += ["--resample", str(settings["resample"])]
    if fmt != "folder":
        words += ["--format", str(fmt)]
    if fmt == "parquet" and settings.get("shard_size", 500) != 500:
        words += ["--shard-size", str(settings["shard_size"])]
    # Recorded since the option exists; an earlier version's record, without it, resumes as that version prepared.
    if settings.get("upsample_small") is True:
        words.append("--upsample_small")
    return f" ({shlex.join(words)})"


def _prepare_record_in(folder: str) -> bool:
    return os.path.lexists(os.path.join(folder, PREPARE_STATE_FILE))


def _owns(folder: str) -> bool:
    """Whether `folder` belongs to this process's user: a lock file it creates there is not another user's."""
    try:
        return os.stat(folder).st_uid == os.geteuid()
    except OSError:
        return False


def _share(folder: str, option: str, use: str, keep: bool) -> Optional[int]:
    """A descriptor holding `folder`'s lock shared when `keep`; None where nothing is held."""
    if fcntl is None:
        return None
    path = os.path.join(folder, LOCK_FILE)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    unrecorded_until = time.monotonic() + _UNRECORDED_WAIT_S
    while True:
        try:
            descriptor = os.open(path, flags | (os.O_CREAT if keep and _owns(folder) else 0), 0o644)
        except OSError as error:
            # A prepare's dataset keeps its lock file: where it is missing, a writer taking over another user's file
            # may have removed it and not yet made its own (see `_UNRECORDED_WAIT_S`).
            if error.errno == errno.ENOENT and time.monotonic() < unrecorded_until and _prepare_record_in(folder):
                time.sleep(_UNRECORDED_POLL_S)
                continue
            if error.errno in (errno.EMFILE, errno.ENFILE):
                # Each prepared dataset read keeps its lock open: out of descriptors, this one would be read unlocked,
                # and the listing that follows fail (a glob's without a word, as if it matched nothing).
                raise OSError(
                    error.errno,
                    f"cannot hold {option} {folder} for reading: {error.strerror} (a lock stays open for each "
                    "prepared dataset read): read fewer datasets at once, or raise the limit (ulimit -n)",
                ) from None
            # No lock file that no writer has made (a folder only read), a link or one that cannot be created: the
            # claims refuse such files themselves.
            return None
        held = False
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                return None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, holder = _holder(descriptor)
                if holder != PREPARE_WRITER and not _record_is_the_holders(descriptor, pid):
                    # The record is the previous holder's: a writer that has just locked the file, or holds it to
                    # take it over, may be a prepare. Look again (the file anew) once it has written or removed it.
                    if time.monotonic() < unrecorded_until:
                        time.sleep(_UNRECORDED_POLL_S)
                        continue
                if holder != PREPARE_WRITER:
                    return None
                raise OutputFolderBusyError(
                    f"{option} {folder} is still being written by sr3 prepare (pid {pid}): {use} now would read a "
                    "half-written dataset; wait for the prepare to finish"
                ) from None
            except OSError as error:
                if error.errno in NO_LOCKING:
                    return None
                raise
            if not keep:
                return None
            # As in `_lock`: a lock file that a failed claim removed just before is no lock; take the new one's.
            with contextlib.suppress(FileNotFoundError):
                held = os.fstat(descriptor).st_ino == os.lstat(path).st_ino
        finally:
            if not held:
                os.close(descriptor)
        if held:
            return descriptor
