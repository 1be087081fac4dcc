"""Copy a few texture tiles out of a `benchmarks/photo_tiles.py` folder, for a fine-tune that sees little else.

    python results/samplers/memorization/select_tiles.py --tiles SHARP_TILES --count 8 --output FEW_TILES

The texture tiles (`photo_tiles.is_texture`: the bicubic upsample keeps under `TEXTURE_KEPT_EDGE_SHARE` of the
edge energy) in name order, shuffled with `random.Random(--seed)`; the first `--count` are copied.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path
from typing import List

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/, for photo_tiles
from photo_tiles import is_texture  # noqa: E402


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, required=True, help="benchmarks/photo_tiles.py output")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale-factor", type=int, default=4)
    args = parser.parse_args(argv)

    names = sorted(path.name for path in args.tiles.glob("*.png"))
    texture = [name for name in names if is_texture(Image.open(args.tiles / name), args.upscale_factor)]
    if len(texture) < args.count:
        parser.error(f"{args.tiles} holds {len(texture)} texture tiles, fewer than --count {args.count}")
    random.Random(args.seed).shuffle(texture)
    args.output.mkdir(parents=True, exist_ok=True)
    for name in texture[: args.count]:
        shutil.copyfile(args.tiles / name, args.output / name)
    print(f"{args.count} of {len(texture)} texture tiles -> {args.output}")


if __name__ == "__main__":
    main()
