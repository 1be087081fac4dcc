"""How much of SR3's gain over bicubic survives the file format `sr3 upscale` writes.

    python benchmarks/model_report.py --model src/diffusers_sr3/pretrained/sr3-photos-x4 --unseen pyiqa_ref_dir/ \
        --unseen-crops 256 --crops 16 --no-fid --save-outputs --output report/
    python benchmarks/output_formats.py report/outputs_never-seen-photos.npz --output benchmarks/results/output-formats

The crops of one set saved by `model_report.py --save-outputs` are tiled into one picture per method (a photo-sized
image, as a user's output), written in each format and setting with `sr3 upscale`'s own writer options
(`commands.upscale.lossy_options`), read back and compared with the HR over the crops' pixels (not the mosaic's
padding): the picture's PSNR, and the PSNR each method loses to the format against its lossless PNG. Writes
output_formats.json and .md.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_report  # noqa: E402  (a sibling script: the outputs it saves)
from report_files import write_report  # noqa: E402  (a sibling script: where results are written)

from diffusers_sr3.commands.upscale import DEFAULT_QUALITY, lossy_options  # noqa: E402

# (format, quality): None is Pillow's own default options, what `sr3 upscale` wrote before --quality.
SETTINGS: Tuple[Tuple[str, Optional[int]], ...] = (
    ("PNG", None),
    ("JPEG", None),
    ("JPEG", DEFAULT_QUALITY),
    ("WEBP", None),
    ("WEBP", DEFAULT_QUALITY),
)


def mosaic(crops: np.ndarray) -> np.ndarray:
    """`(N, 3, H, W)` uint8 crops -> one `(rows * H, columns * W, 3)` picture, the last row padded with black."""
    count, _, height, width = crops.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    padded = np.zeros((rows * columns, 3, height, width), dtype=np.uint8)
    padded[:count] = crops
    return padded.reshape(rows, columns, 3, height, width).transpose(0, 3, 1, 4, 2).reshape(rows * height, -1, 3)


def written(picture: np.ndarray, image_format: str, quality: Optional[int]) -> Tuple[np.ndarray, int]:
    """`picture` after a round trip through `image_format`, and the file's size in bytes."""
    options = {} if quality is None else lossy_options(image_format, quality)
    buffer = io.BytesIO()
    PIL.Image.fromarray(picture).save(buffer, format=image_format, **options)
    size = buffer.tell()
    buffer.seek(0)
    return np.asarray(PIL.Image.open(buffer).convert("RGB")), size


def psnr(picture: np.ndarray, reference: np.ndarray, real: np.ndarray) -> float:
    """PSNR over the pixels where `real` is set: the mosaic's padding would count as error-free pixels."""
    mse = float(np.mean((picture.astype(np.float64) - reference)[real.astype(bool)] ** 2))
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def measure(arrays: Dict[str, np.ndarray]) -> List[Dict[str, object]]:
    """One row per (format, quality, method): PSNR against the HR, the PSNR lost to the format (against the
    lossless PNG of the same method) and the file size. The first setting must be lossless."""
    hr = mosaic(arrays["HR"])
    real = mosaic(np.ones_like(arrays["HR"]))
    pictures = {name: mosaic(array) for name, array in arrays.items() if name != "HR"}
    rows, lossless = [], {}
    for image_format, quality in SETTINGS:
        for method, picture in pictures.items():
            read_back, size = written(picture, image_format, quality)
            value = psnr(read_back, hr, real)
            lossless.setdefault(method, value)
            rows.append(
                {
                    "format": image_format,
                    "quality": "Pillow's default" if quality is None else quality,
                    "method": method,
                    "psnr": value,
                    "lost_to_format": lossless[method] - value,
                    "kib": size / 1024,
                }
            )
    return rows


def markdown(set_name: str, rows: List[Dict[str, object]]) -> str:
    lossless = {row["method"]: row["psnr"] for row in rows if row["format"] == "PNG"}
    gains = ", ".join(f"{method} {value - lossless['bicubic']:+.2f} dB" for method, value in lossless.items())
    lines = [
        f"{set_name}: all crops tiled into one picture per method, written and read back. Lossless gains over "
        f"bicubic: {gains}. Lost: PSNR lost to the format against the same method's PNG.",
        "",
        "| format | quality | method | PSNR | lost | KiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['format']} | {row['quality']} | {row['method']} | {row['psnr']:.2f} | "
            f"{row['lost_to_format']:.2f} | {row['kib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", help="one outputs_<set>.npz of `model_report.py --save-outputs`")
    parser.add_argument("--output", required=True, help="folder for output_formats.json and .md")
    args = parser.parse_args(argv)
    set_name, arrays = model_report.load_outputs(args.outputs)
    rows = measure(arrays)
    report = {"set": set_name, "crops": int(arrays["HR"].shape[0]), "rows": rows}
    text = write_report(args.output, "output_formats", report, markdown(set_name, rows))
    print(text)
    return report


if __name__ == "__main__":
    main()
