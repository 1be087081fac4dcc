"""The shared degradation: PIL-compatible bicubic resizing, pairs, padding, conversions, file errors."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import SAMPLES

from diffusers_sr3.image_processing import (
    degrade,
    images_to_tensor,
    load_image,
    pad_to_multiple,
    postprocess,
    resize_bicubic,
    upsample_condition,
)


@pytest.mark.parametrize(
    "folder, low, high, name",
    [("celebahq_16_128", 16, 128, "00031.png"), ("ffhq_64_512", 64, 512, "00030.png")],
)
def test_upsampling_reproduces_the_originals_pil_bicubic_sr_images(folder, low, high, name):
    """The original's sr_* images are PIL bicubic upsamples of lr_*: our condition must be the same picture.

    PIL computes in 8-bit fixed point, we in float: measured, at most 2 levels apart, 0.2 on average, and
    fewer than 1 pixel value in 10,000 more than 1 level apart.
    """
    low_resolution = images_to_tensor(PIL.Image.open(SAMPLES / folder / f"lr_{low}" / name))
    expected = np.asarray(PIL.Image.open(SAMPLES / folder / f"sr_{low}_{high}" / name).convert("RGB")).astype(int)
    ours = postprocess(upsample_condition(low_resolution, (high, high)), "pil")[0]
    difference = np.abs(np.asarray(ours).astype(int) - expected)
    assert difference.max() <= 2 and difference.mean() < 0.25 and (difference > 1).mean() < 1e-4


def test_downsampling_matches_pil_bicubic():
    high = PIL.Image.open(SAMPLES / "celebahq_16_128" / "hr_128" / "00031.png").convert("RGB")
    expected = np.asarray(high.resize((16, 16), PIL.Image.BICUBIC)).astype(int)
    low, condition = degrade(images_to_tensor(high), 8)
    assert low.shape == (1, 3, 16, 16) and condition.shape == (1, 3, 128, 128)
    ours = np.asarray(postprocess(low, "pil")[0]).astype(int)
    assert np.abs(ours - expected).max() <= 1
    with pytest.raises(ValueError, match="not divisible by the upscale factor 3"):
        degrade(images_to_tensor(high), 3)


def test_resize_keeps_range_and_identity():
    images = torch.rand(2, 3, 10, 14) * 2 - 1
    assert resize_bicubic(images, (10, 14)) is images
    up = resize_bicubic(images, (40, 56))
    assert up.shape == (2, 3, 40, 56) and up.min() >= -1 and up.max() <= 1


def test_padding_reflects_and_replicates():
    images = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded, size = pad_to_multiple(images, 4)
    assert padded.shape == (2, 3, 8, 8) and size == (5, 7)
    torch.testing.assert_close(padded[..., :5, :7], images)
    tiny, _ = pad_to_multiple(images[..., :2, :2], 8)  # too small to reflect
    assert tiny.shape[-2:] == (8, 8)
    same, _ = pad_to_multiple(images[..., :4, :4], 4)
    assert same.shape[-2:] == (4, 4)


def test_conversions_and_output_types():
    array = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    tensor = images_to_tensor(array)
    assert tensor.shape == (2, 3, 6, 5) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.stack([np.asarray(image) for image in postprocess(tensor, "pil")]), array)
    np.testing.assert_allclose(postprocess(tensor, "np"), array / 255, atol=1e-6)
    assert postprocess(tensor, "pt").shape == (2, 3, 6, 5)
    sixteen_bit = array[0].astype(np.uint16) * 257
    torch.testing.assert_close(images_to_tensor(sixteen_bit), tensor[:1])
    with pytest.raises(ValueError, match="no image given"):
        images_to_tensor([])
    with pytest.raises(ValueError, match="unsupported numpy dtype"):
        images_to_tensor(array.astype(np.int64))
    with pytest.raises(ValueError, match="output_type must be 'pil', 'np' or 'pt', got 'raw'"):
        postprocess(tensor, "raw")  # undocumented and unused: removed


def test_load_image_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))
    good = tmp_path / "good.png"
    PIL.Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(good)
    assert load_image(str(good)).mode == "RGB"
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read image .*truncated.png"):
        load_image(str(tmp_path / "truncated.png"))
    (tmp_path / "text.png").write_text("not an image", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read image .*text.png"):
        load_image(str(tmp_path / "text.png"))


def test_outputs_keep_the_channel_count_and_one_channel_is_gray():
    array = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 1), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1
    gray = postprocess(tensor, "pil")
    assert [image.mode for image in gray] == ["L", "L"] and gray[0].size == (5, 6)
    assert np.array_equal(np.stack([np.asarray(image) for image in gray]), array[..., 0])
    np.testing.assert_allclose(postprocess(tensor, "np"), array / 255, atol=1e-6)
    assert postprocess(tensor, "pt").shape == (2, 1, 6, 5)
    assert postprocess(torch.zeros(1, 4, 2, 2), "pil")[0].mode == "RGBA"
    with pytest.raises(ValueError, match="5-channel images cannot be PIL images .* use output_type 'np'"):
        postprocess(torch.zeros(1, 5, 2, 2), "pil")


def test_an_empty_batch_is_refused_as_no_image(tiny_pipeline):
    """A batch of 0 passed the size checks and failed deep in the attention layers (cannot reshape 0 elements)."""
    empty = (torch.zeros(0, 3, 8, 8), np.zeros((0, 8, 8, 3), np.uint8), [torch.zeros(0, 3, 8, 8)])
    for images in empty:
        with pytest.raises(ValueError, match=r"^no image given \(an empty batch\)$"):
            images_to_tensor(images)
    with pytest.raises(ValueError, match=r"^no image given \(an empty batch\)$"):
        tiny_pipeline(torch.zeros(0, 3, 8, 8), num_inference_steps=2)
    assert images_to_tensor([torch.zeros(0, 3, 8, 8), torch.zeros(1, 3, 8, 8)]).shape == (1, 3, 8, 8)


def test_degrading_a_non_square_image_keeps_its_aspect():
    high = torch.rand(1, 3, 16, 32) * 2 - 1
    low, condition = degrade(high, 4)
    assert low.shape == (1, 3, 4, 8) and condition.shape == high.shape
    torch.testing.assert_close(low, resize_bicubic(high, (4, 8)))


def test_padding_replicates_along_a_side_too_short_to_reflect():
    """A strip one pixel high cannot be reflected four pixels down: it is replicated, whatever its width."""
    strip = torch.rand(1, 3, 1, 8)
    padded, size = pad_to_multiple(strip, 4)
    assert padded.shape == (1, 3, 4, 8) and size == (1, 8)
    assert torch.equal(padded, strip.expand(-1, -1, 4, -1))


def test_lowpass_blurs_images_smaller_than_its_kernel():
    from diffusers_sr3.image_processing import lowpass

    image = torch.rand(1, 3, 4, 6)
    blurred = lowpass(image, 2.0)  # a 13-pixel kernel at this sigma
    assert blurred.shape == image.shape and bool(torch.isfinite(blurred).all())
    assert float(blurred.std()) < float(image.std())
