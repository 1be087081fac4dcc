"""Probe: is the low-resolution network's pixel-shuffle head what keeps texture out of its samples?

`photos_x4` runs its whole UNet on the 16x16 grid of a 64-pixel crop and unfolds each grid cell's 48 outputs into a
4x4 patch: no layer sees neighbouring pixels at the output's resolution. Super-resolution networks that work at the
low resolution (EDSR, ESRGAN) end with convolutions at the high one. This fine-tunes the packaged network two ways for
the same wall-clock time, on one thread each (run the two arms side by side):

- `plain`: the packaged UNet as it is;
- `head`: the same UNet followed by a small full-resolution head, `prediction + conv(SiLU(conv(SiLU(conv([noisy
  input, condition, prediction])) + level embedding)))` with `--head-width` channels, its last convolution
  zero-initialised so that it starts as the packaged model exactly.

Both arms use the shipped objective (x0 of the residual scaled by the model's `residual_scale`, L1, per-sample levels
of the training schedule, batch 16 of 64-pixel crops with flips and quarter-turns; float32, as CPUs without
bfloat16 instructions run bfloat16 autocast ~17x slower), AdamW 1e-4
decaying linearly to 0 over `--minutes` of wall-clock time (the head's own parameters at `--head-lr`), EMA 0.999.
Each writes an `SR3Pipeline` folder (the packaged one with the arm's EMA UNet) and, for `head`, `head.safetensors`,
which `probe.py` beside this file adds to the UNet for `benchmarks/samplers.py`.

    python finetune.py --arm plain --tiles TILES --minutes 45 --output OUT/plain
    python finetune.py --arm head --tiles TILES --minutes 45 --output OUT/head

A later probe reuses it: `--band FIRST LAST SHARE` draws SHARE of the training levels from steps FIRST..LAST of the
schedule, where the model decides texture, and `--steps` fixes the step count instead of the time
(`../deciding-band-finetune/`: `--arm plain --band 900 1500 0.75 --steps 2072`, the plain arm's step count). Without
`--band` the draws are the same as before it existed, so the published arms rerun unchanged. `--base` fine-tunes another
`SR3Pipeline` folder than the packaged one (`../widened-network/`: the packaged network widened).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from torch import nn

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.data.pairs import PairMaker
from diffusers_sr3.noise import sample_training_noise_levels, sqrt_alphas_cumprod_prev, training_betas
from diffusers_sr3.pretrained import default_model_path
from diffusers_sr3.training.objective import diffusion_loss, noise_batch


class FullResolutionHead(nn.Module):
    """Three 3x3 convolutions at the output's resolution over the network input and its prediction; adds to the
    prediction. The last convolution starts at zero, so the head starts as the identity."""

    def __init__(self, image_channels: int, condition_channels: int, embedding_channels: int, width: int):
        super().__init__()
        self.conv_in = nn.Conv2d(condition_channels + 2 * image_channels, width, 3, padding=1)
        self.embedding_proj = nn.Linear(embedding_channels, width)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, network_input: torch.Tensor, prediction: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.conv_in(torch.cat([network_input, prediction.to(network_input.dtype)], dim=1)))
        hidden = hidden + self.embedding_proj(embedding)[:, :, None, None].to(hidden.dtype)
        hidden = F.silu(self.conv_mid(hidden))
        return prediction + self.conv_out(hidden)


def head_for(unet, width: int) -> FullResolutionHead:
    embedding_channels = unet.noise_level_embedding.linear_2.out_features
    image = unet.config.out_channels
    return FullResolutionHead(image, unet.config.in_channels - image, embedding_channels, width)


def predict_with_head(unet, head, network_input, level):
    prediction = unet(network_input, level).sample
    if head is None:
        return prediction
    return head(network_input, prediction, unet.noise_level_embedding(level))


def load_tiles(folder: Path) -> torch.Tensor:
    tiles = [np.asarray(PIL.Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 128, 128)


def random_batch(
    tiles: torch.Tensor, pairs: PairMaker, count: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`count` training pairs `(hr, condition)` from random tiles, made as the training script makes them."""
    picks = torch.randint(0, tiles.shape[0], (count,), generator=generator)
    samples = [pairs(tiles[index].float() / 127.5 - 1, generator=generator) for index in picks.tolist()]
    return torch.stack([sample["hr"] for sample in samples]), torch.stack([sample["condition"] for sample in samples])


def training_levels(
    betas: torch.Tensor, count: int, band: Optional[Tuple[int, int, float]], generator: torch.Generator
) -> torch.Tensor:
    """SR3's training levels, per sample; with `band = (first, last, share)`, `share` of them drawn from steps
    `first..last` of the schedule instead (between neighbouring table entries, as SR3 draws)."""
    levels = sample_training_noise_levels(betas, count, generator=generator, per_sample_timestep=True)
    if band is None:
        return levels
    first, last, share = band
    table = sqrt_alphas_cumprod_prev(betas)
    steps = torch.randint(first, last + 1, (count,), generator=generator)
    within = table[steps] + torch.rand(count, generator=generator, dtype=torch.float64) * (
        table[steps - 1] - table[steps]
    )
    chosen = torch.rand(count, generator=generator) < share
    return torch.where(chosen, within.float(), levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("plain", "head"), required=True)
    parser.add_argument("--tiles", type=Path, required=True, help="benchmarks/photo_tiles.py output")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--head-width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--band",
        nargs=3,
        type=float,
        metavar=("FIRST", "LAST", "SHARE"),
        help="draw SHARE of the training levels from schedule steps FIRST..LAST (docs/quality.md, 'Where the texture "
        "is decided')",
    )
    parser.add_argument(
        "--steps", type=int, help="train this many steps (the learning rate decays over them) instead of --minutes"
    )
    parser.add_argument("--base", type=Path, help="SR3Pipeline folder to fine-tune (default: the packaged model)")
    args = parser.parse_args()
    band = (int(args.band[0]), int(args.band[1]), args.band[2]) if args.band else None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    source = args.base or Path(default_model_path())
    pipeline = SR3Pipeline.from_pretrained(source)
    unet = pipeline.unet.float().train()
    betas = training_betas(pipeline.scheduler)
    residual_scale = pipeline.config.residual_scale
    pairs = PairMaker(64, upscale_factor=pipeline.config.upscale_factor, random_crop=True, random_rotate=True)
    head = head_for(unet, args.head_width).train() if args.arm == "head" else None
    groups = [dict(params=list(unet.parameters()), lr=args.lr)]
    if head is not None:
        groups.append(dict(params=list(head.parameters()), lr=args.head_lr))
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    modules = nn.ModuleList([unet] + ([head] if head is not None else []))
    ema = EMAModel(modules.parameters(), decay=0.999)
    tiles = load_tiles(args.tiles)
    generator = torch.Generator().manual_seed(args.seed)

    if (args.minutes is None) == (args.steps is None):
        parser.error("give one of --minutes and --steps")
    budget = args.minutes * 60 if args.steps is None else None
    started = time.perf_counter()
    step, losses = 0, []
    while True:
        elapsed = time.perf_counter() - started
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for group, base in zip(optimizer.param_groups, [args.lr, args.head_lr]):
            group["lr"] = base * (1 - progress)
        hr, condition = random_batch(tiles, pairs, 16, generator)
        batch = noise_batch(
            unet,
            betas,
            hr,
            condition,
            prediction_type="sample",
            noise_level=training_levels(betas, 16, band, generator),
            generator=generator,
            residual=True,
            residual_scale=residual_scale,
        )
        prediction = predict_with_head(unet, head, batch.network_input, batch.network_level)
        loss = diffusion_loss(prediction, batch, "l1", prediction_type="sample")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(modules.parameters())
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            print(f"step {step} {elapsed / 60:.1f} min loss {np.mean(losses[-200:]):.4f}", flush=True)

    ema.copy_to(modules.parameters())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    unet.eval().save_pretrained(partial / "unet")  # over the packaged weights, beside the class file the Hub needs
    if head is not None:
        save_file({name: value.contiguous() for name, value in head.state_dict().items()}, partial / "head.safetensors")
    summary = dict(
        arm=args.arm,
        steps=step,
        minutes=round((time.perf_counter() - started) / 60, 1),
        steps_per_second=round(step / (time.perf_counter() - started), 3),
        band=args.band,
        final_loss=float(np.mean(losses[-500:])),
        head_width=args.head_width if head is not None else None,
        head_parameters=sum(p.numel() for p in head.parameters()) if head is not None else 0,
        tiles=tiles.shape[0],
    )
    (partial / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(args.output, ignore_errors=True)
    partial.rename(args.output)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
