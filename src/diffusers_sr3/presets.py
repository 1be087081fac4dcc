"""Model presets: the original SR3 project's network configurations, so users do not copy numbers around.

Each preset names a complete `SR3UNet2DModel` config plus the training resolution and, for super-resolution
models, the upscale factor. `norm_groups` is 32 throughout (the original's default when its config omits it).
The noise schedule of every preset is `noise.SR3_SCHEDULE` (linear betas 1e-6..1e-2 over 2000 steps; the tiny
test presets take 100 steps).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .defaults import SR3_SCHEDULE


@dataclass(frozen=True)
class Preset:
    """A named model configuration.

    Args:
        unet: keyword arguments of `SR3UNet2DModel`.
        resolution: the training (high-resolution) image size.
        upscale_factor: super-resolution factor, or None for unconditional models.
        description: one line for `--help` and model cards.
        scheduler: the noise schedule a model of this preset trains with, as `make_scheduler` keywords
            (`beta_schedule`, `num_train_timesteps`, `beta_start`, `beta_end`); defaults to `SR3_SCHEDULE`. Training
            takes from it each of these its config leaves unset (a fine-tuned model setting none keeps its own).
    """

    unet: Dict[str, Any]
    resolution: int
    upscale_factor: Optional[int]
    description: str
    scheduler: Dict[str, Any] = field(default_factory=lambda: dict(SR3_SCHEDULE))

    def unet_config(self) -> Dict[str, Any]:
        """A fresh copy of the UNet config (callers may change it)."""
        return copy.deepcopy(self.unet)


# How to train a new super-resolution model, found by the convergence study (docs/convergence.md,
# benchmarks/convergence.py) and the recipe study (docs/quality.md, benchmarks/recipe_study.py): diffuse the
# residual HR - bicubic and predict it directly, so an untrained model already returns the bicubic upsample and
# training only adds detail; the training script scales the residual to unit variance (`residual_scale`, measured
# from the data), so the schedule's noise does not drown it. `TrainingConfig` fields, plus the UNet's
# `noise_level_embedding_scale`. Use it with a low-resolution network (`photos_x4`, `photos_x8`) to train on a CPU.
# Converted original checkpoints keep the original's settings.
NEW_MODEL_RECIPE: Dict[str, Any] = dict(
    residual=True,
    prediction_type="sample",
    noise_level_embedding_scale=1000.0,
    per_sample_timestep=True,
    max_grad_norm=1.0,
    use_ema=True,
    ema_decay=0.999,
    ema_use_warmup=True,
)

# The low-resolution presets' network on its 16x16 grid (levels 16, 8, 4; attention at 4): the image-side settings,
# `sample_size` and `pixel_unshuffle_factor`, are the preset's.
_LOW_RESOLUTION_UNET: Dict[str, Any] = dict(
    in_channels=6,
    out_channels=3,
    block_out_channels=64,
    channel_multipliers=(1, 2, 4),
    layers_per_block=2,
    attention_resolutions=(4,),
    norm_groups=32,
    dropout=0.0,
    noise_level_embedding_scale=1000.0,
)

PRESETS: Dict[str, Preset] = {
    "sr_16_128": Preset(
        unet=dict(
            in_channels=6,
            out_channels=3,
            block_out_channels=64,
            channel_multipliers=(1, 2, 4, 8, 8),
            layers_per_block=2,
            attention_resolutions=(16,),
            sample_size=128,
            norm_groups=32,
            dropout=0.2,
        ),
        resolution=128,
        upscale_factor=8,
        description="16x16 -> 128x128 faces (the original's sr_sr3_16_128)",
    ),
    "sr_64_512": Preset(
        unet=dict(
            in_channels=6,
            out_channels=3,
            block_out_channels=32,
            channel_multipliers=(1, 2, 4, 8, 8, 16, 16),
            layers_per_block=2,
            attention_resolutions=(),  # the original comments out attn_res [16]: attention only in the middle (8x8)
            sample_size=512,
            norm_groups=32,
            dropout=0.0,
        ),
        resolution=512,
        upscale_factor=8,
        description="64x64 -> 512x512 faces (the original's sr_sr3_64_512)",
    ),
    "uncond_128": Preset(
        unet=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=64,
            channel_multipliers=(1, 1, 2, 2, 4, 4),
            layers_per_block=2,
            attention_resolutions=(16,),
            sample_size=128,
            norm_groups=32,
            dropout=0.2,
        ),
        resolution=128,
        upscale_factor=None,
        description="128x128 unconditional faces (the original's generation config)",
    ),
    # The SR3 paper's 1024x1024 face cascade: 64x64 generator -> x4 -> x4. Not from the original project (which
    # never reached it); sized so that the 256->1024 stage runs at batch 1 in well under 24 GiB on a CPU.
    "uncond_64": Preset(
        unet=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=64,
            channel_multipliers=(1, 2, 4, 8),
            layers_per_block=2,
            attention_resolutions=(16, 8),
            sample_size=64,
            norm_groups=32,
            dropout=0.1,
        ),
        resolution=64,
        upscale_factor=None,
        description="64x64 unconditional faces, the first stage of a 1024x1024 cascade",
    ),
    "sr_64_256": Preset(
        unet=dict(
            in_channels=6,
            out_channels=3,
            block_out_channels=64,
            channel_multipliers=(1, 2, 4, 8, 8),
            layers_per_block=2,
            attention_resolutions=(16,),
            sample_size=256,
            norm_groups=32,
            dropout=0.1,
        ),
        resolution=256,
        upscale_factor=4,
        description="64x64 -> 256x256, the second stage of a 1024x1024 cascade",
    ),
    "sr_256_1024": Preset(
        unet=dict(
            in_channels=6,
            out_channels=3,
            block_out_channels=16,
            channel_multipliers=(1, 2, 4, 8, 16, 32, 32),
            layers_per_block=1,
            attention_resolutions=(),  # only the middle block attends, at 16x16
            sample_size=1024,
            norm_groups=16,
            dropout=0.0,
        ),
        resolution=1024,
        upscale_factor=4,
        description="256x256 -> 1024x1024, the last stage of a 1024x1024 cascade",
    ),
    # Networks that run at the low-resolution grid (pixel-unshuffle stem, pixel-shuffle head): ~5x faster per step
    # than full-resolution networks of the same width, so they train to beat bicubic on a CPU in hours. The
    # recipe that goes with them is NEW_MODEL_RECIPE (the residual, scaled to unit variance, x0 prediction).
    "photos_x4": Preset(
        unet=dict(_LOW_RESOLUTION_UNET, sample_size=64, pixel_unshuffle_factor=4),
        resolution=64,
        upscale_factor=4,
        description="x4 photographs, a 15M-parameter network at the low-resolution grid (16 -> 64 crops)",
    ),
    "photos_x8": Preset(
        unet=dict(_LOW_RESOLUTION_UNET, sample_size=128, pixel_unshuffle_factor=8),
        resolution=128,
        upscale_factor=8,
        description="x8 photographs and faces, a 15M-parameter network at the low-resolution grid (16 -> 128)",
    ),
    "tiny": Preset(
        unet=dict(
            in_channels=6,
            out_channels=3,
            block_out_channels=8,
            channel_multipliers=(1, 2, 2),
            layers_per_block=1,
            attention_resolutions=(8,),
            sample_size=32,
            norm_groups=4,
            dropout=0.0,
        ),
        resolution=32,
        upscale_factor=4,
        description="a ~67k-parameter x4 model for tests and smoke runs (8x8 -> 32x32)",
        scheduler=dict(SR3_SCHEDULE, num_train_timesteps=100),
    ),
    "tiny_uncond": Preset(
        unet=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=8,
            channel_multipliers=(1, 2, 2),
            layers_per_block=1,
            attention_resolutions=(8,),
            sample_size=32,
            norm_groups=4,
            dropout=0.0,
        ),
        resolution=32,
        upscale_factor=None,
        description="a ~67k-parameter 32x32 unconditional model for tests and smoke runs",
        scheduler=dict(SR3_SCHEDULE, num_train_timesteps=100),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; the error lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
