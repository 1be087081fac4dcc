"""Probe: photographic texture from the training photos added to detail mode's output (a probe, not shipped).

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 \
        --faces ../shared/data/original_samples --unseen pyiqa_ref_dir/ --unseen-crops 1024 --crops 1024 \
        --modes detail --steps 10 --eta 1 --strength 0.6 --guidance-scale 2 --window-size 64 --whole-photos \
        --save-outputs --output report/
    python benchmarks/results/samplers/texture-bank/probe.py report/outputs_never-seen-photos.npz \
        --output benchmarks/results/samplers/texture-bank

Example-based super-resolution (Freeman, Jones and Pasztor, *Example-Based Super-Resolution*, 2002) with a bank cut
from the training side of the packaged photos (`photo_split(packaged_photo_paths(), heldout=0.25)`, longer side 512):
- key: a 16-pixel window of the bicubic upsample's luma minus its Gaussian blur of sigma 2 (the band the input
  shows), divided by its RMS (its contrast), projected on its first 32 principal components;
- value: the 8-pixel window at its centre of the HR's luma detail that the degradation cannot see (the HR minus the
  bicubic upsample, minus that difference's own degrade-and-upsample), divided by the same contrast.
For each 8-pixel window (stride 4) of an output's bicubic upsample the nearest key's value, times the window's contrast,
is overlap-added; the sum, made invisible to the degradation again, is the bank's detail. Detail mode's output then
gets `gain` x the bank's detail where its own invisible detail falls short of it: the added amplitude is
`sqrt(max(0, gain^2 E_bank - E_own) / E_bank)` of the bank's, with E the local energy (squares blurred, sigma 2), so
what the network drew counts first. The same luma detail goes into the three channels.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, BENCHMARKS)
import fid_references  # noqa: E402  (its scores and picture)
import model_report  # noqa: E402  (its saved outputs)
from report_files import write_report  # noqa: E402

from diffusers_sr3.image_processing import degrade  # noqa: E402
from diffusers_sr3.metrics import (  # noqa: E402
    consistency_unit,
    flat_grain,
)
from diffusers_sr3.photos import load_photo, packaged_photo_paths, photo_split  # noqa: E402

FACTOR = 4
VALUE_WINDOW, KEY_WINDOW, STRIDE = 8, 16, 4
KEY_SIGMA, ENERGY_SIGMA = 2.0, 2.0
KEY_DIMENSIONS = 32
# Windows flatter than this (RMS of the key band, [-1, 1] units) get no texture: there is none to match.
MIN_CONTRAST = 0.01


def luma(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=1, keepdim=True)


def invisible(residual: torch.Tensor) -> torch.Tensor:
    """The part of `residual` `(B, 1, H, W)` the x4 degradation does not see."""
    return residual - degrade(residual, FACTOR)[1]


def key_windows(upsampled: torch.Tensor) -> torch.Tensor:
    """`(B, L, KEY_WINDOW^2)` windows of the band the input shows, centred on the value windows."""
    band = luma(upsampled) - fid_references.blur(luma(upsampled), KEY_SIGMA)
    pad = (KEY_WINDOW - VALUE_WINDOW) // 2
    band = F.pad(band, (pad, pad, pad, pad), mode="reflect")
    return F.unfold(band, KEY_WINDOW, stride=STRIDE).transpose(1, 2)


def value_windows(detail: torch.Tensor) -> torch.Tensor:
    return F.unfold(detail, VALUE_WINDOW, stride=STRIDE).transpose(1, 2)


def build_bank(max_side: int, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised keys (projected), normalised values and the projection, from the training photos."""
    train, _ = photo_split(packaged_photo_paths(), heldout=0.25)
    keys, values = [], []
    for path in train:
        hr = torch.from_numpy(np.array(load_photo(path, max_side))).permute(2, 0, 1).float()[None] / 127.5 - 1
        photo_keys, photo_values = example_windows(hr)
        keys.append(photo_keys)
        values.append(photo_values)
    bank = normalised_bank(torch.cat(keys), torch.cat(values), size, seed)
    print(f"bank: {len(train)} training photos, {bank[0].shape[0]} windows", flush=True)
    return bank


def example_windows(hr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The key and value windows of one `(1, 3, H, W)` example HR (cropped to a multiple of the factor)."""
    hr = hr[..., : hr.shape[-2] // FACTOR * FACTOR, : hr.shape[-1] // FACTOR * FACTOR]
    upsampled = degrade(hr, FACTOR)[1]
    return key_windows(upsampled)[0], value_windows(invisible(luma(hr) - luma(upsampled)))[0]


def normalised_bank(
    keys: torch.Tensor, values: torch.Tensor, size: Optional[int] = None, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows above MIN_CONTRAST (`size` of them at random, if given) divided by their contrast, the keys projected
    on their first KEY_DIMENSIONS principal components: `(keys, values, projection)`."""
    contrast = keys.pow(2).mean(1).sqrt()
    keep = torch.nonzero(contrast > MIN_CONTRAST)[:, 0]
    if size is not None:
        keep = keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(seed))[:size]]
    keys, values, contrast = keys[keep] / contrast[keep, None], values[keep] / contrast[keep, None], contrast[keep]
    _, _, basis = torch.linalg.svd(keys - keys.mean(0), full_matrices=False)
    projection = basis[:KEY_DIMENSIONS].T
    return keys @ projection, values, projection


def bank_detail(
    upsampled: torch.Tensor, bank: Tuple[torch.Tensor, ...], chunk: int = 4096, max_distance: Optional[float] = None
) -> torch.Tensor:
    """The bank's detail `(B, 1, H, W)` for bicubic upsamples `(B, 3, H, W)`. With `max_distance`, each window's value
    is weighted by `1 - d / max_distance` (clamped to [0, 1]), d the squared distance of its key from the nearest one
    relative to its own squared norm, both in the projection: texture only where the bank holds a close match."""
    bank_keys, bank_values, projection = bank
    batch, _, height, width = upsampled.shape
    keys = key_windows(upsampled)
    contrast = keys.pow(2).mean(2, keepdim=True).sqrt()
    queries = (keys / contrast.clamp(min=1e-4)).reshape(-1, keys.shape[-1]) @ projection
    bank_norms = bank_keys.pow(2).sum(1)
    nearest, distances = [], []
    for q in queries.split(chunk):
        closest = (bank_norms[None] - 2 * q @ bank_keys.T).min(1)
        nearest.append(closest.indices)
        norms = q.pow(2).sum(1)
        distances.append((closest.values + norms) / norms.clamp(min=1e-8))
    windows = bank_values[torch.cat(nearest)].reshape(batch, -1, bank_values.shape[-1])
    windows = windows * contrast * (contrast > MIN_CONTRAST)
    if max_distance is not None:
        windows = windows * (1 - torch.cat(distances).reshape(batch, -1, 1) / max_distance).clamp(0, 1)

    def fold(x: torch.Tensor) -> torch.Tensor:
        return F.fold(x.transpose(1, 2), (height, width), VALUE_WINDOW, stride=STRIDE)

    return invisible(fold(windows) / fold(torch.ones_like(windows)).clamp(min=1))


def with_texture(upsampled: torch.Tensor, output: torch.Tensor, detail: torch.Tensor, gain: float) -> torch.Tensor:
    """`output` with `gain` x the bank's detail where its own invisible detail falls short of it."""
    own = fid_references.blur(invisible(luma(output) - luma(upsampled)).pow(2), ENERGY_SIGMA)
    wanted = fid_references.blur(detail.pow(2), ENERGY_SIGMA)
    amplitude = ((gain**2 * wanted - own).clamp(min=0) / wanted.clamp(min=1e-8)).sqrt()
    return (output + amplitude * detail).clamp(-1, 1)


def saved_outputs(path: str) -> Tuple[str, Dict[str, torch.Tensor]]:
    """The set's name and its saved images by method, in [-1, 1], from one outputs_<set>.npz of
    `model_report.py --save-outputs`."""
    set_name, arrays = model_report.load_outputs(path)
    return set_name, {name: torch.from_numpy(array).float() / 127.5 - 1 for name, array in arrays.items()}


def score(rows: Dict[str, torch.Tensor], hr: torch.Tensor, lr: torch.Tensor) -> List[Dict[str, object]]:
    """`fid_references.score` (PSNR, edges, FID as a multiple of the first row's), with consistency and flat grain."""
    table = fid_references.score(rows, hr)
    for row, images in zip(table, rows.values()):
        row["consistency_1e5"] = float(consistency_unit(images, lr).mean()) * 1e5
        row["flat_grain"] = flat_grain(images, hr, FACTOR)
    return table


def markdown(set_name: str, crops: int, correlation: Optional[float], table: List[Dict[str, object]]) -> str:
    """The rows as a table, under a line saying what they measure (and, where given, the correlation of the bank's
    detail with the truth)."""
    said = (
        ""
        if correlation is None
        else "Correlation of the bank's detail (on the bicubic upsample) with the HR's invisible detail: "
        f"{correlation:.3f}. "
    )
    lines = [
        f"{set_name}, {crops} crops. {said}Consistency on the crops (MSE / 1e-5); flat grain: fine-detail RMS "
        "(/255) on the flattest tenth of the crops.",
        "",
        "| output | PSNR | edges / HR | FID (x bicubic) | consistency | flat grain |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['output']} | {row['psnr']:.2f} | {row['edges']:.3f} | {row['fid']:.1f} "
            f"({row['fid_x_first']:.3f}x) | {row['consistency_1e5']:.2f} | {row['flat_grain']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", help="one outputs_<set>.npz of `model_report.py --save-outputs` (detail mode)")
    parser.add_argument("--gains", type=float, nargs="*", default=[1.5, 2.0, 2.5])
    parser.add_argument("--bank-size", type=int, default=200_000, help="windows kept (at most)")
    parser.add_argument("--max-side", type=int, default=512, help="the training photos' longer side")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    bank = build_bank(args.max_side, args.bank_size, seed=0)
    set_name, saved = saved_outputs(args.outputs)
    hr, upsampled, detail_mode = saved["HR"], saved["bicubic"], saved["SR3 detail"]
    lr = degrade(hr, FACTOR)[0]
    detail = bank_detail(upsampled, bank)
    truth = invisible(luma(hr) - luma(upsampled))
    correlation = float((detail * truth).sum() / (detail.norm() * truth.norm()))
    rows = {"bicubic": upsampled, "SR3 detail": detail_mode}
    for gain in args.gains:
        rows[f"SR3 detail + bank texture, gain {gain:g}"] = with_texture(upsampled, detail_mode, detail, gain)
    table = score(rows, hr, lr)
    report = {"set": set_name, "crops": hr.shape[0], "correlation": correlation, "rows": table}
    print(write_report(args.output, "texture_bank", report, markdown(set_name, hr.shape[0], correlation, table)))
    fid_references.picture(rows, hr, list(rows), 3).save(os.path.join(args.output, "texture_bank.png"))


if __name__ == "__main__":
    main()
