"""Convert checkpoints of the original SR3 code (Janspiry/Image-Super-Resolution-via-Iterative-Refinement).

An original checkpoint is `I{iter}_E{epoch}_gen.pth`: a plain state dict of the GaussianDiffusion module (12
noise-schedule buffers plus the network under `denoise_fn.`), next to the JSON config it was trained with.
The converted pipeline reproduces the original network and its DDPM sampler.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .models.unet_sr3 import SR3UNet2DModel, convert_legacy_attention_keys
from .noise import make_beta_schedule, make_scheduler
from .pipelines import SR3BasePipeline, SR3Pipeline, SR3UnconditionalPipeline

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Renames inside one original ResnetBlocWithAttn / Downsample / Upsample. The attention weights get this package's
# first names (a 1x1-conv `qkv`), which `convert_legacy_attention_keys` then splits into Diffusers' `Attention`.
_BLOCK_RENAMES = (
    ("res_block.block1.block.0.", "resnet.block1.norm."),
    ("res_block.block1.block.3.", "resnet.block1.conv."),
    ("res_block.block2.block.0.", "resnet.block2.norm."),
    ("res_block.block2.block.3.", "resnet.block2.conv."),
    ("res_block.noise_func.noise_func.0.", "resnet.embedding_proj."),  # sr3
    ("res_block.mlp.1.", "resnet.embedding_proj."),  # ddpm
    ("res_block.res_conv.", "resnet.skip."),
    ("attn.norm.", "attention.norm."),
    ("attn.qkv.", "attention.qkv."),
    ("attn.out.", "attention.proj_out."),
    ("conv.", "conv."),
)
_TOP_RENAMES = {
    "sr3": {
        "noise_level_mlp.1.": "noise_level_embedding.linear_1.",
        "noise_level_mlp.3.": "noise_level_embedding.linear_2.",
    },
    "ddpm": {"time_mlp.1.": "noise_level_embedding.linear_1.", "time_mlp.3.": "noise_level_embedding.linear_2."},
}
_FINAL_RENAMES = {"final_conv.block.0.": "conv_out.norm.", "final_conv.block.3.": "conv_out.conv."}


class CheckpointError(ValueError):
    """The file is not an original SR3 checkpoint, or does not match its config."""


def load_original_config(config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """Read an original JSON config; `//` comments (as in the original's config files) are allowed."""
    if isinstance(config, dict):
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            text = "".join(_strip_line_comment(line) for line in handle)
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path} is not a JSON config but a binary file (the checkpoint given as the config?)"
        ) from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not a valid JSON config: {error}") from None
    if not isinstance(parsed, dict) or "model" not in parsed:
        raise CheckpointError(f"{path} is not an original SR3 config (no 'model' section)")
    return parsed


def _strip_line_comment(line: str) -> str:
    """Drop a `//` comment that is outside a JSON string."""
    in_string = escaped = False
    for index, char in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif line.startswith("//", index):
            return line[:index] + "\n"
    return line


def checkpoint_file(path: Union[str, os.PathLike]) -> str:
    """The `_gen.pth` file that `path` names: the file itself, or `path + "_gen.pth"` for the stem the original
    code's `resume_state` setting takes (`.../I10_E1`).

    Raises:
        FileNotFoundError: neither exists.
        IsADirectoryError: `path` is a folder (its `_gen.pth` files named, where it holds some).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith("_gen.pth"))
        hint = ""
        if len(found) == 1:
            hint = f": pass the checkpoint file in it, {os.path.join(path, found[0])}"
        elif found:
            hint = f": pass one of its _gen.pth files ({', '.join(found)})"
        raise IsADirectoryError(f"checkpoint {path} is a folder, not an I{{iter}}_E{{epoch}}_gen.pth file{hint}")
    if os.path.isfile(path):
        return path
    if os.path.isfile(path + "_gen.pth"):
        return path + "_gen.pth"
    raise FileNotFoundError(f"checkpoint not found: {path}")


def load_original_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Load an original `_gen.pth` safely (`weights_only=True`: never runs code from the file).

    Args:
        path: the `_gen.pth` file, or its stem (`checkpoint_file`). The state dict may also be wrapped in a dict
            of one entry (`{"state_dict": ...}`, `{"netG": ...}`), or be the bare network's (no `denoise_fn.`).
    """
    path = checkpoint_file(path)
    # The weights-only unpickler runs nothing from the file but fails on arbitrary bytes with errors of any kind
    # (KeyError, IndexError, UnpicklingError...): each means the file is not a checkpoint of plain tensors.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Not torch's own text: it advises loading with weights_only=False, which could run code from the file.
        if "global" in str(error).lower():  # "Unsupported global", "unsupported GLOBAL", "not an allowed global"
            reason = "it holds pickled Python objects, not only tensors, and loading them could run code from it"
        else:
            reason = "it is no checkpoint of plain tensors (torch's safe loader cannot read it)"
        raise CheckpointError(f"{path} is not an original SR3 checkpoint: {reason}") from None
    except Exception as error:
        # The type too: the unpickler's KeyError or IndexError says only `101` or `pop from empty list`.
        message = str(error).strip()
        reason = error.__class__.__name__ + (f": {message.splitlines()[0]}" if message else "")
        raise CheckpointError(
            f"{path} is not an original SR3 checkpoint: it cannot be loaded as plain tensors ({reason})"
        ) from None
    if isinstance(state, dict) and {"optimizer", "iter", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is an optimizer-state file (_opt.pth); pass the matching _gen.pth")
    # Other training code saves the state dict under one key ("state_dict", "model", "netG").
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} is not an original SR3 checkpoint: expected a dict of named tensors")
    state = {key[len("module.") :] if key.startswith("module.") else key: value for key, value in state.items()}
    if "downs.0.weight" in state and not any(key.startswith("denoise_fn.") for key in state):
        # The network's own state dict, saved without the diffusion wrapper (its schedule comes from the config).
        state = {f"denoise_fn.{key}": value for key, value in state.items()}
    if not any(key.startswith("denoise_fn.") for key in state):
        raise CheckpointError(
            f"{path} is not an original SR3 checkpoint: it has neither 'denoise_fn.*' weights nor the bare network's "
            "('downs.0.weight', ...)"
        )
    return state


def _section(parent: Dict[str, Any], key: str, path: str, required: bool = True) -> Dict[str, Any]:
    """The JSON object `parent[key]`, at `path` in the config; {} for an optional one that is absent or null.

    Raises:
        CheckpointError: a required section is absent or null, or the value is not a JSON object.
    """
    value = parent.get(key)
    if value is None and not required:
        return {}
    if value is None:
        raise CheckpointError(f"the config has no {path} section")
    if not isinstance(value, dict):
        raise CheckpointError(f"the config's {path} must be a JSON object, got {json.dumps(value)}")
    return value


_KINDS = {int: "a whole number", float: "a number", list: "a list", str: "a string"}
_REQUIRED = object()


def _setting(section: Dict[str, Any], key: str, path: str, kind: type, default: Any = _REQUIRED) -> Any:
    """`section[key]`, at `path` in the config: present, not null and a `kind` (int, float, list or str).

    Args:
        kind: the JSON type wanted; `float` takes any number (`1` as well as `1.0`).
        default: the value of an optional setting that is absent or null (else the setting is required).

    Raises:
        CheckpointError: the setting is absent or null without a default, or of another type (named by its JSON
            path).
    """
    value = section.get(key)
    if value is None:
        if default is not _REQUIRED:
            return default
        raise CheckpointError(f"the config has no {path}.{key}")
    wanted = (int, float) if kind is float else kind
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise CheckpointError(f"the config's {path}.{key} must be {_KINDS[kind]}, got {json.dumps(value)}")
    return value


def _whole_numbers(section: Dict[str, Any], key: str, path: str) -> Tuple[int, ...]:
    """`section[key]`, at `path` in the config: a list of whole numbers (`4.0` or `"4"` are refused by name, not
    left to fail inside the network's construction).

    Raises:
        CheckpointError: the setting is absent, not a list, or holds anything but whole numbers.
    """
    values = _setting(section, key, path, list)
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        raise CheckpointError(f"the config's {path}.{key} must be a list of whole numbers, got {json.dumps(values)}")
    return tuple(values)


def unet_config_from_original(config: Dict[str, Any]) -> Dict[str, Any]:
    """The `SR3UNet2DModel` config equivalent to an original config's network.

    Raises:
        CheckpointError: a setting the network needs is missing or of the wrong type (named by its JSON path).
    """
    model = _section(config, "model", "model")
    unet = _section(model, "unet", "model.unet")
    kind = model.get("which_model_G", "sr3")
    if kind not in ("sr3", "ddpm"):
        raise CheckpointError(f"which_model_G must be 'sr3' or 'ddpm', got {kind!r}")
    return dict(
        in_channels=_setting(unet, "in_channel", "model.unet", int),
        out_channels=_setting(unet, "out_channel", "model.unet", int),
        block_out_channels=_setting(unet, "inner_channel", "model.unet", int),
        channel_multipliers=_whole_numbers(unet, "channel_multiplier", "model.unet"),
        layers_per_block=_setting(unet, "res_blocks", "model.unet", int),
        attention_resolutions=_whole_numbers(unet, "attn_res", "model.unet"),
        sample_size=_setting(_section(model, "diffusion", "model.diffusion"), "image_size", "model.diffusion", int),
        # The original's defaults when its config omits them.
        norm_groups=_setting(unet, "norm_groups", "model.unet", int, default=32),
        dropout=float(_setting(unet, "dropout", "model.unet", float, default=0.0)),
        conditioning_type="noise_level" if kind == "sr3" else "timestep",
    )


def _block_prefixes(num_levels: int, layers_per_block: int) -> Dict[str, str]:
    """Original flat module prefixes (`downs.N`, `mid.N`, `ups.N`) -> this package's module prefixes."""
    prefixes = {"downs.0.": "conv_in."}
    index = 1
    for level in range(num_levels):
        for block in range(layers_per_block):
            prefixes[f"downs.{index}."] = f"down_levels.{level}.blocks.{block}."
            index += 1
        if level < num_levels - 1:
            prefixes[f"downs.{index}."] = f"down_levels.{level}.downsampler."
            index += 1
    prefixes["mid.0."], prefixes["mid.1."] = "mid_blocks.0.", "mid_blocks.1."
    index = 0
    for position, level in enumerate(reversed(range(num_levels))):
        for block in range(layers_per_block + 1):
            prefixes[f"ups.{index}."] = f"up_levels.{position}.blocks.{block}."
            index += 1
        if level > 0:
            prefixes[f"ups.{index}."] = f"up_levels.{position}.upsampler."
            index += 1
    return prefixes


def convert_state_dict(state: Dict[str, torch.Tensor], unet_config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Rename the original network's weights to `SR3UNet2DModel`'s (schedule buffers are dropped)."""
    kind = "sr3" if unet_config["conditioning_type"] == "noise_level" else "ddpm"
    other = "ddpm" if kind == "sr3" else "sr3"
    network = {key[len("denoise_fn.") :]: value for key, value in state.items() if key.startswith("denoise_fn.")}
    if any(key.startswith(tuple(_TOP_RENAMES[other])) for key in network):
        raise CheckpointError(f"the checkpoint holds a {other!r} network but the config says which_model_G {kind!r}")
    prefixes = _block_prefixes(len(unet_config["channel_multipliers"]), unet_config["layers_per_block"])
    converted, unknown = {}, []
    for key, value in network.items():
        if key == "time_mlp.0.inv_freq":
            continue  # a constant the model recomputes
        new_key = _rename(key, kind, prefixes)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise CheckpointError(f"the config does not match the weights: unexpected tensors {_listing(unknown)}")
    return convert_legacy_attention_keys(converted)


def _rename(key: str, kind: str, prefixes: Dict[str, str]) -> Optional[str]:
    for table in (_TOP_RENAMES[kind], _FINAL_RENAMES):
        for old, new in table.items():
            if key.startswith(old):
                return new + key[len(old) :]
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old) :]
            if new == "conv_in.":
                return new + rest
            for inner_old, inner_new in _BLOCK_RENAMES:
                if rest.startswith(inner_old):
                    return new + inner_new + rest[len(inner_old) :]
            return None
    return None


def _listing(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _channels_hint(weights: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> str:
    """The JSON setting that shapes differing between the converted weights and the config's network point at: the
    network's first and last convolutions tell its input, output and base widths; other widths are the levels'."""
    (saved_out, saved_in), (built_out, built_in) = (
        weights["conv_in.weight"].shape[:2],
        expected["conv_in.weight"].shape[:2],
    )
    if saved_in != built_in:
        return f": model.unet.in_channel is {built_in}, the weights take {saved_in} channels"
    if saved_out != built_out:
        return f": model.unet.inner_channel is {built_out}, the weights' is {saved_out}"
    saved_final, built_final = weights["conv_out.conv.weight"].shape[0], expected["conv_out.conv.weight"].shape[0]
    if saved_final != built_final:
        return f": model.unet.out_channel is {built_final}, the weights give {saved_final} channels"
    return ": the levels' widths differ (model.unet.channel_multiplier)"


def _attention_hint(keys) -> str:
    """What to check when the tensors that the config and the weights disagree on are all attention layers'."""
    if not all(".attention." in key for key in keys):
        return ""
    # Attention is placed by resolution: an attn_res that names no level at this image_size places none.
    return (
        " (they place attention layers differently: check model.unet.attn_res and model.diffusion.image_size, the "
        "image size attn_res resolutions are counted from)"
    )


def _schedule_config(config: Dict[str, Any]) -> Dict[str, Any]:
    schedules = _section(config["model"], "beta_schedule", "model.beta_schedule")
    for phase in ("val", "train"):
        schedule = _section(schedules, phase, f"model.beta_schedule.{phase}", required=False)
        if schedule:
            path = f"model.beta_schedule.{phase}"
            settings = dict(
                beta_schedule=_setting(schedule, "schedule", path, str),
                num_train_timesteps=_setting(schedule, "n_timestep", path, int),
                # The original's defaults when its config omits them.
                beta_start=_setting(schedule, "linear_start", path, float, default=1e-4),
                beta_end=_setting(schedule, "linear_end", path, float, default=2e-2),
            )
            betas = make_beta_schedule(
                settings["beta_schedule"], settings["num_train_timesteps"], settings["beta_start"], settings["beta_end"]
            )
            # Betas are noise variances per step: outside (0, 1] the sampler returns NaN, but only after sampling.
            if not np.all((betas > 0) & (betas <= 1)):
                raise CheckpointError(
                    f"the config's {path} gives betas from {betas.min():g} to {betas.max():g}, outside (0, 1]: check "
                    f"{path}.linear_start and linear_end"
                )
            return settings
    raise CheckpointError("the config has no model.beta_schedule.val (or .train) noise schedule")


def _conditional(config: Dict[str, Any], unet_config: Dict[str, Any]) -> bool:
    """Whether the network is conditional (takes the upsampled low-resolution image beside the noisy one):
    model.diffusion.conditional, which the original's configs always state; taken from the network's channels where
    a config leaves it out.

    Raises:
        CheckpointError: the setting is not true or false, or does not fit model.unet.in_channel.
    """
    conditional = config["model"]["diffusion"].get("conditional")
    if conditional is not None and not isinstance(conditional, bool):
        raise CheckpointError(
            f"the config's model.diffusion.conditional must be true or false, got {json.dumps(conditional)}"
        )
    in_channels, out_channels = unet_config["in_channels"], unet_config["out_channels"]
    channels = {True: out_channels + 3, False: out_channels}
    fitting = [flag for flag, wanted in channels.items() if wanted == in_channels and conditional in (None, flag)]
    if not fitting:
        stated = "absent" if conditional is None else json.dumps(conditional)
        raise CheckpointError(
            f"the config's model.diffusion.conditional ({stated}) does not fit model.unet.in_channel {in_channels}: a "
            f"conditional network takes out_channel + 3 = {channels[True]} channels, an unconditional one "
            f"{channels[False]}"
        )
    return fitting[0]


def _upscale_factor(config: Dict[str, Any]) -> int:
    datasets = _section(config, "datasets", "datasets", required=False)
    for phase in ("val", "train"):
        dataset = _section(datasets, phase, f"datasets.{phase}", required=False)
        if dataset.get("l_resolution") and dataset.get("r_resolution"):
            low, high = dataset["l_resolution"], dataset["r_resolution"]
            # As the original's data loaders take them: int() would read 8.7 as 8 and "16" as 16, and a size of 0 or
            # below would give a factor of 0 or below, refused only later and not as the config's.
            if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in (low, high)):
                raise CheckpointError(
                    f"the config's datasets.{phase}.l_resolution and r_resolution must be whole numbers above 0, got "
                    f"{json.dumps(low)} and {json.dumps(high)}"
                )
            if high % low:
                raise CheckpointError(f"r_resolution {high} is not a multiple of l_resolution {low}")
            return high // low
    raise CheckpointError("the config has no datasets l_resolution/r_resolution to take the upscale factor from")


def convert_original_checkpoint(
    checkpoint: Union[str, os.PathLike],
    config: Union[str, os.PathLike, Dict[str, Any]],
    output_dir: Optional[Union[str, os.PathLike]] = None,
    variant: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> SR3BasePipeline:
    """Turn an original `_gen.pth` checkpoint and its JSON config into an SR3 pipeline.

    Args:
        checkpoint: path of the `I{iter}_E{epoch}_gen.pth` file, or its stem (`load_original_state_dict`).
        config: the original JSON config (path or parsed dict); `//` comments are allowed.
        output_dir: if given, the pipeline is saved there (`save_pretrained`).
        variant: the weights variant to save as (`save_pretrained`'s, e.g. "fp16"); None: the main weights.
        dtype: the precision of the returned (and saved) network; None: float32, the original's.

    Returns:
        An [`SR3Pipeline`] (conditional models) or [`SR3UnconditionalPipeline`], with a DDPM scheduler that runs
        the config's sampling (`val`) noise schedule as the original sampler does.

    Raises:
        CheckpointError: the file is not an original SR3 checkpoint, or its weights do not match the config.
    """
    config = load_original_config(config)
    state = load_original_state_dict(checkpoint)
    unet_config = unet_config_from_original(config)
    weights = convert_state_dict(state, unet_config)
    unet = SR3UNet2DModel(**unet_config)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(
            f"the config does not match the weights{_attention_hint(missing)}: missing tensors {_listing(missing)}"
        )
    wrong = [
        f"{key} {tuple(weights[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if weights[key].shape != value.shape
    ]
    if wrong:
        raise CheckpointError(
            f"the config does not match the weights{_channels_hint(weights, expected)}: shapes differ for "
            f"{_listing(wrong, 3)}"
        )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"the config does not match the weights{_attention_hint(unexpected)}: unexpected tensors "
            f"{_listing(unexpected, 3)}"
        )
    unet.load_state_dict(weights, strict=True)
    unet.eval()

    scheduler = make_scheduler("ddpm", **_schedule_config(config))
    if _conditional(config, unet_config):
        pipeline: SR3BasePipeline = SR3Pipeline(unet=unet, scheduler=scheduler, upscale_factor=_upscale_factor(config))
    else:
        pipeline = SR3UnconditionalPipeline(unet=unet, scheduler=scheduler)
    if dtype is not None and dtype != torch.float32:
        # As from_pretrained(torch_dtype=...) loads it: the noise-level embeddings stay float32 (ModelMixin.to would
        # cast them too, and warn that it does).
        torch.nn.Module.to(unet, dtype=dtype)
        for name in unet._keep_in_fp32_modules:
            if getattr(unet, name, None) is not None:
                getattr(unet, name).to(torch.float32)
    if output_dir is not None:
        pipeline.save_pretrained(output_dir, variant=variant)
    return pipeline
