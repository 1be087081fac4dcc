"""Saves over an existing pipeline or UNet folder that are killed or run out of disk never lose the folder."""

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil

import diffusers.models.modeling_utils
import pytest
import torch
from conftest import tiny_unet_config
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, finish_interrupted_save, make_scheduler
from diffusers_sr3.pipelines.base import STAGED_LISTING, STAGING_LOCK, STAGING_PREFIX, UnsafeStagingError


class Killed(BaseException):
    """SIGKILL, simulated: not an Exception, so that no handler of the save catches it."""


def contents(folder):
    """Every file below `folder` by relative path, with a hash of its bytes, but those of staging folders."""
    files = {}
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(STAGING_PREFIX)]
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                files[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(handle.read()).hexdigest()
    return files


def tree(folder):
    """Everything below `folder`, staging folders included, with its `lstat` (any write changes it)."""
    entries = {}
    for root, folders, names in os.walk(folder):
        for name in folders + names:
            status = os.lstat(os.path.join(root, name))
            entries[os.path.relpath(os.path.join(root, name), folder)] = (
                status.st_mode,
                status.st_ino,
                status.st_size,
                status.st_mtime_ns,
            )
    return entries


def conv_in(model):
    return (model.unet if isinstance(model, SR3Pipeline) else model).conv_in.weight


@pytest.fixture(params=["pipeline", "unet"])
def kind(request):
    """What is saved (`new`, wider, over `old`) and how it loads, as a pipeline or as a UNet saved alone."""
    torch.manual_seed(0)
    old = SR3UNet2DModel(**tiny_unet_config())
    new = SR3UNet2DModel(**tiny_unet_config(block_out_channels=16))
    if request.param == "pipeline":
        schedule = make_scheduler("ddpm", n_timestep=100)
        return SR3Pipeline(old, schedule), SR3Pipeline(new, schedule), SR3Pipeline.from_pretrained
    return old, new, SR3UNet2DModel.from_pretrained


def index_of(folder):
    """The file that makes a saved folder loadable: a pipeline's index, or a UNet's config."""
    return "model_index.json" if (folder / "model_index.json").exists() else "config.json"


class KillAfter:
    """Within the block, the `kills`-th file-system change (rename, removal) and every later one raise `Killed`, so
    that nothing of the save after that point runs (its cleanup included), as if the process were killed there."""

    PATCHED = [(os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]

    def __init__(self, kills=None):
        self.kills, self.count, self.completed_at = kills, 0, None

    def __enter__(self):
        self.originals = [(module, name, getattr(module, name)) for module, name in self.PATCHED]
        for module, name, original in self.originals:
            setattr(module, name, self._counted(original))
        return self

    def __exit__(self, *exc_info):
        for module, name, original in self.originals:
            setattr(module, name, original)
        return exc_info[0] is Killed

    def _counted(self, original):
        def change(*args, **kwargs):
            if self.kills is not None and self.count >= self.kills:
                raise Killed
            if original is self.originals[0][2] and os.path.basename(args[1]) == STAGED_LISTING:
                self.completed_at = self.count  # the last one is the save's own, after its components'
            self.count += 1
            return original(*args, **kwargs)

        return change


@pytest.mark.parametrize("phase", ["writing", "moving"])
def test_a_save_killed_at_any_point_loses_neither_pipeline(tmp_path, kind, phase, caplog):
    old, new, load = kind
    template, expected = tmp_path / "old", tmp_path / "expected"
    old.save_pretrained(template)
    new.save_pretrained(expected)
    shutil.copytree(template, tmp_path / "count")
    with KillAfter() as uninterrupted:
        new.save_pretrained(tmp_path / "count")
    assert uninterrupted.completed_at is not None
    finished = 0
    writing = range(uninterrupted.completed_at + 1)  # the last of these completes the staging folder
    for kills in writing if phase == "writing" else range(writing.stop, uninterrupted.count):
        folder = tmp_path / str(kills)
        shutil.copytree(template, folder)
        with KillAfter(kills):
            new.save_pretrained(folder)
        before = tree(folder)
        if (folder / index_of(template)).exists():
            # The previous save, untouched, or the new one, wholly moved (its staging folder not yet removed).
            assert contents(folder) in (contents(template), contents(expected)), kills
            completed = contents(folder) == contents(expected)
            torch.testing.assert_close(conv_in(load(folder)), conv_in(new if completed else old))
            assert finish_interrupted_save(folder) == []  # a complete save beside its index: nothing to finish
            assert tree(folder) == before
        else:
            # Cut short within the moves: refused, never a mix, until the one call that finishes it.
            with pytest.raises(
                FileNotFoundError,
                match=r"interrupted while moving \.sr3-save-.*\.finish_interrupted_save\(",
            ):
                load(folder)
            assert tree(folder) == before  # the load wrote nothing
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="diffusers_sr3.pipelines.base"):
                assert len(finish_interrupted_save(folder)) == 1
            assert "finishing the save that was interrupted" in caplog.text
            assert contents(folder) == contents(expected)
            torch.testing.assert_close(conv_in(load(folder)), conv_in(new))
            finished += 1
        # The next save drops what is left of an incomplete one, and leaves the folder as a save from scratch does.
        new.save_pretrained(folder)
        assert contents(folder) == contents(expected)
    assert phase == "writing" or finished > 2  # kills fell between the index's removal and the new one's move


def test_the_next_save_finishes_a_killed_saves_moves_first(tmp_path, kind):
    old, new, load = kind
    old.save_pretrained(tmp_path / "expected")
    with KillAfter() as uninterrupted:
        new.save_pretrained(tmp_path / "count")
    for kills in range(uninterrupted.count - 4, uninterrupted.count):  # within the moves
        folder = tmp_path / str(kills)
        old.save_pretrained(folder)
        with KillAfter(kills):
            new.save_pretrained(folder)
        assert any(path.name.startswith(STAGING_PREFIX) for path in folder.iterdir())
        old.save_pretrained(folder)
        torch.testing.assert_close(conv_in(load(folder)), conv_in(old))
        assert contents(folder) == contents(tmp_path / "expected")


def test_a_load_of_a_folder_with_only_a_killed_saves_staging_names_it(tmp_path, kind):
    _, new, load = kind
    with KillAfter(0):  # killed while writing a first save: the folder holds its staging folder only
        new.save_pretrained(tmp_path / "new")
    (staged,) = (tmp_path / "new").iterdir()
    assert staged.name.startswith(STAGING_PREFIX)
    # Named as given, without a trailing separator.
    folder = re.escape(str(tmp_path / "new"))
    with pytest.raises(FileNotFoundError, match=f"^{folder} is not .*has no .*json \\(only {staged.name}, a save that"):
        load(tmp_path / "new")


def test_a_full_disk_keeps_the_previous_folder_and_leaves_nothing_behind(tmp_path, kind, monkeypatch):
    old, new, load = kind
    old.save_pretrained(tmp_path)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "state.txt").write_text("keep me", encoding="utf-8")
    before = contents(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Diffusers writes the new config before the weights: the weights find the disk full.
    monkeypatch.setattr(diffusers.models.modeling_utils.safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert contents(tmp_path) == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(STAGING_PREFIX)]
    torch.testing.assert_close(conv_in(load(tmp_path)), conv_in(old))


def test_a_unet_pushed_from_its_save_is_named_after_its_folder(tmp_path, tiny_unet, hub):  # noqa: F811
    from hub_server import LOOPBACK_USER

    tiny_unet.save_pretrained(tmp_path / "my-unet", push_to_hub=True)
    uploaded = hub.repos[f"{LOOPBACK_USER}/my-unet"]  # the folder's name, not its staging folder's
    assert {"config.json", "diffusion_pytorch_model.safetensors", "unet_sr3.py"} <= set(uploaded)
    assert sorted(path.name for path in (tmp_path / "my-unet").iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "unet_sr3.py",
    ]


def stage(folder, name, files, listing):
    """A staging folder `name` in `folder` holding `files` (path -> bytes) and, unless None, `listing` (raw text)."""
    staging = folder / name
    staging.mkdir()
    for path, data in files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(data)
    if listing is not None:
        (staging / STAGED_LISTING).write_text(listing, encoding="utf-8")
    return staging


@pytest.mark.parametrize("craft", ["linked folder", "linked file", "parent path", "absolute path", "unlisted file"])
def test_a_crafted_staging_folder_never_moves_anything(tmp_path, kind, craft):
    old, _, load = kind
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "config.json").write_text("{}", encoding="utf-8")
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    index = index_of(folder)
    listed = {
        "linked folder": [index, "sub/config.json"],
        "linked file": [index, "weights.bin"],
        "parent path": [index, "../elsewhere/config.json"],
        "absolute path": [index, str(victim / "config.json")],
        "unlisted file": [index],
    }[craft]
    staging = stage(folder, ".sr3-save-x", {index: b"{}", "extra.txt": b""} if craft == "unlisted file" else {}, "")
    (staging / STAGED_LISTING).write_text(json.dumps(listed), encoding="utf-8")
    if craft == "linked folder":
        (staging / "sub").symlink_to(victim)
    elif craft == "linked file":
        (staging / "weights.bin").symlink_to(victim / "config.json")
    # Beside its index the folder loads as it is, and the crafted folder is left alone.
    before, outside = tree(folder), tree(victim)
    load(folder)
    assert finish_interrupted_save(folder) == []
    assert tree(folder) == before
    # Without it, finishing refuses, moving nothing in or out.
    os.remove(folder / index)
    before = tree(folder)
    with pytest.raises(UnsafeStagingError, match=r"\.sr3-save-x"):
        finish_interrupted_save(folder)
    assert tree(folder) == before and tree(victim) == outside


def test_a_staging_folder_that_is_a_link_is_refused(tmp_path, kind):
    old, _, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    outside = stage(tmp_path, "outside", {"config.json": b"{}"}, json.dumps(["config.json"]))
    (folder / ".sr3-save-x").symlink_to(outside)
    os.remove(folder / index_of(folder))
    with pytest.raises(UnsafeStagingError, match="not a folder"):
        finish_interrupted_save(folder)
    with pytest.raises(UnsafeStagingError, match="not a folder"):
        old.save_pretrained(folder)
    assert sorted(os.listdir(outside)) == [STAGED_LISTING, "config.json"]


def test_a_stale_staging_folder_beside_a_newer_folder_is_never_rolled_forward(tmp_path, kind):
    old, new, load = kind
    folder, stale = tmp_path / "model", tmp_path / "stale"
    new.save_pretrained(stale)
    old.save_pretrained(folder)
    # An old crash left `stale` complete beside the folder; a newer save was then copied in by other means (rsync).
    shutil.copytree(stale, folder / ".sr3-save-old")
    (folder / ".sr3-save-old" / STAGED_LISTING).write_text(json.dumps(sorted(contents(stale))), encoding="utf-8")
    before = tree(folder)
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))
    assert finish_interrupted_save(folder) == []
    assert tree(folder) == before
    # The next save discards it instead.
    old.save_pretrained(folder)
    assert not (folder / ".sr3-save-old").exists()
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))


def test_a_staging_folder_whose_save_is_alive_is_left_to_it(tmp_path, kind):
    old, new, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    index = index_of(folder)
    # Another process's save (Diffusers' `is_main_process=False` ranks save alongside): still writing, or moving.
    writing = stage(folder, ".sr3-save-writing", {"partial.bin": b"..."}, None)
    moving = stage(folder, ".sr3-save-moving", {index: (folder / index).read_bytes()}, json.dumps([index]))
    held = []
    for staging in (writing, moving):
        descriptor = os.open(staging / STAGING_LOCK, os.O_RDWR | os.O_CREAT)
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # its own open file description: held against this process's too
        held.append(descriptor)
    try:
        new.save_pretrained(folder)
        assert writing.exists() and moving.exists()
        torch.testing.assert_close(conv_in(load(folder)), conv_in(new))
        os.remove(folder / index)  # mid-move
        assert finish_interrupted_save(folder) == []
        with pytest.raises(FileNotFoundError, match=r"a save is moving \.sr3-save-moving into place"):
            load(folder)
    finally:
        for descriptor in held:
            os.close(descriptor)
    # Its process ended: the moving save is finished, and the unfinished one discarded by the next save.
    assert finish_interrupted_save(folder) == [".sr3-save-moving"]
    assert writing.exists()
    old.save_pretrained(folder)
    assert not [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))


@pytest.mark.parametrize("listing", ["{", '{"a": 1}', "[1]", "\xff"])
def test_a_malformed_listing_is_an_unfinished_save(tmp_path, kind, listing):
    old, _, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    stage(folder, ".sr3-save-y", {}, None)
    (folder / ".sr3-save-y" / STAGED_LISTING).write_bytes(listing.encode("latin-1"))
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))
    assert finish_interrupted_save(folder) == []
    index = index_of(folder)
    os.rename(folder / index, tmp_path / index)
    with pytest.raises(FileNotFoundError, match=r"only \.sr3-save-y, a save that stopped before it was complete"):
        load(folder)
    os.rename(tmp_path / index, folder / index)
    old.save_pretrained(folder)  # discards it
    assert not (folder / ".sr3-save-y").exists()


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_a_filesystem_without_locks_saves_loads_and_finishes_as_without_fcntl(tmp_path, kind, monkeypatch, code):
    old, new, load = kind
    folder = tmp_path / "model"

    def no_locks(descriptor, operation):  # NFS mounted nolock, some FUSE and CIFS mounts
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = open_descriptors()
    old.save_pretrained(folder)
    assert not [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
    index = index_of(folder)
    stage(folder, ".sr3-save-x", {index: (folder / index).read_bytes()}, json.dumps([index]))
    (folder / ".sr3-save-x" / STAGING_LOCK).touch()
    os.remove(folder / index)
    with pytest.raises(FileNotFoundError, match=r"interrupted while moving \.sr3-save-x .*finish_interrupted_save\("):
        load(folder)
    assert finish_interrupted_save(folder) == [".sr3-save-x"]
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))
    new.save_pretrained(folder)
    torch.testing.assert_close(conv_in(load(folder)), conv_in(new))
    assert open_descriptors() == before


def test_a_subfolder_swapped_for_a_link_while_moving_moves_nothing_from_outside(tmp_path, monkeypatch):
    folder, victim = tmp_path / "model", tmp_path / "victim"
    (folder / "unet").mkdir(parents=True)
    victim.mkdir()
    (victim / "secret.txt").write_text("outside", encoding="utf-8")
    staging = stage(
        folder, ".sr3-save-x", {"config.json": b"{}", "unet/a.json": b"{}"}, '["config.json", "unet/a.json"]'
    )
    real_listdir, swapped = os.listdir, []

    def listdir(path=None):
        # Another process swaps the checked `unet` for a link just before the move lists it (by path or descriptor).
        unet = staging / "unet"
        if not swapped and not unet.is_symlink() and unet.is_dir():
            if path == str(unet) or isinstance(path, int) and os.path.samestat(os.fstat(path), os.lstat(unet)):
                swapped.append(path)
                shutil.rmtree(unet)
                unet.symlink_to(victim)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    finish_interrupted_save(folder)
    monkeypatch.undo()
    assert swapped
    assert os.listdir(victim) == ["secret.txt"] and "secret.txt" not in os.listdir(folder / "unet")


def test_a_lock_file_that_is_a_link_is_refused_naming_its_folder(tmp_path, kind):
    old, new, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    stage(folder, ".sr3-save-x", {}, None)
    (folder / ".sr3-save-x" / STAGING_LOCK).symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafeStagingError, match=r"\.sr3-save\.lock is a link: remove .*\.sr3-save-x"):
        new.save_pretrained(folder)
    assert not (tmp_path / "nowhere").exists()
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))


@pytest.mark.parametrize("fifo", [STAGED_LISTING, STAGING_LOCK])
def test_a_listing_or_lock_file_that_is_a_fifo_never_blocks(tmp_path, kind, fifo):
    old, new, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    index = index_of(folder)
    stage(folder, ".sr3-save-f", {index: (folder / index).read_bytes()}, json.dumps([index]))
    (folder / ".sr3-save-f" / fifo).unlink(missing_ok=True)
    os.mkfifo(folder / ".sr3-save-f" / fifo)
    os.remove(folder / index)
    # A FIFO listing is an unfinished save; a FIFO lock file is no save's, refused when finishing it.
    reason = "a save that stopped before" if fifo == STAGED_LISTING else "finish_interrupted_save"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(folder))} is not .*{reason}"):
        load(folder)
    if fifo == STAGING_LOCK:
        with pytest.raises(UnsafeStagingError, match=r"\.sr3-save\.lock is not a file: remove .*\.sr3-save-f"):
            finish_interrupted_save(folder)
    else:
        assert finish_interrupted_save(folder) == []
        new.save_pretrained(folder)  # discards it
        torch.testing.assert_close(conv_in(load(folder)), conv_in(new))


def test_a_failed_push_keeps_the_new_save_and_says_only_the_upload_failed(tmp_path, kind, hub):  # noqa: F811
    """A UNet's save whose upload failed kept the previous UNet (a pipeline's kept the new one), and both raised the
    Hub's error alone. Both keep the new save now, and the error says that only the upload failed."""
    from diffusers_sr3.training.hub import HubUploadError

    old, new, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    hub.fail_commits = 403  # a token without write access (not retried, unlike 5xx answers)
    with pytest.raises(HubUploadError) as failed:
        new.save_pretrained(folder, push_to_hub=True, repo_id="someone/failing")
    message = str(failed.value)
    assert message.startswith(f"upload to {hub.url}/someone/failing failed (HfHubHTTPError: 403 Forbidden")
    assert message.endswith(
        f"the save in {folder} is complete, only its upload failed: save with push_to_hub=True again to retry"
    )
    torch.testing.assert_close(conv_in(load(folder)), conv_in(new))
    assert not [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
    assert hub.repos["someone/failing"] == {}


def test_a_push_uploads_its_own_save_whatever_moves_into_the_folder_meanwhile(
    tmp_path,
    kind,
    hub,  # noqa: F811
    monkeypatch,
):
    """The upload sends the save from a folder of its own, which no other save touches: another save moving into the
    folder while it uploads (here, as the commit starts) changes nothing it sends, and no save's lock or listing goes
    up with it."""
    from huggingface_hub import HfApi

    old, new, load = kind
    folder = tmp_path / "model"
    real_commit = HfApi.create_commit

    def commit_while_another_save_moves_in(api, *args, **kwargs):
        old.save_pretrained(folder)
        return real_commit(api, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", commit_while_another_save_moves_in)
    new.save_pretrained(folder, push_to_hub=True, repo_id="someone/pushed")
    monkeypatch.undo()
    uploaded = hub.repos["someone/pushed"]
    weights = "unet/diffusion_pytorch_model.safetensors" if index_of(folder) == "model_index.json" else ""
    weights = weights or "diffusion_pytorch_model.safetensors"
    new.save_pretrained(tmp_path / "alone")
    assert uploaded[weights] == (tmp_path / "alone" / weights).read_bytes()
    assert set(uploaded) == set(contents(tmp_path / "alone")) | {"README.md"}
    # The push's save moved into place before its upload, the other save over it after.
    torch.testing.assert_close(conv_in(load(folder)), conv_in(old))


def test_a_push_killed_while_it_uploads_keeps_the_new_save(tmp_path, kind, hub, monkeypatch):  # noqa: F811
    """The upload read the save from its staging folder, which moved into place only after it: a process killed
    during a long upload (SIGTERM, a restarted kernel) left the new save in a staging folder beside the previous
    save's index, which loads ignore and the next save discards. The save moves into place first now."""
    from huggingface_hub import HfApi

    old, new, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    killed = KillAfter(0)

    def killed_while_uploading(api, *args, **kwargs):
        killed.__enter__()  # nothing of the save runs after this
        raise Killed

    monkeypatch.setattr(HfApi, "create_commit", killed_while_uploading)
    try:
        with pytest.raises(Killed):
            new.save_pretrained(folder, push_to_hub=True, repo_id="someone/killed")
    finally:
        killed.__exit__(None, None, None)
    monkeypatch.undo()
    torch.testing.assert_close(conv_in(load(folder)), conv_in(new))
    assert finish_interrupted_save(folder) == []  # nothing to finish: the save is in place
    new.save_pretrained(folder)  # the next save removes what the killed one left
    assert not [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]


def test_a_push_where_files_cannot_be_linked_uploads_its_save_before_it_moves(tmp_path, kind, hub, monkeypatch):  # noqa: F811
    """Where the filesystem makes no hard links (FAT, some network filesystems), the upload reads the staging folder
    before the save moves into place: the same files go up, and the save is in place after."""
    old, new, load = kind
    folder = tmp_path / "model"
    old.save_pretrained(folder)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    new.save_pretrained(folder, push_to_hub=True, repo_id="someone/unlinked")
    monkeypatch.undo()
    new.save_pretrained(tmp_path / "alone")
    uploaded = hub.repos["someone/unlinked"]
    assert set(uploaded) == set(contents(tmp_path / "alone")) | {"README.md"}
    assert all(uploaded[path] == (tmp_path / "alone" / path).read_bytes() for path in contents(tmp_path / "alone"))
    torch.testing.assert_close(conv_in(load(folder)), conv_in(new))
    assert not [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
