"""Gradio demo of SR3 super-resolution (the Hugging Face Space of diffusers-sr3).

Upload a photo, pick the scale, sampler, number of refinement steps and seed, and compare the input, a bicubic
upsample and the SR3 result side by side. Photos run as `sr3 upscale` runs them: whole up to about a
megapixel of output, else in seamless tiles (`diffusers_sr3.tiling`), so the only limit on the input is
`--max-pixels`; bfloat16 autocast where the hardware multiplies it natively.

    python spaces/app.py [--model DIR_OR_HUB_ID] [--max-pixels N] [--device cpu|cuda]

The model is `--model`, else the `SR3_MODEL` environment variable, else the model shipped inside the package.
The server listens on `GRADIO_SERVER_NAME` (default 127.0.0.1) and `GRADIO_SERVER_PORT` (default: the first free
port from 7860); usage analytics are off and nothing is fetched from the internet.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

# Set before gradio is imported: no usage analytics and no version check from any Blocks built in this process.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from gradio.context import LocalContext  # noqa: E402

from diffusers_sr3 import SR3Pipeline, image_io  # noqa: E402
from diffusers_sr3.backends import resolve_device, use_backend  # noqa: E402
from diffusers_sr3.commands.upscale import available_memory, full_size_bytes  # noqa: E402
from diffusers_sr3.defaults import MIN_WINDOWS_ACROSS  # noqa: E402
from diffusers_sr3.detail_windows import window_crops_per_step, windowed_evaluations  # noqa: E402
from diffusers_sr3.image_io import (  # noqa: E402
    ImageTooLargeError,
    UnreadableImageError,
    is_grayscale,
    open_alpha,
    open_image,
)
from diffusers_sr3.image_processing import (  # noqa: E402
    images_to_tensor,
    process_strip,
    resize_bicubic,
    tensor_to_pil,
    upsample_condition,
)
from diffusers_sr3.noise import SCHEDULERS, swap_scheduler  # noqa: E402
from diffusers_sr3.pipelines.base import steps_to_run  # noqa: E402
from diffusers_sr3.pipelines.pipeline_sr3 import SELF_ENSEMBLE_SIZE, evaluations_per_crop  # noqa: E402
from diffusers_sr3.pretrained import default_model_path  # noqa: E402
from diffusers_sr3.progress import EvaluationCounter  # noqa: E402
from diffusers_sr3.tiling import (  # noqa: E402
    DEFAULT_MAX_TILE_PIXELS,
    TiledNetwork,
    crops_per_step,
    tiled_super_resolve,
)

# The samplers offered, fastest-converging first; DDPM is the original SR3 sampler (needs hundreds of steps).
DEMO_SCHEDULERS = ["ddim", "dpmsolver", "unipc", "euler", "ddpm"]
DEFAULT_MAX_PIXELS = 256 * 256
# Requests waiting beyond the one running: more are turned away at once ("queue is full") instead of waiting tens of
# minutes for a single worker, or piling up without bound on a busy public Space.
DEFAULT_MAX_QUEUE = 20
# Network-grid pixels per evaluation (memory budget), as `sr3 upscale --max-tile-pixels` defaults to.
MAX_TILE_PIXELS = DEFAULT_MAX_TILE_PIXELS
MAX_PROCESS_FRAMES = 12
# The refinement strip's frames are shown at most this tall: at full size 12 snapshots of a 1024x1024 result make a
# 13312x1024 PNG of up to 30 MB, shown about 60 pixels a frame across a page: too heavy for a phone or a slow link.
PROCESS_FRAME_HEIGHT = 256
# ... and at most a 512x256 frame's pixels: a wide result (4096x256 from a 1024x64 panorama) is no taller than the
# height above, yet its 13 frames made a 53248x256 strip, as heavy as the square's at full size. Landscape photos up
# to 2:1 stay 256 pixels tall.
PROCESS_FRAME_PIXELS = 2 * PROCESS_FRAME_HEIGHT**2
# Uploads are refused by the server above this size, before any decoding.
MAX_UPLOAD_SIZE = "25mb"
MAX_SEED = 2**32 - 1
EXAMPLES_DIR = pathlib.Path(__file__).resolve().parent / "examples"
# What each example photo shows, read out in place of its thumbnail (gradio names thumbnails for nobody).
EXAMPLE_SUBJECTS = {
    "astronaut_64.png": "an astronaut's portrait",
    "chelsea_96x64.png": "a cat",
    "coffee_96x64.png": "a cup of coffee",
}


def resolve_model(model: Optional[str] = None) -> str:
    """The model to serve: `model`, else `$SR3_MODEL`, else the model packaged with diffusers-sr3."""
    if model:
        return model
    if os.environ.get("SR3_MODEL"):
        return os.environ["SR3_MODEL"]
    return default_model_path()


def example_images() -> List[str]:
    """The example photos next to this file (small low-resolution crops of public-domain/CC0 photographs)."""
    return sorted(str(path) for path in EXAMPLES_DIR.glob("*.png"))


def example_label(path: str) -> str:
    """The examples gallery's text for the photo at `path`: what it shows and its size in pixels."""
    name = os.path.basename(path)
    with PIL.Image.open(path) as image:
        width, height = image.size
    return f"{EXAMPLE_SUBJECTS.get(name, pathlib.Path(name).stem)}, {width}x{height}"


def load_pipeline(model: str, device: Optional[Union[str, torch.device]] = None) -> SR3Pipeline:
    """Load an `SR3Pipeline` folder or Hub repo id onto `device` (default: CUDA when available)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = SR3Pipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def scale_choices(upscale_factor: int) -> Dict[str, int]:
    """Menu label -> output scale: the model's factor, then each smaller factor it divides into.

    A smaller scale is the model's output downscaled (antialiased bicubic), so every choice runs the model at the
    factor it was trained for.
    """
    choices = {f"x{upscale_factor}": upscale_factor}
    for scale in range(upscale_factor - 1, 1, -1):
        if upscale_factor % scale == 0:
            choices[f"x{scale} (x{upscale_factor}, then downscaled)"] = scale
    return choices


class _Recorder(logging.Handler):
    """Keeps the warnings logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def read_upload(path: str, name: str, max_pixels: int) -> PIL.Image.Image:
    """Open an uploaded file as an RGB image, refusing files that are no image or have more than `max_pixels`.

    The size is checked from the header, before the pixels are decoded. Errors are `gr.Error`s naming `name`
    (the file name the user uploaded), shown in the page and returned to API clients; warnings about the file (EXIF
    that cannot be read) are shown as `gr.Warning`s, not only logged on the server.
    """
    recorder = _Recorder()
    image_io.logger.addHandler(recorder)
    # The library warns once per file and message; here every upload is news to whoever sent it.
    image_io._warn_once.cache_clear()
    try:
        # Upright by its EXIF orientation (phone photos), as the browser shows it.
        image = open_image(path, name, max_pixels=max_pixels)
    except ImageTooLargeError as error:
        if error.size is None:  # too large for Pillow to open at all
            size = f"over {2 * PIL.Image.MAX_IMAGE_PIXELS:,} pixels"
        else:
            size = f"{error.size[0]}x{error.size[1]} = {error.size[0] * error.size[1]:,} pixels"
        raise gr.Error(
            f"{name} is {size}; this demo accepts images of at most "
            f"{max_pixels:,} pixels (e.g. {int(max_pixels**0.5)}x{int(max_pixels**0.5)}). "
            "Crop or downscale it first."
        ) from None
    except UnreadableImageError as error:
        if error.not_an_image:
            raise gr.Error(f"{name} is not an image this demo can read (PNG, JPEG, WebP, BMP, TIFF, ...)") from None
        raise gr.Error(f"{name} is a damaged or unsupported image: {error.detail}") from None
    except FileNotFoundError:
        raise gr.Error(f"{name} was not received; upload it again") from None
    finally:
        image_io.logger.removeHandler(recorder)
    for record in recorder.records:
        if record.thread == threading.get_ident():  # not another visitor's upload, read at the same time
            gr.Warning(record.getMessage())
    frames = frame_count(path)
    if frames > 1:  # `sr3 upscale` says so too: the result would otherwise pass for the whole animation's
        gr.Warning(f"{name} has {frames} frames (an animation or a multi-page file): only the first is upscaled")
    return image


def frame_count(path: str) -> int:
    """How many frames (animation, pages) the image file at `path` holds; 1 where they cannot be counted."""
    try:
        with PIL.Image.open(path) as image:
            # A JPEG's multi-picture extras (an Ultra HDR gain map, a large preview, a stereo pair's other eye) are
            # no frames: its first picture is the photo every viewer shows.
            return 1 if image.format == "MPO" else getattr(image, "n_frames", 1)
    except Exception:  # counting seeks through every frame; the first one, already read, is what the demo uses
        return 1


def with_scheduler(pipeline: SR3Pipeline, scheduler: str) -> SR3Pipeline:
    """A pipeline like `pipeline`, sharing its UNet, that samples with `scheduler` (a `SCHEDULERS` name).

    Each request gets its own, so the served pipeline never changes and requests run in parallel.
    """
    sampler = type(pipeline).from_pipe(pipeline, scheduler=swap_scheduler(pipeline.scheduler, scheduler))
    sampler.set_progress_bar_config(disable=True)
    return sampler


def preview_frame(frame: PIL.Image.Image) -> PIL.Image.Image:
    """`frame` scaled down (antialiased) to at most `PROCESS_FRAME_HEIGHT` pixels tall and `PROCESS_FRAME_PIXELS`
    pixels, its aspect ratio kept; never enlarged."""
    shrink = min(PROCESS_FRAME_HEIGHT / frame.height, (PROCESS_FRAME_PIXELS / (frame.width * frame.height)) ** 0.5)
    if shrink >= 1:
        return frame
    size = (max(1, int(frame.width * shrink)), max(1, int(frame.height * shrink)))  # rounded down: within both
    return frame.resize(size, PIL.Image.BICUBIC)


@dataclasses.dataclass
class Result:
    """What one run of the demo makes: images of `output_size` `(height, width)`, and how the run went."""

    bicubic: PIL.Image.Image
    sr3: PIL.Image.Image
    process: Optional[PIL.Image.Image]
    output_size: Tuple[int, int]
    tiles: int
    tile: Tuple[int, int]  # (width, height): square tiles, clipped to the (padded) image
    seconds: float
    process_snapshots: int = 0  # the refinement's snapshots in `process`, after the upsampled input


def super_resolve(
    pipeline: SR3Pipeline,
    image: PIL.Image.Image,
    scale: int,
    steps: int,
    scheduler: str,
    seed: int,
    process_frames: int = 0,
    progress: Optional[Callable[[Tuple[int, int]], Any]] = None,
    mode: str = "detail",
    eta: Optional[float] = None,
    strength: float = 1.0,
    self_ensemble: bool = False,
    alpha: Optional[PIL.Image.Image] = None,
) -> Result:
    """Super-resolve `image` by `scale` (the model's factor or one it divides into) with SR3 and with bicubic.

    Args:
        pipeline: the SR3 pipeline; it is not modified (the sampler is swapped in a copy sharing its UNet).
        image: the low-resolution photo.
        scale: output size / input size.
        steps: refinement steps.
        scheduler: a `diffusers_sr3.noise.SCHEDULERS` name.
        seed: seed of the sampling noise.
        process_frames: how many snapshots of the refinement to draw after the upsampled input (0: none), each
            scaled down to at most `PROCESS_FRAME_HEIGHT` pixels tall and `PROCESS_FRAME_PIXELS` pixels.
        progress: called with `(done, total)` after every network evaluation, counted in (tile, step) crops: the
            refinement steps of an untiled image.
        mode: `"detail"` (SR3 sampling with `scheduler` and `steps`) or `"fidelity"` (the model's estimate of the
            average answer: deterministic DDIM from the noise's mean in a few steps; `scheduler`, `steps`, `seed`,
            `eta` and `strength` do not apply).
        eta: detail mode with DDIM: fresh noise per step (0 to 1; None: the pipeline's `detail_eta` where the
            sampler takes one, else its default, 0).
        strength: detail mode: the part of the refinement that runs (below 1: from the fidelity answer, noised).
        self_ensemble: fidelity mode: average the answers for the input's 8 flips and quarter-turns (slightly
            more faithful, 8 times the evaluations).
        alpha: the upload's transparency (`open_alpha`; None: it has none), given to the process strip's frames
            resized bicubic, as the Space gives it to its other pictures.
    """
    factor = pipeline.config.upscale_factor
    if scale < 1 or factor % scale:
        raise ValueError(f"scale x{scale} is neither the model's factor x{factor} nor a factor it divides into")
    if self_ensemble and mode != "fidelity":
        raise ValueError("the self-ensemble averages fidelity answers: it needs mode='fidelity'")
    sampler = with_scheduler(pipeline, scheduler)

    # `sr3 upscale`'s defaults: untiled up to about a megapixel of output, else the fewest tiles that fit the memory
    # budget; bfloat16 autocast where the hardware multiplies it natively.
    width, height = image.size
    multiple = pipeline.unet.downsampling_factor
    padded = [-(-length * factor // multiple) * multiple for length in (height, width)]
    tiling = TiledNetwork(pipeline.unet, None, None, None, max_pixels=MAX_TILE_PIXELS)
    tiles, tile_size = tiling.count_evaluations(*padded)[0], tiling.plan(*padded).tile_size
    tile = (min(tile_size, padded[1]), min(tile_size, padded[0]))
    detail = {"strength": strength} if eta is None else {"strength": strength, "eta": eta}
    evaluations = evaluations_per_crop(
        mode,
        steps if mode == "detail" else None,
        strength,
        sampler.scheduler,
        sampler.guided(),
        fidelity_steps=pipeline.config.fidelity_steps,
    )
    crops = crops_per_step(pipeline, image.size, self_ensemble=self_ensemble, max_tile_pixels=MAX_TILE_PIXELS)
    total = evaluations * crops
    if mode == "detail":
        window_size = sampler.config.get("detail_window_size") or 0  # the call leaves the windows at the model's
        windowed = windowed_evaluations(evaluations, strength, pipeline.config.fidelity_steps, window_size)
        if windowed:
            total += windowed * window_crops_per_step(
                pipeline, image.size, window_size, max_tile_pixels=MAX_TILE_PIXELS
            )
    counter = EvaluationCounter(progress or (lambda done: None), total)
    started = time.perf_counter()
    with use_backend(sampler, "auto"):
        output = tiled_super_resolve(
            sampler,
            image,
            num_inference_steps=steps if mode == "detail" else None,
            mode=mode,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            num_intermediates=min(process_frames, steps) if mode == "detail" else 0,
            max_tile_pixels=MAX_TILE_PIXELS,
            progress=counter,
            **(detail if mode == "detail" else {"self_ensemble": self_ensemble}),
        )
    seconds = time.perf_counter() - started

    low_resolution = images_to_tensor(image)
    output_size = (height * scale, width * scale)
    sr3 = output.images * 2 - 1
    if scale != factor:
        sr3 = resize_bicubic(sr3, output_size)
    bicubic = upsample_condition(low_resolution, output_size)
    process = None
    if process_frames:
        condition = tensor_to_pil(sampler.prepare_condition(image))
        frames = condition + [tensor_to_pil(frame * 2 - 1)[0] for frame in output.intermediates]
        process = process_strip([preview_frame(frame) for frame in frames], alpha)
    # A black-and-white photo stays black and white, as `sr3 upscale` writes it: the network's answer can be tinted.
    sr3_image = tensor_to_pil(sr3)[0]
    return Result(
        bicubic=tensor_to_pil(bicubic)[0],
        sr3=sr3_image.convert("L") if is_grayscale(image) else sr3_image,
        process=process,
        output_size=output_size,
        tiles=tiles,
        tile=tile,
        seconds=seconds,
        process_snapshots=len(output.intermediates) if process_frames else 0,
    )


def process_description(result: Result) -> str:
    """The refinement strip's alt text: what its frames are, left to right (empty without a strip)."""
    if result.process is None:
        return ""
    snapshots = result.process_snapshots
    return (
        f"refinement process, left to right: the bicubic-upsampled input, then {snapshots} snapshot"
        f"{'s' if snapshots != 1 else ''} of SR3's refinement, from its noisy start to the result (the last)"
    )


def _whole_number(value: Any, what: str, low: int, high: int) -> int:
    """An integer input from the page or an API client, or a `gr.Error` saying what is allowed."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{what} must be a whole number, got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise gr.Error(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def _strength(value: Any, default: float) -> float:
    """Detail strength from the page or an API client (None: `default`), or a `gr.Error` saying what is allowed."""
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"detail strength must be a number in (0, 1], got {value!r}") from None
    if not 0 < number <= 1:
        raise gr.Error(f"detail strength must be a number in (0, 1], got {value!r}")
    return number


def check_memory(
    pipeline: SR3Pipeline,
    name: str,
    input_size: Tuple[int, int],
    process_frames: int,
    steps: int,
    strength: float = 1.0,
) -> None:
    """Refuse, before any work, a request whose full-size images need more memory than `pipeline`'s device has
    available now, with a `gr.Error` naming the need: a run that fails halfway takes the Space down for everyone.

    The need is `sr3 upscale`'s estimate (`full_size_bytes`: measured peak per output pixel, doubled with detail
    mode's windows) of the model's output for `input_size` `(width, height)`, plus the float32 snapshots of it that
    detail mode stores: `process_frames`, but never more than the steps that run. Devices whose free memory cannot be
    told are not checked.

    Args:
        pipeline: the served pipeline.
        name: the uploaded file's name, for the message.
        input_size: the upload's `(width, height)`.
        process_frames: refinement-process frames asked for.
        steps, strength: detail mode's refinement steps and strength (below 1, fewer steps run).
    """
    available = available_memory(pipeline.device)
    if available is None:
        return
    factor = pipeline.config.upscale_factor
    width, height = (length * factor for length in input_size)
    window_size = pipeline.config.get("detail_window_size") or 0
    windows = bool(window_size) and min(width, height) >= MIN_WINDOWS_ACROSS * window_size
    dtype = pipeline.unet.dtype
    need = full_size_bytes((width, height), windows=windows, dtype=None if dtype == torch.float32 else dtype)
    need += min(process_frames, steps_to_run(steps, strength)) * 3 * 4 * width * height
    free, where = available
    if need > free:
        raise gr.Error(
            f"{name}: a {width}x{height} output needs at least {need / 1e9:.1f} GB of memory, "
            f"{free / 1e9:.1f} GB {where} on this server now: try a smaller photo"
            + (" or fewer refinement-process frames" if process_frames else "")
            + ", or try again later"
        )


def _cancellation() -> Callable[[], bool]:
    """A check that says whether the gradio event this thread runs has ended without it: cancelled (the stop
    button, `cancels=`, an API client's `Job.cancel`), or its visitor gone (tab closed). Never outside an event.

    Gradio stops waiting for a cancelled function but cannot stop its thread: unchecked, the refinement would run to
    its end for nobody, beside the next visitor's run that the freed queue slot has started.
    """
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    event = events.get(event_id) if events is not None and event_id is not None else None
    if event is None:
        return lambda: False
    return lambda: not getattr(event, "alive", True) or events.get(event_id) is not event


def build_demo(
    pipeline: SR3Pipeline,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    default_steps: Optional[int] = None,
    examples: Sequence[str] = (),
    detail_defaults: Optional[Dict[str, float]] = None,
    max_queue: Optional[int] = DEFAULT_MAX_QUEUE,
) -> gr.Blocks:
    """The demo's page for `pipeline`: upload, settings, the comparison and the refinement process.

    Args:
        pipeline: the SR3 pipeline to serve.
        max_pixels: uploads with more pixels are refused with an error naming both sizes.
        default_steps: the refinement steps preselected; defaults to the pipeline's own `detail_steps` (10 for the
            packaged model, 50 for models saved without one).
        examples: image files offered as examples.
        detail_defaults: detail mode's `strength` (preselected) and `eta` (used with DDIM), in place of the
            pipeline's own `detail_strength` and `detail_eta` (for models saved without them: strength 1, the
            scheduler's eta).
        max_queue: requests that may wait while one runs; more are refused at once (None: no limit).
    """
    factor = pipeline.config.upscale_factor
    scales = scale_choices(factor)
    max_steps = pipeline.scheduler.config.num_train_timesteps
    saved = next((name for name, cls in SCHEDULERS.items() if isinstance(pipeline.scheduler, cls)), None)
    # The saved sampler is preselected unless it is DDPM, which needs far more steps than a demo should take.
    default_scheduler = saved if saved in DEMO_SCHEDULERS and saved != "ddpm" else DEMO_SCHEDULERS[0]
    # Models that predict the clean image are shown in both modes side by side; others in detail mode only.
    clean_image_model = pipeline.scheduler.config.get("prediction_type") in ("sample", "v_prediction")
    modes = ("fidelity", "detail") if clean_image_model else ("detail",)
    detail_defaults = {
        "strength": pipeline.config.get("detail_strength", 1.0),
        "eta": pipeline.config.get("detail_eta"),
        **(detail_defaults or {}),
    }
    if default_steps is None:
        default_steps = pipeline.detail_settings()["num_inference_steps"]

    def run(
        upload: Optional[Dict[str, Any]],
        scale_label: str,
        steps: Any,
        scheduler: str,
        seed: Any,
        process_frames: Any,
        strength: Any = None,
        self_ensemble: Any = False,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio injects the tracker through this default)
    ) -> Tuple[List[Tuple[PIL.Image.Image, str]], Tuple[PIL.Image.Image, PIL.Image.Image], Any, str]:
        # Inputs arrive unprocessed (`preprocess=False`): gradio's own image decoding would fail on a non-image
        # with a generic error before this function could name the problem.
        if not upload or not upload.get("path"):
            raise gr.Error("upload an image first")
        if scale_label not in scales:
            raise gr.Error(f"scale must be one of {', '.join(scales)}, got {scale_label!r}")
        if scheduler not in DEMO_SCHEDULERS:
            raise gr.Error(f"scheduler must be one of {', '.join(DEMO_SCHEDULERS)}, got {scheduler!r}")
        steps = _whole_number(steps, "steps", 1, max_steps)
        seed = _whole_number(seed, "seed", 0, MAX_SEED)
        process_frames = _whole_number(process_frames, "process frames", 0, MAX_PROCESS_FRAMES)
        strength = _strength(strength, detail_defaults["strength"])
        strength = strength if clean_image_model else 1.0  # detail on top of fidelity needs a fidelity answer
        if self_ensemble not in (None, True, False):
            raise gr.Error(f"self-ensemble must be true or false, got {self_ensemble!r}")
        self_ensemble = bool(self_ensemble) and clean_image_model
        try:  # a steps/strength pair that runs no step fails here, before any mode runs, with the reason shown
            steps_to_run(steps, strength)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        name = os.path.basename(upload.get("orig_name") or upload["path"])
        image = read_upload(upload["path"], name, max_pixels)
        check_memory(pipeline, name, image.size, process_frames, steps, strength)
        # The networks see RGB; transparency is resized on its own and put back, as `sr3 upscale` does for PNG.
        alpha = open_alpha(upload["path"])

        def transparent(picture: PIL.Image.Image, resample: int = PIL.Image.BICUBIC) -> PIL.Image.Image:
            if alpha is None:
                return picture
            picture = picture.copy()
            picture.putalpha(alpha.resize(picture.size, resample))
            return picture

        cancelled = _cancellation()

        def report(done: Tuple[int, int], mode: str) -> None:
            if cancelled():
                raise gr.Error("the request was cancelled")
            progress(done, desc=f"{mode} mode", unit="evaluations")

        progress((0, 1), desc="refining", unit="evaluations")
        results = {}
        for mode in modes:  # fidelity first: it is fast
            results[mode] = super_resolve(
                pipeline,
                image,
                scales[scale_label],
                steps,
                scheduler,
                seed,
                process_frames if mode == "detail" else 0,
                lambda done, mode=mode: report(done, mode),
                mode=mode,
                eta=detail_defaults["eta"] if scheduler == "ddim" else None,
                strength=strength,
                self_ensemble=self_ensemble and mode == "fidelity",
                alpha=alpha,
            )
        result = results["detail"]
        height, width = result.output_size
        nearest = transparent(image.resize((width, height), PIL.Image.NEAREST), PIL.Image.NEAREST)
        bicubic = transparent(result.bicubic)
        sr3 = {mode: transparent(outcome.sr3) for mode, outcome in results.items()}
        gallery = [
            (nearest, f"input {image.width}x{image.height} (nearest neighbour)"),
            (bicubic, f"bicubic {width}x{height}"),
        ]
        for mode in results:
            label = f"SR3 {mode}" if len(modes) > 1 else "SR3"
            label += " (self-ensemble)" if self_ensemble and mode == "fidelity" else ""
            gallery.append((sr3[mode], f"{label} {width}x{height}"))
        info = (
            f"**{scale_label}**: {image.width}x{image.height} → {width}x{height} · {scheduler}, {steps} steps"
            + (f" (detail strength {strength:g})" if strength < 1 else "")
            + (f", fidelity averaged over {SELF_ENSEMBLE_SIZE} orientations" if self_ensemble else "")
            + ", "
            f"seed {seed} · "
            + (f"{result.tiles} tiles of {result.tile[0]}x{result.tile[1]}" if result.tiles > 1 else "untiled")
            + " · "
            f"{sum(outcome.seconds for outcome in results.values()):.1f} s"
        )
        process = gr.Image(
            value=result.process,
            visible=result.process is not None,
            alt_text=process_description(result),
        )
        return gallery, (bicubic, sr3["detail"]), process, info

    # A public Space runs for days: drop uploads and results an hour old, every hour.
    with gr.Blocks(title="SR3 super-resolution", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# SR3: image super-resolution via iterative refinement\n"
            f"Upload a photo (at most {max_pixels:,} pixels). The x{factor} SR3 model refines a bicubic upsample "
            "from noise, whole up to about a megapixel of output and in tiles blended seamlessly beyond. "
            "More steps are slower and usually sharper; the seed picks the sampling noise."
            + (
                " **Fidelity** mode (deterministic, fast) gives the most faithful image; **detail** mode (SR3 "
                "sampling) the sharper texture: both are shown."
                if clean_image_model
                else ""
            )
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="low-resolution photo",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=280,
                    alt_text="the photo to super-resolve",
                )
                # Under the upload, not under the button: on a phone the columns stack, and the results should follow
                # the button closely (gradio's scroll_to_output is switched off on Spaces, and did not scroll here).
                if examples:
                    gr.Examples(
                        [[path] for path in examples],
                        inputs=[image],
                        cache_examples=False,
                        label="example photos",
                        example_labels=[example_label(path) for path in examples],
                    )
                scale = gr.Radio(list(scales), value=next(iter(scales)), label="scale")
                steps = gr.Slider(1, max_steps, value=min(default_steps, max_steps), step=1, label="steps")
                scheduler = gr.Dropdown(DEMO_SCHEDULERS, value=default_scheduler, label="sampler")
                seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                process_frames = gr.Slider(
                    0, MAX_PROCESS_FRAMES, value=0, step=1, label="refinement-process frames (0: off)"
                )
                strength = gr.Slider(
                    0.05,
                    1.0,
                    value=detail_defaults["strength"],
                    step=0.05,
                    label="detail strength (1: from pure noise; lower: detail added on top of the fidelity answer)",
                    visible=clean_image_model,
                )
                self_ensemble = gr.Checkbox(
                    False,
                    label=f"fidelity self-ensemble (average of the {SELF_ENSEMBLE_SIZE} flips and quarter-turns: "
                    f"slightly more faithful, {SELF_ENSEMBLE_SIZE}x the fidelity time)",
                    visible=clean_image_model,
                )
                button = gr.Button("Super-resolve", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                info = gr.Markdown(elem_id="info")
                gallery = gr.Gallery(
                    label="input | bicubic | " + " | ".join(f"SR3 {mode}" for mode in modes),
                    columns=2 + len(modes),
                    rows=1,
                    height="auto",
                    format="png",
                    object_fit="contain",
                    elem_id="gallery",
                )
                # Gradio gives the slider's two pictures no alt text: its label says what they are.
                compared = "SR3 detail" if len(modes) > 1 else "SR3"
                slider = gr.ImageSlider(label=f"bicubic ↔ {compared} (drag to compare)", format="png", elem_id="slider")
                process = gr.Image(label="refinement process", format="png", visible=False, elem_id="process")
        button.click(
            run,
            inputs=[image, scale, steps, scheduler, seed, process_frames, strength, self_ensemble],
            outputs=[gallery, slider, process, info],
            api_name="super_resolve",
            preprocess=False,
        )
    # No limit as a number: gradio reads None as 1 on ZeroGPU Spaces.
    demo.queue(default_concurrency_limit=1, max_size=sys.maxsize if max_queue is None else max_queue)
    return demo


def launch(
    demo: gr.Blocks, server_name: Optional[str] = None, server_port: Optional[int] = None, **kwargs: Any
) -> Tuple[Any, str, str]:
    """Serve `demo` locally: server name from `GRADIO_SERVER_NAME` (default 127.0.0.1), no share link, uploads
    capped at `MAX_UPLOAD_SIZE`, no server-side rendering (no Node.js needed). `kwargs` go to `Blocks.launch`."""
    return demo.launch(
        server_name=server_name or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=server_port,
        share=False,
        max_file_size=MAX_UPLOAD_SIZE,
        ssr_mode=False,
        **kwargs,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="SR3 pipeline folder or Hub repo id (default: $SR3_MODEL, else the packaged model)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=os.environ.get("SR3_MAX_PIXELS", DEFAULT_MAX_PIXELS),  # argparse converts (and names) a string
        help=f"largest upload in pixels (default: $SR3_MAX_PIXELS, else {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=os.environ.get("SR3_MAX_QUEUE", DEFAULT_MAX_QUEUE),
        help=f"requests that may wait while one runs, 0 for no limit (default: $SR3_MAX_QUEUE, else "
        f"{DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.max_pixels < 1:
        parser.error("--max-pixels must be positive")
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 (no limit) or more")
    try:
        model = resolve_model(args.model)
    except FileNotFoundError as error:
        parser.error(str(error))
    try:
        device = resolve_device(args.device)
        pipeline = load_pipeline(model, device)
    except (ValueError, OSError) as error:  # a missing folder, not a pipeline, a pipeline of another kind
        parser.error(str(error))
    demo = build_demo(pipeline, args.max_pixels, examples=example_images(), max_queue=args.max_queue or None)
    launch(demo)


if __name__ == "__main__":
    main()
