"""What `sr3 upscale`'s progress bar counts: the evaluations of a backend's stand-in inside each evaluation, and
detail mode's windows beside the whole image's tiles, so the total is reached exactly and early ETAs include them."""

from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import needs_bfloat16_kernels

from diffusers_sr3.backends import AutocastUNet, use_backend
from diffusers_sr3.detail_windows import window_crops_per_step, windowed_evaluations
from diffusers_sr3.pipelines.pipeline_sr3 import evaluations_per_crop
from diffusers_sr3.progress import EvaluationCounter, UpscaleProgress, block_shares
from diffusers_sr3.tiling import crops_per_step, tiled_super_resolve


@needs_bfloat16_kernels
def test_the_bar_moves_inside_an_evaluation_on_the_bf16_backend(guided_pipeline):
    """The bf16 backend's stand-in (`--backend auto` on AMX/AVX512-BF16 CPUs and bf16 GPUs) has no blocks of its
    own: the bar hooks the UNet it runs, so it moves before the first evaluation ends."""
    unet = guided_pipeline.unet
    with use_backend(guided_pipeline, "bf16") as network:
        assert isinstance(network, AutocastUNet)
        assert [block for block, _ in block_shares(network)] == [block for block, _ in block_shares(unet)] != []
        seen = []
        with UpscaleProgress(network, steps=1, crops_per_step=1, disable=False, leave=False) as progress:
            hook = unet.mid_blocks[0].register_forward_hook(lambda *_: seen.append(progress.bar.n))
            tiled_super_resolve(guided_pipeline, torch.rand(3, 32, 48), mode="fidelity", progress=progress)
            hook.remove()
            assert progress.done == progress.total == 1
    assert seen and 0 < seen[0] < 1


@pytest.mark.parametrize("tile_size, strength", [(None, 1.0), (64, 0.5)])
def test_windows_count_towards_an_exact_total(guided_pipeline, tile_size, strength):
    """Each image's windows count as the crops of the whole image's pass that their pixels fill, in every windowed
    evaluation (the UNet's and its guide's; not the fidelity answer's below strength 1): the bar ends on its total."""
    image, size = torch.rand(3, 32, 48), (48, 32)  # a 128x192 output, four 32-pixel windows across and more
    evaluations = evaluations_per_crop(
        "detail", 3, strength, guided_pipeline.scheduler, True, guided_pipeline.config.fidelity_steps
    )
    windowed = evaluations - (guided_pipeline.config.fidelity_steps if strength < 1 else 0)
    assert windowed_evaluations(evaluations, strength, guided_pipeline.config.fidelity_steps, 32) == windowed
    assert windowed_evaluations(evaluations, strength, guided_pipeline.config.fidelity_steps, 0) == 0
    crops = crops_per_step(guided_pipeline, size, tile_size=tile_size)
    window_crops = window_crops_per_step(guided_pipeline, size, 32, tile_size=tile_size)
    # Untiled, the windows fill one crop; in 64-pixel tiles (12 of them, overlapping) the image's 6 tiles' area.
    assert (crops, window_crops) == ((1, 1) if tile_size is None else (12, 6))
    assert window_crops_per_step(guided_pipeline, size, 64) == window_crops_per_step(guided_pipeline, size, 0) == 0
    reports = []
    counter = EvaluationCounter(reports.append, evaluations * crops + windowed * window_crops)
    with UpscaleProgress(
        guided_pipeline.unet, evaluations, crops, window_crops=window_crops, windowed_steps=windowed, leave=False
    ) as progress:
        for meter in (progress, counter):
            tiled_super_resolve(
                guided_pipeline,
                image,
                tile_size=tile_size,
                progress=meter,
                mode="detail",
                num_inference_steps=3,
                strength=strength,
                window_size=32,
                generator=torch.Generator().manual_seed(0),
            )
        assert progress.total == evaluations * crops + windowed * window_crops > evaluations * crops
        assert progress.done == progress.total and progress.bar.n == progress.bar.total
        assert progress.bar.postfix == f"step {evaluations}/{evaluations}, windows"
    assert reports[-1] == (counter.total, counter.total) and all(type(done) in (int, float) for done, _ in reports)
    assert len(reports) == evaluations + windowed  # each windowed evaluation's batch of windows reported too


def test_upscale_counts_detail_windows_in_its_progress(tmp_path, monkeypatch):
    from diffusers_sr3.cli import main

    progresses = []
    progress_init = UpscaleProgress.__init__
    monkeypatch.setattr(
        UpscaleProgress, "__init__", lambda self, *a, **kw: progresses.append(self) or progress_init(self, *a, **kw)
    )
    photo = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)
    arguments = ["upscale", str(photo), "--backend", "torch", "--steps", "2", "--mode", "detail", "--quiet"]
    arguments += ["--strength", "1"]
    assert main(arguments + ["--output", str(tmp_path / "windowed.png"), "--window-size", "32"]) == 0
    # The packaged model's guide runs beside it: 2 x 2 evaluations of the 128x128 output and of its windows.
    progress = progresses[-1]
    assert (progress.steps, progress.crops_per_step, progress.window_crops, progress.windowed_steps) == (4, 1, 1, 4)
    assert progress.done == progress.total == 8
    assert main(arguments + ["--output", str(tmp_path / "whole.png"), "--window-size", "0"]) == 0
    assert progresses[-1].total == progresses[-1].done == 4 and progresses[-1].windowed_steps == 0
    assert isinstance(progress.total, (int, Fraction))
