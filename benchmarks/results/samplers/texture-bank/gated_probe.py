"""Probe: `internal_probe.py`'s own-input texture, kept to where it might belong (a probe, not shipped).

    python benchmarks/results/samplers/texture-bank/gated_probe.py report/outputs_never-seen-photos.npz \
        --photos pyiqa_ref_dir/ --seed 2 --output benchmarks/results/samplers/texture-bank/gated-never-seen

The own-input bank met the never-seen detail targets and lost the held-out FID: on the held-out photos, mostly edges
the input shows, its windows stamped blobs and streaks along oars and slats. Two gates, each read off the input alone
(a pipeline could apply either), keep the texture to some places:
- by direction (`--max-coherence`): the coherence of the bicubic upsample's structure tensor (luma gradients, their
  outer products blurred with sigma `--tensor-sigma` output pixels), `((l1 - l2) / (l1 + l2))^2` from its
  eigenvalues, is near 1 along an edge or a line and near 0 in grain, foliage and fabric. The gate is
  `1 - coherence / max_coherence`, clamped to [0, 1], on the photo's bicubic upsample whole, cut at the crops.
- by match (`--max-distance`): each window's value is weighted by how close the bank's nearest key lies
  (`probe.bank_detail`'s `max_distance`), as Glasner et al. keep only confident internal matches.
A third rule keeps only the texture's finest band (`--fine-sigma`: the texture minus its Gaussian blur), where film
grain lies, and drops the coarser part that stamps shapes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE))
import internal_probe  # noqa: E402
import probe  # noqa: E402
from report_files import write_report  # noqa: E402

from diffusers_sr3.image_processing import degrade  # noqa: E402
from diffusers_sr3.metrics import TEXTURE_KEPT_EDGE_SHARE, edge_energy, quantize  # noqa: E402


def coherence(upsampled: torch.Tensor, sigma: float) -> torch.Tensor:
    """Structure-tensor coherence `(B, 1, H, W)` in [0, 1] of the luma of `upsampled` `(B, 3, H, W)`."""
    gray = F.pad(probe.luma(upsampled), (1, 1, 1, 1), mode="replicate")
    gx = (gray[..., 1:-1, 2:] - gray[..., 1:-1, :-2]) / 2
    gy = (gray[..., 2:, 1:-1] - gray[..., :-2, 1:-1]) / 2
    jxx, jyy, jxy = (probe.fid_references.blur(g, sigma) for g in (gx * gx, gy * gy, gx * gy))
    spread = ((jxx - jyy).pow(2) + 4 * jxy.pow(2)).sqrt()
    return (spread / (jxx + jyy).clamp(min=1e-10)).pow(2).clamp(0, 1)


def by_kind(maps: torch.Tensor, texture_crops: torch.Tensor, weights: Optional[torch.Tensor] = None) -> str:
    """The mean of `maps` `(B, 1, H, W)` over all crops, the texture crops and the others; with `weights`, the
    ratio of the sums of `maps` and `weights` there."""
    totals = maps.sum(dim=(1, 2, 3))
    weights = torch.full_like(totals, maps[0].numel()) if weights is None else weights.sum(dim=(1, 2, 3))
    return ", ".join(
        f"{kind} crops {float(totals[chosen].sum() / weights[chosen].sum()):.3f} ({int(chosen.sum())})"
        for kind, chosen in (
            ("all", torch.ones_like(texture_crops)),
            ("texture", texture_crops),
            ("other", ~texture_crops),
        )
        if chosen.any()
    )


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    internal_probe.add_photo_arguments(parser)
    parser.add_argument("--gains", type=float, nargs="*", default=[2.0, 3.0])
    parser.add_argument("--ungated", action="store_true", help="also internal_probe.py's rows, at the same gains")
    parser.add_argument("--tensor-sigma", type=float, default=6.0)
    parser.add_argument("--max-coherence", type=float, nargs="*", default=[])
    parser.add_argument("--max-distance", type=float, nargs="*", default=[])
    parser.add_argument("--fine-sigma", type=float, nargs="*", default=[], help="the finest band only, above a blur")
    parser.add_argument("--diagnose", action="store_true", help="print the gates' means by kind of crop; no FID")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    set_name, saved = probe.saved_outputs(args.outputs)
    hr, upsampled, detail_mode = saved["HR"], saved["bicubic"], saved["SR3 detail"]
    bicubic, low_resolution, cut = internal_probe.whole_photos(args, hr, upsampled)
    banks = [internal_probe.internal_bank(lr) for lr in low_resolution]

    def detail(max_distance: Optional[float] = None) -> torch.Tensor:
        return cut([probe.bank_detail(b, bank, max_distance=max_distance) for b, bank in zip(bicubic, banks)])

    ungated = detail()
    texture_crops = edge_energy(quantize(upsampled)) / edge_energy(quantize(hr)).clamp(min=1e-12)
    texture_crops = texture_crops < TEXTURE_KEPT_EDGE_SHARE
    own, gated_own = "own-input texture", "gated own-input texture"
    added = {f"{own}, gain {gain:g}": (ungated, gain) for gain in args.gains if args.ungated}
    for threshold in args.max_coherence:
        gates = cut([(1 - coherence(image, args.tensor_sigma) / threshold).clamp(0, 1) for image in bicubic])
        print(f"{set_name}, max coherence {threshold:g}: gate {by_kind(gates, texture_crops)}", flush=True)
        added.update(
            {f"{gated_own}, gain {g:g}, max coherence {threshold:g}": (ungated * gates, g) for g in args.gains}
        )
    for max_distance in args.max_distance:
        matched = detail(max_distance)
        kept = by_kind(matched.pow(2), texture_crops, ungated.pow(2))
        print(f"{set_name}, max distance {max_distance:g}: texture energy kept {kept}", flush=True)
        added.update({f"{gated_own}, gain {g:g}, max distance {max_distance:g}": (matched, g) for g in args.gains})
    for sigma in args.fine_sigma:
        finest = probe.invisible(ungated - probe.fid_references.blur(ungated, sigma))
        kept = by_kind(finest.pow(2), texture_crops, ungated.pow(2))
        print(f"{set_name}, finest band above sigma {sigma:g}: texture energy kept {kept}", flush=True)
        added.update({f"{own}, finest band above sigma {sigma:g}, gain {g:g}": (finest, g) for g in args.gains})
    if args.diagnose:
        return
    rows = {"bicubic": upsampled, "SR3 detail": detail_mode}
    for name, (texture, gain) in added.items():
        rows[f"SR3 detail + {name}"] = probe.with_texture(upsampled, detail_mode, texture, gain)
    table = probe.score(rows, hr, degrade(hr, probe.FACTOR)[0])
    truth = probe.invisible(probe.luma(hr) - probe.luma(upsampled))
    correlation = float((ungated * truth).sum() / (ungated.norm() * truth.norm()))
    report = {"set": set_name, "crops": hr.shape[0], "correlation": correlation, "rows": table}
    print(write_report(args.output, "gated", report, probe.markdown(set_name, hr.shape[0], correlation, table)))
    probe.fid_references.picture(rows, hr, list(rows), 3).save(os.path.join(args.output, "gated.png"))


if __name__ == "__main__":
    main()
