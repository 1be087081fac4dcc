"""`sr3 demo`: train a small x4 SR3 model on CPU on photographs that ship with installed packages, then compare
it, and the x4 model that ships inside the package, with bicubic upsampling on held-out photographs. No downloads.

Whole photographs are split into training and held-out sets (`diffusers_sr3.photos`), so no held-out pixel is
ever trained on. Training goes through the package's training core (`diffusers_sr3.training.train`) on random
crops of the training photos; evaluation uses random crops of the held-out photos, degraded with the package's
degradation, and one whole held-out photo upscaled in seamless tiles. Written to `--output`:

    comparison.png   held-out crops, one per row, magnified: LR | bicubic | SR3 fidelity | SR3 detail | packaged SR3
                     fidelity | packaged SR3 detail | HR
    photo.png        a whole held-out photo: LR | bicubic | SR3 fidelity | SR3 detail (tiled) | packaged ... | HR
                     (with --self-ensemble, a fidelity self-ensemble column after each model's fidelity column)
    metrics.md       PSNR / SSIM / consistency of both SR3 modes and bicubic (means over the crops), and a verdict
    metrics.json     the same per image, plus the run's settings and timings
    model/           the trained pipeline (load it with SR3Pipeline.from_pretrained or `sr3 upscale --model`), saved
                     with the DDIM sampler and detail settings measured here
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import PIL.Image

from ..defaults import steps_to_run
from ..file_writes import atomic_file
from ..presets import NEW_MODEL_RECIPE
from ..pretrained import DEFAULT_DETAIL_OPTIONS
from .common import at_least_one, whole_number

if TYPE_CHECKING:
    import torch

UPSCALE_FACTOR = 4
MODES = ("fidelity", "detail")
SELF_ENSEMBLE = "fidelity (self-ensemble)"
# Five times the shipped model's: at 1000 steps of this small network 1e-3 gave +0.12 dB over bicubic where 2e-4
# gave +0.02 and 2e-3 learned nothing (docs/quality.md).
DEMO_LEARNING_RATE = 1e-3
# The demo's model, trained for minutes, answers better in a few fidelity steps than in the packaged model's one: on
# its 256 held-out crops 33.05 dB in 1, 33.11 in 2, 33.16 in 4 (bicubic 32.85; docs/quality.md). Saved with it.
DEMO_FIDELITY_STEPS = 4
PACKAGED = "SR3 (packaged model)"
# An earlier demo's model waits under this name (plus a random suffix) in --output while a rerun trains.
EARLIER_MODEL_PREFIX = ".sr3-earlier-model-"
# The report files, set aside under this name plus a random suffix and their own while a rerun puts its own in place.
EARLIER_REPORT_PREFIX = ".sr3-earlier-report-"
# The step plan is this share of what the timed step says fits in --minutes, so that the progress bar ends near its
# end: a training step takes about 1.3 times the timed one (data, EMA; 0.118 s against 0.091 here). The clock ends the
# run; a plan that ends first with time left is extended (`_train`).
PLAN_SHARE = 0.8
# A run that ends its plan with more than this share of --minutes left goes on from its checkpoint: the step was timed
# while other work held the cores (one such demo trained 1 of its 4.5 minutes and stayed at bicubic's level), or the
# run trains on a GPU, which the step timed on the CPU does not see.
GO_ON_IF_LEFT = 0.1
# A run by the clock that trains less than this share of its plan ran several times slower than its timed step: other
# work held the cores (one such demo trained 60 of 1995 planned steps), which more minutes would not mend.
BUSY_SHARE = 0.5
# The training recipe for new models (the convergence study's), minus the UNet option set in `unet_config`.
RECIPE: Dict[str, Any] = {key: value for key, value in NEW_MODEL_RECIPE.items() if key != "noise_level_embedding_scale"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="sr3-demo", help="folder for the pictures, metrics and model")
    parser.add_argument(
        "--minutes", type=float, default=4.5, help="training time (default: 4.5; the whole demo takes about 5)"
    )
    parser.add_argument("--steps", type=at_least_one, default=None, help="training steps (overrides --minutes)")
    parser.add_argument("--crop-size", type=int, default=64, help="high-resolution crop size; LR is a quarter")
    parser.add_argument("--width", type=at_least_one, default=32, help="UNet inner width (channels of the first level)")
    parser.add_argument("--batch-size", type=at_least_one, default=16, help="training batch size")
    parser.add_argument(
        "--train-crops", type=at_least_one, default=8192, help="random crops drawn from the training photos"
    )
    parser.add_argument("--eval-crops", type=at_least_one, default=32, help="random held-out crops to evaluate")
    parser.add_argument(
        "--photo-size", type=at_least_one, default=128, help="longer side of the whole held-out photo (HR)"
    )
    parser.add_argument("--inference-steps", type=at_least_one, default=10, help="detail-mode refinement steps (DDIM)")
    parser.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_DETAIL_OPTIONS["strength"],
        help="detail mode: the part of the refinement that runs, from the fidelity answer noised that far (1: from "
        "pure noise; default: the packaged model's, %(default)s)",
    )
    parser.add_argument(
        "--self-ensemble",
        action="store_true",
        help="also evaluate fidelity mode averaged over the input's 8 flips and quarter-turns (8x its evaluations)",
    )
    parser.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0, help="random seed")
    parser.add_argument(
        "--threads",
        type=at_least_one,
        default=None,
        help="CPU threads for torch (default: one per core that the tasks of other processes runnable now leave "
        "free, at least 1; torch's own count on an idle machine: its threads wait for each other, so on a busy "
        "machine fewer are faster)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    parser.add_argument(
        "--packaged",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate the x4 model that ships inside the package (default: on)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no progress lines (the table, the verdict and the paths written still print)",
    )


def _progress(args: argparse.Namespace, text: str) -> None:
    """Say how the run goes, on stderr with the progress bars (stdout holds the results), unless --quiet."""
    if not args.quiet:
        print(text, file=sys.stderr)


def unet_config(crop_size: int, width: int) -> Dict[str, Any]:
    """A small SR3 UNet for `crop_size` crops that runs at the low-resolution grid (pixel-unshuffle by the upscale
    factor, as the `photos_x4` preset): three levels, attention at the coarsest. Several times faster per step than
    a network at the output resolution, so a few CPU minutes train it past bicubic."""
    if crop_size % 16 or crop_size < 32:
        raise ValueError(f"--crop-size must be a multiple of 16 and at least 32, got {crop_size}")
    # The network's rules, checked before any work: an even width (sin/cos pairs of the level embedding) that its
    # min(8, width) normalisation groups divide.
    if width % 2 or (width > 8 and width % 8):
        raise ValueError(f"--width must be 2, 4, 6 or a multiple of 8, got {width}")
    from ..training.crops import crop_unet_config

    config = crop_unet_config(
        crop_size // UPSCALE_FACTOR,
        width,
        (1, 2, 4),
        max_norm_groups=8,
        noise_level_embedding_scale=NEW_MODEL_RECIPE["noise_level_embedding_scale"],
    )
    return dict(config, sample_size=crop_size, pixel_unshuffle_factor=UPSCALE_FACTOR)


def _seconds_per_step(config: Dict[str, Any], batch_size: int, bfloat16: bool) -> float:
    """Time one optimizer step of the network on a training batch: the fastest of four, after a warm-up step (other
    work on the machine only ever slows a step down)."""
    import torch

    from ..models.unet_sr3 import SR3UNet2DModel

    network = SR3UNet2DModel(**config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    size = config["sample_size"]
    batch = torch.randn(batch_size, 6, size, size)  # image pixels; the network folds them onto its grid
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            loss = network(batch, torch.rand(batch_size)).sample.float().abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - start)
    return min(timings[1:])


def _train(
    train_crops,
    config: Dict[str, Any],
    args: argparse.Namespace,
    model_dir: str,
    bfloat16: bool,
    sampling: Dict[str, Any],
) -> Tuple[int, Optional[int]]:
    """Train the demo's model into `model_dir` for `--steps`, or for `--minutes` by the clock.

    The step timed on the CPU sizes the plan and the LR warm-up. Where the plan ends with time left (the machine was
    busy while the step was timed, or training runs on a GPU), the run resumes from its checkpoint, exactly, with a
    plan from the speed it measured. The pipeline is saved with the sampling settings `sampling` (training options:
    `sampler`, `fidelity_steps`, `detail_*`), so that its model card describes them.

    Returns:
        `(steps, planned)`: the steps trained, and those the timed step planned for `--minutes` (None for `--steps`).
    """
    import torch

    from ..training.crops import train_on_crops
    from ..training.trainer import SUMMARY_FILE

    options: Dict[str, Any] = dict(
        batch_size=args.batch_size,
        output_dir=model_dir,
        seed=args.seed,
        upscale_factor=UPSCALE_FACTOR,
        learning_rate=DEMO_LEARNING_RATE,
        mixed_precision="bf16" if bfloat16 else "no",
        quiet=args.quiet,
        **sampling,
        **RECIPE,
    )
    if args.steps is not None:
        train_on_crops(
            train_crops,
            config,
            steps=args.steps,
            checkpointing_steps=0,
            lr_warmup_steps=min(100, args.steps // 10),
            **options,
        )
        return _training_summary(model_dir)["global_step"], None
    per_step = _seconds_per_step(config, args.batch_size, bfloat16 and not torch.cuda.is_available())
    plan = planned = max(10, int(PLAN_SHARE * args.minutes * 60 / per_step))
    _progress(args, f"about {per_step:.2f} s per step here: training for {args.minutes:g} min (at most {plan} steps)")
    options["lr_warmup_steps"] = min(100, plan // 10)  # the same in every part of the run, as resuming requires
    deadline = time.perf_counter() + args.minutes * 60
    resume = None
    while True:
        left = deadline - time.perf_counter()
        train_on_crops(
            train_crops,
            config,
            steps=plan,
            checkpointing_steps=plan,
            max_train_minutes=float(f"{left / 60:.3g}"),  # as the model card records it
            resume_from_checkpoint=resume,
            **options,
        )
        summary = _training_summary(model_dir)
        left = deadline - time.perf_counter()
        if summary["stopped_by_time_limit"] or left < GO_ON_IF_LEFT * args.minutes * 60:
            break
        # The speed this run measured, a tenth over: the clock, not the plan, ends the next part.
        plan = summary["global_step"] + max(1, int(1.1 * left * summary["steps_per_second"]))
        _progress(
            args, f"{left / 60:.1f} min left after {summary['global_step']} steps: going on (at most {plan} steps)"
        )
        resume = os.path.join(model_dir, f"checkpoint-{summary['global_step']}")
    if _remove_checkpoints(model_dir, f"{model_dir} keeps the pipeline", args.quiet):
        summary["checkpoints"] = []
        with open(os.path.join(model_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
    return summary["global_step"], planned


def _remove_checkpoints(model_dir: str, why: str, quiet: bool = False) -> List[str]:
    """Remove the training checkpoints in the demo's model folder (it holds the pipeline, not training state), saying
    which and `why` on stderr unless `quiet`; return them."""
    from ..training.checkpointing import list_checkpoints

    checkpoints = list_checkpoints(model_dir)
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)
    if checkpoints and not quiet:
        print(f"removed {', '.join(os.path.basename(path) for path in checkpoints)}: {why}", file=sys.stderr)
    return checkpoints


def _training_summary(model_dir: str) -> Dict[str, Any]:
    from ..training.trainer import SUMMARY_FILE

    with open(os.path.join(model_dir, SUMMARY_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def _packaged_pipeline():
    """The x4 photo model that ships inside the package (DDIM sampling), or None with a note when it is missing."""
    from ..noise import swap_scheduler
    from ..pipelines import SR3Pipeline
    from ..pretrained import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as error:
        print(f"note: {error}", file=sys.stderr)
        return None
    pipeline = SR3Pipeline.from_pretrained(path)
    pipeline.scheduler = swap_scheduler(pipeline.scheduler, "ddim")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def low_resolution_inputs(high_resolution: torch.Tensor):
    """The inputs every method gets: the degraded images as 8-bit pictures, and their bicubic upsample.

    SR3 takes the low-resolution images as PIL images (uint8); bicubic must start from exactly those pixels, not
    from the float downsample before rounding, or the comparison favours one method by the rounding.

    Returns:
        `(low_resolution_pil, low_resolution, bicubic)`: the PIL images, the same as a `(B, 3, h, w)` tensor in
        [-1, 1], and their bicubic upsample to the high-resolution size.
    """
    from ..image_processing import degrade, images_to_tensor, tensor_to_pil, upsample_condition

    low, _ = degrade(high_resolution, UPSCALE_FACTOR)
    low_pil = tensor_to_pil(low)
    low = images_to_tensor(low_pil)
    return low_pil, low, upsample_condition(low, tuple(high_resolution.shape[-2:]))


def _whole_photo(path, photo_size: int) -> PIL.Image.Image:
    """The held-out photo the demo upscales whole: its longer side `photo_size` (`--photo-size`), cropped to a
    multiple of the upscale factor. Refuses a size that leaves a side below the factor (no low-resolution pixel),
    naming the least size that works for this photo's shape."""
    from ..image_io import image_size
    from ..photos import load_photo, photo_name

    photo = load_photo(path, max_side=photo_size)
    photo = photo.crop((0, 0, photo.width - photo.width % UPSCALE_FACTOR, photo.height - photo.height % UPSCALE_FACTOR))
    if min(photo.size) >= UPSCALE_FACTOR:
        return photo
    shorter, longer = sorted(image_size(path))
    # load_photo's rounding of the shorter side: the least longer side that leaves it UPSCALE_FACTOR pixels
    sizes = range(UPSCALE_FACTOR, longer + 1)
    least = next((size for size in sizes if round(shorter * size / longer) >= UPSCALE_FACTOR), None)
    raise ValueError(
        f"--photo-size {photo_size} makes the held-out photo {photo_name(path)} {photo.width}x{photo.height} "
        f"pixels, too small to downscale x{UPSCALE_FACTOR}; "
        + (f"give at least {least}" if least else "the photo itself is too small")
    )


def _mode_options(mode: str, inference_steps: int, detail: Dict[str, float]) -> Dict[str, Any]:
    """The pipeline arguments of one of the demo's modes."""
    if mode == "detail":
        return dict(mode="detail", num_inference_steps=inference_steps, **detail)
    return dict(mode="fidelity", self_ensemble=mode == SELF_ENSEMBLE)


def _printed(metric: str, value: float) -> str:
    """`value` of `metric` (`psnr`, `ssim` or `consistency`) as the table prints it."""
    if metric == "psnr":
        return f"{value:.2f}"
    if metric == "ssim":
        return f"{value:.4f}"
    return f"{value * 1e5:.2f}"


def _table(rows: Dict[str, Dict[str, float]]) -> List[str]:
    lines = ["| method | PSNR (dB) | SSIM | consistency (MSE / 1e-5) |", "|---|---|---|---|"]
    for name, values in rows.items():
        printed = [_printed(metric, values[metric]) for metric in ("psnr", "ssim", "consistency")]
        lines.append(f"| {name} | " + " | ".join(printed) + " |")
    return lines


def _busy_note(steps: int, planned: Optional[int], threads: int) -> Optional[str]:
    """The sentence that says a busy machine cut training short (under `BUSY_SHARE` of the `planned` steps), and what
    to do; None where it did not (or `--steps` set the run)."""
    if planned is None or steps >= BUSY_SHARE * planned:
        return None
    remedy = "rerun on an idle machine" + (" or with --threads 1" if threads > 1 else "")
    return f"The machine was busy: training reached {steps} of its {planned} planned steps ({remedy})."


def demo_heldout(paths: Sequence[Any]) -> Tuple[Any, Optional[str]]:
    """The demo's held-out photos among `paths`, and a note where they cannot be trusted: the packaged model's own
    held-out photos (`photos.PACKAGED_MODEL_HELDOUT`, the 0.25 split where it was trained), since the demo scores the
    packaged model on them too; where none of those is installed, a quarter of the photos, with a note that the
    packaged model's rows may then include photos it trained on."""
    from ..photos import packaged_model_heldout

    try:
        return packaged_model_heldout(paths), None
    except FileNotFoundError:
        return 0.25, (
            "none of the packaged model's held-out photos is installed: a quarter of the photos is held out, and the "
            "packaged model's rows may include photos it trained on"
        )


def _verdict(
    sr3: Dict[str, float],
    bicubic: Dict[str, float],
    who: str,
    busy: Optional[str] = None,
    trained: bool = True,
    left_out: int = 0,
) -> str:
    """One plain sentence: does `who`, in fidelity mode, beat bicubic on these crops, and by how much.

    Args:
        sr3: mean `psnr`, `ssim` and `consistency` of `who` in fidelity mode.
        bicubic: the same means of bicubic, over the same crops.
        who: the model's name, the sentence's subject.
        busy: `_busy_note`, appended; it replaces the advice to train longer: more minutes on a busy machine would
            not help.
        trained: the demo trained `who`: where it does not beat bicubic, advise training longer. The packaged model
            was not trained by the demo, so no budget of this run explains it.
        left_out: how many crops the means leave out for an infinite PSNR (`_compared_means`), said in the sentence.
    """
    names = {"psnr": "PSNR", "ssim": "SSIM", "consistency": "consistency"}
    skipped = f" ({left_out} crop(s) with an infinite PSNR left out)" if left_out else ""
    if not all(math.isfinite(means[metric]) for means in (sr3, bicubic) for metric in names):
        sentence = f"{who} cannot be judged against bicubic in fidelity mode: a mean is not finite{skipped}."
        return f"{sentence} {busy}" if busy else sentence
    gain = sr3["psnr"] - bicubic["psnr"]
    # A difference the table does not show is a tie: the verdict must not contradict the numbers printed above it.
    better = [
        name
        for metric, name in names.items()
        if _printed(metric, sr3[metric]) != _printed(metric, bicubic[metric])
        and (sr3[metric] > bicubic[metric]) == (metric != "consistency")
    ]
    advise = trained and not busy and not better
    if len(better) == 3:
        sentence = f"{who} beats bicubic in fidelity mode: {gain:+.2f} dB PSNR, and better SSIM and consistency"
    elif better:
        sentence = f"{who} beats bicubic in fidelity mode on {', '.join(better)} only ({gain:+.2f} dB PSNR)"
    elif advise:
        sentence = f"{who} does not beat bicubic in fidelity mode at this training budget ({gain:+.2f} dB)"
    else:
        sentence = f"{who} does not beat bicubic in fidelity mode ({gain:+.2f} dB)"
    sentence += skipped + ("; train longer." if advise else ".")
    return f"{sentence} {busy}" if busy else sentence


def _compared_means(
    method: Dict[str, List[float]], bicubic: Dict[str, List[float]]
) -> Tuple[Dict[str, float], Dict[str, float], int]:
    """The means of `method`'s and bicubic's per-crop metrics over the crops where both PSNRs are finite, and how
    many crops those are.

    A PSNR is infinite where a method reproduces its crop exactly (a perfectly flat one, for bicubic): one such crop
    makes the plain mean infinite whatever the other crops say.
    """
    kept = [
        index
        for index, pair in enumerate(zip(method["psnr"], bicubic["psnr"]))
        if all(math.isfinite(value) for value in pair)
    ]

    def mean(values: Dict[str, List[float]]) -> Dict[str, float]:
        return {name: sum(v[i] for i in kept) / len(kept) if kept else math.nan for name, v in values.items()}

    return mean(method), mean(bicubic), len(kept)


def _verdicts(results: Dict[str, Dict[str, List[float]]], busy: Optional[str] = None) -> str:
    """The verdict of the model trained here and, where it was measured, of the packaged model, from the per-crop
    `results` of every method; `busy` (`_busy_note`) concerns only the model trained here."""
    sentences = []
    for name, who, trained in (("SR3", "The SR3 model trained here", True), (PACKAGED, "The packaged model", False)):
        if f"{name} fidelity" not in results:
            continue
        method = results[f"{name} fidelity"]
        sr3, bicubic, kept = _compared_means(method, results["bicubic"])
        left_out = len(method["psnr"]) - kept
        sentences.append(_verdict(sr3, bicubic, who, busy if trained else None, trained, left_out))
    return " ".join(sentences)


def run(args: argparse.Namespace) -> int:
    """Run the demo into --output, which it holds for its whole run: a second demo (or a training run) into the same
    folder is refused at once, rather than both writing there. Its training holds the model folder's own lock."""
    from ..training.output_lock import claim_output_folder

    with claim_output_folder(args.output, "--output", "sr3 demo"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..backends import default_cpu_threads
    from ..photos import packaged_photo_paths, photo_name, study_crops
    from ..training.output_lock import LOCK_FILE, OutputFolderBusyError, claim_output_folder

    # Not just positive: the clock's seconds must be finite (inf overflows the step plan; nan passes a comparison).
    if not (args.minutes > 0 and math.isfinite(args.minutes * 60)):
        raise ValueError(f"--minutes must be a positive number, got {args.minutes:g}")
    if not 0 < args.strength <= 1:
        raise ValueError(f"--strength must lie in (0, 1], got {args.strength:g}")
    steps_to_run(args.inference_steps, args.strength)  # a strength that leaves no step fails now, not after training
    detail = dict(DEFAULT_DETAIL_OPTIONS, strength=args.strength)
    modes = ("fidelity", SELF_ENSEMBLE, "detail") if args.self_ensemble else MODES
    config = unet_config(args.crop_size, args.width)
    model_dir = os.path.join(args.output, "model")
    _note_set_aside_models(args.output, model_dir)
    # Replacing what a link points to would delete files outside --output; replacing the link would move the model
    # off the disk it points to. Refused before training, so the user chooses.
    if os.path.islink(model_dir):
        raise ValueError(
            f"{model_dir} is a symbolic link; sr3 demo writes its model into a folder of its own: remove the link "
            "(what it points to is kept) or choose another --output"
        )
    # An earlier demo's model folder (a finished one, or an interrupted one's checkpoints) is replaced only when told.
    if (os.path.exists(os.path.join(args.output, "metrics.json")) or os.path.exists(model_dir)) and not args.overwrite:
        raise FileExistsError(
            f"{args.output} already holds a demo (or a model folder); pass --overwrite or choose another --output"
        )
    os.makedirs(args.output, exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        threads, why = default_cpu_threads()
        torch.set_num_threads(threads)
        _progress(args, f"{threads} CPU thread(s) for torch: {why}; --threads sets them")
    torch.manual_seed(args.seed)

    # 1. Whole photographs split into training and held-out sets.
    heldout, note = demo_heldout(packaged_photo_paths())
    if note:
        print(f"note: {note}", file=sys.stderr)
    crops = study_crops(args.crop_size, args.train_crops, args.eval_crops, seed=args.seed, heldout=heldout)
    train_paths, heldout_paths = crops.train_photos, crops.heldout_photos
    _progress(args, f"training photos ({len(train_paths)}): {', '.join(photo_name(p) for p in train_paths)}")
    _progress(args, f"held-out photos ({len(heldout_paths)}): {', '.join(photo_name(p) for p in heldout_paths)}")
    photo = _whole_photo(heldout_paths[0], args.photo_size)  # a --photo-size too small fails now, not after training
    # An earlier demo's model (a finished one, or an interrupted one's checkpoints) waits aside while the new one
    # trains in its place (the card records the folder it was trained in), and comes back if the run fails: a run
    # that fails keeps all of the earlier one, a run that succeeds leaves nothing of it.
    earlier = os.path.join(args.output, f"{EARLIER_MODEL_PREFIX}{uuid.uuid4().hex[:12]}")
    if os.path.isdir(model_dir):
        os.rename(model_dir, earlier)
        try:
            # A training run writing into it (`--output_dir OUT/model`) holds its lock, which moved with it.
            if os.path.isfile(os.path.join(earlier, LOCK_FILE)):
                with claim_output_folder(earlier, "--output", "sr3 demo"):
                    pass
        except OutputFolderBusyError as error:
            os.rename(earlier, model_dir)
            raise OutputFolderBusyError(str(error).replace(earlier, model_dir)) from None
    try:
        _train_and_report(args, config, detail, modes, crops, photo, model_dir)
    except BaseException:
        if os.path.isdir(earlier):
            shutil.rmtree(model_dir, ignore_errors=True)
            os.rename(earlier, model_dir)
        raise
    if os.path.isdir(earlier):
        try:
            shutil.rmtree(earlier)
        except OSError as error:
            # The run is complete: what is left of the earlier model is only disk space.
            print(f"warning: could not remove the earlier demo's model, left in {earlier}: {error}", file=sys.stderr)
        else:
            print(f"removed the earlier demo's model in {model_dir}")
    return 0


def _note_set_aside_models(output: str, model_dir: str) -> None:
    """Say where earlier models set aside by reruns that were killed (`EARLIER_MODEL_PREFIX`) are: left alone, as
    another demo running into `output` may be training beside its own."""
    if not os.path.isdir(output):
        return
    aside = sorted(name for name in os.listdir(output) if name.startswith(EARLIER_MODEL_PREFIX))
    if aside:
        print(
            f"note: {', '.join(os.path.join(output, name) for name in aside)}: the model of an earlier demo, set aside "
            f"while a rerun trained and left there when that run was killed; rename it to {model_dir} to get it back",
            file=sys.stderr,
        )


def _train_and_report(
    args: argparse.Namespace,
    config: Dict[str, Any],
    detail: Dict[str, Any],
    modes: Sequence[str],
    crops: Any,
    photo: PIL.Image.Image,
    model_dir: str,
) -> None:
    """Train the demo's model into `model_dir`, compare it with bicubic, and write the report into --output.

    Args:
        args: the command's options.
        config: the UNet's config.
        detail: detail mode's settings.
        modes: the modes compared.
        crops: the training and held-out crops, and their photos (`study_crops`).
        photo: the whole held-out photo super-resolved.
        model_dir: the model's folder (absent: an earlier demo's is aside until this run is complete).
    """
    import torch

    from .. import metrics
    from ..backends import fast_bfloat16, use_backend
    from ..image_processing import grid, images_to_tensor, tensor_to_pil
    from ..photos import photo_name
    from ..pipelines import SR3Pipeline
    from ..tiling import tiled_super_resolve

    train_crops, hr, train_paths, heldout_paths = crops.train, crops.heldout, crops.train_photos, crops.heldout_photos

    # 2. Train through the training core, for --steps or for --minutes.
    # Mixed bfloat16 where the hardware multiplies it natively: about 1.4x the steps in the same minutes.
    bfloat16 = fast_bfloat16("cuda" if torch.cuda.is_available() else "cpu")
    # The saved model samples as measured here (DDIM, these settings), also through `sr3 upscale --model`; saved so
    # by the training core, its model card describes them.
    sampling = dict(
        sampler="ddim",
        fidelity_steps=DEMO_FIDELITY_STEPS,
        detail_steps=args.inference_steps,
        **{f"detail_{name}": value for name, value in detail.items()},
    )
    started = time.perf_counter()
    # The training core prints its summary on stdout, a training script's result; here it is how the demo goes.
    with contextlib.redirect_stdout(io.StringIO() if args.quiet else sys.stderr):
        steps, planned = _train(train_crops, config, args, model_dir, bfloat16, sampling)
    training_seconds = time.perf_counter() - started
    busy = _busy_note(steps, planned, torch.get_num_threads())

    # 3. Super-resolve held-out crops and one whole held-out photo in both modes; compare with bicubic.
    pipeline = SR3Pipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    lr_pil, lr, bicubic = low_resolution_inputs(hr)
    models = {"SR3": pipeline}
    packaged = _packaged_pipeline() if args.packaged else None
    if packaged is not None:
        models[PACKAGED] = packaged
    outputs = {"bicubic": bicubic}
    started = time.perf_counter()
    for name, model in models.items():
        for mode in modes:
            generator = torch.Generator().manual_seed(args.seed)
            with use_backend(model, "auto"):  # bfloat16 autocast where it is fast, as `sr3 upscale` does
                images = model(
                    lr_pil,
                    generator=generator,
                    output_type="pt",
                    **_mode_options(mode, args.inference_steps, detail),
                )
            outputs[f"{name} {mode}"] = images.images * 2 - 1
    inference_seconds = time.perf_counter() - started
    results = {name: metrics.evaluate_batch(images, hr, lr) for name, images in outputs.items()}
    means = {name: {key: sum(v) / len(v) for key, v in values.items()} for name, values in results.items()}

    magnified = (args.crop_size * 2, args.crop_size * 2)
    columns = [lr] + list(outputs.values()) + [hr]
    rows = [[tensor_to_pil(part[i : i + 1])[0].resize(magnified, 0) for part in columns] for i in range(len(hr))]
    comparison = grid(rows)

    photo_hr = images_to_tensor(photo)
    photo_lr_pil, photo_lr, photo_bicubic = low_resolution_inputs(photo_hr)
    photo_outputs = [photo_bicubic]
    for model in models.values():
        for mode in modes:
            with use_backend(model, "auto"):
                photo_sr = tiled_super_resolve(
                    model,
                    photo_lr_pil,
                    generator=torch.Generator().manual_seed(args.seed),
                    output_type="pt",
                    **_mode_options(mode, args.inference_steps, detail),
                ).images
            photo_outputs.append(photo_sr * 2 - 1)
    photo_row = tensor_to_pil(photo_lr) + tensor_to_pil(torch.cat(photo_outputs + [photo_hr]))
    photo_grid = grid([photo_row])

    # 4. Report what was measured.
    verdict = _verdicts(results, busy)
    lines = [
        f"# SR3 demo: x{UPSCALE_FACTOR} super-resolution, {args.crop_size // UPSCALE_FACTOR} -> {args.crop_size}",
        "",
        f"Trained {steps} steps (batch {args.batch_size}, {training_seconds / 60:.1f} min on "
        f"{torch.get_num_threads()} CPU threads) on {len(train_paths)} photographs; evaluated on {len(hr)} random "
        f"crops of {len(heldout_paths)} held-out photographs ({', '.join(photo_name(p) for p in heldout_paths)}), "
        f"fidelity mode (deterministic DDIM from the noise's mean: {DEMO_FIDELITY_STEPS} steps for the model trained "
        "here" + (f", {packaged.config.fidelity_steps} for the packaged one" if packaged is not None else "") + ") "
        f"and detail mode ({args.inference_steps} DDIM "
        f"steps, eta {detail['eta']:g}, strength {detail['strength']:g})"
        + (", and fidelity mode averaged over the input's 8 flips and quarter-turns" if args.self_ensemble else "")
        + ". Fidelity mode gives the highest PSNR/SSIM; detail mode the sharper texture.",
        "",
        *_table(means),
        "",
        verdict,
        "",
        "Consistency is the SR3 paper's: MSE between the LR input and the bicubic downsample of the output.",
    ]
    report = {
        "steps": steps,
        "planned_steps": planned,
        "cpu_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "crop_size": args.crop_size,
        "upscale_factor": UPSCALE_FACTOR,
        "training_seconds": training_seconds,
        "inference_seconds": inference_seconds,
        "train_photos": [photo_name(p) for p in train_paths],
        "heldout_photos": [photo_name(p) for p in heldout_paths],
        "mean": means,
        "per_image": results,
        "verdict": verdict,
    }
    writes = {
        "comparison.png": lambda stream: comparison.save(stream, format="PNG"),
        "photo.png": lambda stream: photo_grid.save(stream, format="PNG"),
        "metrics.md": lambda stream: stream.write(("\n".join(lines) + "\n").encode("utf-8")),
        "metrics.json": lambda stream: stream.write((json.dumps(report, indent=2) + "\n").encode("utf-8")),
    }
    _write_report(args.output, writes)
    print("\n".join(lines[2:]))
    print(f"wrote comparison.png, photo.png, metrics.md, metrics.json and the model to {args.output}")


def _write_report(output: str, writes: Dict[str, Callable[[BinaryIO], Any]]) -> None:
    """Write the report files into `output` together: all of them, or, on a failure, none (the earlier demo's stay).

    Args:
        output: the demo's folder.
        writes: file name -> function writing the file's data into a stream.
    """
    # Every file is written before any is put in place (as the stack closes): a full disk fails before any of the
    # earlier demo's is replaced. The earlier demo's wait aside while the new ones are put in place, and come back if
    # one fails (Windows: a file open in a viewer).
    aside: Dict[str, str] = {}
    placing = False

    def set_aside() -> None:
        nonlocal placing
        suffix = uuid.uuid4().hex[:12]
        for name in writes:
            if os.path.lexists(os.path.join(output, name)):
                kept = os.path.join(output, f"{EARLIER_REPORT_PREFIX}{suffix}-{name}")
                os.replace(os.path.join(output, name), kept)
                aside[name] = kept  # only once moved: a file that could not be is still in its place
        placing = True

    try:
        with contextlib.ExitStack() as stack:
            for name, write in writes.items():
                write(stack.enter_context(atomic_file(os.path.join(output, name))))
            stack.callback(set_aside)  # the last one in: the first to run as the stack closes
    except BaseException:
        for name in writes:
            if name in aside:
                os.replace(aside[name], os.path.join(output, name))
            elif placing and os.path.lexists(os.path.join(output, name)):
                os.remove(os.path.join(output, name))
        raise
    for earlier in aside.values():
        os.remove(earlier)
