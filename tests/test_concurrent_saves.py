"""Saves and loads of one folder at once, in threads or processes, never leave or load a mix of two saves."""

import errno
import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import tiny_unet_config

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.pipelines import base


def pipeline(value):
    """A pipeline whose UNet's weights are all `value` and whose schedule has 100 + `value` steps: a load of a mix of
    two such saves is told by the two numbers disagreeing."""
    unet = SR3UNet2DModel(**tiny_unet_config()).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.fill_(float(value))
    return SR3Pipeline(unet, make_scheduler("ddpm", n_timestep=100 + value), upscale_factor=4)


def saved_value(loaded):
    """The `value` of the save `loaded` came from; fails on a mix."""
    weight = next(loaded.unet.parameters()).flatten()[0].item()
    assert weight == loaded.scheduler.config.num_train_timesteps - 100, "a mix of two saves"
    return weight


def waiting_or_done(folder, thread):
    """Wait (at most 5 s) until `thread` ends or waits for `folder`'s lock beside this thread's hold."""
    key = (os.stat(folder).st_dev, os.stat(folder).st_ino)
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        entry = getattr(base, "_FOLDER_LOCKS", {}).get(key)
        if entry is not None and entry.users == 2:
            return
        thread.join(0.001)


@pytest.fixture(params=["locks", "no locks"])
def locking(request, monkeypatch):
    if request.param == "no locks":  # NFS mounted nolock: this process's threads still take turns

        def no_locks(descriptor, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        monkeypatch.setattr(fcntl, "flock", no_locks)
    return request.param


def test_two_saves_moving_at_once_leave_one_saves_files(tmp_path, monkeypatch, locking):
    folder = tmp_path / "model"
    pipeline(0).save_pretrained(folder)
    files = sorted(os.listdir(folder))
    other = threading.Thread(target=pipeline(2).save_pretrained, args=(folder,))
    replace = os.replace

    def replace_then_let_the_other_save_run(source, destination, **kwargs):
        replace(source, destination, **kwargs)
        # The first save has moved its scheduler, not yet its UNet nor its index: the other save runs now.
        if destination == os.path.join(folder, "scheduler", "scheduler_config.json") and other.ident is None:
            other.start()
            waiting_or_done(folder, other)

    monkeypatch.setattr(os, "replace", replace_then_let_the_other_save_run)
    pipeline(1).save_pretrained(folder)
    other.join()
    assert other.ident is not None
    assert saved_value(SR3Pipeline.from_pretrained(folder)) == 2
    assert sorted(os.listdir(folder)) == files  # nothing new in the folder, no staging folder left


def test_a_load_never_mixes_a_save_made_while_it_loads(tmp_path, monkeypatch, locking):
    folder = tmp_path / "model"
    pipeline(1).save_pretrained(folder)
    saving = threading.Thread(target=pipeline(2).save_pretrained, args=(folder,))
    load_unet = SR3UNet2DModel.from_pretrained

    def save_then_load_unet(*args, **kwargs):  # the scheduler is loaded already
        if saving.ident is None:
            saving.start()
            waiting_or_done(folder, saving)
        return load_unet(*args, **kwargs)

    monkeypatch.setattr(SR3UNet2DModel, "from_pretrained", save_then_load_unet)
    try:
        assert saved_value(SR3Pipeline.from_pretrained(folder)) == 1  # the save waited for the load
    except OSError as error:  # or the load saw the save and refused
        assert "changed while it loaded: a save is moving into it: load it once the save ends" in str(error)
    saving.join()
    assert saved_value(SR3Pipeline.from_pretrained(folder)) == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_load_refuses_a_folder_saved_into_while_it_loads_even_unlocked(tmp_path, monkeypatch, locking):
    # The same thread saves (the lock is re-entrant, so it goes ahead): what a save on another host without locks
    # does. The index's change tells the load.
    folder = tmp_path / "model"
    pipeline(1).save_pretrained(folder)
    before = len(os.listdir("/proc/self/fd"))
    load_unet = SR3UNet2DModel.from_pretrained

    def save_then_load_unet(*args, **kwargs):  # the scheduler is loaded already
        pipeline(2).save_pretrained(folder)
        return load_unet(*args, **kwargs)

    monkeypatch.setattr(SR3UNet2DModel, "from_pretrained", save_then_load_unet)
    with pytest.raises(OSError, match=r"model changed while it loaded: a save is moving into it: load it once"):
        SR3Pipeline.from_pretrained(folder)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before
    assert saved_value(SR3Pipeline.from_pretrained(folder)) == 2


@pytest.mark.parametrize("what", ["save", "load"])
def test_another_process_holding_the_folder_makes_a_save_or_load_wait(tmp_path, what):
    folder = tmp_path / "model"
    pipeline(1).save_pretrained(folder)
    index = (folder / "model_index.json").read_bytes()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(folder),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    loaded = []
    if what == "save":
        waiting = threading.Thread(target=pipeline(2).save_pretrained, args=(folder,))
    else:
        waiting = threading.Thread(target=lambda: loaded.append(SR3Pipeline.from_pretrained(folder)))
    try:
        assert holder.stdout.readline() == "locked\n"
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()
        assert (folder / "model_index.json").read_bytes() == index
    finally:
        holder.communicate("")
        waiting.join()
    assert saved_value(loaded[0] if loaded else SR3Pipeline.from_pretrained(folder)) == (2 if what == "save" else 1)


def test_a_unet_load_holds_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "unet"
    SR3UNet2DModel(**tiny_unet_config()).save_pretrained(folder)
    load = base.folder_loading
    held = []

    def recorded(where, index):
        held.append((os.fspath(where), index))
        return load(where, index)

    monkeypatch.setattr(base, "folder_loading", recorded)
    SR3UNet2DModel.from_pretrained(folder)
    assert held == [(os.fspath(folder), "config.json")]


def test_a_move_whose_replaced_index_another_save_removed_first_goes_on(tmp_path, monkeypatch):
    # Where locks do not hold, another save's move may remove the index between a check of it and its removal.
    staging, target = tmp_path / "staging", tmp_path / "target"
    staging.mkdir()
    target.mkdir()
    (staging / "model_index.json").write_text("{}", encoding="utf-8")
    isfile = os.path.isfile
    monkeypatch.setattr(
        os.path, "isfile", lambda path: path == os.path.join(target, "model_index.json") or isfile(path)
    )
    base._move_into(str(staging), str(target), ["model_index.json"])
    assert (target / "model_index.json").read_text(encoding="utf-8") == "{}"


def test_a_folder_that_can_be_entered_but_not_listed_still_loads(tmp_path, monkeypatch):
    """Mode 711 (shared model folders, read by others): the folder cannot be opened to lock, as it could not be
    listed; its loads go on as before locks came, the UNet's subfolder too."""
    folder = tmp_path / "enter-only"
    pipeline(1).save_pretrained(folder)
    real_open = os.open

    def unreadable(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECTORY", 0) and os.path.realpath(path).startswith(str(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", unreadable)
    assert saved_value(SR3Pipeline.from_pretrained(folder)) == 1
    SR3UNet2DModel.from_pretrained(folder, subfolder="unet")
