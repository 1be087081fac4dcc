"""Side by side on the never-seen photos: bicubic | the packaged model | the film-scan fine-tune | HR.

    python results/samplers/film-scans-finetune/pictures.py --packaged PACKAGED/outputs_never-seen-photos.npz \
        --fine-tuned FINE_TUNED/outputs_never-seen-photos.npz --output never-seen.png

The two `.npz` files are `model_report.py --save-outputs` of the same crops and seed. Rows: the five texture crops
(bicubic keeps under 45% of the HR's edge energy) with the most HR edge energy, then the flattest crop; each 64-pixel
crop magnified 4 times (nearest neighbour).
"""

import argparse

import numpy as np
import torch
from PIL import Image

from diffusers_sr3.metrics import TEXTURE_KEPT_EDGE_SHARE, edge_energy, kept_edge_share

KEY = "never-seen photos/{}"
MAGNIFY = 4
TEXTURE_ROWS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packaged", required=True)
    parser.add_argument("--fine-tuned", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    packaged, fine_tuned = np.load(args.packaged), np.load(args.fine_tuned)
    hr = packaged[KEY.format("HR")]
    if not np.array_equal(hr, fine_tuned[KEY.format("HR")]):
        raise ValueError("the two reports were not run on the same crops")
    pixels = torch.from_numpy(hr).float() / 127.5 - 1
    texture = kept_edge_share(pixels, 4).numpy() < TEXTURE_KEPT_EDGE_SHARE
    energy = edge_energy(pixels).numpy()
    rows = [int(i) for i in np.argsort(-energy) if texture[i]][:TEXTURE_ROWS] + [int(np.argmin(energy))]
    detail = KEY.format("SR3 detail")
    columns = [packaged[KEY.format("bicubic")], packaged[detail], fine_tuned[detail], hr]
    side = hr.shape[-1] * MAGNIFY
    sheet = Image.new("RGB", (side * len(columns), side * len(rows)), "white")
    for r, index in enumerate(rows):
        for c, images in enumerate(columns):
            tile = Image.fromarray(images[index].transpose(1, 2, 0)).resize((side, side), Image.NEAREST)
            sheet.paste(tile, (c * side, r * side))
    sheet.save(args.output)
    print(f"wrote {args.output}: rows are crops {rows}")


if __name__ == "__main__":
    main()
