"""Cut the training photographs into tiles for `examples/train_sr3.py --random_crop` (the shipped model's data).

    python benchmarks/photo_tiles.py --output /data/photo-tiles --extra raccoon_face.png insightface_t1.jpg

Takes the training side of `diffusers_sr3.photos.photo_split(packaged_photo_paths(), heldout=0.25)` (the held-out
photos are never tiled, so every evaluation on them is on unseen pixels), plus any `--extra` photographs, at two
scales (longer side 512, the scale of the held-out evaluation crops, and 1024 for more distinct content), and
writes `--tile`-pixel tiles on a grid of step `--stride` as PNG files. Tiles that are nearly flat (grey-level
standard deviation below `--min-std`, in [0, 1] units) are skipped: wallpapers have large bokeh areas that would
otherwise dominate. Training then takes a random crop of each tile at every visit, so many steps see few repeats.

`--texture-copies N` writes N more copies of each texture tile (one whose bicubic-upsampled LR keeps under
`TEXTURE_KEPT_EDGE_SHARE` of its edge energy: foliage, hair, fabric), so training visits texture N + 1 times as often.
A model draws the least of its missing detail on texture, and photographs have less texture than edges.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from typing import List

import numpy as np
import torch

from diffusers_sr3.metrics import TEXTURE_KEPT_EDGE_SHARE, kept_edge_share
from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_name, photo_split


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write the tiles to")
    parser.add_argument("--extra", nargs="*", default=[], help="more training photographs")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--stride", type=int, default=64, help="grid step in pixels")
    parser.add_argument("--scales", type=int, nargs="+", default=[512, 1024], help="longer sides to tile at")
    parser.add_argument("--min-std", type=float, default=0.02, help="skip tiles flatter than this")
    parser.add_argument("--texture-copies", type=int, default=0, help="extra copies of each texture tile")
    parser.add_argument("--upscale-factor", type=int, default=4, help="the LR scale that decides what is texture")
    args = parser.parse_args(argv)

    train, held = photo_split(packaged_photo_paths(), heldout=0.25)
    photos = train + [pathlib.Path(path) for path in args.extra]
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.texture_copies < 0:
        parser.error(f"--texture-copies must not be negative, got {args.texture_copies}")
    written, skipped, texture = 0, 0, 0
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
                name = f"{photo_name(photo)}_{scale}_{index:04d}"
                textured = is_texture(tile, args.upscale_factor)
                texture += textured
                copies = args.texture_copies if textured else 0
                tile.save(output / f"{name}.png")
                for copy in range(1, copies + 1):
                    shutil.copyfile(output / f"{name}.png", output / f"{name}_texture{copy}.png")
                written += 1
    summary = dict(
        tiles=written,
        skipped_flat=skipped,
        texture_tiles=texture,
        texture_copies=args.texture_copies,
        training_photos=[photo_name(path) for path in photos],
        heldout_photos=[photo_name(path) for path in held],
    )
    (output.parent / f"{output.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def is_texture(tile, upscale_factor: int) -> bool:
    """Whether the bicubic upsample of the tile's LR keeps under `TEXTURE_KEPT_EDGE_SHARE` of its edge energy."""
    pixels = torch.from_numpy(np.array(tile.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    return bool(kept_edge_share(pixels, upscale_factor)[0] < TEXTURE_KEPT_EDGE_SHARE)


if __name__ == "__main__":
    main()
