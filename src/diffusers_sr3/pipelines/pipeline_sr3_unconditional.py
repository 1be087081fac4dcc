"""Unconditional SR3/DDPM image generation (the original's 128x128 face generation)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring

from ..image_processing import check_output_type, postprocess
from ..models.unet_sr3 import SR3UNet2DModel
from .base import GeneratorInput, SR3BasePipeline, SR3PipelineOutput, StepCallback, serialised

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_sr3 import SR3UnconditionalPipeline

        >>> pipe = SR3UnconditionalPipeline.from_pretrained("sr3-faces-128")  # e.g. the original's, `sr3 convert`ed
        >>> images = pipe(batch_size=4, num_inference_steps=100).images
        >>> len(images)
        4
        ```
"""


# Steps of a call that gives none: the original's sampling loop at a fraction of its 2000.
DEFAULT_NUM_INFERENCE_STEPS = 100


class SR3UnconditionalPipeline(SR3BasePipeline):
    r"""Unconditional generation with an SR3 (noise-level) or DDPM (timestep) UNet.

    Args:
        unet ([`SR3UNet2DModel`]): An unconditional UNet (`in_channels == out_channels`).
        scheduler ([`SchedulerMixin`]): Any fitting Diffusers scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: SR3UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError(
                f"SR3UnconditionalPipeline needs an unconditional UNet (in_channels == out_channels); this one has "
                f"in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}"
            )
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @serialised
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        generator: GeneratorInput = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_intermediates: int = 0,
        callback_on_step_end: Optional[StepCallback] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        latents: Optional[torch.Tensor] = None,
    ) -> Union[SR3PipelineOutput, Tuple]:
        r"""Generate images from noise.

        Args:
            batch_size (`int`, defaults to 1): Number of images.
            num_inference_steps (`int`, defaults to 100): Scheduler steps.
            generator (`torch.Generator` or a list of `batch_size` of them): Makes sampling deterministic; without
                one the global torch RNG is used, as the original code does.
            height, width (`int`, optional): Output size; defaults to the UNet's `sample_size`. Must be multiples
                of the UNet's downsampling factor.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"` (see [`SR3Pipeline`]), with the
                UNet's `out_channels` channels: a one-channel model gives gray ("L") PIL images, `(B, H, W, 1)` numpy
                arrays and `(B, 1, H, W)` tensors.
            return_dict (`bool`, defaults to True): Return an [`SR3PipelineOutput`] instead of a tuple.
            num_intermediates (`int`, defaults to 0): Also return this many evenly spaced snapshots (every step's
                when there are fewer steps).
            callback_on_step_end, callback_on_step_end_tensor_inputs: As in [`SR3Pipeline`] (`"latents"` only).
            latents (`torch.Tensor`, optional): The starting noise, `(batch_size, out_channels, height, width)`, unit
                variance; drawn from `generator` when not given.

        Examples:

        Returns:
            [`SR3PipelineOutput`] or `tuple`: `(images, intermediates)` when `return_dict` is False.
        """
        # 1. Check the output type and the size.
        check_output_type(output_type)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        height = height or self.unet.config.sample_size
        width = width or self.unet.config.sample_size
        factor = self.unet.downsampling_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")

        # 2. Generate.
        shape = (batch_size, self.unet.config.out_channels, height, width)
        result, snapshots = self._denoise(
            shape,
            None,
            num_inference_steps,
            generator,
            num_intermediates,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            latents=latents,
        )

        # 3. Convert.
        images = postprocess(result, output_type)
        intermediates = [postprocess(s, output_type) for s in snapshots] or None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, intermediates)
        return SR3PipelineOutput(images=images, intermediates=intermediates)
