"""The training loop shared by `examples/train_sr3.py`, `examples/train_uncond.py`, the demo and the benchmarks.

One process or many (`accelerate launch`), one code path: Accelerate handles devices, DDP, mixed precision and
gradient accumulation; this module owns the model set-up, the SR3 objective (`training.objective`), EMA,
resumable checkpoints (`training.checkpointing`), validation (`training.validation`), the final save with a
model card, and the Hub upload.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import FileListSource, PairDataset, PairMaker, TrainingData, build_training_data
from ..model_card import write_model_card
from ..models.unet_sr3 import SR3UNet2DModel, convert_legacy_optimizer_state
from ..noise import make_scheduler, swap_scheduler, training_betas
from ..presets import get_preset
from .checkpointing import (
    finish_checkpoint,
    list_checkpoints,
    load_checkpoint_extras,
    remove_stale_temporaries,
    resolve_checkpoint,
    temporary_checkpoint_dir,
)
from .config import TrainingConfig, training_command
from .hub import push_folder
from .objective import diffusion_loss, measure_residual_scale, noise_batch, predict
from .validation import build_pipeline, log_validation, run_validation

logger = logging.getLogger(__name__)

DEFAULT_PRESETS = {"sr": "sr_16_128", "uncond": "uncond_128"}
SUMMARY_FILE = "training_summary.json"
SR3_SCHEDULE = dict(beta_schedule="linear", num_train_timesteps=2000, beta_start=1e-6, beta_end=1e-2)


# Training images the residual scale is measured on (without augmentation, so resumed runs measure the same).
RESIDUAL_SCALE_SAMPLES = 256


def _hub_id(name_or_path: Optional[str]) -> Optional[str]:
    """A Hub repo id (`owner/name`), or None for local folders and nothing."""
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


def _unet_config_file(path: str) -> str:
    for candidate in (path, os.path.join(path, "config.json"), os.path.join(path, "unet", "config.json")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"--model_config_name_or_path {path}: no config.json there (nor in unet/)")


def build_model(config: TrainingConfig) -> ModelSetup:
    """The UNet (fresh from a preset or config, or with pretrained / converted-original weights) and scheduler."""
    weights: Optional[Dict[str, torch.Tensor]] = None
    pretrained_scheduler = None
    pretrained_residual_scale = None
    upscale_factor = config.upscale_factor
    preset = None
    if config.pretrained_model_name_or_path or config.resume_from_original:
        if config.resume_from_original:
            from ..convert import convert_original_checkpoint

            pipeline = convert_original_checkpoint(config.resume_from_original, config.original_config)
            description = f"fine-tuned from the original checkpoint {os.path.basename(config.resume_from_original)}"
        else:
            from ..pipelines import SR3BasePipeline

            pipeline = SR3BasePipeline.from_pretrained(config.pretrained_model_name_or_path)
            description = f"fine-tuned from {config.pretrained_model_name_or_path}"
        unet_config = dict(pipeline.unet.config)
        weights = pipeline.unet.state_dict()
        pretrained_scheduler = pipeline.scheduler
        pretrained_residual_scale = pipeline.config.get("residual_scale") if pipeline.config.get("residual") else None
        if upscale_factor is None:
            upscale_factor = getattr(pipeline.config, "upscale_factor", None)
    elif config.model_config_name_or_path:
        unet_config = dict(SR3UNet2DModel.load_config(_unet_config_file(config.model_config_name_or_path)))
        description = f"config {config.model_config_name_or_path}"
    else:
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

    schedule_options = dict(
        beta_schedule=config.beta_schedule,
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
    )
    if pretrained_scheduler is not None and all(value is None for value in schedule_options.values()):
        scheduler = swap_scheduler(pretrained_scheduler, "ddpm", prediction_type=config.prediction_type)
    else:
        defaults = preset.scheduler if preset else SR3_SCHEDULE
        schedule = {key: defaults[key] if value is None else value for key, value in schedule_options.items()}
        scheduler = make_scheduler(
            "ddpm",
            schedule=schedule["beta_schedule"],
            n_timestep=schedule["num_train_timesteps"],
            linear_start=schedule["beta_start"],
            linear_end=schedule["beta_end"],
            prediction_type=config.prediction_type,
        )
    return ModelSetup(unet, scheduler, upscale_factor, resolution, description, pretrained_residual_scale)


def _tracker_config(config: TrainingConfig) -> Dict[str, Any]:
    """The options as flat scalars (what TensorBoard's hparams accept)."""
    flat = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in ("hub_token", "train_dataset"):
            continue
        flat[item.name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


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

    def _make_dataloader(self, data: TrainingData, seed: int) -> DataLoader:
        config = self.config
        return DataLoader(
            data.dataset,
            batch_size=config.train_batch_size,
            sampler=data.sampler,
            num_workers=config.dataloader_num_workers,
            drop_last=data.sampler is not None,
            # Its own generator: creating an iterator must not consume the global RNG (exact resumes).
            generator=torch.Generator().manual_seed(seed),
            pin_memory=torch.cuda.is_available(),
        )

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> str:
        """Train, save the pipeline (EMA weights when used) with a model card, push if asked; return the folder."""
        try:
            return self._run()
        finally:
            # Accelerate keeps its settings in process-wide singletons; clearing them (not the process group) lets
            # another `train()` in this process (a benchmark sweep, the demo) use other settings.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state()
            GradientState._reset_state()

    def _run(self) -> str:
        config = self.config
        started = time.time()
        accelerator = self.accelerator = self._make_accelerator()
        self.num_processes, self.process_index = accelerator.num_processes, accelerator.process_index
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
            os.makedirs(config.output_dir, exist_ok=True)
            remove_stale_temporaries(config.output_dir)

        setup = build_model(config)
        model = self.model = setup.unet
        model.train()
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model.to(memory_format=memory_format)
        betas = training_betas(setup.scheduler)

        with accelerator.main_process_first():
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
            )
        if data.skipped_at_scan:
            listed = ", ".join(f"{count} {reason}" for reason, count in sorted(data.skipped_at_scan.items()))
            logger.warning(
                "skipped %d unusable images of %s: %s", sum(data.skipped_at_scan.values()), data.description, listed
            )
        streaming = data.sampler is None
        if streaming and config.max_train_steps is None:
            raise ValueError("streamed data has no length: give --max_train_steps")
        if not streaming and len(data.dataset) < config.train_batch_size:
            raise ValueError(
                f"{data.description} has {len(data.dataset)} usable images, fewer than --train_batch_size "
                f"{config.train_batch_size}"
            )
        self.residual_scale = self._residual_scale(data, setup)
        validation_samples = self._validation_samples(data, setup)
        dataloader = self._make_dataloader(data, seed)

        learning_rate = config.learning_rate
        if config.scale_lr:
            learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
            fused=config.fused_optimizer or None,
        )
        # Optimizer states of checkpoints saved by diffusers-sr3 0.1.0 (other attention parameters) still resume.
        optimizer.register_load_state_dict_pre_hook(lambda _, state: convert_legacy_optimizer_state(model, state))
        if streaming:
            max_train_steps = config.max_train_steps
        else:
            # Batches per process after sharding, then optimizer steps (the last partial accumulation syncs too).
            batches = math.ceil(len(dataloader) / accelerator.num_processes)
            steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
            max_train_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
        from diffusers.optimization import get_scheduler

        # The prepared scheduler steps once per process per optimizer step, so its horizon scales the same way.
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes,
        )
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)

        ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(
                model.parameters(),
                decay=config.ema_decay,
                min_decay=config.ema_min_decay,
                update_after_step=config.ema_update_after_step,
                use_ema_warmup=config.ema_use_warmup,
                inv_gamma=config.ema_inv_gamma,
                power=config.ema_power,
                model_cls=SR3UNet2DModel,
                model_config=model.config,
            )
            ema.to(accelerator.device)

        global_step, epoch, batches_done = 0, 0, 0
        resumed_from = None
        if config.resume_from_checkpoint:
            resumed_from = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
            if resumed_from is None:
                logger.info("no checkpoint in %s yet: starting a new run", config.output_dir)
            else:
                accelerator.load_state(resumed_from)
                state = load_checkpoint_extras(resumed_from, ema, model)
                global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_in_epoch"]
                logger.info("resumed from %s at step %d (epoch %d)", resumed_from, global_step, epoch)

        if accelerator.is_main_process:
            accelerator.init_trackers(
                config.tracker_project_name or ("sr3" if config.task == "sr" else "sr3-uncond"),
                config=_tracker_config(config),
            )
        total_batch = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        logger.info(
            "training %s (%.2fM parameters) on %s: %d steps, batch %d (%d per device x %d processes x %d accumulation)",
            setup.description,
            sum(p.numel() for p in model.parameters()) / 1e6,
            data.description,
            max_train_steps,
            total_batch,
            config.train_batch_size,
            accelerator.num_processes,
            config.gradient_accumulation_steps,
        )
        progress = tqdm(
            total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
        )
        skipped = torch.zeros((), dtype=torch.long, device=accelerator.device)
        recent_losses = []
        first_step, loop_started = global_step, time.time()
        while global_step < max_train_steps:
            epoch_loader = accelerator.skip_first_batches(dataloader, batches_done) if batches_done else dataloader
            # Accelerate's loaders pass the epoch on to the sampler (or the streamed dataset) when iterated.
            epoch_loader.set_epoch(epoch)
            batches_in_epoch = batches_done
            batches_done = 0
            saw_batch = False
            for batch in epoch_loader:
                saw_batch = True
                batches_in_epoch += 1
                skipped += batch["skipped"].sum()
                with accelerator.accumulate(unet):
                    noised = noise_batch(
                        model,
                        betas,
                        batch["hr"].contiguous(memory_format=memory_format),
                        None
                        if batch.get("condition") is None
                        else batch["condition"].contiguous(memory_format=memory_format),
                        prediction_type=config.prediction_type,
                        per_sample_timestep=config.per_sample_timestep,
                        condition_noise_max=config.condition_noise_max,
                        residual=config.residual,
                        residual_scale=self.residual_scale,
                    )
                    prediction = predict(unet, noised)
                    loss = diffusion_loss(
                        prediction, noised, config.loss_type, config.snr_gamma, config.prediction_type
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss = accelerator.gather(loss.detach()).mean().item()
                recent_losses = (recent_losses + [step_loss])[-100:]
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(model.parameters())
                global_step += 1
                last_lr = lr_scheduler.get_last_lr()[0]
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{last_lr:.2e}")
                logs = {"train/loss": step_loss, "train/lr": last_lr}
                if ema is not None:
                    logs["train/ema_decay"] = ema.cur_decay_value
                accelerator.log(logs, step=global_step)
                if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                    self._save_checkpoint(accelerator, ema, global_step, epoch, batches_in_epoch)
                if config.validation_steps and global_step % config.validation_steps == 0:
                    self._validate(accelerator, model, ema, setup, validation_samples, global_step)
                if global_step >= max_train_steps:
                    break
            # A run resumed exactly at the end of an epoch skips every batch of it: that is not an empty dataset.
            if not saw_batch and batches_in_epoch == 0:
                raise ValueError(f"{data.description} gave no batch in epoch {epoch}: no usable training images")
            if global_step < max_train_steps:
                epoch += 1
        progress.close()
        train_seconds = time.time() - loop_started
        skipped_total = int(accelerator.reduce(skipped, reduction="sum").item())

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.summary = dict(
                output_dir=config.output_dir,
                global_step=global_step,
                steps_this_run=global_step - first_step,
                epochs=epoch + 1,
                resumed_from=resumed_from,
                num_processes=accelerator.num_processes,
                total_batch_size=total_batch,
                final_loss=sum(recent_losses) / len(recent_losses) if recent_losses else None,
                skipped_at_scan=dict(data.skipped_at_scan),
                skipped_during_training=skipped_total,
                train_seconds=round(train_seconds, 2),
                steps_per_second=round((global_step - first_step) / train_seconds, 3) if train_seconds else None,
                checkpoints=[os.path.basename(path) for path in list_checkpoints(config.output_dir)],
                residual_scale=self.residual_scale if config.residual else None,
            )
            self._save_final(accelerator, model, ema, setup, data, validation_samples, global_step)
            self.summary["total_seconds"] = round(time.time() - started, 2)
            with open(os.path.join(config.output_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
                json.dump(self.summary, handle, indent=2)
            self._print_summary()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if accelerator.is_main_process and config.push_to_hub:
            self.summary["hub_commit"] = push_folder(
                config.output_dir, config.hub_model_id, config.hub_token, config.hub_private
            )
            logger.info("uploaded to %s", self.summary["hub_commit"])
        return config.output_dir

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

    def _validation_samples(self, data: TrainingData, setup: ModelSetup):
        config = self.config
        if setup.upscale_factor is None:
            return []
        if config.validation_images:
            maker = PairMaker(setup.resolution, setup.upscale_factor)
            dataset = PairDataset(FileListSource(config.validation_images, "validation_images"), maker)
            return [dataset.sample(index, augment=False) for index in range(len(config.validation_images))]
        return data.validation_samples(config.num_validation_images)

    def _save_checkpoint(self, accelerator: Accelerator, ema: Any, step: int, epoch: int, batches: int) -> None:
        config = self.config
        temporary = temporary_checkpoint_dir(config.output_dir, step) if accelerator.is_main_process else None
        temporary = _broadcast_path(accelerator, temporary)
        accelerator.save_state(temporary)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = dict(global_step=step, epoch=epoch, batches_in_epoch=batches)
            path = finish_checkpoint(temporary, config.output_dir, step, state, ema, config.checkpoints_total_limit)
            logger.info("saved checkpoint %s", path)
        accelerator.wait_for_everyone()

    def _validate(
        self, accelerator: Accelerator, model: SR3UNet2DModel, ema: Any, setup: ModelSetup, samples, step: int
    ) -> Tuple[Dict[str, float], Any]:
        result: Tuple[Dict[str, float], Any] = ({}, None)
        if accelerator.is_main_process:
            if ema is not None:
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
            model.eval()
            result = self._run_validation(model, setup, samples)
            model.train()
            if ema is not None:
                ema.restore(model.parameters())
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
        )

    def _save_final(self, accelerator, model, ema, setup, data, samples, step) -> None:
        config = self.config
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        metrics, picture = self._run_validation(model, setup, samples)
        log_validation(accelerator, metrics, picture, step)
        picture.save(os.path.join(config.output_dir, "validation.png"))
        pipeline = build_pipeline(
            model,
            setup.scheduler,
            setup.upscale_factor,
            config.condition_noise_level,
            config.residual,
            self.residual_scale,
        )
        pipeline.save_pretrained(config.output_dir)
        if ema is not None:
            ema.restore(model.parameters())
        self.summary["validation"] = metrics
        hub_dataset = config.dataset_name if config.dataset_name and "/" in config.dataset_name else None
        write_model_card(
            config.output_dir,
            task=config.task,
            repo_id=config.hub_model_id if config.push_to_hub else None,
            upscale_factor=setup.upscale_factor,
            resolution=setup.resolution,
            datasets=[hub_dataset] if hub_dataset else None,
            data_description=data.description if not hub_dataset else hub_dataset,
            metrics=metrics,
            sample_image="validation.png",
            training_command=training_command(config),
            base_model=_hub_id(config.pretrained_model_name_or_path),
            training_summary={
                "model": setup.description,
                "steps": step,
                "total batch size": self.summary["total_batch_size"],
                "learning rate": f"{config.learning_rate:g} ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up)",
                "loss": f"{config.loss_type}, {config.prediction_type} prediction"
                + (f", min-SNR gamma {config.snr_gamma:g}" if config.snr_gamma else "")
                + (f", on the residual x {self.residual_scale:g}" if config.residual else ""),
                "EMA": f"decay {config.ema_decay:g}" if config.use_ema else "no",
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
            f"{summary['train_seconds']} s, {summary['steps_per_second']} steps/s) on {summary['num_processes']} "
            f"process(es), total batch {summary['total_batch_size']}.",
            f"  final loss (mean of last steps): {summary['final_loss']:.5f}"
            if summary["final_loss"] is not None
            else "  no step ran in this run",
            f"  skipped images: {sum(scan.values())} at scan {scan or ''}, "
            f"{summary['skipped_during_training']} read failures during training",
        ]
        if summary.get("validation"):
            lines.append("  validation: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["validation"].items()))
        if summary["checkpoints"]:
            lines.append(f"  checkpoints: {', '.join(summary['checkpoints'])}")
        lines.append(f"  pipeline saved to {summary['output_dir']} (model card README.md, validation.png)")
        print("\n".join(lines), flush=True)


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
