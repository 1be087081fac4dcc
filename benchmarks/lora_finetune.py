"""What `--lora_rank` buys against a full fine-tune of the packaged model, measured with the real trainer.

    python benchmarks/lora_finetune.py --output benchmarks/results/lora_finetune

Fine-tunes `sr3-photos-x4` with `diffusers_sr3.training.train` on the installed photos (random 64-pixel crops) for
`--steps` optimizer steps of batch `--batch`, once per `--ranks` entry (0: every weight, the full fine-tune), each
run writing one checkpoint at its last step. Reports, from each run's `training_summary.json` and folder: the trained
parameters, seconds per optimizer step (the training loop's wall time over its steps, data loading included, the first
step's warm-up too; the photos decoded once, `--cache_images`), the checkpoint's size on disk (weights, optimizer
moments, EMA) and the saved pipeline's UNet size (the same for every run: LoRA runs save it fused). Timings on shared
machines are noisy: compare the rows of one run, and list a rank twice to see the noise. Writes lora_finetune.json
and .md to --output. The results in benchmarks/results/lora_finetune: `--steps 8 --batch 4 --threads 1 --ranks 0 4 16
0 4`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def run(index: int, rank: int, args: argparse.Namespace, scratch: str) -> Dict[str, Any]:
    """One fine-tune of the packaged model (`rank` 0: every weight); what it measured."""
    from diffusers_sr3.photos import packaged_photo_paths
    from diffusers_sr3.pretrained import DEFAULT_MODEL
    from diffusers_sr3.training import TrainingConfig, train

    output = os.path.join(scratch, f"run-{index}-rank-{rank}")  # a rank may be listed twice, to see the noise
    config = TrainingConfig(
        pretrained_model_name_or_path=DEFAULT_MODEL,
        train_images=[str(path) for path in packaged_photo_paths()],
        random_crop=True,
        cache_images=True,  # decoded once: the steps time the network and the optimizer more than the JPEG decoder
        dataset_repeats=args.batch,
        output_dir=output,
        train_batch_size=args.batch,
        max_train_steps=args.steps,
        learning_rate=1e-4,
        lr_warmup_steps=1,
        use_ema=True,
        checkpointing_steps=args.steps,
        validation_steps=0,
        num_validation_images=1,
        validation_steps_count=2,
        report_to="none",
        seed=0,
        num_threads=args.threads,
        lora_rank=rank,
    )
    train(config)
    with open(os.path.join(output, "training_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    unet_file = os.path.join(output, "unet", "diffusion_pytorch_model.safetensors")
    adapter = os.path.join(output, "pytorch_lora_weights.safetensors")
    return dict(
        lora_rank=rank,
        trained_parameters=summary["trained_parameters"],
        seconds_per_step=round(summary["train_seconds"] / summary["steps_this_run"], 3),
        checkpoint_mb=round(folder_bytes(os.path.join(output, f"checkpoint-{args.steps}")) / 2**20, 2),
        saved_unet_mb=round(os.path.getsize(unet_file) / 2**20, 2),
        adapter_mb=round(os.path.getsize(adapter) / 2**20, 3) if os.path.isfile(adapter) else None,
    )


def table(rows: List[Dict[str, Any]], args: argparse.Namespace, cpu: str) -> str:
    full = next((row for row in rows if row["lora_rank"] == 0), rows[0])
    lines = [
        f"Fine-tuning sr3-photos-x4, {args.steps} steps of batch {args.batch} (64-pixel crops), EMA on, {cpu}, "
        f"{args.threads or 'default'} threads",
        "",
        "| run | trained parameters | s / step | vs full | checkpoint MB | saved UNet MB | adapter MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = "full fine-tune" if row["lora_rank"] == 0 else f"LoRA rank {row['lora_rank']}"
        lines.append(
            f"| {name} | {row['trained_parameters']:,} | {row['seconds_per_step']:.3f} | "
            f"{row['seconds_per_step'] / full['seconds_per_step']:.2f}x | {row['checkpoint_mb']} | "
            f"{row['saved_unet_mb']} | {row['adapter_mb'] if row['adapter_mb'] is not None else '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 4, 16], help="LoRA ranks; 0 = full fine-tune")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the trainer's)")
    parser.add_argument("--output", default=None, help="folder for lora_finetune.json / .md")
    args = parser.parse_args(argv)

    from diffusers_sr3.backends import cpu_name

    with tempfile.TemporaryDirectory(prefix="sr3-lora-bench-") as scratch:
        rows = [run(index, rank, args, scratch) for index, rank in enumerate(args.ranks)]
    text = table(rows, args, cpu_name())
    print(text)
    if args.output:
        write_report(args.output, "lora_finetune", dict(vars(args), cpu=cpu_name(), rows=rows), text)


if __name__ == "__main__":
    main()
