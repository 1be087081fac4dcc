"""Put several SR3 photo models side by side on the crops `model_report.py` evaluates, magnified, to judge by eye.

    python benchmarks/compare_models.py --model shipped=src/diffusers_sr3/pretrained/sr3-photos-x4 \
        --model adversarial=runs/adv --unseen pyiqa_ref_dir --mode detail --steps 10 --eta 1 --strength 0.6 \
        --output compare.png

Rows: the `--rows` most detailed crops of the never-seen photos (with `--unseen`) and of the held-out photos, then
the flattest held-out crop (where grain would show). Columns: bicubic | each model | HR, magnified `--magnify` times
with nearest neighbour. The crops, seeds and sampling settings are `model_report.py`'s, so the picture shows the
images behind the numbers of each model's report. Also prints, per model, the pictured crops' PSNR and edge energy.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import PIL.Image
import torch

from diffusers_sr3 import SR3Pipeline
from diffusers_sr3.image_processing import degrade, grid, tensor_to_pil, upsample_condition
from diffusers_sr3.metrics import edge_energy, image_quality, quantize
from diffusers_sr3.photos import heldout_crops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_report  # noqa: E402  (a sibling script: the same crops, seeds and sampling as the reports)


def chosen_crops(hr: torch.Tensor, rows: int, flattest: bool) -> torch.Tensor:
    indices = model_report.busiest(hr, rows) + ([model_report.flattest(hr)] if flattest else [])
    return hr[indices]


def named_models(values: Sequence[str]) -> Dict[str, str]:
    """`NAME=PATH` pairs (a bare path is named by its folder), checked to be pipeline folders."""
    models = {}
    for value in values:
        name, _, path = value.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"--model {value}: {path} is not a saved pipeline (no model_index.json)")
        if name in models:
            raise ValueError(f"--model {value}: the name {name!r} is given twice")
        models[name] = path
    return models


def main(argv: Optional[Sequence[str]] = None) -> PIL.Image.Image:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=PIPELINE_FOLDER (repeat per model)")
    parser.add_argument("--unseen", help="folder of photos never trained on nor held out (e.g. pyiqa's ref_dir)")
    parser.add_argument("--mode", default="detail", choices=["fidelity", "detail"])
    parser.add_argument("--rows", type=int, default=3, help="most detailed crops shown per test set")
    parser.add_argument("--output", required=True, help="the PNG to write")
    for name, default in (("crop-size", 64), ("crops", 256), ("unseen-crops", 128), ("max-side", 512)):
        parser.add_argument(f"--{name}", type=int, default=default, help="as in model_report.py")
    parser.add_argument("--heldout", type=float, default=None, help="as in model_report.py (for any --model)")
    parser.add_argument("--steps", type=int, default=None, help="detail-mode steps (default: each model's own)")
    parser.add_argument(
        "--fidelity-steps", type=int, default=None, help="fidelity-mode steps (default: each model's own)"
    )
    parser.add_argument("--eta", type=float, default=None, help="detail-mode eta (default: each model's own)")
    parser.add_argument("--strength", type=float, default=None, help="detail-mode strength (default: each model's own)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="detail mode (default: each model's own)")
    parser.add_argument(
        "--parallel-guidance-weight", type=float, default=None, help="detail mode (default: each model's own)"
    )
    parser.add_argument("--window-size", type=int, default=None, help="detail mode (default: each model's own)")
    parser.add_argument("--backend", default="auto", choices=model_report.BACKENDS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magnify", type=int, default=3)
    args = parser.parse_args(argv)
    models = named_models(args.model)

    heldout_names = model_report.heldout_photos(args.heldout, list(models.values()))
    heldout, _ = heldout_crops(
        args.crop_size, args.crops, seed=args.seed, heldout=heldout_names, max_side=args.max_side
    )
    shown: List[torch.Tensor] = []
    if args.unseen:
        unseen = model_report.unseen_crops(args.unseen, args.crop_size, args.unseen_crops, args.seed + 2)
        shown.append(chosen_crops(unseen, args.rows, flattest=False))
    shown.append(chosen_crops(heldout, args.rows, flattest=True))
    hr = torch.cat(shown)
    # As model_report.evaluate_set: 8-bit low-resolution inputs, bicubic from them.
    factor = None
    columns: Dict[str, torch.Tensor] = {}
    for name, path in models.items():
        pipeline = SR3Pipeline.from_pretrained(path)
        pipeline.set_progress_bar_config(disable=True)
        if factor is None:
            factor = pipeline.config.upscale_factor
            lr = quantize(degrade(hr, factor)[0]).float() / 127.5 - 1
            columns["bicubic"] = upsample_condition(lr, tuple(hr.shape[-2:])).clamp(-1, 1)
        elif pipeline.config.upscale_factor != factor:
            raise ValueError(f"--model {name}: x{pipeline.config.upscale_factor}, the first model is x{factor}")
        columns[name] = model_report.super_resolve(pipeline, lr, args.mode, args)
    columns["HR"] = hr

    hr_edges = edge_energy(quantize(hr)).sum()
    for name, images in columns.items():
        edges = (edge_energy(quantize(images)).sum() / hr_edges).item()
        # The reports' PSNR (per 8-bit image, averaged), so the numbers match theirs; the HR against itself has none.
        psnr = "" if name == "HR" else f"PSNR {image_quality(images, hr, lr)['psnr']:6.2f} dB, "
        print(f"{name:>24}: {psnr}edge energy {edges:.3f} of the HR's ({hr.shape[0]} pictured crops)")
    size = (hr.shape[-1] * args.magnify, hr.shape[-2] * args.magnify)
    rows = [
        [tensor_to_pil(images[index : index + 1])[0].resize(size, PIL.Image.NEAREST) for images in columns.values()]
        for index in range(hr.shape[0])
    ]
    figure = grid(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    figure.save(args.output)
    print(f"{' | '.join(columns)} -> {args.output}")
    return figure


if __name__ == "__main__":
    main()
