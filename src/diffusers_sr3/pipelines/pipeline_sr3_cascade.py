"""A cascade of SR3 pipelines: an optional unconditional generator, then super-resolution stages.

The SR3 paper's 1024x1024 faces come from three models: unconditional 64x64, SR 64->256, SR 256->1024. Each
stage is a complete pipeline with its own UNet and scheduler, saved in its own subfolder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, replace_example_docstring

from ..defaults import DEFAULT_MAX_TILE_PIXELS
from ..image_processing import ImageInput, check_output_type, images_to_tensor, postprocess
from ..tiling import _check_settings as check_tile_settings
from ..tiling import tiled_super_resolve
from .base import GeneratorInput, SR3BasePipeline, check_num_inference_steps, serialised, share_call_lock
from .pipeline_sr3 import SR3Pipeline
from .pipeline_sr3_unconditional import DEFAULT_NUM_INFERENCE_STEPS, SR3UnconditionalPipeline

MAX_STAGES = 4
STAGE_NAMES = tuple(f"stage_{index}" for index in range(1, MAX_STAGES + 1))
# The SR stages' per-call arguments a cascade passes on: one value for every SR stage, or one per SR stage.
STAGE_ARGUMENTS = ("condition_noise_level", "mode", "eta", "temperature", "strength", "guidance_scale")


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_sr3 import SR3CascadePipeline, SR3Pipeline, SR3UnconditionalPipeline

        >>> cascade = SR3CascadePipeline.from_stages(
        ...     SR3UnconditionalPipeline.from_pretrained("faces-64"),
        ...     [SR3Pipeline.from_pretrained("faces-64-256"), SR3Pipeline.from_pretrained("faces-256-1024")],
        ... )
        >>> cascade.save_pretrained("faces-cascade-1024")
        >>> output = cascade(num_inference_steps=[100, 50, 25], return_all_stages=True)
        >>> face = output.images[0]  # 1024x1024 from noise
        >>> face_64 = output.stage_images[0][0]  # the generator's 64x64 face; or a PIL image of your own
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
        share_call_lock([self, *self._pipelines()])

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # A copy or an unpickled cascade is not built by __init__: its lock is shared with its stages' here.
        self.__dict__.update(state)
        share_call_lock([self, *self._pipelines()])

    @classmethod
    def from_stages(
        cls,
        base: Optional[SR3UnconditionalPipeline],
        stages: Union[SR3Pipeline, Iterable[SR3Pipeline]],
    ) -> SR3CascadePipeline:
        """Build a cascade from a generator (or None) and super-resolution pipelines.

        Args:
            base ([`SR3UnconditionalPipeline`], optional): The generator; None for a cascade that only upscales.
            stages ([`SR3Pipeline`] or an iterable of them): The super-resolution stages, in order.
        """
        if isinstance(stages, SR3Pipeline):
            stages = [stages]
        elif isinstance(stages, Iterable) and not isinstance(stages, (str, bytes)):
            stages = list(stages)
        else:
            raise TypeError(f"stages must be an SR3Pipeline or an iterable of them, got {type(stages).__name__}")
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
    def _is_per_stage(value: Any) -> bool:
        """Whether `value` holds one value per stage: a sequence other than a string, or a numpy array."""
        if isinstance(value, np.ndarray):
            return value.ndim > 0
        return isinstance(value, Sequence) and not isinstance(value, (str, bytes))

    @classmethod
    def _per_stage(cls, value, count: int, name: str) -> list:
        """`value` as `count` per-stage values: its entries when it holds one per stage, else `value` for each."""
        if cls._is_per_stage(value):
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} stages to run")
            return list(value)
        return [value] * count

    def check_arguments(
        self,
        start_from_image: bool = False,
        num_inference_steps: Optional[Union[int, Sequence[Optional[int]]]] = None,
        condition_noise_level: Optional[Union[float, Sequence[Optional[float]]]] = None,
        tile_size: Optional[int] = None,
        mode: Optional[Union[str, Sequence[Optional[str]]]] = None,
        eta: Optional[Union[float, Sequence[Optional[float]]]] = None,
        temperature: Optional[Union[float, Sequence[Optional[float]]]] = None,
        strength: Optional[Union[float, Sequence[Optional[float]]]] = None,
        guidance_scale: Optional[Union[float, Sequence[Optional[float]]]] = None,
    ) -> Dict[str, list]:
        """Refuse, before any stage runs, arguments that any stage to run would refuse, naming the stage.

        `__call__` checks its arguments with this; a caller with work of its own to start first (`sr3 sample`'s
        progress bar) may check them earlier.

        Args:
            start_from_image (`bool`, defaults to False): Whether the call gives an `image` (the generator is skipped).
            num_inference_steps, condition_noise_level, tile_size, mode, eta, temperature, strength, guidance_scale:
                As in `__call__`.

        Returns:
            `dict` with `num_inference_steps` (one per stage to run, generator first) and `stage_calls` (for each SR
            stage, the keyword arguments of `STAGE_ARGUMENTS` given for it).
        """
        run_base = not start_from_image
        if run_base and self.base is None:
            raise ValueError("this cascade has no base generator: pass a low-resolution `image` to start from")
        if not run_base and not self.stages:
            raise ValueError("this cascade has no super-resolution stage to apply to `image`")
        runs = ([self.base] if run_base else []) + self.stages
        names = (["base"] if run_base else []) + list(STAGE_NAMES[: len(self.stages)])
        steps = self._per_stage(num_inference_steps, len(runs), "num_inference_steps")
        given = dict(
            condition_noise_level=condition_noise_level,
            mode=mode,
            eta=eta,
            temperature=temperature,
            strength=strength,
            guidance_scale=guidance_scale,
        )
        values = {name: self._per_stage(given[name], len(self.stages), name) for name in STAGE_ARGUMENTS}
        if condition_noise_level is not None and not self._is_per_stage(condition_noise_level):
            # One level is for the stages trained with noise-conditioning augmentation; the others take none.
            embedded = [stage.unet.config.get("condition_noise_embedding", False) for stage in self.stages]
            # 0 is no augmentation, which every stage takes.
            if condition_noise_level and not any(embedded):
                raise ValueError(
                    f"condition_noise_level {condition_noise_level:g} needs an SR stage trained with "
                    "condition_noise_embedding=True; this cascade has none"
                )
            values["condition_noise_level"] = [condition_noise_level if e else None for e in embedded]
        stage_calls = []
        for index, (name, pipeline, stage_steps) in enumerate(zip(names, runs, steps)):
            try:
                if run_base and index == 0:
                    default = DEFAULT_NUM_INFERENCE_STEPS if stage_steps is None else stage_steps
                    check_num_inference_steps(default, pipeline.scheduler)
                    continue
                call = {key: values[key][len(stage_calls)] for key in STAGE_ARGUMENTS}
                call = {key: value for key, value in call.items() if value is not None}
                pipeline.check_arguments(num_inference_steps=stage_steps, **call)
                if tile_size:
                    check_tile_settings(pipeline.unet, tile_size, None, DEFAULT_MAX_TILE_PIXELS)
                stage_calls.append(call)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        return {"num_inference_steps": steps, "stage_calls": stage_calls}

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
        mode: Optional[Union[str, Sequence[Optional[str]]]] = None,
        eta: Optional[Union[float, Sequence[Optional[float]]]] = None,
        temperature: Optional[Union[float, Sequence[Optional[float]]]] = None,
        strength: Optional[Union[float, Sequence[Optional[float]]]] = None,
        guidance_scale: Optional[Union[float, Sequence[Optional[float]]]] = None,
    ) -> Union[SR3CascadePipelineOutput, tuple]:
        r"""Generate (or start from `image`) and super-resolve through every stage.

        Args:
            image (optional): Low-resolution input(s) for the first SR stage (any type [`SR3Pipeline`] takes);
                the generator is then skipped. Without it the `base` generator starts from noise.
            batch_size (`int`, defaults to 1): Images to generate when starting from noise.
            num_inference_steps (`int` or a list, one per stage run): Steps per stage; None keeps each stage's
                default (100 for the generator; an SR stage's own detail settings, `detail_steps` (50 unless saved
                with its own), `detail_strength` and `detail_eta`, or its `fidelity_steps` in fidelity mode). Each
                must be an integer the stage's scheduler takes (at most its `num_train_timesteps`).
            generator (`torch.Generator` or a list, one per image): Random source for every stage.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`, for the final (and, with
                `return_all_stages`, every stage's) images. Between stages images stay float tensors.
            return_dict (`bool`, defaults to True): Return an [`SR3CascadePipelineOutput`] instead of a tuple.
            return_all_stages (`bool`, defaults to False): Also return each stage's output.
            condition_noise_level (`float` or a list, one per SR stage): Noise-conditioning augmentation level, in
                [0, 1). One value applies to the SR stages trained with it (`condition_noise_embedding`), the others
                taking none; a list gives each SR stage its own, and a stage trained without it takes only None or
                0. None: each stage's saved default.
            tile_size (`int`, optional): Refine SR stages whose output is larger than this in overlapping tiles of
                this size (seamless; `diffusers_sr3.tiling`), to bound memory at high resolution. A multiple of
                every SR stage's downsampling factor.
            mode (`str` or a list, one per SR stage): [`SR3Pipeline`]'s `mode`, `"detail"` or `"fidelity"`; None:
                `"detail"`.
            eta, temperature, strength, guidance_scale (`float` or a list, one per SR stage): [`SR3Pipeline`]'s
                detail-mode arguments of those names, one value for every SR stage or one per SR stage; None: the
                stage's saved default.

        Every stage's arguments are checked before the first stage runs; an error names the stage (`base`,
        `stage_1`, ...).

        Between stages images stay tensors on the stages' device (no round trip through the CPU); only the final
        conversion to `output_type` (`"pil"`, `"np"`) moves them to the CPU.

        Examples:

        Returns:
            [`SR3CascadePipelineOutput`] or `tuple` `(images, stage_images)`.
        """
        # 1. Decide which stages run, and refuse the output type and every stage's arguments before any of them runs.
        check_output_type(output_type)
        run_base = image is None
        checked = self.check_arguments(
            start_from_image=not run_base,
            num_inference_steps=num_inference_steps,
            condition_noise_level=condition_noise_level,
            tile_size=tile_size,
            mode=mode,
            eta=eta,
            temperature=temperature,
            strength=strength,
            guidance_scale=guidance_scale,
        )
        steps = checked["num_inference_steps"]

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
        for stage, stage_steps, stage_call in zip(self.stages, steps, checked["stage_calls"]):
            call = dict(num_inference_steps=stage_steps, generator=generator, output_type="pt", **stage_call)
            if tile_size:
                current = tiled_super_resolve(stage, current, tile_size=tile_size, **call)
            else:
                current = stage(current, **call)
            current = current.images
            stage_outputs.append(current)

        images = postprocess(current * 2 - 1, output_type)
        all_stages = (
            [postprocess(output * 2 - 1, output_type) for output in stage_outputs] if return_all_stages else None
        )
        if not return_dict:
            return (images, all_stages)
        return SR3CascadePipelineOutput(images=images, stage_images=all_stages)
