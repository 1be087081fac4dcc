"""Real photographs available offline, for demos, tests and small training studies.

Photographs come from a list of offline photo sources, `PHOTO_SOURCES`, searched in order. The default entries
are photographs that installed packages carry, so the demo, the benchmarks and the tests need no download:
scikit-image's `skimage/data`, matplotlib's `sample_data/grace_hopper.jpg`, scikit-learn's
`datasets/images/{china,flower}.jpg`, and, on Debian-based systems with the `mate-backgrounds` and
`plasma-workspace-wallpapers` packages installed, their nature photographs under `/usr/share`. Only real colour
photographs are listed: synthetic, binary, grayscale and tiny test images are left out, and so is the right half
of scikit-image's stereo pair (a near-duplicate of the left half would leak between a training and a held-out
split). Sources that are not installed are skipped.

Add your own photographs with [`register_photo_source`]:

```py
from diffusers_sr3.photos import PhotoSource, register_photo_source

register_photo_source(PhotoSource("my holiday photos", folder="/data/holiday"))  # every image in the folder
register_photo_source(PhotoSource("a package's photos", folder="images", package="my_package", files=("a.jpg",)))
```

Packages are located with `importlib.util.find_spec`, which does not import them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import numbers
import pathlib
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from .image_io import open_image, walk_images
from .image_processing import images_to_tensor


@dataclasses.dataclass(frozen=True)
class PhotoSource:
    """A place that holds real photographs offline: a folder, or a folder inside an installed Python package.

    Args:
        name: what it is, in words.
        folder: the folder; relative to the installed `package`'s folder when `package` is given.
        files: the photographs' file names in `folder` (entries that are missing are skipped); None for every
            image file in `folder`, recursively.
        package: an importable top-level package that carries `folder` (found without importing it).
        provider: how to install the photographs (named in the error when no source has any).
        resolve: turns `folder / entry` for each entry of `files` into the photograph's path (or None): for
            layouts where an entry is a folder holding renditions of one photo (Plasma wallpapers).
    """

    name: str
    folder: Union[str, pathlib.Path]
    files: Optional[Tuple[str, ...]] = None
    package: Optional[str] = None
    provider: str = ""
    resolve: Optional[Callable[[pathlib.Path], Optional[pathlib.Path]]] = None

    def paths(self) -> List[pathlib.Path]:
        """The photographs of this source that exist here (empty when it is not installed)."""
        root = pathlib.Path(self.folder)
        if self.package is not None:
            package_dir = _package_dir(self.package)
            if package_dir is None:
                return []
            root = package_dir / root
        if not root.is_dir():
            return []
        if self.files is None:
            return [pathlib.Path(path) for path in walk_images(root)]
        found = [self.resolve(root / name) if self.resolve else root / name for name in self.files]
        return [path for path in found if path is not None and path.is_file()]


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
    # In name order: of two renditions of one size (1920x1080.jpg and .png) the same one wins on every filesystem,
    # whatever order it lists them in, so a photo set names the same files everywhere.
    for path in sorted((folder / "contents" / "images").glob("*x*.*")):
        try:
            width, height = (int(part) for part in path.stem.split("x"))
        except ValueError:
            continue
        if width >= height and width * height > best_area:
            best, best_area = path, width * height
    return best


# The default sources: photographs that ship with Python packages, then (Debian-based systems only) two wallpaper
# packages' nature photographs. Append to this list, or use `register_photo_source`, to add photographs.
PHOTO_SOURCES: List[PhotoSource] = [
    PhotoSource(
        "scikit-image sample photographs",
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
        package="skimage",
        provider="scikit-image (pip install scikit-image)",
    ),
    PhotoSource(
        "matplotlib sample photograph",
        "mpl-data/sample_data",
        ("grace_hopper.jpg",),
        package="matplotlib",
        provider="matplotlib (pip install matplotlib)",
    ),
    PhotoSource(
        "scikit-learn sample photographs",
        "datasets/images",
        ("china.jpg", "flower.jpg"),
        package="sklearn",
        provider="scikit-learn (pip install scikit-learn)",
    ),
    PhotoSource(
        "MATE nature backgrounds (Debian package mate-backgrounds)",
        "/usr/share/backgrounds/mate/nature",
        (
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
        ),
        provider="the Debian package mate-backgrounds",
    ),
    PhotoSource(
        # The photographic Plasma wallpapers; the others are renders and drawings.
        "KDE Plasma photo wallpapers (Debian package plasma-workspace-wallpapers)",
        "/usr/share/wallpapers",
        (
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
        ),
        provider="the Debian package plasma-workspace-wallpapers",
        resolve=_largest_wallpaper_image,
    ),
]


def register_photo_source(source: PhotoSource) -> None:
    """Add a source of photographs to `PHOTO_SOURCES` (after the defaults); see the module docstring."""
    if any(existing.name == source.name for existing in PHOTO_SOURCES):
        raise ValueError(f"a photo source named {source.name!r} is already registered")
    PHOTO_SOURCES.append(source)


def photo_name(path: Union[str, pathlib.Path]) -> str:
    """A stable, unique name for a photograph: the file stem, or the wallpaper's name for Plasma wallpapers."""
    path = pathlib.Path(path)
    if path.parent.name == "images" and path.parent.parent.name == "contents":
        return path.parent.parent.parent.name
    return path.stem


def packaged_photo_paths(sources: Optional[Sequence[PhotoSource]] = None) -> List[pathlib.Path]:
    """Paths of the photographs of every installed source, sorted by `photo_name`.

    Args:
        sources: where to look (default: `PHOTO_SOURCES`).

    Raises:
        FileNotFoundError: no source has any photograph (the message names what provides them).
    """
    sources = PHOTO_SOURCES if sources is None else sources
    paths = [path for source in sources for path in source.paths()]
    if not paths:
        providers = ", ".join(source.provider or source.name for source in sources)
        raise FileNotFoundError(f"no packaged photographs found; install one of: {providers}")
    return sorted(paths, key=photo_name)


# The photos the packaged model (pretrained/sr3-photos-x4) never trained on, as its model card names them: the 0.25
# split of the photos installed where it was trained. Elsewhere (other photo packages installed) that fraction holds
# out other photos, some of which the model trained on, so every evaluation of the packaged model holds out these.
PACKAGED_MODEL_HELDOUT = (
    "Blinds",
    "ColdRipple",
    "ColorfulCups",
    "EveningGlow",
    "FreshFlower",
    "GreenMeadow",
    "chelsea",
    "coffee",
)


def packaged_model_heldout(paths: Optional[Sequence[Union[str, pathlib.Path]]] = None) -> List[str]:
    """The names of [`PACKAGED_MODEL_HELDOUT`] among `paths`: the `heldout` argument of [`photo_split`] and
    [`heldout_crops`] that evaluates the packaged model on photos it never trained on, whichever are installed.

    Args:
        paths: photographs (default: [`packaged_photo_paths`]).

    Raises:
        FileNotFoundError: none of the packaged model's held-out photos is among `paths`.
    """
    names = {photo_name(path) for path in (packaged_photo_paths() if paths is None else paths)}
    present = [name for name in PACKAGED_MODEL_HELDOUT if name in names]
    if not present:
        raise FileNotFoundError(
            f"none of the packaged model's held-out photos ({', '.join(PACKAGED_MODEL_HELDOUT)}) is installed: "
            "install scikit-image or the Debian packages mate-backgrounds and plasma-workspace-wallpapers"
        )
    return present


def photo_split(
    paths: Sequence[Union[str, pathlib.Path]], heldout: Union[int, float, Iterable[str]] = 0.25
) -> Tuple[List[pathlib.Path], List[pathlib.Path]]:
    """Split whole photographs into a training and a held-out list, deterministically.

    A count or fraction holds out the first photos in the order of a hash of each `photo_name`: which photos those
    are depends on which others are installed (another package's photo may come first), so a model's held-out
    photos are recorded by name (e.g. [`PACKAGED_MODEL_HELDOUT`]) and passed as `heldout` to evaluate it elsewhere.

    Args:
        paths: photographs (e.g. from [`packaged_photo_paths`]).
        heldout: how many photos to hold out (an integer, numpy's too), which fraction (a float in (0, 1),
            rounded, at least one), or the name (see [`photo_name`]) or names of the photos to hold out.

    Returns:
        `(train, heldout)` lists of paths, each sorted by `photo_name`; both non-empty.
    """
    paths = [pathlib.Path(path) for path in paths]
    names = [photo_name(path) for path in paths]
    if len(set(names)) != len(names):
        raise ValueError("photo_split needs photos with distinct names")
    if len(paths) < 2:
        raise ValueError(f"need at least 2 photos to split into training and held-out sets, got {len(paths)}")
    if isinstance(heldout, bool):
        raise ValueError(f"heldout takes a count, a fraction or photo names, not {heldout}")
    if isinstance(heldout, str):
        heldout = [heldout]  # one photo's name, not its characters
    if isinstance(heldout, numbers.Real):
        if not isinstance(heldout, numbers.Integral):
            if not 0 < heldout < 1:
                raise ValueError(f"a held-out fraction must lie in (0, 1), got {heldout}")
            count = max(1, round(heldout * len(paths)))
        else:
            count = int(heldout)
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
    """Open a photograph upright (EXIF orientation) as RGB, downscaled (antialiased bicubic) so that its longer
    side is at most `max_side`."""
    # JPEG decoding at a reduced scale (draft) is much faster for the multi-megapixel wallpapers.
    image = open_image(path, draft_size=max_side)
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, PIL.Image.BICUBIC, reducing_gap=None)
    return image


def random_crop_positions(
    sizes: Sequence[Tuple[int, int]], size: int, count: int, seed: int, step: int = 1
) -> List[Tuple[int, int, int]]:
    """`count` random places `(photo, top, left)` of `size` crops in photos of `sizes` (height, width), on a grid of
    `step` pixels: every place of every photo equally likely, and the same `seed` gives the same places."""
    places = [((height - size) // step + 1, (width - size) // step + 1) for height, width in sizes]
    totals = np.array([max(rows, 0) * max(columns, 0) for rows, columns in places], dtype=np.float64)
    if not totals.sum():
        raise ValueError(f"no photo is at least {size}x{size} pixels")
    rng = np.random.default_rng(seed)
    positions = []
    for photo in rng.choice(len(sizes), size=count, p=totals / totals.sum()):
        rows, columns = places[photo]
        left = int(rng.integers(0, columns)) * step
        positions.append((int(photo), int(rng.integers(0, rows)) * step, left))
    return positions


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
        for index, top, left in random_crop_positions([(p.height, p.width) for p in usable], size, count, seed):
            crops.append(usable[index].crop((left, top, left + size, top + size)))
    if output_type == "pil":
        return crops
    return images_to_tensor(crops, what="crop")


def heldout_crops(
    size: int,
    count: int,
    seed: int = 0,
    heldout: Union[int, float, Iterable[str]] = 0.25,
    max_side: Optional[int] = 512,
    paths: Optional[Sequence[Union[str, pathlib.Path]]] = None,
) -> Tuple[torch.Tensor, List[pathlib.Path]]:
    """`count` random `size` crops of the held-out photos, `(count, 3, size, size)` in [-1, 1], and those photos.

    The one recipe for evaluation crops (the demo, the benchmarks, the packaged model's tests): whole photos split
    by [`photo_split`] (of `paths`, default [`packaged_photo_paths`]), each downscaled to `max_side` first, and
    crops drawn with `seed + 1`, so they never repeat the draws of training crops made with `seed`.
    """
    _, held = photo_split(packaged_photo_paths() if paths is None else paths, heldout=heldout)
    return photo_crops(held, size, count=count, seed=seed + 1, max_side=max_side, output_type="pt"), held


@dataclasses.dataclass
class StudyCrops:
    """Crops for a small training study: training crops (PIL) and held-out crops (`(N, 3, S, S)` in [-1, 1]),
    with the photos each side was drawn from."""

    train: List[PIL.Image.Image]
    heldout: torch.Tensor
    train_photos: List[pathlib.Path]
    heldout_photos: List[pathlib.Path]


def study_crops(size: int, train_count: int, heldout_count: int, seed: int = 0, **split: Any) -> StudyCrops:
    """Training and evaluation crops the way `sr3 demo` and the convergence study draw them.

    Training crops are drawn with `seed` from the training side of the split, held-out ones by [`heldout_crops`]
    (`seed + 1`). `split` takes [`heldout_crops`]'s `heldout`, `max_side` and `paths`.
    """
    held, heldout_photos = heldout_crops(size, heldout_count, seed=seed, **split)
    max_side = split.pop("max_side", 512)
    paths = split.pop("paths", None)
    train_photos, _ = photo_split(packaged_photo_paths() if paths is None else paths, **split)
    train = photo_crops(train_photos, size, count=train_count, seed=seed, max_side=max_side)
    return StudyCrops(train, held, train_photos, heldout_photos)
