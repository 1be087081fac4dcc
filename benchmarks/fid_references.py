"""Where a test set's FID can go: reference outputs made from its HR, scored beside the model's own.

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 --unseen pyiqa_ref_dir/ \
        --unseen-crops 256 --crops 16 --no-fid --eta 1 --strength 0.6 --save-outputs --output report/
    python benchmarks/fid_references.py report/outputs_never-seen-photos.npz --output benchmarks/results/fid-references

FID on a few hundred small crops is hard to read alone: is 0.92x bicubic's near what any output could reach, and
does it reward detail as such? This scores, on one set of `model_report.py --save-outputs` (its HR and outputs,
8-bit), PSNR, edge energy relative to the HR and FID of:
- every saved method (bicubic, SR3 fidelity, SR3 detail, ...);
- *texture gain k*: SR3 fidelity + k x (SR3 detail - SR3 fidelity), the detail sample's departure from the
  fidelity answer amplified k times: more of the model's own texture;
- *HR blurred*: the truth with a Gaussian blur of standard deviation sigma, detail lost evenly and nothing made up;
- *fidelity + another crop's HR detail*: the fidelity answer with its fine detail (what a sigma-1.2 blur removes)
  replaced by the HR's detail of another crop of the set: photographic texture in the wrong place;
- *fidelity + its own HR detail*: the same with the crop's own HR detail (an oracle of texture alone).
It writes fid_references.json, .md and .png (the most detailed crops and the flattest, magnified: bicubic | SR3
fidelity | SR3 detail | the highest texture gain | HR blurred at the largest sigma | HR).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import PIL.Image
import torch
from torchvision.transforms.functional import gaussian_blur

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_report  # noqa: E402  (a sibling script: its FID helper and crop picks)
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

from diffusers_sr3.image_processing import grid, tensor_to_pil  # noqa: E402
from diffusers_sr3.metrics import edge_energy, frechet_inception_distance, psnr_uint8, quantize  # noqa: E402

FIDELITY, DETAIL = "SR3 fidelity", "SR3 detail"
# The blur whose removed band is "fine detail" when swapping detail between images: on x4 crops it keeps about
# as much edge energy as the fidelity answer does.
DETAIL_BAND_SIGMA = 1.2


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `(B, 3, H, W)` images, reflecting at the borders."""
    return gaussian_blur(images, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)


def references(
    saved: Dict[str, torch.Tensor], gains: Sequence[float], sigmas: Sequence[float], seed: int
) -> Dict[str, torch.Tensor]:
    """The saved methods (HR left out), then the reference outputs the module docstring lists, all in [-1, 1]."""
    hr = saved["HR"]
    rows = {name: images for name, images in saved.items() if name != "HR"}
    if FIDELITY in saved and DETAIL in saved:
        fidelity, detail = saved[FIDELITY], saved[DETAIL]
        for gain in gains:
            rows[f"texture gain {gain:g}"] = (fidelity + gain * (detail - fidelity)).clamp(-1, 1)
    for sigma in sigmas:
        rows[f"HR blurred, sigma {sigma:g}"] = blur(hr, sigma)
    if FIDELITY in saved:
        fidelity = saved[FIDELITY]
        hr_detail = hr - blur(hr, DETAIL_BAND_SIGMA)
        # A random cycle through the crops: every crop borrows from a crop other than itself.
        order = torch.randperm(hr.shape[0], generator=torch.Generator().manual_seed(seed))
        other = torch.empty_like(order)
        other[order] = order.roll(1)
        base = blur(fidelity, DETAIL_BAND_SIGMA)
        rows["fidelity + another crop's HR detail"] = (base + hr_detail[other]).clamp(-1, 1)
        rows["fidelity + its own HR detail"] = (base + hr_detail).clamp(-1, 1)
    return rows


def score(rows: Dict[str, torch.Tensor], hr: torch.Tensor) -> List[Dict[str, object]]:
    """PSNR, edge energy relative to the HR and FID of each row, FID also as a multiple of the first row's."""
    fids = model_report.fids(frechet_inception_distance(), hr, list(rows.values()))
    hr_uint8 = quantize(hr)
    hr_edges = edge_energy(hr_uint8).sum()
    table = []
    for (name, images), fid in zip(rows.items(), fids):
        images_uint8 = quantize(images)
        table.append(
            {
                "output": name,
                "psnr": float(psnr_uint8(images_uint8, hr_uint8).mean()),
                "edges": float(edge_energy(images_uint8).sum() / hr_edges),
                "fid": fid,
                "fid_x_first": fid / fids[0],
            }
        )
    return table


def markdown(set_name: str, table: List[Dict[str, object]], crops: int) -> str:
    first = table[0]["output"]
    lines = [
        f"{set_name}: {crops} crops. Edges: edge energy relative to the HR's. FID against the set's HR, and as a "
        f"multiple of {first}'s.",
        "",
        f"| output | PSNR | edges / HR | FID | FID / {first} |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        values = f"{row['psnr']:.2f} | {row['edges']:.3f} | {row['fid']:.1f} | {row['fid_x_first']:.2f}"
        lines.append(f"| {row['output']} | {values} |")
    return "\n".join(lines) + "\n"


def picture(rows: Dict[str, torch.Tensor], hr: torch.Tensor, names: Sequence[str], magnify: int):
    chosen = model_report.busiest(hr, 4) + [model_report.flattest(hr)]
    columns = [rows[name] for name in names if name in rows] + [hr]
    size = (hr.shape[-1] * magnify, hr.shape[-2] * magnify)
    return grid([[tensor_to_pil(c[i : i + 1])[0].resize(size, PIL.Image.NEAREST) for c in columns] for i in chosen])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", help="one outputs_<set>.npz of `model_report.py --save-outputs`")
    parser.add_argument("--gains", type=float, nargs="*", default=[1.5, 2.0, 3.0], help="texture gains k")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[0.5, 0.8, 1.2], help="HR blurs (pixels)")
    parser.add_argument("--seed", type=int, default=0, help="which other crop lends its detail")
    parser.add_argument("--magnify", type=int, default=3)
    parser.add_argument("--output", required=True, help="folder for fid_references.json, .md and .png")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    set_name, arrays = model_report.load_outputs(args.outputs)
    # Back to [-1, 1]: model_report.fids quantizes exactly to the saved bytes.
    saved = {name: torch.from_numpy(array).float() / 127.5 - 1 for name, array in arrays.items()}
    hr = saved["HR"]
    rows = references(saved, args.gains, args.sigmas, args.seed)
    table = score(rows, hr)
    report = {"set": set_name, "crops": hr.shape[0], "outputs": args.outputs, "rows": table}
    text = write_report(args.output, "fid_references", report, markdown(set_name, table, hr.shape[0]))
    shown = ["bicubic", FIDELITY, DETAIL]
    shown += [f"texture gain {max(args.gains):g}"] if args.gains else []
    shown += [f"HR blurred, sigma {max(args.sigmas):g}"] if args.sigmas else []
    picture(rows, hr, shown, args.magnify).save(os.path.join(args.output, "fid_references.png"))
    print(text)
    return report


if __name__ == "__main__":
    main()
