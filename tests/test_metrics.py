"""The metrics against a straight implementation of the original SR3 definitions, on the fixture image pairs.

Measured agreement (these tolerances are what the assertions demand):
- PSNR: equal to the original's float64 formula to 1e-9 dB (torchmetrics' own PSNR drifts ~1e-6 dB: float32
  constants, which is why metrics.py computes it directly).
- SSIM: equal to cv2.filter2D-style 'valid' SSIM (here SciPy's separable correlate1d, cropped) to 1e-10 (measured
  2e-14), and to scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False) to 1e-10. torchmetrics' SSIM averages over its padded border: not the original's.
- Consistency: equal to an independent PIL float bicubic downsample (clipped to [0, 255]) to 1e-5 relative
  (measured 3e-7).
"""

import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import PAIRS, SAMPLES
from scipy.ndimage import correlate1d

from diffusers_sr3 import metrics
from diffusers_sr3.image_processing import degrade


def original_psnr(img1, img2):
    """core/metrics.py calculate_psnr of the original project."""
    img1, img2 = img1.astype(np.float64), img2.astype(np.float64)
    mse = np.mean((img1 - img2) ** 2)
    return float("inf") if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def original_ssim(img1, img2):
    """core/metrics.py calculate_ssim: cv2.getGaussianKernel(11, 1.5), filter2D, [5:-5, 5:-5], per channel."""
    img1, img2 = img1.astype(np.float64), img2.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    offsets = np.arange(11) - 5
    kernel = np.exp(-(offsets**2) / (2 * 1.5**2))
    kernel /= kernel.sum()
    values = []
    for channel in range(img1.shape[2]):
        a, b = img1[..., channel], img2[..., channel]

        def filt(x):
            # The separable 11x11 window, then only the positions where it lies inside the image.
            return correlate1d(correlate1d(x, kernel, axis=0), kernel, axis=1)[5:-5, 5:-5]

        mu1, mu2 = filt(a), filt(b)
        sigma1 = filt(a * a) - mu1**2
        sigma2 = filt(b * b) - mu2**2
        sigma12 = filt(a * b) - mu1 * mu2
        ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / ((mu1**2 + mu2**2 + c1) * (sigma1 + sigma2 + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def load(path):
    return metrics.to_uint8_rgb(PIL.Image.open(path))


def pair_names():
    return sorted(path.name[: -len("_hr.png")] for path in PAIRS.glob("*_hr.png"))


def sample_triples():
    triples = []
    for dataset in sorted(SAMPLES.iterdir()):
        lr_dir = next(dataset.glob("lr_*"))
        hr_dir = next(dataset.glob("hr_*"))
        sr_dir = next(dataset.glob("sr_*"))
        for hr_path in sorted(hr_dir.glob("*.png")):
            triples.append((lr_dir / hr_path.name, hr_path, sr_dir / hr_path.name))
    return triples


def test_fixture_data_present():
    assert len(pair_names()) == 8
    assert len(sample_triples()) == 5


@pytest.mark.parametrize("name", pair_names())
def test_psnr_ssim_match_original_on_metric_pairs(name):
    from skimage.metrics import structural_similarity

    hr, sr = load(PAIRS / f"{name}_hr.png"), load(PAIRS / f"{name}_sr.png")
    expected_psnr, expected_ssim = original_psnr(sr, hr), original_ssim(sr, hr)
    value = metrics.psnr(sr, hr)
    if math.isinf(expected_psnr):
        assert math.isinf(value)
    else:
        assert value == pytest.approx(expected_psnr, abs=1e-9)
    assert metrics.ssim(sr, hr) == pytest.approx(expected_ssim, abs=1e-10)
    skimage_value = structural_similarity(
        sr, hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=2
    )
    assert metrics.ssim(sr, hr) == pytest.approx(skimage_value, abs=1e-10)
    # PIL images give the same numbers as arrays (gray PNGs are repeated to RGB).
    assert metrics.ssim(PIL.Image.open(PAIRS / f"{name}_sr.png"), PIL.Image.open(PAIRS / f"{name}_hr.png")) == (
        pytest.approx(metrics.ssim(sr, hr), abs=1e-12)
    )


def test_metric_pairs_show_the_relations_their_names_state():
    def both(name):
        hr, sr = load(PAIRS / f"{name}_hr.png"), load(PAIRS / f"{name}_sr.png")
        return metrics.psnr(sr, hr), metrics.ssim(sr, hr)

    assert both("identical_128") == (math.inf, 1.0)
    # A constant offset of 5 grey levels: MSE = 25 exactly.
    assert both("offset_p5_128")[0] == pytest.approx(20 * math.log10(255 / 5), abs=1e-3)
    # Gaussian noise of sigma s: PSNR near 20 log10(255 / s) (a little higher: clipping at 0 and 255).
    for name, sigma in [
        ("noise_s10_128", 10),
        ("noise_s10_512", 10),
        ("noise_s25_128", 25),
        ("gray_noise_s10_128", 10),
    ]:
        assert 0 < both(name)[0] - 20 * math.log10(255 / sigma) < 0.7, name
    assert both("noise_s25_128")[1] < both("noise_s10_128")[1] < both("offset_p5_128")[1] < 1
    assert both("odd_37x53_noise_s15")[1] < 1


@pytest.mark.parametrize("triple", sample_triples(), ids=lambda t: f"{t[1].parent.parent.name}-{t[1].stem}")
def test_metrics_on_original_samples(triple):
    lr_path, hr_path, sr_path = triple
    lr, hr, sr = load(lr_path), load(hr_path), load(sr_path)
    assert metrics.psnr(sr, hr) == pytest.approx(original_psnr(sr, hr), abs=1e-9)
    assert metrics.ssim(sr, hr) == pytest.approx(original_ssim(sr, hr), abs=1e-10)

    # Consistency against an independent downsample: PIL's bicubic on float images (no uint8 rounding).
    factor = hr.shape[0] // lr.shape[0]
    channels = [
        np.asarray(PIL.Image.fromarray(sr[..., c].astype(np.float32), mode="F").resize(lr.shape[1::-1], 3))
        for c in range(3)
    ]
    downsampled = np.clip(np.stack(channels, -1), 0, 255)  # like any image, the downsample stays in range
    expected = float(np.mean((downsampled / 255.0 - lr / 255.0) ** 2))
    value = metrics.consistency(sr, lr)
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-12)
    # sr_* is the bicubic upsample of lr_*, so downsampling it nearly gives the LR back.
    assert value < 2e-3, factor


def test_evaluate_batch_equals_the_image_functions():
    triples = [t for t in sample_triples() if t[1].parent.parent.name == "ffhq_64_512"][:2]

    def batch(index):
        return torch.stack([torch.from_numpy(load(t[index])).permute(2, 0, 1).float() / 127.5 - 1 for t in triples])

    lr, hr, sr = batch(0), batch(1), batch(2)
    results = metrics.evaluate_batch(sr, hr, lr)
    assert set(results) == {"psnr", "ssim", "consistency"}
    for index, (lr_path, hr_path, sr_path) in enumerate(triples):
        lr_image, hr_image, sr_image = load(lr_path), load(hr_path), load(sr_path)
        assert results["psnr"][index] == pytest.approx(metrics.psnr(sr_image, hr_image), abs=1e-9)
        assert results["ssim"][index] == pytest.approx(metrics.ssim(sr_image, hr_image), abs=1e-10)
        assert results["consistency"][index] == pytest.approx(metrics.consistency(sr_image, lr_image), rel=1e-9)
    assert set(metrics.evaluate_batch(sr, hr)) == {"psnr", "ssim"}


def test_bad_inputs_are_named():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.psnr(image, np.zeros((32, 31, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((8, 40, 3), np.uint8), np.zeros((8, 40, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(image.astype(np.float32), image)
    # Consistency needs the output's low-resolution input: sr3 eval and the library refuse the same files.
    for low in (image[:5, :7], image[:16, :8], np.zeros((64, 64, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"not the 32x32 output shrunk by a whole factor"):
            metrics.consistency(image, low)
    assert metrics.consistency(image, image[::4, ::4]) == pytest.approx(0, abs=1e-9)
    # x1 models (the training validation of `--upscale_factor 1` among them): the input is the output's size.
    same_size = torch.zeros(1, 3, 16, 16)
    assert metrics.evaluate_batch(same_size, same_size, same_size)["consistency"][0] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="1 low_resolution images for 2 predictions"):
        metrics.image_set_metrics([image, image], [image, image], [image[::4, ::4]])
    with pytest.raises(ValueError, match="batch sizes differ: 2 outputs vs 1 references"):
        metrics.evaluate_batch(torch.zeros(2, 3, 16, 16), torch.zeros(1, 3, 16, 16))


def test_inception_score_explains_why_it_is_unavailable():
    with pytest.raises(RuntimeError, match="classifier"):
        metrics.inception_score_metric()


def test_fid_with_the_offline_inception_network():
    photos = [load(t[1]) for t in sample_triples()][:4]
    real = torch.stack([torch.from_numpy(np.asarray(PIL.Image.fromarray(p).resize((128, 128)))) for p in photos])
    real = real.permute(0, 3, 1, 2).contiguous()
    blurred = torch.stack(
        [torch.from_numpy(np.asarray(PIL.Image.fromarray(p).resize((16, 16)).resize((128, 128)))) for p in photos]
    ).permute(0, 3, 1, 2)

    fid = metrics.frechet_inception_distance()
    fid.reset_real_features = False  # keep the real statistics across reset()
    fid.update(real, real=True)
    fid.update(real, real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update(blurred, real=False)
    different = float(fid.compute())
    assert fid.inception(real[:1]).shape == (1, 2048)
    assert abs(same) < 1e-2
    assert different > 50


class _ChannelMoments(torch.nn.Module):
    """A stand-in feature network: each channel's mean and standard deviation (6 features of any image size)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.double()
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_frechet_distance_on_features_is_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 8, 8), generator=generator, dtype=torch.uint8)
    fake = (real.double() * 0.7 + 30).round().to(torch.uint8)
    network = _ChannelMoments()
    fid = FrechetInceptionDistance(feature=network, normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    features = metrics.inception_features(fake, batch_size=16, network=network)
    reference = metrics.inception_features(real, batch_size=16, network=network)
    assert features.dtype == torch.float64 and features.shape == (40, 6)
    assert metrics.frechet_distance(features, reference) == pytest.approx(float(fid.compute()), rel=1e-6)


@pytest.mark.parametrize("paired", [True, False])
def test_fid_infinity_removes_the_sample_size_bias(paired):
    # Two Gaussians with a known Frechet distance: means 1 apart along one axis, standard deviations 1 and 1.5 in 64
    # dimensions, so 1 + 64 x (1 + 2.25 - 2 x 1.5) = 17. Over 512 samples FID overestimates it by about a third.
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(512, 64, generator=generator, dtype=torch.float64)
    reference = 1.5 * torch.randn(512, 64, generator=generator, dtype=torch.float64)
    reference[:, 0] += 1
    true_distance = 17.0

    estimate = metrics.fid_infinity(features, reference, paired=paired)
    over_all_samples = metrics.frechet_distance(features, reference)

    assert over_all_samples > 1.2 * true_distance
    assert estimate.value == pytest.approx(true_distance, rel=0.08)
    assert estimate.slope > 0
    assert [size for size, _ in estimate.points][0] == 128
    assert estimate.points[-1] == (512, pytest.approx(over_all_samples))
    assert len(estimate.points) == 6 * 4 + 1  # 4 draws per size, one of all the samples


def test_fid_infinity_refuses_sizes_it_cannot_fit():
    features = torch.randn(20, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="two subset sizes"):
        metrics.fid_infinity(features, features, sizes=[10])
    with pytest.raises(ValueError, match="two subset sizes"):
        metrics.fid_infinity(features, features, sizes=[10, 40])
    with pytest.raises(ValueError, match="as many rows"):
        metrics.fid_infinity(features, features[:10])


@pytest.mark.parametrize("count", [3, 4, 5])
def test_fid_infinity_fits_few_images_with_its_default_sizes(count):
    features = torch.randn(count, 2, generator=torch.Generator().manual_seed(count), dtype=torch.float64)
    estimate = metrics.fid_infinity(features, features + 1)
    assert sorted({size for size, _ in estimate.points}) == list(range(2, count + 1))
    assert math.isfinite(estimate.value)


def test_fid_infinity_names_the_least_number_of_images_its_default_sizes_need():
    features = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"^fid_infinity needs at least 3 images in each set \(two subset sizes\), got 2$"
    ):
        metrics.fid_infinity(features, features)


def test_image_quality_diagnostics():
    from diffusers_sr3.image_processing import degrade

    torch.manual_seed(0)
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    lr, bicubic = degrade(hr, 4)
    exact = metrics.image_quality(hr, hr, lr)
    assert exact["colour_error"] == [0.0, 0.0, 0.0] and abs(exact["edge_ratio"] - 1) < 1e-12
    blurry = metrics.image_quality(bicubic, hr, lr)
    assert blurry["edge_ratio"] < 0.8 and blurry["psnr"] < exact["psnr"]
    tinted = metrics.image_quality((hr + 20 / 127.5).clamp(-1, 1), hr, lr)
    assert all(8 < error <= 20.5 for error in tinted["colour_error"])  # +20 levels, less where clipped at 255
    noisy = metrics.image_quality((hr + 0.3 * torch.randn_like(hr)).clamp(-1, 1), hr, lr)
    assert noisy["edge_ratio"] > 1


def test_evaluate_module_loads_offline_from_the_installed_package(monkeypatch, tmp_path):
    """`evaluate.load(path)` of the shipped module: no Hub, the original's numbers, a model-card friendly output."""
    evaluate = pytest.importorskip("evaluate")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = metrics.evaluate_module_path()
    assert os.path.isfile(path) and path.startswith(os.path.dirname(metrics.__file__))
    module = evaluate.load(path)
    assert module.name == "sr3_metrics"
    names = [name for name in pair_names() if name != "identical_128"][:3]
    sr = [load(PAIRS / f"{name}_sr.png") for name in names]
    hr = [PIL.Image.open(PAIRS / f"{name}_hr.png") for name in names]  # PIL images and arrays both work
    results = module.compute(predictions=sr, references=hr)
    assert set(results) == {"psnr", "ssim", "num_images"} and results["num_images"] == 3
    assert all(isinstance(value, (int, float)) for value in results.values())  # plain numbers for model-index
    expected_psnr = np.mean([original_psnr(s, load(PAIRS / f"{n}_hr.png")) for s, n in zip(sr, names)])
    expected_ssim = np.mean([original_ssim(s, load(PAIRS / f"{n}_hr.png")) for s, n in zip(sr, names)])
    assert results["psnr"] == pytest.approx(expected_psnr, abs=1e-9)
    assert results["ssim"] == pytest.approx(expected_ssim, abs=1e-10)
    # Batches added one at a time give the same; per-image values on request.
    for prediction, reference in zip(sr, hr):
        module.add(predictions=prediction, references=reference)
    detailed = module.compute(per_image=True)
    assert detailed["psnr"] == pytest.approx(results["psnr"], abs=1e-12) and len(detailed["ssim_per_image"]) == 3
    # Other than uint8 arrays are refused, as the functions refuse them: `datasets` would wrap 16-bit values.
    sixteen_bit = sr[0].astype(np.uint16) * 257
    for call in (
        lambda: module.compute(predictions=[sixteen_bit], references=[sr[0]]),
        lambda: module.add_batch(predictions=[sr[0]], references=[sixteen_bit]),
        lambda: module.add(prediction=sixteen_bit, reference=sr[0]),
        lambda: module.add(predictions=sixteen_bit, references=sr[0]),
    ):
        with pytest.raises(ValueError, match=r"metrics take uint8 images, got dtype uint16"):
            call()


def test_evaluate_module_sr3_eval_and_validation_agree(tmp_path, capsys):
    """The three entry points (evaluate module, `sr3 eval`, training validation's `evaluate_batch`) are one code."""
    import json

    evaluate = pytest.importorskip("evaluate")
    from diffusers_sr3.cli import main

    triples = [t for t in sample_triples() if t[1].parent.parent.name == "ffhq_64_512"][:2]
    lr, hr, sr = ([load(t[index]) for t in triples] for index in range(3))
    module_results = evaluate.load(metrics.evaluate_module_path()).compute(
        predictions=sr, references=hr, low_resolution=lr
    )
    for kind, images in (("lr", lr), ("hr", hr), ("sr", sr)):
        (tmp_path / kind).mkdir()
        for index, image in enumerate(images):
            PIL.Image.fromarray(image).save(tmp_path / kind / f"{index}.png")
    report = tmp_path / "report.json"
    folders = ["--hr", str(tmp_path / "hr"), "--sr", str(tmp_path / "sr"), "--lr", str(tmp_path / "lr")]
    assert main(["eval", *folders, "--json", str(report), "--quiet"]) == 0
    cli_means = json.loads(report.read_text(encoding="utf-8"))["mean"]

    def batch(images):
        return torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1 for image in images])

    validation = metrics.summarize(metrics.evaluate_batch(batch(sr), batch(hr), batch(lr)))
    for name in ("psnr", "ssim", "consistency"):
        assert module_results[name] == pytest.approx(cli_means[name], rel=1e-12)
        assert module_results[name] == pytest.approx(validation[name], rel=1e-9)


def test_kept_edge_share_is_low_for_texture_and_near_one_for_smooth_edges():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 32, 32, generator=generator) * 1.6 - 0.8  # detail finer than the x4 LR's pixels
    ramp = torch.linspace(-0.8, 0.8, 32).expand(1, 3, 32, 32)  # smooth: the LR holds all of it
    shares = metrics.kept_edge_share(torch.cat([noise, ramp]), 4)
    assert shares.shape == (3,)
    assert (shares[:2] < metrics.TEXTURE_KEPT_EDGE_SHARE).all()
    assert 0.9 < shares[2] <= 1.0
    # The share compares what is saved: the upsample of the LR and the HR, each at 8 bits.
    upsampled = degrade(ramp, 4)[1]
    expected = metrics.edge_energy(metrics.quantize(upsampled)) / metrics.edge_energy(metrics.quantize(ramp))
    assert shares[2] == pytest.approx(float(expected[0]))


def test_fine_detail_rms_reads_grain_and_ignores_what_the_input_shows():
    generator = torch.Generator().manual_seed(0)
    gray = torch.full((1, 3, 64, 64), 0.1)
    ramp = torch.linspace(-0.6, 0.6, 64).expand(1, 3, 64, 64)  # smooth: no detail finer than the input's pixels
    grain = 4 / 127.5 * torch.randn(1, 1, 64, 64, generator=generator).expand(1, 3, 64, 64)  # 4 levels, shared
    rms = metrics.fine_detail_rms(torch.cat([gray, ramp, gray + grain]), 4)
    assert rms.shape == (3,)
    assert rms[0] < 1e-3 and rms[1] < 0.3  # a ramp leaves only the 8-bit rounding
    # White grain keeps nearly all of its variance above the cut; quantization adds about 0.3 levels in quadrature.
    assert 3.7 < rms[2] < 4.2
    # Coarser grain (blobs of a few input pixels) lies below the cut: the input could show it.
    coarse = torch.nn.functional.interpolate(torch.randn(1, 1, 8, 8, generator=generator), size=64, mode="bicubic")
    blobs = metrics.fine_detail_rms(gray + 4 / 127.5 * (coarse / coarse.std()).expand(1, 3, 64, 64), 4)
    assert blobs < rms[2] / 4


def test_flat_grain_is_measured_on_the_flattest_crops():
    generator = torch.Generator().manual_seed(1)
    detailed = torch.rand(18, 3, 32, 32, generator=generator) * 1.6 - 0.8
    flat = torch.linspace(-0.3, 0.3, 32).expand(2, 3, 32, 32)
    hr = torch.cat([detailed[:9], flat, detailed[9:]])
    assert sorted(metrics.flattest_crops(hr).tolist()) == [9, 10]  # a tenth of 20 crops
    assert len(metrics.flattest_crops(hr[:3])) == 1  # at least one crop
    lr, _ = degrade(hr, 4)
    clean = metrics.image_quality(hr, hr, lr)
    assert clean["flat_grain"] == pytest.approx(float(metrics.fine_detail_rms(hr[9:11], 4).mean()))
    assert metrics.flat_grain(hr, hr, 4) == clean["flat_grain"]  # the HR's own, which reports print beside it
    grainy = hr.clone()
    grainy[9:11] += 2 / 127.5 * torch.randn(2, 1, 32, 32, generator=generator)
    assert metrics.image_quality(grainy, hr, lr)["flat_grain"] > clean["flat_grain"] + 1.5
    # Grain on the detailed crops does not count: it is not where a viewer would see it.
    busy = hr.clone()
    busy[:9] += 2 / 127.5 * torch.randn(9, 1, 32, 32, generator=generator)
    assert metrics.image_quality(busy, hr, lr)["flat_grain"] == pytest.approx(clean["flat_grain"])


def test_evaluate_module_scores_pil_images_as_the_metrics_functions_do(tmp_path):
    """`datasets.Image` re-encodes JPEGs held in memory at quality 75 and re-reads files from disk: the module must
    score the pixels it was given, as `metrics.psnr` does."""
    import io

    evaluate = pytest.importorskip("evaluate")
    module = evaluate.load(metrics.evaluate_module_path())
    rng = np.random.default_rng(0)
    stream = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(stream, "JPEG", quality=95)
    jpeg = PIL.Image.open(io.BytesIO(stream.getvalue()))  # no file name: `datasets` would encode it again
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    edited = PIL.Image.open(tmp_path / "photo.png")
    edited.paste((255, 0, 0), (0, 0, 16, 16))  # in memory only: the file keeps the old pixels
    predictions, references = [metrics.to_uint8_rgb(jpeg), np.array(edited)], [jpeg, edited]
    results = module.compute(predictions=predictions, references=references, per_image=True)
    assert results["psnr_per_image"] == [math.inf, math.inf] and results["ssim_per_image"] == [1.0, 1.0]
    module.add(prediction=predictions[0], reference=jpeg)
    module.add_batch(predictions=[jpeg, edited], references=[predictions[0], predictions[1]])
    assert module.compute()["psnr"] == math.inf


def test_evaluate_module_errors_name_the_image_and_the_right_conversion():
    evaluate = pytest.importorskip("evaluate")
    module = evaluate.load(metrics.evaluate_module_path())
    image = np.zeros((16, 16, 3), np.uint8)
    # Diffusers' `output_type="np"` gives floats in [0, 1]: dividing them by 257 would make them black.
    with pytest.raises(ValueError, match=r"predictions\[0\]: .*float32 \(\[0, 1\] floats: `\(image \* 255\)"):
        module.compute(predictions=[image.astype(np.float32)], references=[image])
    with pytest.raises(ValueError, match=r"references\[0\]: .*uint16 \(16-bit: `\(image / 257\)"):
        module.compute(predictions=[image], references=[image.astype(np.uint16)])
    small = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^prediction 1: SSIM needs images of at least 11x11 pixels, got 8x8$"):
        module.compute(predictions=[image, small], references=[image, small])


def test_a_sharp_edge_the_low_resolution_shows_is_not_texture():
    # The bicubic upsample keeps a step edge's total rise, so its share is far above the texture threshold, and the
    # threshold sits between it and grain finer than the LR's pixels.
    step = torch.full((1, 3, 32, 32), -0.6)
    step[..., 16:] = 0.6
    grain = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    edge_share, grain_share = metrics.kept_edge_share(torch.cat([step, grain]), 4).tolist()
    assert grain_share < metrics.TEXTURE_KEPT_EDGE_SHARE < edge_share
