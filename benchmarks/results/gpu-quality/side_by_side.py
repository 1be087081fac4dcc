"""Two models' outputs on the same crops, side by side: bicubic | A fidelity | B fidelity | A detail | B detail | HR.

    python results/gpu-quality/side_by_side.py A_FOLDER B_FOLDER --output results/gpu-quality/side-by-side.png

A and B are `model_report.py --save-outputs` folders of the same crops (one `outputs_<set>.npz` per set); the rows
are the three crops of each set with the most HR edge energy, then its flattest crop with the contrast raised
`--flat-contrast` times around the crop's mean (where grain would show), magnified x3. Sets whose crops differ in size
from the first set's (the original's 128-pixel faces beside 64-pixel photo crops) are left out, with a note.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model_report import busiest, flattest, load_outputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=3, help="crops per set")
    parser.add_argument("--flat-contrast", type=float, default=8.0, help="contrast of the flattest crop's row")
    args = parser.parse_args()
    rows = []
    for path in sorted(args.first.glob("outputs_*.npz")):
        name, first = load_outputs(str(path))
        _, second = load_outputs(str(args.second / path.name))
        if not np.array_equal(first["HR"], second["HR"]):
            raise ValueError(f"{path.name}: the two folders hold different crops")
        if rows and first["HR"].shape[-1] != rows[0].shape[0]:
            print(f"left out {name}: {first['HR'].shape[-1]}-pixel crops, not {rows[0].shape[0]}")
            continue
        hr = torch.from_numpy(first["HR"]).float() / 127.5 - 1  # as saved: 8 bits of [-1, 1]
        columns = [first["bicubic"], first["SR3 fidelity"], second["SR3 fidelity"]]
        columns += [first["SR3 detail"], second["SR3 detail"], first["HR"]]
        for index in busiest(hr, args.rows):
            rows.append(np.concatenate([column[index].transpose(1, 2, 0) for column in columns], axis=1))
        flat = flattest(hr)
        tiles = [column[flat].transpose(1, 2, 0).astype(np.float32) for column in columns]
        tiles = [(tile - tile.mean()) * args.flat_contrast + tile.mean() for tile in tiles]
        rows.append(np.concatenate([np.clip(tile, 0, 255) for tile in tiles], axis=1))
    picture = Image.fromarray(np.concatenate(rows, axis=0).astype(np.uint8))
    picture.resize((picture.width * 3, picture.height * 3), Image.NEAREST).save(args.output)


if __name__ == "__main__":
    main()
