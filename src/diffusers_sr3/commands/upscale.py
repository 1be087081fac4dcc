"""`sr3 upscale`: super-resolve image files, folders and globs, untiled when they fit memory, else in seamless tiles."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image

if TYPE_CHECKING:
    import torch

from ..defaults import (
    BACKENDS,
    DEFAULT_MAX_TILE_PIXELS,
    DETAIL_ARGUMENTS,
    DETAIL_STEPS,
    FIDELITY_STEPS,
    MIN_WINDOWS_ACROSS,
    SELF_ENSEMBLE_SIZE,
    evaluations_per_crop,
)
from ..disk_format import check_format
from ..image_io import ImageFacts, find_image_sources, input_folders, inspect_image, open_alpha, open_image
from ..image_metadata import InputMetadata, read_metadata, save_options
from ..pretrained import DEFAULT_DETAIL_OPTIONS, DEFAULT_DETAIL_WINDOW_SIZE, DEFAULT_STEPS
from ..training.output_lock import hold_folders_for_reading
from .common import (
    DTYPES,
    add_model_arguments,
    add_save_process_argument,
    atomic_file,
    check_destinations,
    check_dtype_runs,
    check_file_destination,
    destination_clash,
    image_generators,
    in_option_words,
    load_pipeline,
    nearest_entry,
    not_a_folder,
    options_given,
    whole_number,
)

# Shown by `sr3 upscale --help`; from benchmarks/upscale.py (README "Speed": model, machine and conditions).
EXPECTED_TIME = """\
expected time per output megapixel (a 256x256 input upscaled to 1024x1024 is 1 megapixel), the packaged x4
model (photos_x4 network), measured by benchmarks/upscale.py on 2 cores of an Intel Xeon with AMX:
  about {startup} s start-up (Python, imports, model load), plus per megapixel and network evaluation
  {bf16_eval} s with the default backend (bf16 autocast on CPUs with AMX), {fp32_eval} s in float32
  (--backend torch; CPUs with AVX512-BF16 but no AMX, such as AMD Zen 4, run bf16 about 1.5x faster than
  float32; AVX2-only CPUs run float32, and older or busier ones more slowly):
  default (fidelity mode, {fidelity_steps}): about {bf16_fidelity:.0f} s for 1 megapixel
    ({fp32_fidelity:.0f} s in float32); --self-ensemble: {ensemble} times the evaluations, about {bf16_ensemble:.0f} s;
  --mode detail ({steps} steps at strength {strength:g}, guided: {detail_evaluations} network evaluations): about
    {bf16_detail:.0f} s ({fp32_detail:.0f} s in float32); in {window_size}-pixel windows (the packaged model's
    default on images {window_minimum} pixels or more a side) about {windows_factor:g} times that
  memory: up to 1 megapixel runs untiled (peak 1.4 GB measured); larger images run in tiles, which bound
    the network's activations (--max-tile-pixels), not the full-size images: those cost about {pixel_bytes} bytes
    per output pixel whatever the tiles (fidelity mode; about twice that with detail mode's windows; times
    --batch-size): 1.6 GB for a 3.3-megapixel output, 2.8 GB for 12, about 26 GB for 192
  GPU: well under 1 s per megapixel per step (an estimate from the network's FLOPs, not measured:
    run benchmarks/gpu_check.sh on a GPU)
The progress bar counts every tile of every step (and detail mode's windows) and shows the remaining time from
the first second.
"""
# Fitted to benchmarks/results/upscale/fidelity-one-step/now.md (the idle machine, end to end at 1 and 3.3 megapixels:
# 5.0 / 6.6 s by default, 6.1 / 10.4 s in float32, 8.3 / 18.6 s with the self-ensemble).
STARTUP_SECONDS = 4
# JPEG, WebP and AVIF quality: Pillow's defaults (75 with 4:2:0 chroma, 80, 75 with 4:2:0) discard much of what SR3
# restores (benchmarks/output_formats.py measures it; AVIF: 37.6 dB at its defaults, 42.9 at 95 and 4:4:4, on a
# 256-pixel photo crop).
DEFAULT_QUALITY = 95
BF16_SECONDS_PER_MEGAPIXEL_PER_EVALUATION = 0.6
FP32_SECONDS_PER_MEGAPIXEL_PER_EVALUATION = 1.9
# Detail mode in training-sized windows against the whole image only, end to end with the default backend:
# 20.0 / 11.4 s (benchmarks/results/upscale/detail-windows-bf16/now.md; 26.5 / 12.5 s before small GroupNorms ran in
# NCHW, before.md; in float32 on an AMD EPYC 1.4, detail-windows/).
WINDOWS_TIME_FACTOR = 1.75
# Memory of the full-size tensors (noisy image, condition, blended prediction, scheduler temporaries, output) per
# output pixel in fidelity mode, on top of the tile budget's activations: peaks of 1.58 and 2.75 GB at 3 and 12
# megapixels out (/usr/bin/time, the packaged model, default --max-tile-pixels, which does not change them).
BYTES_PER_OUTPUT_PIXEL = 140
# What the peak grows by per output pixel at the least (the slope between two sizes, without the model, activations
# and Python that BYTES_PER_OUTPUT_PIXEL spreads over them), at float32: 123 bytes in fidelity mode with the packaged
# model (peaks of 1.57 and 2.65 GB at 3.2 and 11.9 megapixels out), 128 in detail mode without windows and 263 with
# them with the tests' tiny model (/usr/bin/time). The memory check estimates with it, so that an image it refuses
# cannot fit.
MIN_BYTES_PER_OUTPUT_PIXEL = 120
# Linux's memory facts: the machine's, and those of the cgroup this process runs in (a container: Docker, Hub Spaces),
# whose limit MemAvailable does not know.
MEMINFO = "/proc/meminfo"
CGROUP_ROOT = "/sys/fs/cgroup"
# The cgroups this process is in, one line per hierarchy: "0::<path>" (v2), "<id>:<controllers>:<path>" (v1), each path
# under that hierarchy's folder in CGROUP_ROOT (in a cgroup namespace, a container's, the path is "/").
PROC_SELF_CGROUP = "/proc/self/cgroup"
# Per cgroup version (v2, then v1's memory controller): the hierarchy's folder in CGROUP_ROOT, the limit, the usage,
# and the statistics with the usage's page cache (active and inactive, both reclaimed by the kernel before it kills
# for the limit) under those names.
_CGROUP_MEMORY_FILES = (
    ("", "memory.max", "memory.current", "memory.stat", ("active_file", "inactive_file")),
    (
        "memory",
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "memory.stat",
        ("total_active_file", "total_inactive_file"),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    bf16, fp32 = BF16_SECONDS_PER_MEGAPIXEL_PER_EVALUATION, FP32_SECONDS_PER_MEGAPIXEL_PER_EVALUATION
    strength = DEFAULT_DETAIL_OPTIONS["strength"]
    detail_evaluations = evaluations_per_crop("detail", DEFAULT_STEPS, strength, guided=True)  # its guide runs too
    parser.epilog = EXPECTED_TIME.format(
        startup=STARTUP_SECONDS,
        bf16_eval=bf16,
        fp32_eval=fp32,
        fidelity_steps=f"{FIDELITY_STEPS} step" + ("s" if FIDELITY_STEPS != 1 else ""),
        bf16_fidelity=STARTUP_SECONDS + bf16 * FIDELITY_STEPS,
        fp32_fidelity=STARTUP_SECONDS + fp32 * FIDELITY_STEPS,
        ensemble=SELF_ENSEMBLE_SIZE,
        bf16_ensemble=STARTUP_SECONDS + bf16 * FIDELITY_STEPS * SELF_ENSEMBLE_SIZE,
        bf16_detail=STARTUP_SECONDS + bf16 * detail_evaluations,
        fp32_detail=STARTUP_SECONDS + fp32 * detail_evaluations,
        steps=DEFAULT_STEPS,
        strength=strength,
        detail_evaluations=detail_evaluations,
        window_size=DEFAULT_DETAIL_WINDOW_SIZE,
        window_minimum=MIN_WINDOWS_ACROSS * DEFAULT_DETAIL_WINDOW_SIZE,
        windows_factor=WINDOWS_TIME_FACTOR,
        pixel_bytes=BYTES_PER_OUTPUT_PIXEL,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument(
        "--output",
        required=True,
        help="output folder: <name>_sr.png per input, in the input's subfolder for files found in a folder input "
        "(or a file name for a single input, its format from the extension: .png, .jpg, .webp, .tif, ...). "
        "Outputs keep the input's EXIF (camera, dates; not its orientation, which is applied, nor its GPS location) "
        "and its DPI times the upscale factor, and are tagged with the ICC profile their sRGB values are in",
    )
    add_model_arguments(
        parser,
        steps_help=f"refinement steps (default: the model's own, in fidelity mode its fidelity_steps: "
        f"{FIDELITY_STEPS} for the packaged model and models saved without one; in detail mode its detail_steps: "
        f"{DEFAULT_STEPS} for the packaged model, {DETAIL_STEPS} for models saved without one)",
        default_model="the x4 photo model that ships with the package",
        seed_note=" (in detail mode, each file's line ends with its seed)",
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "detail", "fidelity"),
        default="auto",
        help="auto (default): fidelity for models that predict the clean image (the packaged one), else detail; "
        "detail: iterative refinement (--steps network evaluations; sharp, plausible texture); fidelity: "
        "deterministic DDIM from the noise's mean in the model's fidelity_steps unless --steps: its estimate of "
        "the average answer (highest PSNR, smoother texture, faster; models that predict the clean image)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=None,
        help="detail mode with a DDIM sampler (the packaged model's): 0 deterministic from the starting noise, up to "
        "1 fresh noise at every step (default: the model's own detail_eta, "
        f"{DEFAULT_DETAIL_OPTIONS['eta']:g} for the packaged model, else 0; on the packaged model eta 1 scored a "
        "higher PSNR and a lower FID than 0 with a little less edge energy: docs/quality.md)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="detail mode: scale of the starting noise (default 1; below 1 trades texture for fidelity)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="detail mode: how much of the refinement runs, in (0, 1]; 1 refines from pure noise. Below 1 it "
        "starts from the fidelity answer, noised part of the way: detail on top of fidelity, less invented the "
        "lower it is (models that predict the clean image). Default: the model's own detail_strength, "
        f"{DEFAULT_DETAIL_OPTIONS['strength']:g} for the packaged model, 1 for models saved without one",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="detail mode, models saved with a guidance UNet (the packaged one): autoguidance scale; each step "
        "extrapolates the model's prediction away from its weaker guide's, for sharper texture at twice the "
        "evaluations per step (default: the model's own setting; 1 turns guidance off)",
    )
    parser.add_argument(
        "--parallel-guidance-weight",
        type=float,
        default=None,
        help="detail mode, guided: weight of the guidance update's part along the model's own prediction, which "
        "only scales it, raising contrast and drawing dark outlines (projected guidance); below 1 draws fewer "
        "outlines and less edge contrast (default: the model's own setting; 1 is plain autoguidance)",
    )
    parser.add_argument(
        "--window-size",
        type=whole_number(0),
        default=None,
        help="detail mode: also run the network on windows of this many pixels at every step and take the fine "
        "texture from them, the coarse structure from the whole image: the texture a network trained on small "
        "crops draws on them (use its training crop size, 64 for the packaged model), at about twice the network "
        f"work; images under {MIN_WINDOWS_ACROSS} windows on their shorter side run whole (default: the model's own "
        "detail_window_size; 0 turns windows off)",
    )
    parser.add_argument(
        "--self-ensemble",
        action="store_true",
        help=f"fidelity mode: average the answers for the {SELF_ENSEMBLE_SIZE} flips and quarter-turns of the input "
        f"(higher PSNR and SSIM, +0.05 to +0.15 dB on photos, for {SELF_ENSEMBLE_SIZE} times the time)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images of one size refined together")
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="tile size at the output resolution (default: the whole image when it fits the memory budget, else "
        "the fewest evenly sized tiles that do)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="tile overlap in pixels, at most the tile size minus the model's downsampling factor (default: half the "
        "model's sample_size; a quarter of --tile-size when given)",
    )
    parser.add_argument(
        "--tile-batch-size", type=int, default=None, help="tiles run together (default: as many as fit the budget)"
    )
    parser.add_argument(
        "--max-tile-pixels",
        type=int,
        default=DEFAULT_MAX_TILE_PIXELS,
        help=f"memory budget of the network's activations: network-grid pixels per evaluation (default "
        f"{DEFAULT_MAX_TILE_PIXELS}, about 1 GB with the photos_x4 network); the full-size images cost about "
        f"{BYTES_PER_OUTPUT_PIXEL} bytes per output pixel on top, whatever it is",
    )
    parser.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start images whose full-size images need more memory than is available (MemAvailable on Linux, the "
        "free memory of a CUDA device), which are refused before any work by default: with swap, or memory that "
        "will be freed meanwhile",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="runtime of the network: auto (default): bf16 where the hardware multiplies bfloat16 natively (CPUs "
        "with AMX or AVX512-BF16, recent GPUs), else torch; torch: PyTorch at --dtype; bf16: PyTorch under bfloat16 "
        "autocast, channels-last (about 3x faster per evaluation on AMX CPUs, 1.5x end to end with AVX512-BF16, "
        "outputs within 1/255 of float32); onnx: ONNX "
        'Runtime fp32 on the CPU, exported once and cached (pip install -e ".[onnx]")',
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: one per core that the tasks of other processes runnable now leave free, at least "
        "1; one per core on an idle machine: torch's threads wait for each other, so on a busy machine fewer are "
        "faster; results can differ by a rounding step between counts: give the same count where reruns must match "
        "bit for bit)",
    )
    parser.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        help=f"JPEG, WebP and AVIF quality, 1-100 (default {DEFAULT_QUALITY}; JPEG and AVIF keep colour at full "
        "resolution). Pillow's defaults (75, 80 and 75) discard much of the restored detail; PNG and TIFF are "
        "lossless",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no per-file lines")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    add_save_process_argument(
        parser,
        "also write, beside each result, a PNG named after it with _process (a_sr_process.png beside a_sr.png; "
        "x_process.png for --output x.jpg): the condition and N noisy images along the refinement (default N: 8)",
    )


def _writable_extensions() -> set:
    """File extensions of the formats this Pillow can write (`.avif`, `.jfif`, `.qoi`, ... where built in)."""
    return {extension for extension, name in PIL.Image.registered_extensions().items() if name in PIL.Image.SAVE}


# Image formats this Pillow may not write, beside those it reads only (`.psd`, `.pcx`, ...): an --output ending in one
# names an image file to write, not a folder to make.
_IMAGE_EXTENSIONS = (".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".exr", ".hdr", ".svg", ".dng", ".raw")


def _check_output_format(output: str) -> None:
    """Refuse an --output named as an image of a format this Pillow cannot write (`out.heic`): it was made a folder
    of that name, with the result inside as `<input>_sr.png`, without a word."""
    extension = os.path.splitext(output)[1].lower()
    image_extensions = set(PIL.Image.registered_extensions()) | set(_IMAGE_EXTENSIONS)
    if extension in image_extensions and extension not in _writable_extensions() and not os.path.isdir(output):
        raise ValueError(
            f"--output {output}: this Pillow cannot write {extension} images; name a .png, .jpg, .webp or .tif "
            "file, or a folder"
        )


def _names_a_file(output: str) -> bool:
    """Whether --output names one output file (an extension Pillow writes, and no existing folder of that name)."""
    return os.path.splitext(output)[1].lower() in _writable_extensions() and not os.path.isdir(output)


def _output_path(output: str, relative: str, to_file: bool) -> str:
    """Where the result of the input named `relative` (below its folder input, see `find_image_sources`) goes."""
    if to_file:
        return output
    return os.path.join(output, os.path.splitext(relative)[0] + "_sr.png")


def lossy_options(image_format: str, quality: int) -> Dict[str, Any]:
    """Pillow save options of the lossy formats: `quality`, and JPEG's and AVIF's colour kept at full resolution
    (4:4:4)."""
    if image_format == "JPEG":
        return {"quality": quality, "subsampling": 0}
    if image_format == "AVIF":
        return {"quality": quality, "subsampling": "4:4:4"}
    if image_format == "WEBP":
        return {"quality": quality}
    return {}


def save_atomically(
    image: PIL.Image.Image,
    destination: str,
    quality: int = DEFAULT_QUALITY,
    overwrite: bool = True,
    metadata: Optional[InputMetadata] = None,
) -> None:
    """Write `image` to `destination` through a temporary file in the same folder, then rename it into place.

    An interrupted or failing write leaves `destination` as it was (absent, or the previous file), never a
    truncated image; the rename is atomic on one filesystem. JPEG and WebP are written at `quality`, JPEG without
    chroma subsampling. Without `overwrite`, a file already at `destination` (one another run wrote meanwhile
    included) is kept and FileExistsError names it (`atomic_file`). A file or a dangling link where a folder of
    `destination` should be is refused with NotADirectoryError naming it.
    """
    folder = os.path.dirname(destination) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError, FileNotFoundError):
        # What makedirs names is the folder it tried to make, not the file (or dangling link) in the way; below a
        # dangling link it fails with FileNotFoundError.
        blocking = nearest_entry(folder)
        if os.path.isdir(blocking):
            raise
        raise NotADirectoryError(f"cannot write {destination}: {not_a_folder(blocking)}") from None
    extension = os.path.splitext(destination)[1].lower()
    image_format = PIL.Image.registered_extensions().get(extension, "PNG")
    with atomic_file(destination, overwrite) as stream:
        options = {**lossy_options(image_format, quality), **save_options(metadata, image_format, image)}
        image.save(stream, format=image_format, **options)


def _process_path(destination: str) -> str:
    return os.path.splitext(destination)[0] + "_process.png"


def describe_settings(
    mode: str, steps: int, detail_options: Dict[str, Any], sampler: str, evaluations: int, self_ensemble: bool
) -> str:
    """One line saying how the images are sampled, e.g. `detail mode: 10 DDIMScheduler steps, strength 0.6, eta 1,
    guidance scale 2 (16 network evaluations per tile)`."""
    if mode == "fidelity":
        how = f"fidelity mode: {steps} deterministic DDIM steps" + (
            f", averaged over {SELF_ENSEMBLE_SIZE} flips and quarter-turns" if self_ensemble else ""
        )
        evaluations *= SELF_ENSEMBLE_SIZE if self_ensemble else 1
    else:
        named = [
            f"{name.replace('_', ' ')} {value:g}"
            for name, value in detail_options.items()
            # Unguided, or on the whole image only: nothing to say.
            if value is not None
            and not (name == "guidance_scale" and value == 1)
            and not (name == "parallel_guidance_weight" and (value == 1 or detail_options["guidance_scale"] == 1))
            and not (name == "window_size" and not value)
        ]
        how = f"detail mode: {steps} {sampler} steps" + "".join(f", {setting}" for setting in named)
    return f"{how} ({evaluations} network evaluations per tile)"


def _batches(keys: Sequence[Any], batch_size: int) -> List[Tuple[int, int]]:
    """`(start, stop)` ranges of consecutive images of one key (their size and bit depth), at most `batch_size`
    long."""
    ranges, start = [], 0
    for index in range(1, len(keys) + 1):
        if index == len(keys) or index - start == batch_size or keys[index] != keys[start]:
            ranges.append((start, index))
            start = index
    return ranges


# Output formats that store transparency (JPEG has none; GIF's is one bit). AVIF where this Pillow writes it
# (since Pillow 11.2): RGBA and LA go through `lossy_options` as they are.
ALPHA_EXTENSIONS = (".png", ".webp", ".tif", ".tiff") + tuple(
    extension for extension in (".avif",) if extension in _writable_extensions()
)
# Output formats that store 16-bit gray: a 16-bit scan keeps its smooth gradients.
SIXTEEN_BIT_EXTENSIONS = (".png", ".tif", ".tiff")


def _keeps_alpha(destination: str) -> bool:
    return os.path.splitext(destination)[1].lower() in ALPHA_EXTENSIONS


def _keeps_16bit(destination: str) -> bool:
    return os.path.splitext(destination)[1].lower() in SIXTEEN_BIT_EXTENSIONS


def _mode_for(prediction_type: Optional[str]) -> str:
    """What --mode auto picks: fidelity for models that predict the clean image, else detail."""
    return "fidelity" if prediction_type in ("sample", "v_prediction") else "detail"


class _SavedConfigs:
    """The JSON configs of a model (a folder, a Hub repo id, or None: the packaged model) that a run reads before it
    loads the model, each read at most once.

    A Hub repo's come through huggingface_hub with the settings the load uses (its token, cache and offline mode):
    online the first read asks the Hub for the current revision, so a stale cache is never read; the others take the
    same commit, from the cache where it holds them, without another request.
    """

    def __init__(self, model: Optional[str]) -> None:
        from ..pretrained import default_model_path, resolve_packaged_name

        self.model = default_model_path() if model is None else resolve_packaged_name(model)
        self._configs: Dict[str, Optional[Dict[str, Any]]] = {}
        self._revision: Optional[str] = None  # the commit of the first Hub read
        self._hub_failed = False

    def get(self, relative_path: str) -> Optional[Dict[str, Any]]:
        """The config at `relative_path` (`/`-separated) in the model; None where it cannot be read before loading
        (no such file or repo, offline and not cached, the Hub unreachable, no JSON object): the load then reports
        the problem in its own words."""
        if relative_path not in self._configs:
            if os.path.isdir(self.model):
                path = os.path.join(self.model, *relative_path.split("/"))
            else:
                path = self._download(relative_path)
            self._configs[relative_path] = None if path is None else _read_config(path)
        return self._configs[relative_path]

    def _download(self, relative_path: str) -> Optional[str]:
        """The cached file of `relative_path` in the Hub repo `model`, downloaded where needed; None on failure."""
        if self._hub_failed:
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(self.model, relative_path, revision=self._revision)
        except LocalEntryNotFoundError:  # offline or unreachable, and not cached: so is the rest
            self._hub_failed = True
            return None
        except EntryNotFoundError:  # this file alone
            return None
        # Whatever else (no repo id, no such repo, transport errors of any HTTP library): the load tells it, and
        # further reads would only repeat the request.
        except Exception:
            self._hub_failed = True
            return None
        snapshot = Path(path).parents[relative_path.count("/")].name
        if self._revision is None and re.fullmatch("[0-9a-f]{40}", snapshot):
            self._revision = snapshot
        return path


def _read_config(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in the file at `path`; None where it cannot be read or holds no object."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _saved_mode(configs: _SavedConfigs) -> Optional[str]:
    """The mode --mode auto picks for the model of `configs`, read from its scheduler config before loading it (None:
    unknown)."""
    config = configs.get("scheduler/scheduler_config.json")
    return None if config is None else _mode_for(config.get("prediction_type"))


def _saved_unet(configs: _SavedConfigs) -> Optional[Any]:
    """A stand-in with the `config` and `downsampling_factor` of the UNet of the model of `configs`, read from its
    config before loading it (None: unknown)."""
    from diffusers.configuration_utils import FrozenDict

    from ..models.unet_sr3 import SR3UNet2DModel

    config = configs.get("unet/config.json")
    if config is None:
        return None
    unet = SimpleNamespace(config=FrozenDict(config))
    try:
        return SimpleNamespace(config=unet.config, downsampling_factor=SR3UNet2DModel.downsampling_factor.fget(unet))
    except (AttributeError, TypeError):
        return None


def _check_tile_options(args: argparse.Namespace, network: Optional[Any] = None) -> None:
    """Refuse tile options no model can run, and, given the UNet (or a stand-in), those it cannot."""
    for flag, value in (("--tile-size", args.tile_size), ("--tile-batch-size", args.tile_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.max_tile_pixels < 1:
        raise ValueError(f"--max-tile-pixels must be at least 1, got {args.max_tile_pixels}")
    if args.tile_overlap is not None and args.tile_overlap < 0:
        raise ValueError(f"--tile-overlap must be at least 0, got {args.tile_overlap}")
    if network is None:
        return
    from ..tiling import largest_overlap

    factor = network.downsampling_factor
    if args.tile_size is not None and args.tile_size % factor:
        raise ValueError(f"--tile-size {args.tile_size} is not a multiple of the model's downsampling factor {factor}")
    limit = largest_overlap(network, args.tile_size, args.max_tile_pixels)
    if args.tile_overlap is not None and args.tile_overlap > limit:
        tiles = "--tile-size" if args.tile_size is not None else "the largest tile --max-tile-pixels allows"
        raise ValueError(
            f"--tile-overlap {args.tile_overlap} is too large: at most {limit} ({tiles} minus the model's "
            f"downsampling factor {factor})"
        )


def _check_mode_options(args: argparse.Namespace, mode: str) -> None:
    """Refuse options that do not apply to `mode`."""
    if mode == "fidelity":
        refuse_detail_options({name: getattr(args, name) for name in DETAIL_ARGUMENTS})
    if mode == "fidelity" and args.scheduler is not None:
        raise ValueError(
            "--scheduler applies to detail mode (--mode detail): fidelity mode always runs deterministic DDIM on the "
            "model's schedule"
        )
    if args.self_ensemble and mode != "fidelity":
        raise ValueError("--self-ensemble averages fidelity answers: use it with --mode fidelity")


def refuse_detail_options(values: Dict[str, Any]) -> None:
    """Refuse, for fidelity mode, detail mode's options where any was given (`sr3 sample` checks each SR stage's).

    Args:
        values: each detail option's value by its argparse dest, in the order the message names them; None where
            not given.
    """
    if any(value is not None for value in values.values()):
        flags = [f"--{name.replace('_', '-')}" for name in values]
        raise ValueError(f"{', '.join(flags[:-1])} and {flags[-1]} apply to detail mode")


def check_detail_values(strength: Optional[float], eta: Optional[float], temperature: Optional[float]) -> None:
    """Refuse a --strength, --eta or --temperature that no model takes (`sr3 sample` checks each SR stage's).

    Args:
        strength, eta, temperature: the options' values; None where not given.
    """
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(f"--strength must lie in (0, 1], got {strength:g}")
    # Above 1, DDIM's step noise outgrows what the schedule leaves at the next step: NaN after the whole run.
    if eta is not None and not 0 <= eta <= 1:
        raise ValueError(f"--eta must lie in [0, 1], got {eta:g}")
    # 0 is meaningful: the mean of the starting noise, as fidelity mode starts.
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ValueError(f"--temperature must be finite and at least 0, got {temperature:g}")


def _check_parallel_guidance_weight(args: argparse.Namespace, guidance_scale: Optional[float]) -> None:
    """Refuse --parallel-guidance-weight where the run's `guidance_scale` (the command line's, else the model's own;
    None while unknown) is 1: unguided, the weight would be ignored without a word."""
    weight = args.parallel_guidance_weight
    if weight is not None and weight != 1 and guidance_scale == 1:
        raise ValueError(
            f"--parallel-guidance-weight {weight:g} weighs guidance, which guidance scale 1 turns off: leave it out, "
            "or guide with a --guidance-scale other than 1"
        )


def _check_prediction_type(strength: Optional[float], mode: str, prediction_type: str) -> None:
    """Refuse fidelity mode, and --strength below 1, for a model that does not predict the clean image, before the
    pipeline refuses them in its own arguments' words (`mode='detail'`). (Such a model cannot be saved with its
    own strength below 1: loading refuses it.) `sr3 sample` checks each SR stage's.

    Args:
        strength: --strength; None where not given.
        mode: the mode the model runs, "detail" or "fidelity".
        prediction_type: what the model's scheduler says it predicts.
    """
    if prediction_type in ("sample", "v_prediction"):
        return
    if mode == "fidelity":
        feature, remedy = "--mode fidelity", "--mode detail"
    elif strength is not None and strength < 1:
        feature, remedy = f"--strength {strength:g}", "--strength 1"
    else:
        return
    raise ValueError(
        f"{feature} needs a model that predicts the clean image (prediction_type 'sample' or 'v_prediction'); "
        f"this model predicts {prediction_type!r}: use {remedy}"
    )


def _plan_writes(inputs: Sequence[str], output: str) -> Tuple[List[str], List[str], int]:
    """The input files, their destinations, and how many files were left out as this run's own outputs.

    Refuses a file-like `output` for several inputs and two inputs written to one file (see `destination_clash`).
    """
    _check_output_format(output)
    sources = find_image_sources(inputs)
    to_file = _names_a_file(output)
    if to_file and len(sources) > 1:
        raise ValueError(f"--output {output} names one file, but {len(sources)} images were given: give a folder")
    destinations = [_output_path(output, relative, to_file) for _, relative in sources]
    # An earlier run's results inside an input folder (`sr3 upscale m --output m` again) are not new inputs.
    written_to = {}
    for index, destination in enumerate(destinations):
        for written in (destination, _process_path(destination)):
            written_to.setdefault(os.path.realpath(written), set()).add(index)
    kept = [
        index for index, (path, _) in enumerate(sources) if not written_to.get(os.path.realpath(path), set()) - {index}
    ]
    paths = [sources[index][0] for index in kept]
    destinations = [destinations[index] for index in kept]
    clash = destination_clash(zip(paths, destinations))
    if clash is not None:
        raise ValueError(
            f"{clash}; rename one of them, or upscale them in separate runs with separate --output folders"
        )
    return paths, destinations, len(sources) - len(kept)


def _notes(path: str, facts: ImageFacts, destination: str) -> List[str]:
    """What the written result loses of the input, one line each."""
    notes = []
    extension = os.path.splitext(destination)[1].lower()
    if facts.frames > 1:
        notes.append(f"{path} has {facts.frames} frames: only the first is upscaled")
    if facts.transparent and not _keeps_alpha(destination):
        notes.append(
            f"{path} has transparency, which {extension} cannot store: it was dropped, transparent areas show the "
            f"colour stored under them (often black); write {', '.join(ALPHA_EXTENSIONS)} to keep it"
        )
    if facts.sixteen_bit and not _keeps_16bit(destination):
        notes.append(f"{path} is 16-bit; {extension} holds 8 bits: write .png or .tif to keep 16")
    if facts.sixteen_bit_colour:
        notes.append(f"{path} is 16-bit colour, which Pillow reads at 8 bits: upscaled and written at 8 bits")
    return notes


def _to_pil(array: np.ndarray) -> PIL.Image.Image:
    """`(H, W, 3)` in [0, 1] -> 8-bit RGB, rounded as the pipeline's own PIL output is."""
    return PIL.Image.fromarray(np.rint(array * 255).astype(np.uint8))


def _gray16(array: np.ndarray) -> PIL.Image.Image:
    """`(H, W, 3)` in [0, 1] -> 16-bit gray (`I;16`): the luma of the network's answer, with PIL's `L` weights."""
    luma = array[..., 0] * 0.299 + array[..., 1] * 0.587 + array[..., 2] * 0.114
    return PIL.Image.fromarray(np.rint(np.clip(luma, 0, 1) * 65535).astype(np.uint16))


class NotEnoughMemoryError(ValueError):
    """An image (or a batch) whose full-size images alone need more memory than the machine has available."""


def available_memory(device: torch.device) -> Optional[Tuple[int, str]]:
    """`(bytes, where)` the refinement's full-size images can take on `device`, or None where it cannot be told.

    They live on the pipeline's device: on a CUDA device its free memory (`torch.cuda.mem_get_info`) and what
    PyTorch's caching allocator holds unused (freed by this process, handed out again before any new memory); on the
    CPU Linux's MemAvailable (what can be allocated without swapping; swap is not counted), or less where a cgroup
    memory limit (a container's, a Slurm job's: this process's cgroup under `CGROUP_ROOT`, or an ancestor's) leaves
    less. Other devices and systems, or a /proc/meminfo
    that cannot be read, give None: no check.
    """
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free, f"free on {device}"
    if device.type != "cpu":
        return None
    available = None
    try:
        with open(MEMINFO, encoding="ascii") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name == "MemAvailable":
                    available = int(value.split()[0]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        return None
    room = _cgroup_room(CGROUP_ROOT)
    if room is not None and room < available:
        return room, "available in this container"
    return available, "available"


def _cgroup_room(root: str) -> Optional[int]:
    """Bytes the memory limits of this process's cgroup and its ancestors (in the hierarchy at `root`) leave: the
    least, over the cgroups with a limit, of the limit less the usage, not counting the page cache in it; None
    without a limit (`max`), or where none can be read. The process's cgroup is the one `PROC_SELF_CGROUP` names,
    or the hierarchy's top where that folder does not exist (as from inside a cgroup namespace)."""
    own = _own_cgroups()
    for hierarchy, limit_file, usage_file, stat_file, cache_names in _CGROUP_MEMORY_FILES:
        top = os.path.normpath(os.path.join(root, hierarchy))
        folder = os.path.normpath(os.path.join(top, own.get(hierarchy, "/").lstrip("/")))
        if not folder.startswith(top + os.sep) or not os.path.isdir(folder):
            folder = top
        rooms = []
        while True:
            room = _room_in(folder, limit_file, usage_file, stat_file, cache_names)
            if room is not None:
                rooms.append(room)
            if folder == top:
                break
            folder = os.path.dirname(folder)  # a parent's limit binds its children too
        if rooms:
            return min(rooms)
    return None


def _own_cgroups() -> Dict[str, str]:
    """This process's cgroup path per `_CGROUP_MEMORY_FILES` hierarchy folder (`""`: v2, `"memory"`: v1's memory
    controller), from `PROC_SELF_CGROUP`; empty where it cannot be read."""
    paths = {}
    try:
        with open(PROC_SELF_CGROUP, encoding="utf-8") as handle:
            for line in handle:
                hierarchy_id, _, rest = line.rstrip("\n").partition(":")
                controllers, _, path = rest.partition(":")
                if hierarchy_id == "0" and not controllers:
                    paths[""] = path
                elif "memory" in controllers.split(","):
                    paths["memory"] = path
    except (OSError, ValueError):
        pass
    return paths


def _room_in(
    folder: str, limit_file: str, usage_file: str, stat_file: str, cache_names: Tuple[str, ...]
) -> Optional[int]:
    """What the limit of the cgroup at `folder` leaves (see `_cgroup_room`); None without a limit or its files."""
    try:
        with open(os.path.join(folder, limit_file), encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, usage_file), encoding="ascii") as handle:
            usage = int(handle.read().strip())
        limit = int(limit)
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        with open(os.path.join(folder, stat_file), encoding="ascii") as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name in cache_names:
                    cache += int(value)
    except (OSError, ValueError):
        pass
    return max(limit - max(usage - cache, 0), 0)


def full_size_bytes(
    output_size: Tuple[int, int], images: int = 1, windows: bool = False, dtype: Optional[torch.dtype] = None
) -> int:
    """The least memory the full-size images of a refinement of `images` outputs of `output_size` `(width, height)`
    take: `MIN_BYTES_PER_OUTPUT_PIXEL` per output pixel, twice that with detail mode's windows, half at a 16-bit
    `dtype` (None: float32). The model, the network's activations (the tile budget) and Python come on top:
    leaving them out keeps the estimate below the real need, so an image it refuses cannot fit."""
    width, height = output_size
    per_pixel = MIN_BYTES_PER_OUTPUT_PIXEL * (2 if windows else 1) * (4 if dtype is None else dtype.itemsize) // 4
    return per_pixel * width * height * images


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


def check_memory(
    paths: Sequence[str],
    batch_keys: Sequence[Tuple[Any, ...]],
    batch_size: int,
    upscale_factor: int,
    window_size: int,
    available: Tuple[int, str],
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Refuse, before any image is refined, the first batch whose full-size images ([`full_size_bytes`]) need more
    than `available` (from [`available_memory`]): batches of up to `batch_size` consecutive inputs of one key in
    `batch_keys`, the keys the run batches by, whose first item is the input's `(width, height)`.

    `window_size` is detail mode's (0 in fidelity mode or without windows); images under `MIN_WINDOWS_ACROSS`
    windows on their shorter side run whole, at the fidelity cost. `dtype` is the pipeline's (`--dtype`).

    Raises:
        NotEnoughMemoryError: one line naming the file, its output size, the need, what is available and the remedy.
    """
    free, where = available
    for start, stop in _batches(batch_keys, batch_size):
        width, height = (length * upscale_factor for length in batch_keys[start][0])
        windows = bool(window_size) and min(width, height) >= MIN_WINDOWS_ACROSS * window_size
        need = full_size_bytes((width, height), stop - start, windows, dtype)
        if need <= free:
            continue
        images = f" (+{stop - start - 1} of its size, refined together)" if stop - start > 1 else ""
        remedies = ["a smaller input"] + (["--batch-size 1"] if stop - start > 1 else [])
        remedies += ["--window-size 0 (detail mode's windows double it)"] if windows else []
        raise NotEnoughMemoryError(
            f"{paths[start]}{images}: a {width}x{height} output needs at least {_gigabytes(need)} of memory for its "
            f"full-size images, {_gigabytes(free)} {where}: try {', or '.join(remedies)}; --no-memory-check starts "
            "it anyway (with swap, or memory freed meanwhile)"
        )


def _memory_settings(
    args: argparse.Namespace, mode: Optional[str], pipeline_config: Optional[Dict[str, Any]]
) -> Optional[Tuple[int, int]]:
    """`(upscale_factor, window_size)` of a run in `mode`, from the pipeline's config and the command line (as
    `SR3Pipeline.detail_settings` picks the window size; 0 in fidelity mode); None while either is unknown (a model
    saved before its pipeline recorded the factor tells it once loaded)."""
    factor = None if pipeline_config is None else pipeline_config.get("upscale_factor")
    if mode is None or not isinstance(factor, int):
        return None
    window_size = 0
    if mode == "detail":
        window_size = pipeline_config.get("detail_window_size", 0) if args.window_size is None else args.window_size
    return factor, window_size or 0


def run(args: argparse.Namespace) -> int:
    # A folder that `sr3 prepare` is still writing (`sr3 upscale OUT/lr_16`) would be upscaled in part, and one it
    # stopped writing is unfinished: both are refused, and a prepare into a folder being upscaled, as for `sr3 eval`.
    # So is a dataset below an input folder or glob, or behind a link, which the listing of the inputs holds.
    with hold_folders_for_reading([(folder, "input") for folder in input_folders(args.inputs)], "upscaling it"):
        return _upscale(args)


def _upscale(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..backends import check_bfloat16_runs, default_cpu_threads, resolve_device, use_backend
    from ..detail_windows import window_crops_per_step, windowed_evaluations
    from ..image_processing import process_strip, tensor_to_pil
    from ..pipelines import SR3Pipeline
    from ..progress import UpscaleProgress, bar_options
    from ..tiling import crops_per_step, tiled_super_resolve

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    check_detail_values(args.strength, args.eta, args.temperature)
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must lie in 1-100, got {args.quality}")
    if args.self_ensemble and args.save_process:
        raise ValueError("--save-process draws one refinement: it does not combine with --self-ensemble")
    if args.backend in ("bf16", "onnx") and DTYPES[args.dtype] != torch.float32:
        runs = "a float32 model under bfloat16 autocast" if args.backend == "bf16" else "the model in float32"
        raise ValueError(f"--backend {args.backend} runs {runs}: use --dtype float32, or --backend torch")
    if args.backend == "bf16":
        check_bfloat16_runs(resolve_device(args.device), "--backend bf16", "--backend torch")
    check_dtype_runs(args)
    # Options are checked before any image is decoded or the model loaded (seconds of work, minutes of download),
    # where the mode is known from the model's configs (its folder's, or its Hub repo's).
    configs = _SavedConfigs(args.model)
    for relative_path in ("model_index.json", "unet/config.json"):  # a newer format's keys mean what this cannot know
        config = configs.get(relative_path)
        if config is not None:
            check_format(config, f"{configs.model}/{relative_path}")
    mode = args.mode if args.mode != "auto" else _saved_mode(configs)
    if mode is not None:
        _check_mode_options(args, mode)
    _check_parallel_guidance_weight(args, args.guidance_scale)
    scheduler_config = configs.get("scheduler/scheduler_config.json")
    if mode is not None and scheduler_config is not None:
        _check_prediction_type(args.strength, mode, scheduler_config.get("prediction_type", "epsilon"))
    saved_unet = _saved_unet(configs)
    _check_tile_options(args, saved_unet)
    threads = args.threads
    if threads is not None and threads < 1:
        raise ValueError("--threads must be at least 1")
    if threads is None:
        threads, why = default_cpu_threads()
        if threads < torch.get_num_threads() and not args.quiet:
            # The count follows the load, and results follow the count: a rerun must be told it to match bit for bit.
            print(
                f"{threads} CPU thread(s): {why}; --threads sets them (a rerun matches bit for bit at the same count)",
                file=sys.stderr,
            )
    torch.set_num_threads(threads)
    paths, destinations, skipped = _plan_writes(args.inputs, args.output)
    if skipped and not args.quiet:
        print(f"left out {skipped} file(s) that this run writes (results of an earlier run)", file=sys.stderr)
    single = len(paths) == 1
    writes = list(zip(paths, destinations))
    if args.save_process:
        writes += [(path, _process_path(destination)) for path, destination in writes]
    check_destinations(writes, args.overwrite)
    # A read-only folder, or a file where a folder is needed, fails now, not after the model has run.
    for _, destination in writes:
        check_file_destination(destination, "--output", "out.png")
    # Every file is decoded once before any work, so bad files fail first, and dropped: each image is decoded
    # again when its batch runs, holding one batch in memory, not the whole folder.
    facts = [inspect_image(path) for path in paths]
    for path, fact, destination in zip(paths, facts, destinations):
        for note in _notes(path, fact, destination):
            print(f"note: {note}", file=sys.stderr)
    batch_keys = [(fact.size, fact.sixteen_bit) for fact in facts]  # a batch refines images of one size and depth
    # A run too large for this machine is refused before any refinement: before the model loads where its configs
    # tell the upscale factor and window size, else once it is loaded.
    available = None if args.no_memory_check else available_memory(resolve_device(args.device))
    settings = _memory_settings(args, mode, configs.get("model_index.json"))
    if available is not None and settings is not None:
        check_memory(paths, batch_keys, args.batch_size, *settings, available, DTYPES[args.dtype])
        available = None
    pipeline = load_pipeline(args, SR3Pipeline)
    pipeline.set_progress_bar_config(disable=True)  # our own bar counts steps and tiles
    if mode is None:
        mode = args.mode if args.mode != "auto" else _mode_for(pipeline.scheduler.config.get("prediction_type"))
        _check_mode_options(args, mode)
    if scheduler_config is None:
        _check_prediction_type(args.strength, mode, pipeline.scheduler.config.get("prediction_type", "epsilon"))
    if saved_unet is None:
        _check_tile_options(args, pipeline.unet)
    try:
        # What only the loaded model tells (its guide, its downsampling factor, its scheduler's step limit), before
        # the settings line and the progress bar. Fidelity mode has no detail option left here: refused above.
        pipeline.check_arguments(
            num_inference_steps=args.steps,
            mode=mode,
            eta=args.eta,
            strength=args.strength,
            guidance_scale=args.guidance_scale,
            window_size=args.window_size,
            parallel_guidance_weight=args.parallel_guidance_weight,
        )
    except ValueError as error:
        raise in_option_words(error, options_given(args)) from None
    if available is not None:
        settings = _memory_settings(args, mode, pipeline.config)
        check_memory(paths, batch_keys, args.batch_size, *settings, available, DTYPES[args.dtype])
    windowed = 0  # evaluations that also run detail mode's windows: the last ones
    if mode == "fidelity":
        steps, detail_options = args.steps or pipeline.config.fidelity_steps, {}
        evaluations = evaluations_per_crop(mode, steps)
    else:
        # What the command line leaves out, the model's own detail settings (its pipeline config) fill in.
        detail_options = pipeline.detail_settings(
            args.steps, args.strength, args.eta, args.guidance_scale, args.window_size, args.parallel_guidance_weight
        )
        steps = detail_options.pop("num_inference_steps")
        _check_parallel_guidance_weight(args, detail_options["guidance_scale"])
        if args.temperature is not None:
            detail_options["temperature"] = args.temperature
        guided = pipeline.guided(detail_options["guidance_scale"])
        evaluations = evaluations_per_crop(
            mode,
            steps,
            detail_options["strength"],
            pipeline.scheduler,
            guided,
            fidelity_steps=pipeline.config.fidelity_steps,
        )
        windowed = windowed_evaluations(
            evaluations, detail_options["strength"], pipeline.config.fidelity_steps, detail_options["window_size"]
        )
    if not args.quiet:
        print(
            describe_settings(
                mode, steps, detail_options, type(pipeline.scheduler).__name__, evaluations, args.self_ensemble
            )
        )
    tiling = dict(
        tile_size=args.tile_size,
        overlap=args.tile_overlap,
        tile_batch_size=args.tile_batch_size,
        max_tile_pixels=args.max_tile_pixels,
    )
    with (
        use_backend(pipeline, args.backend, threads=threads) as network,
        tqdm(total=len(paths), desc="images", unit="image", disable=args.quiet or single, **bar_options()) as overall,
    ):
        for start, stop in _batches(batch_keys, args.batch_size):
            images = [open_image(path, keep_16bit=True) for path in paths[start:stop]]
            sixteen_bit = facts[start].sixteen_bit
            crops = crops_per_step(
                pipeline, images[0].size, stop - start, args.self_ensemble, network=network, **tiling
            )
            window_crops = window_crops_per_step(
                pipeline, images[0].size, detail_options.get("window_size", 0), stop - start, network, **tiling
            )
            name = os.path.basename(paths[start]) + (f" (+{stop - start - 1})" if stop - start > 1 else "")
            with UpscaleProgress(
                network,
                evaluations,
                crops,
                description=name,
                disable=args.quiet,
                window_crops=window_crops,
                windowed_steps=windowed,
                leave=single,
                position=0 if single else 1,
            ) as progress:
                output = tiled_super_resolve(
                    pipeline,
                    images,
                    progress=progress,
                    num_inference_steps=steps,
                    mode=mode,
                    generator=image_generators(args.seed, start, stop),
                    num_intermediates=args.save_process,
                    self_ensemble=args.self_ensemble,
                    # 16-bit inputs come back as floats, to write 16 bits; others as the pipeline's own 8-bit PIL.
                    output_type="np" if sixteen_bit else "pil",
                    **detail_options,
                    **tiling,
                )
            for offset, result in enumerate(output.images):
                path, destination, fact = paths[start + offset], destinations[start + offset], facts[start + offset]
                depth = ""
                # The networks see RGB; transparency is resized on its own and put back where the format keeps it,
                # and on the process strip, a PNG whatever the result's format. The file is read for it once.
                transparency = open_alpha(path) if _keeps_alpha(destination) or args.save_process else None
                alpha = transparency if _keeps_alpha(destination) else None
                if sixteen_bit and _keeps_16bit(destination) and alpha is None:
                    result, depth = _gray16(result), ", 16-bit"
                else:
                    if sixteen_bit and _keeps_16bit(destination):  # Pillow has no 16-bit gray with alpha
                        print(f"note: {path} is 16-bit with transparency: written 8-bit to keep it", file=sys.stderr)
                    result = _to_pil(result) if sixteen_bit else result
                    # Black-and-white photos stay black and white: the network's RGB answer can carry a faint tint.
                    if fact.grayscale:
                        result = result.convert("L")
                if alpha is not None:
                    result = result.copy()
                    result.putalpha(alpha.resize(result.size, PIL.Image.BICUBIC))
                save_atomically(result, destination, args.quality, args.overwrite, read_metadata(path))
                if args.save_process:
                    condition = tensor_to_pil(pipeline.prepare_condition(images[offset]))[0]
                    snapshots = [snapshot[offset] for snapshot in output.intermediates]
                    frames = [condition] + [_to_pil(frame) if sixteen_bit else frame for frame in snapshots]
                    strip = process_strip(frames, transparency)
                    save_atomically(strip, _process_path(destination), args.quality, args.overwrite)
                if not args.quiet:
                    # A file's noise depends on its place in the run: the seed lets one file be rerun alone.
                    seed = f" (seed {args.seed + start + offset})" if mode == "detail" else ""
                    overall.write(f"{path} -> {destination} ({result.width}x{result.height}{depth}){seed}")
                overall.update(1)
    return 0
