"""Could a photo's own input tell whether adapting to it helps? (a follow-up to the probe beside this folder)

For every never-seen and held-out photo, whole: the edge energy of the bicubic upsample and of detail mode at the
packaged setting against the HR's, at the real scale (the x4 input super-resolved, against the HR) and at the input's
own scale (the input's x4 downsample super-resolved, against the input: what adaptation trains on, and the only
scale a rule could read), and the input's noise level (Immerkaer's estimator, 8-bit luma). Run from `benchmarks/`:

    python results/samplers/internal-adaptation/follow-up/own_scale.py
"""

import math
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4]))
import model_report  # noqa: E402

from diffusers_sr3 import SR3Pipeline  # noqa: E402
from diffusers_sr3.image_io import find_images  # noqa: E402
from diffusers_sr3.image_processing import upsample_condition  # noqa: E402
from diffusers_sr3.metrics import edge_energy, quantize  # noqa: E402
from diffusers_sr3.photos import packaged_photo_paths, photo_name, photo_split  # noqa: E402
from diffusers_sr3.pretrained import default_model_path  # noqa: E402

pipeline = SR3Pipeline.from_pretrained(default_model_path())
LAPLACIAN_DIFFERENCE = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=torch.float64).view(1, 1, 3, 3)


def noise_sigma(image: torch.Tensor) -> float:
    """Immerkaer (1996) fast noise estimate of the 8-bit luma (channel mean) of `image` in [-1, 1]."""
    luma = quantize(image).mean(dim=1, keepdim=True)
    height, width = luma.shape[-2:]
    response = F.conv2d(luma, LAPLACIAN_DIFFERENCE).abs().sum()
    return math.sqrt(math.pi / 2) / (6 * (width - 2) * (height - 2)) * float(response)


def edges_against(target: torch.Tensor, low_resolution: torch.Tensor) -> str:
    """Bicubic and detail-mode edge energy of `low_resolution` upscaled, against `target`'s."""
    reference = edge_energy(target)
    bicubic = upsample_condition(low_resolution, tuple(target.shape[-2:])).clamp(-1, 1)
    generator = torch.Generator().manual_seed(0)
    detail = pipeline((low_resolution + 1) / 2, mode="detail", generator=generator, output_type="pt").images * 2 - 1
    return f"{float(edge_energy(bicubic) / reference):.3f} | {float(edge_energy(detail) / reference):.3f}"


heldout = photo_split(packaged_photo_paths(), heldout=0.25)[1]
sets = {"never-seen": (find_images(["pyiqa_ref_dir"]), None), "held-out": (heldout, 512)}
print("set | photo | real scale: bicubic | detail | own scale: bicubic | detail | input's noise sigma (/255)")
for name, (paths, max_side) in sets.items():
    for path, hr in zip(paths, model_report.load_whole_photos(paths, 4, max_side)):
        lr = model_report.low_resolution_input(hr, 4)
        own_high = lr[..., : lr.shape[-2] // 4 * 4, : lr.shape[-1] // 4 * 4]  # x4 of a whole downsample
        own_scale = edges_against(own_high, model_report.low_resolution_input(own_high, 4))
        real_scale = edges_against(hr, lr)
        print(f"{name} | {photo_name(path)} | {real_scale} | {own_scale} | {noise_sigma(lr):.2f}", flush=True)
