"""How strong the training photos' residuals are at each tiling scale, against the never-seen photos'.

The standard deviation of each 64-pixel crop's residual (HR - bicubic of its x4 LR, in the packaged model's
`residual_scale`) as quantiles, for the training photos resized to each `--sides` longer side and for the photos of
`--photos` as `benchmarks/model_report.py --unseen` crops them. The smaller the side, the more of a photo's detail
each pixel holds, and the stronger its residual.

    python benchmarks/results/samplers/sharper-tiles-finetune/amplitudes.py --photos pyiqa_ref_dir/ --output OUT

Writes `amplitudes.json` and `amplitudes.md` to `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import torch

BENCHMARKS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, BENCHMARKS)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "where-texture-is-decided"))
import model_report  # noqa: E402  (the never-seen crops)
from probe import QUANTILES, residual_amplitudes  # noqa: E402  (the quantiles "Where the texture is decided" gives)

from diffusers_sr3 import SR3Pipeline  # noqa: E402
from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_split  # noqa: E402
from diffusers_sr3.pretrained import default_model_path  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="folder of never-seen photos")
    parser.add_argument("--sides", type=int, nargs="+", default=[192, 256, 384, 512, 768, 1024])
    parser.add_argument("--crops", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="as where-texture-is-decided/probe.py's --seed")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    config = SR3Pipeline.load_config(default_model_path())
    factor, scale = config["upscale_factor"], config["residual_scale"]
    training = photo_split(packaged_photo_paths())[0]
    rows = {
        f"training photos at {side}": residual_amplitudes(
            photo_crops(training, 64, count=args.crops, seed=args.seed + 1, max_side=side, output_type="pt"),
            factor,
            scale,
        )
        for side in args.sides
    }
    rows["never-seen photos"] = residual_amplitudes(
        model_report.unseen_crops(args.photos, 64, args.crops, args.seed + 2), factor, scale
    )
    report = dict(quantiles=list(QUANTILES), residual_scale=scale, crops=args.crops, rows=rows)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "amplitudes.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    lines = [
        f"Residual std per 64-pixel crop ({args.crops} crops, x{factor}, residual scale {scale}), quantiles.",
        "",
        "| photos | " + " / ".join(f"{q:g}" for q in QUANTILES) + " |",
        "|---|---|",
        *(f"| {name} | {' / '.join(str(value) for value in values)} |" for name, values in rows.items()),
    ]
    with open(os.path.join(args.output, "amplitudes.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
