"""Adaptation with rehearsal, per photo (a follow-up to the probe beside this folder, see README.md there).

Each named photo (never-seen ones from `pyiqa_ref_dir/`, held-out ones at 512 pixels) is super-resolved whole in
detail mode at the packaged setting and at guidance 1, with the packaged weights, adapted as `adaptation.py` adapts
them (300 steps of 16 of the input's own crops at 1e-4), and adapted with rehearsal: half of each batch drawn from
2400 crops of the training photos at 512 pixels, so that the network keeps seeing what it was trained on. Prints the
whole photo's PSNR and edge energy against the HR's. With `--pictures FOLDER`, also writes `FOLDER/<photo>.png`:
bicubic | packaged | adapted | adapted with rehearsal | HR at the packaged setting, on `pictures.py`'s crops (the
photo's two most detailed and its flattest, magnified x3). Run from `benchmarks/`:

    python results/samplers/internal-adaptation/follow-up/rehearsal.py I06 I08 GreenMeadow chelsea coffee
    python results/samplers/internal-adaptation/follow-up/rehearsal.py I08 GreenMeadow \
        --pictures results/samplers/internal-adaptation/follow-up/pictures
"""

import argparse
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3]))
sys.path.insert(0, str(HERE.parent))
import adaptation  # noqa: E402
import model_report  # noqa: E402
from pictures import CROP, MAGNIFY, crop_places  # noqa: E402

from diffusers_sr3 import SR3Pipeline  # noqa: E402
from diffusers_sr3.image_io import find_images  # noqa: E402
from diffusers_sr3.image_processing import grid, tensor_to_pil, upsample_condition  # noqa: E402
from diffusers_sr3.metrics import edge_energy, psnr_uint8, quantize  # noqa: E402
from diffusers_sr3.photos import packaged_photo_paths, photo_crops, photo_name, photo_split  # noqa: E402
from diffusers_sr3.pretrained import default_model_path  # noqa: E402

pipeline = SR3Pipeline.from_pretrained(default_model_path())
training, heldout = photo_split(packaged_photo_paths(), heldout=0.25)
rehearsal_pool = photo_crops(training, 64, count=2400, seed=0, max_side=512, output_type="pt")
own_crops = adaptation.internal_training_crops


def crops_with_rehearsal(image, count, crop_size, generator, **options):
    """Half the input's own crops, half crops of the training photos."""
    own = own_crops(image, count - count // 2, crop_size, generator, **options)
    return torch.cat([own, rehearsal_pool[torch.randint(len(rehearsal_pool), (count // 2,), generator=generator)]])


def scores(output: torch.Tensor, hr: torch.Tensor) -> str:
    psnr = float(psnr_uint8(quantize(output), quantize(hr)).mean())
    return f"{psnr:.2f} dB / {float(edge_energy(output) / edge_energy(hr)):.3f}"


def detail(low_resolution: torch.Tensor, **options) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = (low_resolution + 1) / 2
    return pipeline(image, mode="detail", generator=generator, output_type="pt", **options).images * 2 - 1


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("photos", nargs="+", help="never-seen or held-out photos by name (I08, GreenMeadow, ...)")
parser.add_argument("--pictures", type=pathlib.Path, help="folder for the pictures")
args = parser.parse_args()
names = args.photos
never_seen = [path for path in find_images(["pyiqa_ref_dir"]) if photo_name(path) in names]
held = [path for path in heldout if photo_name(path) in names]
unknown = set(names) - {photo_name(path) for path in never_seen + held}
if unknown:
    parser.error(f"no never-seen or held-out photo named {', '.join(sorted(unknown))}")
photos = list(zip(never_seen, model_report.load_whole_photos(never_seen, 4))) + list(
    zip(held, model_report.load_whole_photos(held, 4, 512))
)
print("photo | bicubic | weights: detail (packaged setting) / detail at guidance 1 (PSNR / edges of the HR's)")
for path, hr in photos:
    lr = model_report.low_resolution_input(hr, 4)
    bicubic = upsample_condition(lr, tuple(hr.shape[-2:])).clamp(-1, 1)
    packaged = detail(lr)
    columns = [bicubic, packaged]
    row = [
        photo_name(path),
        scores(bicubic, hr),
        f"packaged {scores(packaged, hr)} / {scores(detail(lr, guidance_scale=1.0), hr)}",
    ]
    for label, crops in (("adapted", own_crops), ("with rehearsal", crops_with_rehearsal)):
        adaptation.internal_training_crops = crops
        try:
            with adaptation.adapted_to(pipeline, (lr + 1) / 2) as adapted:
                columns.append(detail(lr))
                row.append(
                    f"{label} {scores(columns[-1], hr)} / {scores(detail(lr, guidance_scale=1.0), hr)} "
                    f"(loss {adapted.first_loss:.3f} -> {adapted.last_loss:.3f})"
                )
        finally:
            adaptation.internal_training_crops = own_crops
    print(" | ".join(row), flush=True)
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        pictures = [
            [tensor_to_pil(image[..., top : top + CROP, left : left + CROP])[0] for image in columns + [hr]]
            for top, left in crop_places(hr)
        ]
        grid(pictures, (CROP * MAGNIFY, CROP * MAGNIFY)).save(args.pictures / f"{photo_name(path)}.png")
