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
from diffusers_sr3.photos import heldout_crops, packaged_model_heldout
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
    # The crops of the photos it never trained on, as the benchmarks draw them.
    hr, _ = heldout_crops(64, count=8, seed=0, heldout=packaged_model_heldout())
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


BASE_INSTALL_CHECK = r"""
import importlib.metadata as metadata, sys
from packaging.requirements import Requirement

def requirements(distribution):
    found = [Requirement(text) for text in metadata.requires(distribution) or []]
    return [r for r in found if r.marker is None or r.marker.evaluate({"extra": ""})], found

def closure(names):
    seen, stack = set(), list(names)
    while stack:
        name = stack.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            stack += [r.name for r in requirements(name)[0]]
        except metadata.PackageNotFoundError:
            pass
    return seen

base, every = requirements("diffusers-sr3")
installed = closure(r.name for r in base)
extras_only = {r.name.lower().replace("_", "-") for r in every} - installed
for module, distributions in metadata.packages_distributions().items():
    if all(d.lower().replace("_", "-") in extras_only for d in distributions):
        sys.modules[module] = None  # as if not installed: `import` fails, find_spec finds nothing
assert sys.modules.get("datasets", 0) is None, "the extras are not hidden"

from diffusers_sr3.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_base_install_upscales_with_the_packaged_model(tmp_path):
    # `pip install diffusers-sr3` without extras: Diffusers loads models that keep modules in float32 only with
    # accelerate, and the command line imports every command; the extras' packages are hidden here.
    import subprocess
    import sys

    import PIL.Image

    PIL.Image.new("RGB", (16, 12), "teal").save(tmp_path / "small.png")
    command = [sys.executable, "-c", BASE_INSTALL_CHECK, "upscale", str(tmp_path / "small.png")]
    done = subprocess.run(
        [*command, "--output", str(tmp_path / "out"), "--mode", "fidelity"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert PIL.Image.open(tmp_path / "out" / "small_sr.png").size == (64, 48)


def test_its_card_loads_it_as_written(packaged):
    """No Hub repo holds the packaged model: the card's examples load it from the package."""
    import re

    card = default_model_card()
    assert 'from_pretrained("sr3-photos-x4"' not in card
    usage = re.search(r"```python\n(from PIL import Image.*?)```", card, re.S).group(1)
    namespace = {}
    exec(compile(usage.split("low_res = ")[0], "card", "exec"), namespace)
    assert namespace["pipe"].config.residual_scale == packaged.config.residual_scale
    diffusers_usage = re.search(r"```python\n(from diffusers import DiffusionPipeline.*?)```", card, re.S).group(1)
    assert "from_pretrained(default_model_path(), trust_remote_code=True)" in diffusers_usage
    assert "from diffusers_sr3.pretrained import default_model_path" in diffusers_usage
