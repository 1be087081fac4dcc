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
from diffusers_sr3.pretrained import DEFAULT_STEPS, default_model_card, default_model_path


@pytest.fixture(scope="module")
def packaged():
    pipeline = SR3Pipeline.from_pretrained(default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_it_is_the_convergence_study_model_with_its_sampler(packaged):
    unet = packaged.unet.config
    assert (unet.block_out_channels, tuple(unet.channel_multipliers), tuple(unet.attention_resolutions)) == (
        32,
        (1, 2, 4, 8),
        (8,),
    )
    assert unet.noise_level_embedding_scale == 1000.0 and packaged.config.residual is True
    assert type(packaged.scheduler).__name__ == "DDIMScheduler"
    assert packaged.scheduler.config.prediction_type == "sample"
    with open(os.path.join(default_model_path(), "training_summary.json"), encoding="utf-8") as handle:
        assert json.load(handle)["global_step"] == 1000
    card = default_model_card()
    assert "model-index" in card and "convergence.py --steps 500 1000" in card


def test_it_beats_bicubic_consistency_without_colour_shift(packaged):
    hr, _ = heldout_crops(64, count=4, seed=0)  # the held-out photos' crops, as the benchmarks draw them
    lr, bicubic = degrade(hr, 4)
    generator = torch.Generator().manual_seed(0)
    sr = packaged((lr + 1) / 2, num_inference_steps=DEFAULT_STEPS, generator=generator, output_type="pt").images
    ours, baseline = image_quality(sr * 2 - 1, hr, lr), image_quality(bicubic, hr, lr)
    # Measured on these crops at release: see the model card; the margins leave room for BLAS differences only.
    assert ours["psnr"] > baseline["psnr"] - 0.5
    assert ours["ssim"] > baseline["ssim"] - 0.005
    assert ours["consistency"] < baseline["consistency"]
    assert max(ours["colour_error"]) < 1.0
    assert ours["edge_ratio"] > baseline["edge_ratio"]
