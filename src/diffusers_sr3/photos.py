"""Real photographs that ship inside installed packages, for demos, tests and small training studies.

This machine has no network, so training and evaluation data come from photographs that packages carry:
scikit-image's `skimage/data`, matplotlib's `sample_data/grace_hopper.jpg`, scikit-learn's
`datasets/images/{china,flower}.jpg`, and, when the Debian packages are installed, the nature photographs of
`mate-backgrounds` and `plasma-workspace-wallpapers`. Only real colour photographs are listed: synthetic,
binary, grayscale and tiny test images are left out, and so is the right half of scikit-image's stereo pair
(a near-duplicate of the left half would leak between a training and a held-out split).

Packages are located with `importlib.util.find_spec`, which does not import them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from .image_io import open_image
from .image_processing import images_to_tensor

# (importable package, folder inside it, file names): photographs shipped in Python packages.
PYTHON_PACKAGE_PHOTOS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    (
        "skimage",
        "data",
        (
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "hubble_deep_field.jpg",
            "ihc.png",
            "motorcycle_left.png",
            "retina.jpg",
            "rocket.jpg",
        ),
    ),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
)

MATE_NATURE_DIR = pathlib.Path("/usr/share/backgrounds/mate/nature")
MATE_NATURE_PHOTOS = (
    "Aqua.jpg",
    "Blinds.jpg",
    "Dune.jpg",
    "FreshFlower.jpg",
    "Garden.jpg",
    "GreenMeadow.jpg",
    "LadyBird.jpg",
    "RainDrops.jpg",
    "Storm.jpg",
    "TwoWings.jpg",
    "Wood.jpg",
    "YellowFlower.jpg",
)
PLASMA_WALLPAPER_DIR = pathlib.Path("/usr/share/wallpapers")
# The photographic Plasma wallpapers; the others are renders and drawings.
PLASMA_PHOTO_WALLPAPERS = (
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Kite",
    "OneStandsOut",
    "Path",
    "Volna",
    "summer_1am",
)

PHOTO_PROVIDERS = (
    "scikit-image (pip install scikit-image), matplotlib (pip install matplotlib), scikit-learn "
    "(pip install scikit-learn), or the Debian packages mate-backgrounds and plasma-workspace-wallpapers"
)


def _package_dir(package: str) -> Optional[pathlib.Path]:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _largest_wallpaper_image(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The highest-resolution landscape rendition of a Plasma wallpaper (files are named `WxH.ext`)."""
    best, best_area = None, 0
    for path in (folder / "contents" / "images").glob("*x*.*"):
        try:
            width, height = (int(part) for part in path.stem.split("x"))
        except ValueError:
            continue
        if width >= height and width * height > best_area:
            best, best_area = path, width * height
    return best


def photo_name(path: Union[str, pathlib.Path]) -> str:
    """A stable, unique name for a photograph: the file stem, or the wallpaper's name for Plasma wallpapers."""
    path = pathlib.Path(path)
    if path.parent.name == "images" and path.parent.parent.name == "contents":
        return path.parent.parent.parent.name
    return path.stem


def packaged_photo_paths() -> List[pathlib.Path]:
    """Paths of the real colour photographs shipped by the installed packages, sorted by `photo_name`.

    Raises:
        FileNotFoundError: no such photograph is installed (the message names the packages that provide them).
    """
    paths: List[pathlib.Path] = []
    for package, folder, names in PYTHON_PACKAGE_PHOTOS:
        root = _package_dir(package)
        if root is not None:
            paths.extend(root / folder / name for name in names)
    paths.extend(MATE_NATURE_DIR / name for name in MATE_NATURE_PHOTOS)
    for wallpaper in PLASMA_PHOTO_WALLPAPERS:
        image = _largest_wallpaper_image(PLASMA_WALLPAPER_DIR / wallpaper)
        if image is not None:
            paths.append(image)
    paths = [path for path in paths if path.is_file()]
    if not paths:
        raise FileNotFoundError(f"no packaged photographs found; install one of: {PHOTO_PROVIDERS}")
    return sorted(paths, key=photo_name)


def photo_split(
    paths: Sequence[Union[str, pathlib.Path]], heldout: Union[int, float, Iterable[str]] = 0.25
) -> Tuple[List[pathlib.Path], List[pathlib.Path]]:
    """Split whole photographs into a training and a held-out list, deterministically.

    The order is a hash of each `photo_name`, so a photo's side of the split does not depend on which other
    photos are installed beyond the count taken.

    Args:
        paths: photographs (e.g. from [`packaged_photo_paths`]).
        heldout: how many photos to hold out (int), which fraction (float in (0, 1), rounded, at least one),
            or the names (see [`photo_name`]) of the photos to hold out.

    Returns:
        `(train, heldout)` lists of paths, each sorted by `photo_name`; both non-empty.
    """
    paths = [pathlib.Path(path) for path in paths]
    names = [photo_name(path) for path in paths]
    if len(set(names)) != len(names):
        raise ValueError("photo_split needs photos with distinct names")
    if len(paths) < 2:
        raise ValueError(f"need at least 2 photos to split into training and held-out sets, got {len(paths)}")
    if isinstance(heldout, (int, float)) and not isinstance(heldout, bool):
        if isinstance(heldout, float):
            if not 0 < heldout < 1:
                raise ValueError(f"a held-out fraction must lie in (0, 1), got {heldout}")
            count = max(1, round(heldout * len(paths)))
        else:
            count = heldout
        if not 1 <= count < len(paths):
            raise ValueError(f"cannot hold out {count} of {len(paths)} photos; keep at least one on each side")
        order = sorted(range(len(paths)), key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())
        chosen = {names[i] for i in order[:count]}
    else:
        chosen = set(heldout)
        unknown = chosen - set(names)
        if unknown:
            raise ValueError(f"held-out photos not among the given paths: {sorted(unknown)}")
        if not chosen or len(chosen) == len(paths):
            raise ValueError("the held-out names must leave at least one photo on each side")
    ordered = sorted(zip(names, paths))
    train = [path for name, path in ordered if name not in chosen]
    held = [path for name, path in ordered if name in chosen]
    return train, held


def load_photo(path: Union[str, pathlib.Path], max_side: Optional[int] = None) -> PIL.Image.Image:
    """Open a photograph as RGB, downscaled (antialiased bicubic) so that its longer side is at most `max_side`."""
    # JPEG decoding at a reduced scale (draft) is much faster for the multi-megapixel wallpapers.
    image = open_image(path, draft_size=max_side)
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, PIL.Image.BICUBIC, reducing_gap=None)
    return image


def photo_crops(
    paths: Sequence[Union[str, pathlib.Path]],
    size: int,
    count: Optional[int] = None,
    stride: Optional[int] = None,
    seed: int = 0,
    max_side: Optional[int] = None,
    output_type: str = "pil",
) -> Union[List[PIL.Image.Image], torch.Tensor]:
    """Square crops of photographs: `count` random crops, or all crops on a grid of step `stride`.

    Random crops pick a photo with probability proportional to its number of crop positions, so every
    position of every photo is equally likely; the same `seed` gives the same crops.

    Args:
        paths: photographs.
        size: crop side in pixels.
        count: number of random crops (give exactly one of `count` and `stride`).
        stride: grid step for exhaustive crops, in pixels.
        seed: random seed for `count` crops.
        max_side: downscale each photo so its longer side is at most this before cropping (large
            wallpapers are otherwise mostly smooth at 64x64).
        output_type: `"pil"` (list of RGB images) or `"pt"` (`(N, 3, size, size)` float32 in [-1, 1]).

    Returns:
        The crops, in photo order for `stride` and in draw order for `count`.
    """
    if (count is None) == (stride is None):
        raise ValueError("give exactly one of count (random crops) and stride (grid crops)")
    if size < 1 or (count is not None and count < 1) or (stride is not None and stride < 1):
        raise ValueError(f"size, count and stride must be positive, got size={size}, count={count}, stride={stride}")
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    if not paths:
        raise ValueError("no photos given")
    photos = [load_photo(path, max_side) for path in paths]
    usable = [photo for photo in photos if photo.width >= size and photo.height >= size]
    if not usable:
        raise ValueError(f"no photo is at least {size}x{size} pixels")
    crops: List[PIL.Image.Image] = []
    if stride is not None:
        for photo in usable:
            for top in range(0, photo.height - size + 1, stride):
                for left in range(0, photo.width - size + 1, stride):
                    crops.append(photo.crop((left, top, left + size, top + size)))
    else:
        rng = np.random.default_rng(seed)
        positions = np.array([(p.width - size + 1) * (p.height - size + 1) for p in usable], dtype=np.float64)
        choices = rng.choice(len(usable), size=count, p=positions / positions.sum())
        for index in choices:
            photo = usable[index]
            left = int(rng.integers(0, photo.width - size + 1))
            top = int(rng.integers(0, photo.height - size + 1))
            crops.append(photo.crop((left, top, left + size, top + size)))
    if output_type == "pil":
        return crops
    return images_to_tensor(crops, what="crop")
