"""Turn a trained x4 pipeline folder into the packaged `sr3-photos-x4` (the model `sr3 upscale` uses by default).

    python benchmarks/package_model.py --trained /runs/photos-x4 --output src/diffusers_sr3/pretrained/sr3-photos-x4

What it changes, and why:
- weights in bfloat16 (half the size in the wheel; the noise-level embeddings stay float32, as the model
  requires). They load as float32 by default: bf16 convolutions are slow on CPUs without bf16 units;
- the scheduler becomes DDIM on the same training schedule: detail mode samples in 10 steps (the step-count and
  recipe studies); fidelity mode keeps the trained pipeline's `fidelity_steps`, 1 unless it was saved with its own
  (one step measured as well as 4 on the packaged model: docs/quality.md, "Fidelity in one evaluation");
- detail mode's studied settings (`diffusers_sr3.pretrained`: 10 steps, eta 1, strength 0.6, windows of the training
  crop's size, `--window-size`, 64 by default) go into the pipeline's config (`detail_steps`, `detail_eta`,
  `detail_strength`, `detail_window_size`), so that every way of loading the model samples with them: `sr3 upscale
  --model`, `from_pretrained`, the Space;
- with `--guidance-unet` (an earlier checkpoint of the same run, `OUTPUT_DIR/checkpoint-<step>`: its EMA weights;
  or a `unet` folder, or a pipeline folder holding one) and `--guidance-scale`, the pipeline carries a guide for
  detail mode's autoguidance, also in bfloat16;
- the training summary is kept (the model card quotes it); checkpoints, logs and the training-time card are not
  (the card is rewritten by `benchmarks/model_report.py --write-card` from the held-out evaluation).
The output folder is replaced as a whole, after the new one is complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel
from diffusers_sr3.noise import swap_scheduler
from diffusers_sr3.pretrained import DEFAULT_DETAIL_OPTIONS, DEFAULT_DETAIL_WINDOW_SIZE, DEFAULT_STEPS
from diffusers_sr3.training.checkpointing import STATE_FILE, load_checkpoint_unet


def to_bfloat16(unet: SR3UNet2DModel) -> SR3UNet2DModel:
    """`unet` in bfloat16, but for the modules the model keeps in float32 (the noise-level embeddings)."""
    unet.to(torch.bfloat16)
    for name in unet._keep_in_fp32_modules:
        module = getattr(unet, name, None)
        if module is not None:
            module.float()
    return unet


def load_unet(folder: str) -> SR3UNet2DModel:
    """The SR3 UNet in `folder`: a UNet folder, a pipeline folder with a `unet` subfolder, or a training checkpoint
    (`OUTPUT_DIR/checkpoint-<step>`: its EMA weights)."""
    if os.path.isfile(os.path.join(folder, STATE_FILE)):
        return load_checkpoint_unet(folder)
    nested = os.path.join(folder, "unet")
    return SR3UNet2DModel.from_pretrained(nested if os.path.isdir(nested) else folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained", required=True, help="the pipeline folder the training script wrote")
    parser.add_argument("--output", required=True, help="the packaged folder to (re)write")
    parser.add_argument(
        "--guidance-unet",
        help="the guide for autoguidance: an earlier training checkpoint of the run, or a UNet or pipeline folder",
    )
    parser.add_argument("--guidance-scale", type=float, help="detail mode's default guidance scale (with a guide)")
    parser.add_argument(
        "--window-size",
        type=int,
        default=DEFAULT_DETAIL_WINDOW_SIZE,
        help="detail mode's default windows: the training crop size (0: the whole image only)",
    )
    args = parser.parse_args(argv)
    if (args.guidance_unet is None) != (args.guidance_scale is None):
        parser.error("--guidance-unet and --guidance-scale go together")

    guidance = {}
    if args.guidance_unet:
        guidance = {"guidance_unet": load_unet(args.guidance_unet), "guidance_scale": args.guidance_scale}
    detail = {
        "detail_steps": DEFAULT_STEPS,
        "detail_eta": DEFAULT_DETAIL_OPTIONS["eta"],
        "detail_strength": DEFAULT_DETAIL_OPTIONS["strength"],
        "detail_window_size": args.window_size,
    }
    pipeline = SR3Pipeline.from_pretrained(args.trained, **guidance, **detail)
    if not pipeline.config.get("residual") or pipeline.scheduler.config.prediction_type != "sample":
        raise ValueError(f"{args.trained} is not a residual x0-prediction model: not the shipped recipe")
    pipeline.scheduler = swap_scheduler(pipeline.scheduler, "ddim")
    for unet in (pipeline.unet, pipeline.guidance_unet):
        if unet is not None:
            to_bfloat16(unet)
    parent = os.path.dirname(os.path.abspath(args.output))
    staging = tempfile.mkdtemp(prefix=".package-", dir=parent)
    try:
        pipeline.save_pretrained(staging)
        summary = os.path.join(args.trained, "training_summary.json")
        if os.path.isfile(summary):
            shutil.copy(summary, os.path.join(staging, "training_summary.json"))
        for root, _, files in os.walk(staging):  # mkdtemp's private modes would ship with the wheel
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        shutil.rmtree(args.output, ignore_errors=True)
        os.replace(staging, args.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"packaged {args.trained} -> {args.output}")


if __name__ == "__main__":
    main()
