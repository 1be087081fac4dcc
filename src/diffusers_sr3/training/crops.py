"""Training a small super-resolution model on in-memory crops: what `sr3 demo` and the convergence study share.

Crops come from `diffusers_sr3.photos` (`training_crops` / `heldout_crops`); the network is a small SR3 UNet
sized for the crops ([`crop_unet_config`]), passed to [`TrainingConfig`] as a dict, and [`train_on_crops`] runs the
training core with the light validation such short runs want.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from .config import TrainingConfig


def crop_unet_config(
    crop_size: int,
    width: int,
    channel_multipliers: Sequence[int] = (1, 2, 4),
    max_norm_groups: int = 32,
    **options: Any,
) -> Dict[str, Any]:
    """A small conditional SR3 UNet for `crop_size` crops: two blocks per level, attention at the coarsest level,
    no dropout, `min(max_norm_groups, width)` normalisation groups; `options` are further UNet settings."""
    factor = 2 ** (len(channel_multipliers) - 1)
    if crop_size % factor:
        raise ValueError(f"crop size {crop_size} is not divisible by {factor}, the UNet's downsampling factor")
    return dict(
        in_channels=6,
        out_channels=3,
        block_out_channels=width,
        channel_multipliers=tuple(channel_multipliers),
        layers_per_block=2,
        attention_resolutions=(crop_size // factor,),
        sample_size=crop_size,
        norm_groups=min(max_norm_groups, width),
        dropout=0.0,
        **options,
    )


def train_on_crops(
    crops: Sequence[Any],
    unet_config: Dict[str, Any],
    *,
    steps: int,
    batch_size: int,
    output_dir: str,
    seed: int,
    upscale_factor: int = 4,
    **options: Any,
) -> str:
    """Train an x`upscale_factor` model on `crops` (images of the UNet's `sample_size`) with the training core.

    Validation is one image sampled in two DDIM steps at the end (short runs are evaluated by their caller), with
    no tracker; `options` are further [`TrainingConfig`] fields (the recipe, checkpointing, ...).

    Returns:
        `output_dir`, which holds the saved pipeline.
    """
    from .trainer import train

    settings: Dict[str, Any] = dict(
        task="sr",
        unet_config=unet_config,
        resolution=unet_config["sample_size"],
        upscale_factor=upscale_factor,
        train_dataset=list(crops),
        train_batch_size=batch_size,
        max_train_steps=steps,
        output_dir=output_dir,
        validation_steps=0,
        num_validation_images=1,
        validation_scheduler="ddim",
        validation_steps_count=2,
        report_to="none",
        seed=seed,
    )
    settings.update(options)
    return train(TrainingConfig(**settings))
