"""Probe: the packaged UNet's weights extrapolated away from its guide's (the same run at step 26,063), written as
pipeline folders for `benchmarks/samplers.py --model` (see README.md beside this file).

    python make_models.py OUTPUT_DIR 0.25 0.5 1     # writes OUTPUT_DIR/alpha-0.25/, ...: unet = w + alpha (w - w_guide)
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

PACKAGED = Path(__file__).resolve().parents[4] / "src/diffusers_sr3/pretrained/sr3-photos-x4"
WEIGHTS = "diffusion_pytorch_model.safetensors"

output, *alphas = sys.argv[1:]
unet = load_file(PACKAGED / "unet" / WEIGHTS)
guide = load_file(PACKAGED / "guidance_unet" / WEIGHTS)
for alpha in map(float, alphas):
    folder = Path(output) / f"alpha-{alpha:g}"
    shutil.copytree(PACKAGED, folder, dirs_exist_ok=True)
    extrapolated = {
        name: weight + alpha * (weight - guide[name]) if weight.is_floating_point() else weight
        for name, weight in unet.items()
    }
    save_file(extrapolated, folder / "unet" / WEIGHTS)
    print(folder)
