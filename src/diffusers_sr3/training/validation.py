"""Validation during training: sample with a fast scheduler, measure, and log a picture to the trackers."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import PIL.Image
import torch

from ..image_processing import grid, tensor_to_pil
from ..metrics import evaluate_batch, summarize
from ..noise import swap_scheduler
from ..pipelines import SR3BasePipeline, SR3Pipeline, SR3UnconditionalPipeline


def build_pipeline(
    unet: Any,
    scheduler: Any,
    upscale_factor: Optional[int],
    condition_noise_level: float = 0.0,
    residual: bool = False,
    residual_scale: float = 1.0,
    sampling_settings: Optional[Dict[str, Any]] = None,
) -> SR3BasePipeline:
    """The SR3 pipeline of a trained UNet: super-resolution when `upscale_factor` is set, else unconditional.

    `condition_noise_level` is the sampling default for models trained with noise-conditioning augmentation;
    `residual` marks models trained on the residual HR - upsample, multiplied by `residual_scale`;
    `sampling_settings` are its sampling defaults (`SR3Pipeline`'s `SAMPLING_CONFIG_KEYS`).
    """
    if upscale_factor is None:
        pipeline: SR3BasePipeline = SR3UnconditionalPipeline(unet=unet, scheduler=scheduler)
    else:
        pipeline = SR3Pipeline(
            unet=unet,
            scheduler=scheduler,
            upscale_factor=upscale_factor,
            condition_noise_level=condition_noise_level,
            residual=residual,
            residual_scale=residual_scale,
            **(sampling_settings or {}),
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def run_validation(
    unet: Any,
    scheduler: Any,
    upscale_factor: Optional[int],
    samples: List[Dict[str, torch.Tensor]],
    num_images: int,
    scheduler_name: str,
    num_inference_steps: int,
    seed: int = 0,
    condition_noise_level: float = 0.0,
    residual: bool = False,
    residual_scale: float = 1.0,
    resolution: Optional[int] = None,
) -> Tuple[Dict[str, float], PIL.Image.Image]:
    """Super-resolve the validation samples (or draw unconditional samples) and measure them.

    Args:
        unet: the network (in eval mode; the caller swaps in EMA weights if wanted).
        scheduler: the training scheduler; sampling uses `scheduler_name` on the same noise schedule.
        upscale_factor: the model's factor, or None for unconditional models.
        samples: validation samples from `TrainingData.validation_samples` (`hr`, `lr`, `condition`).
        num_images: how many unconditional samples to draw.
        scheduler_name, num_inference_steps: the fast sampler.
        seed: fixes the sampling noise, so successive validations are comparable.
        condition_noise_level: noise-conditioning augmentation level at sampling (models trained with it).
        residual, residual_scale: the model diffuses the residual HR - upsample, times `residual_scale`.
        resolution: the size of unconditional samples, the size trained at (default: the UNet's `sample_size`).

    Returns:
        `(metrics, grid)`: mean PSNR / SSIM / consistency (super-resolution only) and a picture with one row per
        image: LR | bicubic | SR3 | HR, or a grid of unconditional samples.
    """
    pipeline = build_pipeline(
        unet, swap_scheduler(scheduler, scheduler_name), upscale_factor, condition_noise_level, residual, residual_scale
    )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if upscale_factor is None:
        images = pipeline(
            batch_size=num_images,
            num_inference_steps=num_inference_steps,
            generator=generator,
            height=resolution,
            width=resolution,
            output_type="pt",
        ).images
        pictures = tensor_to_pil(images * 2 - 1)
        columns = math.ceil(math.sqrt(len(pictures)))
        rows = [pictures[start : start + columns] for start in range(0, len(pictures), columns)]
        return {}, grid(rows)
    hr = torch.stack([sample["hr"] for sample in samples])
    lr = torch.stack([sample["lr"] for sample in samples])
    condition = torch.stack([sample["condition"] for sample in samples])
    sr = pipeline((lr + 1) / 2, num_inference_steps=num_inference_steps, generator=generator, output_type="pt")
    sr = sr.images.cpu() * 2 - 1
    metrics = summarize(evaluate_batch(sr, hr, lr))
    columns = [tensor_to_pil(part) for part in (lr, condition, sr, hr)]
    size = (hr.shape[-1], hr.shape[-2])
    return metrics, grid([list(row) for row in zip(*columns)], size=size)


def log_validation(accelerator: Any, metrics: Dict[str, float], picture: PIL.Image.Image, step: int) -> None:
    """Send the metrics (`val/<name>`) and the picture (`validation`) to every active tracker."""
    import numpy as np

    if metrics:
        accelerator.log({f"val/{name}": value for name, value in metrics.items()}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(picture), step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(picture, caption="LR | bicubic | SR3 | HR")]}, step=step)
