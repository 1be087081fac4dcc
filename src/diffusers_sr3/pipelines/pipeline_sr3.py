"""SR3 super-resolution: iterative refinement of a bicubic upsample, with any fitting Diffusers scheduler."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..defaults import (  # noqa: F401 (evaluations_per_crop and the config keys: re-exported, they lived here before)
    DETAIL_ARGUMENTS,
    DETAIL_CONFIG_KEYS,
    DETAIL_STEPS,
    FIDELITY_STEPS,
    MIRRORS,
    SAMPLING_CONFIG_KEYS,
    SELF_ENSEMBLE_SIZE,
    evaluations_per_crop,
    steps_to_run,
)
from ..detail_windows import lowpass_sigma, windowed_networks
from ..image_processing import (
    ImageInput,
    check_output_type,
    images_to_tensor,
    pad_to_multiple,
    postprocess,
    upsample_condition,
)
from ..models.unet_sr3 import SR3UNet2DModel
from ..noise import augment_condition, check_scheduler_fits, scheduler_takes_eta, swap_scheduler
from .base import (
    GeneratorInput,
    SR3BasePipeline,
    SR3PipelineOutput,
    StepCallback,
    check_eta,
    check_num_inference_steps,
    refinement_length,
    serialised,
    step_networks,
)

# What a super-resolution UNet's config records of its output (`SR3Pipeline.save_pretrained` writes them).
OUTPUT_MEANING_KEYS = ("upscale_factor", "residual", "residual_scale")

# The seed of fidelity mode's noise-conditioning augmentation (models with `condition_noise_embedding`): each image's
# condition is noised from its own CPU generator seeded with it, never from the call's generator, so a fidelity answer
# is the same for every seed, in a batch or alone, on every device.
FIDELITY_CONDITION_NOISE_SEED = 0


def _recorded(unet: SR3UNet2DModel, name: str, value: Any, default: Any) -> Any:
    """`value` if given, else what `unet`'s config records under `name`, else `default`."""
    if value is not None:
        return value
    recorded = getattr(unet, "config", {}).get(name)
    return default if recorded is None else recorded


# What a guide must share with the UNet it guides: the same inputs and outputs, read the same way.
_GUIDE_MUST_MATCH = ("in_channels", "out_channels", "conditioning_type", "condition_noise_embedding")


def _check_guidance(
    unet: SR3UNet2DModel,
    guidance_unet: Optional[SR3UNet2DModel],
    guidance_scale: float,
    parallel_guidance_weight: float = 1.0,
    scheduler: Optional[SchedulerMixin] = None,
) -> None:
    """Refuse a guide that cannot stand beside `unet`, or guidance settings with nothing to guide by."""
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be at least 0, got {guidance_scale}")
    if not parallel_guidance_weight >= 0:
        raise ValueError(f"parallel_guidance_weight must be at least 0, got {parallel_guidance_weight}")
    # The missing guide first: a model that predicts the clean image would still need one for either setting.
    if guidance_unet is None:
        if guidance_scale != 1:
            raise ValueError(f"guidance_scale {guidance_scale:g} needs a guidance_unet; without one it must be 1")
        if parallel_guidance_weight != 1:
            raise ValueError(
                f"parallel_guidance_weight {parallel_guidance_weight:g} needs a guidance_unet; without one it must be 1"
            )
        return
    if parallel_guidance_weight != 1 and scheduler is not None:
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type != "sample":
            raise ValueError(
                f"parallel_guidance_weight {parallel_guidance_weight:g} weighs the guidance update along the "
                f"predicted clean image, which needs a model that predicts it (prediction_type 'sample'); this one "
                f"predicts {prediction_type!r}"
            )
    for key in _GUIDE_MUST_MATCH:
        if unet.config.get(key) != guidance_unet.config.get(key):
            raise ValueError(
                f"the guidance_unet has {key}={guidance_unet.config.get(key)!r} where the unet has "
                f"{unet.config.get(key)!r}: a guide must take the same inputs as the model it guides"
            )
    if guidance_unet.downsampling_factor != unet.downsampling_factor:
        raise ValueError(
            f"the guidance_unet divides sizes by {guidance_unet.downsampling_factor}, the unet by "
            f"{unet.downsampling_factor}: a guide must have the same downsampling factor"
        )


def _refuse_detail_settings(
    eta: Optional[float],
    temperature: float,
    strength: Optional[float],
    guidance_scale: Optional[float],
    window_size: Optional[int],
    parallel_guidance_weight: Optional[float] = None,
) -> None:
    """Refuse detail mode's settings in a fidelity call (and its self-ensemble), rather than ignore them."""
    if (
        eta
        or temperature != 1.0
        or strength not in (None, 1)
        or guidance_scale not in (None, 1)
        or window_size not in (None, 0)
        or parallel_guidance_weight not in (None, 1)
    ):
        raise ValueError(
            f"{', '.join(DETAIL_ARGUMENTS[:-1])} and {DETAIL_ARGUMENTS[-1]} apply to detail mode; fidelity mode is "
            "eta 0, temperature 0, unguided, on the whole image"
        )


def _check_window_size(unet: SR3UNet2DModel, window_size: int, name: str) -> None:
    """Refuse a window size the UNet cannot run: 0 (off) or a positive multiple of its downsampling factor."""
    factor = unet.downsampling_factor
    if int(window_size) != window_size or window_size < 0 or window_size % factor:
        raise ValueError(
            f"{name} must be 0 (off) or a positive multiple of the UNet's downsampling factor {factor}, "
            f"got {window_size}"
        )


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_sr3 import SR3Pipeline
        >>> from diffusers_sr3.photos import load_photo, packaged_photo_paths

        >>> pipe = SR3Pipeline.from_pretrained("sr3-photos-x4")  # the x4 photo model that ships in the package
        >>> low_res = load_photo(packaged_photo_paths()[0], max_side=32)  # or PIL.Image.open("your_photo.png")
        >>> image = pipe(low_res).images[0]  # detail mode, at the steps and settings the model was saved with
        >>> image.size == (4 * low_res.width, 4 * low_res.height)
        True
        >>> image.save("photo_x4.png")
        >>> pipe(low_res, mode="fidelity").images[0].save("photo_x4_fidelity.png")  # the average answer, no texture
        ```
"""


class SR3Pipeline(SR3BasePipeline):
    r"""Super-resolution by iterative refinement (SR3).

    The low-resolution input is bicubic-upsampled to the output size; starting from noise, the scheduler then
    refines an image conditioned on that upsample, feeding the UNet the noise level of each step.

    Args:
        unet ([`SR3UNet2DModel`]): A conditional SR3 UNet (`in_channels = out_channels + 3`).
        scheduler ([`SchedulerMixin`]): Any Diffusers scheduler for epsilon/v/sample prediction; DDPM reproduces
            the original sampler, DDIM, DPM-Solver, UniPC and Euler need far fewer steps.
        upscale_factor (`int`, optional): The model's super-resolution factor (output size = input size x
            factor unless `output_size` is given). Defaults to the one the UNet's config records (every pipeline
            records its `upscale_factor`, `residual` and `residual_scale` in its UNet's config when it saves it),
            else 4.
        condition_noise_level (`float`, defaults to 0.0): For UNets with `condition_noise_embedding`: the default
            noise level added to the upsampled input before refinement (noise-conditioning augmentation). Detail
            mode draws that noise from the call's generator; fidelity mode from a fixed seed
            (`FIDELITY_CONDITION_NOISE_SEED`, 0), so its answer does not depend on the seed.
        residual (`bool`, optional): The model diffuses the residual between the high-resolution image and
            the bicubic upsample (as SRDiff does) instead of the image itself: the result is the upsample plus the
            refined residual. Set by training with `residual=True`; the original SR3 models diffuse the image.
            Defaults to what the UNet's config records, else False: so `SR3Pipeline(**pipe.components)` of a loaded
            pipeline and a pipeline built from a saved `unet` folder read a residual model's output as it was
            trained (a pipeline built in memory records it on its UNet when it saves).
        residual_scale (`float`, optional): Residual models diffuse `residual_scale * (HR - upsample)`, so
            that the residual has about unit variance, as the noise schedule assumes; the refined result is divided
            by it before it is added to the upsample. Measured from the training data by the training script.
            Defaults to what the UNet's config records, else 1.
        guidance_unet ([`SR3UNet2DModel`], optional): A weaker model of the same task for autoguidance (Karras et
            al., *Guiding a Diffusion Model with a Bad Version of Itself*, 2024): an earlier checkpoint of the same
            training run, or a smaller network trained on the same data. Detail mode then extrapolates each step's
            prediction away from the guide's, towards what the better model knows and the weaker one does not:
            sharper, more photographic texture. Same input and output channels, conditioning and downsampling
            factor as `unet`.
        guidance_scale (`float`, defaults to 1.0): Detail mode's default guidance scale: `guide + guidance_scale *
            (unet - guide)` at every step; 1 runs `unet` alone. Above 1 needs a `guidance_unet`.
        parallel_guidance_weight (`float`, defaults to 1.0): Detail mode's default weight of the guidance update's
            component along the UNet's own prediction (see `__call__`); 1 is plain autoguidance. Other values need a
            `guidance_unet` and a model that predicts the clean image (`prediction_type` `"sample"`).
        detail_steps (`int`, defaults to 50): Detail mode's default `num_inference_steps`. A model saved with its
            sampler's studied step count (the packaged one: 10 DDIM steps) samples at that count unless told
            otherwise.
        detail_strength (`float`, defaults to 1.0): Detail mode's default `strength`, in (0, 1]; below 1 needs a
            model that predicts the clean image.
        detail_eta (`float`, optional): Detail mode's default `eta`, given to schedulers whose `step` takes it
            (DDIM, which refuses more than 1) and left out for the others, so a scheduler swapped in later still
            runs. None: the scheduler's own default (0 for DDIM).
        detail_window_size (`int`, defaults to 0): Detail mode's default `window_size`: 0 runs the network on the
            whole image only; the training crop's size (`unet.config.sample_size`) adds the texture the network
            draws on crops of that size (see `__call__`). A multiple of the UNet's downsampling factor.
        fidelity_steps (`int`, defaults to 1): Fidelity mode's default `num_inference_steps`, also the steps of the
            fidelity answer that detail mode below strength 1 starts from. One evaluation at the noisiest level is
            the network's estimate of the average answer, as good as more steps once the model is well trained; a
            model trained for minutes (`sr3 demo`'s) gains from a few more.
    """

    model_cpu_offload_seq = "unet->guidance_unet"
    _optional_components = ["guidance_unet"]
    _callback_tensor_inputs = ["latents", "condition"]

    def __init__(
        self,
        unet: SR3UNet2DModel,
        scheduler: SchedulerMixin,
        upscale_factor: Optional[int] = None,
        condition_noise_level: float = 0.0,
        residual: Optional[bool] = None,
        residual_scale: Optional[float] = None,
        guidance_unet: Optional[SR3UNet2DModel] = None,
        guidance_scale: float = 1.0,
        parallel_guidance_weight: float = 1.0,
        detail_steps: int = DETAIL_STEPS,
        detail_strength: float = 1.0,
        detail_eta: Optional[float] = None,
        detail_window_size: int = 0,
        fidelity_steps: int = FIDELITY_STEPS,
    ):
        super().__init__()
        # What the UNet records of its own output fills in what is not given (an argument given wins).
        upscale_factor, residual, residual_scale = (
            _recorded(unet, name, value, default)
            for name, value, default in (
                ("upscale_factor", upscale_factor, 4),
                ("residual", residual, False),
                ("residual_scale", residual_scale, 1.0),
            )
        )
        if not residual_scale > 0:
            raise ValueError(f"residual_scale must be positive, got {residual_scale}")
        if int(detail_steps) != detail_steps or detail_steps < 1:
            raise ValueError(f"detail_steps must be a positive integer, got {detail_steps}")
        if int(fidelity_steps) != fidelity_steps or fidelity_steps < 1:
            raise ValueError(f"fidelity_steps must be a positive integer, got {fidelity_steps}")
        if not 0 < detail_strength <= 1:
            raise ValueError(f"detail_strength must lie in (0, 1], got {detail_strength}")
        # Not capped at 1 here, so that pipelines saved with more still load (samplers without eta ignore it); a
        # sampler that takes it refuses more than 1 when it runs.
        if detail_eta is not None and not detail_eta >= 0:
            raise ValueError(f"detail_eta must be at least 0 (or None: the scheduler's default), got {detail_eta}")
        _check_guidance(unet, guidance_unet, guidance_scale, parallel_guidance_weight, scheduler)
        _check_window_size(unet, detail_window_size, "detail_window_size")
        if upscale_factor < 1:
            raise ValueError(f"upscale_factor must be a positive integer, got {upscale_factor}")
        condition_channels = unet.config.in_channels - unet.config.out_channels
        if condition_channels != 3:
            raise ValueError(
                f"SR3Pipeline needs a conditional UNet (in_channels = out_channels + 3); this one has "
                f"in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}"
            )
        if detail_strength < 1 and scheduler.config.get("prediction_type", "epsilon") not in ("sample", "v_prediction"):
            raise ValueError(
                f"detail_strength {detail_strength:g} starts detail mode from the fidelity answer, which needs a model "
                "that predicts the clean image; this scheduler's prediction_type is "
                f"{scheduler.config.get('prediction_type', 'epsilon')!r}"
            )
        self.register_modules(unet=unet, scheduler=scheduler, guidance_unet=guidance_unet)
        self.register_to_config(
            upscale_factor=int(upscale_factor),
            condition_noise_level=float(condition_noise_level),
            residual=bool(residual),
            residual_scale=float(residual_scale),
            guidance_scale=float(guidance_scale),
            parallel_guidance_weight=float(parallel_guidance_weight),
            detail_steps=int(detail_steps),
            detail_strength=float(detail_strength),
            detail_eta=None if detail_eta is None else float(detail_eta),
            detail_window_size=int(detail_window_size),
            fidelity_steps=int(fidelity_steps),
        )

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """[`SR3BasePipeline.save_pretrained`], with the UNet's (and guide's) config recording what its output means
        (`upscale_factor`, `residual`, `residual_scale`), so that a pipeline built from the saved networks alone reads
        it right. The networks in memory keep their own config: a training run compares it with its checkpoints'.

        The arguments are [`SR3BasePipeline.save_pretrained`]'s, named rather than passed through: a cascade saving
        this pipeline as a stage passes `safe_serialization`, `variant` and `max_shard_size` only to a save method
        whose signature names them (else a stage's variant would overwrite its main weights).
        """
        meaning = {key: self.config[key] for key in OUTPUT_MEANING_KEYS}
        networks = [
            getattr(network, "_orig_mod", network)  # a torch.compile'd network's config is its module's
            for network in step_networks(self).values()
        ]
        networks = [network for network in networks if isinstance(network, ModelMixin)]  # not a backend's stand-in
        before = [{key: network.config.get(key) for key in OUTPUT_MEANING_KEYS} for network in networks]
        for network in networks:
            network.register_to_config(**meaning)
        try:
            super().save_pretrained(
                save_directory,
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                push_to_hub=push_to_hub,
                **kwargs,
            )
        finally:
            for network, config in zip(networks, before):
                network.register_to_config(**config)

    def prepare_condition(
        self, image: ImageInput, output_size: Optional[Union[int, Tuple[int, int]]] = None
    ) -> torch.Tensor:
        """The conditioning batch, `(B, 3, H, W)` in [-1, 1]: `image` bicubic-upsampled to the output size."""
        low_resolution = images_to_tensor(image)
        return upsample_condition(low_resolution, self._output_size(low_resolution, output_size))

    def _output_size(
        self, low_resolution: torch.Tensor, output_size: Optional[Union[int, Tuple[int, int]]]
    ) -> Tuple[int, int]:
        """`(height, width)` of the output: `output_size`, by default the input's size times `upscale_factor`."""
        if output_size is None:
            factor = self.config.upscale_factor
            output_size = (low_resolution.shape[-2] * factor, low_resolution.shape[-1] * factor)
        elif isinstance(output_size, int):
            output_size = (output_size, output_size)
        if min(output_size) < 1:
            raise ValueError(f"output_size must be positive, got {output_size}")
        return tuple(output_size)

    def _augment_condition(
        self, condition: torch.Tensor, level: Optional[float], generator: GeneratorInput, fixed: bool = False
    ) -> Tuple[torch.Tensor, Optional[float]]:
        """Noise the condition for UNets trained with noise-conditioning augmentation; others take it clean.

        Args:
            condition: the upsampled input batch, `(B, 3, H, W)` in [-1, 1].
            level: the call's `condition_noise_level` (None: the pipeline's default).
            generator: the call's generator(s), which the noise is drawn from unless `fixed`.
            fixed: draw each image's noise from a generator seeded with `FIDELITY_CONDITION_NOISE_SEED` instead
                (fidelity mode, whose answer must not depend on the seed).
        """
        level = self._condition_noise_level(level)
        if level is None:
            return condition, None
        if level == 0:
            return condition, 0.0
        if isinstance(generator, list) and len(generator) != condition.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {condition.shape[0]} images")
        # Drawn for the execution device as Diffusers pipelines draw: on the generator's device (a CPU generator
        # gives the same noise everywhere, a CUDA generator draws on CUDA), one image per generator of a list.
        noise = randn_tensor(condition.shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        if fixed:
            # Drawn above all the same, and left unused, so that what the caller's generator draws next (a cascade's
            # later stages) is what it was before fidelity mode stopped using it. One generator per image, so that an
            # image's noise is the same in a batch as alone; on the CPU, so that it is the same on every device.
            fixed_generators = [
                torch.Generator("cpu").manual_seed(FIDELITY_CONDITION_NOISE_SEED) for _ in range(condition.shape[0])
            ]
            noise = randn_tensor(condition.shape, generator=fixed_generators, device=noise.device, dtype=torch.float32)
        return augment_condition(condition.to(noise.device), level, noise=noise), level

    def _condition_noise_level(self, level: Optional[float]) -> Optional[float]:
        """The augmentation level a call with `level` runs at: None for a UNet without `condition_noise_embedding`
        (which refuses a nonzero one), else `level` or the pipeline's default, refused outside [0, 1)."""
        if not self.unet.config.get("condition_noise_embedding", False):
            if level:
                raise ValueError("condition_noise_level needs a UNet trained with condition_noise_embedding=True")
            return None
        level = self.config.condition_noise_level if level is None else float(level)
        if not 0 <= level < 1:
            raise ValueError(f"condition noise levels must lie in [0, 1), got {level:g}")
        return level

    def check_arguments(
        self,
        num_inference_steps: Optional[int] = None,
        condition_noise_level: Optional[float] = None,
        mode: str = "detail",
        eta: Optional[float] = None,
        temperature: float = 1.0,
        strength: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        window_size: Optional[int] = None,
        parallel_guidance_weight: Optional[float] = None,
    ) -> None:
        """Refuse, before any network runs, call arguments that do not depend on the image and that this pipeline
        would refuse during the call (a cascade checks every stage's this way before its first stage runs; `sr3
        upscale` checks its options this way before it prints them as settings).

        Args:
            num_inference_steps, condition_noise_level, mode, eta, temperature, strength, guidance_scale,
                window_size, parallel_guidance_weight: as in `__call__`; checked against this pipeline's scheduler,
                networks and saved defaults.
        """
        self._condition_noise_level(condition_noise_level)
        if strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        if mode == "detail":
            settings = self.detail_settings(
                num_inference_steps, strength, eta, guidance_scale, window_size, parallel_guidance_weight
            )
            check_num_inference_steps(settings["num_inference_steps"], self.scheduler)
            check_eta(self.scheduler, settings["eta"])
            _check_guidance(
                self.unet,
                self.guidance_unet,
                settings["guidance_scale"],
                settings["parallel_guidance_weight"],
                self.scheduler,
            )
            _check_window_size(self.unet, settings["window_size"], "window_size")
            if settings["strength"] < 1:
                # The model first, as `__call__` checks: more steps would not help a model that takes no strength.
                self._check_predicts_clean_image("strength below 1", "strength 1")
                # A strength that runs none of the steps would only be met after the cascade's earlier stages ran.
                steps_to_run(settings["num_inference_steps"], settings["strength"])
        elif mode == "fidelity":
            _refuse_detail_settings(eta, temperature, strength, guidance_scale, window_size, parallel_guidance_weight)
            self._check_predicts_clean_image("fidelity mode", "mode='detail' with strength 1")
            steps = self.config.fidelity_steps if num_inference_steps is None else num_inference_steps
            check_num_inference_steps(steps, self._fidelity_scheduler())
        else:
            raise ValueError(f"mode must be 'detail' or 'fidelity', got {mode!r}")

    def _fidelity_scheduler(self) -> SchedulerMixin:
        """DDIM on the pipeline's training schedule, its steps ending at the noisiest level ("trailing" spacing).

        The first step must be the noisiest: from there an x0-predicting network's answer is its posterior mean,
        which is what fidelity mode returns. Diffusers' default "leading" spacing starts a few steps below it (the
        first of 4 steps at three quarters of the schedule, the only one of 1 step at its clean end).
        """
        return swap_scheduler(self.scheduler, "ddim", timestep_spacing="trailing")

    def _check_predicts_clean_image(self, feature: str, remedy: str) -> None:
        """Refuse `feature` on a model that does not predict the clean image; `remedy` says what to use instead."""
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("sample", "v_prediction"):
            raise ValueError(
                f"{feature} needs a model that predicts the clean image (prediction_type 'sample' or "
                f"'v_prediction'); this one predicts {prediction_type!r}: use {remedy}"
            )

    def _fidelity_estimate(
        self,
        shape: Tuple[int, int, int, int],
        condition: torch.Tensor,
        steps: int,
        condition_noise_level: Optional[float],
    ) -> torch.Tensor:
        """The fidelity mode's answer, in the network's scale: where a detail refinement of `strength` < 1 starts."""
        zeros = torch.zeros(shape, device=self._execution_device)
        estimate, _ = self._denoise(
            shape,
            condition,
            steps,
            None,
            0,
            None,
            (),
            condition_noise_level,
            eta=0.0,
            latents=zeros,
            temperature=0.0,
            scheduler=self._fidelity_scheduler(),
        )
        return estimate

    def _self_ensemble(
        self,
        image: ImageInput,
        output_size: Optional[Union[int, Tuple[int, int]]],
        num_inference_steps: Optional[int],
        generator: GeneratorInput,
        condition_noise_level: Optional[float],
        output_type: str,
    ):
        """The mean of the fidelity answers for the input's 8 orientations, each turned back to the input's."""
        low_resolution = (images_to_tensor(image) + 1) / 2
        height, width = self._output_size(low_resolution, output_size)
        total = 0.0
        steps = self.config.fidelity_steps if num_inference_steps is None else num_inference_steps
        scheduler = self._fidelity_scheduler()
        # One bar for the 8 answers. One orientation at a time: the peak memory stays that of a single call.
        with self._one_progress_bar(
            SELF_ENSEMBLE_SIZE * refinement_length(scheduler, check_num_inference_steps(steps, scheduler))
        ):
            for turns in (0, 1):
                turned = torch.rot90(low_resolution, turns, dims=(-2, -1))
                for dims in MIRRORS:
                    answer = self(
                        turned.flip(dims) if dims else turned,
                        num_inference_steps=num_inference_steps,
                        generator=generator,
                        output_size=(width, height) if turns else (height, width),
                        output_type="pt",
                        condition_noise_level=condition_noise_level,
                        mode="fidelity",
                    ).images
                    total = total + torch.rot90(answer.flip(dims) if dims else answer, -turns, dims=(-2, -1))
        return postprocess(total / SELF_ENSEMBLE_SIZE * 2 - 1, output_type)

    def _guidance_scale(self, guidance_scale: Optional[float]) -> float:
        """Detail mode's guidance scale for a call's `guidance_scale`: the pipeline's own when it is None."""
        return self.config.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale

    def detail_settings(
        self,
        num_inference_steps: Optional[int] = None,
        strength: Optional[float] = None,
        eta: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        window_size: Optional[int] = None,
        parallel_guidance_weight: Optional[float] = None,
    ) -> Dict[str, Any]:
        """The settings detail mode runs with for a call with these arguments.

        Each argument left None takes the pipeline's own: `detail_steps`, `detail_strength`, `detail_eta`,
        `guidance_scale`, `detail_window_size` and `parallel_guidance_weight` of its config (models saved before
        these keys existed: 50 steps, strength 1, the scheduler's eta, unguided, no windows, weight 1). The
        pipeline's eta is kept only for a scheduler whose `step` takes it; an explicit `eta` is kept as given, so a
        scheduler without one refuses it.

        Returns:
            `dict` with `num_inference_steps`, `strength`, `eta` (None: the scheduler's default), `guidance_scale`,
            `window_size` and `parallel_guidance_weight`, ready to pass to the pipeline call as keywords.
        """
        check_scheduler_fits(self.scheduler)  # a scheduler of another noise process may have no `step` to inspect
        if eta is None and scheduler_takes_eta(self.scheduler):
            eta = self.config.get("detail_eta")
        return {
            "num_inference_steps": self.config.get("detail_steps", DETAIL_STEPS)
            if num_inference_steps is None
            else num_inference_steps,
            "strength": self.config.get("detail_strength", 1.0) if strength is None else strength,
            "eta": eta,
            "guidance_scale": self._guidance_scale(guidance_scale),
            "window_size": self.config.get("detail_window_size", 0) if window_size is None else window_size,
            "parallel_guidance_weight": self.config.get("parallel_guidance_weight", 1.0)
            if parallel_guidance_weight is None
            else parallel_guidance_weight,
        }

    def guided(self, guidance_scale: Optional[float] = None) -> bool:
        """Whether detail mode at `guidance_scale` (default: the pipeline's) runs the guidance UNet beside the UNet."""
        return self.guidance_unet is not None and self._guidance_scale(guidance_scale) != 1

    def _to_image(self, result: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """The image, in [-1, 1] scale, of what the network works on (the image, or the scaled residual)."""
        if not self.config.get("residual", False):
            return result
        return upsampled.to(result.device, torch.float32) + result / self.config.get("residual_scale", 1.0)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @serialised
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: Optional[int] = None,
        generator: GeneratorInput = None,
        output_size: Optional[Union[int, Tuple[int, int]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_intermediates: int = 0,
        callback_on_step_end: Optional[StepCallback] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        condition_noise_level: Optional[float] = None,
        mode: str = "detail",
        eta: Optional[float] = None,
        temperature: float = 1.0,
        latents: Optional[torch.Tensor] = None,
        strength: Optional[float] = None,
        self_ensemble: bool = False,
        guidance_scale: Optional[float] = None,
        window_size: Optional[int] = None,
        parallel_guidance_weight: Optional[float] = None,
    ) -> Union[SR3PipelineOutput, Tuple]:
        r"""Super-resolve one or more images.

        Calls on one pipeline object are serialised (a call from another thread waits for the running one); for
        parallel requests use one pipeline per worker, e.g. `SR3Pipeline.from_pipe(pipeline)`, which shares the
        weights.

        Args:
            image (PIL image, numpy array, torch tensor, or a list of them): The low-resolution input(s); all of
                one size. A PIL image of any mode (gray is repeated to RGB, alpha is discarded; 16-bit gray and
                float gray (`I;16`, `I`, `F`) keep 16 bits, with the white points files are read with: `F` in
                [0, 1], or [0, 255] where values reach 16), a numpy array (`(H, W)`, `(H, W, C)` or `(B, H, W, C)`;
                uint8 in [0, 255], uint16 in [0, 65535], float in [0, 1]), or a torch tensor (`(C, H, W)` or
                `(B, C, H, W)`, float in [0, 1]); C may be 1, 3 or 4 (`images_to_tensor`).
            num_inference_steps (`int`, optional): Refinement steps (scheduler steps); defaults to the pipeline's
                `detail_steps` in detail mode (50 unless the model was saved with its own) and its `fidelity_steps` in
                fidelity mode (1 unless saved with its own).
            generator (`torch.Generator` or a list of them, one per image): Makes sampling deterministic. Without
                one the global torch RNG is used, which reproduces the original code under the same seed.
            output_size (`int` or `(height, width)`, optional): Output size; defaults to the input size times
                `upscale_factor`. Sizes the UNet cannot divide are padded (by reflection) and cropped back.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (`(B, H, W, 3)` in [0, 1]) or `"pt"`
                (`(B, 3, H, W)` in [0, 1]).
            return_dict (`bool`, defaults to True): Return an [`SR3PipelineOutput`] instead of a tuple.
            num_intermediates (`int`, defaults to 0): Also return the noisy image after this many evenly spaced
                steps (the last one is the result), to draw the refinement process; after every step when the call
                runs fewer (`strength` below 1 runs only the last part of the schedule).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, optional): Called after
                each step as `callback_on_step_end(pipeline, step_index, timestep, callback_kwargs)`; may return a
                dict with a replacement `"latents"` (what the network refines, noisy, float32, padded to the UNet's
                downsampling factor: the image in the [-1, 1] scale, or for `residual` models `residual_scale *
                (image - upsample)`) and/or `"condition"` (the upsampled input the next steps are conditioned on, in
                [-1, 1]). It can read `pipeline.num_timesteps` and stop the refinement early with
                `pipeline._interrupt = True`.
            callback_on_step_end_tensor_inputs (`Sequence[str]`, defaults to `("latents",)`): Which of
                `"latents"` and `"condition"` go into `callback_kwargs` (a `PipelineCallback`'s own `tensor_inputs`
                take its place).
            condition_noise_level (`float`, optional): Noise-conditioning augmentation level for UNets with
                `condition_noise_embedding` (defaults to the pipeline's `condition_noise_level`); the upsampled
                input is noised at this level and the level is passed to the network. Detail mode draws the noise
                from `generator`; fidelity mode (and its self-ensemble) from one CPU generator per image seeded with
                `FIDELITY_CONDITION_NOISE_SEED` (0), so its answer is the same for every seed and batch.
            mode (`str`, defaults to `"detail"`): `"detail"` samples by iterative refinement (SR3) with the pipeline's
                scheduler: sharp, plausible texture, invented where the input is ambiguous. `"fidelity"` estimates the
                average answer instead: deterministic DDIM (eta 0, on the same schedule) from the mean of the starting
                noise (temperature 0), in the pipeline's `fidelity_steps` (1 unless saved with its own). Highest
                PSNR/SSIM, smoother texture, and fast; deterministic, and the same for every `generator` (the
                condition noise of models trained with noise-conditioning augmentation comes from a fixed seed, see
                `condition_noise_level`). Use fidelity for measurements, documents and faces you must
                not invent detail on; detail for photos that should look sharp. Fidelity needs a model that predicts
                the clean image (`sample` or `v_prediction`).
            eta (`float`, optional): Detail mode, schedulers that take it (DDIM): 0 samples deterministically from
                the starting noise; up to 1 adds fresh noise at every step (DDPM-like): grainier, sharper texture.
                Above 1 is refused (DDIM's last step would return NaN). Defaults to the pipeline's `detail_eta` where
                the scheduler takes one (else the scheduler's default).
            temperature (`float`, defaults to 1.0): Detail mode: scales the starting noise. Below 1 trades texture
                for fidelity (0 is the fidelity mode's start).
            latents (`torch.Tensor`, optional): The starting noise, `(batch, 3, height, width)` at the output size
                padded to the UNet's downsampling factor, unit variance (scaled by the scheduler's `init_noise_sigma`
                and `temperature` here); drawn from `generator` when not given. Fidelity mode starts from zeros.
            strength (`float`, optional): Detail mode: how much of the refinement to run, as Diffusers'
                image-to-image `strength`; defaults to the pipeline's `detail_strength` (1 unless the model was saved
                with its own). 1 refines from pure noise (SR3). Below 1, the fidelity answer is noised
                to that point of the schedule and only the last `strength` of the `num_inference_steps` run: detail
                is added on top of the fidelity answer, and less is invented the lower it is. Needs a model that
                predicts the clean image, like fidelity mode.
            self_ensemble (`bool`, defaults to False): Fidelity mode: average the answers for the 8 flips and
                quarter-turns of the input, each turned back (EDSR's geometric self-ensemble). The network's
                orientation-dependent errors partly cancel: higher PSNR/SSIM (+0.05 to +0.15 dB) for 8 times
                the network evaluations. Not with `num_intermediates`, `latents` or a step callback.
            guidance_scale (`float`, optional): Detail mode, pipelines with a `guidance_unet`: autoguidance. Each
                step's prediction becomes `guide + guidance_scale * (unet - guide)`, at twice the network
                evaluations of those steps. 1 runs the UNet alone; above 1 draws sharper texture, too high
                oversharpens. Defaults to the pipeline's `guidance_scale` (1 without a guide).
            parallel_guidance_weight (`float`, optional): Detail mode, guided: weighs the part of each step's
                guidance update `unet - guide` that lies along the UNet's own clean-image prediction (per image):
                `unet + (guidance_scale - 1) * (perpendicular + parallel_guidance_weight * parallel)`, as adaptive
                projected guidance does (Sadat et al., 2024). That part only scales the predicted image (contrast,
                dark outlines); the perpendicular rest changes its structure. 1 is plain autoguidance; below 1 draws
                fewer outlines and less edge contrast (0: none from guidance). Needs a model that predicts the clean
                image. Defaults to the pipeline's `parallel_guidance_weight` (1 unless saved).
            window_size (`int`, optional): Detail mode: at every refinement step, also run the network (and its
                guide) on non-overlapping windows of this many pixels, on a grid that moves from step to step, and
                take the prediction's fine detail from the windows and its coarse structure and colour from the
                whole image (split by a Gaussian low-pass of half an input pixel). A network trained on small crops
                draws its texture near a crop's border, so on a large image it draws less than on its training
                crops; windows of the training crop's size (`unet.config.sample_size`) give the whole image that
                texture, at about twice the network work. An image under four windows on its shorter side runs
                whole (a face a window cannot hold). 0 runs the whole image only. Defaults to the pipeline's
                `detail_window_size` (0 unless the model was saved with one).

        Examples:

        Returns:
            [`SR3PipelineOutput`] or `tuple`: `(images, intermediates)` when `return_dict` is False.
        """
        check_output_type(output_type)  # before the refinement, not after it
        if self_ensemble:
            if mode != "fidelity":
                raise ValueError("self_ensemble averages fidelity answers: it needs mode='fidelity'")
            if num_intermediates or latents is not None or callback_on_step_end is not None:
                raise ValueError("self_ensemble takes no num_intermediates, latents or callback_on_step_end")
            _refuse_detail_settings(eta, temperature, strength, guidance_scale, window_size, parallel_guidance_weight)
            images = self._self_ensemble(
                image, output_size, num_inference_steps, generator, condition_noise_level, output_type
            )
            return SR3PipelineOutput(images=images, intermediates=None) if return_dict else (images, None)

        # 1. Upsample the input to the output size and pad it to what the UNet can divide.
        condition = self.prepare_condition(image, output_size)
        condition, (height, width) = pad_to_multiple(condition, self.unet.downsampling_factor)
        batch, _, padded_height, padded_width = condition.shape
        upsampled = condition
        condition, condition_noise_level = self._augment_condition(
            condition, condition_noise_level, generator, fixed=mode == "fidelity"
        )

        # 2. Refine from noise (detail), or from the noise's mean with deterministic DDIM steps (fidelity).
        shape = (batch, self.unet.config.out_channels, padded_height, padded_width)
        if strength is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        init_sample = None
        guided = False
        progress = contextlib.nullcontext()
        if mode == "detail":
            settings = self.detail_settings(
                num_inference_steps, strength, eta, guidance_scale, window_size, parallel_guidance_weight
            )
            steps, strength, eta, guidance_scale, window_size, parallel_guidance_weight = (
                settings["num_inference_steps"],
                settings["strength"],
                settings["eta"],
                settings["guidance_scale"],
                settings["window_size"],
                settings["parallel_guidance_weight"],
            )
            scheduler = None
            _check_guidance(self.unet, self.guidance_unet, guidance_scale, parallel_guidance_weight, self.scheduler)
            _check_window_size(self.unet, window_size, "window_size")
            guided = self.guided(guidance_scale)
            if strength < 1:
                self._check_predicts_clean_image("strength below 1", "strength 1")
                # The fidelity answer and the refinement from it advance one progress bar.
                progress = self._one_progress_bar(
                    refinement_length(self._fidelity_scheduler(), self.config.fidelity_steps)
                    + refinement_length(self.scheduler, check_num_inference_steps(steps, self.scheduler), strength)
                )
        elif mode == "fidelity":
            _refuse_detail_settings(eta, temperature, strength, guidance_scale, window_size, parallel_guidance_weight)
            self._check_predicts_clean_image("fidelity mode", "mode='detail' with strength 1")
            steps, scheduler, eta, temperature, strength = (
                self.config.fidelity_steps if num_inference_steps is None else num_inference_steps,
                self._fidelity_scheduler(),
                0.0,
                0.0,
                1.0,
            )
            window_size = 0
        else:
            raise ValueError(f"mode must be 'detail' or 'fidelity', got {mode!r}")
        # The fidelity answer a refinement below strength 1 starts from is the whole image's; only the refinement
        # runs in windows.
        windows = (
            windowed_networks(self, window_size, lowpass_sigma(self.config.upscale_factor), image_size=(height, width))
            if window_size
            else contextlib.nullcontext()
        )
        with progress:
            if strength < 1:
                init_sample = self._fidelity_estimate(
                    shape, condition, self.config.fidelity_steps, condition_noise_level
                )
            with windows:
                guide = self.guidance_unet if guided else None
                result, snapshots = self._denoise(
                    shape,
                    condition,
                    steps,
                    generator,
                    num_intermediates,
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                    condition_noise_level,
                    eta=eta,
                    latents=latents,
                    temperature=temperature,
                    scheduler=scheduler,
                    init_sample=init_sample,
                    strength=strength,
                    guide=guide,
                    guidance_scale=1.0 if guide is None else guidance_scale,
                    parallel_guidance_weight=1.0 if guide is None else parallel_guidance_weight,
                )

        # 3. Residual models: scale the refined residual back and add it to the upsample. Crop the padding off.
        def finish(refined: torch.Tensor):
            return postprocess(self._to_image(refined, upsampled)[..., :height, :width], output_type)

        images = finish(result)
        intermediates = [finish(snapshot) for snapshot in snapshots] or None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, intermediates)
        return SR3PipelineOutput(images=images, intermediates=intermediates)
