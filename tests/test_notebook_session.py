"""A pipeline kept alive across notebook cells: interrupted calls and failed blocks leave it as it was."""

import copy
import io
import pickle

import pytest
import torch
from conftest import low_resolution_unet
from diffusers import HeunDiscreteScheduler

from diffusers_sr3.pipelines.base import stand_ins
from diffusers_sr3.tiling import tiled_unet


def upscaled(pipeline, image, **options):
    return pipeline(image, generator=torch.Generator().manual_seed(0), output_type="pt", **options).images


def interrupt_at_step(step):
    def callback(pipeline, index, timestep, tensors):
        if index == step:
            raise KeyboardInterrupt
        return tensors

    return callback


@pytest.mark.parametrize("options", [{}, {"strength": 0.5}, {"window_size": 32}], ids=["detail", "strength", "windows"])
def test_a_call_interrupted_mid_refinement_leaves_the_pipeline_as_a_fresh_one(guided_pipeline, options):
    """Ctrl-C in a cell (here: from a step callback) stops the refinement; the next call on the same pipeline gives
    what it gave before, for the same seed: no scheduler step index, stand-in network or interrupt flag is left."""
    image = torch.rand(1, 3, 16, 16)
    before = upscaled(guided_pipeline, image, **options)
    networks = dict(vars(guided_pipeline))
    with pytest.raises(KeyboardInterrupt):
        upscaled(guided_pipeline, image, callback_on_step_end=interrupt_at_step(1), **options)
    assert {name: vars(guided_pipeline)[name] for name in ("unet", "guidance_unet")} == {
        name: networks[name] for name in ("unet", "guidance_unet")
    }
    assert torch.equal(upscaled(guided_pipeline, image, **options), before)


def test_a_stand_in_that_fails_for_the_guide_leaves_no_stand_in_for_the_unet(guided_pipeline):
    """A block whose stand-in for the guide is refused (or interrupted while built) puts the UNet's original back:
    before, the UNet's stand-in (a tiled network) stayed in the pipeline for every later call."""
    unet, guide = guided_pipeline.unet, guided_pipeline.guidance_unet

    def refused_for_the_guide(network):
        if network is guide:
            raise KeyboardInterrupt
        return torch.nn.Identity()

    with pytest.raises(KeyboardInterrupt):
        with stand_ins(guided_pipeline, refused_for_the_guide):
            pass
    assert guided_pipeline.unet is unet and guided_pipeline.guidance_unet is guide

    # The same through tiling: tiles of 16 pixels suit the UNet (factor 16), not a guide that divides by 32.
    vars(guided_pipeline)["guidance_unet"] = low_resolution_unet(seed=1, channel_multipliers=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="downsampling factor 32"):
        with tiled_unet(guided_pipeline, 16):
            pass
    assert guided_pipeline.unet is unet


def recorded_bars(pipeline, monkeypatch):
    """The progress bars `pipeline` opens, shown into a string (a disabled bar counts nothing)."""
    pipeline.set_progress_bar_config(file=io.StringIO())
    bars = []
    open_bar = pipeline.progress_bar

    def recording(*args, **kwargs):
        bars.append(open_bar(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(pipeline, "progress_bar", recording)
    return bars


@pytest.mark.parametrize(
    "options, evaluations",
    [
        ({}, 4),
        ({"strength": 0.5}, 1 + 2),  # the fidelity answer, then the last 2 of 4 steps
        ({"strength": 0.5, "scheduler": "heun"}, 1 + 2 * 2 - 1),  # Heun: two evaluations a step but the last
        ({"mode": "fidelity", "self_ensemble": True}, 8),
    ],
    ids=["detail", "strength", "heun", "self-ensemble"],
)
def test_a_call_shows_one_progress_bar_that_counts_all_its_evaluations(
    guided_pipeline, monkeypatch, options, evaluations
):
    """A notebook shows every bar a call opens (tqdm.auto widgets): one per call, not one per refinement (before, a
    refinement below strength 1 showed a bar of 1 for its fidelity answer, a self-ensemble 8 of them)."""
    if options.pop("scheduler", None) == "heun":
        guided_pipeline.scheduler = HeunDiscreteScheduler.from_config(
            guided_pipeline.scheduler.config, timestep_spacing="trailing"
        )
    bars = recorded_bars(guided_pipeline, monkeypatch)
    guided_pipeline(torch.rand(1, 3, 16, 16), generator=torch.Generator().manual_seed(0), **options)
    assert [(bar.n, bar.total) for bar in bars] == [(evaluations, evaluations)]


def test_a_pipeline_copied_during_a_call_carries_no_progress_bar(guided_pipeline, monkeypatch):
    """A step callback may deep-copy or pickle the pipeline (a snapshot in a notebook): the call's progress bar is no
    part of it, and the copy's calls show bars of their own. A call below strength 1 kept its bar in the instance:
    copying the pipeline failed on the bar (a TypeError for its stderr stream, a RecursionError in tqdm's wrapper of
    a StringIO one)."""
    copies = []

    def copy_the_pipeline(pipeline, index, timestep, tensors):
        copies.append(copy.deepcopy(pipeline))
        pickle.dumps(pipeline)
        return tensors

    guided_pipeline.set_progress_bar_config()  # tqdm's own output: stderr
    upscaled(guided_pipeline, torch.rand(1, 3, 16, 16), strength=0.5, callback_on_step_end=copy_the_pipeline)

    guided_pipeline.set_progress_bar_config(file=io.StringIO())  # a bar that deep-copies
    copies.clear()
    upscaled(guided_pipeline, torch.rand(1, 3, 16, 16), strength=0.5, callback_on_step_end=copy_the_pipeline)
    bars = recorded_bars(copies[0], monkeypatch)
    upscaled(copies[0], torch.rand(1, 3, 16, 16), strength=0.5)
    assert [(bar.n, bar.total) for bar in bars] == [(1 + 2, 1 + 2)]
