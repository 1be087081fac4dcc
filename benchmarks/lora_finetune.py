"""Does `--lora_rank` fine-tune the packaged model as well as a full fine-tune, and what does it buy? Measured with the
real trainer.

    python benchmarks/lora_finetune.py --output benchmarks/results/lora_finetune

Fine-tunes `--model` (default `sr3-photos-x4`) with `diffusers_sr3.training.train` on random crops of the model's size
(64 pixels for the packaged model) of `--train_data_dir` (default: the installed photos) for `--steps` optimizer steps
of batch `--batch`, once per `--ranks` entry (0: every weight, the full fine-tune), at the matching `--learning_rates`
and `--seeds` entry (one value: every run), with the README's fine-tuning recipe (AdamW, a warm-up of a tenth of the
steps, EMA of decay 0.999 with its warm-up, one timestep per sample), each run writing one checkpoint at its last step.
Reports, from each run's `training_summary.json` and folder: the trained parameters, seconds per optimizer step (the
training loop's wall time over its steps, data loading included, the first step's warm-up too; the photos decoded once,
`--cache_images`), the peak memory of training (each run trains in a process of its own: on CPU its peak resident
memory, libraries and model included; on CUDA the peak allocated), the checkpoint's size on disk (weights, optimizer
moments, EMA) and the saved pipeline's UNet size (the same for every run: LoRA runs save it fused). Timings on shared
machines are noisy: compare the rows of one run, and list an arm twice to see the noise.

With `--eval_dir`, a dataset made by `sr3 prepare` of images none of the runs trained on (its `lr_*` and `hr_*`
folders), it also scores every saved model, the model before fine-tuning and bicubic on those images, super-resolved
whole: fidelity mode's PSNR, SSIM and consistency (as `sr3 eval` computes them) and its edge energy relative to the
HR's; `--detail` adds detail mode's (each model's own detail settings, image i drawn with seed i). `--picture` saves a
side-by-side of magnified crops (bicubic, the model before, each run, HR) as `<output>/lora_finetune.png`. `--work_dir`
keeps the runs there (otherwise a temporary folder): a run whose folder holds its results is not trained again, so a
stopped study goes on where it stopped. Writes lora_finetune.json and .md to --output.

The results in benchmarks/results/lora_finetune: `--steps 8 --batch 4 --threads 1 --ranks 0 4 16 0 4` (measured before
the recipe above: a one-step warm-up, EMA decay 0.9999, one timestep per batch; no peak memory); in
benchmarks/results/lora (faces): see its README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_json, write_report  # noqa: E402  (a sibling script: where results are written)

# What a run's folder holds once the benchmark has measured it: a later call with the same --work_dir reuses it.
RUN_RESULTS = "lora_finetune_run.json"
# Settings that runs recorded by an earlier version of this script lack, as those runs had them: before
# --lr_blur_sigma, the training inputs were not blurred.
RECORDED_BEFORE = {"lr_blur_sigma": 0.0}
# Output pixels per side of each picture crop, and its magnification.
PICTURE_CROP = 96
PICTURE_MAGNIFY = 2


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def peak_memory_mb() -> float:
    """This process's peak memory so far, MiB: CUDA's peak allocated where CUDA is, else the peak resident memory
    (the libraries and the model loaded included: each run trains in a process of its own)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)


def run_name(rank: int, learning_rate: float, seed: int, earlier: Sequence[str]) -> str:
    """The run's folder name; an arm listed again (to see the timing noise) gets its own folder."""
    name = f"rank-{rank}-lr-{learning_rate:g}-seed-{seed}"
    repeats = sum(1 for other in earlier if other == name or other.startswith(name + "-again"))
    return f"{name}-again{repeats}" if repeats else name


def run_settings(rank: int, learning_rate: float, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    return dict(
        lora_rank=rank,
        learning_rate=learning_rate,
        seed=seed,
        steps=args.steps,
        batch=args.batch,
        model=args.model,
        train_data_dir=args.train_data_dir,
        lr_blur_sigma=args.lr_blur_sigma,
    )


def measured_run(rank: int, learning_rate: float, seed: int, output: str, args: argparse.Namespace) -> Dict[str, Any]:
    """What one fine-tune of `args.model` (`rank` 0: every weight) into `output` measured: trained in a process of
    its own (its peak memory is that run's alone), or reused when `output` holds the results of the same settings."""
    settings = run_settings(rank, learning_rate, seed, args)
    results_file = os.path.join(output, RUN_RESULTS)
    if os.path.isfile(results_file):
        with open(results_file, encoding="utf-8") as handle:
            row = json.load(handle)
        recorded = dict(RECORDED_BEFORE, **row["settings"])
        if recorded != settings:
            differing = ", ".join(
                f"{key} {recorded.get(key)!r} there, {settings.get(key)!r} now"
                for key in sorted(set(recorded) | set(settings))
                if recorded.get(key) != settings.get(key)
            )
            raise SystemExit(f"{output} holds a run of other settings ({differing}): give another --work_dir")
        row["settings"] = recorded
        print(f"{os.path.basename(output)}: measured earlier, reused", flush=True)
        return row
    stopped = sorted(glob.glob(os.path.join(output, "checkpoint-*")))
    if stopped:  # the trainer refuses to start over them, and a run resumed at its last step measures no steps
        raise SystemExit(
            f"{output} holds a run stopped before the benchmark recorded its results "
            f"({', '.join(os.path.basename(path) for path in stopped)}): remove the folder to train it again"
        )
    command = [sys.executable, os.path.abspath(__file__), "--run_dir", output, "--ranks", str(rank)]
    command += ["--learning_rates", repr(learning_rate), "--seeds", str(seed)]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--model", args.model]
    command += ["--lr_blur_sigma", repr(args.lr_blur_sigma)]
    for option in ("threads", "train_data_dir"):
        if getattr(args, option) is not None:
            command += [f"--{option}", str(getattr(args, option))]
    subprocess.run(command, check=True)
    with open(results_file, encoding="utf-8") as handle:
        return json.load(handle)


def train_run(rank: int, learning_rate: float, seed: int, output: str, args: argparse.Namespace) -> None:
    """Fine-tune `args.model` (`rank` 0: every weight) into `output` and write what it measured there."""
    from diffusers_sr3.photos import packaged_photo_paths
    from diffusers_sr3.training import TrainingConfig, train

    data = (
        dict(train_data_dir=args.train_data_dir)
        if args.train_data_dir
        else dict(train_images=[str(path) for path in packaged_photo_paths()])
    )
    config = TrainingConfig(
        pretrained_model_name_or_path=args.model,
        **data,
        random_crop=True,
        cache_images=True,  # decoded once: the steps time the network and the optimizer more than the JPEG decoder
        dataset_repeats=args.batch,
        output_dir=output,
        train_batch_size=args.batch,
        max_train_steps=args.steps,
        learning_rate=learning_rate,
        lr_warmup_steps=max(1, args.steps // 10),
        use_ema=True,
        ema_decay=0.999,
        ema_use_warmup=True,
        per_sample_timestep=True,
        checkpointing_steps=args.steps,
        validation_steps=0,
        num_validation_images=1,
        validation_steps_count=2,
        report_to="none",
        seed=seed,
        num_threads=args.threads,
        lora_rank=rank,
        lr_blur_sigma=args.lr_blur_sigma,
    )
    train(config)
    with open(os.path.join(output, "training_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    unet_file = os.path.join(output, "unet", "diffusion_pytorch_model.safetensors")
    adapter = os.path.join(output, "pytorch_lora_weights.safetensors")
    row = dict(
        settings=run_settings(rank, learning_rate, seed, args),
        lora_rank=rank,
        learning_rate=learning_rate,
        seed=seed,
        trained_parameters=summary["trained_parameters"],
        seconds_per_step=round(summary["train_seconds"] / summary["steps_this_run"], 3),
        peak_memory_mb=peak_memory_mb(),
        checkpoint_mb=round(folder_bytes(os.path.join(output, f"checkpoint-{args.steps}")) / 2**20, 2),
        saved_unet_mb=round(os.path.getsize(unet_file) / 2**20, 2),
        adapter_mb=round(os.path.getsize(adapter) / 2**20, 3) if os.path.isfile(adapter) else None,
    )
    write_json(os.path.join(output, RUN_RESULTS), row)


def prepared_pair(folder: str) -> Dict[str, str]:
    """The `lr_*` and `hr_*` folders of a dataset made by `sr3 prepare`; anything else is an error naming them."""
    found = {kind: sorted(glob.glob(os.path.join(folder, f"{kind}_*"))) for kind in ("lr", "hr")}
    if not all(len(paths) == 1 for paths in found.values()):
        raise SystemExit(
            f"--eval_dir {folder} needs one lr_* and one hr_* folder (made by `sr3 prepare`), found {found}"
        )
    return {kind: paths[0] for kind, paths in found.items()}


def load_pairs(folder: str):
    """`(lr, hr, names)`: the evaluation images in [-1, 1], matched by file name."""
    import torch

    from diffusers_sr3.image_io import find_images, open_image
    from diffusers_sr3.image_processing import images_to_tensor

    pair = prepared_pair(folder)
    names = [os.path.basename(path) for path in find_images([pair["hr"]])]
    missing = [name for name in names if not os.path.isfile(os.path.join(pair["lr"], name))]
    if not names or missing:
        raise SystemExit(f"--eval_dir {folder}: no images, or HR images without their LR: {missing}")
    lr, hr = (
        torch.cat([images_to_tensor(open_image(os.path.join(pair[kind], name))) for name in names])
        for kind in ("lr", "hr")
    )
    return lr, hr, names


def blurred(lr, sigma: float):
    """Each LR image blurred as the trainer's `--lr_blur_sigma` blurs it, at this one sigma."""
    import torch

    from diffusers_sr3.data.pairs import gaussian_blur

    return torch.stack([gaussian_blur(image, sigma) for image in lr])


def super_resolve(pipeline: Any, lr, mode: str):
    """The pipeline's outputs in [-1, 1] for `lr` in [-1, 1], one image at a time, at its own steps for `mode`."""
    import torch

    outputs = []
    for index in range(lr.shape[0]):
        generator = torch.Generator().manual_seed(index)
        image = (lr[index : index + 1] + 1) / 2
        outputs.append(pipeline(image, mode=mode, generator=generator, output_type="pt").images.cpu() * 2 - 1)
    return torch.cat(outputs)


def score(sr, hr, lr) -> Dict[str, float]:
    from diffusers_sr3.metrics import image_quality

    quality = image_quality(sr, hr, lr)
    return {name: quality[name] for name in ("psnr", "ssim", "consistency", "edge_ratio")}


def evaluate(folder: Optional[str], lr, hr, args: argparse.Namespace) -> Dict[str, Any]:
    """Scores and outputs of the pipeline in `folder` (None: bicubic) on the evaluation images."""
    from diffusers_sr3 import SR3Pipeline
    from diffusers_sr3.image_processing import upsample_condition

    if folder is None:
        outputs = {"fidelity": upsample_condition(lr, tuple(hr.shape[-2:]))}
    else:
        pipeline = SR3Pipeline.from_pretrained(folder)
        pipeline.set_progress_bar_config(disable=True)
        modes = ["fidelity", "detail"] if args.detail else ["fidelity"]
        outputs = {mode: super_resolve(pipeline, lr, mode) for mode in modes}
    return dict(scores={mode: score(sr, hr, lr) for mode, sr in outputs.items()}, outputs=outputs)


def repeat_of(run_folder: str) -> str:
    """`, again N` for the Nth repeat of an arm (as `run_name` names its folder), else nothing: the scores and the
    picture are keyed by label, so a repeat needs its own."""
    _, again, count = run_folder.rpartition("-again")
    return f", again {count}" if again else ""


def run_label(row: Dict[str, Any], run_folder: str) -> str:
    name = "full fine-tune" if row["lora_rank"] == 0 else f"LoRA rank {row['lora_rank']}"
    return f"{name}, lr {row['learning_rate']:g}, seed {row['seed']}{repeat_of(run_folder)}"


def short_label(row: Dict[str, Any], run_folder: str) -> str:
    """A picture column's name: it has a few pixels per character."""
    name = "full" if row["lora_rank"] == 0 else f"LoRA r{row['lora_rank']}"
    learning_rate = f"{row['learning_rate']:.0e}"
    if float(learning_rate) != row["learning_rate"]:  # 1.2e-3 is not 1e-3
        learning_rate = f"{row['learning_rate']:g}"
    learning_rate = learning_rate.replace("e-0", "e-")
    return f"{name}, {learning_rate}" + (f", seed {row['seed']}" if row["seed"] else "") + repeat_of(run_folder)


def picture(columns: Dict[str, Any], hr, path: str) -> None:
    """A row per evaluation image: the same crop (centred a little above the middle, where a face's eyes are) of
    each column's fidelity output and of the HR, magnified with nearest neighbour, each column named on top."""
    import PIL.Image
    import PIL.ImageDraw

    from diffusers_sr3.image_processing import tensor_to_pil

    height, width = hr.shape[-2:]
    size = min(PICTURE_CROP, height, width)
    top, left = max(0, int(height * 0.42) - size // 2), (width - size) // 2
    cells = dict(columns, HR=hr)
    cell = size * PICTURE_MAGNIFY
    caption = 14
    canvas = PIL.Image.new("RGB", (cell * len(cells), caption + cell * hr.shape[0]), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for column, (name, images) in enumerate(cells.items()):
        draw.text((column * cell + 2, 1), name, fill="black")
        crops = tensor_to_pil(images[:, :, top : top + size, left : left + size])
        for row, crop in enumerate(crops):
            canvas.paste(crop.resize((cell, cell), PIL.Image.NEAREST), (column * cell, caption + row * cell))
    canvas.save(path, optimize=True)


def speed_table(rows: List[Dict[str, Any]], names: List[str], args: argparse.Namespace, cpu: str) -> List[str]:
    full = next((row for row in rows if row["lora_rank"] == 0), rows[0])
    lines = [
        f"Fine-tuning {os.path.basename(args.model.rstrip('/'))}, {args.steps} steps of batch {args.batch} "
        f"(random crops of the model's size{blurred_inputs(args)}), EMA on, {cpu}, {args.threads or 'default'} threads",
        "",
        "| run | trained parameters | s / step | vs full | peak memory MB | checkpoint MB | saved UNet MB "
        "| adapter MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, name in zip(rows, names):
        lines.append(
            f"| {run_label(row, name)} | {row['trained_parameters']:,} | {row['seconds_per_step']:.3f} | "
            f"{row['seconds_per_step'] / full['seconds_per_step']:.2f}x | {row['peak_memory_mb']:.0f} | "
            f"{row['checkpoint_mb']} | {row['saved_unet_mb']} | "
            f"{row['adapter_mb'] if row['adapter_mb'] is not None else '-'} |"
        )
    return lines


def blurred_inputs(args: argparse.Namespace) -> str:
    if not args.lr_blur_sigma:
        return ""
    return f"; LR inputs blurred, Gaussian sigma uniform in [0, {args.lr_blur_sigma:g}] LR pixels"


def quality_table(
    scores: Dict[str, Dict[str, Dict[str, float]]], count: int, detail: bool, eval_blur: float
) -> List[str]:
    modes = ["fidelity", "detail"] if detail else ["fidelity"]
    header = (
        "| model | "
        + " | ".join(f"{mode} PSNR | {mode} SSIM | {mode} edge energy / HR's" for mode in modes)
        + " | fidelity consistency x1e5 |"
    )
    lines = [
        "",
        f"On {count} held-out images"
        + (f", their LR inputs blurred (Gaussian, sigma {eval_blur:g} LR pixels)," if eval_blur else ",")
        + " super-resolved whole (edge energy: 1.0 is the HR's; consistency: MSE of the "
        "downsampled output against the LR input, x1e5, as the SR3 paper reports it)",
        "",
        header,
        "|" + "---|" * (2 + 3 * len(modes)),
    ]
    for name, by_mode in scores.items():
        cells = []
        for mode in modes:
            values = by_mode.get(mode, by_mode["fidelity"])  # bicubic: one output for both modes
            cells.append(f"{values['psnr']:.3f} | {values['ssim']:.4f} | {values['edge_ratio']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {by_mode['fidelity']['consistency'] * 1e5:.3f} |")
    return lines


def per_value(values: Sequence[float], count: int, name: str) -> List[float]:
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise SystemExit(f"--{name}: give one value, or one per --ranks entry ({count}), not {len(values)}")
    return list(values)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 4, 16], help="LoRA ranks; 0 = full fine-tune")
    parser.add_argument(
        "--learning_rates", type=float, nargs="+", default=[1e-4], help="one for every run, or one per --ranks entry"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one for every run, or one per --ranks entry")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the trainer's)")
    parser.add_argument("--model", default=None, help="model to fine-tune (default: sr3-photos-x4)")
    parser.add_argument(
        "--train_data_dir", default=None, help="folder of training images (default: the installed photos)"
    )
    parser.add_argument(
        "--lr_blur_sigma",
        type=float,
        default=0.0,
        help="a new degradation to adapt to: each training LR blurred, Gaussian sigma uniform in [0, this]",
    )
    parser.add_argument(
        "--eval_lr_blur_sigma",
        type=float,
        default=0.0,
        help="with --eval_dir: blur each held-out LR input by this Gaussian sigma (LR pixels) before scoring",
    )
    parser.add_argument("--eval_dir", default=None, help="`sr3 prepare` output of held-out images: score every model")
    parser.add_argument("--detail", action="store_true", help="with --eval_dir: score detail mode too")
    parser.add_argument("--picture", action="store_true", help="with --eval_dir: save lora_finetune.png to --output")
    parser.add_argument("--work_dir", default=None, help="keep the runs here; finished runs are reused")
    parser.add_argument("--output", default=None, help="folder for lora_finetune.json / .md")
    # How the benchmark trains each run in a process of its own: that one run, into this folder.
    parser.add_argument("--run_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    learning_rates = per_value(args.learning_rates, len(args.ranks), "learning_rates")
    seeds = per_value(args.seeds, len(args.ranks), "seeds")
    if (args.detail or args.picture or args.eval_lr_blur_sigma) and not args.eval_dir:
        parser.error("--detail, --picture and --eval_lr_blur_sigma score on held-out images: give --eval_dir")
    if args.lr_blur_sigma < 0 or args.eval_lr_blur_sigma < 0:
        parser.error("blur sigmas must not be negative")
    if args.picture and not args.output:
        parser.error("--picture saves into --output: give it")

    from diffusers_sr3.backends import cpu_name
    from diffusers_sr3.pretrained import DEFAULT_MODEL

    if args.model is None:
        args.model = DEFAULT_MODEL
    if args.run_dir:
        train_run(args.ranks[0], learning_rates[0], seeds[0], args.run_dir, args)
        return
    evaluation = load_pairs(args.eval_dir) if args.eval_dir else None  # a bad folder stops before any training
    if evaluation is not None and args.eval_lr_blur_sigma:
        evaluation = (blurred(evaluation[0], args.eval_lr_blur_sigma),) + evaluation[1:]

    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sr3-lora-bench-"))
        rows, names = [], []
        for rank, learning_rate, seed in zip(args.ranks, learning_rates, seeds):
            names.append(run_name(rank, learning_rate, seed, names))
            rows.append(measured_run(rank, learning_rate, seed, os.path.join(work_dir, names[-1]), args))
        scores, columns = {}, {}
        if evaluation is not None:
            lr, hr, _ = evaluation
            arms = [("bicubic", "bicubic", None), ("before fine-tuning", "before", args.model)]
            arms += [
                (run_label(row, name), short_label(row, name), os.path.join(work_dir, name))
                for row, name in zip(rows, names)
            ]
            for label, short, folder in arms:
                evaluated = evaluate(folder, lr, hr, args)
                scores[label] = evaluated["scores"]
                columns[short] = evaluated["outputs"]["fidelity"]
                print(f"{label}: {scores[label]}", flush=True)
            if args.picture:
                os.makedirs(args.output, exist_ok=True)
                picture(columns, hr, os.path.join(args.output, "lora_finetune.png"))
    lines = speed_table(rows, names, args, cpu_name())
    if evaluation is not None:
        lines += quality_table(scores, evaluation[0].shape[0], args.detail, args.eval_lr_blur_sigma)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        report = dict(vars(args), cpu=cpu_name(), rows=rows, scores=scores)
        write_report(args.output, "lora_finetune", report, text)


if __name__ == "__main__":
    main()
