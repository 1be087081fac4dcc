"""`sr3 prepare`: turn a folder of images into the original SR3 project's training layout.

Like the original's prepare.py, every image is resized (shorter side, bicubic) and centre-cropped to the LR size
`M` and to the HR size `N`, and the LR image is bicubic-upsampled back to `N` (the "fake SR" images). Unlike it,
photos whose shorter side is below `N` are skipped, with one warning line that counts them: enlarged to `N`, their HR
images would be blurred, and a model trained on them learns to reproduce the blur (as the training scripts, which
never enlarge a training image, skip them too). `--upsample_small` enlarges them as the original does.

    folder (default)  OUT/lr_<M>/00000.png, OUT/hr_<N>/00000.png, OUT/sr_<M>_<N>/00000.png, ...
    --lmdb / -l       OUT/data.mdb with keys 'length' -> count, 'lr_<M>_00000', 'hr_<N>_00000', 'sr_<M>_<N>_00000'
                      -> PNG bytes (the original's LMDB format)
    --format parquet  OUT/data/train-00000.parquet, ...: a Hugging Face dataset with Image columns `image` (HR),
                      `lr` and `sr`, and `name` (the source file)

Images are numbered 0, 1, 2, ... in the sorted order of the readable source files (unreadable ones are reported
and skipped), so numbers are contiguous as the original's data loader needs. Progress is recorded in
OUT/.sr3_prepare.json after the outputs it covers are on disk (each file written under a temporary name and
renamed), so an interrupted run continues where it stopped when run again with the same arguments and unchanged
sources (the same names, sizes and modification times); --overwrite always starts afresh.

A run holds OUT's lock (`training.output_lock`, the one training runs take) from before it reads OUT until it ends: a
second prepare into OUT, or one into a folder a training run writes, is refused at once naming the other process; so
is a training run or `sr3 eval` that would read OUT meanwhile, and a prepare into OUT while they read it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Set, Tuple

import PIL.Image

from ..image_io import IMAGE_EXTENSIONS, UnreadableImageError, open_image, walk_images
from ..training.output_lock import (
    LOCK_FILE,
    PREPARE_STATE_FILE,
    PREPARE_WRITER,
    FolderBeingReadError,
    claim_output_folder,
)
from .common import atomic_file

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode

STATE_FILE = PREPARE_STATE_FILE
# The resize filters, by the value of torchvision's `InterpolationMode` (imported where used: it imports torch).
RESAMPLE = ("bicubic", "bilinear", "lanczos", "nearest")
SAVE_EVERY_SECONDS = 2.0
# Settings an earlier version's state lacks: such a state is compared without them.
NEWER_SETTINGS = ("files_size_mtime_sha256", "upsample_small")
# How many of the photos skipped as too small the warning names.
NAMED_SMALL = 3
# How the settings that hash the sources are named when they differ.
SETTING_LABELS = {
    "files": "number of source files",
    "files_sha256": "source file names",
    "files_size_mtime_sha256": "source file sizes or modification times",
    "upsample_small": "--upsample_small",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="folder of source images (searched recursively)")
    parser.add_argument("--path", dest="path_option", help="same as the positional PATH (the original's option)")
    parser.add_argument("--out", "--output", dest="output", required=True, help="output folder")
    parser.add_argument(
        "--sizes", "--size", default="16,128", help="LR,HR sizes, e.g. 16,128 or 64,512 (default: 16,128)"
    )
    parser.add_argument("--n_worker", "--workers", type=int, default=3, help="worker processes (0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (skipped files are still named)")
    parser.add_argument("--resample", choices=RESAMPLE, default="bicubic", help="resize filter")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-l", "--lmdb", action="store_true", help="write the original's LMDB instead of PNG folders")
    group.add_argument("--format", choices=("folder", "lmdb", "parquet"), default=None, help="output format")
    parser.add_argument("--shard-size", type=int, default=500, help="rows per parquet file (--format parquet)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a prepared dataset of other settings already in the output"
    )
    parser.add_argument(
        "--upsample_small",
        "--upsample-small",
        action="store_true",
        help="enlarge photos smaller than the HR size to it, as the original's prepare.py does (default: skip them: "
        "their HR images would be blurred)",
    )


def parse_sizes(text: str) -> Tuple[int, int]:
    """`"16,128"` -> `(16, 128)`, checked."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--sizes must be two integers LR,HR such as 16,128; got {text!r}") from None
    if not 0 < low < high:
        raise ValueError(f"--sizes needs 0 < LR < HR, got {low},{high}")
    return low, high


def resize_and_convert(image: PIL.Image.Image, size: int, resample: InterpolationMode) -> PIL.Image.Image:
    """The original's resize: shorter side to `size`, then the centre `size` x `size` crop."""
    from torchvision.transforms import functional as TF

    if image.size != (size, size):
        image = TF.resize(image, size, resample)
        image = TF.center_crop(image, size)
    return image


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def process_file(job: Tuple[str, int, int, str, bool]) -> Tuple[Optional[Dict[str, bytes]], Optional[str], bool]:
    """One source file -> PNG bytes of its `lr`, `hr` and `sr` images, or `(None, reason, small)`: `small` when its
    shorter side is below the HR size (its size is the reason; with `upsample_small` in the job, it is enlarged)."""
    path, low, high, resample, upsample_small = job
    try:
        image = open_image(path)
    except (FileNotFoundError, UnreadableImageError) as error:
        return None, str(error), False
    if min(image.size) < high and not upsample_small:
        return None, f"{image.width}x{image.height}", True
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(resample)
    lr = resize_and_convert(image, low, mode)
    hr = resize_and_convert(image, high, mode)
    sr = resize_and_convert(lr, high, mode)
    return {"lr": _png(lr), "hr": _png(hr), "sr": _png(sr)}, None, False


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # on another Windows drive
        return False


def source_files(folder: str, output: Optional[str] = None) -> List[str]:
    """Image files under `folder`, recursively, as sorted paths relative to it (hidden folders skipped).

    The `output` folder is left out when it lies inside `folder`: its images are results, not sources (a rerun
    would otherwise see a changed listing, and --overwrite would read back what it just wrote).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"source folder not found: {folder}")
    found = walk_images(folder)
    if output is not None:
        skip = os.path.realpath(output)
        if skip == os.path.realpath(folder):
            raise ValueError(f"--out {output} is the source folder; choose another output folder")
        found = [path for path in found if not _inside(os.path.realpath(os.path.dirname(path)), skip)]
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return [os.path.relpath(path, folder) for path in found]


def layout(fmt: str, low: int, high: int) -> List[str]:
    """The names a format writes inside the output folder."""
    if fmt == "folder":
        return [f"lr_{low}", f"hr_{high}", f"sr_{low}_{high}"]
    return ["data.mdb", "lock.mdb"] if fmt == "lmdb" else ["data"]


class _Writer:
    """Writes numbered (lr, hr, sr) triples in one of the three formats."""

    def __init__(self, output: str, fmt: str, low: int, high: int, shard_size: int):
        self.output, self.format, self.low, self.high, self.shard_size = output, fmt, low, high, shard_size
        self.names = dict(zip(("lr", "hr", "sr"), layout("folder", low, high)))
        self.rows: List[Dict[str, object]] = []
        self.environment = None
        if fmt == "folder":
            for name in self.names.values():
                os.makedirs(os.path.join(output, name), exist_ok=True)
        elif fmt == "lmdb":
            import lmdb

            self.environment = lmdb.open(output, map_size=1024**4, readahead=False)
        else:
            os.makedirs(os.path.join(output, "data"), exist_ok=True)

    def add(self, index: int, images: Dict[str, bytes], source: str) -> None:
        if self.format == "folder":
            for kind, data in images.items():
                with atomic_file(os.path.join(self.output, self.names[kind], f"{index:05d}.png")) as stream:
                    stream.write(data)
        elif self.format == "lmdb":
            with self.environment.begin(write=True) as transaction:  # one atomic transaction per image
                for kind, data in images.items():
                    transaction.put(f"{self.names[kind]}_{index:05d}".encode(), data)
                transaction.put(b"length", str(index + 1).encode())
        else:
            self.rows.append({"index": index, "source": source, **images})

    def flush(self, final: bool) -> bool:
        """Write a parquet shard when full (or any rows left when `final`); True if rows were written."""
        if self.format != "parquet" or not self.rows or (len(self.rows) < self.shard_size and not final):
            return False
        import datasets

        features = datasets.Features(
            {
                "image": datasets.Image(),
                "lr": datasets.Image(),
                "sr": datasets.Image(),
                "name": datasets.Value("string"),
            }
        )
        rows = self.rows
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": row["hr"], "path": None} for row in rows],
                "lr": [{"bytes": row["lr"], "path": None} for row in rows],
                "sr": [{"bytes": row["sr"], "path": None} for row in rows],
                "name": [row["source"] for row in rows],
            },
            features=features,
        )
        path = os.path.join(self.output, "data", f"train-{rows[0]['index']:05d}.parquet")
        with atomic_file(path) as stream:
            table.to_parquet(stream)
        self.rows = []
        return True

    def pending(self) -> int:
        """Rows held in memory, not yet on disk."""
        return len(self.rows)

    def close(self) -> None:
        if self.environment is not None:
            self.environment.close()


def _shown(name: str) -> str:
    """`name` as text that prints and stores as UTF-8: a file name's undecodable bytes (which Python keeps as
    surrogates) become U+FFFD."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def _small_photos(small: Dict[str, str], high: int) -> str:
    """What the photos skipped as smaller than the HR size `high` were, in words ("" if none)."""
    if not small:
        return ""
    named = ", ".join(_shown(f"{name} ({size})") for name, size in list(small.items())[:NAMED_SMALL])
    more = f" and {len(small) - NAMED_SMALL} more" if len(small) > NAMED_SMALL else ""
    return (
        f"{len(small)} photo(s) smaller than the HR size {high}, which would be enlarged into blurred HR images: "
        f"{named}{more}"
    )


def _settings(args: argparse.Namespace, source: str, files: Sequence[str], fmt: str, low: int, high: int) -> Dict:
    # The names' bytes, so that names that are not UTF-8 hash too.
    listing = hashlib.sha256(b"\n".join(os.fsencode(name) for name in files)).hexdigest()
    # Separate from the names' hash, so that a state written before it was recorded still resumes.
    stats = hashlib.sha256()
    for name in files:
        status = os.stat(os.path.join(source, name))
        stats.update(f"{status.st_size} {status.st_mtime_ns}\n".encode())
    settings = {"format": fmt, "sizes": [low, high], "resample": args.resample, "source": os.path.abspath(source)}
    settings["upsample_small"] = args.upsample_small
    settings.update(files=len(files), files_sha256=listing, files_size_mtime_sha256=stats.hexdigest())
    if fmt == "parquet":
        settings["shard_size"] = args.shard_size
    return settings


def _save_state(output: str, state: Dict) -> None:
    with atomic_file(os.path.join(output, STATE_FILE)) as stream:
        stream.write((json.dumps(state, indent=2) + "\n").encode("utf-8"))


def _read_state(path: str) -> Tuple[Optional[Dict], Optional[str]]:
    """`(state, None)`, or `(None, problem)` when the file is not a state `sr3 prepare` wrote (damaged, edited)."""
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as error:  # JSON and UTF-8 errors are ValueErrors
        return None, f"unreadable: {error}"
    settings = state.get("settings") if isinstance(state, dict) else None
    sizes = settings.get("sizes") if isinstance(settings, dict) else None
    valid = (
        isinstance(sizes, list)
        and len(sizes) == 2
        and all(isinstance(size, int) for size in sizes)
        and all(isinstance(state.get(key), int) for key in ("position", "written"))
        and isinstance(state.get("skipped"), dict)
        and isinstance(state.get("small", {}), dict)
        and isinstance(state.get("complete"), bool)
    )
    return (state, None) if valid else (None, "not the progress record sr3 prepare writes")


def _remove(output: str, names: Set[str]) -> None:
    for name in names:
        path = os.path.join(output, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _differing(saved: Dict, settings: Dict) -> List[str]:
    """The settings (by `SETTING_LABELS`) that a saved state's `saved` settings differ in."""
    missing = object()
    changed = []
    for key, value in settings.items():
        old = saved.get(key, missing)
        if old != value and not (old is missing and key in NEWER_SETTINGS):
            changed.append(SETTING_LABELS.get(key, key))
    return sorted(changed)


def _load_state(output: str, settings: Dict, overwrite: bool, names: List[str]) -> Dict:
    """The progress to resume from; refuses (without --overwrite) an output folder holding anything else. With
    `overwrite`, always a fresh start, even over a finished dataset of the same settings."""
    fresh = {"settings": settings, "position": 0, "written": 0, "skipped": {}, "small": {}, "complete": False}
    if not os.path.isdir(output) or not set(os.listdir(output)) - {LOCK_FILE}:
        return fresh
    state_path = os.path.join(output, STATE_FILE)
    state = None
    if os.path.isfile(state_path):
        state, problem = _read_state(state_path)
        if problem and not overwrite:
            raise ValueError(f"{state_path} is damaged ({problem}); pass --overwrite to start afresh")
        if state is not None and not overwrite and not _differing(state["settings"], settings):
            resumed = dict(state, settings=settings, small=state.get("small") or {})  # none before it was recorded
            if "upsample_small" not in state["settings"] and state["position"] and not state["complete"]:
                # An earlier version's run, which enlarged the small photos it met: the rest are enlarged too, or the
                # dataset would mix the two. Its record keeps no setting, as that version's (`_upsamples_small`).
                resumed["settings"] = {key: value for key, value in settings.items() if key != "upsample_small"}
            return resumed
    if not overwrite:
        if state is not None:
            changed = _differing(state["settings"], settings)
            raise FileExistsError(
                f"{output} holds a dataset prepared with other settings ({', '.join(changed)} differ); pass "
                "--overwrite to replace it, or choose another output folder"
            )
        raise FileExistsError(
            f"{output} is not empty and was not made by sr3 prepare; choose an empty or new output folder, or pass "
            "--overwrite to write into it (existing files of the same names are replaced)"
        )
    # --overwrite: remove what an earlier prepare run (of any settings) or this format would write, nothing else.
    stale = set(names) | {STATE_FILE}
    if state is not None:
        low, high = state["settings"]["sizes"]
        stale |= {name for fmt in ("folder", "lmdb", "parquet") for name in layout(fmt, low, high)}
    _remove(output, stale)
    return fresh


def run(args: argparse.Namespace) -> int:
    source = args.path or args.path_option
    if not source:
        raise ValueError("give the source image folder (sr3 prepare PATH --out OUT)")
    if args.path and args.path_option and args.path != args.path_option:
        raise ValueError("give the source folder once, either as PATH or as --path")
    low, high = parse_sizes(args.sizes)
    fmt = "lmdb" if args.lmdb else (args.format or "folder")
    if args.n_worker < 0 or args.shard_size < 1:
        raise ValueError("--n_worker must be >= 0 and --shard-size >= 1")
    files = source_files(source, args.output)
    if os.path.isfile(args.output):
        raise FileExistsError(f"--out {args.output} is a file, not a folder")
    settings = _settings(args, source, files, fmt, low, high)
    # Held from before the folder is read: two runs into it (two --overwrite runs of different sizes) would remove
    # and replace each other's images. A run that fails leaves no folder or lock file of its own.
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(claim_output_folder(args.output, "--out", PREPARE_WRITER))
        except (OSError, FolderBeingReadError):
            # A folder this process cannot write (a read-only mount), where the lock's file cannot be opened, or one
            # that training runs are reading: a finished dataset of these settings is reported complete, as before
            # there was a lock; this run writes nothing there.
            if args.overwrite or not _complete(args.output, settings):
                raise
        return _prepare(args, source, files, settings, fmt, low, high)


def _upsamples_small(settings: Dict) -> bool:
    """Whether a dataset of these settings enlarges photos smaller than the HR size: versions that did not record the
    setting always did."""
    return settings.get("upsample_small", True)


def _complete(output: str, settings: Dict) -> bool:
    """Whether `output` holds a finished dataset of `settings`; reads only."""
    try:
        return _load_state(output, settings, False, [])["complete"]
    except (OSError, ValueError):
        return False


def _prepare(
    args: argparse.Namespace, source: str, files: List[str], settings: Dict, fmt: str, low: int, high: int
) -> int:
    """`run`'s work, in the output folder it holds."""
    from tqdm.auto import tqdm

    from ..progress import bar_options

    state = _load_state(args.output, settings, args.overwrite, layout(fmt, low, high))
    if state["complete"]:
        print(f"{args.output} is already complete: {state['written']} images ({len(state['skipped'])} skipped", end="")
        print(f", {len(state['small'])} smaller than {high} left out)" if state["small"] else ")")
        return 0
    # Before the writer creates the layout: a run killed at any moment leaves a folder the next run resumes (without
    # the state, it would be refused as not made by sr3 prepare).
    _save_state(args.output, state)

    upsample_small = _upsamples_small(state["settings"])
    if upsample_small and not args.upsample_small:
        print(
            f"note: {args.output} was started by an earlier sr3 prepare, which enlarged photos smaller than the HR "
            f"size {high}: the rest are enlarged too (--overwrite prepares it afresh, skipping them)",
            file=sys.stderr,
        )
    writer = _Writer(args.output, fmt, low, high, args.shard_size)
    jobs = [
        (os.path.join(source, name), low, high, args.resample, upsample_small) for name in files[state["position"] :]
    ]
    # Fork where possible: the workers only run PIL, and spawned ones would re-import torch (seconds each).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # Ctrl-C signals the whole process group: the workers ignore it (no traceback from each), the main process stops
    # and terminates them.
    pool = (
        context.Pool(args.n_worker, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        if args.n_worker > 0 and jobs
        else None
    )
    results = pool.imap(process_file, jobs, chunksize=4) if pool else map(process_file, jobs)
    # The state on disk always describes outputs that are on disk: rows held for a parquet shard are not counted.
    committed = dict(state)
    last_save = time.monotonic()
    try:
        with tqdm(
            total=len(files),
            initial=state["position"],
            desc="preparing",
            unit="image",
            disable=args.quiet,
            **bar_options(),
        ) as progress:
            for name, (images, error, small) in zip(files[state["position"] :], results):
                if small:
                    state["small"][name] = error
                elif images is None:
                    state["skipped"][name] = error
                    progress.write(
                        _shown(f"skipped unreadable {os.path.join(source, name)} ({error})"), file=sys.stderr
                    )
                else:
                    writer.add(state["written"], images, _shown(name))
                    state["written"] += 1
                state["position"] += 1
                progress.update(1)
                if writer.flush(final=False) or (
                    not writer.pending() and time.monotonic() - last_save > SAVE_EVERY_SECONDS
                ):
                    committed = dict(state, skipped=dict(state["skipped"]), small=dict(state["small"]))
                    _save_state(args.output, committed)
                    last_save = time.monotonic()
        writer.flush(final=True)
        state["complete"] = True
    finally:
        if pool is not None:
            pool.terminate()
        writer.close()
        _save_state(args.output, state if not writer.pending() else committed)
    small = _small_photos(state["small"], high)
    if not state["written"]:
        # Not a dataset marked complete with no image (training would fail on it later): nothing is left behind (the
        # folder too, if this run created it: `claim_output_folder`).
        _remove(args.output, set(layout(fmt, low, high)) | {STATE_FILE})
        if not small:
            first = _shown(next(iter(state["skipped"].values())))
            raise ValueError(
                f"none of the {len(files)} image files under {source} could be read (the first: {first}); nothing "
                "was written"
            )
        unreadable = (
            f"{len(state['skipped'])} could not be read (the first: {_shown(next(iter(state['skipped'].values())))}); "
            if state["skipped"]
            else ""
        )
        raise ValueError(
            f"none of the {len(files)} image files under {source} can be used: {unreadable}{small}; nothing was "
            "written: choose an HR size they reach, or pass --upsample_small to enlarge them"
        )
    if small:
        print(f"warning: skipped {small}; pass --upsample_small to enlarge them", file=sys.stderr)
    kinds = {"folder": "PNG folders", "lmdb": "LMDB", "parquet": "parquet dataset"}[fmt]
    print(f"wrote {state['written']} images ({low} -> {high}) to {args.output} as {kinds}", end="")
    print(f"; skipped {len(state['skipped'])} unreadable file(s)" if state["skipped"] else "")
    return 0
