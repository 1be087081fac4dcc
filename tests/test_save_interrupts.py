"""An interrupt during save_pretrained's final moves never leaves a folder that loads a mix of two saves."""

import os
import signal

import pytest
import torch
from conftest import FIXTURES

import diffusers_sr3.pipelines.base as base
from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.convert import convert_original_checkpoint
from diffusers_sr3.interrupts import Terminated, sigterm_as_interrupt


@pytest.fixture(scope="module")
def pipelines():
    """The converted tiny pipeline, and another (its weights moved) that an older save holds."""
    new = convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", FIXTURES / "sr3_tiny_config.json")
    old = convert_original_checkpoint(FIXTURES / "sr3_tiny_I10_E1_gen.pth", FIXTURES / "sr3_tiny_config.json")
    with torch.no_grad():
        for parameter in old.unet.parameters():
            parameter.add_(1.0)
    old.scheduler.register_to_config(beta_start=0.0005)
    return new, old


def _replaces(monkeypatch, at, action):
    """Make base.py's n-th `os.replace` run `action` first (n = `at`); returns the list of calls made."""
    real, calls = os.replace, []

    def replace(source, destination, **kwargs):
        calls.append(destination)
        if len(calls) == at:
            action()
        return real(source, destination, **kwargs)

    monkeypatch.setattr(base.os, "replace", replace)
    return calls


def _first_weight(pipeline):
    return pipeline.unet.conv_in.weight.flatten()[0].item()


def _saved_form(pipeline):
    return _first_weight(pipeline), pipeline.scheduler.config.beta_start


def _interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("replacing", [False, True])
def test_a_save_cut_short_between_moves_leaves_no_loadable_mix(tmp_path, monkeypatch, pipelines, replacing):
    new, old = pipelines
    calls = _replaces(monkeypatch, 0, _interrupt)
    new.save_pretrained(tmp_path / "count")
    moves = len(calls)
    assert calls[-1].endswith("model_index.json")
    monkeypatch.undo()
    old.save_pretrained(tmp_path / "old")
    # As saved: a scheduler's config states its trained betas' range, whatever it held in memory.
    new_form, old_form = (_saved_form(SR3Pipeline.from_pretrained(tmp_path / name)) for name in ("count", "old"))
    assert new_form != old_form
    for at in range(1, moves + 1):
        folder = tmp_path / f"cut{at}"
        if replacing:
            monkeypatch.undo()
            old.save_pretrained(folder)
        _replaces(monkeypatch, at, _interrupt)
        with pytest.raises(KeyboardInterrupt):
            new.save_pretrained(folder)
        monkeypatch.undo()
        # The old pipeline until the moves start, then a folder that refuses to load until `finish_interrupted_save`
        # moves the rest of the new one: never new components paired with old ones.
        try:
            loaded = SR3Pipeline.from_pretrained(folder)
        except FileNotFoundError as error:
            if "finish_interrupted_save" in str(error):
                base.finish_interrupted_save(folder)
                assert _saved_form(SR3Pipeline.from_pretrained(folder)) == new_form, at
            else:
                assert not replacing, at  # a first save cut short before it was complete leaves no pipeline
        else:
            assert _saved_form(loaded) in (new_form, old_form), at
        new.save_pretrained(folder)  # a rerun completes it
        loaded = SR3Pipeline.from_pretrained(folder)
        assert _first_weight(loaded) == _first_weight(new)
        assert loaded.scheduler.config.beta_start == new.scheduler.config.beta_start


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_moves_waits_for_them(tmp_path, monkeypatch, pipelines, signum):
    new, old = pipelines
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    calls = _replaces(monkeypatch, 0, None)
    new.save_pretrained(tmp_path / "count")
    monkeypatch.undo()
    # The first move after the staging folder was completed (a signal while writing it ends the save there).
    first_move = max(i for i, destination in enumerate(calls) if destination.endswith(base.STAGED_LISTING)) + 2
    _replaces(monkeypatch, first_move, lambda: os.kill(os.getpid(), signum))
    with sigterm_as_interrupt(), pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
        new.save_pretrained(folder)
    monkeypatch.undo()
    loaded = SR3Pipeline.from_pretrained(folder)
    assert _first_weight(loaded) == _first_weight(new)
    assert not [path for path in folder.iterdir() if path.name.startswith(base.STAGING_PREFIX)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
