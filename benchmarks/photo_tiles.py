"""Cut the training photographs into tiles for `examples/train_sr3.py --random_crop` (the shipped model's data).

    python benchmarks/photo_tiles.py --output /data/photo-tiles --extra raccoon_face.png insightface_t1.jpg

Takes the training side of `diffusers_sr3.photos.photo_split(packaged_photo_paths(), heldout=0.25)` (the held-out
photos are never tiled, so every evaluation on them is on unseen pixels), plus any `--extra` photographs, at two
scales (longer side 512, the scale of the held-out evaluation crops, and 1024 for more distinct content), and
writes `--tile`-pixel tiles on a grid of step `--stride` as PNG files. Tiles that are nearly flat (grey-level
standard deviation below `--min-std`, in [0, 1] units) are skipped: wallpapers have large bokeh areas that would
otherwise dominate. Training then takes a random crop of each tile at every visit, so many steps see few repeats.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import List

import numpy as np

from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_name, photo_split


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the tiles to")
    parser.add_argument("--extra", nargs="*", default=[], help="more training photographs")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--stride", type=int, default=64, help="grid step in pixels")
    parser.add_argument("--scales", type=int, nargs="+", default=[512, 1024], help="longer sides to tile at")
    parser.add_argument("--min-std", type=float, default=0.02, help="skip tiles flatter than this")
    args = parser.parse_args(argv)

    train, held = photo_split(packaged_photo_paths(), heldout=0.25)
    photos = train + [pathlib.Path(path) for path in args.extra]
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, 0
    for photo in photos:
        for scale in args.scales:
            try:
                tiles = photo_crops([photo], args.tile, stride=args.stride, max_side=scale)
            except ValueError:  # smaller than a tile at this scale
                continue
            for index, tile in enumerate(tiles):
                if np.asarray(tile.convert("L"), dtype=np.float32).std() / 255 < args.min_std:
                    skipped += 1
                    continue
                tile.save(output / f"{photo_name(photo)}_{scale}_{index:04d}.png")
                written += 1
    summary = dict(
        tiles=written,
        skipped_flat=skipped,
        training_photos=[photo_name(path) for path in photos],
        heldout_photos=[photo_name(path) for path in held],
    )
    (output.parent / f"{output.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
