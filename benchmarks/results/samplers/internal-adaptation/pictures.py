"""Pictures for the adaptation probe: photos super-resolved whole in detail mode with the packaged settings, as
packaged and with the network adapted to each photo first, side by side with bicubic and the HR on magnified crops
(see README.md beside this file).

    python pictures.py OUTPUT_FOLDER PHOTO [PHOTO ...] [--max-side 512] [--adapt-steps 300] [--learning-rate 1e-4]

Each photo (downscaled to --max-side first, as the held-out photos are; 0 keeps its size, as for the never-seen ones)
is downsampled x4 and quantised to 8 bits, as a user's file would hold it. `OUTPUT/<photo>.png` holds, per row, a
crop of 64 output pixels magnified x3: bicubic | detail | detail adapted | HR; the rows are the photo's two most
detailed crops (most HR edge energy) and its flattest. Seed 0; the time of each run is printed.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import model_report  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptation import adapted_to  # noqa: E402

from diffusers_sr3 import SR3Pipeline  # noqa: E402
from diffusers_sr3.image_processing import grid, tensor_to_pil, upsample_condition  # noqa: E402
from diffusers_sr3.metrics import edge_energy  # noqa: E402
from diffusers_sr3.pretrained import default_model_path  # noqa: E402

CROP, MAGNIFY = 64, 3


def crop_places(hr: torch.Tensor) -> list:
    """The (top, left) of the two most detailed CROP-pixel crops on a CROP grid, and of the flattest."""
    places = [
        (top, left)
        for top in range(0, hr.shape[-2] - CROP + 1, CROP)
        for left in range(0, hr.shape[-1] - CROP + 1, CROP)
    ]
    energy = edge_energy(torch.cat([hr[..., t : t + CROP, x : x + CROP] for t, x in places]))
    order = energy.argsort(descending=True).tolist()
    return [places[order[0]], places[order[1]], places[order[-1]]]


def detail(pipeline: SR3Pipeline, lr: torch.Tensor, name: str) -> torch.Tensor:
    """Detail mode at the pipeline's own settings, seed 0, in [-1, 1]."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    image = pipeline(lr, mode="detail", generator=generator, output_type="pt").images * 2 - 1
    print(f"{name}: detail mode in {time.perf_counter() - started:.1f} s", flush=True)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--max-side", type=int, default=0)
    parser.add_argument("--adapt-steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pipeline = SR3Pipeline.from_pretrained(default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    factor = pipeline.config.upscale_factor
    for photo in args.photos:
        hr = model_report.load_whole_photos([photo], factor, args.max_side or None)[0]
        lr = (model_report.low_resolution_input(hr, factor) + 1) / 2

        packaged = detail(pipeline, lr, Path(photo).name)
        with adapted_to(pipeline, lr, steps=args.adapt_steps, learning_rate=args.learning_rate) as adaptation:
            print(f"{Path(photo).name}: adapted in {adaptation.seconds:.0f} s", flush=True)
            adapted = detail(pipeline, lr, Path(photo).name)
        bicubic = upsample_condition(lr * 2 - 1, tuple(hr.shape[-2:])).clamp(-1, 1)
        columns = [bicubic, packaged, adapted, hr]
        rows = [
            [tensor_to_pil(image[..., top : top + CROP, left : left + CROP])[0] for image in columns]
            for top, left in crop_places(hr)
        ]
        grid(rows, (CROP * MAGNIFY, CROP * MAGNIFY)).save(output / f"{Path(photo).stem}.png")


if __name__ == "__main__":
    main()
