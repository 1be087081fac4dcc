"""All training options in one dataclass, and the command line generated from it.

`TrainingConfig` is the programmatic interface (`train(TrainingConfig(...))`); `add_training_arguments` turns its
fields into argparse options (`--field_name`, help from the field metadata) and `config_from_args` maps the parsed
namespace back, so the example scripts share one definition and cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Only torch-free modules: the example scripts' `--help` and option errors must not wait for torch and Diffusers.
from ..defaults import SAMPLING_CONFIG_KEYS, SCHEDULER_CLASS_NAMES
from ..presets import PRESETS
from ..redaction import REDACTED, is_secret_name, redact, redact_argv

TASKS = ("sr", "uncond")
REPORT_TARGETS = ("tensorboard", "wandb", "none", "all")


def _option(
    default: Any, help: str, cli: bool = True, choices: Optional[tuple] = None, path: bool = False, **kwargs: Any
) -> Any:
    # `path`: the option names files or folders, where the command line expands `~` (no shell does in
    # `--output_dir=~/run`, a quoted "~/run" or on Windows).
    metadata = {"help": help, "cli": cli, "choices": choices, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainingConfig:
    """Every option of SR3 training; the defaults are the SR3 paper's where it gives one.

    Build one in Python and call `diffusers_sr3.training.train(config)`, or use the example scripts, whose
    command-line options are these fields (`--learning_rate 1e-4`, `--use_ema`, `--no-random_flip`, ...).
    """

    # What to train.
    task: str = _option(
        "sr", "`sr` (super-resolution) or `uncond` (unconditional generation); each script fixes it", cli=False
    )
    preset: Optional[str] = _option(
        None,
        # From the registry, so that a new preset is listed without editing this text.
        f"network configuration, one of the presets {', '.join(PRESETS)} "
        "(default: sr_16_128 / uncond_128 unless --model_config_name_or_path, --pretrained_model_name_or_path or "
        "--resume_from_original is given)",
    )
    model_config_name_or_path: Optional[str] = _option(
        None, "SR3UNet2DModel config.json, or a folder holding one (a pipeline folder's unet/ is found too)", path=True
    )
    unet_config: Optional[Dict[str, Any]] = _option(
        None, "an SR3UNet2DModel config as a dict (Python only; like --model_config_name_or_path)", cli=False
    )
    pretrained_model_name_or_path: Optional[str] = _option(
        None,
        "fine-tune the weights of a saved SR3 pipeline: a folder, a Hub repo id, or sr3-photos-x4 (the model that "
        "ships with the package)",
        path=True,
    )
    resume_from_original: Optional[str] = _option(
        None, "fine-tune from an original SR3 checkpoint (I*_E*_gen.pth); needs --original_config", path=True
    )
    original_config: Optional[str] = _option(None, "the original JSON config of --resume_from_original", path=True)
    lora_rank: int = _option(
        0,
        "fine-tune LoRA adapters of this rank on the attention, ResNet convs and FiLM projections of "
        "--pretrained_model_name_or_path (or --resume_from_original) instead of every weight; the saved pipeline has "
        "them fused in, pytorch_lora_weights.safetensors beside it is the adapter alone (0: no LoRA; needs "
        "pip install diffusers-sr3[lora])",
    )
    lora_alpha: Optional[float] = _option(
        None, "LoRA alpha: the adapters' outputs are scaled by alpha / rank (default: the rank)"
    )
    resolution: Optional[int] = _option(None, "training (high-resolution) image size; default: the model's")
    upscale_factor: Optional[int] = _option(None, "super-resolution factor; default: the preset's, else 4")
    noise_level_embedding_scale: Optional[float] = _option(
        None, "multiplies the noise level before its sinusoidal encoding (UNet config; 1.0 = original)"
    )

    # Diffusion objective.
    # The objective fields below default to None: "epsilon / not residual / 0.0 for a new model, and a fine-tuned
    # model's own" (`resolve_objective`), so that a fine-tuned pipeline keeps what its weights were trained for.
    prediction_type: Optional[str] = _option(
        None,
        "what the network predicts (default: epsilon for a new model; a fine-tuned model's own)",
        choices=("epsilon", "v_prediction", "sample"),
    )
    loss_type: str = _option("l1", "l1 (the paper's choice) or l2", choices=("l1", "l2"))
    snr_gamma: Optional[float] = _option(None, "min-SNR-gamma loss weighting (e.g. 5.0); default off")
    texture_loss_weight: float = _option(
        0.0,
        "add this times a phase-free texture loss (L1 between the local amplitude spectra of the predicted and the "
        "true clean image), weighted per sample by alpha_bar; 0: off",
    )
    texture_loss_patch_size: int = _option(8, "patch side of --texture_loss_weight's local spectra")
    adversarial_loss_weight: float = _option(
        0.0,
        "add this times an adversarial (hinge) loss from a conditional patch discriminator that judges the predicted "
        "clean image, weighted per sample by alpha_bar; 0: off",
    )
    discriminator_learning_rate: Optional[float] = _option(
        None, "the discriminator's AdamW learning rate (constant; default: --learning_rate)"
    )
    residual: Optional[bool] = _option(
        None,
        "diffuse the residual HR - bicubic upsample instead of the image (stored in the saved pipeline; default: off "
        "for a new model, a fine-tuned model's own)",
    )
    residual_scale: Optional[float] = _option(
        None,
        "multiply the residual by this before noising (--residual; stored in the saved pipeline); default: measured "
        "from the training data so that the residual has unit standard deviation (a fine-tuned model keeps its own)",
    )
    allow_objective_change: bool = _option(
        False,
        "let explicit --residual / --prediction_type / --residual_scale differ from those of the model being "
        "fine-tuned (its weights then start from a different objective: it is retrained, not fine-tuned)",
    )
    per_sample_timestep: bool = _option(False, "draw the step per sample instead of one per batch (SR3's way)")
    beta_schedule: Optional[str] = _option(None, "noise schedule (default linear)")
    num_train_timesteps: Optional[int] = _option(None, "diffusion steps T (default 2000, tiny presets 100)")
    beta_start: Optional[float] = _option(None, "first beta (default 1e-6)")
    beta_end: Optional[float] = _option(None, "last beta (default 1e-2)")

    # Data.
    train_data_dir: Optional[str] = _option(
        None, "image folder (recursive), or the original's prepared layout (hr_N/lr_M folders or its LMDB)", path=True
    )
    train_images: Optional[List[str]] = _option(None, "image files to train on", path=True)
    train_dataset: Any = _option(None, "a torch Dataset of high-resolution images (Python only)", cli=False)
    dataset_name: Optional[str] = _option(
        None, "a Hub dataset, or a datasets builder for local files (imagefolder, parquet)"
    )
    dataset_config_name: Optional[str] = _option(None, "the dataset's configuration name")
    train_data_files: Optional[List[str]] = _option(None, "local data files (e.g. *.parquet) for datasets", path=True)
    dataset_split: str = _option("train", "dataset split")
    image_column: str = _option("image", "dataset column holding the images")
    streaming: bool = _option(False, "stream the dataset instead of downloading/converting it first")
    cache_dir: Optional[str] = _option(None, "datasets cache folder", path=True)
    max_train_samples: Optional[int] = _option(None, "use only this many training images")
    random_flip: bool = _option(True, "random horizontal flips")
    random_crop: bool = _option(False, "random full-scale crops instead of resize + centre crop")
    random_rotate: bool = _option(
        False, "random quarter-turns; with --random_flip, all 8 flips and rotations of the square crop (EDSR's)"
    )
    small_crop_size: Optional[int] = _option(
        None,
        "train on two crop sizes: cut a --small_crop_fraction of the batches of --resolution crops into crops of "
        "this smaller size (the same pixels per step, e.g. 4 x 128 -> 16 x 64), each with its own part of the LR",
    )
    small_crop_fraction: float = _option(0.5, "the fraction of batches that --small_crop_size cuts up")
    lr_blur_sigma: float = _option(0.0, "Gaussian-blur the LR input with sigma uniform in [0, this] (cascades)")
    film_grain_max: float = _option(
        0.0,
        "add film-like grain to the HR crop before its LR is made, std uniform in [0, this] 8-bit levels (models "
        "for film scans; 6 covers Kodak's)",
    )
    film_grain_probability: float = _option(0.5, "the fraction of crops that get --film_grain_max grain")
    condition_noise_max: float = _option(
        0.0,
        "noise-conditioning augmentation (cascades): noise the upsampled LR at a level uniform in [0, this) and give "
        "the level to the network (a new model gets condition_noise_embedding)",
    )
    condition_noise_level: Optional[float] = _option(
        None,
        "the augmentation level the saved pipeline samples with by default (with --condition_noise_max; default: 0 "
        "for a new model, a fine-tuned model's own)",
    )
    dataloader_num_workers: int = _option(0, "dataloader worker processes")
    dataset_repeats: int = _option(
        1,
        "passes over the training images per epoch, each shuffled and augmented anew (not for streamed data): at a "
        "large batch on a small dataset, longer epochs keep the data loader workers from idling at every epoch's end "
        "(--num_epochs counts these longer epochs)",
    )
    cache_images: bool = _option(
        False,
        "decode the training images once, before training, and keep their pixels in memory (about height x width x 3 "
        "bytes each, shared by the loader's workers): samples are cut from memory instead of decoding a file each, "
        "most of a worker's time on small tiles (not for streamed data)",
    )

    # Optimisation.
    train_batch_size: int = _option(16, "batch size per device")
    max_train_steps: Optional[int] = _option(None, "optimizer steps to run (overrides --num_epochs)")
    num_epochs: int = _option(100, "epochs, when --max_train_steps is not given")
    max_train_minutes: Optional[float] = _option(
        None,
        "also stop after this many minutes of training (the steps and epochs still bound the run; the model is "
        "saved as at a normal end, with a checkpoint when checkpointing is on)",
    )
    num_threads: Optional[int] = _option(
        None,
        "CPU threads of each training process, when training on CPU (default: torch's; under `accelerate launch`, "
        "which sets OMP_NUM_THREADS=1 unless given --cpu or --num_cpu_threads_per_process, the cores available "
        "divided among the machine's processes)",
    )
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _option(False, "trade compute for memory")
    channels_last: bool = _option(
        False, "channels_last memory layout for the UNet and its inputs (faster convolutions)"
    )
    fused_optimizer: bool = _option(True, "the fused AdamW kernel where PyTorch has one for the device")
    learning_rate: float = _option(1e-4, "peak learning rate (the paper: 1e-4)")
    scale_lr: bool = _option(False, "multiply the LR by batch size x accumulation x processes")
    lr_scheduler: str = _option(
        "constant_with_warmup",
        "diffusers LR schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial",
    )
    lr_warmup_steps: int = _option(500, "LR warm-up steps (the paper: 10000)")
    adam_beta1: float = _option(0.9, "Adam beta1")
    adam_beta2: float = _option(0.999, "Adam beta2")
    adam_weight_decay: float = _option(0.0, "AdamW decoupled weight decay")
    adam_epsilon: float = _option(1e-8, "Adam epsilon")
    max_grad_norm: Optional[float] = _option(1.0, "clip gradients to this norm (0 or None: no clipping)")
    mixed_precision: Optional[str] = _option(
        None, "no, fp16 or bf16 (default: accelerate config)", choices=("no", "fp16", "bf16")
    )
    seed: Optional[int] = _option(None, "random seed for a reproducible run")
    allow_tf32: bool = _option(False, "allow TF32 matmuls on Ampere+ GPUs")

    # EMA.
    use_ema: bool = _option(False, "keep an exponential moving average of the weights (saved as the model)")
    ema_decay: float = _option(0.9999, "maximum EMA decay")
    ema_min_decay: float = _option(0.0, "minimum EMA decay")
    ema_update_after_step: int = _option(0, "start the EMA after this many steps")
    ema_use_warmup: bool = _option(False, "EMA warm-up: decay 1 - (1 + step / inv_gamma) ** -power")
    ema_inv_gamma: float = _option(1.0, "EMA warm-up inverse gamma")
    ema_power: float = _option(0.75, "EMA warm-up power (3/4 for shorter runs, 2/3 for 1M+ steps)")

    # Output, checkpoints, validation, logging.
    output_dir: str = _option("sr3-model", "where the pipeline, checkpoints and logs go", path=True)
    checkpointing_steps: int = _option(500, "save a resumable checkpoint every this many steps (0: never)")
    checkpoints_total_limit: Optional[int] = _option(None, "keep at most this many checkpoints")
    resume_from_checkpoint: Optional[str] = _option(None, "a checkpoint folder, or `latest` in --output_dir", path=True)
    validation_steps: int = _option(500, "validate every this many steps (0: only at the end)")
    validation_images: Optional[List[str]] = _option(
        None, "high-resolution validation images (default: the first training images)", path=True
    )
    num_validation_images: int = _option(4, "how many validation images / samples")
    validation_scheduler: str = _option("dpmsolver", "scheduler for validation sampling (ddpm, ddim, dpmsolver, ...)")
    validation_steps_count: int = _option(20, "sampling steps at validation")
    report_to: str = _option("tensorboard", "tracker", choices=REPORT_TARGETS)
    quiet: bool = _option(False, "no progress bar (the log lines, warnings and final summary still show)")
    logging_dir: str = _option("logs", "tracker folder, relative to --output_dir", path=True)
    tracker_project_name: Optional[str] = _option(None, "tracker project / run name (default sr3 or sr3-uncond)")

    # How the saved pipeline samples by default (unset: a fine-tuned pipeline's own, else the pipeline's defaults).
    sampler: Optional[str] = _option(
        None,
        "the scheduler the pipeline is saved with: ddpm, ddim, dpmsolver, ... (default: a fine-tuned pipeline's own, "
        "else the training schedule's DDPM)",
    )
    fidelity_steps: Optional[int] = _option(
        None,
        "super-resolution: fidelity mode's default number of steps; more than 1 helps models trained for minutes (1)",
    )
    detail_steps: Optional[int] = _option(None, "super-resolution: detail mode's default number of steps (50)")
    detail_strength: Optional[float] = _option(
        None,
        "super-resolution: detail mode's default strength, in (0, 1]; below 1 starts from the fidelity answer "
        "(models that predict the clean image or v) (1)",
    )
    detail_eta: Optional[float] = _option(
        None, "super-resolution: detail mode's default eta, for samplers that take one (ddim) (the sampler's own)"
    )
    detail_window_size: Optional[int] = _option(
        None,
        "super-resolution: detail mode's default window size, the texture of training-sized windows at every step "
        "(the training crop size, --resolution; 0: off) (0)",
    )

    # Hub.
    push_to_hub: bool = _option(False, "upload the final pipeline and model card (never the checkpoints)")
    hub_model_id: Optional[str] = _option(None, "repo id to push to (default: the output folder's name)")
    hub_token: Optional[str] = _option(
        None, "Hub token (default: the saved login); never written to the model card, logs or trackers", repr=False
    )
    hub_private: bool = _option(False, "create the repo private")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        positive = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "num_epochs",
            "num_validation_images",
            "validation_steps_count",
            "dataset_repeats",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("resolution", "upscale_factor", "max_train_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be at least 1, got {self.max_train_steps}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must not be negative, got {self.lora_rank}")
        if self.lora_rank and not (self.pretrained_model_name_or_path or self.resume_from_original):
            raise ValueError(
                "--lora_rank trains adapters on top of a trained model's weights: give --pretrained_model_name_or_path "
                "(or --resume_from_original); a new model trains all its weights, without --lora_rank"
            )
        if self.lora_alpha is not None and not self.lora_rank:
            raise ValueError("--lora_alpha applies with --lora_rank only")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha:g}")
        if (self.resume_from_original is None) != (self.original_config is None):
            raise ValueError("--resume_from_original and --original_config go together")
        sources = [
            self.unet_config,
            self.model_config_name_or_path,
            self.pretrained_model_name_or_path,
            self.resume_from_original,
        ]
        if sum(source is not None for source in sources) > 1:
            raise ValueError(
                "give at most one of unet_config, --model_config_name_or_path, --pretrained_model_name_or_path and "
                "--resume_from_original"
            )
        if self.lr_blur_sigma < 0:
            raise ValueError(f"lr_blur_sigma must not be negative, got {self.lr_blur_sigma}")
        if self.task == "uncond" and self.lr_blur_sigma:
            raise ValueError("--lr_blur_sigma applies to super-resolution only")
        if self.film_grain_max < 0 or not 0 <= self.film_grain_probability <= 1:
            raise ValueError(
                f"film_grain_max must not be negative ({self.film_grain_max}) and film_grain_probability must lie in "
                f"[0, 1] ({self.film_grain_probability})"
            )
        if self.task == "uncond" and self.film_grain_max:
            raise ValueError("--film_grain_max applies to super-resolution only")
        if self.small_crop_size is not None and self.small_crop_size < 1:
            raise ValueError(f"small_crop_size must be positive, got {self.small_crop_size}")
        if not 0 <= self.small_crop_fraction <= 1:
            raise ValueError(f"small_crop_fraction must lie in [0, 1], got {self.small_crop_fraction}")
        if not 0 <= self.condition_noise_max < 1 or not 0 <= (self.condition_noise_level or 0.0) < 1:
            raise ValueError("--condition_noise_max and --condition_noise_level must lie in [0, 1)")
        if self.task == "uncond" and self.residual:
            raise ValueError("--residual applies to super-resolution only")
        # Unset, `residual` is the fine-tuned pipeline's own (checked once it is known) or off for a new model.
        may_be_residual = self.residual or (self.residual is None and self.pretrained_model_name_or_path is not None)
        if self.residual_scale is not None and not may_be_residual:
            raise ValueError("--residual_scale applies to residual training (--residual) only")
        if self.residual_scale is not None and not self.residual_scale > 0:
            raise ValueError(f"residual_scale must be positive, got {self.residual_scale}")
        if self.task == "uncond" and self.condition_noise_max:
            raise ValueError("--condition_noise_max applies to super-resolution only")
        # 0 is what training records for every unconditional model (`resolve_objective`), so only a level is refused.
        if self.task == "uncond" and self.condition_noise_level:
            raise ValueError("--condition_noise_level applies to super-resolution only")
        if self.task == "uncond" and self.upscale_factor is not None:
            raise ValueError("--upscale_factor applies to super-resolution only")
        if self.task == "uncond" and self.validation_images:
            raise ValueError("--validation_images applies to super-resolution only")
        if self.texture_loss_weight < 0 or self.texture_loss_patch_size < 2:
            raise ValueError(
                f"texture_loss_weight must not be negative ({self.texture_loss_weight:g}) and texture_loss_patch_size "
                f"must be at least 2 ({self.texture_loss_patch_size})"
            )
        if self.adversarial_loss_weight < 0:
            raise ValueError(f"adversarial_loss_weight must not be negative, got {self.adversarial_loss_weight:g}")
        if self.discriminator_learning_rate is not None and not self.discriminator_learning_rate > 0:
            raise ValueError(f"discriminator_learning_rate must be positive, got {self.discriminator_learning_rate:g}")
        if self.discriminator_learning_rate is not None and not self.adversarial_loss_weight:
            raise ValueError("--discriminator_learning_rate applies with --adversarial_loss_weight only")
        for option in ("sampler", "validation_scheduler"):
            name = getattr(self, option)
            if name is not None and name not in SCHEDULER_CLASS_NAMES:
                raise ValueError(
                    f"--{option} {name!r} is not a scheduler; expected one of {sorted(SCHEDULER_CLASS_NAMES)}"
                )
        sampling_options = [f"--{name}" for name in SAMPLING_CONFIG_KEYS if getattr(self, name) is not None]
        if self.task == "uncond" and sampling_options:
            raise ValueError(f"{', '.join(sampling_options)} apply to super-resolution only")


def _argument_type(annotation: Any) -> tuple:
    """(base type, is_list) of a field annotation such as `Optional[List[str]]`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _argument_type(inner[0])
    if origin in (list, List):
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add one `--name` option per `TrainingConfig` field; `defaults` overrides field defaults (e.g. `task`)."""
    hints = typing.get_type_hints(TrainingConfig)
    for item in dataclasses.fields(TrainingConfig):
        if not item.metadata.get("cli", True):
            continue
        default = defaults.get(item.name, item.default if item.default is not dataclasses.MISSING else None)
        base, is_list = _argument_type(hints[item.name])
        text = item.metadata["help"]
        # An unset option's help says what happens then; one that names its default needs no second one.
        if default is not None and "default" not in text:
            text = f"{text} (default: {default})"
        kwargs: dict = {"default": default, "help": text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = os.path.expanduser if item.metadata["path"] else base
            if is_list:
                kwargs["nargs"] = "+"
            if item.metadata.get("choices"):
                kwargs["choices"] = item.metadata["choices"]
        parser.add_argument(f"--{item.name}", **kwargs)
    return parser


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainingConfig:
    """The `TrainingConfig` of parsed arguments (`overrides` win, e.g. Python-only fields).

    When `args` are the process's own command line parsed (a training script's `sys.argv`), the config remembers
    that command line for `training_command` (the model card's "Training command").
    """
    names = {item.name for item in dataclasses.fields(TrainingConfig)}
    values = {name: value for name, value in vars(args).items() if name in names}
    values.update(overrides)
    config = TrainingConfig(**values)
    if _parsed_from_command_line(args):
        # Not a field: it describes how the run was started, not what it trains (trackers log the fields).
        config._command_line = list(sys.argv)
    return config


class _ParseError(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    """A parser that raises instead of printing the usage and exiting: it checks a command line, it serves none."""

    def error(self, message: str) -> typing.NoReturn:
        raise _ParseError(message)


def _parsed_from_command_line(args: argparse.Namespace) -> bool:
    """Whether the training options in `args` are what `sys.argv` gives: not so for a parser that a Python caller
    gave its own list of arguments, whose process's command line says nothing of the run."""
    parser = add_training_arguments(_QuietParser(add_help=False))
    try:
        parsed, _ = parser.parse_known_args(sys.argv[1:])
    except _ParseError:
        return False
    names = set(vars(parsed)) & set(vars(args))
    return bool(names) and all(getattr(parsed, name) == getattr(args, name) for name in names)


def training_command(config: TrainingConfig, argv: Optional[List[str]] = None) -> str:
    """The command that runs this training: the script's command line, or the Python call, with secrets redacted.

    It goes into the model card, which `--push_to_hub` publishes: tokens (`--hub_token`, `hub_token=`, values that
    look like Hub tokens or equal `HF_TOKEN`) are replaced by `<redacted>` (`diffusers_sr3.redaction`).

    Args:
        config: the run's configuration.
        argv: the arguments of the script that started the run; default: those `config_from_args` recorded when it
            made `config` from a script's command line. Without them (a config built in Python), or when the first
            is no `.py` script, the command is the Python call that builds `config`.
    """
    argv = list(getattr(config, "_command_line", []) if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        try:
            script = os.path.relpath(argv[0]) if not os.path.relpath(argv[0]).startswith("..") else argv[0]
        except ValueError:  # on another Windows drive than the working folder
            script = argv[0]
        return redact("accelerate launch " + shlex.join(redact_argv([script, *argv[1:]])))
    changed = []
    for item in dataclasses.fields(TrainingConfig):
        value = getattr(config, item.name)
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if value != default and item.name != "task":
            if item.name == "train_dataset":
                shown = "<dataset>"
            elif is_secret_name(item.name):
                shown = repr(REDACTED)
            else:
                shown = repr(value)
            changed.append(f"    {item.name}={shown},")
    lines = ["from diffusers_sr3.training import TrainingConfig, train", "", "train(TrainingConfig("]
    lines += [f"    task={config.task!r},", *changed, "))"]
    return redact("\n".join(lines))
