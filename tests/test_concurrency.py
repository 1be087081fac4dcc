"""Calls on one pipeline object from several threads run one at a time (each gets what it would alone, and the pipeline
keeps its networks); `from_pipe` gives a worker its own pipeline that neither casts nor shares the scheduler's state."""

import copy
import logging
import pickle
import threading

import pytest
import torch
from conftest import low_resolution_unet, needs_bfloat16_kernels, tiny_unet_config

from diffusers_sr3 import SR3Pipeline, SR3UnconditionalPipeline, SR3UNet2DModel, make_scheduler
from diffusers_sr3.backends import swap_unet, use_backend
from diffusers_sr3.tiling import tiled_super_resolve

# How long the first call waits, at its first step, for the second to reach its own first step: without the lock the
# second call overlaps the first; with it the second waits for the first, and this bounds the first's wait.
OVERLAP_WAIT_S = 1.0


def _image(size=32):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _overlapping(first, second):
    """Run `first(callback)` and, from its first step on, `second(callback)` in another thread; their results.

    Each is a function of a step callback that runs one pipeline call with it and returns the images. The second
    call's steps wait for the first call to end, so that, overlapping, it ends last (and restores what it found)."""
    entered, first_done = threading.Event(), threading.Event()
    results, errors, threads = {}, [], []

    def run(name, call, callback):
        try:
            results[name] = call(callback)
        except Exception as error:  # the test reports it, not the thread
            errors.append(error)

    def second_started(pipeline, step, timestep, callback_kwargs):
        entered.set()
        first_done.wait()
        return callback_kwargs

    def start_second(pipeline, step, timestep, callback_kwargs):
        if not threads:
            threads.append(threading.Thread(target=run, args=("second", second, second_started)))
            threads[0].start()
            entered.wait(OVERLAP_WAIT_S)
        return callback_kwargs

    try:
        run("first", first, start_second)
    finally:
        first_done.set()
    threads[0].join()
    assert not errors, errors
    return results["first"], results["second"]


def _call(pipeline, seed, **kwargs):
    def call(callback=None):
        generator = torch.Generator().manual_seed(seed)
        return pipeline(_image(), generator=generator, output_type="pt", callback_on_step_end=callback, **kwargs).images

    return call


def _tiled_call(pipeline, seed):
    def call(callback=None):
        generator = torch.Generator().manual_seed(seed)
        return tiled_super_resolve(
            pipeline, _image(), tile_size=64, generator=generator, output_type="pt", callback_on_step_end=callback
        ).images

    return call


def _assert_own_networks(pipeline):
    assert type(vars(pipeline)["unet"]) is SR3UNet2DModel
    assert type(vars(pipeline)["guidance_unet"]) is SR3UNet2DModel


@pytest.mark.parametrize("make_call", [_call, _tiled_call], ids=["windows", "tiles"])
def test_two_threads_on_one_pipeline_with_stand_ins_get_the_sequential_results(guided_pipeline, make_call):
    pipeline = guided_pipeline
    pipeline.register_to_config(detail_window_size=32)  # windows by default, as the packaged model
    first, second = make_call(pipeline, 1), make_call(pipeline, 2)
    expected = first(), second()

    got = _overlapping(first, second)

    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    _assert_own_networks(pipeline)
    assert torch.equal(first(), expected[0])


def test_two_threads_with_different_step_counts_share_no_scheduler_state(guided_pipeline):
    first, second = _call(guided_pipeline, 1, num_inference_steps=4), _call(guided_pipeline, 2, num_inference_steps=9)
    expected = first(), second()

    got = _overlapping(first, second)

    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_two_threads_on_one_unconditional_pipeline_get_the_sequential_results():
    torch.manual_seed(0)
    unet = SR3UNet2DModel(**tiny_unet_config(in_channels=3)).eval()
    pipeline = SR3UnconditionalPipeline(unet, make_scheduler("ddim", n_timestep=100))
    pipeline.set_progress_bar_config(disable=True)

    def sample(steps, seed):
        def call(callback=None):
            generator = torch.Generator().manual_seed(seed)
            return pipeline(
                num_inference_steps=steps, generator=generator, output_type="pt", callback_on_step_end=callback
            ).images

        return call

    first, second = sample(4, 1), sample(9, 2)
    expected = first(), second()

    got = _overlapping(first, second)

    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_bfloat16_kernels
def test_a_call_waits_for_another_threads_stand_in_block(guided_pipeline):
    call = _call(guided_pipeline, 1, num_inference_steps=2)
    expected = call()
    done = []
    with use_backend(guided_pipeline, "bf16"), swap_unet(guided_pipeline, guided_pipeline.unet):
        # Re-entrant: a call inside the block runs (on the stand-ins) in the thread that holds it.
        call()
        worker = threading.Thread(target=lambda: done.append(call()))
        worker.start()
        worker.join(0.2)
        assert not done  # still waiting for the block to end
    worker.join()
    assert torch.equal(done[0], expected)
    _assert_own_networks(guided_pipeline)


def test_from_pipe_gives_a_worker_its_own_scheduler_so_both_run_at_once(guided_pipeline):
    worker = SR3Pipeline.from_pipe(guided_pipeline)
    assert worker.scheduler is not guided_pipeline.scheduler
    assert worker.scheduler.config == guided_pipeline.scheduler.config
    assert worker.unet is guided_pipeline.unet  # the weights are shared
    passed = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    assert SR3Pipeline.from_pipe(guided_pipeline, scheduler=passed).scheduler is passed
    first, second = _call(guided_pipeline, 1, num_inference_steps=4), _call(worker, 2, num_inference_steps=9)
    expected = first(), second()

    got = _overlapping(first, second)

    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_pipeline_that_has_run_still_copies_and_pickles(guided_pipeline):
    _call(guided_pipeline, 1, num_inference_steps=2)()
    copied = copy.deepcopy(guided_pipeline)
    pickled = pickle.loads(pickle.dumps(guided_pipeline))
    expected = _call(guided_pipeline, 1, num_inference_steps=2)()
    assert torch.equal(_call(copied, 1, num_inference_steps=2)(), expected)
    assert torch.equal(_call(pickled, 1, num_inference_steps=2)(), expected)


@needs_bfloat16_kernels
def test_from_pipe_of_a_bfloat16_pipeline_leaves_the_original_as_it_was(guided_pipeline):
    original = guided_pipeline.to(dtype=torch.bfloat16)
    call = _call(original, 1, num_inference_steps=2)
    expected = call()

    derived = SR3Pipeline.from_pipe(original, guidance_scale=3.0)

    assert derived.unet is original.unet and derived.config.guidance_scale == 3.0
    assert original.unet.conv_in.weight.dtype == torch.bfloat16
    assert original.guidance_unet.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(call(), expected)
    # A dtype asked for is still applied, to the shared networks as in Diffusers.
    assert SR3Pipeline.from_pipe(original, dtype=torch.float32).unet.conv_in.weight.dtype == torch.float32


def test_a_plain_from_pipe_logs_no_float32_warning():
    scheduler = make_scheduler("ddim", n_timestep=100, prediction_type="sample", clip_sample=False)
    pipeline = SR3Pipeline(low_resolution_unet(), scheduler, residual=True)
    # Diffusers' loggers do not propagate to the root logger (nor to caplog): listen on theirs.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        SR3Pipeline.from_pipe(pipeline, detail_steps=3)
    finally:
        diffusers_logger.removeHandler(handler)

    assert not [record for record in records if "float32" in record.getMessage()]


@pytest.mark.parametrize("build", ["components", "same_scheduler"])
def test_two_pipelines_sharing_one_scheduler_get_the_sequential_results_in_two_threads(guided_pipeline, build):
    """A scheduler holds the state of the refinement running it (timesteps, step index): two pipelines built on one
    scheduler object (`SR3Pipeline(**pipe.components)`, or one scheduler passed to both) run their calls one at a
    time, each getting what it gets alone, as calls on one pipeline do."""
    pipeline = guided_pipeline
    if build == "components":
        other = SR3Pipeline(**pipeline.components)
    else:
        other = SR3Pipeline(
            pipeline.unet, pipeline.scheduler, residual=True, guidance_unet=pipeline.guidance_unet, guidance_scale=2.0
        )
    other.set_progress_bar_config(disable=True)
    assert other.scheduler is pipeline.scheduler
    first, second = _call(pipeline, 1, num_inference_steps=4), _call(other, 2, num_inference_steps=9)
    expected = first(), second()
    assert torch.equal(first(), expected[0])  # one after the other: each call sets the timesteps it runs

    got = _overlapping(first, second)

    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
