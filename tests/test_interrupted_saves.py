"""Saves over an existing pipeline or UNet folder that are killed or run out of disk never lose the folder."""

import errno
import hashlib
import logging
import os
import shutil

import diffusers.models.modeling_utils
import pytest
import torch
from conftest import tiny_unet_config
from test_hub import hub  # noqa: F401  (the loopback Hub fixture)

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.pipelines.base import STAGED_LISTING, STAGING_PREFIX


class Killed(BaseException):
    """SIGKILL, simulated: not an Exception, so that no handler of the save catches it."""


def contents(folder):
    """Every file below `folder` by relative path, with a hash of its bytes."""
    return {
        os.path.relpath(os.path.join(root, name), folder): hashlib.sha256(
            open(os.path.join(root, name), "rb").read()
        ).hexdigest()
        for root, _, names in os.walk(folder)
        for name in names
    }


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
        staged = [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
        unmoved = any((path / STAGED_LISTING).exists() for path in staged)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusers_sr3.pipelines.base"):
            loaded = load(folder)
        # A save whose staging folder is complete is the new one from then on: the load finishes its moves.
        completed = kills > uninterrupted.completed_at
        torch.testing.assert_close(conv_in(loaded), conv_in(new if completed else old))
        assert ("finishing the save that was interrupted" in caplog.text) == unmoved
        if completed:
            finished += unmoved
            assert contents(folder) == contents(expected)
        # The next save drops what is left of an incomplete one, and leaves the folder as a save from scratch does.
        new.save_pretrained(folder)
        assert contents(folder) == contents(expected)
    assert phase == "writing" or finished > 2  # kills fell between the staging folder's completion and its removal


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
    with pytest.raises(FileNotFoundError, match=f"has no .*json \\(only {staged.name}, a save that stopped before"):
        load(tmp_path / "new")


def test_a_full_disk_keeps_the_previous_folder_and_leaves_nothing_behind(tmp_path, kind, monkeypatch):
    old, new, load = kind
    old.save_pretrained(tmp_path)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "state.txt").write_text("keep me")
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
