"""diffusers-sr3: SR3 (Image Super-Resolution via Iterative Refinement) for Hugging Face Diffusers."""

from .convert import CheckpointError, convert_original_checkpoint
from .image_processing import degrade, images_to_tensor, upsample_condition
from .models import SR3UNet2DModel, SR3UNet2DOutput
from .noise import (
    make_beta_schedule,
    make_scheduler,
    noise_level_for_step,
    sample_training_noise_levels,
    swap_scheduler,
)
from .pipelines import (
    SR3BasePipeline,
    SR3CascadePipeline,
    SR3CascadePipelineOutput,
    SR3Pipeline,
    SR3PipelineOutput,
    SR3UnconditionalPipeline,
)
from .pipelines.base import register_remote_code_modules

register_remote_code_modules()

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "SR3BasePipeline",
    "SR3CascadePipeline",
    "SR3CascadePipelineOutput",
    "SR3Pipeline",
    "SR3PipelineOutput",
    "SR3UNet2DModel",
    "SR3UNet2DOutput",
    "SR3UnconditionalPipeline",
    "convert_original_checkpoint",
    "degrade",
    "images_to_tensor",
    "make_beta_schedule",
    "make_scheduler",
    "noise_level_for_step",
    "sample_training_noise_levels",
    "swap_scheduler",
    "upsample_condition",
]
