"""The SR3 denoising UNet (Saharia et al. 2021), as a Diffusers model.

The network predicts the noise in a noisy image from the image (with any conditioning image concatenated
in front of it on the channel axis) and a per-sample noise level. It knows nothing about noise schedules:
`diffusers_sr3.noise` maps schedules and scheduler steps to the level this network takes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from torch import nn

from ..disk_format import FORMAT_KEY, NewerFormatError, check_format

logger = logging.get_logger(__name__)

CONDITIONING_TYPES = ("noise_level", "timestep")

# The layers a LoRA adapter can wrap, as `LoraConfig(target_modules=...)` suffixes: attention projections, the
# ResNet convs, the FiLM projections and the noise-level embedding's MLP.
LORA_TARGET_MODULES = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "resnet": ("block1.conv", "block2.conv"),
    "film": ("embedding_proj",),
    "embedding": ("linear_1", "linear_2"),
}


def require_peft(feature: str = "LoRA adapters") -> None:
    """Raise an ImportError that says how to install `peft` when it is missing: LoRA is an optional extra."""
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{feature}: the `peft` package is missing; pip install diffusers-sr3[lora]") from error


@contextlib.contextmanager
def _contiguous_adapter_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model`'s LoRA weights that are not contiguous (a model moved to `channels_last`, as
    training with `--channels_last` does) hold contiguous copies, which safetensors can write (it refuses strided
    tensors); after it, the weights the model (and its optimizer) had, unchanged."""
    strided = [
        (parameter, parameter.data)
        for name, parameter in model.named_parameters()
        if "lora_" in name and not parameter.is_contiguous()
    ]
    try:
        for parameter, data in strided:
            parameter.data = data.contiguous()
        yield
    finally:
        for parameter, data in strided:
            parameter.data = data


@contextlib.contextmanager
def _dropped_log_records(logger_: Any, text: str) -> Iterator[List[str]]:
    """Drop `logger_`'s warnings that contain `text` inside the block; yield the list of their messages.

    The logger lets warnings through inside the block (their filter runs only then), whatever its level outside.
    """
    dropped: List[str] = []

    def keep(record: Any) -> bool:
        message = record.getMessage()
        if text in message:
            dropped.append(message)
            return False
        return True

    level = logger_.level
    if not logger_.isEnabledFor(logging.WARNING):
        logger_.setLevel(logging.WARNING)
    logger_.addFilter(keep)
    try:
        yield dropped
    finally:
        logger_.removeFilter(keep)
        logger_.setLevel(level)


_UNHANDLED_KEYS = re.compile(
    r"Loading adapter weights from state_dict led to (unexpected|missing) keys[^:]*: (.*?)\.(?=\s*(?:Loading|$))"
)


def _keys_of_adapter(message: str, adapter: str) -> List[str]:
    """The parts of Diffusers' warning of unhandled keys (`message`) about the adapter `adapter` just loaded: every
    unexpected key, and the missing keys of that adapter alone. Diffusers picks the missing keys by the adapter's name
    as a substring of the key, so a short name ("a", "up") also picks the keys of the adapters loaded before it."""
    found = _UNHANDLED_KEYS.findall(message)
    if not found:  # a wording this code does not know: the whole warning counts as a misfit
        return [message]
    parts = []
    for kind, listed in found:
        keys = listed.split(", ")
        if kind == "missing":
            keys = [key for key in keys if f".{adapter}." in key]
        if keys:
            parts.append(f"{kind} keys: {', '.join(keys)}.")
    return parts


def _raised_in(error: BaseException, function: str) -> bool:
    """Whether `error` was raised in a function named `function` (the innermost frame of its traceback)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_name == function


def _weights_named(source: Any, weight_name: Optional[str]) -> str:
    """How an error names the weights `load_lora_adapter` was given."""
    if isinstance(source, dict):
        return "the state dict"
    if weight_name:
        return f"{source} ({weight_name})"
    return f"{source} (the .safetensors file Diffusers picked without a weight_name)"


def has_lora_layers(model: nn.Module) -> bool:
    """Whether PEFT adapter layers are injected in `model` (without importing `peft` when none can be)."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


# Attention weights as saved before attention went through Diffusers' `Attention` (diffusers-sr3 <= 0.1.0, and
# every folder written by it): `<path>.attention.norm` (GroupNorm), `.qkv` (a bias-free 1x1 conv whose output
# channels are q, k and v as consecutive thirds) and `.proj_out` (1x1 conv).
_LEGACY_ATTENTION_KEY = re.compile(
    r"^(?P<path>(?:.*\.)?attention)\.(?P<name>norm|qkv|proj_out)\.(?P<kind>weight|bias)$"
)


class _OwnClassAttribute:
    """A class attribute that reads as `value` on its own class (and its instances) and as None on a subclass."""

    def __init__(self, value: Any):
        self.value = value

    def __set_name__(self, owner: type, name: str) -> None:
        self.owner = owner

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        return self.value if (owner if owner is not None else type(instance)) is self.owner else None


@dataclass
class SR3UNet2DOutput(BaseOutput):
    """Output of [`SR3UNet2DModel`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The network's prediction (the noise, for epsilon-prediction models).
    """

    sample: torch.Tensor


def sinusoidal_embedding(values: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal encoding of one scalar per sample, as in the original SR3 and DDPM code.

    Both original network kinds use the same frequencies, `10000 ** (-2i / dim)` for `i < dim // 2`, with
    the sines first and the cosines after.

    Args:
        values: `(batch,)` noise levels or timesteps.
        dim: embedding width (even).
        scale: multiplies `values` before encoding. The original feeds levels in [0, 1] unscaled, so its
            highest frequency barely separates them; WaveGrad scales by 5000.

    Returns:
        `(batch, dim)` float32 embedding.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=values.device) / half
    frequencies = torch.exp(-math.log(10000.0) * exponent)
    angles = (values.float() * scale)[:, None] * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal encoding followed by Linear -> Swish -> Linear (the original's `noise_level_mlp`)."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.channels = channels
        self.scale = scale
        self.linear_1 = nn.Linear(channels, channels * 4)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(channels * 4, channels)

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        encoding = sinusoidal_embedding(level, self.channels, self.scale)
        encoding = encoding.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(encoding)))


class ConvBlock(nn.Module):
    """GroupNorm -> Swish -> Dropout -> Conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, in_channels)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(self.dropout(self.act(self.norm(hidden_states))))


class ResnetBlock(nn.Module):
    """Two conv blocks with the noise-level embedding injected between them, plus a skip connection.

    `film_affine=False` adds a projection of the embedding (the original's FiLM "without affine");
    `film_affine=True` projects to a scale and shift and applies `(1 + scale) * h + shift`.
    `embedding_act` puts a Swish in front of the projection, as the original DDPM variant does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_channels: int,
        norm_groups: int,
        dropout: float,
        film_affine: bool,
        embedding_act: bool,
    ):
        super().__init__()
        self.film_affine = film_affine
        self.block1 = ConvBlock(in_channels, out_channels, norm_groups)
        self.embedding_act = nn.SiLU() if embedding_act else nn.Identity()
        self.embedding_proj = nn.Linear(embedding_channels, out_channels * (2 if film_affine else 1))
        self.block2 = ConvBlock(out_channels, out_channels, norm_groups, dropout)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.block1(hidden_states)
        film = self.embedding_proj(self.embedding_act(embedding))[:, :, None, None]
        if self.film_affine:
            scale, shift = film.chunk(2, dim=1)
            h = h * (1 + scale) + shift
        else:
            h = h + film
        h = self.block2(h)
        return h + self.skip(hidden_states)


def self_attention(channels: int, norm_groups: int, num_heads: int = 1) -> Attention:
    """The SR3 self-attention as Diffusers' `Attention`: GroupNorm, q/k/v projections, output projection, residual.

    The same computation as the original's `SelfAttention` (1x1 convs on the normalised feature map, softmax
    scaled by `1 / sqrt(head_dim)`), so any Diffusers attention processor runs it (`AttnProcessor2_0` by default).
    """
    if channels % num_heads:
        raise ValueError(f"attention_heads={num_heads} does not divide the {channels} channels of a level")
    return Attention(
        channels,
        heads=num_heads,
        dim_head=channels // num_heads,
        norm_num_groups=norm_groups,
        eps=1e-5,
        bias=False,
        out_bias=True,
        residual_connection=True,
        upcast_softmax=True,
    )


def convert_legacy_attention_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename, in place, attention weights saved by diffusers-sr3 <= 0.1.0 to Diffusers' `Attention` names.

    `attention.norm.*` -> `attention.group_norm.*`; `attention.qkv.weight` `(3C, C, 1, 1)` -> `to_q`, `to_k`,
    `to_v` `(C, C)` (its consecutive channel thirds); `attention.proj_out.*` -> `attention.to_out.0.*` (the 1x1
    conv's weight as a `(C, C)` matrix). Other keys, and already converted ones, are left alone.

    Returns:
        The same dict, for chaining.
    """
    for key in [key for key in state_dict if _LEGACY_ATTENTION_KEY.match(key)]:
        match = _LEGACY_ATTENTION_KEY.match(key)
        path, name, kind = match.group("path"), match.group("name"), match.group("kind")
        value = state_dict.pop(key)
        if name == "norm":
            state_dict[f"{path}.group_norm.{kind}"] = value
        elif name == "proj_out":
            state_dict[f"{path}.to_out.0.{kind}"] = value.reshape(value.shape[0], -1) if kind == "weight" else value
        else:
            thirds = value.reshape(value.shape[0], -1).chunk(3, dim=0) if kind == "weight" else value.chunk(3)
            for projection, part in zip(("to_q", "to_k", "to_v"), thirds):
                state_dict[f"{path}.{projection}.{kind}"] = part.contiguous()
    return state_dict


_ATTENTION_PARAMETER = re.compile(
    r"^(?P<path>(?:.*\.)?attention)\.(?:group_norm|to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)$"
)


def legacy_parameter_names(model: nn.Module) -> List[str]:
    """The names of `model.parameters()` in the order diffusers-sr3 0.1.0 registered them.

    Per-parameter lists saved by training checkpoints of 0.1.0 (EMA shadow weights, optimizer moments) follow this
    order; `convert_legacy_parameter_list` turns such a list into the current order.
    """
    names = []
    for name, _ in model.named_parameters():
        match = _ATTENTION_PARAMETER.match(name)
        if match is None:
            names.append(name)
        elif name.endswith(".group_norm.weight"):  # the first parameter of each attention layer
            path = match.group("path")
            names += [f"{path}.{rest}" for rest in ("norm.weight", "norm.bias", "qkv.weight", "proj_out.weight")]
            names.append(f"{path}.proj_out.bias")
    return names


def convert_legacy_parameter_list(model: nn.Module, values: Sequence[Any]) -> List[Any]:
    """Per-parameter values in 0.1.0's order and shapes (EMA weights, Adam moments) -> the model's current ones.

    Tensors shaped like their parameter are converted as weights are (the `qkv` entry splits into q, k, v);
    anything else (a step count, None) is repeated for each parameter it now stands for.
    """
    legacy = legacy_parameter_names(model)
    if len(values) != len(legacy):
        raise ValueError(f"{len(values)} values for the {len(legacy)} parameters of a diffusers-sr3 0.1.0 model")
    converted: Dict[str, Any] = {}
    for name, value in zip(legacy, values):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            converted.update(convert_legacy_attention_keys({name: value}))
            continue
        match = _LEGACY_ATTENTION_KEY.match(name)
        if match is None:
            converted[name] = value
            continue
        path, kind = match.group("path"), match.group("kind")
        targets = {"norm": ["group_norm"], "qkv": ["to_q", "to_k", "to_v"], "proj_out": ["to_out.0"]}
        for target in targets[match.group("name")]:
            # A copy each: optimizers update step counts in place, which must not be shared between parameters.
            converted[f"{path}.{target}.{kind}"] = value.clone() if isinstance(value, torch.Tensor) else value
    return [converted[name] for name, _ in model.named_parameters()]


def convert_legacy_optimizer_state(model: nn.Module, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A torch optimizer state dict saved for a 0.1.0 model (one parameter group), for the current model.

    Returned unchanged when it already fits. Use as an optimizer `load_state_dict` pre-hook, so that training
    checkpoints of 0.1.0 resume: `optimizer.register_load_state_dict_pre_hook(lambda o, s: convert...(model, s))`.
    """
    legacy, current = legacy_parameter_names(model), [name for name, _ in model.named_parameters()]
    groups = state_dict.get("param_groups", [])
    if len(legacy) == len(current) or len(groups) != 1 or len(groups[0]["params"]) != len(legacy):
        return state_dict
    states = [state_dict["state"].get(index) or {} for index in groups[0]["params"]]
    new_states: List[Dict[str, Any]] = [{} for _ in current]
    for field in dict.fromkeys(field for state in states for field in state):
        values = convert_legacy_parameter_list(model, [state.get(field) for state in states])
        for new_state, value in zip(new_states, values):
            if value is not None:
                # Split attention projections get their own tensors: an optimizer updates its state in place.
                new_state[field] = value.clone() if isinstance(value, torch.Tensor) else value
    return {
        "state": {index: state for index, state in enumerate(new_states) if state},
        "param_groups": [{**groups[0], "params": list(range(len(current)))}],
    }


def _legacy_attention_pre_hook(module, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook: old attention key names load into the current model (accelerate resumes too)."""
    legacy = {key: state_dict.pop(key) for key in list(state_dict) if key.startswith(prefix)}
    if legacy:
        state_dict.update(convert_legacy_attention_keys(legacy))


@torch.no_grad()
def _sync_fused_projections(module: nn.Module, *args: Any) -> None:
    """Copy each fused attention layer's `to_qkv` into its to_q/to_k/to_v (what the fused processor trains is
    `to_qkv` only). Also a `state_dict` pre-hook: saves and checkpoints of a fused model keep its weights."""
    for attention in module.modules():
        if isinstance(attention, Attention) and getattr(attention, "fused_projections", False):
            fused = getattr(attention, "to_qkv", None)
            if fused is None:
                continue
            projections = (attention.to_q, attention.to_k, attention.to_v)
            for projection, weight in zip(projections, fused.weight.chunk(3, dim=0)):
                projection.weight.copy_(weight)
            if fused.bias is not None:
                for projection, bias in zip(projections, fused.bias.chunk(3)):
                    projection.bias.copy_(bias)


@torch.no_grad()
def _rebuild_fused_projections(module: nn.Module, incompatible_keys: Any) -> None:
    """`load_state_dict` post-hook: each fused attention layer's `to_qkv` is rebuilt from the to_q/to_k/to_v just
    loaded, so that weights loaded into a fused model (an unfused model's state dict has no `to_qkv`) are what it
    runs and what `_sync_fused_projections` later keeps; its `to_qkv` keys then count as loaded."""
    rebuilt = set()
    for name, attention in module.named_modules():
        fused = getattr(attention, "to_qkv", None)
        if not isinstance(attention, Attention) or not getattr(attention, "fused_projections", False) or fused is None:
            continue
        projections = (attention.to_q, attention.to_k, attention.to_v)
        fused.weight.copy_(torch.cat([projection.weight for projection in projections]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([projection.bias for projection in projections]))
        rebuilt.update(f"{name}.to_qkv.{parameter}" for parameter in ("weight", "bias"))
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not any(key == name or key.endswith("." + name) for name in rebuilt)]


class ResnetAttentionBlock(nn.Module):
    """A ResNet block, optionally followed by self-attention (the original's `ResnetBlocWithAttn`)."""

    def __init__(
        self, in_channels: int, out_channels: int, with_attention: bool, attention_heads: int, **resnet_kwargs
    ):
        super().__init__()
        self.resnet = ResnetBlock(in_channels, out_channels, **resnet_kwargs)
        norm_groups = resnet_kwargs["norm_groups"]
        self.attention = self_attention(out_channels, norm_groups, attention_heads) if with_attention else None
        self.gradient_checkpointing = False

    def _forward(self, hidden_states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnet(hidden_states, embedding)
        if self.attention is not None:
            hidden_states = self.attention(hidden_states)
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(self._forward, hidden_states, embedding)
        return self._forward(hidden_states, embedding)


class Downsample(nn.Module):
    """Conv3x3 with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then Conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """`layers_per_block` blocks at one resolution, then (except at the lowest level) a downsampler."""

    def __init__(self, blocks: Sequence[nn.Module], downsampler: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsampler = downsampler


class UpLevel(nn.Module):
    """`layers_per_block + 1` blocks at one resolution, then (except at the top level) an upsampler."""

    def __init__(self, blocks: Sequence[nn.Module], upsampler: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsampler = upsampler


# Whether a tensor is one of `torch.func`'s wrappers (vmap's batched tensors, grad's); older torch cannot say.
_is_functorch_wrapped_tensor = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda tensor: False
)

# True inside `levels_checked`: the caller checked the levels it passes (a pipeline's sampling loop).
_LEVELS_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("sr3_levels_checked", default=False)


@contextlib.contextmanager
def levels_checked() -> Iterator[None]:
    """Inside the block, the signal levels that `SR3UNet2DModel` calls take on an accelerator are not range-checked
    again: the caller checked them once (`SR3UNet2DModel.check_signal_levels`), and reading them at every call would
    wait for the device at every step. Levels on the CPU are checked all the same (reading them costs nothing)."""
    token = _LEVELS_CHECKED.set(True)
    try:
        yield
    finally:
        _LEVELS_CHECKED.reset(token)


def _is_integer(value: Any) -> bool:
    """An int (numpy's too, as configs read back may hold), not a bool or a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Bytes: PyTorch's CPU allocator aligns every allocation to this; SIMD kernels assume it.
_ALIGNMENT = 64
# The `from_pretrained` options that say where the config comes from (`ConfigMixin.load_config` takes them).
_CONFIG_SOURCE_OPTIONS = (
    "subfolder",
    "revision",
    "cache_dir",
    "token",
    "local_files_only",
    "force_download",
    "proxies",
)


def _hub_pipeline_index(
    repo_id: str, options: Dict[str, Any], path: str = "model_index.json"
) -> Optional[Dict[str, Any]]:
    """The model_index.json at `path` of Hub repo `repo_id` (`options`: `from_pretrained`'s Hub options), read alone;
    None where it has none or it cannot be fetched."""
    from huggingface_hub import hf_hub_download

    download = {key: value for key, value in options.items() if key not in ("subfolder", "proxies")}
    try:
        return _local_pipeline_index(hf_hub_download(repo_id, path, **download))
    except Exception:  # whatever the reason (absent, offline, unreachable), Diffusers' own error stands
        return None


def _model_folders(
    class_name: str, index: Dict[str, Any], read: Callable[[str], Optional[Dict[str, Any]]], prefix: str = ""
) -> List[str]:
    """The folders (`/`-separated, below `prefix`) of the models of class `class_name` that the pipeline of
    model_index.json `index` holds, and those of the pipelines it holds (`read`: their model_index.json, by path)."""
    folders = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or not isinstance(entry[-1], str):
            continue
        if entry[-1] == class_name:
            folders.append(f"{prefix}{name}")
        elif entry[-1].endswith("Pipeline") and name.isidentifier():
            # A component is named by an argument of its pipeline: "." or "" would name this index again, forever.
            inner = read(f"{prefix}{name}/model_index.json")
            folders += _model_folders(class_name, inner, read, f"{prefix}{name}/") if inner is not None else []
    return folders


def _local_pipeline_index(path: str) -> Optional[Dict[str, Any]]:
    """The model_index.json at `path`; None where it is absent or not an index (not JSON, not an object)."""
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


# Far above any model that fits a GPU (SR3's largest is under 1 billion): a config.json asking for more is damaged or
# hostile, and is refused before building rather than failing once memory runs out (or after minutes of building).
MAX_PARAMETERS = 20_000_000_000

# ResNet blocks and resamplers. Building one takes ~4.4 ms at the smallest width (measured on one CPU thread), which
# the parameter cap does not bound: millions of 2-channel blocks are few parameters but hours of building. The largest
# preset has 49, the original's configs and Diffusers' UNets a few dozen; this limit builds in seconds.
MAX_BLOCKS = 1000


def _block_count(num_levels: int, layers_per_block: int) -> int:
    """The ResNet blocks (down, middle, up) and resamplers `SR3UNet2DModel.__init__` builds."""
    return num_levels * layers_per_block + 2 + num_levels * (layers_per_block + 1) + 2 * (num_levels - 1)


def _parameter_count(
    in_channels: int,
    out_channels: int,
    width: int,
    channel_multipliers: Sequence[int],
    layers_per_block: int,
    level_has_attention: Sequence[bool],
    mid_attention: bool,
    film_affine: bool,
    condition_noise_embedding: bool,
    folded: int,
) -> int:
    """The number of parameters `SR3UNet2DModel.__init__` builds for these settings, counted in closed form (the
    same structure, without building a module), in time independent of `layers_per_block`."""

    def block(inputs: int, outputs: int, attention: bool) -> int:
        count = 2 * inputs + 9 * inputs * outputs + outputs  # block1: GroupNorm, Conv3x3
        count += (width + 1) * outputs * (2 if film_affine else 1)  # embedding_proj
        count += 2 * outputs + 9 * outputs * outputs + outputs  # block2
        count += (inputs + 1) * outputs if inputs != outputs else 0  # 1x1 skip conv
        return count + (4 * outputs * outputs + 3 * outputs if attention else 0)  # GroupNorm, q, k, v, out

    def resample(channels: int) -> int:
        return 9 * channels * channels + channels

    embedding = 8 * width * width + 5 * width
    total = embedding * (2 if condition_noise_embedding else 1) + 9 * in_channels * folded * width + width
    num_levels = len(channel_multipliers)
    skips = [[width, 1]]  # the skip connections' widths as [channels, count] runs, in the order they are kept
    channels = width
    for level, multiplier in enumerate(channel_multipliers):
        outputs = width * multiplier
        if layers_per_block:
            attention = level_has_attention[level]
            total += block(channels, outputs, attention) + (layers_per_block - 1) * block(outputs, outputs, attention)
            channels = outputs
            skips.append([channels, layers_per_block])
        if level < num_levels - 1:
            total += resample(channels)
            skips.append([channels, 1])
    total += block(channels, channels, mid_attention) + block(channels, channels, False)
    for level in reversed(range(num_levels)):
        outputs, attention = width * channel_multipliers[level], level_has_attention[level]
        remaining = layers_per_block + 1
        while remaining:  # each block consumes the last skip connection kept
            run = skips[-1]
            taken = min(run[1], remaining)
            total += block(channels + run[0], outputs, attention)
            channels = outputs
            total += (taken - 1) * block(outputs + run[0], outputs, attention)
            remaining -= taken
            run[1] -= taken
            if not run[1]:
                skips.pop()
        if level > 0:
            total += resample(channels)
    return total + 2 * channels + 9 * channels * out_channels * folded + out_channels * folded  # conv_out


class SR3UNet2DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""The SR3 UNet: a DDPM-style UNet conditioned on a continuous noise level (or an integer timestep).

    For super-resolution the input is the bicubic-upsampled low-resolution image concatenated in front of the
    noisy image (`in_channels = 6`); for unconditional generation it is the noisy image alone (`in_channels=3`).

    Args:
        in_channels (`int`, defaults to 6): Channels of the input (condition + noisy image).
        out_channels (`int`, defaults to 3): Channels of the prediction.
        block_out_channels (`int`, defaults to 64): Base width (the original's `inner_channel`); also the
            width of the noise-level embedding.
        channel_multipliers (`Tuple[int]`, defaults to `(1, 2, 4, 8, 8)`): Width multiplier of each
            resolution level; the input is downsampled `len(channel_multipliers) - 1` times, so height and
            width must be divisible by `2 ** (len(channel_multipliers) - 1)`.
        layers_per_block (`int`, defaults to 2): ResNet blocks per level on the way down (the original's
            `res_blocks`); the way up has one more per level. 0 is valid: no blocks on the way down (its levels
            only downsample), one per level on the way up.
        attention_resolutions (`Tuple[int]`, defaults to `(16,)`): Feature-map sizes, for an input of
            `sample_size`, at which self-attention follows each ResNet block (the original's `attn_res`).
            The choice is fixed per level, so other input sizes use the same levels.
        mid_attention (`bool`, defaults to True): Self-attention in the middle block, as the original always has.
            Its cost grows with the fourth power of the input size: models that run at high resolution with few
            levels (e.g. a 256->1024 stage) may turn it off.
        sample_size (`int`, defaults to 128): The training resolution (one integer, for height and width); it places
            `attention_resolutions`, is the default output size of unconditional sampling, and sets the default
            overlap of tiled upscaling's tiles (half of it; the tiles' size comes from the memory budget,
            `max_tile_pixels`, not from it).
        norm_groups (`int`, defaults to 32): Groups of every GroupNorm.
        dropout (`float`, defaults to 0.0): Dropout in the second conv block of every ResNet block.
        attention_heads (`int`, defaults to 1): Heads of every self-attention layer.
        conditioning_type (`str`, defaults to `"noise_level"`): `"noise_level"` for the SR3 network (a
            continuous noise level `sqrt(alpha_bar)` in [0, 1]); `"timestep"` for the original's DDPM network
            (an integer timestep, with a Swish in front of each block's embedding projection).
        noise_level_embedding_scale (`float`, defaults to 1.0): Multiplies the level (or timestep) before the
            sinusoidal encoding (finite and non-zero). 1.0 reproduces the original networks.
        film_affine (`bool`, defaults to False): Inject the embedding as scale and shift (`(1 + s) * h + b`)
            instead of the original's additive FiLM without affine.
        condition_noise_embedding (`bool`, defaults to False): Noise-conditioning augmentation (Ho et al.,
            "Cascaded Diffusion Models"): the model also takes the noise level that was added to its condition
            (`condition_noise_level`, 0 = clean) through a second embedding of the same kind, summed with the first.
        pixel_unshuffle_factor (`int`, defaults to 1): Run the UNet on a grid this many times coarser than the image:
            `pixel_unshuffle` folds each `f x f` patch of the input into channels in front of the first conv, and
            `pixel_shuffle` unfolds the prediction after the last one. An x4 model with factor 4 runs at the
            low-resolution grid, about 5x faster per evaluation at the same width. `sample_size` and
            `attention_resolutions` stay in image pixels and feature-map sizes (the first level is
            `sample_size // f`). 1 is the original architecture.
        upscale_factor (`int`, optional), residual (`bool`, optional), residual_scale (`float`, optional): What a
            super-resolution network's output means, recorded by [`SR3Pipeline`] when it saves it: the factor it was
            trained for and whether it predicts the residual HR - bicubic multiplied by `residual_scale` rather than
            the image (as a VAE's `scaling_factor` says how to read its latents). A pipeline built from the UNet
            alone, `SR3Pipeline(unet=..., scheduler=...)` or `SR3Pipeline(**pipe.components)` of a loaded one,
            reads them; the network itself never does. None: not recorded (UNets saved before these keys,
            unconditional ones, a UNet whose pipeline has not saved it).

    Config names and Diffusers' [`UNet2DModel`]: this model keeps the names of its first release, because they are
    written into the `config.json` of every saved model (a public contract: renaming them would break loading of
    existing folders and Hub repos for no change in behaviour). The correspondence:

    | SR3UNet2DModel                            | UNet2DModel                                                      |
    |-------------------------------------------|------------------------------------------------------------------|
    | `block_out_channels` (int, base width) and | `block_out_channels` (tuple, one width per level):               |
    | `channel_multipliers` (tuple)             | `tuple(block_out_channels * m for m in channel_multipliers)`     |
    | `norm_groups`                             | `norm_num_groups`                                                |
    | `layers_per_block`                        | `layers_per_block` (same meaning: the way up has one more)       |
    | `attention_resolutions` (feature sizes)   | `down_block_types` / `up_block_types` (`AttnDownBlock2D` levels) |
    | `attention_heads` (heads per layer)       | `attention_head_dim` (channels per head)                         |
    | `conditioning_type="timestep"`            | `time_embedding_type="positional"`, `flip_sin_to_cos=False`      |
    | `noise_level_embedding_scale`             | none (`UNet2DModel` embeds integer timesteps)                    |
    | `dropout`, `sample_size`, `in_channels`, `out_channels` | same names                                         |

    Attention runs through Diffusers' [`Attention`] and its processors: `set_attn_processor`, `attn_processors`,
    `set_default_attn_processor`, `fuse_qkv_projections` / `unfuse_qkv_projections` work as on Diffusers' UNets.
    Weights saved before that (`attention.norm`, `attention.qkv`, `attention.proj_out`) are converted on load, by
    `from_pretrained` and by `load_state_dict` ([`convert_legacy_attention_keys`]).

    LoRA adapters (Diffusers' [`PeftAdapterMixin`], with `pip install diffusers-sr3[lora]`): `add_adapter(LoraConfig(
    target_modules=[...]))` with names from `LORA_TARGET_MODULES`, `set_adapters`, `disable_adapters`,
    `save_lora_adapter` / `load_lora_adapter` (safetensors, keys without a prefix), `fuse_lora` / `unfuse_lora`,
    `unload_lora`. `save_pretrained` refuses a model with adapter layers in it (its weights would be saved under
    PEFT's names, which no loader reads): fuse them and `unload_lora()` first, or save the adapter alone.
    """

    _supports_gradient_checkpointing = True
    # The level embedding must resolve levels that differ by ~1e-4 (late sampling steps): keep it in float32.
    _keep_in_fp32_modules = ["noise_level_embedding", "condition_noise_level_embedding"]
    # Layerwise casting (`enable_layerwise_casting`) stores weights in a low precision dtype between uses; the
    # level embeddings and every GroupNorm (`norm`, `group_norm`) stay in their dtype.
    _skip_layerwise_casting_patterns = ["noise_level_embedding", "norm"]
    # `device_map` placement never splits one of these across devices (a block's skip, FiLM and attention share a
    # device); the forward moves skip connections to the device of the block that consumes them.
    _no_split_modules = ["ResnetAttentionBlock", "ConvBlock", "Downsample", "Upsample", "NoiseLevelEmbedding"]
    _repeated_blocks = ["ResnetAttentionBlock"]
    # `fuse_qkv_projections` adds a fused copy of q/k/v (`to_qkv`); a model saved while fused loads without it (its
    # to_q/to_k/to_v are synced from `to_qkv` whenever a state dict is taken, so nothing trained while fused is lost).
    _keys_to_ignore_on_load_unexpected = [r"\.to_qkv\."]
    # Diffusers' `register_for_auto_class`: every saved config gets `"auto_map": {"AutoModel":
    # "unet_sr3.SR3UNet2DModel"}` (this module's name), and `save_config` writes the `unet_sr3.py` re-export it names
    # beside it, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads a UNet saved alone or in a
    # pipeline; loading strips the key (`extract_init_dict`). Not inherited: Diffusers would name a subclass's own
    # module (`__main__.MyUNet`), which has no re-export; a subclass may still `register_for_auto_class` itself.
    _auto_class = _OwnClassAttribute("AutoModel")

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """Diffusers' `register_for_auto_class`: saved configs of `cls` get an `auto_map` entry for `auto_class`.
        Registered on `SR3UNet2DModel` itself, subclasses still save none (Diffusers' plain class attribute would be
        inherited, naming a subclass's module that has no re-export); a subclass registers itself alone.

        Args:
            auto_class: the auto class; Diffusers takes only `"AutoModel"`.
        """
        super().register_for_auto_class(auto_class)  # Diffusers' checks; it sets `cls._auto_class` plainly
        if cls is SR3UNet2DModel:
            attribute = _OwnClassAttribute(auto_class)
            attribute.__set_name__(cls, "_auto_class")
            cls._auto_class = attribute

    @register_to_config
    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 3,
        block_out_channels: int = 64,
        channel_multipliers: Tuple[int, ...] = (1, 2, 4, 8, 8),
        layers_per_block: int = 2,
        attention_resolutions: Tuple[int, ...] = (16,),
        mid_attention: bool = True,
        sample_size: int = 128,
        norm_groups: int = 32,
        dropout: float = 0.0,
        attention_heads: int = 1,
        conditioning_type: str = "noise_level",
        noise_level_embedding_scale: float = 1.0,
        film_affine: bool = False,
        condition_noise_embedding: bool = False,
        pixel_unshuffle_factor: int = 1,
        upscale_factor: Optional[int] = None,
        residual: Optional[bool] = None,
        residual_scale: Optional[float] = None,
    ):
        super().__init__()
        integers = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            sample_size=sample_size,
            norm_groups=norm_groups,
            attention_heads=attention_heads,
            pixel_unshuffle_factor=pixel_unshuffle_factor,
            upscale_factor=1 if upscale_factor is None else upscale_factor,
        )
        for name, value in integers.items():
            # Checked before use: a float width or a tuple size otherwise fails deep in torch, far from its key.
            if not _is_integer(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        sequences = dict(channel_multipliers=channel_multipliers, attention_resolutions=attention_resolutions)
        for name, value in sequences.items():
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(map(_is_integer, value)):
                raise ValueError(f"{name} must be a list of integers, got {value!r}")
        if upscale_factor is not None and upscale_factor < 1:
            raise ValueError(f"upscale_factor must be a positive integer, got {upscale_factor}")
        if layers_per_block < 0:
            raise ValueError(f"layers_per_block must be 0 or more, got {layers_per_block}")
        blocks = _block_count(len(channel_multipliers), layers_per_block)
        if blocks > MAX_BLOCKS:  # before anything that takes time per level
            raise ValueError(
                f"layers_per_block={layers_per_block} and {len(channel_multipliers)} channel_multipliers make "
                f"{blocks} blocks, over the {MAX_BLOCKS} any SR3 model may have: a damaged or wrong config"
            )
        scale = noise_level_embedding_scale
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale) or scale == 0:
            # 0 encodes every level alike (the network ignores it); inf/NaN make every output non-finite.
            raise ValueError(
                f"noise_level_embedding_scale must be a finite non-zero number, got {noise_level_embedding_scale}"
            )
        if residual_scale is not None and not residual_scale > 0:
            raise ValueError(f"residual_scale must be positive, got {residual_scale}")
        if pixel_unshuffle_factor < 1:
            raise ValueError(f"pixel_unshuffle_factor must be a positive integer, got {pixel_unshuffle_factor}")
        if conditioning_type not in CONDITIONING_TYPES:
            raise ValueError(f"conditioning_type must be one of {CONDITIONING_TYPES}, got {conditioning_type!r}")
        sizes = ("in_channels", "out_channels", "block_out_channels", "sample_size", "norm_groups", "attention_heads")
        for name in sizes:
            if integers[name] < 1:
                raise ValueError(f"{name} must be a positive integer, got {integers[name]}")
        if not channel_multipliers or min(channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be one or more positive integers, got {channel_multipliers}")
        if block_out_channels % 2:
            raise ValueError(
                f"block_out_channels must be even (the level embedding is a sin/cos pair per channel pair), got "
                f"{block_out_channels}"
            )
        for multiplier in (1, *channel_multipliers):  # 1: the input convolution's width, normalized too
            if (block_out_channels * multiplier) % norm_groups:
                raise ValueError(
                    f"norm_groups={norm_groups} does not divide the width {block_out_channels * multiplier} "
                    f"(block_out_channels={block_out_channels} x multiplier {multiplier})"
                )
        num_levels = len(channel_multipliers)
        if sample_size % (pixel_unshuffle_factor * 2 ** (num_levels - 1)):
            raise ValueError(
                f"sample_size={sample_size} is not divisible by pixel_unshuffle_factor x 2**{num_levels - 1}"
            )
        folded = pixel_unshuffle_factor**2

        width = block_out_channels
        block_kwargs = dict(
            embedding_channels=width,
            norm_groups=norm_groups,
            dropout=dropout,
            film_affine=film_affine,
            embedding_act=conditioning_type == "timestep",
            attention_heads=attention_heads,
        )
        grid_size = sample_size // pixel_unshuffle_factor
        level_has_attention = [grid_size // 2**level in attention_resolutions for level in range(num_levels)]
        level_sizes = [grid_size // 2**level for level in range(num_levels)]
        unused = sorted(set(attention_resolutions) - set(level_sizes))
        if unused:
            logger.warning(
                f"attention_resolutions {unused} match no level (at sample_size {sample_size} the levels are "
                f"{level_sizes}): no attention there"
            )

        parameters = _parameter_count(
            in_channels,
            out_channels,
            width,
            channel_multipliers,
            layers_per_block,
            level_has_attention,
            mid_attention,
            film_affine,
            condition_noise_embedding,
            folded,
        )
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"block_out_channels={block_out_channels}, channel_multipliers={list(channel_multipliers)} and "
                f"layers_per_block={layers_per_block} make a model of {parameters:.3g} parameters, over the "
                f"{MAX_PARAMETERS // 10**9} billion any SR3 model may have: a damaged or wrong config"
            )

        # Stage 1: embedding and input conv.
        self.noise_level_embedding = NoiseLevelEmbedding(width, noise_level_embedding_scale)
        self.condition_noise_level_embedding = (
            NoiseLevelEmbedding(width, noise_level_embedding_scale) if condition_noise_embedding else None
        )
        self.conv_in = nn.Conv2d(in_channels * folded, width, 3, padding=1)

        # Stage 2: the way down. Every block's and downsampler's output is kept for the skip connections.
        skip_channels = [width]
        channels = width
        down_levels = []
        for level, multiplier in enumerate(channel_multipliers):
            blocks = []
            for _ in range(layers_per_block):
                blocks.append(
                    ResnetAttentionBlock(channels, width * multiplier, level_has_attention[level], **block_kwargs)
                )
                channels = width * multiplier
                skip_channels.append(channels)
            downsampler = None
            if level < num_levels - 1:
                downsampler = Downsample(channels)
                skip_channels.append(channels)
            down_levels.append(DownLevel(blocks, downsampler))
        self.down_levels = nn.ModuleList(down_levels)

        # Stage 3: the middle (attention in the first block, unless turned off).
        self.mid_blocks = nn.ModuleList(
            [
                ResnetAttentionBlock(channels, channels, mid_attention, **block_kwargs),
                ResnetAttentionBlock(channels, channels, False, **block_kwargs),
            ]
        )

        # Stage 4: the way up, each block consuming one skip connection.
        up_levels = []
        for level in reversed(range(num_levels)):
            multiplier = channel_multipliers[level]
            blocks = []
            for _ in range(layers_per_block + 1):
                blocks.append(
                    ResnetAttentionBlock(
                        channels + skip_channels.pop(), width * multiplier, level_has_attention[level], **block_kwargs
                    )
                )
                channels = width * multiplier
            up_levels.append(UpLevel(blocks, Upsample(channels) if level > 0 else None))
        self.up_levels = nn.ModuleList(up_levels)

        # Stage 5: output.
        self.conv_out = ConvBlock(channels, out_channels * folded, norm_groups)

        # Weights saved before attention went through Diffusers' `Attention` load through `load_state_dict` too.
        self.register_load_state_dict_pre_hook(_legacy_attention_pre_hook)
        self.register_state_dict_pre_hook(_sync_fused_projections)
        self.register_load_state_dict_post_hook(_rebuild_fused_projections)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """Diffusers' `ModelMixin.from_pretrained`, with every weight in memory of its own.

        Loaded weights can be views into the file's buffer at arbitrary byte offsets, and some CPU kernels round
        differently on unaligned memory: a reloaded model then differed from the one saved in the last bit of its
        outputs (seen on an AMD EPYC). Copying the unaligned ones (a few ms) makes save -> load bit-exact.
        """
        # Imported here: the pipelines import this module.
        from ..pipelines.base import folder_loading, unloadable_reason

        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        folder = os.fspath(source) if source is not None else ""
        if folder and kwargs.get("subfolder"):  # joined only when given: a refusal names the folder, no trailing `/`
            folder = os.path.join(folder, kwargs["subfolder"])
        # Writes nothing (see `SR3BasePipeline.from_pretrained`): an interrupted save is only named. A save into a
        # local folder waits for the load to end, and one moving into it now ends first (`folder_loading`).
        local = os.path.isdir(folder)
        with folder_loading(folder, "config.json") if local else contextlib.nullcontext():
            if local and not os.path.isfile(os.path.join(folder, "config.json")):

                def read(path: str) -> Optional[Dict[str, Any]]:
                    return _local_pipeline_index(os.path.join(folder, *path.split("/")))

                index = None if kwargs.get("subfolder") else read("model_index.json")
                if index is not None:
                    raise cls._whole_pipeline_error(folder, index, read)
                reason = unloadable_reason(folder, "config.json")
                if reason:
                    raise FileNotFoundError(f"{folder} is not a UNet folder: it has no config.json{reason}")
            try:
                if source is not None and not local:
                    # Diffusers downloads a Hub repo's weights before it builds the model from the config, where
                    # `extract_init_dict` checks the format: the config alone is read first.
                    options = {key: kwargs[key] for key in _CONFIG_SOURCE_OPTIONS if key in kwargs}
                    try:
                        config = cls.load_config(source, **options)
                    except OSError:
                        index = None if kwargs.get("subfolder") else _hub_pipeline_index(folder, options)
                        if index is None:
                            raise
                        read = functools.partial(_hub_pipeline_index, folder, options)
                        raise cls._whole_pipeline_error(folder, index, read) from None
                    check_format(config, f"the {cls.__name__} config")
                loaded = super().from_pretrained(*args, **kwargs)
            except NewerFormatError as error:
                raise NewerFormatError(f"{folder}: {error}") from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # `output_loading_info=True` gives a tuple
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
                    tensor.data = tensor.data.clone()
        return loaded

    @classmethod
    def _whole_pipeline_error(
        cls, source: str, index: Dict[str, Any], read: Callable[[str], Optional[Dict[str, Any]]]
    ) -> FileNotFoundError:
        """The refusal of `source`, a folder or repo of a whole pipeline (its model_index.json: `index`; `read`: the
        model_index.json at a path of `source`, None where there is none) rather than a model, naming the `subfolder`
        of each of its models of class `cls`, those of the pipelines it holds (a cascade's stages) included."""
        pipeline_class = index.get("_class_name")
        pipeline_class = pipeline_class[-1] if isinstance(pipeline_class, list) else pipeline_class
        pipeline_class = pipeline_class if isinstance(pipeline_class, str) else "DiffusionPipeline"
        # The main network first: a guide (`guidance_unet`) loaded in its place gives worse images and no error.
        folders = sorted(_model_folders(cls.__name__, index, read), key=lambda name: name.rpartition("/")[2] != "unet")
        loads = " or ".join(f"{cls.__name__}.from_pretrained({source!r}, subfolder={name!r})" for name in folders)
        pipeline = f"the pipeline with {pipeline_class}.from_pretrained({source!r})"
        return FileNotFoundError(
            f"{source} holds a whole pipeline ({pipeline_class}, model_index.json), not a model: it has no config.json;"
            + (f" load its {cls.__name__} with {loads}, or {pipeline}" if loads else f" load {pipeline}")
        )

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """Diffusers' `add_adapter` (a `peft.LoraConfig` whose `target_modules` name layers of this UNet, see
        `LORA_TARGET_MODULES`), with an error naming the `lora` extra when `peft` is missing."""
        require_peft()
        super().add_adapter(adapter_config, adapter_name=adapter_name)

    def load_lora_adapter(
        self, pretrained_model_name_or_path_or_dict: Any, prefix: Optional[str] = None, **kwargs: Any
    ) -> None:
        """Diffusers' `load_lora_adapter` (a folder, Hub repo or state dict; `weight_name`, `adapter_name`...).

        `prefix` defaults to None, not Diffusers' `"transformer"`: `save_lora_adapter` writes this UNet's keys
        without one, so what it saves loads back as it is. An adapter with no weights under `prefix` is refused
        (Diffusers would load nothing, silently), as is one that fits in part only (Diffusers would load the rest,
        with a warning); a load that fails leaves the model as it was.
        """
        require_peft()
        if kwargs.get("weight_name") is None:  # Diffusers' models look for a .bin then; its pipelines' loaders don't
            kwargs.setdefault("use_safetensors", True)
        before = set(getattr(self, "peft_config", {}))
        active = self.active_adapters() if before else []
        try:
            # Diffusers only warns of weights that name layers this UNet lacks, or of layers left without theirs
            # (a missing lora_A stays random): a partial adapter, refused here.
            with _dropped_log_records(
                logging.get_logger("diffusers.utils.peft_utils"), "Loading adapter weights from state_dict led to"
            ) as unhandled:
                try:
                    super().load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix=prefix, **kwargs)
                except IndexError as error:
                    if not _raised_in(error, "get_peft_kwargs"):
                        raise
                    # Diffusers finds no LoRA rank in weights without LoRA layers: a model's own weights, which its
                    # guess of the file picks in a repo of a whole pipeline without an adapter.
                    source = _weights_named(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"))
                    raise ValueError(
                        f"{source} holds no LoRA adapter weights (a whole model's weights?), nothing was loaded; a "
                        "--lora_rank run saves its adapter as pytorch_lora_weights.safetensors: pass that weight_name"
                    ) from None
            if set(getattr(self, "peft_config", {})) == before:
                where = f" under the prefix {prefix!r}" if prefix is not None else ""
                raise ValueError(f"the LoRA adapter has no weights{where}: nothing was loaded")
            (loaded,) = set(self.peft_config) - before
            misfits = [part for message in unhandled for part in _keys_of_adapter(message, loaded)]
            if misfits:
                unfit = f"the LoRA adapter does not fit this {type(self).__name__}, nothing was loaded: "
                raise ValueError(unfit + " ".join(misfits))
        except BaseException:
            self._remove_adapters_but(before, active)
            raise

    def _remove_adapters_but(self, kept: set, active: List[str]) -> None:
        """Remove the adapters not in `kept`, and with none kept the adapter layers too, and make `active` the active
        adapters again: a failed load leaves the model as it was (Diffusers leaves the layers, empty, where
        `save_pretrained` would save them under PEFT's names, and PEFT makes the first adapter left active)."""
        if not kept:
            self.unload_lora()
            return
        with warnings.catch_warnings():
            # PEFT's note that it activates another adapter: the one active before the load is, just below.
            warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
            self.delete_adapters([name for name in getattr(self, "peft_config", {}) if name not in kept])
        self.set_adapter(active)

    def to(self, *args: Any, **kwargs: Any) -> SR3UNet2DModel:
        """Diffusers' `to`, keeping the level embeddings (`_keep_in_fp32_modules`) in float32 in a model cast to a
        narrower dtype (`model.to(torch.bfloat16)`, `pipeline.to(dtype=torch.float16)`), as
        `from_pretrained(torch_dtype=...)` loads them: cast with the rest, they would no longer tell apart the levels
        of late sampling steps. Diffusers' warning about such casts, which it logs for every `to` given a dtype,
        is dropped: it no longer applies."""
        kept = {name: getattr(self, name, None) for name in self._keep_in_fp32_modules}
        kept = {name: module for name, module in kept.items() if module is not None}
        # Their float32 values as they are now: `super().to` casts them with the rest, and cast back they would hold
        # the narrower dtype's rounding of them, not the weights `from_pretrained(torch_dtype=...)` loads. (A cast
        # makes new tensors: these keep the old ones.)
        float32_values = {
            (name, key): tensor.detach()
            for name, module in kept.items()
            for key, tensor in [*module.named_parameters(), *module.named_buffers()]
            if tensor.dtype == torch.float32
        }
        with _dropped_log_records(logging.get_logger("diffusers.models.modeling_utils"), "should be kept in float32"):
            super().to(*args, **kwargs)
        if self.dtype.is_floating_point and self.dtype.itemsize < torch.float32.itemsize:
            for name, module in kept.items():
                module.to(torch.float32)
                with torch.no_grad():
                    for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
                        if (name, key) in float32_values:
                            tensor.copy_(float32_values[name, key])
        return self

    def save_lora_adapter(
        self,
        save_directory: Union[str, os.PathLike],
        adapter_name: str = "default",
        upcast_before_saving: bool = False,
        safe_serialization: bool = True,
        weight_name: Optional[str] = None,
    ) -> None:
        """Diffusers' `save_lora_adapter` (`pytorch_lora_weights.safetensors` in `save_directory`, with the adapter's
        `LoraConfig` in its header)."""
        require_peft()
        if not safe_serialization:
            # A pickle holds no LoraConfig: loaded back, its alpha would become the rank, its outputs others.
            raise ValueError(
                "save_lora_adapter saves safetensors only (safe_serialization=False would write a pickle without the "
                "adapter's LoraConfig, whose alpha a load would lose)"
            )
        if upcast_before_saving:  # first, so that the contiguous copies below are of the upcast weights
            self.to(dtype=torch.float32)
        with _contiguous_adapter_weights(self):  # Diffusers' `self.to(dtype=None)` in it warns no more: our `to`
            super().save_lora_adapter(
                save_directory, adapter_name, upcast_before_saving, safe_serialization=True, weight_name=weight_name
            )

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> None:
        """Diffusers' `save_pretrained`, staged as a pipeline's save (`pipelines.base.staged_save`): the files are
        written in a hidden `.sr3-save-*` folder inside `save_directory`, then moved into place, so a save that fails
        or is killed while writing (a full disk) leaves the previous UNet intact, and one killed while moving is
        finished by `diffusers_sr3.finish_interrupted_save(save_directory)` or the next save of the folder (a load
        refuses it until then). With `push_to_hub=True` the files just saved are also uploaded, as Diffusers does, to
        `repo_id` (default: the folder's name), with the repo's model card (Diffusers' template where it has none),
        which is written into the folder too. The save moves into place before the upload, which sends it from a
        hidden folder of its own (`staged_save`); the local save is kept however the upload ends, and a failed upload
        raises `training.hub.HubUploadError` saying so.

        Args:
            save_directory: the folder to save into (created if needed).
            *args, **kwargs: Diffusers' `save_pretrained` arguments (`safe_serialization`, `variant`, `push_to_hub`...).
        """
        # Imported here: the pipelines import this module.
        from ..pipelines.base import saved_not_uploaded, staged_save

        if has_lora_layers(self):
            raise ValueError(
                f"this {type(self).__name__} has LoRA adapter layers ({', '.join(self.peft_config)}), whose weights "
                "no loader reads: save the adapter with save_lora_adapter(), or fuse_lora() then unload_lora() to "
                "save a plain UNet"
            )
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):  # Diffusers logs its error and saves nothing
            return super().save_pretrained(save_directory, *args, **kwargs)
        upload = None
        if kwargs.pop("push_to_hub", False):
            hub = {key: kwargs.pop(key) for key in ("token", "private", "commit_message", "create_pr") if key in kwargs}
            # Diffusers names the repo after the folder it saves in: this one, not the staging folder.
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))

            def upload(staging: str, saved: List[str]) -> None:
                try:
                    self._upload_saved(staging, saved, repo_id, save_directory, **hub)
                except Exception as error:
                    raise saved_not_uploaded(error, repo_id, save_directory) from error

        staged_save(
            save_directory,
            lambda staging: super(SR3UNet2DModel, self).save_pretrained(staging, *args, **kwargs),
            upload,
        )

    def _upload_saved(
        self,
        staging: str,
        saved: List[str],
        repo_id: str,
        card_folder: str,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
    ) -> None:
        """Diffusers' upload of a saved model (`ModelMixin.save_pretrained(push_to_hub=True)`), of the files `saved`
        in `staging` only: the repo created if needed, and its card (Diffusers' template where it has none, tagged as
        Diffusers tags it) written into `card_folder` and uploaded with them."""
        from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
        from huggingface_hub import CommitOperationAdd, HfApi

        from ..file_writes import atomic_file

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = str(populate_model_card(load_or_create_model_card(repo_id, token=token))).encode("utf-8")
        with atomic_file(os.path.join(card_folder, "README.md")) as stream:
            stream.write(card)
        uploads: Dict[str, Union[str, bytes]] = {name: os.path.join(staging, name) for name in saved}
        uploads["README.md"] = card
        api.create_commit(
            repo_id=repo_id,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in uploads.items()],
            commit_message=commit_message or "Upload model",
            create_pr=create_pr,
        )

    # A pipeline's save passes its components only the options that their `save_pretrained` signature names
    # (`variant`, `safe_serialization`, ...): this one names those of the installed Diffusers.
    save_pretrained.__signature__ = inspect.signature(ModelMixin.save_pretrained)

    def save_config(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs: Any) -> None:
        """Diffusers' `save_config` (which `save_pretrained` and `push_to_hub` call), with the one-line re-export that
        the config's `auto_map` names (`unet_sr3.py`: `from diffusers_sr3 import SR3UNet2DModel`) written first, so
        that an upload (`push_to_hub=True` here or in `save_pretrained`) includes it.

        Args:
            save_directory: the folder to write `config.json` and the re-export in (created if needed).
            push_to_hub: upload the folder afterwards, as Diffusers does (`kwargs`: `repo_id`, `token`, ...).
        """
        # Imported here: the pipelines import this module.
        from ..pipelines.base import REMOTE_CODE_STEMS, _write_reexport

        if os.path.isfile(save_directory):  # Diffusers' own check and error, before the re-export would fail on it
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        if type(self) is SR3UNet2DModel:  # a subclass gets no auto_map naming it (`_auto_class`), so no re-export
            stem = REMOTE_CODE_STEMS[SR3UNet2DModel.__name__]
            _write_reexport(os.path.join(os.fspath(save_directory), f"{stem}.py"), SR3UNet2DModel.__name__)
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict: Dict[str, Any], **kwargs: Any) -> Tuple[Dict[str, Any], ...]:
        """Diffusers' split of a config into `__init__` arguments and the rest, for every way of building the model
        from a config (`from_pretrained`, `from_config`, `AutoModel`): a config saved in a newer on-disk format than
        this version reads is refused (`disk_format.check_format`). Without the `auto_map` that saves write for
        AutoModel, and the format version: they are no arguments (Diffusers would warn that they are ignored) and no
        settings."""
        check_format(config_dict, f"the {cls.__name__} config")
        config_dict = {key: value for key, value in config_dict.items() if key not in ("auto_map", FORMAT_KEY)}
        return super().extract_init_dict(config_dict, **kwargs)

    def compile_repeated_blocks(self, *args: Any, **kwargs: Any) -> None:
        """Diffusers' regional compilation of every `ResnetAttentionBlock` (`torch.compile` arguments as there).

        The blocks share one code object but differ in structure (widths, skip convs, attention or not), so each
        compiles once: `torch._dynamo.config.recompile_limit` is raised (never lowered) to the number of blocks,
        which with `fullgraph=True` would otherwise fail once the limit (8 by default) is reached.
        """
        import torch._dynamo

        blocks = sum(type(module).__name__ in self._repeated_blocks for module in self.modules())
        # `cache_size_limit` is the setting's name before torch 2.7.
        setting = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, setting, max(getattr(torch._dynamo.config, setting), blocks))
        super().compile_repeated_blocks(*args, **kwargs)

    def _fix_state_dict_keys_on_load(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`from_pretrained`'s hook for renamed weights: converts the legacy attention keys."""
        state_dict = super()._fix_state_dict_keys_on_load(state_dict)
        return convert_legacy_attention_keys(state_dict)

    def set_default_attn_processor(self) -> None:
        """Use `AttnProcessor2_0` (PyTorch's `scaled_dot_product_attention`) in every attention layer."""
        self.set_attn_processor(AttnProcessor2_0())

    def fuse_qkv_projections(self) -> None:
        """Fuse every attention layer's q, k and v projections into one matrix product (`FusedAttnProcessor2_0`).

        The output is unchanged (to rounding). `unfuse_qkv_projections` restores the processors used before.
        """
        if getattr(self, "original_attn_processors", None) is not None:
            return  # already fused: keep the processors to restore, which a second call would overwrite
        self.original_attn_processors = self.attn_processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections`: the separate projections (with the fused weights, trained or not) and the
        previous processors again."""
        original = getattr(self, "original_attn_processors", None)
        if original is not None:
            self.set_attn_processor(original)
            self.original_attn_processors = None
        _sync_fused_projections(self)
        for module in self.modules():
            if isinstance(module, Attention) and getattr(module, "fused_projections", False):
                # Synced back above: drop the fused copy so state dicts keep one set of weights.
                if hasattr(module, "to_qkv"):
                    del module.to_qkv
                module.fused_projections = False

    @property
    def downsampling_factor(self) -> int:
        """Height and width of inputs must be multiples of this."""
        return self.config.get("pixel_unshuffle_factor", 1) * 2 ** (len(self.config.channel_multipliers) - 1)

    @staticmethod
    def _deprecated_level_keyword(signal_level: Any, deprecated_kwargs: Dict[str, Any], stacklevel: int) -> Any:
        """`noise_level=` (the name before 0.2) still works, with a FutureWarning; anything else is a TypeError."""
        if "noise_level" in deprecated_kwargs:
            if signal_level is not None:
                raise TypeError("give signal_level or its old name noise_level, not both")
            warnings.warn(
                "SR3UNet2DModel(noise_level=...) is renamed signal_level (sqrt(alpha_bar), 1 = clean), so that it "
                "cannot be confused with condition_noise_level (0 = clean); the old keyword will be removed",
                FutureWarning,
                stacklevel=stacklevel,
            )
            signal_level = deprecated_kwargs.pop("noise_level")
        if deprecated_kwargs:
            raise TypeError(f"SR3UNet2DModel.forward got unexpected keyword arguments {sorted(deprecated_kwargs)}")
        if signal_level is None:
            raise TypeError("SR3UNet2DModel.forward needs signal_level (sqrt(alpha_bar) per sample, or the timestep)")
        return signal_level

    @classmethod
    def _checked_inputs(
        cls, config: Any, sample: torch.Tensor, signal_level: Any, deprecated_kwargs: Dict[str, Any]
    ) -> torch.Tensor:
        """`forward`'s checks of its input, shared with the stand-ins that run this model elsewhere (ONNX, bf16).

        Args:
            config: the model's config.
            sample: the `(batch, in_channels, height, width)` input.
            signal_level: the level argument as given (None where only `noise_level=` was).
            deprecated_kwargs: the other keyword arguments (`noise_level=` is taken out of it).

        Returns:
            The signal level, one value per sample, on the sample's device.
        """
        signal_level = cls._deprecated_level_keyword(signal_level, deprecated_kwargs, stacklevel=4)
        if sample.ndim != 4:
            raise ValueError(f"sample must be (batch, channels, height, width), got shape {tuple(sample.shape)}")
        batch, channels, height, width = sample.shape
        if channels != config["in_channels"]:
            raise ValueError(f"sample has {channels} channels but the model expects {config['in_channels']}")
        factor = config.get("pixel_unshuffle_factor", 1) * 2 ** (len(config["channel_multipliers"]) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"sample size {height}x{width} is not divisible by {factor}; pad it (the pipelines do this for you)"
            )
        if config.get("conditioning_type", "noise_level") == "noise_level":
            cls.check_signal_levels(signal_level)
        return cls._per_sample(signal_level, batch, sample.device, "signal_level")

    @staticmethod
    def check_signal_levels(signal_level: Any) -> None:
        """Refuse what is a scheduler's timestep rather than a level, for `"noise_level"` models (`forward` checks its
        `signal_level` with this).

        `for t in scheduler.timesteps: unet(x, t)` passes integer timesteps (e.g. 75), which the embedding would
        otherwise read as a level far outside [0, 1], silently; a float tensor of them (`torch.tensor([999.0])`, or an
        Euler scheduler's float timesteps) too. Integer tensors are refused by their dtype, float values by their
        range, on every device: on an accelerator the read waits for the device, once per call, which a sampling loop
        avoids by checking its levels once and calling inside [`levels_checked`]. Not while tracing or compiling: the
        branch on the values would break `torch.compile(fullgraph=True)` and `torch.export`, and the ONNX export's
        trace would record it; nor inside `torch.func` transforms (`vmap`), which cannot batch the boolean-mask
        indexing or `.item()` of the check; nor on the meta device, which holds no values.
        """
        value = None
        if isinstance(signal_level, numbers.Real):
            if not 0 <= signal_level <= 1:
                value = repr(signal_level)
        else:  # tensors, lists, numpy arrays
            levels = signal_level if isinstance(signal_level, torch.Tensor) else torch.as_tensor(signal_level)
            if not levels.is_floating_point():
                value = levels.dtype if isinstance(signal_level, torch.Tensor) else repr(signal_level)
            elif not (
                torch.jit.is_tracing()
                or torch.compiler.is_compiling()
                or _is_functorch_wrapped_tensor(levels)
                or levels.device.type == "meta"
                or (levels.device.type != "cpu" and _LEVELS_CHECKED.get())
            ):
                levels = levels.detach().reshape(-1)
                outside = levels[~((levels >= 0) & (levels <= 1))]  # NaN too
                if outside.numel():
                    value = repr(outside[0].item())
        if value is not None:
            raise ValueError(
                f"signal_level must be sqrt(alpha_bar) in [0, 1] for conditioning_type='noise_level' models, got "
                f"{value}: a scheduler timestep is not a level; map steps to levels with "
                "diffusers_sr3.noise.noise_level_for_step (or network_inputs_for_schedule)"
            )

    @staticmethod
    def _per_sample(values, batch: int, device: torch.device, name: str) -> torch.Tensor:
        """Broadcast a number or a `(B,)`/`(B, 1)` tensor to one value per sample."""
        values = torch.as_tensor(values, device=device).reshape(-1)
        if values.numel() == 1:
            return values.expand(batch)
        if values.numel() != batch:
            raise ValueError(f"{name} has {values.numel()} values for a batch of {batch}")
        return values

    def forward(
        self,
        sample: torch.Tensor,
        signal_level: Optional[Union[torch.Tensor, float, int]] = None,
        condition_noise_level: Optional[Union[torch.Tensor, float]] = None,
        return_dict: bool = True,
        **deprecated_kwargs: Any,
    ) -> Union[SR3UNet2DOutput, Tuple[torch.Tensor]]:
        r"""Predict the noise (or the configured target) in `sample`.

        Two levels enter this network, and they run in opposite directions:

        - `signal_level` is how much of the clean image is left in `sample`: `sqrt(alpha_bar)`, **1 = clean**,
          0 = pure noise (the SR3 paper's noise level; the integer timestep for `"timestep"` models).
        - `condition_noise_level` is how much noise was added to the conditioning image: **0 = clean**.

        Args:
            sample (`torch.Tensor` of shape `(batch, in_channels, height, width)`): The noisy image, with the
                conditioning image (if any) concatenated in front of it on the channel axis.
            signal_level (`torch.Tensor` of shape `(batch,)` or `(batch, 1)`, or a number): `sqrt(alpha_bar)` per
                sample for `"noise_level"` models (1 = clean); the integer timestep for `"timestep"` models. A number
                or a one-element tensor applies to the whole batch. Formerly `noise_level=` (still accepted, with a
                `FutureWarning`).
            condition_noise_level (`torch.Tensor` of shape `(batch,)`, or a number, optional): For models with
                `condition_noise_embedding`: the noise level added to the condition (0 or None = clean).
            return_dict (`bool`, defaults to True): Return an [`SR3UNet2DOutput`] instead of a tuple.

        Returns:
            [`SR3UNet2DOutput`] or `tuple`: the prediction, `(batch, out_channels, height, width)`.
        """
        # 1. Check the input and broadcast the level to one value per sample.
        signal_level = self._checked_inputs(self.config, sample, signal_level, deprecated_kwargs)
        batch = sample.shape[0]

        # 2. Embed the signal level (and the condition's augmentation level).
        embedding = self.noise_level_embedding(signal_level)
        if self.condition_noise_level_embedding is not None:
            if condition_noise_level is None:
                condition_noise_level = 0.0
            condition_noise_level = self._per_sample(
                condition_noise_level, batch, sample.device, "condition_noise_level"
            )
            embedding = embedding + self.condition_noise_level_embedding(condition_noise_level)
        elif condition_noise_level is not None:
            raise ValueError("condition_noise_level was given, but this model has no condition_noise_embedding")
        embedding = embedding.to(sample.dtype)

        # 3. Fold the image onto the network's grid (low-resolution networks), then down, keeping every
        #    intermediate output for the skip connections.
        unshuffle = self.config.get("pixel_unshuffle_factor", 1)
        if unshuffle > 1:
            sample = F.pixel_unshuffle(sample, unshuffle)
        hidden_states = self.conv_in(sample)
        skips = [hidden_states]
        for level in self.down_levels:
            for block in level.blocks:
                hidden_states = block(hidden_states, embedding)
                skips.append(hidden_states)
            if level.downsampler is not None:
                hidden_states = level.downsampler(hidden_states)
                skips.append(hidden_states)

        # 4. Middle.
        for block in self.mid_blocks:
            hidden_states = block(hidden_states, embedding)

        # 5. Up, concatenating the skips in reverse order.
        for level in self.up_levels:
            for block in level.blocks:
                skip = skips.pop().to(hidden_states.device)  # a no-op unless device_map split the model
                hidden_states = block(torch.cat([hidden_states, skip], dim=1), embedding)
            if level.upsampler is not None:
                hidden_states = level.upsampler(hidden_states)

        # 6. Output, unfolded back to image pixels.
        output = self.conv_out(hidden_states)
        if unshuffle > 1:
            output = F.pixel_shuffle(output, unshuffle)
        if not return_dict:
            return (output,)
        return SR3UNet2DOutput(sample=output)
