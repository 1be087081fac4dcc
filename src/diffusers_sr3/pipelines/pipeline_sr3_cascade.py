"""A cascade of SR3 pipelines: an optional unconditional generator, then super-resolution stages.

The SR3 paper's 1024x1024 faces come from three models: unconditional 64x64, SR 64->256, SR 256->1024. Each
stage is a complete pipeline with its own UNet and scheduler, saved in its own subfolder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, replace_example_docstring

from ..image_processing import ImageInput, check_output_type, images_to_tensor, postprocess
from ..tiling import tiled_super_resolve
from .base import GeneratorInput, SR3BasePipeline, serialised
from .pipeline_sr3 import SR3Pipeline
from .pipeline_sr3_unconditional import SR3UnconditionalPipeline

MAX_STAGES = 4
STAGE_NAMES = tuple(f"stage_{index}" for index in range(1, MAX_STAGES + 1))

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_sr3 import SR3CascadePipeline, SR3Pipeline, SR3UnconditionalPipeline

        >>> cascade = SR3CascadePipeline.from_stages(
        ...     SR3UnconditionalPipeline.from_pretrained("faces-64"),
        ...     [SR3Pipeline.from_pretrained("faces-64-256"), SR3Pipeline.from_pretrained("faces-256-1024")],
        ... )
        >>> cascade.save_pretrained("faces-cascade-1024")
        >>> face = cascade(num_inference_steps=[100, 50, 25]).images[0]  # 1024x1024 from noise
        >>> upscaled = cascade(image=face_64, num_inference_steps=[50, 25]).images[0]  # skip the generator
        ```
"""


@dataclass
class SR3CascadePipelineOutput(BaseOutput):
    """Output of [`SR3CascadePipeline`].

    Args:
        images: the final images, by `output_type`.
        stage_images: with `return_all_stages=True`, the output of every stage run (generator first), each by
            `output_type`; else None.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    stage_images: Optional[List[Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]]] = None


class SR3CascadePipeline(SR3BasePipeline):
    r"""Chains an optional unconditional generator (`base`) and up to four super-resolution stages.

    Args:
        base ([`SR3UnconditionalPipeline`], optional): Generates the first images from noise.
        stage_1 ... stage_4 ([`SR3Pipeline`], optional): Super-resolution stages, applied in order; each keeps
            its own scheduler, upscale factor and noise-conditioning augmentation level.
    """

    _optional_components = ["base", *STAGE_NAMES]

    def __init__(
        self,
        base: Optional[SR3UnconditionalPipeline] = None,
        stage_1: Optional[SR3Pipeline] = None,
        stage_2: Optional[SR3Pipeline] = None,
        stage_3: Optional[SR3Pipeline] = None,
        stage_4: Optional[SR3Pipeline] = None,
    ):
        super().__init__()
        stages = [stage_1, stage_2, stage_3, stage_4]
        present = [stage is not None for stage in stages]
        if present != sorted(present, reverse=True):
            raise ValueError("cascade stages must be filled in order: stage_1, stage_2, ... without gaps")
        if base is None and not any(present):
            raise ValueError("a cascade needs a base generator or at least one super-resolution stage")
        if base is not None and not isinstance(base, SR3UnconditionalPipeline):
            raise TypeError(f"base must be an SR3UnconditionalPipeline, got {type(base).__name__}")
        for name, stage in zip(STAGE_NAMES, stages):
            if stage is not None and not isinstance(stage, SR3Pipeline):
                raise TypeError(f"{name} must be an SR3Pipeline, got {type(stage).__name__}")
        self.register_modules(base=base, stage_1=stage_1, stage_2=stage_2, stage_3=stage_3, stage_4=stage_4)

    @classmethod
    def from_stages(cls, base: Optional[SR3UnconditionalPipeline], stages: Sequence[SR3Pipeline]) -> SR3CascadePipeline:
        """Build a cascade from a generator (or None) and a list of super-resolution pipelines."""
        if len(stages) > MAX_STAGES:
            raise ValueError(f"a cascade holds at most {MAX_STAGES} super-resolution stages, got {len(stages)}")
        return cls(base=base, **dict(zip(STAGE_NAMES, stages)))

    @property
    def stages(self) -> List[SR3Pipeline]:
        """The super-resolution stages, in order."""
        return [getattr(self, name) for name in STAGE_NAMES if getattr(self, name, None) is not None]

    def _pipelines(self) -> List[SR3BasePipeline]:
        return ([self.base] if self.base is not None else []) + self.stages

    def to(self, *args, **kwargs) -> SR3CascadePipeline:
        """Move every stage (`cascade.to("cuda")`, `cascade.to(torch.bfloat16)`)."""
        for pipeline in self._pipelines():
            pipeline.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        """The device of the first stage's networks (Diffusers would see no networks here: they are in the stages)."""
        return self._pipelines()[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self._pipelines()[0].dtype

    @property
    def _execution_device(self) -> torch.device:
        return self._pipelines()[0]._execution_device

    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device: Union[torch.device, str] = None) -> None:
        """Keep every stage's UNet on the CPU except while it runs (Diffusers' model offloading, across stages).

        Each stage moves its UNet to `device` when its refinement starts and back to the CPU when it ends, so at
        most one stage's network occupies the accelerator.
        """
        for pipeline in self._pipelines():
            pipeline.enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: Optional[int] = None, device: Union[torch.device, str] = None):
        """Diffusers' sequential (layer by layer) offloading, in every stage."""
        for pipeline in self._pipelines():
            pipeline.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def maybe_free_model_hooks(self) -> None:
        for pipeline in self._pipelines():
            pipeline.maybe_free_model_hooks()

    def remove_all_hooks(self) -> None:
        for pipeline in self._pipelines():
            pipeline.remove_all_hooks()

    def set_progress_bar_config(self, **kwargs) -> None:
        """Apply a progress-bar configuration to every stage."""
        for pipeline in self._pipelines():
            pipeline.set_progress_bar_config(**kwargs)

    @staticmethod
    def _per_stage(value, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} stages to run")
            return list(value)
        return [value] * count

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @serialised
    def __call__(
        self,
        image: Optional[ImageInput] = None,
        batch_size: int = 1,
        num_inference_steps: Optional[Union[int, Sequence[Optional[int]]]] = None,
        generator: GeneratorInput = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_all_stages: bool = False,
        condition_noise_level: Optional[Union[float, Sequence[Optional[float]]]] = None,
        tile_size: Optional[int] = None,
    ) -> Union[SR3CascadePipelineOutput, tuple]:
        r"""Generate (or start from `image`) and super-resolve through every stage.

        Args:
            image (optional): Low-resolution input(s) for the first SR stage (any type [`SR3Pipeline`] takes);
                the generator is then skipped. Without it the `base` generator starts from noise.
            batch_size (`int`, defaults to 1): Images to generate when starting from noise.
            num_inference_steps (`int` or a list, one per stage run): Steps per stage; None keeps each stage's
                default (100 for the generator; an SR stage's own detail settings, `detail_steps` (50 unless saved
                with its own), `detail_strength` and `detail_eta`).
            generator (`torch.Generator` or a list, one per image): Random source for every stage.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`, for the final (and, with
                `return_all_stages`, every stage's) images. Between stages images stay float tensors.
            return_dict (`bool`, defaults to True): Return an [`SR3CascadePipelineOutput`] instead of a tuple.
            return_all_stages (`bool`, defaults to False): Also return each stage's output.
            condition_noise_level (`float` or a list, one per SR stage): Noise-conditioning augmentation level
                for the SR stages that were trained with it (None: each stage's saved default).
            tile_size (`int`, optional): Refine SR stages whose output is larger than this in overlapping tiles of
                this size (seamless; `diffusers_sr3.tiling`), to bound memory at high resolution.

        Between stages images stay tensors on the stages' device (no round trip through the CPU); only the final
        conversion to `output_type` (`"pil"`, `"np"`) moves them to the CPU.

        Examples:

        Returns:
            [`SR3CascadePipelineOutput`] or `tuple` `(images, stage_images)`.
        """
        # 1. Decide which stages run (and refuse an output type before any of them runs).
        check_output_type(output_type)
        run_base = image is None
        if run_base and self.base is None:
            raise ValueError("this cascade has no base generator: pass a low-resolution `image` to start from")
        if not run_base and not self.stages:
            raise ValueError("this cascade has no super-resolution stage to apply to `image`")
        runs = ([self.base] if run_base else []) + self.stages
        steps = self._per_stage(num_inference_steps, len(runs), "num_inference_steps")
        levels = self._per_stage(condition_noise_level, len(self.stages), "condition_noise_level")

        # 2. The first images: generated, or the user's input as a [0, 1] tensor batch.
        stage_outputs = []
        if run_base:
            current = self.base(
                batch_size=batch_size,
                num_inference_steps=100 if steps[0] is None else steps[0],
                generator=generator,
                output_type="pt",
            ).images
            stage_outputs.append(current)
            steps = steps[1:]
        else:
            current = (images_to_tensor(image) + 1) / 2

        # 3. Every super-resolution stage, on float tensors.
        for stage, stage_steps, level in zip(self.stages, steps, levels):
            call = dict(num_inference_steps=stage_steps, generator=generator, output_type="pt")
            if tile_size:
                current = tiled_super_resolve(stage, current, tile_size=tile_size, condition_noise_level=level, **call)
            else:
                current = stage(current, condition_noise_level=level, **call)
            current = current.images
            stage_outputs.append(current)

        images = postprocess(current * 2 - 1, output_type)
        all_stages = (
            [postprocess(output * 2 - 1, output_type) for output in stage_outputs] if return_all_stages else None
        )
        if not return_dict:
            return (images, all_stages)
        return SR3CascadePipelineOutput(images=images, stage_images=all_stages)
