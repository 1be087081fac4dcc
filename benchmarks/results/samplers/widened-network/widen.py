"""The packaged network at twice its width, computing the same function (Net2WiderNet, Chen et al. 2016).

    python results/samplers/widened-network/widen.py --output ARMS/widened

Does a wider network learn texture faster? Training one from scratch does not fit a 2-core CPU, but widening the
trained one does: every channel of the packaged UNet (`block_out_channels` 64 -> 128) becomes two adjacent copies,
so that each GroupNorm group (32 per layer) holds the copies of the old group's channels and normalises them
alike. A layer reading doubled channels gets its old weight split between the two copies: half each, plus and
minus a small random `--split-noise` (relative to the weight's standard deviation), which leaves the sum, and so the
function, unchanged while letting the copies learn apart. Two places are not plain copies:
- the noise-level encoding is sinusoidal at the network's width, and at width 128 its even frequencies are the
  width-64 ones, so the old weights read those and the new frequencies start at weight zero;
- single-head attention scales its logits by `1 / sqrt(channels)`; doubled copies double the dot product, so the
  query projection is divided by `sqrt(2)` to keep the logits.
The script writes the packaged pipeline with the widened UNet and prints how far its prediction is from the
packaged one's on random inputs (float32 rounding: 2e-6 of the prediction's scale
for the packaged network).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Dict

import torch

from diffusers_sr3 import SR3Pipeline, SR3UNet2DModel
from diffusers_sr3.pretrained import default_model_path

ENCODING_WEIGHTS = ("noise_level_embedding.linear_1.weight", "condition_noise_level_embedding.linear_1.weight")


def encoding_source(width: int) -> torch.Tensor:
    """For each feature of the sinusoidal encoding at `2 * width`: the index of the same feature at `width`, or -1."""
    half, wide_half = width // 2, width
    source = torch.full((2 * width,), -1, dtype=torch.long)
    for part in range(2):  # sines, then cosines
        for frequency in range(half):
            source[part * wide_half + 2 * frequency] = part * half + frequency
    return source


def widen_state_dict(
    narrow: Dict[str, torch.Tensor], wide_shapes: Dict[str, torch.Size], width: int, split_noise: float, seed: int
) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    wide = {}
    for name, value in narrow.items():
        shape = wide_shapes[name]
        doubled = [dim for dim in range(value.dim()) if shape[dim] == 2 * value.shape[dim]]
        if any(shape[dim] != value.shape[dim] for dim in range(value.dim()) if dim not in doubled):
            raise ValueError(f"{name}: {tuple(value.shape)} does not widen to {tuple(shape)}")
        reads_doubled = value.dim() >= 2 and 1 in doubled
        if name in ENCODING_WEIGHTS:
            doubled.remove(1)
            reads_doubled = False
        for dim in doubled:
            value = value.repeat_interleave(2, dim=dim)
        if name in ENCODING_WEIGHTS:
            source = encoding_source(width)
            encoded = torch.zeros(value.shape[0], source.numel(), *value.shape[2:], dtype=value.dtype)
            kept = source >= 0
            encoded[:, kept] = value[:, source[kept]]
            value = encoded
        if reads_doubled:
            half = value / 2
            noise = torch.randn(half.shape, generator=generator) * split_noise * value.std()
            noise[:, 1::2] = -noise[:, 0::2]  # the two copies of an input channel see opposite noise: the sum holds
            value = half + noise
        if name.endswith("attention.to_q.weight"):
            value = value / math.sqrt(2)
        wide[name] = value.contiguous()
    return wide


def widen(narrow: SR3UNet2DModel, split_noise: float, seed: int) -> SR3UNet2DModel:
    """`narrow` at twice its `block_out_channels`, computing the same function, in eval mode."""
    width = narrow.config.block_out_channels
    config = {key: value for key, value in narrow.config.items() if not key.startswith("_")}
    config["block_out_channels"] = 2 * width
    wide = SR3UNet2DModel(**config).eval()
    wide_shapes = {name: value.shape for name, value in wide.state_dict().items()}
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), wide_shapes, width, split_noise, seed))
    return wide


def prediction_difference(narrow: SR3UNet2DModel, wide: SR3UNet2DModel, seed: int) -> float:
    """The largest difference between the two networks' predictions on random inputs, over the largest prediction."""
    generator = torch.Generator().manual_seed(seed)
    size = narrow.config.sample_size
    sample = torch.randn(4, narrow.config.in_channels, size, size, generator=generator)
    level = torch.rand(4, generator=generator)
    with torch.no_grad():
        expected = narrow(sample, level).sample
        got = wide(sample, level).sample
    return (got - expected).abs().max().item() / expected.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--split-noise", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source = Path(default_model_path())
    narrow = SR3Pipeline.from_pretrained(source).unet.float().eval()
    wide = widen(narrow, args.split_noise, args.seed)
    difference = prediction_difference(narrow, wide, args.seed)
    print(
        f"parameters {sum(p.numel() for p in narrow.parameters()):,} -> {sum(p.numel() for p in wide.parameters()):,}"
    )
    print(f"largest difference from the packaged prediction: {difference:.2e} of its largest value")
    if difference > 1e-3:
        raise SystemExit("the widened network does not compute the packaged network's function")

    partial = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    wide.save_pretrained(partial / "unet")
    shutil.rmtree(args.output, ignore_errors=True)
    partial.rename(args.output)


if __name__ == "__main__":
    main()
