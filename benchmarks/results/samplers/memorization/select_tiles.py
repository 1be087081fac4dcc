"""Copy a few texture tiles out of a `benchmarks/photo_tiles.py` folder, for a fine-tune that sees little else.

    python results/samplers/memorization/select_tiles.py --tiles SHARP_TILES --count 8 --output FEW_TILES
    python results/samplers/memorization/select_tiles.py --tiles SHARP_TILES --count 64 --same-photos-as FEW_TILES \
        --output NEIGHBOUR_TILES

The texture tiles (`photo_tiles.is_texture`: the bicubic upsample keeps under `TEXTURE_KEPT_EDGE_SHARE` of the
edge energy) in name order, shuffled with `random.Random(--seed)`; the first `--count` are copied. With
`--same-photos-as` only the tiles of the photographs that folder's tiles were cut from, less those tiles, are drawn
from (the same textures, crops the fine-tune never saw); with `--other-photos-than` only those of the other
photographs. A tile's photograph is its name less the `_SIDE_INDEX.png` that `photo_tiles.py` appends.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path
from typing import List, Set

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/, for photo_tiles
from photo_tiles import is_texture  # noqa: E402


def photo_of(tile_name: str) -> str:
    return tile_name.rsplit("_", 2)[0]


def tile_names(folder: Path) -> Set[str]:
    return {path.name for path in folder.glob("*.png")}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, required=True, help="benchmarks/photo_tiles.py output")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale-factor", type=int, default=4)
    known = parser.add_mutually_exclusive_group()
    known.add_argument("--same-photos-as", type=Path, help="a folder of tiles: draw from their photographs, not them")
    known.add_argument("--other-photos-than", type=Path, help="a folder of tiles: draw from the other photographs")
    args = parser.parse_args(argv)

    for folder in (args.tiles, args.same_photos_as, args.other_photos_than):
        if folder is not None and not tile_names(folder):
            parser.error(f"{folder} holds no .png tiles")
    names = sorted(tile_names(args.tiles))
    if args.same_photos_as is not None:
        seen = tile_names(args.same_photos_as)
        photos = {photo_of(name) for name in seen}
        names = [name for name in names if photo_of(name) in photos and name not in seen]
    elif args.other_photos_than is not None:
        photos = {photo_of(name) for name in tile_names(args.other_photos_than)}
        names = [name for name in names if photo_of(name) not in photos]
    texture = [name for name in names if is_texture(Image.open(args.tiles / name), args.upscale_factor)]
    if len(texture) < args.count:
        parser.error(f"{args.tiles} holds {len(texture)} texture tiles to draw from, fewer than --count {args.count}")
    random.Random(args.seed).shuffle(texture)
    args.output.mkdir(parents=True, exist_ok=True)
    for name in texture[: args.count]:
        shutil.copyfile(args.tiles / name, args.output / name)
    print(f"{args.count} of {len(texture)} texture tiles -> {args.output}")


if __name__ == "__main__":
    main()
