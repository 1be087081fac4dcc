"""Resumable checkpoints that are never half-written.

A checkpoint is a folder `checkpoint-<step>` in the output folder holding accelerate's state (model, optimizer,
LR schedule, RNG states of every process), the EMA weights (safetensors), the UNet's config (`unet_config.json`)
and `training_state.json` (the position, and the settings that say what the weights mean, which a resumed run must
keep). It is written under a temporary name and renamed into place only when complete, so a run killed while saving
leaves the previous checkpoints, and `latest`, intact. `load_checkpoint_unet` turns one into an `SR3UNet2DModel` (an
earlier checkpoint of a run is the autoguidance guide of its final model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from accelerate.utils import RNG_STATE_NAME
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from ..models.unet_sr3 import LORA_TARGET_MODULES, SR3UNet2DModel, convert_legacy_parameter_list, require_peft
from ..pipelines.base import _files_under, _give_new_file_modes

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
UNET_CONFIG_FILE = "unet_config.json"
# accelerate's copy of the trained (not averaged) weights, and the prefixes its wrappers may add to their names.
MODEL_FILE = "model.safetensors"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_TEMPORARY_PREFIX = ".tmp-checkpoint-"
# The key of `training_state.json` that holds the settings the weights were trained for (`check_same_objective`).
OBJECTIVE_KEY = "objective"
# The layers `--lora_rank` puts adapters on: every Linear and Conv2d of the blocks but the noise-level embedding's MLP
# (kept in float32, and shared by every block: a small change there shifts the whole network).
LORA_TRAINING_TARGETS = [
    *LORA_TARGET_MODULES["attention"],
    *LORA_TARGET_MODULES["resnet"],
    *LORA_TARGET_MODULES["film"],
]


def add_training_adapter(unet: SR3UNet2DModel, rank: int, alpha: Optional[float]) -> None:
    """Put the adapters a `--lora_rank` run trains on `unet` (PEFT's initialisation: B = 0, outputs unchanged); every
    other weight is frozen."""
    require_peft("LoRA training (--lora_rank)")
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TRAINING_TARGETS))


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str) -> Optional[str]:
    """The folder to resume from: `latest` -> the newest complete checkpoint (None if none yet), else the path."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is not a complete checkpoint (no {STATE_FILE})"
        )
    return path


def later_checkpoints(path: str, output_dir: str) -> List[str]:
    """The complete checkpoints in `output_dir` of steps after the one checkpoint `path` was saved at, oldest first."""
    match = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    if match:
        step = int(match.group(1))
    else:
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
                step = json.load(handle)["global_step"]
        except (ValueError, KeyError, TypeError):  # a damaged state, which resuming reports
            return []
    return [
        checkpoint
        for checkpoint in list_checkpoints(output_dir)
        if int(_CHECKPOINT.fullmatch(os.path.basename(checkpoint)).group(1)) > step
    ]


# What checkpoints saved before `--lora_rank` existed were trained with: without LoRA (resumed with it, their weights
# would be refused as not fitting the adapter's layers, as if damaged).
_BEFORE_LORA = {"lora_rank": 0, "lora_alpha": None}


def check_same_objective(path: str, objective: Dict[str, Any]) -> None:
    """Refuse to resume checkpoint `path` with settings that change what its weights mean.

    Args:
        path: a complete checkpoint folder.
        objective: the resumed run's settings, keyed by option name (residual, prediction_type, the noise schedule,
            use_ema, ...): those the checkpoint recorded under `OBJECTIVE_KEY` must be the same. Checkpoints of
            earlier versions recorded none and resume as before, without LoRA.
    """
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        saved = {**_BEFORE_LORA, **(json.load(handle).get(OBJECTIVE_KEY) or {})}
    differences = [
        f"--{key} {_shown(saved[key])} there, {_shown(objective[key])} here"
        for key in sorted(saved.keys() & objective.keys())
        if not _same(saved[key], objective[key])
    ]
    if differences:
        raise ValueError(
            f"{path} was trained with other settings ({'; '.join(differences)}): resume it with the options it was "
            "trained with, or start a new run in another --output_dir"
        )


def _same(saved: Any, current: Any) -> bool:
    # A measured residual scale is compared within rounding; booleans are not numbers here.
    numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (saved, current))
    return math.isclose(saved, current, rel_tol=1e-6) if numbers else saved == current


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_checkpoint_fits(path: str, unet_config: Dict[str, Any]) -> None:
    """Refuse, before loading anything, a checkpoint that misses a file of its state or that a run of another model
    saved (its `unet_config.json` differs from `unet_config` in a setting both name)."""
    # Process 0's random states at least: a run resumed on more processes than it was saved with has no others.
    expected = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
    missing = [name for name in expected if not os.path.isfile(os.path.join(path, name))]
    if not any(os.path.isfile(os.path.join(path, name)) for name in (MODEL_FILE, "pytorch_model.bin")):
        missing.insert(0, MODEL_FILE)
    if missing:
        raise FileNotFoundError(f"{path} is incomplete, it has no {', '.join(missing)}: resume from another checkpoint")
    config_file = os.path.join(path, UNET_CONFIG_FILE)
    if not os.path.isfile(config_file):  # checkpoints of earlier versions: the weights' shapes decide
        return
    with open(config_file, encoding="utf-8") as handle:
        saved = json.load(handle)
    current = json.loads(json.dumps(dict(unet_config)))  # tuples as the saved lists
    differences = [
        f"{key} {saved[key]} there, {current[key]} here"
        for key in sorted(saved.keys() & current.keys())
        if not key.startswith("_") and saved[key] != current[key]
    ]
    if differences:
        raise ValueError(
            f"{path} was saved by a run of another model ({'; '.join(differences)}): resume it with the options it "
            "was trained with, or start a new run in another --output_dir"
        )


def check_random_states(path: str, process_index: int) -> None:
    """Refuse a checkpoint whose random states for this process cannot be restored.

    accelerate's `load_state` only logs (at INFO) when it cannot restore them and goes on with other randomness, so
    the resumed run would silently not be the one that was stopped.

    Args:
        path: a complete checkpoint folder.
        process_index: the index of this process; its `random_states_<index>.pkl` is checked. When absent, as on a
            process a run saved on fewer processes never had, accelerate keeps this run's seeded states as before.

    Raises:
        pickle.UnpicklingError: the file is damaged, or holds no random states accelerate saved.
    """
    name = f"{RNG_STATE_NAME}_{process_index}.pkl"
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return
    try:
        # accelerate's own loader (weights_only, numpy allowed), as load_state reads it; restored into throwaway
        # generators so that nothing changes before load_state restores them for real. A device's generator state
        # is only restored by accelerate when present, so it is not required here.
        states = accelerate_load(file)
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except PermissionError:
        raise
    # Whatever a damaged or foreign file makes torch.load (an OSError for a truncated one) or the generators raise.
    except Exception as error:
        lines = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise pickle.UnpicklingError(f"{name} is damaged ({detail})") from None


def temporary_checkpoint_dir(output_dir: str, step: int) -> str:
    """Where a checkpoint is written before it is renamed into place (stale leftovers are removed first)."""
    path = os.path.join(output_dir, f"{_TEMPORARY_PREFIX}{step}")
    shutil.rmtree(path, ignore_errors=True)
    return path


def remove_stale_temporaries(output_dir: str) -> None:
    """Delete checkpoints that a killed run left half-written."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(_TEMPORARY_PREFIX):
            logger.info("removing the incomplete checkpoint %s left by an interrupted run", name)
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def finish_checkpoint(
    temporary: str,
    output_dir: str,
    step: int,
    state: Dict[str, Any],
    ema: Optional[Any],
    total_limit: Optional[int],
    unet_config: Optional[Dict[str, Any]] = None,
) -> str:
    """Write the EMA, the UNet config and the step counter into `temporary`, rename it to `checkpoint-<step>`, prune
    old ones.

    Call on the main process after every process has written its part of accelerate's state.
    """
    if unet_config is not None:
        with open(os.path.join(temporary, UNET_CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(dict(unet_config), handle, indent=2, sort_keys=True)
    if ema is not None:
        shadow = {f"{index:05d}": tensor.detach().cpu().contiguous() for index, tensor in enumerate(ema.shadow_params)}
        save_file(shadow, os.path.join(temporary, EMA_FILE))
        state = dict(state, ema={k: v for k, v in ema.state_dict().items() if k != "shadow_params"})
    # The state file is the completeness marker: written last, inside the folder that is renamed atomically.
    with open(os.path.join(temporary, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    # As a save's: safetensors writes the trained and the EMA weights readable by their owner alone, and an earlier
    # checkpoint is loaded as a model (a guide, `load_checkpoint_unet`), by whoever may read the run's folder.
    _give_new_file_modes(temporary, _files_under(temporary))
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(temporary, final)
    if total_limit is not None:
        # The oldest go, never the one just written (older than others, it is still what this run resumes from).
        others = [path for path in list_checkpoints(output_dir) if os.path.basename(path) != os.path.basename(final)]
        for old in others[: max(0, len(others) - (total_limit - 1))]:
            logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, total_limit)
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_extras(path: str, ema: Optional[Any], model: Optional[Any] = None) -> Dict[str, Any]:
    """Read `training_state.json` and restore the EMA (safetensors, no pickle) from a checkpoint.

    With `model`, EMA weights saved by diffusers-sr3 0.1.0 (attention before Diffusers' `Attention`) are converted.
    """
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    if ema is not None:
        ema_path = os.path.join(path, EMA_FILE)
        if not os.path.isfile(ema_path):
            raise FileNotFoundError(f"{path} has no EMA weights ({EMA_FILE}): it was saved without --use_ema")
        weights = _read_ema_weights(ema_path, len(ema.shadow_params), model)
        settings = dict(state.get("ema", {}))
        ema.load_state_dict(settings)
        with torch.no_grad():
            for param, value in zip(ema.shadow_params, weights):
                param.copy_(value.to(param.device, param.dtype))
    return state


def _read_ema_weights(ema_path: str, parameter_count: int, model: Optional[Any] = None) -> List[torch.Tensor]:
    """The EMA weights in `ema_path`, in the model's parameter order; with `model`, those saved by diffusers-sr3
    0.1.0 (attention before Diffusers' `Attention`) are converted."""
    shadow = load_file(ema_path)
    weights = [shadow[f"{index:05d}"] for index in range(len(shadow))]
    if model is not None and len(weights) != parameter_count:
        weights = convert_legacy_parameter_list(model, weights)
    if len(weights) != parameter_count:
        raise ValueError(f"{ema_path} holds {len(weights)} tensors, the model has {parameter_count}")
    return weights


def load_checkpoint_unet(path: str, use_ema: bool = True) -> SR3UNet2DModel:
    """The UNet of a training checkpoint (`OUTPUT_DIR/checkpoint-<step>`), in float32 and eval mode.

    Args:
        path: a complete checkpoint folder.
        use_ema: take the EMA weights (what the run saves as its model) when the checkpoint has them; False, or a
            run without `--use_ema`, takes the trained weights.

    Returns:
        An `SR3UNet2DModel`, e.g. the guide of the run's final model:
        `SR3Pipeline.from_pretrained(OUTPUT_DIR, guidance_unet=load_checkpoint_unet(...), guidance_scale=2)`.

    The config is the checkpoint's `unet_config.json`; checkpoints saved before it was written take the config of the
    pipeline the same run saved in its output folder.
    """
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    config_file = os.path.join(path, UNET_CONFIG_FILE)
    if not os.path.isfile(config_file):
        config_file = os.path.join(os.path.dirname(os.path.abspath(path)), "unet", "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{path} has no {UNET_CONFIG_FILE} (checkpoints of earlier versions lack it), and its "
                "output folder holds no saved pipeline (unet/config.json) to take the config from"
            )
    unet = SR3UNet2DModel.from_config(SR3UNet2DModel.load_config(config_file))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        objective = json.load(handle).get(OBJECTIVE_KEY) or {}
    if objective.get("lora_rank"):
        # A LoRA run's weights and EMA are its adapters' on top of the frozen ones: merged in once loaded.
        add_training_adapter(unet, objective["lora_rank"], objective.get("lora_alpha"))
    ema_path = os.path.join(path, EMA_FILE)
    averaged = use_ema and os.path.isfile(ema_path)
    # A LoRA run's EMA covers its adapters alone: the frozen weights come from the trained ones.
    if not averaged or objective.get("lora_rank"):
        model_path = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{path} has no {MODEL_FILE}: not a checkpoint of a single-UNet training run")
        weights = {}
        for name, value in load_file(model_path).items():
            for prefix in _WRAPPER_PREFIXES:
                name = name[len(prefix) :] if name.startswith(prefix) else name
            weights[name] = value
        try:
            unet.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"{model_path} does not fit the config in {config_file}: {error}") from None
    if averaged:
        parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
        with torch.no_grad():
            for parameter, value in zip(parameters, _read_ema_weights(ema_path, len(parameters), unet)):
                if parameter.shape != value.shape:
                    raise ValueError(f"{ema_path} does not fit the config in {config_file}")
                parameter.copy_(value)
    if objective.get("lora_rank"):
        unet.fuse_lora()
        unet.unload_lora()
        unet.requires_grad_(True)  # as any other loaded model
    return unet.eval()
