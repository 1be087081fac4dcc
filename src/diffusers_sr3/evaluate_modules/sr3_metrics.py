"""SR3 super-resolution metrics as a Hugging Face `evaluate` module: PSNR, SSIM and the SR3 paper's consistency.

Load it offline from the installed package:

```py
import evaluate
from PIL import Image
from diffusers_sr3.metrics import evaluate_module_path
from diffusers_sr3.photos import load_photo, packaged_photo_paths

hr = load_photo(packaged_photo_paths()[0], max_side=64)
lr = hr.resize((hr.width // 4, hr.height // 4), Image.BICUBIC)
sr = lr.resize(hr.size, Image.BICUBIC)  # bicubic, the baseline to beat; a model's output goes here

sr3_metrics = evaluate.load(evaluate_module_path())
results = sr3_metrics.compute(predictions=[sr], references=[hr], low_resolution=[lr])
# {'psnr': ..., 'ssim': ..., 'consistency': ..., 'num_images': 1}: plain numbers, ready for a model card
```

The numbers come from `diffusers_sr3.metrics`, the same code as `sr3 eval` and the training validation.
"""

import datasets
import evaluate
import numpy as np
import PIL.Image

from diffusers_sr3 import metrics

_DESCRIPTION = """
PSNR and SSIM with the original SR3 project's definitions (RGB uint8 images; PSNR = 10 log10(255^2 / MSE) in
float64; SSIM per channel with an 11x11 Gaussian window, sigma 1.5, over the valid positions, averaged over the
channels; no border crop), and the SR3 paper's consistency: the MSE, in [0, 1] units, between the low-resolution
input and the bicubic downsample of the output (the paper reports it x1e5).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: super-resolved images (PIL images or uint8 `(H, W, 3)` / `(H, W)` arrays).
    references: the ground-truth high-resolution images, of the same sizes.
    low_resolution (optional): the low-resolution inputs; adds `consistency`.
    per_image (`bool`, defaults to False): also return the per-image values (`psnr_per_image`, ...).

Returns:
    A flat dict of means, ready for a model card's `model-index` results: `psnr` (dB), `ssim`, `consistency`
    (with `low_resolution`; MSE in [0, 1] units) and `num_images`. Identical pairs give `psnr` = inf.

Example:
    >>> import evaluate
    >>> import numpy as np
    >>> from diffusers_sr3.metrics import evaluate_module_path
    >>> sr3_metrics = evaluate.load(evaluate_module_path())
    >>> hr = np.full((16, 16, 3), 128, dtype=np.uint8)
    >>> sr = hr.copy()
    >>> sr[0, 0] = 132  # one pixel off by 4 in every channel
    >>> results = sr3_metrics.compute(predictions=[sr], references=[hr])
    >>> sorted(results)
    ['num_images', 'psnr', 'ssim']
    >>> round(results["psnr"], 2)
    60.17
"""

_CITATION = """
@article{saharia2021image,
  title={Image Super-Resolution via Iterative Refinement},
  author={Saharia, Chitwan and Ho, Jonathan and Chan, William and Salimans, Tim and Fleet, David J
    and Norouzi, Mohammad},
  journal={arXiv preprint arXiv:2104.07636},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sr3Metrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://arxiv.org/abs/2104.07636"],
        )

    # `datasets.Image` would store other arrays as uint8 by wrapping their values (16-bit 300 -> 44): refuse them
    # first, as `diffusers_sr3.metrics` does. PIL images go in as the arrays `metrics` reads from them: it would
    # re-encode a JPEG or WebP image at quality 75, re-read one opened from a file from disk (losing edits made in
    # memory) and turn it by its EXIF orientation, where `metrics` takes the pixels as they are.
    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and its reference (uint8 arrays or PIL images)."""
        for name in ("predictions", "references"):  # `evaluate` takes either name
            if name in kwargs:
                kwargs[name] = _as_array(kwargs[name], name[:-1])
        prediction, reference = _as_array(prediction, "prediction"), _as_array(reference, "reference")
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (uint8 arrays or PIL images)."""
        predictions, references = _as_arrays(predictions, "predictions"), _as_arrays(references, "references")
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """The metrics of the images added and given (uint8 arrays or PIL images)."""
        predictions, references = _as_arrays(predictions, "predictions"), _as_arrays(references, "references")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, low_resolution=None, per_image=False):
        if low_resolution is not None and len(low_resolution) != len(predictions):
            raise ValueError(f"{len(low_resolution)} low_resolution images for {len(predictions)} predictions")
        per_image_values = metrics.image_set_metrics(predictions, references, low_resolution)
        results = dict(metrics.summarize(per_image_values), num_images=len(predictions))
        if per_image:
            results.update({f"{name}_per_image": values for name, values in per_image_values.items()})
        return results


def _as_array(image, name):
    """`image` as `metrics` reads it: a PIL image as its uint8 `(H, W, 3)` array; other than uint8 arrays refused."""
    if isinstance(image, PIL.Image.Image):
        return metrics.to_uint8_rgb(image, name)
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        if image.dtype == np.uint16:
            hint = " (16-bit: `(image / 257).round().astype(np.uint8)`)"
        elif np.issubdtype(image.dtype, np.floating):  # Diffusers' `output_type="np"`: floats in [0, 1]
            hint = " ([0, 1] floats: `(image * 255).round().astype(np.uint8)`)"
        else:
            hint = ""
        raise ValueError(f"{name}: metrics take uint8 images, got dtype {image.dtype}{hint}")
    return image


def _as_arrays(images, name):
    return None if images is None else [_as_array(image, f"{name}[{index}]") for index, image in enumerate(images)]
