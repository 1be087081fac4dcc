"""Probe: `probe.py`'s texture transfer with a bank cut from each photo's own input instead of the training photos
(internal examples: Glasner, Bagon and Irani, *Super-Resolution from a Single Image*, 2009), on the outputs of
`model_report.py --whole-photos --save-outputs` (see README.md beside this file):

    python benchmarks/results/samplers/texture-bank/internal_probe.py report/outputs_never-seen-photos.npz \
        --photos pyiqa_ref_dir/ --seed 2 --output benchmarks/results/samplers/texture-bank/internal-never-seen

Each photo's LR, in its 8 orientations, is the HR of the bank's pairs (its own x4 degradation the input), so the
bank holds the texture of that photo one scale down. The bank's detail is computed on the photo's bicubic upsample
whole, then cut at the report's crops (`--seed` and `--max-side` as the report's for that set: held-out photos seed
1 and max side 512, never-seen seed 2 and no max side).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE))
import model_report  # noqa: E402
import probe  # noqa: E402
from report_files import write_report  # noqa: E402

from diffusers_sr3.image_io import find_images  # noqa: E402
from diffusers_sr3.image_processing import degrade  # noqa: E402
from diffusers_sr3.metrics import quantize  # noqa: E402
from diffusers_sr3.photos import packaged_photo_paths, photo_split  # noqa: E402


def internal_bank(low_resolution: torch.Tensor):
    """`probe.build_bank`'s bank from the 8 orientations of one `(1, 3, h, w)` LR."""
    windows = [
        probe.example_windows(torch.rot90(flipped, turns, (-2, -1)))
        for flipped in (low_resolution, low_resolution.flip(-1))
        for turns in range(4)
    ]
    return probe.normalised_bank(torch.cat([k for k, _ in windows]), torch.cat([v for _, v in windows]))


def add_photo_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name the saved outputs' photos and the report's crops."""
    parser.add_argument("outputs", help="one outputs_<set>.npz of `model_report.py --whole-photos --save-outputs`")
    photos_group = parser.add_mutually_exclusive_group(required=True)
    photos_group.add_argument("--photos", help="the never-seen photos' folder")
    photos_group.add_argument("--heldout-photos", action="store_true", help="the packaged held-out photos")
    photos_group.add_argument(
        "--whole-images", action="store_true", help="each saved image is whole (the faces): its own LR is its bank"
    )
    parser.add_argument("--seed", type=int, default=None, help="the report's seed for the set (photos only)")
    parser.add_argument("--max-side", type=int, default=None)
    parser.add_argument("--crop-size", type=int, default=64)


def whole_photos(
    args: argparse.Namespace, hr: torch.Tensor, upsampled: torch.Tensor
) -> Tuple[List[torch.Tensor], List[torch.Tensor], Callable[[List[torch.Tensor]], torch.Tensor]]:
    """Each photo's bicubic upsample and LR, whole, and the function that cuts per-photo maps at the report's crops
    (`hr` and `upsampled` are the saved crops; with `--whole-images` they are the images whole)."""
    if args.whole_images:
        return list(upsampled.split(1)), list(degrade(hr, probe.FACTOR)[0].split(1)), torch.cat
    paths = find_images([args.photos]) if args.photos else photo_split(packaged_photo_paths(), heldout=0.25)[1]
    photos = model_report.WholePhotos(
        model_report.load_whole_photos(paths, probe.FACTOR, args.max_side),
        args.crop_size,
        hr.shape[0],
        args.seed,
        probe.FACTOR,
    )
    if not torch.equal(quantize(photos.cut(photos.hr)), quantize(hr)):
        raise SystemExit("the crops differ from the report's: check --seed, --max-side and the photos")
    return photos.bicubic, photos.lr, photos.cut


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_photo_arguments(parser)
    parser.add_argument("--gains", type=float, nargs="*", default=[1.0, 1.5, 2.0])
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    set_name, saved = probe.saved_outputs(args.outputs)
    hr, upsampled, detail_mode = saved["HR"], saved["bicubic"], saved["SR3 detail"]
    bicubic, low_resolution, cut = whole_photos(args, hr, upsampled)
    detail = cut([probe.bank_detail(b, internal_bank(lr)) for b, lr in zip(bicubic, low_resolution)])
    truth = probe.invisible(probe.luma(hr) - probe.luma(upsampled))
    correlation = float((detail * truth).sum() / (detail.norm() * truth.norm()))
    rows = {"bicubic": upsampled, "SR3 detail": detail_mode}
    for gain in args.gains:
        textured = probe.with_texture(upsampled, detail_mode, detail, gain)
        rows[f"SR3 detail + own-input texture, gain {gain:g}"] = textured
    table = probe.score(rows, hr, degrade(hr, probe.FACTOR)[0])
    report = {"set": set_name, "crops": hr.shape[0], "correlation": correlation, "rows": table}
    print(write_report(args.output, "texture_bank", report, probe.markdown(set_name, hr.shape[0], correlation, table)))
    probe.fid_references.picture(rows, hr, list(rows), 3).save(os.path.join(args.output, "texture_bank.png"))


if __name__ == "__main__":
    main()
