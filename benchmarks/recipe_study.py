"""Which recipe makes SR3 beat bicubic on a CPU? Each arm trains for the same CPU time, then is judged on held-out
photos in both sampling modes.

    python benchmarks/recipe_study.py --cpu-minutes 4 --report benchmarks/results/recipe_study
    python benchmarks/recipe_study.py --arms base residual_unscaled --cpu-minutes 1     # a quick look
    python benchmarks/recipe_study.py --list

Every arm changes ONE thing from `BASE` (the shipped sr3-photos-x4 recipe: the `photos_x4` network at the
low-resolution grid, the residual HR - bicubic scaled to unit variance, x0 prediction, L1, AdamW 2e-4, 64-pixel
crops, all training photos). The budget is process CPU time, not wall time, so arms stay comparable on a shared
machine; the study runs one thread (`torch.set_num_threads(1)`).

Data: random crops of the training side of `photo_split(packaged_photo_paths(), heldout=0.25)` at two scales
(longer side 512 and 1024), plus `--extra` photos; evaluation: `--eval-crops` 64-pixel crops of the held-out
photos (longer side 512, never trained on). Fidelity = `SR3Pipeline(mode="fidelity")` (4 deterministic DDIM
steps from the noise's mean), detail = DDIM, `--detail-steps` steps, eta 0. Reported: PSNR and SSIM against
bicubic, edge energy relative to HR (bicubic is ~0.6: blurry), consistency with the input, how far two seeds'
samples differ (0 = the model ignores its noise), training steps, and seconds per step. Writes results.json,
results.md and one picture per arm (bicubic | fidelity | detail | HR, x3 nearest) with --report.

The network, the noise parameterisation, the loss and the sampler are the library's own pieces
(`SR3UNet2DModel`, `training.objective.noise_batch` / `diffusion_loss`, `SR3Pipeline` with a Diffusers scheduler);
only the loop is here, so that a CPU-time budget can stop it mid-run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List

import torch
from diffusers.training_utils import EMAModel

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel
from diffusers_sr3.image_processing import degrade, grid, tensor_to_pil
from diffusers_sr3.metrics import image_quality
from diffusers_sr3.noise import make_scheduler, swap_scheduler, training_betas
from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_split
from diffusers_sr3.presets import get_preset
from diffusers_sr3.training.objective import diffusion_loss, measure_residual_scale, noise_batch, predict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_files import write_json, write_whole  # noqa: E402  (a sibling script: where results are written)

UPSCALE = 4
# Fidelity mode's steps, given explicitly: the committed tables (benchmarks/results/recipe_study, docs/quality.md)
# were measured with 4, and the pipeline's default has since become 1.
FIDELITY_STEPS = 4
# Evaluation crops shown in each arm's picture: every sixth of the first 48.
PICTURED_CROPS = 48
# The shipped recipe. `residual_scale` None = measured from the training crops.
BASE: Dict[str, Any] = dict(
    unet=get_preset("photos_x4").unet_config(),
    residual_scale=None,
    prediction_type="sample",
    schedule=dict(schedule="linear", n_timestep=2000, linear_start=1e-6, linear_end=1e-2),
    snr_gamma=None,
    learning_rate=2e-4,
    crop=64,
    batch_size=16,
    photos="all",
)

FULL_RESOLUTION_UNET = dict(  # the previous packaged network: full resolution, width 32
    BASE["unet"],
    block_out_channels=32,
    channel_multipliers=(1, 2, 4, 8),
    attention_resolutions=(8,),
    pixel_unshuffle_factor=1,
)

# name: (what it changes, the changed BASE entries)
ARMS: Dict[str, tuple] = {
    "base": ("the shipped recipe", {}),
    "residual_unscaled": ("the residual as is (scale 1)", dict(residual_scale=1.0)),
    "epsilon": ("predict the noise (detail mode only)", dict(prediction_type="epsilon")),
    "v_prediction": ("predict v", dict(prediction_type="v_prediction")),
    "min_snr_5": ("min-SNR-5 loss weighting", dict(snr_gamma=5.0)),
    "lr_1e-4": ("learning rate 1e-4", dict(learning_rate=1e-4)),
    "lr_5e-4": ("learning rate 5e-4", dict(learning_rate=5e-4)),
    "cosine_1000": ("cosine schedule, 1000 steps", dict(schedule=dict(schedule="cosine", n_timestep=1000))),
    "width_32": ("half the width (block_out_channels 32)", dict(unet=dict(BASE["unet"], block_out_channels=32))),
    "unshuffle_2": (
        "network at half resolution (unshuffle 2)",
        dict(unet=dict(BASE["unet"], pixel_unshuffle_factor=2, attention_resolutions=(8,))),
    ),
    "full_resolution": ("the previous packaged network (full resolution, width 32)", dict(unet=FULL_RESOLUTION_UNET)),
    "crop_128": ("128-pixel crops", dict(crop=128)),
    "few_photos": ("only the photos of Python packages (no wallpapers, no extras)", dict(photos="python")),
}


def training_crops(recipe: Dict[str, Any], extra: List[str], count: int, seed: int) -> torch.Tensor:
    train, _ = photo_split(packaged_photo_paths(), heldout=0.25)
    if recipe["photos"] == "python":
        train = [path for path in train if "site-packages" in str(path)]
    else:
        train = train + [pathlib.Path(path) for path in extra]
    half = count // 2
    return torch.cat(
        [
            photo_crops(train, recipe["crop"], count=half, seed=seed, max_side=512, output_type="pt"),
            photo_crops(train, recipe["crop"], count=count - half, seed=seed + 7, max_side=1024, output_type="pt"),
        ]
    )


def run_arm(name: str, cpu_seconds: float, args: argparse.Namespace, held: torch.Tensor) -> Dict[str, Any]:
    recipe = copy.deepcopy(BASE)
    recipe.update(copy.deepcopy(ARMS[name][1]))
    torch.manual_seed(0)
    crops = training_crops(recipe, args.extra, args.train_crops if recipe["crop"] == 64 else args.train_crops // 4, 0)
    _, conditions = degrade(crops, UPSCALE)
    scale = recipe["residual_scale"] or measure_residual_scale(crops, conditions)
    unet = SR3UNet2DModel(**recipe["unet"])
    scheduler = make_scheduler(
        "ddpm", prediction_type=recipe["prediction_type"], clip_sample_range=2.0 * scale, **recipe["schedule"]
    )
    betas = training_betas(scheduler)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe["learning_rate"])
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    generator = torch.Generator().manual_seed(0)

    unet.train()
    started, steps = time.process_time(), 0
    wall = time.time()
    while time.process_time() - started < cpu_seconds:
        index = torch.randint(0, crops.shape[0], (recipe["batch_size"],), generator=generator)
        hr, condition = crops[index], conditions[index]
        if torch.rand((), generator=generator) < 0.5:
            hr, condition = hr.flip(-1), condition.flip(-1)
        warmup = min(1.0, (steps + 1) / 100)
        for group in optimizer.param_groups:
            group["lr"] = recipe["learning_rate"] * warmup
        batch = noise_batch(
            unet,
            betas,
            hr,
            condition,
            prediction_type=recipe["prediction_type"],
            generator=generator,
            residual=True,
            residual_scale=scale,
        )
        loss = diffusion_loss(predict(unet, batch), batch, "l1", recipe["snr_gamma"], recipe["prediction_type"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        steps += 1
    cpu_per_step = (time.process_time() - started) / max(steps, 1)
    wall_per_step = (time.time() - wall) / max(steps, 1)
    ema.copy_to(unet.parameters())
    unet.eval()
    return dict(
        name=name,
        changes=ARMS[name][0],
        steps=steps,
        cpu_s_per_step=round(cpu_per_step, 3),
        wall_s_per_step=round(wall_per_step, 3),
        residual_scale=scale,
        **evaluate(unet, scheduler, scale, held, args, name),
    )


@torch.no_grad()
def evaluate(unet, scheduler, scale, held, args, name) -> Dict[str, Any]:
    pipeline = SR3Pipeline(
        unet=unet,
        scheduler=swap_scheduler(scheduler, "ddim"),
        residual=True,
        residual_scale=scale,
        fidelity_steps=FIDELITY_STEPS,
    )
    pipeline.set_progress_bar_config(disable=True)
    low, bicubic = degrade(held, UPSCALE)
    inputs = (low + 1) / 2
    outputs: Dict[str, Any] = {}
    baseline = image_quality(bicubic.clamp(-1, 1), held, low)

    def sample(mode, seed):
        generator = torch.Generator().manual_seed(seed)
        images = [
            pipeline(
                inputs[start : start + 32],
                mode=mode,
                num_inference_steps=args.detail_steps if mode == "detail" else None,
                generator=generator,
                output_type="pt",
            ).images
            for start in range(0, inputs.shape[0], 32)
        ]
        return torch.cat(images) * 2 - 1

    pictures = {}
    modes = ["detail"] if scheduler.config.prediction_type == "epsilon" else ["fidelity", "detail"]
    for mode in modes:
        result = sample(mode, 0)
        quality = image_quality(result, held, low)
        outputs[mode] = dict(
            psnr_gain_db=round(quality["psnr"] - baseline["psnr"], 3),
            ssim_gain=round(quality["ssim"] - baseline["ssim"], 4),
            edge_ratio=round(quality["edge_ratio"], 3),
            consistency_vs_bicubic=round(quality["consistency"] / baseline["consistency"], 3),
        )
        pictures[mode] = result
    outputs["detail"]["two_seeds_differ_255"] = round(
        float((sample("detail", 1) - pictures["detail"]).abs().mean()) * 127.5, 3
    )
    outputs["bicubic"] = dict(
        psnr=round(baseline["psnr"], 3), ssim=round(baseline["ssim"], 4), edge_ratio=round(baseline["edge_ratio"], 3)
    )
    if args.report:
        columns = [bicubic] + [pictures[mode] for mode in modes] + [held]
        rows = [
            [tensor_to_pil(column[i : i + 1])[0] for column in columns]
            for i in range(0, min(PICTURED_CROPS, held.shape[0]), 6)
        ]
        picture = grid(rows)
        picture = picture.resize((picture.width * 3, picture.height * 3), 0)
        picture.save(os.path.join(args.report, f"{name}.png"))
    return outputs


def markdown(results: List[Dict[str, Any]], cpu_minutes: float) -> str:
    lines = [
        f"Each arm: {cpu_minutes:g} CPU-minutes of training (one thread), then held-out 64-pixel crops. Gains are "
        "against bicubic; edge energy is relative to HR (1 = as sharp as HR).",
        "",
        "| arm | changes | steps | CPU s/step | fidelity dB | fidelity SSIM | fidelity edges | detail dB | "
        "detail SSIM | detail edges | detail consistency / bicubic | seeds differ (/255) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fidelity = r.get("fidelity", {})
        detail = r["detail"]
        lines.append(
            f"| {r['name']} | {r['changes']} | {r['steps']} | {r['cpu_s_per_step']} | "
            f"{fidelity.get('psnr_gain_db', 'n/a')} | {fidelity.get('ssim_gain', 'n/a')} | "
            f"{fidelity.get('edge_ratio', 'n/a')} | {detail['psnr_gain_db']} | {detail['ssim_gain']} | "
            f"{detail['edge_ratio']} | {detail['consistency_vs_bicubic']} | {detail['two_seeds_differ_255']} |"
        )
    if results:
        bicubic = results[0]["bicubic"]
        lines += ["", f"Bicubic: PSNR {bicubic['psnr']} dB, SSIM {bicubic['ssim']}, edges {bicubic['edge_ratio']}."]
    return "\n".join(lines) + "\n"


def study_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """What makes two runs' arms comparable, as results.json records it."""
    return dict(
        cpu_minutes=args.cpu_minutes,
        base=str(BASE),
        fidelity_steps=FIDELITY_STEPS,
        detail_steps=args.detail_steps,
        train_crops=args.train_crops,
        eval_crops=args.eval_crops,
        extra=list(args.extra),
    )


def earlier_report(folder: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The earlier run's `folder/results.json` (empty without one; its arms are merged into this run's, its notes
    kept); a run of other settings is refused.

    Settings an older results.json does not record are not compared: it predates them.
    """
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        earlier = json.load(handle)
    differ = sorted(key for key in settings if key in earlier and earlier[key] != settings[key])
    if differ:
        raise ValueError(f"{path} holds a run with other settings ({', '.join(differ)}): give another --report folder")
    return earlier


def merged(earlier: List[Dict[str, Any]], results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The earlier arms with this run's in place of the same names, then this run's new arms."""
    new = {r["name"]: r for r in results}
    kept = [new.pop(r["name"], r) for r in earlier]
    return kept + list(new.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--cpu-minutes", type=float, default=4.0, help="training budget per arm (process CPU time)")
    parser.add_argument("--train-crops", type=int, default=4096, help="64-pixel training crops in memory")
    parser.add_argument("--eval-crops", type=int, default=256, help="held-out 64-pixel evaluation crops")
    parser.add_argument("--detail-steps", type=int, default=10, help="DDIM steps of detail mode")
    parser.add_argument("--extra", nargs="*", default=[], help="more training photographs")
    parser.add_argument("--report", help="folder for results.json, results.md and pictures")
    parser.add_argument("--list", action="store_true", help="print the arms and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (changes, _) in ARMS.items():
            print(f"{name:20s} {changes}")
        return
    settings = study_settings(args)
    earlier: Dict[str, Any] = {}
    if args.report:
        try:
            earlier = earlier_report(args.report, settings)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        os.makedirs(args.report, exist_ok=True)
    torch.set_num_threads(1)
    _, held_paths = photo_split(packaged_photo_paths(), heldout=0.25)
    held = photo_crops(held_paths, 64, count=args.eval_crops, seed=1, max_side=512, output_type="pt")
    results = []
    for name in args.arms:
        results.append(run_arm(name, args.cpu_minutes * 60, args, held))
        print(json.dumps(results[-1]), flush=True)
        if args.report:
            every_arm = merged(earlier.get("results", []), results)
            write_json(os.path.join(args.report, "results.json"), dict(earlier, **settings, results=every_arm))
            table = markdown(every_arm, args.cpu_minutes)
            write_whole(os.path.join(args.report, "results.md"), lambda handle, text=table: handle.write(text))
    print(markdown(results, args.cpu_minutes))


if __name__ == "__main__":
    main()
