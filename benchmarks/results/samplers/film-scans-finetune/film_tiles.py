"""Tile the five film scans that `sporco` ships into a folder of training tiles, at twice the density of the others.

    pip download --no-deps --only-binary=:all: sporco==0.2.2.post1 -d DOWNLOADS
    unzip -j DOWNLOADS/sporco-0.2.2.post1-py3-none-any.whl 'sporco/data/*.png' -d SCANS
    python results/samplers/film-scans-finetune/film_tiles.py --scans SCANS --output TILES

`photo_tiles.py`'s tiles (128 pixels, longer sides 512 and 1024, flat tiles skipped), on a grid of step 32 where the
shipped tiles use 64, so that the film scans make about a seventh of the tiles they join.
"""

import argparse
import importlib.util
import pathlib

PHOTO_TILES = pathlib.Path(__file__).resolve().parents[3] / "photo_tiles.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=pathlib.Path, required=True, help="folder of the film scans (PNG)")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="the tile folder to add them to")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("photo_tiles", PHOTO_TILES)
    photo_tiles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(photo_tiles)
    options = argparse.Namespace(
        scales=[512, 1024], tile=128, stride=32, min_std=0.02, texture_copies=0, upscale_factor=4
    )
    args.output.mkdir(parents=True, exist_ok=True)
    for scan in sorted(args.scans.glob("*.png")):
        written, skipped, texture = photo_tiles.write_tiles(scan, args.output, options)
        print(f"{scan.name}: {written} tiles ({texture} texture), {skipped} flat ones skipped")


if __name__ == "__main__":
    main()
