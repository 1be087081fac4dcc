"""Probe: detail mode's output sharpened by an unsharp mask (a probe, not shipped).

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 \
        --faces ../shared/data/original_samples --unseen pyiqa_ref_dir/ --unseen-crops 1024 --crops 1024 \
        --modes detail --steps 10 --eta 1 --strength 0.6 --guidance-scale 2 --window-size 64 --whole-photos \
        --save-outputs --output report/
    python benchmarks/results/samplers/unsharp/probe.py report/outputs_never-seen-photos.npz \
        --output benchmarks/results/samplers/unsharp/never-seen

The plainest way to more edge energy, the baseline every texture lever should beat: `output + amount x (output -
blur(output, sigma))`, a Gaussian blur of `--sigma` output pixels, on the saved crops of detail mode (the packaged
setting, photos super-resolved whole). Scored as the texture-bank probes score (`texture-bank/probe.py`'s `score`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent / "texture-bank"))
import probe  # noqa: E402
from report_files import write_report  # noqa: E402

from diffusers_sr3.image_processing import degrade  # noqa: E402


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", help="one outputs_<set>.npz of `model_report.py --save-outputs` (detail mode)")
    parser.add_argument("--amounts", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    set_name, saved = probe.saved_outputs(args.outputs)
    hr, detail_mode = saved["HR"], saved["SR3 detail"]
    fine = detail_mode - probe.fid_references.blur(detail_mode, args.sigma)
    rows = {"bicubic": saved["bicubic"], "SR3 detail": detail_mode}
    for amount in args.amounts:
        rows[f"SR3 detail, unsharp mask {amount:g} (sigma {args.sigma:g})"] = (detail_mode + amount * fine).clamp(-1, 1)
    table = probe.score(rows, hr, degrade(hr, probe.FACTOR)[0])
    report = {"set": set_name, "crops": hr.shape[0], "sigma": args.sigma, "rows": table}
    print(write_report(args.output, "unsharp", report, probe.markdown(set_name, hr.shape[0], None, table)))
    probe.fid_references.picture(rows, hr, list(rows), 3).save(os.path.join(args.output, "unsharp.png"))


if __name__ == "__main__":
    main()
