"""Models that ship inside the package, so a fresh install can upscale a photo with no download.

`sr3-photos-x4`: a 4x natural-photo SR3 model trained by this project on photographs that ship with Python,
Debian and npm packages (see its model card, `default_model_card()`). It is fully convolutional: `sr3 upscale`
applies it to photos of any size through tiled upscaling.
"""

from __future__ import annotations

import os

DEFAULT_MODEL = "sr3-photos-x4"
# Refinement steps for the packaged model with its saved DDIM sampler: the step-count study
# (benchmarks/samplers.py, README "Speed") found 10 DDIM steps within 0.01 dB PSNR / 0.0002 SSIM of the
# original's 2000-step DDPM on held-out photos, 217x faster.
DEFAULT_STEPS = 10
# Detail mode of the packaged model (`sr3 upscale --mode detail`, the Space, the model report): the detail-settings
# study (docs/quality.md) found DDIM with fresh noise at every step (eta 1) refining the fidelity answer over the
# last 60% of the schedule the lowest strength whose texture reaches 0.8 of the HR's edge energy, at an FID below
# 0.8x bicubic's on held-out photos and faces; lower strengths keep a lower FID but too little texture, refining
# from pure noise invents texture that is not the photos' texture. Its guidance scale (autoguidance by the same run's
# earlier UNet, 2) is stored in the pipeline's own config: scale 2 at this strength lowered FID and raised edge
# energy a little on held-out and never-seen photos alike (docs/quality.md, "Autoguidance").
# The packaged pipeline's config stores these settings too (`detail_steps`, `detail_eta`, `detail_strength`,
# `detail_window_size`, written by benchmarks/package_model.py), so that every way of loading it samples with them; a
# test keeps the two equal.
DEFAULT_DETAIL_OPTIONS = {"eta": 1.0, "strength": 0.6}
# The packaged model's detail mode also runs its network on 64-pixel windows (its training crop) at every step, on
# images at least four windows a side (diffusers_sr3.detail_windows): on held-out photos super-resolved whole it lifted
# the edge energy from 0.789 to 0.807 of the HR's at FID 0.769x bicubic's (docs/quality.md, "Windows by default").
# Stored as the pipeline's `detail_window_size`; the demo's own small models do not use it.
DEFAULT_DETAIL_WINDOW_SIZE = 64


# Where the packaged models lie, inside the installed package: read, never written.
PACKAGED_MODELS_DIR = os.path.dirname(os.path.abspath(__file__))


def default_model_path() -> str:
    """The folder of the packaged default pipeline (loadable with `SR3Pipeline.from_pretrained`)."""
    path = os.path.join(PACKAGED_MODELS_DIR, DEFAULT_MODEL)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"the packaged model {DEFAULT_MODEL} is missing from {path}; reinstall diffusers-sr3, or pass --model"
        )
    return path


def resolve_packaged_name(name_or_path: str) -> str:
    """`name_or_path` as given, or the packaged model's folder when it is the packaged model's name (`sr3-photos-x4`)
    and nothing of that name exists here, so that name loads and fine-tunes the model wherever the package is
    installed (`SR3Pipeline.from_pretrained("sr3-photos-x4")`, `sr3 upscale --model sr3-photos-x4`,
    `--pretrained_model_name_or_path sr3-photos-x4`). A folder of that name in the working directory wins."""
    if name_or_path == DEFAULT_MODEL and not os.path.lexists(name_or_path):
        return default_model_path()
    return name_or_path


def default_model_card() -> str:
    """The packaged default model's model card (README.md)."""
    with open(os.path.join(default_model_path(), "README.md"), encoding="utf-8") as handle:
        return handle.read()
