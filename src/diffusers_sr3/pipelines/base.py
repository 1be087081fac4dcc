"""What the SR3 pipelines share: the refinement loop, and a folder layout that both loaders accept.

Folder layout (the on-disk contract). `save_pretrained` writes Diffusers' usual folder, with the SR3 classes
recorded the way Diffusers loads third-party code:

    model_index.json        "_class_name": ["pipeline_sr3", "SR3Pipeline"], "unet": ["unet_sr3", "SR3UNet2DModel"]
    pipeline_sr3.py         from diffusers_sr3 import SR3Pipeline
    unet/unet_sr3.py        from diffusers_sr3 import SR3UNet2DModel
    unet/config.json, unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json
    guidance_unet/...       optional (SR3Pipeline's autoguidance guide), laid out as unet/

`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` runs those one-line files, which
import the installed package. `SR3Pipeline.from_pretrained(...)` never runs code from the folder: it builds
the SR3 components itself and loads only configs and safetensors weights.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import glob
import inspect
import json
import logging
import operator
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub.utils import HFValidationError, validate_repo_id

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .. import __version__
from ..defaults import steps_to_run
from ..disk_format import FORMAT_KEY, UPGRADE, check_format
from ..file_writes import NO_LOCKING
from ..interrupts import interrupts_deferred
from ..models.unet_sr3 import SR3UNet2DModel, levels_checked
from ..noise import check_scheduler_fits, check_trained_betas, ignore_scheduler_warnings, network_inputs_for_schedule
from ..pretrained import resolve_packaged_name

logger = logging.getLogger(__name__)

# Module file stems of the classes this package writes into pipeline folders. Never rename these:
# they are recorded in model_index.json of every saved pipeline.
REMOTE_CODE_STEMS = {
    "SR3UNet2DModel": "unet_sr3",
    "SR3Pipeline": "pipeline_sr3",
    "SR3UnconditionalPipeline": "pipeline_sr3_unconditional",
    "SR3CascadePipeline": "pipeline_sr3_cascade",
}

# Hidden folder that `save_pretrained` writes a pipeline in, inside the save directory, before moving it into place.
STAGING_PREFIX = ".sr3-save-"
# Written last into a staging folder (renamed into place, so never half-written): the save's files, as a JSON list of
# `/`-separated paths. A staging folder that holds it is complete, and a save killed while moving it into place is
# finished by `finish_interrupted_save` or the next save of the folder; one without it is an unfinished save,
# discarded by the next save.
STAGED_LISTING = ".sr3-staged-files.json"
# Locked (flock) by the save writing or moving a staging folder, from its creation to its removal: other saves leave
# a locked staging folder alone, and discard or finish one only once its lock is free (its process ended).
STAGING_LOCK = ".sr3-save.lock"
# Whether `_move_into` moves relative to folder descriptors (`os.replace` shares `os.rename`'s `dir_fd` support).
_BY_DESCRIPTOR = (
    {os.open, os.stat, os.rename} <= os.supports_dir_fd
    and os.listdir in os.supports_fd
    and hasattr(os, "O_DIRECTORY")
    and hasattr(os, "O_NOFOLLOW")
)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
# Opening a FIFO blocks until it has a writer: the listing and the lock file are opened without waiting, and only
# regular files are read.
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
# The file that makes a folder loadable (a pipeline's index, a network's config): the replaced one is removed before
# the folder's other moves and the new one moved in last, so a folder cut short mid-move is refused, never loaded as a
# mix of two saves.
INDEX_FILES = ("model_index.json", "config.json")

# What `download` asks for when neither the Hub nor the cache lists the repo (the cached snapshot is used as it is).
WEIGHT_PATTERNS = ["model_index.json", "*.json", "*/*.json", "*/*.safetensors", "*/*/*.json", "*/*/*.safetensors"]
# Pickle weights, also asked for offline with `use_safetensors=False` (read with `weights_only=True`).
PICKLE_WEIGHT_PATTERNS = ["*/*.bin", "*/*/*.bin"]
# `from_pretrained` options passed on to every model component's `ModelMixin.from_pretrained`.
MODEL_LOADING_OPTIONS = ("low_cpu_mem_usage", "device_map", "max_memory", "offload_folder", "offload_state_dict")
HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "trust_remote_code")

# The networks a pipeline evaluates at every refinement step: its UNet and, for autoguidance, the guide. Tiling and
# the backends stand in for each of them alike.
STEP_NETWORKS = ("unet", "guidance_unet")

GeneratorInput = Optional[Union[torch.Generator, List[torch.Generator]]]
StepCallback = Union[Callable[..., Optional[Dict[str, Any]]], PipelineCallback, MultiPipelineCallbacks]


@dataclass
class SR3PipelineOutput(BaseOutput):
    """Output of the SR3 pipelines.

    Args:
        images: the results, as a list of PIL images, a `(B, H, W, 3)` numpy array or a `(B, 3, H, W)` tensor in
            [0, 1], by `output_type`.
        intermediates: when `num_intermediates > 0`, the noisy image after evenly spaced refinement steps, in
            order, each in the same form as `images` (the original's `sr_process` strips); else None.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    intermediates: Optional[List[Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]]] = None


def _classes() -> Dict[str, type]:
    """The SR3 classes that pipeline folders may name, by class name."""
    import diffusers_sr3

    return {name: getattr(diffusers_sr3, name) for name in REMOTE_CODE_STEMS if hasattr(diffusers_sr3, name)}


def register_remote_code_modules() -> None:
    """Make each `REMOTE_CODE_STEMS` module name importable as what the folder's re-export file holds: the class.

    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, unet=my_unet)` checks a passed component
    against the library that model_index.json names for it (`unet_sr3`), looked up in `sys.modules`. Each alias
    also holds the Diffusers base class that check expects. A module of that name imported before is kept.
    """
    for class_name, cls in _classes().items():
        module = types.ModuleType(REMOTE_CODE_STEMS[class_name], f"{class_name} of the installed diffusers-sr3.")
        vars(module)[class_name] = cls
        vars(module).update({base.__name__: base for base in (ModelMixin, DiffusionPipeline) if issubclass(cls, base)})
        sys.modules.setdefault(module.__name__, module)


def write_remote_code_layout(folder: str) -> None:
    """Rewrite a saved pipeline folder's model_index.json into the custom-code layout and add the pipeline's re-export
    (each SR3 component's own save wrote its re-export, and a network's `auto_map`, in its folder)."""
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    pipeline_name = index["_class_name"]
    pipeline_name = pipeline_name[-1] if isinstance(pipeline_name, list) else pipeline_name
    stem = REMOTE_CODE_STEMS[pipeline_name]
    index["_class_name"] = [stem, pipeline_name]
    _write_reexport(os.path.join(folder, f"{stem}.py"), pipeline_name)
    for name, value in index.items():
        if isinstance(value, list) and len(value) == 2 and value[1] in REMOTE_CODE_STEMS and not name.startswith("_"):
            index[name] = [REMOTE_CODE_STEMS[value[1]], value[1]]
    with open(index_path, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2, sort_keys=True)
        handle.write("\n")


def write_truthful_configs(folder: str) -> None:
    """Make a saved folder's JSON configs state only what is used, and nothing of the machine that saved them.

    - `_name_or_path` (where the pipeline was loaded from: a local path such as /home/user/run) is dropped from
      model_index.json and every component config: it describes the saving machine, not the model.
    - A scheduler config with `trained_betas` gets `beta_start` / `beta_end` equal to the first and last trained beta
      (Diffusers leaves its unused defaults, 1e-4 and 0.02, beside the betas actually used).
    """
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            if not isinstance(config, dict):
                continue
            changed = config.pop("_name_or_path", None) is not None
            betas = config.get("trained_betas")
            if isinstance(betas, list) and betas:
                truthful = {"beta_start": float(betas[0]), "beta_end": float(betas[-1])}
                changed = changed or any(config.get(key) != value for key, value in truthful.items())
                config.update(truthful)
            if changed:
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump(config, handle, indent=2, sort_keys=True)
                    handle.write("\n")


def _write_reexport(path: str, class_name: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(
            f'"""Loads {class_name} from the installed diffusers-sr3 package (not on PyPI: pip install -e . in a '
            'checkout)."""\n\n'
            f"from diffusers_sr3 import {class_name}  # noqa: F401\n"
        )


# A network's weights as Diffusers names them: diffusion_pytorch_model[.<variant>][-00001-of-00002].safetensors (or
# .bin), and the index of sharded ones, diffusion_pytorch_model.safetensors.index[.<variant>].json. A variant name may
# hold hyphens (`non-ema`): the shortest one before an optional shard number, as Diffusers' variant_compatible_siblings
# reads `<variant>-00001-of-00002`.
_WEIGHT_FILE = re.compile(
    r"diffusion_pytorch_model(?:\.(?P<variant>[^.]+?))?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"|diffusion_pytorch_model\.(?:safetensors|bin)\.index(?:\.(?P<index_variant>[^.]+))?\.json"
)


def weight_file_variant(name: str) -> Tuple[bool, Optional[str]]:
    """Whether `name` is a network's weight file, and of which variant (None: the main weights)."""
    match = _WEIGHT_FILE.fullmatch(name)
    return (False, None) if match is None else (True, match["variant"] or match["index_variant"])


def files_to_download(files: Sequence[str], variant: Optional[str] = None, pickles: bool = False) -> List[str]:
    """The files of a pipeline repo (`/`-separated paths) that loading it needs, as Diffusers chooses them.

    Every JSON config, and in each component folder the weights of one format (safetensors, or `.bin` with
    `pickles`) and one variant: `variant`'s where the folder has it, else the main weights.
    """
    chosen, weights = [], {}
    for name in files:
        folder, base = name.rpartition("/")[::2]
        is_weights, file_variant = weight_file_variant(base)
        if is_weights:
            if folder and (".bin" in base) == pickles:
                weights.setdefault(folder, []).append((name, file_variant))
        elif base.endswith(".json"):
            chosen.append(name)
    for candidates in weights.values():
        wanted = variant if any(file_variant == variant for _, file_variant in candidates) else None
        chosen += [name for name, file_variant in candidates if file_variant == wanted]
    return sorted(chosen)


def _cached_listing(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[List[str]]:
    """The files of Hub repo `repo_id` at `revision` as huggingface_hub listed them when it cached them (None where it
    keeps no listing)."""
    import huggingface_hub

    # Versions of huggingface_hub without it keep no listing, and take a cached snapshot as it is.
    get_cached_repo_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if get_cached_repo_tree is None:
        return None
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [entry.path for entry in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        return None


def _newer_class(class_name: Any) -> Optional[str]:
    """Why a folder naming `class_name` is refused where it is an SR3 class that this version does not have, which a
    newer version saved; None for a class this version has, or another library's."""
    if isinstance(class_name, str) and class_name.startswith("SR3") and class_name not in _classes():
        return f"{class_name}, which diffusers-sr3 {__version__} does not have (saved by a newer version?): {UPGRADE}"
    return None


def _saved_pipeline_class(cls: type, source: str, index: Dict[str, Any]) -> type:
    """The SR3 pipeline class that `index` (`source`'s model_index.json) names; refused unless `cls` loads it and
    this version reads its on-disk format."""
    check_format(index, f"{source}/model_index.json")
    saved_class = index.get("_class_name")
    saved_class = saved_class[-1] if isinstance(saved_class, list) else saved_class
    newer = _newer_class(saved_class)
    if newer:
        raise ValueError(f"{source} holds a {newer}")
    if cls.__name__ not in ("SR3BasePipeline", saved_class):
        raise ValueError(f"{source} holds a {saved_class}, not a {cls.__name__}; load it with {saved_class}")
    pipeline_class = _classes().get(saved_class)
    if pipeline_class is None:
        raise ValueError(f"{source} holds a {saved_class}, which is not an SR3 pipeline")
    return pipeline_class


def _holds_variant(folder: str, variant: str) -> bool:
    """Whether any weight file below `folder` is of `variant`."""
    return any(weight_file_variant(name.rpartition("/")[2]) == (True, variant) for name in _files_under(folder))


def _files_under(folder: str) -> List[str]:
    """Every file below `folder`, as `/`-separated paths relative to it (the Hub's form), but a killed save's
    staging folder's."""
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(STAGING_PREFIX)]
        files += [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/") for name in names]
    return sorted(files)


def _stale_weights(entries: Collection[str], saved: Sequence[str]) -> List[str]:
    """The weight files among `entries` (of a folder being saved into) that a save of `saved` (its files, relative
    to that folder) removes: those of a variant it saves, that it does not hold."""
    here = {path.split("/", 1)[0] for path in saved}
    saved_variants = {variant for is_weights, variant in map(weight_file_variant, here) if is_weights}
    stale = []
    for entry in entries:
        is_weights, variant = weight_file_variant(entry)
        if is_weights and variant in saved_variants and entry not in here:
            stale.append(entry)
    return stale


def stale_hub_files(
    api: Any,
    repo_id: str,
    uploads: Collection[str],
    folder: str,
    subfolder: str = "",
    optional_files: Collection[str] = (),
) -> List[str]:
    """The files of Hub repo `repo_id` that an upload of `uploads` (the saved `folder`'s files, `/`-separated, going
    into `subfolder` of the repo) leaves describing an earlier save, to delete in the same commit: as a local save
    (`_move_into`), the weights of a variant it uploads that it does not hold (another format, other shards, which
    Diffusers would load in place of the new ones); the folders of components that a model_index.json of the repo
    (the pipeline's, or a cascade stage's) named and the uploaded one no longer does (downloaded by every load of
    the repo, never used); and those of `optional_files` that `uploads` lacks (files a save writes only for some
    models). An earlier model_index.json that is not an index (damaged) names no folder to delete."""
    from huggingface_hub import hf_hub_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    remote = [path[len(prefix) :] for path in api.list_repo_files(repo_id) if path.startswith(prefix)]
    stale = [path for path in optional_files if path in remote and path not in uploads]
    for component in {path.rpartition("/")[0] for path in uploads if "/" in path}:
        here = {path.rpartition("/")[2] for path in uploads if path.rpartition("/")[0] == component}
        there = [path.rpartition("/")[2] for path in remote if path.rpartition("/")[0] == component]
        stale += [f"{component}/{name}" for name in _stale_weights(there, list(here))]
    for index in [path for path in uploads if path.rpartition("/")[2] == "model_index.json" and path in remote]:
        pipeline = index[: -len("model_index.json")]
        with open(hf_hub_download(repo_id, f"{prefix}{index}", token=api.token), encoding="utf-8") as handle:
            earlier = _component_folders(handle)
        with open(os.path.join(folder, *index.split("/")), encoding="utf-8") as handle:
            now = _component_folders(handle)
        if earlier is not None and now is not None:
            removed = tuple(f"{pipeline}{name}/" for name in earlier - now)
            stale += [path for path in remote if removed and path.startswith(removed)]
    return sorted(f"{prefix}{path}" for path in set(stale))


def _component_folders(handle: Any) -> Optional[set]:
    """The component folders that the model_index.json open as `handle` names (an absent optional component is
    `[null, null]`); None where it is not an index (not JSON, or not an object)."""
    try:
        index = json.load(handle)
    except ValueError:  # not JSON, or not UTF-8
        return None
    if not isinstance(index, dict):
        return None
    return {
        name
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] is not None
    }


def _move_into(staging: str, target: str, saved: Sequence[str], staging_parent: Optional[int] = None) -> None:
    """Move every entry of `staging` into `target`: files replace those of the same name, folders are merged.

    `saved` lists the files of the whole save (`/`-separated, relative to `staging`), some of which an interrupted
    move may already have moved: moving again finishes it. Other files in `target` are kept, and so are other
    variants' weights, so that main and fp16 weights can be saved side by side as Diffusers saves them. Weights of a
    variant being saved that the new save does not hold (another format, other shards) are removed: a folder never
    mixes two saves of one variant. Symbolic links are moved or replaced as links, never followed.

    Args:
        staging: the folder to move from (a name relative to `staging_parent` where that is given).
        target: the folder to move into (created if needed).
        saved: the save's files, as above.
        staging_parent: a descriptor of the folder holding `staging` (the recursion into its subfolders).
    """
    os.makedirs(target, exist_ok=True)
    # Each source folder is opened once, never through a link, and its entries are listed, statted and moved relative
    # to that descriptor: a subfolder that another process swaps for a link after its check moves nothing from outside
    # in. Without descriptor-relative calls (Windows) `source` is None and the same calls take paths.
    source = os.open(staging, _FOLDER_FLAGS, dir_fd=staging_parent) if _BY_DESCRIPTOR else None

    def at(entry: str) -> str:
        return entry if source is not None else os.path.join(staging, entry)

    try:
        listed = os.listdir(staging if source is None else source)
        incoming = [entry for entry in listed if entry not in (STAGED_LISTING, STAGING_LOCK)]
        # The replaced index goes before anything else changes: a folder that still has its index is the previous
        # save, untouched, so a load of it never sees a mix (and an interrupted move is told by the index it lacks).
        for index in INDEX_FILES:
            if index in incoming:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(target, index))
        for entry in _stale_weights(os.listdir(target), saved):
            os.remove(os.path.join(target, entry))
        for entry in sorted(incoming, key=lambda name: (name in INDEX_FILES, name)):
            destination = os.path.join(target, entry)
            source_is_folder = stat.S_ISDIR(os.stat(at(entry), dir_fd=source, follow_symlinks=False).st_mode)
            destination_is_folder = os.path.isdir(destination) and not os.path.islink(destination)
            if source_is_folder and destination_is_folder:
                below = [path.split("/", 1)[1] for path in saved if path.startswith(f"{entry}/")]
                _move_into(at(entry), destination, below, source)
                continue
            if destination_is_folder:
                shutil.rmtree(destination)
            elif source_is_folder and os.path.lexists(destination):
                os.remove(destination)
            os.replace(at(entry), destination, src_dir_fd=source)
    finally:
        if source is not None:
            os.close(source)


def _check_folders_writable(target: str, saved: Sequence[str]) -> None:
    """Raise PermissionError naming the first folder of `target` that the save's files (`saved`, `/`-separated) would
    be moved into and that this process cannot write (a read-only subfolder of a copied model).

    Checked before the move starts: the move removes the replaced index first, so one stopped by such a folder would
    leave `target` unloadable until the folder is made writable, and finishing it would fail the same way. So is
    each file the move replaces or removes in a sticky folder of another user (`_check_sticky_entries_owned`)."""
    folders = {""}
    for path in saved:
        parts = path.split("/")[:-1]
        folders.update("/".join(parts[: depth + 1]) for depth in range(len(parts)))
    for folder in sorted(folders):
        parts = folder.split("/") if folder else []
        # A link below `target` (a cascade's stage linked to another copy) is replaced by the move as a link: nothing
        # is written through it, into a folder it leads to.
        if any(os.path.islink(os.path.join(target, *parts[: depth + 1])) for depth in range(len(parts))):
            continue
        destination = os.path.join(target, *parts)
        if not os.path.isdir(destination):
            continue
        if not os.access(destination, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"{destination} is not a writable folder")
        below = [path[len(folder) + 1 :] for path in saved if path.startswith(f"{folder}/")] if folder else saved
        _check_sticky_entries_owned(destination, below)


def _check_sticky_entries_owned(folder: str, saved: Sequence[str]) -> None:
    """Raise PermissionError naming the first entry of `folder` that a save of `saved` (its files relative to
    `folder`) replaces or removes and that this process may not: in a sticky folder (mode +t, as /tmp or a shared
    models folder) that is not its own, only an entry's owner renames or removes it, though the folder is writable.
    Root may change any."""
    user = os.geteuid() if hasattr(os, "geteuid") else 0  # Windows has no sticky folders
    status = os.stat(folder)
    if user == 0 or not status.st_mode & stat.S_ISVTX or status.st_uid == user:
        return
    present = set(os.listdir(folder))
    merged = {path.split("/", 1)[0] for path in saved if "/" in path}  # a folder into a folder: its entries move
    changed = _stale_weights(sorted(present), saved)
    for entry in sorted({path.split("/", 1)[0] for path in saved} & present):
        path = os.path.join(folder, entry)
        if not (entry in merged and os.path.isdir(path) and not os.path.islink(path)):
            changed.append(entry)
    for entry in changed:
        path = os.path.join(folder, entry)
        if os.lstat(path).st_uid != user:
            raise PermissionError(
                errno.EPERM,
                f"{path} belongs to another user, and {folder} is a sticky folder (mode +t) of another user: only the "
                "file's owner can replace it there; ask them to, or save to another folder",
            )


def _give_new_file_modes(staging: str, saved: Sequence[str]) -> None:
    """Give the files of the save in `staging` (`saved`, `/`-separated) the permissions that the umask gives a new
    file, as `open` does. safetensors 0.8 writes its files through a temporary of mode 0600, so a saved model's weights
    were readable by their owner alone, beside a readable config: another user of a shared model folder could list the
    weights but not load them. The mode is read from a file made here, not from `os.umask`, which can only be read by
    changing it for every thread of the process."""
    probe = os.path.join(staging, ".sr3-mode-probe")
    with open(probe, "x", encoding="utf-8"):
        pass
    try:
        new_file_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.remove(probe)
    for path in saved:
        name = os.path.join(staging, *path.split("/"))
        status = os.lstat(name)
        if stat.S_ISREG(status.st_mode) and stat.S_IMODE(status.st_mode) != new_file_mode:
            os.chmod(name, new_file_mode)


class UnsafeStagingError(ValueError):
    """A staging folder that does not hold what a save of this package writes (links, paths outside it, files it
    does not list): it is never moved into place."""


def _staged_listing(staging: str) -> Optional[List[str]]:
    """The files of the complete save in `staging` (its `STAGED_LISTING`); None where the save did not complete (no
    listing, or one that is not a regular file holding a JSON list of paths)."""
    try:
        descriptor = os.open(os.path.join(staging, STAGED_LISTING), os.O_RDONLY | _O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with open(descriptor, encoding="utf-8") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        try:
            saved = json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    if not isinstance(saved, list) or not all(isinstance(path, str) for path in saved):
        return None
    return saved


def _check_staging(staging: str, saved: List[str]) -> None:
    """Raise `UnsafeStagingError` unless the complete save in `staging`, listing `saved`, holds only what a save
    writes: the listing's paths are relative and stay inside it, nothing in it is a link, and every file in it is
    listed (some may have been moved already)."""
    for path in saved:
        parts = path.split("/")
        if "\\" in path or os.path.isabs(path) or any(part in ("", ".", "..") for part in parts):
            raise UnsafeStagingError(f"{staging}: its listing names {path!r}, not a path inside it: remove the folder")
    present = []
    for root, folders, names in os.walk(staging):  # os.walk never follows links by default
        for name in folders + names:
            if os.path.islink(os.path.join(root, name)):
                raise UnsafeStagingError(f"{os.path.join(root, name)} is a link: remove {staging}, no save writes it")
        present += [os.path.relpath(os.path.join(root, name), staging).replace(os.sep, "/") for name in names]
    unlisted = sorted(set(present) - set(saved) - {STAGED_LISTING, STAGING_LOCK})
    if unlisted:
        raise UnsafeStagingError(f"{staging} holds {unlisted[0]}, which its listing does not name: remove the folder")


def _lock_staging(staging: str) -> Optional[int]:
    """A file descriptor holding `staging`'s exclusive lock (`STAGING_LOCK`), or None where another process (or
    another save in this one) holds it, or the folder was removed meanwhile. The lock lasts until the descriptor is
    closed (`_unlock`), or its process ends, however it ends. -1 (no lock) where there is no `fcntl` (Windows: a
    file open there cannot be deleted, which already keeps a live save's folder in place) or the filesystem has no
    locks (`NO_LOCKING`). `UnsafeStagingError` where the lock file is a link or not a regular file."""
    if fcntl is None:
        return -1
    path = os.path.join(staging, STAGING_LOCK)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_NONBLOCK, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        if os.path.islink(path):  # O_NOFOLLOW's ELOOP
            raise UnsafeStagingError(f"{path} is a link: remove {staging}, no save writes it") from None
        raise
    held = False
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise UnsafeStagingError(f"{path} is not a file: remove {staging}, no save writes it")
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Locked, but maybe a file that a discarding save removed with its folder just before: not this folder's.
        held = os.fstat(descriptor).st_ino == os.lstat(path).st_ino
    except (BlockingIOError, FileNotFoundError):
        pass
    except OSError as error:
        if error.errno not in NO_LOCKING:
            raise
        return -1
    finally:
        if not held:
            os.close(descriptor)
    return descriptor if held else None


def _unlock(descriptor: int) -> None:
    """Release a lock that `_lock_staging` took."""
    if descriptor >= 0:
        os.close(descriptor)


def _locked(staging: str) -> bool:
    """Whether a live save holds `staging`'s lock; asked without writing anything (a load's question)."""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(os.path.join(staging, STAGING_LOCK), os.O_RDONLY | os.O_NOFOLLOW | _O_NONBLOCK)
    except OSError:  # no lock file: no save made it since this version, or it is gone
        return False
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):  # else no save's: finishing it refuses it
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as error:
        if error.errno not in NO_LOCKING:
            raise
    finally:
        os.close(descriptor)
    return False


class _FolderLock:
    """This process's hold of one folder's lock: the threads holding it take turns (the one holding it re-enters),
    and one descriptor holds the flock for all of them."""

    def __init__(self) -> None:
        self.turn = threading.RLock()
        self.users = 0  # threads holding or waiting for `turn`: the entry is dropped when none is left
        self.depth = 0  # `folder_locked` calls inside one another in the thread holding `turn`
        self.descriptor: Optional[int] = None
        self.exclusive = False


# flock locks belong to an open file description: a second descriptor of a folder that this process has locked
# would wait for this process itself. Keyed by the folder's (st_dev, st_ino).
_FOLDER_LOCKS: Dict[Tuple[int, int], _FolderLock] = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


def _flock(descriptor: int, exclusive: bool) -> None:
    """Lock `descriptor` (`folder_locked`), waiting for it; nothing where there are no locks."""
    if fcntl is None or descriptor < 0:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError as error:
        if error.errno not in NO_LOCKING:
            raise


@contextlib.contextmanager
def folder_locked(folder: str, exclusive: bool) -> Iterator[None]:
    """Hold `folder`'s own lock (flock on a descriptor of the folder: no file is created in it), waiting for it.

    Saves hold it exclusively while they move a staging folder into place, loads shared while they read the index
    and the components, so that a load never sees a mix of two saves and two saves' moves never interleave. It is
    re-entrant within a process: a shared hold taken inside an exclusive one keeps it exclusive, an exclusive one
    inside a shared one makes it exclusive. Without `fcntl` (Windows) or on a filesystem without locks
    (`NO_LOCKING`), only this process's threads take turns.

    Args:
        folder: an existing folder.
        exclusive: whether to exclude every other holder (a save) or only exclusive ones (a load).
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        # A folder one may enter but not list (mode 711, shared model folders) cannot be opened to lock, and loaded
        # before locks came: there only this process's threads take turns (and loads still check their index).
        descriptor = -1
    try:
        status = os.fstat(descriptor) if descriptor >= 0 else os.stat(folder)
        key = (status.st_dev, status.st_ino)
        with _FOLDER_LOCKS_GUARD:
            entry = _FOLDER_LOCKS.setdefault(key, _FolderLock())
            entry.users += 1
        try:
            with entry.turn:
                if entry.depth == 0 or (exclusive and not entry.exclusive):
                    if entry.descriptor is None:
                        entry.descriptor, descriptor = descriptor, -1
                    try:
                        _flock(entry.descriptor, exclusive)
                    except BaseException:  # Ctrl-C while waiting too
                        if entry.depth == 0:
                            descriptor, entry.descriptor = entry.descriptor, None
                        raise
                    entry.exclusive = entry.exclusive or exclusive
                entry.depth += 1
                try:
                    yield
                finally:
                    entry.depth -= 1
                    if entry.depth == 0:
                        descriptor, entry.descriptor, entry.exclusive = entry.descriptor, None, False
        finally:
            with _FOLDER_LOCKS_GUARD:
                entry.users -= 1
                if not entry.users:
                    del _FOLDER_LOCKS[key]
    finally:
        if descriptor >= 0:
            os.close(descriptor)  # releases the flock


def _index_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """What tells one save's index file from another's; None where there is none."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


@contextlib.contextmanager
def folder_loading(folder: str, index: str) -> Iterator[None]:
    """Load from the local `folder`, whose loadable files `index` names, holding its shared lock (`folder_locked`),
    and refuse the load if the index changed or vanished meanwhile: a save moved into the folder where locks do not
    hold (another host on NFS without locks, Windows), and the load may mix two saves. Writes nothing."""
    with folder_locked(folder, exclusive=False):
        path = os.path.join(folder, index)
        before = _index_identity(path)
        try:
            yield
        finally:
            if _index_identity(path) != before:
                raise OSError(f"{folder} changed while it loaded: a save is moving into it: load it once the save ends")


def staging_folders(folder: str) -> List[str]:
    """The names of the staging folders of saves into `folder` that did not end (killed, or failing to move)."""
    return sorted(entry for entry in os.listdir(folder) if entry.startswith(STAGING_PREFIX))


def unloadable_reason(folder: str, index: str) -> str:
    """Why `folder`, which lacks its `index` file, holds no model, as the end of a load's error: the staging folders
    of saves into it, and the call that finishes the one interrupted while moving into place. Writes nothing."""
    entries = staging_folders(folder) if os.path.isdir(folder) else []
    complete = [entry for entry in entries if index in (_staged_listing(os.path.join(folder, entry)) or ())]
    if complete and _locked(os.path.join(folder, complete[0])):
        return f" (a save is moving {complete[0]} into place: load it once the save ends)"
    if complete:
        return (
            f" (a save was interrupted while moving {complete[0]} into place: finish it with "
            f"diffusers_sr3.finish_interrupted_save({folder!r}))"
        )
    if entries:
        return f" (only {', '.join(entries)}, a save that stopped before it was complete)"
    return ""


def _interrupted(folder: str, saved: Optional[List[str]]) -> bool:
    """Whether the complete save listing `saved` (None: not complete) was interrupted while moving into `folder`: its
    moves remove the folder's index first and move the save's in last, so the folder lacks that index."""
    indexes = [index for index in INDEX_FILES if index in (saved or ())]
    return bool(indexes) and not any(os.path.isfile(os.path.join(folder, index)) for index in indexes)


def finish_interrupted_save(folder: Union[str, os.PathLike], discard_unfinished: bool = False) -> List[str]:
    """Finish moving into `folder` the save that was interrupted while moving into place (killed, or a full disk):
    a load refuses such a folder, which lacks its index file (`model_index.json`, or a UNet's `config.json`), and
    names its staging folder. The next `save_pretrained` into the folder calls this first.

    Only a complete save (one whose listing `STAGED_LISTING` names its files) is moved, and only into a folder
    without the index the save holds (the move removes it first): beside a present index, the folder holds a whole
    save, and a staging folder is a stale one, never rolled forward over a newer folder. A staging folder is checked
    first (`UnsafeStagingError` for links, paths outside it or unlisted files), and one that another process holds
    (a save still writing or moving it) is left alone.

    Args:
        folder: the folder that a pipeline or a UNet was being saved into.
        discard_unfinished: also remove the staging folders of saves that did not complete, and stale complete ones
            (what a save does: `folder` holds its previous files, and those saves moved nothing).

    Returns:
        The names of the staging folders whose saves were finished.
    """
    folder = os.fspath(folder)
    with folder_locked(folder, exclusive=True):
        return _finish_interrupted_save(folder, discard_unfinished)


def _finish_interrupted_save(folder: str, discard_unfinished: bool) -> List[str]:
    """`finish_interrupted_save`, under the folder's lock."""
    finished = []
    for entry in staging_folders(folder):
        staging = os.path.join(folder, entry)
        if not stat.S_ISDIR(os.lstat(staging).st_mode):
            raise UnsafeStagingError(f"{staging} is not a folder (a link?): remove it, it is no save of this package")
        saved = _staged_listing(staging)
        if _interrupted(folder, saved):
            _check_staging(staging, saved)  # before the lock file too: a refused folder is left as it is
        elif not discard_unfinished:
            continue
        descriptor = _lock_staging(staging)
        if descriptor is None:  # a live save: its process finishes or discards it
            continue
        try:
            saved = _staged_listing(staging)
            if _interrupted(folder, saved):  # again, under the lock: the save may have ended meanwhile
                _check_staging(staging, saved)
                logger.warning(
                    "%s: finishing the save that was interrupted while moving it into place (from %s)", folder, entry
                )
                with interrupts_deferred():  # the staging folder's removal too: a Ctrl-C there would leave it
                    _move_into(staging, folder, saved)
                    shutil.rmtree(staging, ignore_errors=True)
                finished.append(entry)
            elif discard_unfinished:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            _unlock(descriptor)
    return finished


def staged_save(
    save_directory: str, write: Callable[[str], None], upload: Optional[Callable[[str, List[str]], None]] = None
) -> List[str]:
    """Save into `save_directory` what `write(staging)` writes, so that at every instant the folder holds the previous
    save, the new one, or a complete new one that `finish_interrupted_save` (or the next save) moves into place.

    `write` writes into a hidden staging folder inside `save_directory` (`STAGING_PREFIX`; a move within one folder
    never crosses filesystems, a mount point or a symlink to another disk, and needs no write access to its parent).
    Its listing (`STAGED_LISTING`) then marks it complete, and its files are moved into place. A save that fails or
    is killed before that leaves the previous files untouched; its staging folder is removed now, or by the next save.
    The save holds its staging folder's lock (`STAGING_LOCK`) throughout, so that other saves leave it alone, and
    `save_directory`'s own lock (`folder_locked`, as `finish_interrupted_save` does) while it moves the files.

    With `upload`, the save moves into place first, and `upload(folder, saved)` then sends it from hard links to its
    files in another hidden folder (`_linked_copy`), which no other save writes or moves: another save moving into
    `save_directory` meanwhile changes nothing it sends, and a process killed during a long upload keeps the new save.
    Where the filesystem makes no hard links, it sends the staging folder before the move; the save moves into place
    however the upload ends, and the upload's error is raised after.

    Args:
        save_directory: the folder to save into (created if needed, and removed again if the save fails there).
        write: writes the save into the folder it is given.
        upload: uploads the save, given a folder holding it and its files (as returned).

    Returns:
        The saved files, as `/`-separated paths relative to `save_directory`.
    """
    created = not os.path.isdir(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    finish_interrupted_save(save_directory, discard_unfinished=True)
    descriptor = staging = linked = None
    try:
        try:
            staging, descriptor = _new_staging_folder(save_directory)
            write(staging)
            saved = [path for path in _files_under(staging) if path != STAGING_LOCK]
            _check_folders_writable(save_directory, saved)
            _give_new_file_modes(staging, saved)
            listing = os.path.join(staging, f"{STAGED_LISTING}.part")
            with open(listing, "w", encoding="utf-8") as handle:
                json.dump(saved, handle)
            os.replace(listing, os.path.join(staging, STAGED_LISTING))
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):  # only a folder this save created and left empty
                    os.rmdir(save_directory)
            raise
        # From here the staging folder is the new save: a move that fails or is killed leaves it for
        # `finish_interrupted_save` or the next save. Ctrl-C or SIGTERM waits for the moves and the staging folder's
        # removal (raised after it, it would leave the folder behind). The folder's lock keeps other saves' moves
        # and loads out until these have ended.
        try:
            if upload is not None:
                linked = _linked_copy(staging, saved, save_directory)
                if linked is None:
                    upload(staging, saved)
        finally:
            with folder_locked(save_directory, exclusive=True), interrupts_deferred():
                _move_into(staging, save_directory, saved)
                shutil.rmtree(staging, ignore_errors=True)
        if linked is not None:
            upload(linked[0], saved)
    finally:
        if descriptor is not None:
            _unlock(descriptor)
        if linked is not None:
            try:
                shutil.rmtree(linked[0], ignore_errors=True)
            finally:
                _unlock(linked[1])
    return saved


def _new_staging_folder(save_directory: str) -> Tuple[str, int]:
    """A new hidden folder (`STAGING_PREFIX`) in `save_directory`, and the descriptor holding its lock."""
    while True:  # another save may discard a staging folder between its creation and its lock
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=save_directory)
        descriptor = _lock_staging(staging)
        if descriptor is not None:
            return staging, descriptor


def _linked_copy(staging: str, saved: List[str], save_directory: str) -> Optional[Tuple[str, int]]:
    """A copy of the complete save in `staging` (its files `saved`) made of hard links, in a new hidden folder of
    `save_directory`, and the descriptor holding that folder's lock; None where the filesystem makes no hard links.

    The save's upload reads it after the save has moved into place: no save changes a file once written (each one
    writes new files and moves them in), so it holds this save whatever moves into `save_directory` meanwhile. Held
    like a staging folder that never completes, so other saves leave it alone while it is held and the next save
    removes it if this process dies."""
    folder, descriptor = _new_staging_folder(save_directory)
    try:
        for path in saved:
            os.makedirs(os.path.dirname(os.path.join(folder, path)), exist_ok=True)
            os.link(os.path.join(staging, path), os.path.join(folder, path))
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        _unlock(descriptor)
        if isinstance(error, OSError):  # no hard links here (FAT, some network and FUSE filesystems)
            return None
        raise
    return folder, descriptor


def saved_not_uploaded(error: Exception, repo_id: str, save_directory: str) -> Exception:
    """The error of a `save_pretrained(push_to_hub=True)` whose upload failed (`training.hub.HubUploadError`): why,
    and that the save itself is complete in `save_directory`."""
    from huggingface_hub import constants

    from ..training.hub import upload_failure

    return upload_failure(
        error,
        f"to {constants.ENDPOINT}/{repo_id}",
        f"the save in {save_directory} is complete, only its upload failed: save with push_to_hub=True again to retry",
    )


def step_networks(pipeline: Any) -> Dict[str, Any]:
    """The `STEP_NETWORKS` that `pipeline` has, by name, as its instance dictionary holds them (stand-ins included)."""
    return {name: vars(pipeline)[name] for name in STEP_NETWORKS if vars(pipeline).get(name) is not None}


# One re-entrant lock per pipeline object, kept out of the instance so that pipelines still deep-copy and pickle (a
# lock does neither); weak keys, so a pipeline's lock goes with it.
_CALL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()
# The progress bar of the call running on a pipeline (`_one_progress_bar`), kept out of the instance as its lock is: a
# pipeline deep-copied or pickled during a call (in a step callback) neither fails on the bar's output stream nor
# carries the bar into the copy, whose calls would count on it and show none of their own. Only a call, holding the
# pipeline's lock, sets it.
_CALL_PROGRESS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def call_lock(pipeline: Any) -> threading.RLock:
    """The re-entrant lock that serialises the calls on `pipeline`: its `__call__`, and every swap of its step networks
    for stand-ins ([`stand_ins`], `swap_unet`, `use_backend`), hold it.

    A call changes the pipeline while it runs (stand-ins in its instance dictionary, the scheduler's timesteps and
    step index, `_interrupt`), so two overlapping calls would mix each other's state. Re-entrant: a cascade's call
    holds its own lock while its stages (pipelines themselves) take theirs, and a call may run inside a stand-in block.
    """
    with _CALL_LOCKS_GUARD:
        lock = _CALL_LOCKS.get(pipeline)
        if lock is None:
            lock = _CALL_LOCKS[pipeline] = threading.RLock()
        return lock


def share_call_lock(pipelines: Sequence[Any]) -> None:
    """Make `pipelines` (a cascade and the pipelines it holds) take one [`call_lock`], joined with the locks they
    already share with others (a stage held by two cascades).

    A cascade's call holds its lock while each stage takes its own, and a block on one stage (`swap_unet`) may call
    the cascade: with a lock each, two threads could take them in opposite orders and wait for each other forever.
    Build a cascade before its pipelines are called from other threads: a lock held while this runs is not joined.
    """
    with _CALL_LOCKS_GUARD:
        joined = {id(_CALL_LOCKS[pipeline]) for pipeline in pipelines if pipeline in _CALL_LOCKS}
        shared = threading.RLock()
        for pipeline, lock in list(_CALL_LOCKS.items()):
            if id(lock) in joined:
                _CALL_LOCKS[pipeline] = shared
        for pipeline in pipelines:
            _CALL_LOCKS[pipeline] = shared


def serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    """Make a pipeline method hold the pipeline's [`call_lock`] while it runs, and its scheduler's: pipelines built
    on one scheduler object (`SR3Pipeline(**pipe.components)`, one scheduler passed to two) would otherwise run
    their calls at once on its per-call state (timesteps, step index) and mix each other's refinements. Taken after
    the pipeline's, as every call takes them, so two calls never wait for each other's."""

    @functools.wraps(method)
    def serialised_method(self, *args: Any, **kwargs: Any) -> Any:
        with call_lock(self):
            scheduler = getattr(self, "scheduler", None)
            with call_lock(scheduler) if scheduler is not None else contextlib.nullcontext():
                return method(self, *args, **kwargs)

    return serialised_method


@contextlib.contextmanager
def stand_ins(pipeline: Any, stand_in: Callable[[Any], Any]) -> Iterator[None]:
    """Run `pipeline` with `stand_in(network)` in place of each of its step networks inside the `with` block.

    The networks are swapped in the instance dictionary, not with `setattr`, so the pipeline's config (what
    save_pretrained writes) never sees the stand-ins; the originals come back however the block ends. The block holds
    the pipeline's [`call_lock`]: another thread's call waits for it rather than running on (and recording as
    originals) this block's stand-ins.
    """
    with call_lock(pipeline):
        originals = step_networks(pipeline)
        try:
            # Inside the `try`: a stand-in refused for the guide (tile settings it cannot run), or an interrupt while
            # one is built, would otherwise leave the UNet's stand-in in place for every later call.
            for name, network in originals.items():
                vars(pipeline)[name] = stand_in(network)
            yield
        finally:
            vars(pipeline).update(originals)


def _weights_by_folder(files: Sequence[str]) -> Dict[str, Dict[Optional[str], List[str]]]:
    """The network weight files among `files` (`/`-separated paths), by folder and variant (None: the main ones)."""
    weights: Dict[str, Dict[Optional[str], List[str]]] = {}
    for name in files:
        folder, base = name.rpartition("/")[::2]
        is_weights, variant = weight_file_variant(base)
        if folder and is_weights:
            weights.setdefault(folder, {}).setdefault(variant, []).append(base)
    return weights


def pickle_only_folders(files: Sequence[str], variant: Optional[str] = None) -> List[str]:
    """The folders among `files` (`/`-separated paths, a repo's or a folder's) whose network weights that a load of
    `variant` reads (`variant`'s where the folder has them, else the main ones) are all pickled (`.bin`, as
    `safe_serialization=False` saves them), in order."""
    pickled = []
    for folder, variants in sorted(_weights_by_folder(files).items()):
        loaded = variants.get(variant if variant in variants else None, [])
        if loaded and all(".bin" in base for base in loaded):
            pickled.append(folder)
    return pickled


def variant_only_folders(files: Sequence[str], variant: Optional[str] = None) -> Dict[str, List[str]]:
    """The folders among `files` (`/`-separated paths) that hold neither `variant`'s weights nor the main ones, only
    other variants': by folder, those variants, sorted."""
    return {
        folder: sorted(variants)
        for folder, variants in sorted(_weights_by_folder(files).items())
        if variant not in variants and None not in variants
    }


class VariantOnlyError(ValueError):
    """A component folder (`path`) holds only variants' weights (`variants`), none that the load asked for."""

    def __init__(self, path: str, variants: Sequence[str], option: str = "variant={!r}") -> None:
        """`option` formats one variant as the caller passes it (a command's `--variant {}`)."""
        self.path, self.variants = path, list(variants)
        named = " and ".join(repr(variant) for variant in self.variants)
        choices = " or ".join(option.format(variant) for variant in self.variants)
        super().__init__(f"{path} holds only variant {named} weights: pass {choices}")


def loaded_component_folders(
    index: Dict[str, Any], passed: Collection[str], nested_index: Callable[[str], Optional[Dict[str, Any]]]
) -> List[str]:
    """The component folders (`/`-separated, relative to the pipeline's) whose weights loading a pipeline saved with
    `index` (its model_index.json) reads: its components but those `passed` in, and a nested pipeline's own (a
    cascade's stage), recursively. `nested_index(folder)` gives a component folder's model_index.json, None for a
    network's or a scheduler's. Other folders beside them (a backup, a killed save's leftover) are not read."""
    folders = []
    for name, entry in index.items():
        if name.startswith("_") or name in passed or not isinstance(entry, list) or entry[0] is None:
            continue
        nested = nested_index(name)
        if nested is None:
            folders.append(name)
            continue

        def inner_index(inner: str, outer: str = name) -> Optional[Dict[str, Any]]:
            return nested_index(f"{outer}/{inner}")

        folders += [f"{name}/{inner}" for inner in loaded_component_folders(nested, (), inner_index)]
    return folders


def format_checked_folders(
    source: str, index: Dict[str, Any], passed: Collection[str], read_json: Callable[[str], Any]
) -> List[str]:
    """`loaded_component_folders`, each nested pipeline's model_index.json and each network's config.json among them
    refused where saved in a newer on-disk format (`disk_format.check_format`): a network that needs a newer reader
    may record it in its own config.json alone, which its own load reads only after the weights of the components
    loaded before it (and, from the Hub, after Diffusers downloaded its weights).

    Args:
        source: the folder or Hub repo id that refusals name.
        index: the pipeline's model_index.json.
        passed: the components passed in, whose folders are not read.
        read_json: the JSON in the file at a `/`-separated path inside the pipeline's folder, None where there is
            no such file.
    """

    def nested_index(folder: str) -> Optional[Dict[str, Any]]:
        nested = read_json(f"{folder}/model_index.json")
        if isinstance(nested, dict):
            check_format(nested, f"{source}/{folder}/model_index.json")
        return nested

    folders = loaded_component_folders(index, passed, nested_index)
    for folder in folders:
        try:
            config = read_json(f"{folder}/config.json")
        except (OSError, ValueError):  # the network's own load says what is wrong with it
            continue
        if isinstance(config, dict):
            check_format(config, f"{source}/{folder}/config.json")
    return folders


def _local_json(folder: str, path: str) -> Any:
    """The JSON in `folder`'s file at the `/`-separated `path`, None where there is no such file."""
    path = os.path.join(folder, *path.split("/"))
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def pickled_weights_error(pipeline_class: type, source: str, folders: Sequence[str], local: bool) -> ValueError:
    """The error for loading `source` (a folder if `local`, else a Hub repo id) without `use_safetensors=False` when
    its component `folders` hold pickled weights only: it names every such folder and one conversion of the whole
    pipeline, a cascade's stages included."""
    # The commands cannot pass use_safetensors: the conversion lets every loader read the folder. A Hub repo is saved
    # into a folder of the user's: saved under the repo id, a local folder of that name would shadow the repo in
    # later loads from the same directory.
    target = source if local else "a-folder-of-yours"
    paths = [f"{source}/{folder}" for folder in folders]
    named = paths[0] if len(paths) == 1 else ", ".join(paths[:-1]) + " and " + paths[-1]
    return ValueError(
        f"{named} {'holds' if len(paths) == 1 else 'hold'} pickled weights (.bin) and no safetensors: save it once "
        f"as safetensors with `{pipeline_class.__name__}.from_pretrained({source!r}, use_safetensors=False)"
        f".save_pretrained({target!r})` (the weights are read with torch.load(weights_only=True)), or pass "
        "use_safetensors=False to load them"
    )


# A refinement from pure noise must start where the schedule is noisiest: a first step at a signal level this much
# above the schedule's last tells the network the noise is mostly an image, and the "sample" comes back as noise.
# Diffusers' "leading" and "linspace" timestep spacings put the only step of 1 at t = 0 (level 1). Short of that,
# a late start only costs quality ("leading" starts 2 steps at level 0.28 where SR3's schedule ends at 0.007).
MAX_START_LEVEL_ABOVE_NOISIEST = 0.5


def _set_timesteps(scheduler: SchedulerMixin, num_inference_steps: int, device: Any = None) -> None:
    """`scheduler.set_timesteps`, its refusal of the step count (a bare numpy or Diffusers error) named as such.

    More steps than `num_train_timesteps` are refused for every scheduler: some take them but repeat timesteps (the
    multistep solvers then divide 0 by 0 and end in NaN; Euler evaluates the network twice at one level).
    """
    limit = scheduler.config.get("num_train_timesteps")
    if limit is not None and num_inference_steps > limit:
        raise ValueError(f"num_inference_steps must lie in [1, {limit}], got {num_inference_steps}")
    ignore_scheduler_warnings()
    try:
        scheduler.set_timesteps(num_inference_steps, device=device)
    except ValueError as error:  # e.g. PNDM's warm-up below 4 steps: numpy's "operands could not be broadcast"
        raise ValueError(f"{type(scheduler).__name__} cannot take {num_inference_steps} steps: {error}") from None


def refinement_length(scheduler: SchedulerMixin, num_inference_steps: int, strength: float = 1.0) -> int:
    """Network evaluations of one refinement of `num_inference_steps` at `strength` on `scheduler` (a second-order
    scheduler's steps count twice, but its last): the length of its loop, worked out on a copy of `scheduler`."""
    probe = copy.deepcopy(scheduler)
    _set_timesteps(probe, num_inference_steps)
    return len(probe.timesteps) - (num_inference_steps - steps_to_run(num_inference_steps, strength)) * probe.order


def check_num_inference_steps(num_inference_steps: Any, scheduler: Optional[SchedulerMixin] = None) -> int:
    """`num_inference_steps` as an `int`, refused unless it is a positive integer (numpy's integers, and floats with
    no fraction such as a JSON config's or a number field's 4.0, included).

    With a `scheduler`, also refused unless that scheduler takes it, tried on a copy so that nothing runs before a
    call's networks do: never more than its `num_train_timesteps`.
    """
    if isinstance(num_inference_steps, (float, np.floating)) and float(num_inference_steps).is_integer():
        num_inference_steps = int(num_inference_steps)
    try:
        steps = operator.index(num_inference_steps)
    except TypeError:
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}") from None
    limit = None if scheduler is None else scheduler.config.get("num_train_timesteps")
    if steps < 1:
        bounds = "be at least 1" if limit is None else f"lie in [1, {limit}]"
        raise ValueError(f"num_inference_steps must {bounds}, got {steps}")
    if scheduler is not None:
        _set_timesteps(copy.deepcopy(scheduler), steps)
    return steps


def check_eta(scheduler: SchedulerMixin, eta: Optional[float]) -> None:
    """Refuse an `eta` that `scheduler` does not take, or one outside [0, 1]; None (its default) always passes."""
    if eta is None:
        return
    if "eta" not in inspect.signature(scheduler.step).parameters:
        raise ValueError(f"eta applies to schedulers that take it (DDIM), not {type(scheduler).__name__}")
    # Above 1, DDIM's last step takes the square root of a negative number: the image comes back NaN.
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0 deterministic, 1 DDPM-like), got {eta:g}")


def guided_prediction(
    prediction: torch.Tensor, guide_prediction: torch.Tensor, guidance_scale: float, parallel_weight: float = 1.0
) -> torch.Tensor:
    """Autoguidance: `guide + guidance_scale * (prediction - guide)`, i.e. the prediction plus `guidance_scale - 1`
    times the update `prediction - guide`.

    With `parallel_weight` other than 1, the update's component along the prediction itself (per image) is weighted
    by it, as adaptive projected guidance does (Sadat et al., *Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models*, 2024). For a clean-image prediction that component only scales the
    prediction: it raises contrast and draws dark outlines, where the perpendicular rest changes structure.
    """
    if parallel_weight == 1:
        return guide_prediction + guidance_scale * (prediction - guide_prediction)
    update = prediction - guide_prediction
    dims = tuple(range(1, prediction.ndim))
    # The projection coefficient per image; an all-zero prediction has no direction, so nothing lies along it.
    along = (update * prediction).sum(dims, keepdim=True) / prediction.pow(2).sum(dims, keepdim=True).clamp_min(
        torch.finfo(prediction.dtype).tiny
    )
    parallel = along * prediction
    return prediction + (guidance_scale - 1) * (update - parallel + parallel_weight * parallel)


def _signature_for_diffusers(init: Callable[..., None], optional_components: Sequence[str]) -> inspect.Signature:
    """`init`'s signature with the optional components keyword-only and without a default.

    `DiffusionPipeline.from_pretrained` reads a pipeline's components off its `__init__` signature, with
    `DiffusionPipeline._optional_components` (empty) rather than the loaded class's: a component with a default
    counts as a config value there, so a component passed to it (or None) was ignored and the saved one loaded.
    Without a default it is a component; Diffusers still passes None for one the folder does not hold, as it is
    listed in the class's `_optional_components`. The function itself keeps its defaults.
    """
    signature = inspect.signature(init)
    moved = [
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty)
        for parameter in signature.parameters.values()
        if parameter.name in optional_components and parameter.default is not inspect.Parameter.empty
    ]
    kept = [parameter for parameter in signature.parameters.values() if parameter.name not in {p.name for p in moved}]
    keyword_only = [p for p in kept if p.kind is inspect.Parameter.KEYWORD_ONLY] + moved
    positional = [p for p in kept if p.kind < inspect.Parameter.KEYWORD_ONLY]
    rest = [p for p in kept if p.kind is inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=positional + keyword_only + rest)


# Set (per thread) while `SR3BasePipeline.from_pipe` builds a pipeline without a dtype asked for.
_UNCAST = threading.local()


class SR3BasePipeline(DiffusionPipeline):
    """Base class of the SR3 pipelines: the refinement loop, and saving/loading in the SR3 folder layout."""

    _callback_tensor_inputs = ["latents"]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls) and cls._optional_components:
            cls.__init__.__signature__ = _signature_for_diffusers(cls.__init__, cls._optional_components)

    @classmethod
    def extract_init_dict(cls, config_dict: Dict[str, Any], **kwargs: Any) -> Tuple[Dict[str, Any], ...]:
        """Diffusers' split of a model_index.json into `__init__` arguments and the rest, which
        `DiffusionPipeline.from_pretrained` makes before loading any component: a folder saved in a newer on-disk
        format than this version reads is refused there too (`disk_format.check_format`), and the format version is
        no argument."""
        check_format(config_dict, f"the {cls.__name__}'s model_index.json")
        config_dict = {key: value for key, value in config_dict.items() if key != FORMAT_KEY}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any):
        """Diffusers' `from_pipe`: a pipeline of class `cls` sharing `pipeline`'s networks (`kwargs`: components
        and config values to use instead); optional components that `pipeline` lacks (the guide, from an
        `SR3UnconditionalPipeline` or a Diffusers `DDPMPipeline`) are None.

        Unlike Diffusers' (which casts the shared networks to float32 unless given a dtype, changing `pipeline`'s
        too), the networks keep their dtype unless `dtype` (or `torch_dtype`) is given. The new pipeline gets its own
        copy of `pipeline`'s scheduler unless one is passed: a scheduler holds the state of the refinement that runs
        it, so the two pipelines can run at the same time (one per worker thread).
        """
        # Diffusers takes an __init__ parameter without a default for a required component, and
        # `_signature_for_diffusers` removes the optional components' defaults.
        for name in cls._optional_components:
            if name not in kwargs and name not in pipeline.components:
                kwargs[name] = None
        # Under the source's lock: during a call of another thread its components are that call's stand-ins.
        with call_lock(pipeline):
            scheduler = pipeline.components.get("scheduler")
            if "scheduler" not in kwargs and scheduler is not None and "scheduler" in inspect.signature(cls).parameters:
                kwargs["scheduler"] = copy.deepcopy(scheduler)
            if "dtype" in kwargs or "torch_dtype" in kwargs:
                return super().from_pipe(pipeline, **kwargs)
            _UNCAST.active = True
            try:
                return super().from_pipe(pipeline, **kwargs)
            finally:
                _UNCAST.active = False

    def to(self, *args: Any, **kwargs: Any):
        """Diffusers' `to`; a no-op for the float32 cast that Diffusers' `from_pipe` applies when no dtype is asked."""
        if getattr(_UNCAST, "active", False) and not args and kwargs == {"dtype": torch.float32}:
            return self
        return super().to(*args, **kwargs)

    @property
    def num_timesteps(self) -> int:
        """Scheduler steps of the current (or last) refinement, as Diffusers pipelines report it to callbacks."""
        return getattr(self, "_num_timesteps", 0)

    @contextlib.contextmanager
    def _one_progress_bar(self, total: int) -> Iterator[None]:
        """Inside the block, every refinement of this pipeline advances one progress bar of `total` evaluations (with
        the pipeline's `set_progress_bar_config`) instead of showing its own: a call that refines more than once (the
        fidelity answer before a refinement below strength 1, a self-ensemble's 8 answers) shows one bar in a
        notebook, not one per refinement. Inside an enclosing block, that block's bar counts."""
        if self in _CALL_PROGRESS:
            yield
            return
        bar = _CALL_PROGRESS[self] = self.progress_bar(total=total)
        try:
            yield
        finally:
            del _CALL_PROGRESS[self]
            bar.close()

    def _progress(self, timesteps: torch.Tensor) -> Iterator[torch.Tensor]:
        """`timesteps`, counted by the bar of an enclosing `_one_progress_bar` block, else by a bar of their own."""
        bar = _CALL_PROGRESS.get(self)
        if bar is None:
            yield from self.progress_bar(timesteps)
            return
        for timestep in timesteps:
            yield timestep
            bar.update()

    @property
    def interrupt(self) -> bool:
        """Set `pipeline._interrupt = True` (e.g. in a step callback) to skip the remaining steps of this call."""
        return getattr(self, "_interrupt", False)

    def prepare_latents(
        self,
        shape: Tuple[int, int, int, int],
        generator: GeneratorInput,
        device: torch.device,
        latents: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The starting noise, float32 of `shape` on `device`: drawn from `generator`, or the given `latents`.

        Given latents are unit-variance noise, as drawn here; the caller applies the scheduler's `init_noise_sigma`.
        """
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)} (batch, channels, height, width "
                "of the output, padded to a multiple of the UNet's downsampling factor)"
            )
        return latents.to(device=device, dtype=torch.float32)

    def _denoise(
        self,
        shape: Tuple[int, int, int, int],
        condition: Optional[torch.Tensor],
        num_inference_steps: int,
        generator: GeneratorInput,
        num_intermediates: int,
        callback_on_step_end: Optional[StepCallback],
        callback_on_step_end_tensor_inputs: Sequence[str],
        condition_noise_level: Optional[float] = None,
        eta: Optional[float] = None,
        temperature: float = 1.0,
        scheduler: Optional[SchedulerMixin] = None,
        latents: Optional[torch.Tensor] = None,
        init_sample: Optional[torch.Tensor] = None,
        strength: float = 1.0,
        guide: Optional[Any] = None,
        guidance_scale: float = 1.0,
        parallel_guidance_weight: float = 1.0,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Iterative refinement from noise of `shape` (or the given `latents`), conditioned on `condition`.

        The noisy image stays float32 whatever the UNet's dtype, so the scheduler's arithmetic is exact; only the
        network input is cast. `eta` goes to schedulers whose `step` takes it (DDIM: 0 is deterministic, 1 adds
        DDPM-like fresh noise each step); `temperature` scales the starting noise (0 starts from its mean);
        `scheduler` replaces the pipeline's for this call. A step callback (a function, a `PipelineCallback` or
        `MultiPipelineCallbacks`) may replace `"latents"` and `"condition"`; setting `pipeline._interrupt` skips the
        remaining steps. With `init_sample` (a clean estimate in the network's scale) and `strength` below 1, only
        the last `strength` of the schedule runs, from `init_sample` noised to that level (Diffusers' image-to-image
        `strength`). With a `guide` network (autoguidance), each step's prediction is extrapolated away from the
        guide's: `guide + guidance_scale * (unet - guide)`, the update's component along the UNet's prediction
        weighted by `parallel_guidance_weight` (`guided_prediction`). Returns the final image and the requested
        snapshots (float32, the scale the network works in).
        """
        ignore_scheduler_warnings()  # before the steps: the filters may have been dropped since the last call
        num_inference_steps = check_num_inference_steps(num_inference_steps)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may hold {self._callback_tensor_inputs}, not {unknown}"
            )

        device = self._execution_device
        dtype = self.unet.dtype
        # A UNet moved to channels_last (`unet.to(memory_format=torch.channels_last)`) gets channels_last inputs.
        conv_in = getattr(self.unet, "conv_in", None)
        channels_last = conv_in is not None and not conv_in.weight.is_contiguous()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scheduler = self.scheduler if scheduler is None else scheduler
        check_scheduler_fits(scheduler)  # before any network evaluation, also for a scheduler assigned directly
        _set_timesteps(scheduler, num_inference_steps, device)
        # The signal level (or timestep) the network takes at each step, computed and checked once on the CPU: the
        # network's calls take them unread (`levels_checked`), so no step waits for the device.
        signal_levels = network_inputs_for_schedule(scheduler, self.unet.config.conditioning_type)
        if self.unet.config.conditioning_type == "noise_level":
            SR3UNet2DModel.check_signal_levels(signal_levels)
        signal_levels = signal_levels.to(device)
        if init_sample is None:
            noise_levels = signal_levels if self.unet.config.conditioning_type != "timestep" else None
            if noise_levels is None:
                noise_levels = network_inputs_for_schedule(scheduler, "noise_level")
            start_level = float(noise_levels[0])
            noisiest = float(torch.as_tensor(scheduler.alphas_cumprod)[-1].sqrt())
            if start_level > noisiest + MAX_START_LEVEL_ABOVE_NOISIEST:
                raise ValueError(
                    f"{type(scheduler).__name__} with timestep_spacing={scheduler.config.get('timestep_spacing')!r} "
                    f"starts {num_inference_steps} step(s) at timestep {int(scheduler.timesteps[0])}, where the "
                    f"image is mostly signal (level {start_level:.2f}), not pure noise: use more steps or a scheduler "
                    "with timestep_spacing='trailing'"
                )
        latents = self.prepare_latents(shape, generator, device, latents)
        skipped = 0
        if init_sample is None:
            latents = latents * (scheduler.init_noise_sigma * temperature)
        else:
            # As Diffusers' image-to-image pipelines: skip the first steps, noise the estimate to the first kept one.
            skipped = (num_inference_steps - steps_to_run(num_inference_steps, strength)) * scheduler.order
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(skipped)
            start = scheduler.timesteps[skipped : skipped + 1]
            latents = scheduler.add_noise(init_sample.to(device, torch.float32), latents * temperature, start)
        timesteps = scheduler.timesteps[skipped:]
        signal_levels = signal_levels[skipped:]
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        if condition is not None:
            condition = condition.to(device=device, dtype=dtype)
        step_parameters = inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in step_parameters else {}
        check_eta(scheduler, eta)
        if eta is not None:
            step_kwargs["eta"] = float(eta)
        unet_kwargs = {} if condition_noise_level is None else {"condition_noise_level": condition_noise_level}
        if num_intermediates < 0:
            raise ValueError(f"num_intermediates must be 0 or more, got {num_intermediates}")
        # Evenly spaced and always ending at the last step (10 of 100 are steps 0, 11, ..., 99, as the original's);
        # every step when fewer run than asked for (a `strength` below 1 runs only the last part of the schedule).
        snapshot_steps = set(np.linspace(len(timesteps) - 1, 0, num_intermediates).round().astype(int).tolist())
        snapshots: List[torch.Tensor] = []

        for i, t in enumerate(self._progress(timesteps)):
            if self.interrupt:
                continue
            # 1. The scheduler's input scaling applies to the noisy image only, never to the condition.
            model_input = scheduler.scale_model_input(latents, t).to(dtype)
            if condition is not None:
                model_input = torch.cat([condition, model_input], dim=1)
            model_input = model_input.contiguous(memory_format=memory_format)
            # 2. The network takes the step's signal level (or timestep), not the scheduler's timestep value.
            signal_level = signal_levels[i].expand(shape[0])
            with levels_checked():
                model_output = self.unet(model_input, signal_level, return_dict=False, **unet_kwargs)[0].float()
                if guide is not None:
                    guide_output = guide(model_input, signal_level, return_dict=False, **unet_kwargs)[0].float()
                    model_output = guided_prediction(
                        model_output, guide_output, guidance_scale, parallel_guidance_weight
                    )
            # 3. The scheduler's update.
            latents = scheduler.step(model_output, t, latents, return_dict=False, **step_kwargs)[0]
            # 4. The callback may replace the noisy image and the condition.
            if callback_on_step_end is not None:
                available = {"latents": latents, "condition": condition}
                callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)
                if condition is not None and "condition" in callback_outputs:
                    condition = callback_outputs.pop("condition").to(device=device, dtype=dtype)
            if i in snapshot_steps:
                snapshots.append(latents.clone())
        if not torch.isfinite(latents).all():
            settings = {k: v for k, v in scheduler.config.items() if k != "trained_betas" and not k.startswith("_")}
            raise ValueError(
                f"{type(scheduler).__name__} ({num_inference_steps} steps) produced NaN or infinite values on this "
                f"model's schedule; try another scheduler or other settings (its settings: {settings})"
            )
        return latents, snapshots

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the pipeline with Diffusers' `save_pretrained`, in the SR3 folder layout (see the module docstring).

        The pipeline is written in a hidden staging folder inside `save_directory` first (`.sr3-save-*`), then
        moved into place (`staged_save`): a save that fails or is killed while writing leaves the previous pipeline
        intact (its staging folder is removed by the next save), and one killed while moving is finished by
        `diffusers_sr3.finish_interrupted_save(save_directory)` (a load refuses the folder until then, naming it) or
        the next save of the folder. Other files already in `save_directory` (checkpoints, logs) are kept.
        `safe_serialization`, `variant` and `max_shard_size` are Diffusers' own. With `push_to_hub=True` the
        files just saved are also uploaded (`repo_id`, defaulting to the folder's name, `token`, `private`,
        `commit_message`, `create_pr`) with the folder's model card (`README.md`, e.g. the one training wrote, and
        the pictures it shows), or an SR3 card written there when neither the folder nor the repo has one; never
        the other files of `save_directory`. The save moves into place before the upload, which sends it from a
        hidden folder of its own (`staged_save`); the local save is kept however the upload ends, and a failed upload
        raises `training.hub.HubUploadError` saying so.
        """
        save_directory = os.fspath(save_directory)
        # Inside `use_backend` / `swap_unet` the step networks are stand-ins (ONNX sessions, autocast wrappers) that
        # Diffusers would record as missing components, writing a folder that cannot be loaded.
        stand_ins_now = {
            name: type(network).__name__
            for name, network in step_networks(self).items()
            # A torch.compile'd model is saved unwrapped by Diffusers; a backend's stand-in is not a model at all.
            if not isinstance(getattr(network, "_orig_mod", network), ModelMixin)
        }
        if stand_ins_now:
            raise ValueError(
                f"cannot save while {', '.join(stand_ins_now)} runs as {', '.join(stand_ins_now.values())}: save the "
                "pipeline outside the use_backend / swap_unet block"
            )
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "commit_message", "create_pr")
            if key in kwargs
        }

        def write(staging: str) -> None:
            super(SR3BasePipeline, self).save_pretrained(
                staging,
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                **kwargs,
            )
            write_remote_code_layout(staging)
            write_truthful_configs(staging)

        upload = None
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))

            def upload(staging: str, saved: List[str]) -> None:
                try:
                    self._upload(staging, saved, repo_id, card_folder=save_directory, **hub_kwargs)
                except Exception as error:
                    raise saved_not_uploaded(error, repo_id, save_directory) from error

        staged_save(save_directory, write, upload)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        subfolder: Optional[str] = None,
    ) -> Any:
        """Upload the pipeline to the Hub repo `repo_id` (created if needed), as Diffusers' `push_to_hub` does, in the
        SR3 folder layout (into `subfolder` of the repo, if given); a repo without a model card gets an SR3 card
        saying what the model is and how to load it (Diffusers would write an empty template). Returns the commit's
        `CommitInfo` (a `str`: its URL)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._upload(
                folder,
                _files_under(folder),
                repo_id,
                commit_message,
                private,
                token=token,
                create_pr=create_pr,
                subfolder=subfolder,
            )

    def _upload(
        self,
        folder: str,
        files: List[str],
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        subfolder: Optional[str] = None,
        card_folder: Optional[str] = None,
    ) -> Any:
        """Upload `files` of the saved `folder` and, at the repo's top, the model card of `card_folder` (default:
        `folder`; written first when neither it nor the repo has one; a card `write_model_card` wrote under another
        name, e.g. at training time, names the repo in the uploaded copy: `model_card.card_for_repo`; none where a card
        this package wrote would replace the repo's card that its author wrote or edited, as
        `model_card.local_card_withheld` tells and logs); the same commit deletes the repo's files that these replace
        (`stale_hub_files`). Return the `CommitInfo`."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

        from ..model_card import card_uploads, local_card_withheld, write_pipeline_card

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        uploads: Dict[str, Union[str, bytes]] = {name: os.path.join(folder, name) for name in files}
        card_folder = folder if card_folder is None else card_folder
        # A pipeline pushed into a subfolder is part of a repo whose card describes the whole; a card its author
        # wrote or edited on the Hub is never replaced by one this package wrote (a card the user wrote goes up).
        if not subfolder:
            card = os.path.join(card_folder, "README.md")
            if not os.path.isfile(card) and not api.file_exists(repo_id, "README.md"):
                write_pipeline_card(card_folder, self, repo_id)
            if os.path.isfile(card) and not local_card_withheld(api, repo_id, card_folder, create_pr):
                uploads.update(card_uploads(card_folder, repo_id))
        # One commit of the listed files (an uploaded card may differ from the local one, which upload_folder
        # cannot send), never the folder's other files, removing what of the repo's earlier save they replace.
        stale = stale_hub_files(api, repo_id, files, folder, subfolder or "")
        return api.create_commit(
            repo_id=repo_id,
            operations=[CommitOperationDelete(path_in_repo=path) for path in stale]
            + [
                CommitOperationAdd(
                    path_in_repo=f"{subfolder.strip('/')}/{name}" if subfolder else name, path_or_fileobj=source
                )
                for name, source in sorted(uploads.items())
            ],
            commit_message=commit_message or f"Upload {type(self).__name__}",
            create_pr=create_pr,
        )

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """Download a pipeline repo and return its local folder: its configs and, per component, the weights of
        `variant` where it has them (else the main ones), as safetensors (`.bin` with `use_safetensors=False`); no
        code, and no other variant's or format's weights. Its model_index.json comes first: a repo of a pipeline that
        `cls` does not load is refused before any weights are fetched.

        Offline (`local_files_only`, `HF_HUB_OFFLINE`), and as Diffusers' loader where the Hub does not list the repo
        (unreachable, or refusing), the cached copy is used, the files chosen from the listing cached with it.

        Raises:
            FileNotFoundError: the repo is not cached and cannot be downloaded, its cached copy lacks files this load
                needs, or it has no model_index.json.
            ValueError: it holds a pipeline that `cls` does not load.
        """
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        name = pretrained_model_name
        download_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
            if kwargs.get(key) is not None
        }
        if "proxies" in download_kwargs and "proxies" not in inspect.signature(snapshot_download).parameters:
            import huggingface_hub

            raise ValueError(
                f"huggingface_hub {huggingface_hub.__version__} takes no `proxies`: set the HTTPS_PROXY (or "
                "HTTP_PROXY) environment variable instead"
            )
        pickles = kwargs.get("use_safetensors") is False
        variant, revision = kwargs.get("variant"), kwargs.get("revision")
        listed, listing_error = None, None
        if not (download_kwargs.get("local_files_only") or constants.HF_HUB_OFFLINE):
            try:
                listed = HfApi(token=kwargs.get("token")).list_repo_files(name, revision=revision)
            # Whatever the error: huggingface_hub's transport errors (httpx2's) are neither OSError nor httpx's.
            except Exception as error:
                # No further requests either: each would retry for ~20 s before giving up.
                listing_error = error
                download_kwargs["local_files_only"] = True
        if listed is None:
            listed = _cached_listing(name, revision, kwargs.get("cache_dir"))
        if listed is None:
            patterns = WEIGHT_PATTERNS + (PICKLE_WEIGHT_PATTERNS if pickles else [])
        elif "model_index.json" not in listed:
            raise FileNotFoundError(f"Hub repo {name} is not a pipeline: it has no model_index.json")
        else:
            # Exact files, offline too: huggingface_hub refuses a cached copy that lacks any listed file a pattern
            # matches, such as another variant's weights that were never downloaded.
            patterns = [glob.escape(file) for file in files_to_download(listed, variant, pickles)]
        try:
            with open(hf_hub_download(name, "model_index.json", **download_kwargs), encoding="utf-8") as handle:
                index = json.load(handle)
            pipeline_class = _saved_pipeline_class(cls, name, index)
            # Before any weights: the download would fetch none of theirs, and the load fail on a missing file.
            if listed is not None:

                def read_json(path: str) -> Any:
                    if path not in listed:
                        return None
                    with open(hf_hub_download(name, path, **download_kwargs), encoding="utf-8") as handle:
                        return json.load(handle)

                loaded = set(format_checked_folders(name, index, kwargs, read_json))
                pickled = [] if pickles else [f for f in pickle_only_folders(listed, variant) if f in loaded]
                if pickled:
                    raise pickled_weights_error(pipeline_class, name, pickled, local=False)
                for folder, variants in variant_only_folders(listed, variant).items():
                    if folder in loaded:
                        raise VariantOnlyError(f"{name}/{folder}", variants)
            return snapshot_download(name, allow_patterns=patterns, **download_kwargs)
        except LocalEntryNotFoundError as error:
            reason = "offline" if constants.HF_HUB_OFFLINE else "local_files_only=True"
            if listing_error is not None:
                first_line = (str(listing_error).strip().splitlines() or [""])[0]
                reason = f"listing it on the Hub failed: {type(listing_error).__name__}: {first_line}"
            snapshot = getattr(error, "snapshot_path", None)  # set by huggingface_hub's IncompleteSnapshotError
            if snapshot is None:
                raise FileNotFoundError(
                    f"{name} is not a local folder, and Hub repo {name} is not cached ({reason})"
                ) from error
            missing = [
                file
                for file in files_to_download(listed or [], variant, pickles)
                if not os.path.isfile(os.path.join(snapshot, file))
            ]
            raise FileNotFoundError(
                f"Hub repo {name} is cached without {', '.join(missing) or 'files this load needs'} ({reason}): load "
                "it once with these options while the Hub can be reached"
            ) from error

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any):
        """Load a pipeline saved by this package, from a folder or a Hub repo id, without running its code.

        Args:
            pretrained_model_name_or_path: a local folder, a Hub repo id, or `"sr3-photos-x4"`, the model that ships
                inside the package (unless a folder of that name is in the working directory).
            **kwargs: components to use instead of the saved ones (`unet=...`, `scheduler=...`), and Diffusers'
                loading options: `dtype` (or its older name `torch_dtype`; a dtype, or a dict by component name
                with a `"default"`), `variant` (each component's weights of that variant, its main ones where it
                has none; only those are downloaded; a component with neither, only other variants' weights, is
                refused with a `VariantOnlyError` naming them), `use_safetensors` (default True: safetensors only;
                False: `.bin` weights only, read with `weights_only=True`), `low_cpu_mem_usage` (True or None only:
                the UNets keep their noise-level embeddings in float32, which Diffusers loads only that way),
                `device_map`, `max_memory`, `offload_folder` (passed to every network's `from_pretrained`), and Hub
                options (`revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`).

        Returns:
            The pipeline, of class `cls`.
        """
        import diffusers

        source = resolve_packaged_name(os.fspath(pretrained_model_name_or_path))
        if os.path.exists(source) and not os.path.isdir(source):
            raise NotADirectoryError(
                f"{source} is a file, not a pipeline folder (an original SR3 checkpoint, `*_gen.pth`: convert it with "
                "`sr3 convert`)"
            )
        if not os.path.isdir(source):
            try:
                validate_repo_id(source)
            except HFValidationError:
                raise FileNotFoundError(f"{source}: no such folder (nor a Hub repo id)") from None
        # A load writes nothing, not even to finish an interrupted save: the folder may be read-only, a Hub cache's
        # snapshot, or being saved into by another process.
        folder = source if os.path.isdir(source) else cls.download(source, **kwargs)
        # A save into the folder waits for the load to end, and one moving into it now ends first (`folder_locked`).
        with folder_loading(folder, "model_index.json") if folder == source else contextlib.nullcontext():
            index_path = os.path.join(folder, "model_index.json")
            if not os.path.isfile(index_path):
                raise FileNotFoundError(
                    f"{source} is not a pipeline folder: it has no model_index.json"
                    + (unloadable_reason(folder, "model_index.json") if folder == source else "")
                )
            with open(index_path, encoding="utf-8") as handle:
                index = json.load(handle)
            pipeline_class = _saved_pipeline_class(cls, source, index)

            dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
            dtype = torch_dtype if dtype is None else dtype
            variant = kwargs.pop("variant", None)
            if variant is not None and not _holds_variant(folder, variant):
                raise ValueError(f"{source} holds no weights of variant {variant!r}")
            use_safetensors = kwargs.pop("use_safetensors", None)
            model_options = {key: kwargs.pop(key) for key in MODEL_LOADING_OPTIONS if key in kwargs}
            low_cpu_mem_usage = model_options.get("low_cpu_mem_usage")
            if low_cpu_mem_usage is not None and not low_cpu_mem_usage:
                # Diffusers' own refusal blames `keep_in_fp32_modules`, which the caller never passed.
                raise ValueError(
                    f"low_cpu_mem_usage={low_cpu_mem_usage!r} cannot load these UNets: they keep their noise-level "
                    "embeddings in float32 (_keep_in_fp32_modules), which Diffusers loads only with low_cpu_mem_usage "
                    "True or None"
                )
            loaded = set(format_checked_folders(source, index, kwargs, functools.partial(_local_json, folder)))
            files = _files_under(folder)
            if use_safetensors is None:
                pickled = [name for name in pickle_only_folders(files, variant) if name in loaded]
                if pickled:
                    raise pickled_weights_error(pipeline_class, source, pickled, local=folder == source)
            for name, variants in variant_only_folders(files, variant).items():
                if name in loaded:
                    raise VariantOnlyError(f"{source}/{name}", variants)
            expected, optional = pipeline_class._get_signature_keys(pipeline_class)
            unknown = sorted(set(index) - set(expected) - set(optional) - {FORMAT_KEY})
            unknown = [key for key in unknown if not key.startswith("_")]  # Diffusers' own records
            if unknown:
                # As Diffusers' loader warns. A key that would change what the model means comes with a newer format
                # (refused above); these keep their meaning when ignored, or were added by hand.
                logger.warning(
                    f"{source}/model_index.json holds {', '.join(unknown)}, which {pipeline_class.__name__} of "
                    f"diffusers-sr3 {__version__} does not take and ignores (keys of a newer version, or added by "
                    "hand)"
                )
            init_kwargs: Dict[str, Any] = {}
            for name in expected:
                if name in kwargs:
                    init_kwargs[name] = kwargs.pop(name)
                    continue
                entry = index.get(name)
                if not isinstance(entry, list) or entry[0] is None:
                    if name in pipeline_class._optional_components:
                        init_kwargs[name] = None
                        continue
                    raise ValueError(f"{source}/model_index.json does not name the component {name!r}")
                library, class_name = entry
                component_class = _classes().get(class_name)
                if component_class is None:
                    if library != "diffusers" or not hasattr(diffusers, class_name):
                        newer = _newer_class(class_name)
                        if newer:
                            raise ValueError(f"{source}: component {name!r} is {library}.{newer}")
                        raise ValueError(
                            f"{source}: component {name!r} is {library}.{class_name}, not a Diffusers or SR3 class"
                        )
                    component_class = getattr(diffusers, class_name)
                subfolder = os.path.join(folder, name)
                # As Diffusers: a component without the variant's weights loads its main ones.
                component_variant = variant if variant is not None and _holds_variant(subfolder, variant) else None
                # A dict names this pipeline's components (a cascade's: its stages, whose value may be a dict again).
                component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
                if issubclass(component_class, DiffusionPipeline):
                    if isinstance(dtype, dict) and name not in dtype:  # names the stages' own components, or "default"
                        component_dtype = dtype
                    init_kwargs[name] = component_class.from_pretrained(
                        subfolder,
                        dtype=component_dtype,
                        variant=component_variant,
                        use_safetensors=use_safetensors,
                        **model_options,
                    )
                elif issubclass(component_class, SchedulerMixin):
                    # Checked before Diffusers builds it: the constructor allocates num_train_timesteps entries.
                    scheduler_config = component_class.load_config(subfolder)
                    try:
                        check_trained_betas(scheduler_config)
                    except ValueError as error:
                        raise ValueError(f"{source}/{name}: {error}") from None
                    ignore_scheduler_warnings()
                    init_kwargs[name] = component_class.from_config(scheduler_config)
                else:
                    init_kwargs[name] = component_class.from_pretrained(
                        subfolder,
                        dtype=component_dtype,
                        variant=component_variant,
                        use_safetensors=True if use_safetensors is None else use_safetensors,
                        **model_options,
                    )
        for name in optional:
            if name in kwargs:
                init_kwargs[name] = kwargs.pop(name)
            elif name in index:
                init_kwargs[name] = index[name]
        unexpected = set(kwargs) - set(HUB_OPTIONS)
        if unexpected:
            raise TypeError(f"{pipeline_class.__name__}.from_pretrained got unexpected arguments {sorted(unexpected)}")
        pipeline = pipeline_class(**init_kwargs)
        pipeline.register_to_config(_name_or_path=source)
        return pipeline
