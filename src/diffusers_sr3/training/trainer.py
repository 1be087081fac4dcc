"""The training loop shared by `examples/train_sr3.py`, `examples/train_uncond.py`, the demo and the benchmarks.

One process or many (`accelerate launch`), one code path: Accelerate handles devices, DDP, mixed precision and
gradient accumulation; this module owns the model set-up, the SR3 objective (`training.objective`), EMA,
resumable checkpoints (`training.checkpointing`), validation (`training.validation`), the final save with a
model card, and the Hub upload.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backends import check_bfloat16_runs, cpu_name, fast_bfloat16
from ..data import (
    LOCAL_BUILDERS,
    BadImageError,
    PairMaker,
    TrainingData,
    batch_generator,
    build_training_data,
    cut_into_crops,
    decode_image,
    sample_generator,
)
from ..file_writes import atomic_file
from ..image_io import hold_datasets_in
from ..metrics import SSIM_WINDOW
from ..model_card import write_model_card
from ..models.unet_sr3 import SR3UNet2DModel, convert_legacy_optimizer_state, require_peft
from ..noise import SCHEDULERS, SR3_SCHEDULE, make_scheduler, scheduler_takes_eta, swap_scheduler, training_betas
from ..pipelines.pipeline_sr3 import SAMPLING_CONFIG_KEYS
from ..presets import get_preset
from ..progress import bar_options
from ..redaction import install_log_redaction, redact, redact_value, register_secret
from .adversarial import PatchDiscriminator, discriminator_loss, generator_adversarial_loss
from .checkpointing import (
    OBJECTIVE_KEY,
    add_training_adapter,
    check_checkpoint_fits,
    check_random_states,
    check_same_objective,
    finish_checkpoint,
    later_checkpoints,
    list_checkpoints,
    load_checkpoint_extras,
    remove_stale_temporaries,
    resolve_checkpoint,
    temporary_checkpoint_dir,
)
from .config import TrainingConfig, training_command
from .hub import LORA_WEIGHTS_FILE, push_folder
from .objective import diffusion_loss, measure_residual_scale, noise_batch, predict, predicted_clean
from .output_lock import claim_output_folder, hold_folders_for_reading
from .validation import build_pipeline, log_validation, run_validation

logger = logging.getLogger(__name__)

# What loading a truncated or corrupted checkpoint file raises (safetensors, json, torch.load, pickle, accelerate).
_DAMAGED_CHECKPOINT_ERRORS = (
    SafetensorError,
    json.JSONDecodeError,
    RuntimeError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
)

# What writing weights raises when the disk is full: torch.save a RuntimeError, safetensors a SafetensorError (an
# I/O error that is no OSError).
_WRITE_ERRORS = (RuntimeError, OSError, SafetensorError)

DEFAULT_PRESETS = {"sr": "sr_16_128", "uncond": "uncond_128"}
SUMMARY_FILE = "training_summary.json"


def _matmul_precision_put_back() -> Callable[[], None]:
    """A function that puts the process's float32 matmul precision back as it is now: the legacy setting
    (`torch.get_float32_matmul_precision`, which `allow_tf32` sets) and the per-backend ones torch 2.9+ keeps beside it
    (`torch.backends.cuda.matmul.fp32_precision`, mkldnn's), which setting the legacy one overwrites. Once the
    per-backend API has set a value the legacy one contradicts, torch refuses to read the legacy one ("mix of the
    legacy and new APIs"): then the per-backend settings come back, and the legacy one where the legacy cuBLAS switch
    still reads off (the legacy setting is "highest" then)."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
        with contextlib.suppress(RuntimeError):
            if not torch.backends.cuda.matmul.allow_tf32:
                legacy = "highest"
    per_backend = [(backend, backend.fp32_precision) for backend in _PER_BACKEND_MATMUL_PRECISION]

    def put_back() -> None:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for backend, setting in per_backend:
            backend.fp32_precision = setting

    return put_back


# The per-backend float32 matmul precision settings (torch 2.9+) that `set_float32_matmul_precision` overwrites.
_PER_BACKEND_MATMUL_PRECISION = (
    (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision")
    else ()
)


# Training images the residual scale is measured on (without augmentation, so resumed runs measure the same).
RESIDUAL_SCALE_SAMPLES = 256


def _hub_id(name_or_path: Optional[str]) -> Optional[str]:
    """A Hub repo or dataset id (`owner/name`), or None for local folders and nothing."""
    if not name_or_path or os.path.exists(name_or_path) or name_or_path.count("/") != 1:
        return None
    return name_or_path


@dataclasses.dataclass
class ModelSetup:
    """The network to train and what sampling needs to know about it."""

    unet: SR3UNet2DModel
    scheduler: Any
    upscale_factor: Optional[int]
    resolution: int
    description: str
    residual_scale: Optional[float] = None  # a fine-tuned residual model's own scale
    # The objective, resolved: the options as given, else a fine-tuned model's own, else a new model's defaults.
    residual: bool = False
    prediction_type: str = "epsilon"
    condition_noise_level: float = 0.0
    # How the saved pipeline samples: its sampler (a `SCHEDULERS` key; --sampler, else the fine-tuned pipeline's)
    # and its sampling defaults (`SR3Pipeline`'s `SAMPLING_CONFIG_KEYS`: the options given, over the fine-tuned
    # pipeline's own, which are kept when the objective is), so a fine-tuned model samples the way it did.
    sampler: Optional[str] = None
    sampling_settings: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _LoopState:
    """What the training loop works with and where it stands (the prepared objects, the position, the tallies)."""

    unet: Any  # the model as `accelerator.prepare` wrapped it (DDP on several processes)
    optimizer: Any
    dataloader: DataLoader
    lr_scheduler: Any
    ema: Any
    max_train_steps: int
    total_batch: int
    betas: torch.Tensor  # the training noise schedule, float64
    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0
    resumed_from: Optional[str] = None
    first_step: int = 0
    recent_losses: List[float] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    data_wait_seconds: float = 0.0  # of train_seconds, spent waiting for the data loader's next batch
    out_of_time: bool = False  # stopped by `max_train_minutes` before `max_train_steps`
    skipped_total: int = 0
    discriminator: Any = None  # with --adversarial_loss_weight: prepared like the unet, checkpointed, never saved
    discriminator_optimizer: Any = None
    last_discriminator_loss: Optional[float] = None


# accelerate's name for the second optimizer of a checkpoint: the discriminator's, when one was trained.
DISCRIMINATOR_OPTIMIZER_FILE = "optimizer_1.bin"

# The key of `training_state.json` that holds the losses the summary's `final_loss` averages.
RECENT_LOSSES_KEY = "recent_losses"

# What a new model trains with when the options leave the objective unset.
NEW_MODEL_OBJECTIVE = dict(residual=False, prediction_type="epsilon", condition_noise_level=0.0)


def resolve_objective(config: TrainingConfig, pipeline: Any = None, source: str = "") -> Dict[str, Any]:
    """The objective to train: what the options set, the rest from the model being fine-tuned (`pipeline`), else
    a new model's defaults.

    A fine-tuned model's weights only make sense for the objective they were trained on: an explicit option that
    changes it (residual <-> image, another prediction type, residual scale, upscale factor or noise-level embedding
    scale) is refused unless
    `allow_objective_change` says the retraining is meant. The sampling default `condition_noise_level` may change.

    Returns:
        `residual`, `prediction_type`, `condition_noise_level` and `residual_scale` (None: measure it, or unused).
    """
    if pipeline is None:
        resolved = {
            key: NEW_MODEL_OBJECTIVE[key] if getattr(config, key) is None else getattr(config, key)
            for key in NEW_MODEL_OBJECTIVE
        }
        resolved["residual_scale"] = config.residual_scale
        return resolved
    own_residual = bool(pipeline.config.get("residual", False))
    own = dict(
        residual=own_residual,
        prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
        condition_noise_level=float(pipeline.config.get("condition_noise_level", 0.0) or 0.0),
        residual_scale=float(pipeline.config.get("residual_scale", 1.0)) if own_residual else None,
    )
    resolved = dict(own)
    changes = []
    for key, option in (
        ("residual", "--residual" if config.residual else "--no-residual"),
        ("prediction_type", f"--prediction_type {config.prediction_type}"),
    ):
        value = getattr(config, key)
        if value is not None and value != own[key]:
            changes.append(f"{option} (the model's own: {own[key]!r})")
            resolved[key] = value
    if config.condition_noise_level is not None:
        resolved["condition_noise_level"] = config.condition_noise_level
    own_embedding_scale = pipeline.unet.config.get("noise_level_embedding_scale")
    given_embedding_scale = config.noise_level_embedding_scale
    if (
        given_embedding_scale is not None
        and own_embedding_scale is not None
        and not math.isclose(given_embedding_scale, own_embedding_scale)
    ):
        # The network reads its noise level through this scale: another one feeds it levels it never saw.
        changes.append(
            f"--noise_level_embedding_scale {given_embedding_scale:g} (the model's own: {own_embedding_scale:g})"
        )
    own_factor = pipeline.config.get("upscale_factor")  # None for unconditional models
    if config.upscale_factor is not None and own_factor is not None and config.upscale_factor != own_factor:
        # The network learnt the detail one factor's inputs lack; another factor's bicubic input lacks other detail.
        changes.append(f"--upscale_factor {config.upscale_factor} (the model's own: {own_factor})")
    if config.residual_scale is not None:
        if own["residual_scale"] is not None and not math.isclose(
            config.residual_scale, own["residual_scale"], rel_tol=1e-6
        ):
            changes.append(f"--residual_scale {config.residual_scale:g} (the model's own: {own['residual_scale']:g})")
        resolved["residual_scale"] = config.residual_scale
    if not resolved["residual"]:
        resolved["residual_scale"] = None
        if config.residual_scale is not None:
            raise ValueError(f"--residual_scale applies to residual models; {source} is not one")
    if changes and not config.allow_objective_change:
        raise ValueError(
            f"{', '.join(changes)} would change the objective {source} was trained with: its weights are meaningless "
            "for another one. Leave these options unset to fine-tune the model as it is, or pass "
            "--allow_objective_change to retrain it with the new objective on purpose"
        )
    if changes:
        logger.warning("retraining %s with a changed objective: %s", source, ", ".join(changes))
    return resolved


def _unet_config_file(path: str) -> str:
    for candidate in (path, os.path.join(path, "config.json"), os.path.join(path, "unet", "config.json")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"--model_config_name_or_path {path}: no config.json there (nor in unet/)")


def _not_one_model(source: str, pipeline: Any, task: str) -> str:
    """Why `pipeline` (a cascade: several models) cannot be fine-tuned, naming its saved models that can for `task`."""
    from ..pipelines.pipeline_sr3_cascade import STAGE_NAMES

    generator = ["base"] if getattr(pipeline, "base", None) is not None else []
    stages = [name for name in STAGE_NAMES if getattr(pipeline, name, None) is not None]
    # Each model is a complete pipeline in its own subfolder, which loads alone from a folder (not from the Hub).
    where = source if os.path.isdir(source) else f"<a local copy of {source}>"
    fitting = generator if task == "uncond" else stages
    if fitting:
        advice = "fine-tune one of its models instead: " + " or ".join(os.path.join(where, name) for name in fitting)
    else:
        kind = "unconditional generator" if task == "uncond" else "super-resolution stage"
        models = ", ".join(os.path.join(where, name) for name in generator + stages)
        advice = f"it has no {kind} to fine-tune here (its models: {models})"
    return f"--pretrained_model_name_or_path {source} holds a {type(pipeline).__name__}, which chains models: {advice}"


def _other_task(option: str, source: str, pipeline: Any, task: str) -> str:
    """Why `pipeline` (given as `option source`), a model of the other task than `task`, cannot be fine-tuned here,
    naming the script that can."""
    kind, script, other = (
        ("an unconditional generator", "examples/train_uncond.py", "uncond")
        if task == "sr"
        else ("a super-resolution model", "examples/train_sr3.py", "sr")
    )
    return f"{option} {source} is {kind} ({type(pipeline).__name__}): fine-tune it with {script} (task={other!r})"


def _warm_up_peak(learning_rate: float, steps: int, warmup_steps: int) -> float:
    """The highest learning rate of a run's first `steps` (at least 1, at most `warmup_steps`) optimizer steps in a
    linear warm-up: step k runs at `learning_rate * (k - 1) / warmup_steps`, the schedule stepping after it."""
    return learning_rate * (steps - 1) / warmup_steps


def _data_folders(config: TrainingConfig) -> List[Tuple[str, str]]:
    """The local folders the run reads its data from, each with the option that names it (see
    `hold_folders_for_reading`, which holds each one's parent too)."""
    if config.train_images is not None or config.train_dataset is not None:
        return []
    base = _local_data_dir(config)
    named = [(config.dataset_name, "--dataset_name")]
    if base is not None and config.train_data_dir is not None:
        named.append((base, "--train_data_dir"))
    for pattern in config.train_data_files or []:
        if base is not None or os.path.isabs(pattern):
            path = os.path.join(base or "", pattern)
            named.append((os.path.dirname(os.path.normpath(path)) or os.curdir, "--train_data_files"))
    return [(folder, option) for folder, option in named if folder is not None]


def _local_data_dir(config: TrainingConfig) -> Optional[str]:
    """The local folder that `datasets` reads as `--train_data_dir` and reads the `--train_data_files` patterns
    relative to ("" for the working folder): below a local `--dataset_name` folder, else where it names; None for a
    Hub dataset's, whose folder and relative patterns are paths in its repo (only absolute patterns are local)."""
    name, data_dir = config.dataset_name, config.train_data_dir
    if name is not None and os.path.isdir(name):
        return os.path.join(name, data_dir or "")
    if name is not None and name not in LOCAL_BUILDERS:
        return None
    return data_dir or ""


def _listed_by_datasets(config: TrainingConfig) -> List[str]:
    """The local folders and file patterns that `datasets.load_dataset` lists for the run, not the run itself: the
    prepared datasets below them are held (`hold_datasets_in`) as those the run's own listing meets are.

    `--train_data_dir` is the `data_dir` of a builder's (`--dataset_name imagefolder`, or the one the patterns'
    extension picks) or a local folder's dataset, streamed or not, and the `--train_data_files` patterns are read
    relative to it: listed as given, they named other files than those read, or none."""
    if config.train_images is not None or config.train_dataset is not None:
        return []
    name, data_dir, patterns = config.dataset_name, config.train_data_dir, list(config.train_data_files or [])
    if name is None and not patterns and not config.streaming:
        return []  # the run lists --train_data_dir itself
    local_folder = name is not None and os.path.isdir(name)
    base = _local_data_dir(config)
    if base is None:
        # Globbed here, a Hub dataset's relative patterns held or refused datasets in the working folder that the run
        # never reads.
        return [pattern for pattern in patterns if os.path.isabs(pattern)]
    listed = [pattern if "://" in pattern else os.path.join(base, pattern) for pattern in patterns]
    if local_folder:
        listed.append(name)
    elif not patterns and data_dir is not None and os.path.isdir(data_dir):
        listed.append(data_dir)
    return listed


def _refuse_packaged_output(config: TrainingConfig) -> None:
    """Refuse, before the run writes anything (its lock file included), an `--output_dir` inside the installed
    package (its models above all), or the folder named like the packaged model in the working directory while that
    model is fine-tuned by its name: the run's own folder would be loaded in its place by that name."""
    from ..pretrained import DEFAULT_MODEL, PACKAGED_MODELS_DIR, resolve_packaged_name

    package_dir = os.path.dirname(PACKAGED_MODELS_DIR)
    output, package = os.path.realpath(config.output_dir), os.path.realpath(package_dir)
    if output == package or output.startswith(package + os.sep):
        raise ValueError(
            f"--output_dir {config.output_dir} is inside the installed package ({package_dir}), which holds its "
            "packaged models and which training never changes: give the fine-tuned model a folder of its own"
        )
    source = config.pretrained_model_name_or_path
    named = source is not None and resolve_packaged_name(source) != source
    if named and output == os.path.realpath(DEFAULT_MODEL):
        raise ValueError(
            f"--output_dir {config.output_dir} is the name of the packaged model being fine-tuned: a folder of that "
            "name here would be loaded in its place by that name; give the fine-tuned model another name"
        )


def build_model(config: TrainingConfig) -> ModelSetup:
    """The UNet (fresh from a preset or config, or with pretrained / converted-original weights) and scheduler."""
    weights: Optional[Dict[str, torch.Tensor]] = None
    pretrained_scheduler = None
    pretrained_residual_scale = None
    sampling_settings: Dict[str, Any] = {}
    upscale_factor = config.upscale_factor
    preset = None
    if config.pretrained_model_name_or_path or config.resume_from_original:
        from ..pipelines import SR3BasePipeline, SR3Pipeline, SR3UnconditionalPipeline

        if config.resume_from_original:
            from ..convert import convert_original_checkpoint

            pipeline = convert_original_checkpoint(config.resume_from_original, config.original_config)
            description = f"fine-tuned from the original checkpoint {os.path.basename(config.resume_from_original)}"
        else:
            pipeline = SR3BasePipeline.from_pretrained(config.pretrained_model_name_or_path)
            if not isinstance(pipeline, (SR3Pipeline, SR3UnconditionalPipeline)):
                raise ValueError(_not_one_model(config.pretrained_model_name_or_path, pipeline, config.task))
            description = f"fine-tuned from {config.pretrained_model_name_or_path}"
        source = config.resume_from_original or config.pretrained_model_name_or_path
        if isinstance(pipeline, SR3Pipeline) != (config.task == "sr"):
            # Before the warnings about its guide: a model of the other task is not fine-tuned at all.
            option = "--resume_from_original" if config.resume_from_original else "--pretrained_model_name_or_path"
            raise ValueError(_other_task(option, source, pipeline, config.task))
        objective = resolve_objective(config, pipeline, source)
        unet_config = dict(pipeline.unet.config)
        weights = pipeline.unet.state_dict()
        pretrained_scheduler = pipeline.scheduler
        pretrained_residual_scale = objective["residual_scale"]
        if upscale_factor is None:
            upscale_factor = getattr(pipeline.config, "upscale_factor", None)
        own_objective = (
            pipeline.config.get("residual", False),
            pipeline.scheduler.config.get("prediction_type"),
            pipeline.config.get("upscale_factor"),
        )
        if (objective["residual"], objective["prediction_type"], upscale_factor) == own_objective:  # studied for it
            sampling_settings = {key: pipeline.config[key] for key in SAMPLING_CONFIG_KEYS if key in pipeline.config}
        if getattr(pipeline, "guidance_unet", None) is not None:
            # A guide is a weaker model of the same task; the fine-tuned UNet is another model, whose guide is an
            # earlier checkpoint of its own run.
            logger.warning(
                "%s's autoguidance guide (guidance_unet, scale %g) is not fine-tuned and not saved with the new model: "
                "its detail mode runs unguided (guidance_scale 1). To guide it, load a checkpoint of this run as its "
                'guide (README, "Autoguidance")',
                source,
                pipeline.config.get("guidance_scale", 1.0),
            )
    elif config.unet_config is not None:
        objective = resolve_objective(config)
        unet_config = dict(config.unet_config)
        description = "the given UNet config"
    elif config.model_config_name_or_path:
        objective = resolve_objective(config)
        unet_config = dict(SR3UNet2DModel.load_config(_unet_config_file(config.model_config_name_or_path)))
        description = f"config {config.model_config_name_or_path}"
    else:
        objective = resolve_objective(config)
        preset_name = config.preset or DEFAULT_PRESETS[config.task]
        preset = get_preset(preset_name)
        unet_config = preset.unet_config()
        if upscale_factor is None:
            upscale_factor = preset.upscale_factor
        description = f"preset {preset_name}"
    unet_config = {key: value for key, value in unet_config.items() if not key.startswith("_")}
    if config.noise_level_embedding_scale is not None:
        unet_config["noise_level_embedding_scale"] = config.noise_level_embedding_scale
    if config.condition_noise_max > 0:
        if weights is not None and not unet_config.get("condition_noise_embedding", False):
            raise ValueError(
                "--condition_noise_max needs a model with condition_noise_embedding; the weights being fine-tuned "
                "have none (start a new model, or train without noise-conditioning augmentation)"
            )
        unet_config["condition_noise_embedding"] = True

    conditional = unet_config["in_channels"] != unet_config["out_channels"]
    if config.task == "sr" and unet_config["in_channels"] != unet_config["out_channels"] + 3:
        raise ValueError(
            f"super-resolution training needs a conditional UNet (in_channels = out_channels + 3); {description} has "
            f"in_channels={unet_config['in_channels']}, out_channels={unet_config['out_channels']}"
        )
    if config.task == "uncond" and conditional:
        raise ValueError(f"unconditional training needs in_channels == out_channels; {description} is conditional")
    if config.task == "uncond":
        upscale_factor = None
    elif upscale_factor is None:
        upscale_factor = 4

    unet = SR3UNet2DModel.from_config(unet_config)
    if weights is not None:
        unet.load_state_dict(weights)
    resolution = config.resolution or (preset.resolution if preset else unet.config.sample_size)
    if resolution % unet.downsampling_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the UNet's factor {unet.downsampling_factor}")
    if config.task == "sr" and resolution < SSIM_WINDOW:
        # Validation, at the end of training at the latest, measures SSIM at the training resolution.
        raise ValueError(
            f"resolution {resolution} is too small for super-resolution: validation measures SSIM, which needs "
            f"images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels"
        )
    small = config.small_crop_size
    if small is not None and (
        small >= resolution or resolution % small or small % unet.downsampling_factor or small % (upscale_factor or 1)
    ):
        raise ValueError(
            f"small_crop_size {small} must be smaller than the resolution {resolution}, divide it, and be divisible "
            f"by the UNet's factor {unet.downsampling_factor}"
            + (f" and the upscale factor {upscale_factor}" if upscale_factor else "")
        )

    schedule_options = dict(
        beta_schedule=config.beta_schedule,
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
    )
    if pretrained_scheduler is not None and all(value is None for value in schedule_options.values()):
        scheduler = swap_scheduler(pretrained_scheduler, "ddpm", prediction_type=objective["prediction_type"])
    else:
        defaults = preset.scheduler if preset else SR3_SCHEDULE
        schedule = {key: defaults[key] if value is None else value for key, value in schedule_options.items()}
        scheduler = make_scheduler("ddpm", prediction_type=objective["prediction_type"], **schedule)
    sampler = None
    if pretrained_scheduler is not None:
        sampler = next((name for name, kind in SCHEDULERS.items() if type(pretrained_scheduler) is kind), None)
    sampling_settings.update(
        {key: getattr(config, key) for key in SAMPLING_CONFIG_KEYS if getattr(config, key) is not None}
    )
    setup = ModelSetup(
        unet,
        scheduler,
        upscale_factor,
        resolution,
        description,
        pretrained_residual_scale,
        residual=objective["residual"],
        prediction_type=objective["prediction_type"],
        condition_noise_level=objective["condition_noise_level"],
        sampler=config.sampler or sampler,
        sampling_settings=sampling_settings,
    )
    _check_saved_pipeline(setup, config)
    return setup


def _saved_scheduler(setup: ModelSetup) -> Any:
    """The scheduler the trained pipeline is saved with: the chosen (or fine-tuned model's) sampler, else DDPM."""
    return swap_scheduler(setup.scheduler, setup.sampler) if setup.sampler else setup.scheduler


def _check_saved_pipeline(setup: ModelSetup, config: TrainingConfig) -> None:
    """Refuse, before any training, sampling settings that validation or the pipeline saved at the end would refuse."""
    swap_scheduler(setup.scheduler, config.validation_scheduler)  # raises for one that cannot sample the model
    scheduler = _saved_scheduler(setup)  # a sampler that cannot sample this prediction type raises here
    if not setup.upscale_factor:
        return
    if config.detail_eta is not None and not scheduler_takes_eta(scheduler):
        raise ValueError(
            f"--detail_eta applies to samplers that take eta (ddim); the pipeline is saved with "
            f"{type(scheduler).__name__} (choose one with --sampler)"
        )
    build_pipeline(
        setup.unet,
        scheduler,
        setup.upscale_factor,
        setup.condition_noise_level,
        setup.residual,
        sampling_settings=setup.sampling_settings,
    )


def _tracker_config(config: TrainingConfig) -> Dict[str, Any]:
    """The options as flat scalars (what TensorBoard's hparams accept), without secrets (wandb uploads them)."""
    flat = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in ("hub_token", "train_dataset"):
            continue
        flat[item.name] = redact_value(value if isinstance(value, (int, float, str, bool)) else str(value))
    return flat


def training_dataloader(data: TrainingData, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """The loader of `data`'s training batches, before `accelerate.prepare` shards it."""
    return DataLoader(
        data.dataset,
        batch_size=batch_size,
        sampler=data.sampler,
        num_workers=num_workers,
        drop_last=data.sampler is not None,
        # Its own generator: creating an iterator must not consume the global RNG (exact resumes).
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        # Workers that outlive an epoch do not restart at every epoch's start. Only where the sampler's keys carry
        # the epoch: a streamed dataset learns its epoch from `set_epoch`, which a persistent worker's copy misses.
        persistent_workers=num_workers > 0 and data.sampler is not None,
    )


class Trainer:
    """Runs one training job described by a [`TrainingConfig`]; `train(config)` is `Trainer(config).run()`.

    After `run()`, `model` (the unwrapped UNet), `summary` (main process), `num_processes`, `process_index` and
    `distributed_type` are available for inspection.
    """

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.summary: Dict[str, Any] = {}

    # -- set-up -----------------------------------------------------------------------------------------------

    def _make_accelerator(self) -> Accelerator:
        config = self.config
        report_to = None if config.report_to == "none" else config.report_to
        if report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
            raise ImportError("--report_to wandb needs the wandb package: pip install wandb (or use tensorboard)")
        if report_to in ("tensorboard", "all") and importlib.util.find_spec("tensorboard") is None:
            raise ImportError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
        project = ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        )
        # A multi-process launch on a machine without accelerators must ask for CPU explicitly, or Accelerate
        # starts N independent single-process runs instead of one gloo DDP job.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        return Accelerator(
            cpu=launched and not has_accelerator,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=report_to,
            project_config=project,
        )

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> str:
        """Train, save the pipeline (EMA weights when used) with a model card, push if asked; return the folder."""
        _refuse_packaged_output(self.config)
        if self.config.lora_rank:
            require_peft("LoRA training (--lora_rank)")
        threads_before = torch.get_num_threads()
        # `allow_tf32` switches TF32 matmuls on for the whole process: the caller's setting comes back after the run.
        put_back_matmul_precision = _matmul_precision_put_back() if self.config.allow_tf32 else None
        new_folder = not os.path.exists(self.config.output_dir)
        try:
            # Before anything in the folder changes (`remove_stale_temporaries` deletes the staging folders a live
            # run would be writing). Only the main process locks: the others' locks would conflict with its own.
            main = os.environ.get("RANK", "0") == "0"
            with contextlib.ExitStack() as locks:
                if main:
                    locks.enter_context(claim_output_folder(self.config.output_dir))
                    # Until the run ends: data loader workers read the images all along.
                    locks.enter_context(hold_folders_for_reading(_data_folders(self.config), "training on it"))
                    hold_datasets_in(_listed_by_datasets(self.config))
                return self._run()
        except BaseException:
            if new_folder:  # a run that fails before writing anything leaves no empty folder behind
                with contextlib.suppress(OSError):
                    os.rmdir(self.config.output_dir)
            raise
        finally:
            torch.set_num_threads(threads_before)
            if put_back_matmul_precision is not None:
                put_back_matmul_precision()
            # Accelerate keeps its settings in process-wide singletons; clearing them (not the process group) lets
            # another `train()` in this process (a benchmark sweep, the demo) use other settings.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state()
            GradientState._reset_state()

    def _run(self) -> str:
        started = time.time()
        # 1. Accelerate, the random seeds and the output folder.
        seed = self._start()
        # 2. The network and its noise schedule.
        setup = self._prepare_model()
        # 3. The training data, and what is measured on it before training: residual scale, validation samples.
        data = self._load_data(setup, seed)
        self.data_seed = seed
        self.residual_scale = self._residual_scale(data, setup)
        self.objective = self._objective(setup)
        validation_samples = self._validation_samples(data, setup)
        # 4. Dataloader, optimizer, LR schedule and EMA, prepared for the processes.
        loop = self._prepare_optimization(setup, data, seed)
        # 5. Continue from a checkpoint when asked to.
        self._resume(loop)
        # 6. The training loop: steps, checkpoints, validation.
        self._start_tracking(setup, data, loop)
        self._train_loop(setup, data, loop, validation_samples)
        # 7. The summary, the saved pipeline with its model card, and the upload.
        self._finish(setup, data, loop, validation_samples, started)
        return self.config.output_dir

    # -- the stages of `_run` -----------------------------------------------------------------------------------

    def _start(self) -> int:
        """Create the accelerator, seed the random sources and prepare the output folder; return the data seed."""
        config = self.config
        if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
            raise ValueError(f"--output_dir {config.output_dir} is a file, not a folder")
        earlier = list_checkpoints(config.output_dir)
        if earlier and not config.resume_from_checkpoint:
            # A new run would overwrite them step by step, and --checkpoints_total_limit would prune its own first.
            raise ValueError(
                f"{config.output_dir} holds checkpoints of an earlier run (the newest: {os.path.basename(earlier[-1])})"
                ": go on with it with --resume_from_checkpoint latest, or start the new run in another --output_dir"
            )
        self.resume_path = (
            resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
            if config.resume_from_checkpoint
            else None
        )
        if self.resume_path is not None:
            later = later_checkpoints(self.resume_path, config.output_dir)
            if later:
                # This run would replace some of them and prune its own, and `latest` would go on with the others.
                raise ValueError(
                    f"{config.output_dir} holds checkpoints saved after {os.path.basename(self.resume_path)} "
                    f"({', '.join(os.path.basename(path) for path in later)}): move or delete them to resume from it"
                )
        elif os.path.isfile(os.path.join(config.output_dir, "model_index.json")):
            # Nothing to resume: a new run would overwrite the trained pipeline in it.
            raise ValueError(
                f"{config.output_dir} holds a trained pipeline and no checkpoint to resume: to go on training it, "
                f"pass --pretrained_model_name_or_path {config.output_dir} --output_dir <another folder>"
            )
        _check_writable(config.output_dir)
        # The token may be any string: known literally, it is redacted wherever it would be written or logged.
        register_secret(config.hub_token)
        install_log_redaction()
        accelerator = self.accelerator = self._make_accelerator()
        self.num_processes, self.process_index = accelerator.num_processes, accelerator.process_index
        self.cpu_threads = self._configure_cpu(accelerator)
        self.distributed_type = str(accelerator.distributed_type)
        # The data order and augmentation depend on `seed` only, identically on every process (so the shards
        # partition each epoch). Noise and dropout draws must differ between processes: their RNG is seeded per
        # process (DDP broadcasts rank 0's initial weights, so the model still starts the same everywhere).
        seed = config.seed if config.seed is not None else 0
        if config.seed is not None:
            set_seed(config.seed, device_specific=True)
        else:
            torch.seed()  # torch's default seed is a constant: without this every process would draw the same noise
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        if accelerator.is_main_process:
            remove_stale_temporaries(config.output_dir)
        return seed

    def _configure_cpu(self, accelerator: Accelerator) -> Optional[int]:
        """On CPU: set this process's threads (`--num_threads`, else `_launcher_cpu_threads`), refuse bfloat16
        autocast where torch cannot run it (`check_bfloat16_runs`), warn where it would be emulated, and return the
        thread count; None on an accelerator."""
        if accelerator.device.type != "cpu":
            return None
        threads = self.config.num_threads or _launcher_cpu_threads()
        if threads:
            torch.set_num_threads(threads)
        logger.info("training on CPU with %d threads per process", torch.get_num_threads())
        if accelerator.mixed_precision == "bf16" and not fast_bfloat16("cpu"):
            check_bfloat16_runs("cpu", "--mixed_precision bf16", "--mixed_precision no")
            logger.warning(
                "--mixed_precision bf16 on a CPU without native bfloat16, AMX or AVX512-BF16 (%s): bfloat16 is "
                "emulated here and trains many times slower than float32 (benchmarks/training_launch.py); leave "
                "it out on this machine",
                cpu_name(),
            )
        return torch.get_num_threads()

    def _prepare_model(self) -> ModelSetup:
        """Build the UNet and scheduler, in training mode with the configured memory options."""
        config = self.config
        setup = build_model(config)
        # From here on the objective is the resolved one (a fine-tuned model's own unless set); the options as given
        # stay in `self.options` for the training command.
        self.options = config
        config = self.config = dataclasses.replace(
            config,
            residual=setup.residual,
            prediction_type=setup.prediction_type,
            condition_noise_level=setup.condition_noise_level,
        )
        model = self.model = setup.unet
        if config.lora_rank:  # training starts from the pretrained model's outputs exactly
            add_training_adapter(model, config.lora_rank, config.lora_alpha)
        # What the optimizer and the EMA see: every weight, or with --lora_rank the adapters' alone.
        self.trained_parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        model.train()
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        return setup

    def _load_data(self, setup: ModelSetup, seed: int) -> TrainingData:
        """The training data for the model's resolution and factor, checked against the batch size."""
        config = self.config
        with self.accelerator.main_process_first():
            data = build_training_data(
                resolution=setup.resolution,
                upscale_factor=setup.upscale_factor,
                train_data_dir=config.train_data_dir,
                train_images=config.train_images,
                train_dataset=config.train_dataset,
                dataset_name=config.dataset_name,
                dataset_config_name=config.dataset_config_name,
                train_data_files=config.train_data_files,
                dataset_split=config.dataset_split,
                image_column=config.image_column,
                streaming=config.streaming,
                cache_dir=config.cache_dir,
                max_train_samples=config.max_train_samples,
                random_flip=config.random_flip,
                random_crop=config.random_crop,
                lr_blur_sigma=config.lr_blur_sigma,
                seed=seed,
                random_rotate=config.random_rotate,
                film_grain_max=config.film_grain_max,
                film_grain_probability=config.film_grain_probability,
                repeats=config.dataset_repeats,
                cache_images=config.cache_images,
            )
        if data.skipped_at_scan:
            listed = ", ".join(f"{count} {reason}" for reason, count in sorted(data.skipped_at_scan.items()))
            logger.warning(
                "skipped %d unusable images of %s: %s", sum(data.skipped_at_scan.values()), data.description, listed
            )
        if data.sampler is None and config.max_train_steps is None:
            raise ValueError("streamed data has no length: give --max_train_steps")
        # An epoch of `--dataset_repeats` passes over a few photos fills a batch: each pass draws its own crops.
        if data.sampler is not None and len(data.sampler) < config.train_batch_size:
            images, repeats = len(data.dataset), config.dataset_repeats
            passes = f" x {repeats} passes (--dataset_repeats)" if repeats > 1 else ""
            raise ValueError(
                f"{data.description} has {images} usable images{passes}, fewer than --train_batch_size "
                f"{config.train_batch_size}: lower --train_batch_size, or give --dataset_repeats "
                f"{math.ceil(config.train_batch_size / images)} to make each epoch that many passes over them"
            )
        return data

    def _prepare_optimization(self, setup: ModelSetup, data: TrainingData, seed: int) -> _LoopState:
        """Dataloader, AdamW, the LR schedule over the run's length and EMA, passed through `accelerator.prepare`."""
        config, accelerator, model = self.config, self.accelerator, self.model
        dataloader = training_dataloader(data, config.train_batch_size, config.dataloader_num_workers, seed)
        learning_rate = config.learning_rate
        if config.scale_lr:
            learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
        optimizer = torch.optim.AdamW(
            self.trained_parameters,
            lr=learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
            fused=config.fused_optimizer or None,
        )
        if not config.lora_rank:
            # Optimizer states of checkpoints saved by diffusers-sr3 0.1.0 (other attention parameters) still resume.
            optimizer.register_load_state_dict_pre_hook(lambda _, state: convert_legacy_optimizer_state(model, state))
        if data.sampler is None:
            max_train_steps = config.max_train_steps
        else:
            # Batches per process after sharding, then optimizer steps (the last partial accumulation syncs too).
            batches = math.ceil(len(dataloader) / accelerator.num_processes)
            steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
            max_train_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
        if config.lr_scheduler != "constant" and config.lr_warmup_steps >= max_train_steps:
            logger.warning(
                "--lr_warmup_steps %d is no shorter than the run's %d steps: the learning rate never reaches "
                "--learning_rate %g (at most %.2g); give a run this short (a fine-tune, say) a shorter warm-up",
                config.lr_warmup_steps,
                max_train_steps,
                learning_rate,
                _warm_up_peak(learning_rate, max_train_steps, config.lr_warmup_steps),
            )
        from diffusers.optimization import get_scheduler

        # The prepared scheduler steps once per process per optimizer step, so its horizon scales the same way.
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
        discriminator = discriminator_optimizer = None
        if config.adversarial_loss_weight:
            # Prepared after the unet, so it is accelerate's second model and optimizer in every checkpoint.
            self.discriminator = PatchDiscriminator(model.config.in_channels).to(accelerator.device)
            discriminator_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(),
                lr=config.discriminator_learning_rate or learning_rate,
                betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=0.0,
                eps=config.adam_epsilon,
            )
            discriminator, discriminator_optimizer = accelerator.prepare(self.discriminator, discriminator_optimizer)

        ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(
                self.trained_parameters,
                decay=config.ema_decay,
                min_decay=config.ema_min_decay,
                update_after_step=config.ema_update_after_step,
                use_ema_warmup=config.ema_use_warmup,
                inv_gamma=config.ema_inv_gamma,
                power=config.ema_power,
                # One multi-tensor update instead of three kernels per parameter: on a GPU, hundreds of tiny launches
                # at every step (the H200 run took 0.096 s per step against the network's 0.065 s alone).
                foreach=True,
                model_cls=SR3UNet2DModel,
                model_config=model.config,
            )
            ema.to(accelerator.device)
        total_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        betas = training_betas(setup.scheduler)
        return _LoopState(
            unet,
            optimizer,
            dataloader,
            lr_scheduler,
            ema,
            max_train_steps,
            total_batch,
            betas,
            discriminator=discriminator,
            discriminator_optimizer=discriminator_optimizer,
        )

    def _resume(self, loop: _LoopState) -> None:
        """Load the accelerator state, EMA and position of `--resume_from_checkpoint`, if there is one."""
        config = self.config
        if not config.resume_from_checkpoint:
            return
        loop.resumed_from = self.resume_path
        if loop.resumed_from is None:
            logger.info("no checkpoint in %s yet: starting a new run", config.output_dir)
            return
        saved_discriminator = os.path.isfile(os.path.join(loop.resumed_from, DISCRIMINATOR_OPTIMIZER_FILE))
        if saved_discriminator != (loop.discriminator is not None):
            raise ValueError(
                f"{loop.resumed_from} was saved {'with' if saved_discriminator else 'without'} a discriminator: "
                "resume it with "
                + ("a positive --adversarial_loss_weight" if saved_discriminator else "--adversarial_loss_weight 0")
                + ", or fine-tune its weights with --pretrained_model_name_or_path instead"
            )
        check_checkpoint_fits(loop.resumed_from, self.model.config)
        try:
            check_same_objective(loop.resumed_from, self.objective)
            check_random_states(loop.resumed_from, self.accelerator.process_index)
            self.accelerator.load_state(loop.resumed_from)
            state = load_checkpoint_extras(loop.resumed_from, loop.ema, self.model)
            loop.global_step, loop.epoch = state["global_step"], state["epoch"]
            loop.batches_done = state["batches_in_epoch"]
            # The summary's final loss then averages the same steps as a run that was never stopped; checkpoints
            # saved before the losses were recorded start the average afresh.
            loop.recent_losses = list(state.get(RECENT_LOSSES_KEY, []))
        except _DAMAGED_CHECKPOINT_ERRORS as error:
            raise ValueError(
                f"cannot resume from {loop.resumed_from}: a file in it is damaged or does not fit this model "
                f"({error!r})"
            ) from None
        logger.info("resumed from %s at step %d (epoch %d)", loop.resumed_from, loop.global_step, loop.epoch)

    def _start_tracking(self, setup: ModelSetup, data: TrainingData, loop: _LoopState) -> None:
        """Start the trackers (main process) and log what is being trained."""
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            accelerator.init_trackers(_tracker_project(config), config=_tracker_config(config))
        if config.lora_rank:
            logger.info(
                "LoRA rank %d: training %.3fM adapter parameters, the %.2fM of the model stay as they are",
                config.lora_rank,
                sum(parameter.numel() for parameter in self.trained_parameters) / 1e6,
                sum(parameter.numel() for name, parameter in self.model.named_parameters() if "lora_" not in name)
                / 1e6,
            )
        logger.info(
            "training %s (%.2fM parameters) on %s: %d steps, batch %d (%d per device x %d processes x %d accumulation)",
            setup.description,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            data.description,
            loop.max_train_steps,
            loop.total_batch,
            config.train_batch_size,
            accelerator.num_processes,
            config.gradient_accumulation_steps,
        )

    def _train_loop(self, setup: ModelSetup, data: TrainingData, loop: _LoopState, validation_samples) -> None:
        """Run epochs until `max_train_steps` optimizer steps are done, checkpointing and validating on the way."""
        accelerator = self.accelerator
        progress = tqdm(
            total=loop.max_train_steps,
            initial=loop.global_step,
            desc="steps",
            disable=self.config.quiet or not accelerator.is_local_main_process,
            **bar_options(),
        )
        skipped = torch.zeros((), dtype=torch.long, device=accelerator.device)
        loop.first_step, loop_started = loop.global_step, time.time()
        while loop.global_step < loop.max_train_steps and not loop.out_of_time:
            dataloader = loop.dataloader
            epoch_loader = (
                accelerator.skip_first_batches(dataloader, loop.batches_done) if loop.batches_done else dataloader
            )
            # Accelerate's loaders pass the epoch on to the sampler (or the streamed dataset) when iterated.
            epoch_loader.set_epoch(loop.epoch)
            batches_in_epoch = loop.batches_done
            loop.batches_done = 0
            saw_batch = False
            for batch in self._timed(epoch_loader, loop):
                saw_batch = True
                batches_in_epoch += 1
                skipped += batch["skipped"].sum()
                step_loss = self._train_step(loop, self._crop_size_of(batch, setup, loop.epoch, batches_in_epoch))
                if not accelerator.sync_gradients:
                    continue
                self._after_optimizer_step(setup, loop, progress, step_loss, batches_in_epoch, validation_samples)
                if loop.global_step >= loop.max_train_steps:
                    break
                if self._out_of_time(loop_started):
                    loop.out_of_time = True
                    logger.info(
                        f"max_train_minutes ({self.config.max_train_minutes:g}) reached at step {loop.global_step}"
                    )
                    self._warn_if_stopped_in_warm_up(loop)
                    if self.config.checkpointing_steps and loop.global_step % self.config.checkpointing_steps:
                        # A checkpoint where the run stopped, so a resume goes on exactly from here.
                        self._save_checkpoint(accelerator, loop, batches_in_epoch)
                    break
            # A run resumed exactly at the end of an epoch skips every batch of it: that is not an empty dataset.
            if not saw_batch and batches_in_epoch == 0:
                raise ValueError(f"{data.description} gave no batch in epoch {loop.epoch}: no usable training images")
            if loop.global_step < loop.max_train_steps and not loop.out_of_time:
                loop.epoch += 1
        progress.close()
        loop.train_seconds = time.time() - loop_started
        loop.skipped_total = int(accelerator.reduce(skipped, reduction="sum").item())

    @staticmethod
    def _timed(batches: Iterable[Dict[str, Any]], loop: _LoopState) -> Iterator[Dict[str, Any]]:
        """`batches`, the time spent waiting for each added to `loop.data_wait_seconds`: a loop that waits long
        is bound by its data loader, not its device (more `--dataloader_num_workers`; on small datasets at large
        batches `--dataset_repeats`; on small images `--cache_images`)."""
        iterator = iter(batches)
        first = True
        while True:
            started = time.perf_counter()
            # The first fetch creates the torch iterator, which draws a seed from the global RNG when the loader has
            # no generator: Accelerate drops ours from a streamed loader. That draw is undone, or a resumed run (its
            # epoch starts after the checkpoint's RNG state is restored, the straight run's before it was saved)
            # shifts every later draw.
            fetching = torch.random.fork_rng(devices=[]) if first else contextlib.nullcontext()
            first = False
            try:
                with fetching:
                    batch = next(iterator, None)
            except ValueError as error:
                # Accelerate's word for a streamed loader that yields nothing; the caller names the empty data.
                if "does not contain any data" not in str(error):
                    raise
                batch = None
            loop.data_wait_seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def _crop_size_of(self, batch: Dict[str, Any], setup: ModelSetup, epoch: int, batch_index: int) -> Dict[str, Any]:
        """With --small_crop_size, a --small_crop_fraction of the batches cut into the smaller crops. The draw is a
        function of (seed, epoch, batch index) only, so a resumed run and every process make the same choice."""
        size = self.config.small_crop_size
        if size is None:
            return batch
        chosen = torch.rand((), generator=batch_generator(self.data_seed, epoch, batch_index)) < (
            self.config.small_crop_fraction
        )
        return cut_into_crops(batch, size, setup.upscale_factor) if chosen else batch

    def _warn_if_stopped_in_warm_up(self, loop: _LoopState) -> None:
        """A run of minutes (`--max_train_minutes` before a far `--max_train_steps`) that the clock stopped inside its
        warm-up never reached its learning rate; a warm-up as long as `--max_train_steps` was said at the start."""
        config, step = self.config, loop.global_step
        if config.lr_scheduler == "constant" or not step < config.lr_warmup_steps < loop.max_train_steps:
            return
        learning_rate = loop.optimizer.param_groups[0]["initial_lr"]  # --learning_rate, scaled by --scale_lr
        logger.warning(
            "--max_train_minutes %g stopped the run at step %d, inside its warm-up of %d steps (--lr_warmup_steps): "
            "the learning rate reached at most %.2g of --learning_rate %g; give a run of minutes a shorter warm-up",
            config.max_train_minutes,
            step,
            config.lr_warmup_steps,
            _warm_up_peak(learning_rate, step, config.lr_warmup_steps),
            learning_rate,
        )

    def _out_of_time(self, loop_started: float) -> bool:
        """Whether `max_train_minutes` have passed; every process stops at the same step if any one's clock says so."""
        if self.config.max_train_minutes is None:
            return False
        over = torch.tensor(int(time.time() - loop_started > self.config.max_train_minutes * 60))
        return bool(self.accelerator.reduce(over.to(self.accelerator.device), reduction="sum").item())

    def _train_step(self, loop: _LoopState, batch: Dict[str, Any]) -> float:
        """One micro-batch: noise it, predict, take the loss and (when the accumulation syncs) an optimizer step."""
        config, accelerator, memory_format = self.config, self.accelerator, self.memory_format
        unet, discriminator = loop.unet, loop.discriminator
        with accelerator.accumulate(*([unet] if discriminator is None else [unet, discriminator])):
            noised = noise_batch(
                self.model,
                loop.betas,
                batch["hr"].contiguous(memory_format=memory_format),
                None if batch.get("condition") is None else batch["condition"].contiguous(memory_format=memory_format),
                prediction_type=config.prediction_type,
                per_sample_timestep=config.per_sample_timestep,
                condition_noise_max=config.condition_noise_max,
                residual=config.residual,
                residual_scale=self.residual_scale,
            )
            prediction = predict(unet, noised)
            loss = diffusion_loss(
                prediction,
                noised,
                config.loss_type,
                config.snr_gamma,
                config.prediction_type,
                texture_weight=config.texture_loss_weight,
                texture_patch_size=config.texture_loss_patch_size,
            )
            if discriminator is not None:
                estimate = predicted_clean(prediction.float(), noised, config.prediction_type)
                # The unwrapped discriminator, frozen: this term trains the network only (and DDP sees no
                # discriminator forward whose gradients never come).
                self.discriminator.requires_grad_(False)
                adversarial = generator_adversarial_loss(self.discriminator, estimate, noised).mean()
                self.discriminator.requires_grad_(True)
                loss = loss + config.adversarial_loss_weight * adversarial
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
            loop.optimizer.step()
            loop.lr_scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
            if discriminator is not None:
                judge_loss = discriminator_loss(discriminator, estimate, noised)
                accelerator.backward(judge_loss)
                loop.discriminator_optimizer.step()
                loop.discriminator_optimizer.zero_grad(set_to_none=True)
                loop.last_discriminator_loss = accelerator.gather(judge_loss.detach()).mean().item()
        step_loss = accelerator.gather(loss.detach()).mean().item()
        loop.recent_losses = (loop.recent_losses + [step_loss])[-100:]
        return step_loss

    def _after_optimizer_step(
        self, setup: ModelSetup, loop: _LoopState, progress: Any, step_loss: float, batches_in_epoch: int, samples
    ) -> None:
        """EMA update, progress and logs, then a checkpoint and validation when due."""
        config, accelerator = self.config, self.accelerator
        if loop.ema is not None:
            loop.ema.step(self.trained_parameters)
        loop.global_step += 1
        last_lr = loop.lr_scheduler.get_last_lr()[0]
        # Set first, not refreshed: the update shows it, at most as often as the bar redraws (`bar_options`).
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{last_lr:.2e}", refresh=False)
        progress.update(1)
        logs = {"train/loss": step_loss, "train/lr": last_lr}
        if loop.ema is not None:
            logs["train/ema_decay"] = loop.ema.cur_decay_value
        if loop.last_discriminator_loss is not None:
            logs["train/discriminator_loss"] = loop.last_discriminator_loss
        accelerator.log(logs, step=loop.global_step)
        if config.checkpointing_steps and loop.global_step % config.checkpointing_steps == 0:
            self._save_checkpoint(accelerator, loop, batches_in_epoch)
        if config.validation_steps and loop.global_step % config.validation_steps == 0:
            self._validate(accelerator, self.model, loop.ema, setup, samples, loop.global_step)

    def _finish(self, setup: ModelSetup, data: TrainingData, loop: _LoopState, samples, started: float) -> None:
        """Write the summary and the final pipeline (main process), end tracking, and upload when asked to."""
        config, accelerator = self.config, self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            steps_this_run, seconds = loop.global_step - loop.first_step, loop.train_seconds
            self.summary = dict(
                output_dir=config.output_dir,
                global_step=loop.global_step,
                steps_this_run=steps_this_run,
                epochs=loop.epoch + 1,
                resumed_from=loop.resumed_from,
                num_processes=accelerator.num_processes,
                cpu_threads=self.cpu_threads,
                total_batch_size=loop.total_batch,
                final_loss=sum(loop.recent_losses) / len(loop.recent_losses) if loop.recent_losses else None,
                skipped_at_scan=dict(data.skipped_at_scan),
                skipped_during_training=loop.skipped_total,
                train_seconds=round(seconds, 2),
                stopped_by_time_limit=loop.out_of_time,
                steps_per_second=round(steps_this_run / seconds, 3) if seconds else None,
                data_wait_fraction=round(loop.data_wait_seconds / seconds, 3) if seconds else None,
                checkpoints=[os.path.basename(path) for path in list_checkpoints(config.output_dir)],
                trained_parameters=sum(parameter.numel() for parameter in self.trained_parameters),
                residual_scale=self.residual_scale if config.residual else None,
            )
            self._save_final(accelerator, self.model, loop.ema, setup, data, samples, loop.global_step)
            self.summary["total_seconds"] = round(time.time() - started, 2)
            # The file travels with the model (and to the Hub): folder names only, not this machine's paths.
            written = dict(self.summary, output_dir=os.path.basename(os.path.abspath(config.output_dir)))
            if loop.resumed_from:
                written["resumed_from"] = os.path.basename(os.path.normpath(loop.resumed_from))
            try:
                with atomic_file(os.path.join(config.output_dir, SUMMARY_FILE)) as stream:
                    stream.write(json.dumps(redact_value(written), indent=2).encode("utf-8"))
            except OSError as error:
                raise self._final_save_error(error) from None
            self._print_summary()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if accelerator.is_main_process and config.push_to_hub:
            self.summary["hub_commit"] = push_folder(
                config.output_dir,
                config.hub_model_id,
                config.hub_token,
                config.hub_private,
                # The trackers write in the project's folder of --logging_dir (with `--logging_dir .`, a folder
                # beside the pipeline's).
                logging_dir=os.path.join(config.logging_dir, _tracker_project(config)),
            )
            logger.info("uploaded to %s", self.summary["hub_commit"])

    # -- pieces of the loop -----------------------------------------------------------------------------------

    def _residual_scale(self, data: TrainingData, setup: ModelSetup) -> float:
        """The residual scale: given, a fine-tuned model's own, or measured on training images spread over the data.

        Measured without augmentation on a fixed set of images, so a resumed run measures the same value.
        The scheduler's x0 clipping range follows it (the scaled residual spans twice the image range).
        """
        config = self.config
        if not config.residual:
            return 1.0
        scale = config.residual_scale or setup.residual_scale
        if scale is None:
            samples = data.spread_samples(RESIDUAL_SCALE_SAMPLES)
            scale = measure_residual_scale(
                torch.stack([sample["hr"] for sample in samples]),
                torch.stack([sample["condition"] for sample in samples]),
            )
            logger.info("residual scale %.3g, measured on %d training images", scale, len(samples))
        if "clip_sample_range" in setup.scheduler.config:
            setup.scheduler = swap_scheduler(setup.scheduler, "ddpm", clip_sample_range=2.0 * scale)
        return float(scale)

    def _objective(self, setup: ModelSetup) -> Dict[str, Any]:
        """The settings that say what the weights mean, by option name: recorded in every checkpoint, and a resumed
        run must have the same."""
        config, schedule = self.config, setup.scheduler.config
        return dict(
            residual=config.residual,
            residual_scale=self.residual_scale if config.residual else None,
            prediction_type=config.prediction_type,
            beta_schedule=schedule.beta_schedule,
            beta_start=float(schedule.beta_start),
            beta_end=float(schedule.beta_end),
            num_train_timesteps=int(schedule.num_train_timesteps),
            condition_noise_max=config.condition_noise_max,
            use_ema=config.use_ema,
            upscale_factor=setup.upscale_factor,
            # The checkpoint holds the adapters of this rank and scale: resumed without them, or with others, its
            # weights would not load or mean something else.
            lora_rank=config.lora_rank,
            lora_alpha=(config.lora_alpha or config.lora_rank) if config.lora_rank else None,
        )

    def _validation_samples(self, data: TrainingData, setup: ModelSetup):
        config = self.config
        if setup.upscale_factor is None:
            return []
        if config.validation_images:
            # Each given image or a clear error, before any training: never silently the next image instead.
            maker = PairMaker(setup.resolution, setup.upscale_factor)
            samples = []
            for index, path in enumerate(config.validation_images):
                try:
                    samples.append(maker(decode_image(path, path), None, sample_generator(0, 0, index), False, path))
                except BadImageError as error:
                    raise ValueError(f"--validation_images: {error}") from None
            return samples
        return data.validation_samples(config.num_validation_images)

    def _save_checkpoint(self, accelerator: Accelerator, loop: _LoopState, batches: int) -> None:
        config, ema, step = self.config, loop.ema, loop.global_step
        temporary = temporary_checkpoint_dir(config.output_dir, step) if accelerator.is_main_process else None
        temporary = _broadcast_path(accelerator, temporary)
        try:
            accelerator.save_state(temporary)
        except _WRITE_ERRORS as error:
            # The half-written folder must not stay.
            raise self._checkpoint_error(accelerator, temporary, step, error) from None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = dict(
                global_step=step,
                epoch=loop.epoch,
                batches_in_epoch=batches,
                **{OBJECTIVE_KEY: self.objective, RECENT_LOSSES_KEY: loop.recent_losses},
            )
            unet_config = accelerator.unwrap_model(self.model).config
            try:
                path = finish_checkpoint(
                    temporary, config.output_dir, step, state, ema, config.checkpoints_total_limit, unet_config
                )
            except _WRITE_ERRORS as error:
                raise self._checkpoint_error(accelerator, temporary, step, error) from None
            logger.info("saved checkpoint %s", path)
        accelerator.wait_for_everyone()

    def _checkpoint_error(self, accelerator: Accelerator, temporary: str, step: int, error: Exception) -> OSError:
        """Remove the half-written checkpoint; the one-line error that says which could not be written, and why."""
        output_dir = self.config.output_dir
        if accelerator.is_main_process:
            # torch.save reports a missing folder as a RuntimeError naming it.
            missing = isinstance(error, FileNotFoundError) or os.path.basename(temporary) in str(error)
            if missing and not os.path.isdir(temporary):
                # Removed by something else while written: no disk problem, and another such removal may follow.
                return OSError(
                    f"cannot write checkpoint-{step} in {output_dir}: its staging folder {os.path.basename(temporary)} "
                    "was removed while the run wrote it (another program or run changed the folder under this run)"
                )
            shutil.rmtree(temporary, ignore_errors=True)
        free = shutil.disk_usage(output_dir).free
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return OSError(f"cannot write checkpoint-{step} in {output_dir} ({free / 2**30:.2f} GiB free there): {reason}")

    def _final_save_error(self, error: Exception) -> OSError:
        """The one-line error when the trained pipeline cannot be written: where, why, and what to go on from (the
        checkpoints are left as they are)."""
        output_dir = self.config.output_dir
        free = shutil.disk_usage(output_dir).free
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        checkpoints = list_checkpoints(output_dir)
        resume = (
            f"its checkpoints are intact: free some space and go on from {checkpoints[-1]} with "
            "--resume_from_checkpoint latest"
            if checkpoints
            else "it holds no checkpoint to go on from (see --checkpointing_steps)"
        )
        return OSError(
            f"cannot write the trained pipeline in {output_dir} ({free / 2**30:.2f} GiB free there): {reason}; {resume}"
        )

    def _validate(
        self, accelerator: Accelerator, model: SR3UNet2DModel, ema: Any, setup: ModelSetup, samples, step: int
    ) -> Tuple[Dict[str, float], Any]:
        result: Tuple[Dict[str, float], Any] = ({}, None)
        if accelerator.is_main_process:
            if ema is not None:
                ema.store(self.trained_parameters)
                ema.copy_to(self.trained_parameters)
            model.eval()
            result = self._run_validation(model, setup, samples)
            model.train()
            if ema is not None:
                ema.restore(self.trained_parameters)
            log_validation(accelerator, result[0], result[1], step)
            if result[0]:
                logger.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result[0].items()))
        accelerator.wait_for_everyone()
        return result

    def _run_validation(self, model, setup, samples):
        """Sample the validation images with the configured fast scheduler; `(metrics, picture)`."""
        config = self.config
        return run_validation(
            model,
            setup.scheduler,
            setup.upscale_factor,
            samples,
            config.num_validation_images,
            config.validation_scheduler,
            config.validation_steps_count,
            seed=config.seed or 0,
            condition_noise_level=config.condition_noise_level,
            residual=config.residual,
            residual_scale=self.residual_scale,
            resolution=setup.resolution,
        )

    def _save_final(self, accelerator, model, ema, setup, data, samples, step) -> None:
        config = self.config
        if ema is not None:
            ema.store(self.trained_parameters)
            ema.copy_to(self.trained_parameters)
        model.eval()
        metrics, picture = self._run_validation(model, setup, samples)
        log_validation(accelerator, metrics, picture, step)
        try:
            with atomic_file(os.path.join(config.output_dir, "validation.png")) as stream:
                picture.save(stream, format="PNG")
        except OSError as error:
            raise self._final_save_error(error) from None
        pipeline = build_pipeline(
            _fused_copy(model) if config.lora_rank else model,
            _saved_scheduler(setup),
            setup.upscale_factor,
            config.condition_noise_level,
            config.residual,
            self.residual_scale,
            setup.sampling_settings if setup.upscale_factor else None,
        )
        try:
            pipeline.save_pretrained(config.output_dir)
            if config.lora_rank:
                _save_adapter(model, config.output_dir)
            else:
                # An earlier LoRA run's adapter (an --output_dir resumed from another run's checkpoint) is no part of
                # this model: left beside it, it would be pushed with it and load as its adapter.
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(config.output_dir, LORA_WEIGHTS_FILE))
        except _WRITE_ERRORS as error:
            raise self._final_save_error(error) from None
        if ema is not None:
            ema.restore(self.trained_parameters)
        self.summary["validation"] = metrics
        try:
            self._write_card(accelerator, setup, data, samples, step, metrics)
        except OSError as error:
            raise self._final_save_error(error) from None

    def _write_card(self, accelerator, setup, data, samples, step, metrics) -> None:
        """Write the trained pipeline's model card (README.md) into --output_dir."""
        config = self.config
        hub_dataset = _hub_id(config.dataset_name)  # a local dataset (a path) is no Hub metadata
        write_model_card(
            config.output_dir,
            task=config.task,
            repo_id=config.hub_model_id if config.push_to_hub else None,
            upscale_factor=setup.upscale_factor,
            resolution=setup.resolution,
            datasets=[hub_dataset] if hub_dataset else None,
            data_description=data.description if not hub_dataset else hub_dataset,
            metrics=metrics,
            evaluation_dataset=(
                "validation images"
                if config.validation_images
                else f"the first {len(samples)} training images, not held out"
            ),
            sample_image="validation.png",
            training_command=training_command(self.options),
            base_model=_hub_id(config.pretrained_model_name_or_path),
            lora_adapter=(LORA_WEIGHTS_FILE, config.pretrained_model_name_or_path) if config.lora_rank else None,
            training_summary={
                "model": setup.description,
                "steps": step,
                "total batch size": self.summary["total_batch_size"],
                "learning rate": f"{config.learning_rate:g} ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up)",
                "loss": f"{config.loss_type}, {config.prediction_type} prediction"
                + (f", min-SNR gamma {config.snr_gamma:g}" if config.snr_gamma else "")
                + (f", texture loss x{config.texture_loss_weight:g}" if config.texture_loss_weight else "")
                + (f", adversarial loss x{config.adversarial_loss_weight:g}" if config.adversarial_loss_weight else "")
                + (f", on the residual x {self.residual_scale:g}" if config.residual else ""),
                "crops": f"{setup.resolution} px"
                + (
                    ", random, at the images' full scale"
                    if config.random_crop
                    else f", each image's centre, its shorter side resized to {setup.resolution} px"
                )
                + (
                    f", {config.small_crop_fraction:g} of the batches cut into {config.small_crop_size} px"
                    if config.small_crop_size
                    else ""
                ),
                "EMA": f"decay {config.ema_decay:g}" if config.use_ema else "no",
                **(
                    {
                        "LoRA": f"rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank:g}, fused into "
                        f"the saved UNet; the adapter alone: {LORA_WEIGHTS_FILE}"
                    }
                    if config.lora_rank
                    else {}
                ),
                "mixed precision": accelerator.mixed_precision,
                "validation sampler": f"{config.validation_scheduler}, {config.validation_steps_count} steps",
            },
        )

    def _print_summary(self) -> None:
        summary = self.summary
        scan = summary["skipped_at_scan"]
        lines = [
            "",
            f"Training finished: {summary['global_step']} steps ({summary['steps_this_run']} in this run, "
            f"{summary['train_seconds']} s, {summary['steps_per_second']} steps/s, "
            f"{summary['data_wait_fraction'] or 0:.0%} of it waiting for data) on {summary['num_processes']} "
            f"process(es)"
            + (f" of {summary['cpu_threads']} CPU threads" if summary["cpu_threads"] else "")
            + f", total batch {summary['total_batch_size']}"
            + (" (stopped by --max_train_minutes)." if summary["stopped_by_time_limit"] else "."),
            f"  final loss (mean of last steps): {summary['final_loss']:.5f}"
            if summary["final_loss"] is not None
            else "  no step ran in this run",
            f"  skipped images: {sum(scan.values())} at scan{f' {scan}' if scan else ''}, "
            f"{summary['skipped_during_training']} read failures during training",
        ]
        if summary.get("validation"):
            lines.append("  validation: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["validation"].items()))
        if summary["checkpoints"]:
            lines.append(f"  checkpoints: {', '.join(summary['checkpoints'])}")
        lines.append(f"  pipeline saved to {summary['output_dir']} (model card README.md, validation.png)")
        print(redact("\n".join(lines)), flush=True)


def _fused_copy(model: SR3UNet2DModel) -> SR3UNet2DModel:
    """A plain UNet whose weights are `model`'s with its LoRA adapters merged in: what every loader reads."""
    fused = copy.deepcopy(model)
    fused.fuse_lora()
    fused.unload_lora()
    return fused


def _save_adapter(model: SR3UNet2DModel, output_dir: str) -> None:
    """Write `model`'s adapter as `LORA_WEIGHTS_FILE` in `output_dir`, whole or not at all (written beside it, then
    moved into place)."""
    staging = tempfile.mkdtemp(prefix=".sr3-lora-", dir=output_dir)
    try:
        model.save_lora_adapter(staging, weight_name=LORA_WEIGHTS_FILE)
        os.replace(os.path.join(staging, LORA_WEIGHTS_FILE), os.path.join(output_dir, LORA_WEIGHTS_FILE))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tracker_project(config: TrainingConfig) -> str:
    """The trackers' project name: also the folder of `--logging_dir` they write in."""
    return config.tracker_project_name or ("sr3" if config.task == "sr" else "sr3-uncond")


def _launcher_cpu_threads() -> Optional[int]:
    """The threads a CPU training process should use when `accelerate launch` left it its default of one; else None.

    Without `--cpu` or `--num_cpu_threads_per_process`, `accelerate launch` sets OMP_NUM_THREADS=1 (a default meant
    for GPU jobs), which on a CPU-only machine trains on one core however many there are. Then the cores this process
    may run on are shared among the machine's training processes.
    """
    # Every `accelerate launch` launcher sets ACCELERATE_DYNAMO_BACKEND: the mark of a process it started.
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _check_writable(folder: str) -> None:
    """Create `folder` and a file in it: an unwritable output folder fails now, not at the first checkpoint or after
    the whole training."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OSError(f"--output_dir {folder} is not writable ({error.strerror or error})") from None


def _broadcast_path(accelerator: Accelerator, path: Optional[str]) -> str:
    """The main process's `path` on every process."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    holder = [path]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def train(config: TrainingConfig) -> str:
    """Train an SR3 model as `config` describes; return the output folder (which holds the saved pipeline).

    Example:
        ```py
        from diffusers_sr3.training import TrainingConfig, train

        train(TrainingConfig(train_data_dir="faces/", preset="sr_16_128", max_train_steps=100_000, use_ema=True))
        ```
    """
    return Trainer(config).run()
