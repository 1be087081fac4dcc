"""Runtimes for the SR3 UNet other than eager float32 PyTorch.

- `"bf16"`: PyTorch under bfloat16 autocast with channels-last activations: native bfloat16 hardware (Intel AMX,
  AVX512-BF16, recent GPUs) runs the convolutions, attention and linear layers in bfloat16 while normalisations and
  the output stay float32. 3.2x per evaluation on a 2-core Sapphire Rapids CPU (AMX); 1.4-1.5x end to end on a
  2-core AMD EPYC with AVX512-BF16; 0.01 dB from float32 on photos (benchmarks/upscale.py). [`AutocastUNet`].
- `"onnx"`: ONNX Runtime (fp32, CPU), an optional extra: `pip install -e ".[onnx]"`. [`OnnxUNet`].
- `"auto"` (what `sr3 upscale` uses by default): `"bf16"` on hardware that multiplies bfloat16 natively (see
  [`fast_bfloat16`]), else `"torch"`.

```py
from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.backends import use_backend
from diffusers_sr3.photos import load_photo, packaged_photo_paths

pipe = SR3Pipeline.from_pretrained("sr3-photos-x4")
low_res = load_photo(packaged_photo_paths()[0], max_side=32)
with use_backend(pipe, "onnx"):  # exports the UNet once (cached), then ONNX Runtime runs every evaluation
    image = pipe(low_res, mode="fidelity").images[0]
```

or explicitly: `onnx_unet = OnnxUNet.from_unet(pipe.unet)`, then `with swap_unet(pipe, onnx_unet): ...`.
`sr3 upscale --backend onnx` does the same. [`OnnxUNet`] stands in for the UNet: same `config`, `dtype`, `device`,
`downsampling_factor` and call signature, so tiling and both pipeline modes work unchanged. The exported graph
takes any batch, height and width (multiples of the downsampling factor); its output matches eager PyTorch to
~1e-6 relative (tests/test_backends.py).

Exports are cached by a hash of the UNet's config and weights in `$SR3_CACHE_DIR/onnx` (default
`$XDG_CACHE_HOME/diffusers-sr3/onnx`, else `~/.cache/diffusers-sr3/onnx`), so only the first run pays the export
(seconds to tens of seconds on a CPU). Each export records that hash in its metadata: a file exported from other
weights, or damaged, is exported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import platform
import re
import socket
import statistics
import time
from typing import Any, Iterator, Optional, Tuple, Union

import torch
from diffusers.utils.torch_utils import is_compiled_module

from .defaults import BACKENDS
from .pipelines.base import call_lock, step_networks
from .pipelines.pipeline_sr3_cascade import SR3CascadePipeline

# The metadata key of an ONNX export that records the unet_fingerprint of the UNet it was exported from.
FINGERPRINT_KEY = "sr3_fingerprint"


def bfloat16_cpu() -> bool:
    """Whether this CPU has bfloat16 matrix units, AMX tiles or AVX512-BF16 dot products, whichever kernels torch runs
    (see [`fast_bfloat16`])."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def bfloat16_kernels_held_back() -> Optional[str]:
    """The level torch's CPU kernels are held at (`ATEN_CPU_CAPABILITY`, e.g. `"AVX2"`) where it is below the AVX512
    ones this CPU's bfloat16 units need ([`bfloat16_cpu`]), else None.

    Torch then still packs bfloat16 operands for those units, but without the AVX512 kernels that pack them: its
    bfloat16 attention (`scaled_dot_product_attention`, from 64 tokens) fails with "pack_vnni2 is only supported
    when avx512 is supported" (torch 2.14; convolutions and matrix products still run).
    """
    kernels = torch.backends.cpu.get_cpu_capability()
    return kernels if bfloat16_cpu() and kernels != "AVX512" else None


def check_bfloat16_runs(device: Union[str, torch.device], request: str, instead: str) -> None:
    """Refuse `request` (bfloat16 on `device`, as the user asked for it) where torch cannot run it
    ([`bfloat16_kernels_held_back`]): a one-line ValueError naming the cause and the fix, before any model work,
    where otherwise torch's traceback ended the run in the model's first attention.

    Args:
        request: what asked for bfloat16, for the message (`"--backend bf16"`).
        instead: what runs without it, for the message (`"--backend torch"`).
    """
    if torch.device(device).type != "cpu":
        return
    kernels = bfloat16_kernels_held_back()
    if kernels is not None:
        setting = os.environ.get("ATEN_CPU_CAPABILITY")
        override = f"ATEN_CPU_CAPABILITY={setting}" if setting else "ATEN_CPU_CAPABILITY"
        raise ValueError(
            f"{request}: torch's CPU kernels are held at {kernels} ({override}), below the AVX512 ones that this "
            f"CPU's bfloat16 attention needs (torch fails there with \"pack_vnni2 is only supported when avx512 is "
            f'supported"): unset ATEN_CPU_CAPABILITY, or use {instead}'
        )


def fast_bfloat16(device: Union[str, torch.device]) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CPU with AMX tiles or with AVX512-BF16 dot products
    (Intel Cooper Lake and later, AMD Zen 4 and later), or a CUDA GPU with bf16 support.

    AMX runs bfloat16 convolutions many times faster than float32; AVX512-BF16 twice as fast (its dot products do
    twice the float32 multiply-adds per instruction). Elsewhere (AVX2-only CPUs, older GPUs) bfloat16 is emulated and
    slower than float32. Not where torch's own kernels are held below AVX512 ([`bfloat16_kernels_held_back`]).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and bfloat16_cpu() and not bfloat16_kernels_held_back())
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


# Torch's thread count when this module was imported: `default_cpu_threads` starts from it, not from the count an
# earlier command of the same process set.
TORCH_THREADS_AT_START = torch.get_num_threads()
# `/proc/loadavg` is read this many times, this far apart: the tasks runnable at one instant jump about.
RUNNABLE_SAMPLES, RUNNABLE_SAMPLE_SECONDS = 5, 0.02


def runnable_tasks_besides_this_one() -> Optional[float]:
    """How many tasks (threads) of other processes want a CPU now: the median, over a few samples, of the runnable
    count in Linux's `/proc/loadavg`, less this process's own thread; None where there is no such file (other
    systems).

    Not the 1-minute load average: it decays over minutes, so right after a run of this command (or any job that has
    just ended) an idle machine would still look busy.
    """
    samples = []
    for sample in range(RUNNABLE_SAMPLES):
        if sample:
            time.sleep(RUNNABLE_SAMPLE_SECONDS)
        try:
            with open("/proc/loadavg", encoding="ascii") as handle:
                samples.append(int(handle.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
    return max(0.0, statistics.median(samples) - 1)


def default_cpu_threads() -> Tuple[int, str]:
    """The CPU threads to run torch with where none were asked for (`--threads`), and why, in words for a log line.

    Torch's own count (one per core, or `OMP_NUM_THREADS`; as it was at start-up) less the cores other processes
    keep busy, at least 1: torch's threads wait for each other at every parallel step, so a thread that another
    process keeps off its core holds up all of them (an SR3 training step took 6.1 s in two threads and 0.24 s in one
    on a 2-core machine at load 5-7). The busy cores are the tasks of other processes runnable now
    ([`runnable_tasks_besides_this_one`]), in the share of the machine's cores this process may run on. Where
    `OMP_NUM_THREADS` is set (the user's own choice) or the system does not say, torch's count.

    Returns:
        `(threads, why)`: e.g. `(2, "torch's default")`, or `(1, "other processes keep the cores busy (5 runnable
        tasks besides this one on 2 cores)")`.
    """
    threads = TORCH_THREADS_AT_START
    if os.environ.get("OMP_NUM_THREADS"):
        return threads, "OMP_NUM_THREADS"
    others = runnable_tasks_besides_this_one()
    if others is None:
        return threads, "torch's default"
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    # Tasks are counted over the whole machine: a process held to some of its cores sees their share of them.
    free = usable - int(others * usable / max(cores, usable))
    if free >= threads:
        return threads, "torch's default"
    return max(
        1, free
    ), f"other processes keep the cores busy ({others:g} runnable tasks besides this one on {cores} cores)"


def cpu_name() -> str:
    """The CPU model as Linux names it (platform.processor() is often empty there), for benchmark reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_backend(backend: str, unet: Any) -> str:
    """The concrete backend `backend` means for `unet`: `"auto"` picks `"bf16"` for a float32 UNet on a device
    where [`fast_bfloat16`] holds, else `"torch"`. `"bf16"` asked for where torch cannot run it is refused
    ([`check_bfloat16_runs`])."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "bf16":
        check_bfloat16_runs(unet.device, "the bf16 backend", "the torch backend")
    if backend != "auto":
        return backend
    return "bf16" if unet.dtype == torch.float32 and fast_bfloat16(unet.device) else "torch"


def cache_dir() -> str:
    """Where exported networks are cached: `$SR3_CACHE_DIR`, else `$XDG_CACHE_HOME/diffusers-sr3`, else
    `~/.cache/diffusers-sr3`."""
    if os.environ.get("SR3_CACHE_DIR"):
        return os.environ["SR3_CACHE_DIR"]
    caches = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(caches):  # the XDG spec: a relative path is invalid and ignored
        caches = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(caches, "diffusers-sr3")


def resolve_device(name: Optional[str]) -> torch.device:
    """A `--device` option as a device this machine has (default: cuda if available, else cpu), or a one-line error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: {error}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} usable CUDA device(s); try --device cpu")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available here; try --device cpu")
    elif device.type != "cpu":
        # Other accelerators (xpu, ...) have a torch module of their own; meta and unknown types have none to run on.
        module = getattr(torch, device.type, None)
        if not (callable(getattr(module, "is_available", None)) and module.is_available()):
            raise ValueError(f"--device {name}: this machine has no usable {device.type} device; try --device cpu")
        count = module.device_count() if callable(getattr(module, "device_count", None)) else 1
        if (device.index or 0) >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} usable {device.type} device(s); try --device cpu"
            )
    return device


class UnwritableFolderError(OSError, ValueError):
    """A folder an export cannot be written to: an OSError, and a ValueError so that commands print it in one line."""


def _require(module: str) -> Any:
    """Import one of the ONNX backend's packages (onnx exports, onnxruntime runs), or say why it cannot be used.

    Args:
        module: the name of the package to import (`onnx` or `onnxruntime`).

    Raises:
        ImportError: the package is not installed (with how to install it), or is installed but fails to import
            (a broken install, a build for another numpy), with the first line of its own error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # A module that the package itself imports being missing is a broken install too, not a missing package.
        name = error.name if isinstance(error, ModuleNotFoundError) else None
        if name is not None and (module == name or module.startswith(f"{name}.")):
            raise ImportError(
                # diffusers-sr3 is not on PyPI: the extra resolves against the installed distribution (a wheel).
                f"the ONNX backend needs {module}: pip install onnxruntime onnx (or its extra: pip install "
                '"diffusers-sr3[onnx]" beside an installed diffusers-sr3, pip install -e ".[onnx]" in a checkout)'
            ) from None
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImportError(f"{module} is installed but fails to import: {detail}") from None


class _Exportable(torch.nn.Module):
    """The UNet with tensor-only inputs and outputs, as the ONNX exporter wants it."""

    def __init__(self, unet: torch.nn.Module, condition_noise: bool):
        super().__init__()
        self.unet = unet
        self.condition_noise = condition_noise

    def forward(self, sample, noise_level, condition_noise_level=None):
        kwargs = {"condition_noise_level": condition_noise_level} if self.condition_noise else {}
        return self.unet(sample, noise_level, return_dict=False, **kwargs)[0]


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A hash of the UNet's class, config and float32 weights (and the torch version that exports it).

    Config keys that start with `_` (the folder the UNet was loaded from, the Diffusers version that saved it) are
    left out: they do not change what it computes, and a copied model folder should reuse its export.
    """
    unet = _unwrapped(unet)
    config = {key: value for key, value in dict(unet.config).items() if not key.startswith("_")}
    digest = hashlib.sha256()
    digest.update(type(unet).__name__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(torch.__version__.encode())
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _unwrapped(unet: Any) -> Any:
    """The module a `torch.compile`d UNet wraps: the ONNX exporter cannot trace a dynamo-optimized one."""
    return unet._orig_mod if is_compiled_module(unet) else unet


def _staging_path(path: str) -> str:
    """Where `path` is written before it is moved into place: named by host and process, so that what a killed
    export leaves can be recognised and removed."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _remove_dead_staging_files(folder: str) -> None:
    """Remove the staging files of this machine's exports whose process has ended (killed before they finished)."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows rather than probing it
        return
    pattern = re.compile(rf"\..+\.{re.escape(socket.gethostname())}\.(\d+)\.tmp")
    for name in os.listdir(folder):
        match = pattern.fullmatch(name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
        except OSError:  # alive, but another user's
            pass


def export_onnx(
    unet: torch.nn.Module, path: Union[str, os.PathLike], opset: int = 17, fingerprint: Optional[str] = None
) -> str:
    """Export an SR3 UNet (float32, CPU copy) to an ONNX file with dynamic batch, height and width.

    Inputs: `sample` `(B, in_channels, H, W)`, `noise_level` `(B,)` and, for UNets with condition_noise_embedding,
    `condition_noise_level` `(B,)`; output: `prediction` `(B, out_channels, H, W)`. Written atomically, with the
    permissions the umask gives new files (a cache may be shared) and the UNet's [`unet_fingerprint`] in the model's
    metadata (`sr3_fingerprint`). A `torch.compile`d UNet is exported as the module it compiles.

    Args:
        unet: the SR3 UNet.
        path: the `.onnx` file to write; its folder is created.
        opset: the ONNX opset.
        fingerprint: `unet_fingerprint(unet)`, where the caller has it already.

    Raises:
        UnwritableFolderError: the folder cannot be created or written to.
    """
    import copy
    import warnings

    onnx = _require("onnx")
    unet = _unwrapped(unet)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    staging = _staging_path(path)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_dead_staging_files(folder)
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)  # left by a killed process that had this one's id
        os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # less the umask, as open() makes
    except OSError as error:
        raise UnwritableFolderError(f"cannot write to {folder}: {error.strerror or error}") from None
    try:
        fingerprint = fingerprint or unet_fingerprint(unet)
        network = copy.deepcopy(unet).eval()
        if network.device.type != "cpu" or network.dtype != torch.float32:
            network = network.to("cpu", torch.float32)
        condition_noise = bool(network.config.get("condition_noise_embedding", False))
        size = network.config.sample_size
        size = int(max(size) if isinstance(size, (tuple, list)) else size)
        # Batch 2: a batch of 1 could let the tracer bake the batch size in as a constant.
        inputs = [torch.zeros(2, network.config.in_channels, size, size), torch.full((2,), 0.5)]
        names = ["sample", "noise_level"]
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "noise_level": {0: "batch"}}
        if condition_noise:
            inputs.append(torch.zeros(2))
            names.append("condition_noise_level")
            axes["condition_noise_level"] = {0: "batch"}
        axes["prediction"] = {0: "batch", 2: "height", 3: "width"}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about the shape checks, which hold for any size
            torch.onnx.export(
                _Exportable(network, condition_noise),
                tuple(inputs),
                staging,
                input_names=names,
                output_names=["prediction"],
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        model = onnx.load(staging)
        model.metadata_props.add(key=FINGERPRINT_KEY, value=fingerprint)
        onnx.save(model, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


class _OnnxStandIn:
    """What a pipeline reads of its UNet's placement: ONNX Runtime runs fp32 on the CPU."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class OnnxUNet(_OnnxStandIn):
    """An SR3 UNet run by ONNX Runtime (fp32, CPU): a stand-in for `pipeline.unet`.

    Args:
        path: the exported `.onnx` file (see [`export_onnx`]).
        config: the UNet's config (a dict or FrozenDict).
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).
        providers: ONNX Runtime execution providers (default: CPU).
    """

    def __init__(self, path: str, config: Any, threads: Optional[int] = None, providers: Optional[list] = None):
        onnxruntime = _require("onnxruntime")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.config = config
        self.session = onnxruntime.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        self._inputs = {item.name for item in self.session.get_inputs()}

    @classmethod
    def from_unet(
        cls,
        unet: torch.nn.Module,
        path: Optional[str] = None,
        threads: Optional[int] = None,
        providers: Optional[list] = None,
    ) -> OnnxUNet:
        """Export `unet` (to `path`, or to the cache under its [`unet_fingerprint`]), or reuse the export there.

        A file there that ONNX Runtime cannot load (empty, truncated), or whose recorded fingerprint is missing or
        another UNet's, is exported again. Raises [`UnwritableFolderError`] where the file cannot be written.
        """
        _require("onnxruntime")
        unet = _unwrapped(unet)
        fingerprint = unet_fingerprint(unet)
        cached = path is None
        if cached:
            path = os.path.join(cache_dir(), "onnx", f"{type(unet).__name__}-{fingerprint}.onnx")
        if os.path.isfile(path):
            try:
                onnx_unet = cls(path, unet.config, threads=threads, providers=providers)
            except Exception:  # ONNX Runtime's load errors (InvalidProtobuf, InvalidArgument, ...) share no base
                onnx_unet = None
            if onnx_unet is not None and onnx_unet.fingerprint == fingerprint:
                return onnx_unet
        try:
            export_onnx(unet, path, fingerprint=fingerprint)
        except UnwritableFolderError as error:
            if not cached:
                raise
            raise UnwritableFolderError(f"{error}; set SR3_CACHE_DIR to a writable folder") from None
        return cls(path, unet.config, threads=threads, providers=providers)

    @property
    def fingerprint(self) -> Optional[str]:
        """The [`unet_fingerprint`] of the UNet the file was exported from (None where the file does not say)."""
        return self.session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)

    @property
    def downsampling_factor(self) -> int:
        return self.config.get("pixel_unshuffle_factor", 1) * 2 ** (len(self.config["channel_multipliers"]) - 1)

    def __call__(
        self,
        sample: torch.Tensor,
        signal_level: Optional[Union[torch.Tensor, float, int]] = None,
        condition_noise_level: Optional[Union[torch.Tensor, float]] = None,
        return_dict: bool = True,
        **deprecated_kwargs: Any,
    ):
        """[`SR3UNet2DModel.forward`]'s arguments (`noise_level=` included), checks and output, run by ONNX Runtime."""
        from .models.unet_sr3 import SR3UNet2DModel, SR3UNet2DOutput

        signal_level = SR3UNet2DModel._checked_inputs(self.config, sample, signal_level, deprecated_kwargs)

        def per_sample(values, name: str) -> Any:
            values = SR3UNet2DModel._per_sample(values, sample.shape[0], torch.device("cpu"), name)
            return values.to(torch.float32).contiguous().numpy()

        # The exported graph's input keeps its old name, `noise_level`: files exported before still load.
        feeds = {
            "sample": sample.detach().to("cpu", torch.float32).contiguous().numpy(),
            "noise_level": signal_level.detach().to("cpu", torch.float32).contiguous().numpy(),
        }
        if "condition_noise_level" in self._inputs:
            condition = 0.0 if condition_noise_level is None else condition_noise_level
            feeds["condition_noise_level"] = per_sample(condition, "condition_noise_level")
        elif condition_noise_level is not None:
            raise ValueError("condition_noise_level was given, but this model has no condition_noise_embedding")
        prediction = torch.from_numpy(self.session.run(["prediction"], feeds)[0]).to(sample.device)
        if not return_dict:
            return (prediction,)
        return SR3UNet2DOutput(sample=prediction)


# PyTorch's CPU GroupNorm on channels-last input costs about 150 us per sample of 16x16 pixels or fewer on one core,
# 12-26x its NCHW kernel (on larger samples about the same): detail mode's windows (64 pixels, a 16x16 grid and
# smaller at the packaged network's levels, hundreds per batch) took 2.2x their pixel share of the time under bf16,
# and the progress bar's early ETA was 1.6x short (benchmarks/window_cost.py).
NCHW_GROUP_NORM_PIXELS = 16 * 16


def _nchw_group_norm_input(module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Optional[Tuple[Any, ...]]:
    """A GroupNorm's forward pre-hook: small channels-last samples are normalised in NCHW (the next convolution,
    whose weights are channels-last, turns them back)."""
    hidden_states = inputs[0]
    small = math.prod(hidden_states.shape[2:]) <= NCHW_GROUP_NORM_PIXELS  # attention's norms see (B, C, pixels)
    if small and not hidden_states.is_contiguous():
        return (hidden_states.contiguous(), *inputs[1:])
    return None


class AutocastUNet:
    """An SR3 UNet run under bfloat16 autocast with channels-last activations: a stand-in for `pipeline.unet`.

    Convolutions, attention and linear layers compute in bfloat16; what autocast keeps in float32 (normalisations
    among others) stays float32. Inputs and outputs are float32.

    Samples at most `downsampling_factor` high or wide run in float32 (on every device: they are tiny, so it costs
    little): their deepest level is one pixel across, and oneDNN's bfloat16 stride-2 convolution with a
    one-pixel-wide output reads garbage (errors of 2 on unit inputs, NaN through the packaged network).

    On the CPU, group normalisation of levels `NCHW_GROUP_NORM_PIXELS` or fewer pixels runs in NCHW: many times
    faster for detail mode's windows, as accurate against float32 (bf16 rounding differs, so seeded outputs change in
    the last bits).

    Args:
        unet: a float32 `SR3UNet2DModel`; its weights are converted to channels-last in place (outputs unchanged;
            [`use_backend`] restores the memory format they had when its block ends).
        dtype: the autocast compute dtype (`torch.bfloat16`; `torch.float16` on GPUs that prefer it).
    """

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        if unet.dtype != torch.float32:
            raise ValueError(f"mixed precision wraps a float32 UNet; this one is {unet.dtype}")
        self.unet = unet.to(memory_format=torch.channels_last)
        self.compute_dtype = dtype
        self.config = unet.config
        self._group_norms = [module for module in unet.modules() if isinstance(module, torch.nn.GroupNorm)]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def downsampling_factor(self) -> int:
        return self.unet.downsampling_factor

    def mixed_precision(self, sample: torch.Tensor) -> bool:
        """Whether `sample` runs under autocast: false where a level of the UNet would be one pixel across."""
        return min(sample.shape[-2:]) > self.downsampling_factor

    def __call__(self, sample: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        # Hooked for this call only: the UNet goes back to its own use when the backend's block ends.
        cpu = self.device.type == "cpu"
        hooks = [norm.register_forward_pre_hook(_nchw_group_norm_input) for norm in self._group_norms if cpu]
        try:
            with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.mixed_precision(sample)):
                if sample.ndim == 4:  # anything else goes to the UNet as it is, for its own error message
                    sample = sample.contiguous(memory_format=torch.channels_last)
                prediction = self.unet(sample, *args, return_dict=False, **kwargs)[0]
        finally:
            for hook in hooks:
                hook.remove()
        prediction = prediction.to(torch.float32).contiguous()
        if not return_dict:
            return (prediction,)
        from .models.unet_sr3 import SR3UNet2DOutput

        return SR3UNet2DOutput(sample=prediction)


@contextlib.contextmanager
def swap_unet(pipeline: Any, unet: Any) -> Iterator[Any]:
    """Run `pipeline` with `unet` in place of its UNet inside the `with` block (its config never sees it); the block
    holds the pipeline's `call_lock`, so another thread's call on it waits for the block to end."""
    with call_lock(pipeline):
        original = pipeline.unet
        vars(pipeline)["unet"] = unet
        try:
            yield unet
        finally:
            vars(pipeline)["unet"] = original


class _DeferredOnnxUNet(_OnnxStandIn):
    """An [`OnnxUNet`] exported on its first evaluation, for a network a pipeline may never run: the guidance UNet
    (fidelity mode and unguided detail mode leave it out), whose export would otherwise cost as much as the UNet's.

    Args:
        unet: the UNet to export.
        threads: intra-op threads of its ONNX Runtime session.
    """

    def __init__(self, unet: torch.nn.Module, threads: Optional[int] = None):
        self.unet = unet
        self.threads = threads
        self.config = unet.config
        self._onnx_unet: Optional[OnnxUNet] = None

    @property
    def downsampling_factor(self) -> int:
        return self.unet.downsampling_factor

    def __call__(self, *args, **kwargs):
        if self._onnx_unet is None:
            self._onnx_unet = OnnxUNet.from_unet(self.unet, threads=self.threads)
        return self._onnx_unet(*args, **kwargs)


@contextlib.contextmanager
def use_backend(pipeline: Any, backend: str = "torch", threads: Optional[int] = None) -> Iterator[Any]:
    """Run `pipeline`'s UNet (and its guidance UNet, if it has one) on `backend` inside the block; yields the UNet's
    stand-in. On an [`SR3CascadePipeline`], every pipeline it holds (generator first, then the stages) runs on
    `backend` (`"auto"` decides for each), and the block yields their stand-ins in that order.

    `"torch"`: unchanged; `"bf16"`: [`AutocastUNet`]; `"onnx"`: [`OnnxUNet`], the UNet exported on entering the block
    and the guidance UNet on its first evaluation; `"auto"`: see [`resolve_backend`]. The block holds the pipeline's
    `call_lock`.
    """
    # Held through the block: another thread's call on the pipeline would run on (and a second block restore)
    # this block's stand-ins.
    with call_lock(pipeline):
        if isinstance(pipeline, SR3CascadePipeline):
            stages = ([pipeline.base] if pipeline.base is not None else []) + pipeline.stages
            with contextlib.ExitStack() as stack:
                yield [stack.enter_context(use_backend(stage, backend, threads=threads)) for stage in stages]
            return
        backend = resolve_backend(backend, pipeline.unet)
        if backend == "torch":
            yield pipeline.unet
            return
        networks = step_networks(pipeline)
        if backend == "onnx":
            if pipeline.unet.device.type != "cpu":
                raise ValueError("the onnx backend runs on the CPU: use --device cpu (or the torch backend on a GPU)")
            if any(network.dtype != torch.float32 for network in networks.values()):
                raise ValueError("the onnx backend runs in float32: load the pipeline in float32 (--dtype float32)")

        def stand_in(name: str, network: torch.nn.Module) -> Any:
            if backend == "bf16":
                return AutocastUNet(network)
            if name == "unet":
                return OnnxUNet.from_unet(network, threads=threads)
            return _DeferredOnnxUNet(network, threads=threads)

        formats = {name: _memory_format(network) for name, network in networks.items()}
        try:
            stand_ins = {name: stand_in(name, network) for name, network in networks.items()}
            vars(pipeline).update(stand_ins)
            yield stand_ins["unet"]
        finally:
            vars(pipeline).update(networks)
            if backend == "bf16":
                for name, network in networks.items():
                    network.to(memory_format=formats[name])


def _memory_format(network: torch.nn.Module) -> torch.memory_format:
    """`torch.channels_last` where `network`'s 4-D weights are stored channels-last, else `torch.contiguous_format`
    (weights that are both, such as 1x1 convolutions', do not tell)."""
    for parameter in network.parameters():
        if parameter.dim() == 4 and not parameter.is_contiguous():
            if parameter.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
    return torch.contiguous_format
