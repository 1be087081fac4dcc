"""Cut the training photographs into tiles for `examples/train_sr3.py --random_crop` (the shipped model's data).

    python benchmarks/photo_tiles.py --output /data/photo-tiles --extra raccoon_face.png insightface_t1.jpg

Takes the training side of `diffusers_sr3.photos.photo_split(packaged_photo_paths(), heldout=0.25)` (the held-out
photos are never tiled, so every evaluation on them is on unseen pixels), plus any `--extra` photographs, at two
scales (longer side 512, the scale of the held-out evaluation crops, and 1024 for more distinct content), and
writes `--tile`-pixel tiles on a grid of step `--stride` as PNG files. Tiles that are nearly flat (grey-level
standard deviation below `--min-std`, in [0, 1] units) are skipped: wallpapers have large bokeh areas that would
otherwise dominate. Training then takes a random crop of each tile at every visit, so many steps see few repeats.

The photographs come from `diffusers_sr3.photos.PHOTO_SOURCES`, those of each source that is installed here: the
script names every source it skipped (not installed, or missing some photographs) and what provides it, on stderr and
in the summary (`missing_photo_sources`), since without them the tiles are another dataset than the shipped model's.

`--texture-copies N` writes N more copies of each texture tile (one whose bicubic-upsampled LR keeps under
`TEXTURE_KEPT_EDGE_SHARE` of its edge energy: foliage, hair, fabric), so training visits texture N + 1 times as often.
A model draws the least of its missing detail on texture, and photographs have less texture than edges.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import queue
import shutil
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

from diffusers_sr3 import photos as photo_sources
from diffusers_sr3.image_io import UnreadableImageError
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
    parser.add_argument(
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="photographs tiled at once, one process each (default: every core); the tiles are the same for any "
        "number. The shipped run's 78 photographs: 92 s in one process and 44 s in two on a 2-core machine; 3.6 "
        "minutes in one on the H200 machine's 16 cores (the GPU run's fourth call)",
    )
    args = parser.parse_args(argv)

    missing = missing_photo_sources()
    for line in missing:
        print(f"photo_tiles: skipped photo source {line}", file=sys.stderr)
    if missing:
        print(
            "photo_tiles: these tiles are not the shipped model's training data: install what provides the skipped "
            "sources to tile it",
            file=sys.stderr,
        )
    train, held = photo_split(packaged_photo_paths(), heldout=0.25)
    photos = train + [pathlib.Path(path) for path in args.extra]
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.texture_copies < 0:
        parser.error(f"--texture-copies must not be negative, got {args.texture_copies}")
    jobs = max(1, min(args.jobs, len(photos)))
    started = time.perf_counter()
    counts = (
        [write_tiles(photo, output, args) for photo in photos]
        if jobs == 1
        else tile_in_processes(photos, jobs, output, args)
    )
    written, skipped, texture = (sum(column) for column in zip(*counts)) if counts else (0, 0, 0)
    summary = dict(
        tiles=written,
        skipped_flat=skipped,
        texture_tiles=texture,
        texture_copies=args.texture_copies,
        training_photos=[photo_name(path) for path in photos],
        heldout_photos=[photo_name(path) for path in held],
        missing_photo_sources=missing,
    )
    (output.parent / f"{output.name}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(
        f"{written} tiles from {len(photos)} photographs in {time.perf_counter() - started:.1f} s, {jobs} process(es)"
    )


def missing_photo_sources() -> List[str]:
    """One line for each of `diffusers_sr3.photos.PHOTO_SOURCES` that is not installed or misses some of its
    photographs, naming what provides it: `packaged_photo_paths` skips those silently."""
    lines = []
    for source in photo_sources.PHOTO_SOURCES:
        found = len(source.paths())
        provider = source.provider or f"the folder {source.folder}"
        if not found:
            lines.append(f"{source.name!r}: not installed (provided by {provider})")
        elif source.files is not None and found < len(source.files):
            lines.append(
                f"{source.name!r}: only {found} of its {len(source.files)} photographs found (provided by {provider})"
            )
    return lines


def tile_in_processes(
    photos: List[pathlib.Path], jobs: int, output: pathlib.Path, args: argparse.Namespace
) -> List[Tuple[int, int, int]]:
    """`write_tiles` of every photo, in `jobs` forked processes of one thread each (forked, not pooled: a pool
    pickles its function, and this script is also imported by path, under another module name)."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def tile_share(share: int) -> None:
        torch.set_num_threads(1)
        try:
            results.put((share, [write_tiles(photo, output, args) for photo in photos[share::jobs]]))
        except BaseException as error:  # noqa: BLE001  (reported to the parent, which raises it)
            results.put((share, f"{type(error).__name__}: {error}"))

    processes = [context.Process(target=tile_share, args=(share,)) for share in range(jobs)]
    for process in processes:
        process.start()
    shares: Dict[int, object] = {}
    while len(shares) < jobs:
        try:
            share, result = results.get(timeout=1)
            shares[share] = result
        except queue.Empty:  # a process killed outright reports nothing
            for share, process in enumerate(processes):
                if share not in shares and process.exitcode not in (None, 0):
                    shares[share] = f"its process exited with code {process.exitcode}"
    for process in processes:
        process.join()
    failed = [shares[share] for share in range(jobs) if isinstance(shares[share], str)]
    if failed:
        raise RuntimeError(f"tiling failed: {failed[0]}")
    counts: List[Tuple[int, int, int]] = [(0, 0, 0)] * len(photos)
    for share in range(jobs):
        counts[share::jobs] = shares[share]
    return counts


def write_tiles(photo: pathlib.Path, output: pathlib.Path, args: argparse.Namespace) -> Tuple[int, int, int]:
    """Write one photograph's tiles at every scale; (tiles written, flat tiles skipped, texture tiles)."""
    written, skipped, texture = 0, 0, 0
    for scale in args.scales:
        try:
            tiles = photo_crops([photo], args.tile, stride=args.stride, max_side=scale)
        except UnreadableImageError:  # a corrupt photograph is an error, not a photograph too small to tile
            raise
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
    return written, skipped, texture


def is_texture(tile, upscale_factor: int) -> bool:
    """Whether the bicubic upsample of the tile's LR keeps under `TEXTURE_KEPT_EDGE_SHARE` of its edge energy."""
    pixels = torch.from_numpy(np.array(tile.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    return bool(kept_edge_share(pixels, upscale_factor)[0] < TEXTURE_KEPT_EDGE_SHARE)


if __name__ == "__main__":
    main()
