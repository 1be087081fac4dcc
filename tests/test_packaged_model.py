"""The model that ships in the package: what it is, and that it still super-resolves held-out photos well.

Its full evaluation is `benchmarks/model_report.py` (README "The packaged model"); this guards the shipped weights
and the default sampler on a few held-out crops, cheaply enough for every CI run.
"""

import json
import os

import pytest
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.image_processing import degrade
from diffusers_sr3.metrics import image_quality
from diffusers_sr3.photos import heldout_crops
from diffusers_sr3.pretrained import DEFAULT_DETAIL_OPTIONS, DEFAULT_STEPS, default_model_card, default_model_path


@pytest.fixture(scope="module")
def packaged():
    pipeline = SR3Pipeline.from_pretrained(default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_it_is_the_low_resolution_residual_model_with_its_sampler(packaged):
    unet = packaged.unet.config
    assert (unet.block_out_channels, tuple(unet.channel_multipliers), unet.pixel_unshuffle_factor) == (64, (1, 2, 4), 4)
    assert unet.noise_level_embedding_scale == 1000.0 and packaged.config.residual is True
    # The residual scale measured on its training data, stored with it; the x0 clipping range follows it.
    assert 5 < packaged.config.residual_scale < 30
    assert packaged.scheduler.config.clip_sample_range == pytest.approx(2 * packaged.config.residual_scale)
    assert type(packaged.scheduler).__name__ == "DDIMScheduler"
    assert packaged.scheduler.config.prediction_type == "sample"
    with open(os.path.join(default_model_path(), "training_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    assert summary["global_step"] == 62500 and summary["residual_scale"] == packaged.config.residual_scale
    # Detail mode's guide (autoguidance): the same network, earlier in the same run.
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(packaged.guidance_unet.config) == public(unet)
    assert packaged.config.guidance_scale == 2.0 and packaged.guided()
    card = default_model_card()
    assert "model-index" in card and "--preset photos_x4" in card and "Two ways to sample" in card


def test_it_beats_bicubic_in_both_modes(packaged):
    hr, _ = heldout_crops(64, count=8, seed=0)  # the held-out photos' crops, as the benchmarks draw them
    lr, bicubic = degrade(hr, 4)
    baseline = image_quality(bicubic, hr, lr)
    fidelity = packaged((lr + 1) / 2, mode="fidelity", output_type="pt").images * 2 - 1
    generator = torch.Generator().manual_seed(0)
    detail = packaged((lr + 1) / 2, num_inference_steps=DEFAULT_STEPS, generator=generator, output_type="pt").images
    fidelity, detail = image_quality(fidelity, hr, lr), image_quality(detail * 2 - 1, hr, lr)
    # Measured on many more crops at release (the model card); these margins are far inside what it measured.
    assert fidelity["psnr"] > baseline["psnr"] + 0.5 and fidelity["ssim"] > baseline["ssim"] + 0.01
    assert detail["psnr"] > baseline["psnr"] - 0.5
    assert detail["edge_ratio"] > fidelity["edge_ratio"] > baseline["edge_ratio"]
    # Its studied detail settings (`sr3 upscale --mode detail`): detail on top of the fidelity answer.
    generator = torch.Generator().manual_seed(0)
    studied = packaged(
        (lr + 1) / 2, num_inference_steps=DEFAULT_STEPS, generator=generator, output_type="pt", **DEFAULT_DETAIL_OPTIONS
    ).images
    studied = image_quality(studied * 2 - 1, hr, lr)
    assert studied["psnr"] > baseline["psnr"] + 0.5 and studied["edge_ratio"] > baseline["edge_ratio"]
    for result in (fidelity, detail, studied):
        assert result["consistency"] < 2 * baseline["consistency"] and max(result["colour_error"]) < 1.0
