"""Image conversion and the bicubic degradation shared by training, inference and evaluation.

Tensors here are `(batch, 3, height, width)` float images in [-1, 1] unless a docstring says otherwise.
Resizing uses PyTorch's antialiased bicubic filter, which is PIL's bicubic (a = -0.5): models trained on the
original project's PIL-made `sr_*` images see the same condition here.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from .image_io import FLOAT_OVERSHOOT, UnreadableImageError, is_16bit_gray, open_image, to_gray16, to_rgb, to_srgb

ImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]
]


def _rgb_from_channels(image: torch.Tensor, what: str) -> torch.Tensor:
    """(B, C, H, W) with C in {1, 3, 4} -> (B, 3, H, W): gray is repeated, alpha is dropped."""
    channels = image.shape[1]
    if channels == 3:
        return image
    if channels == 1:
        return image.expand(-1, 3, -1, -1)
    if channels == 4:
        return image[:, :3]
    raise ValueError(f"{what} has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")


def _one_to_tensor(image: Union[PIL.Image.Image, np.ndarray, torch.Tensor], what: str) -> torch.Tensor:
    """One input (a single image or a batch) -> (B, 3, H, W) float32 in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        try:
            if is_16bit_gray(image):
                # 16-bit and float gray keep their precision (uint16 below), read as the file readers read them.
                image = np.asarray(to_gray16(image))
            else:
                # An Adobe RGB or Display P3 photo (an ICC profile in its `info`) is converted to sRGB, which the
                # networks work in and the untagged outputs are taken as, as the file readers convert it.
                image = to_srgb(image)
                image = np.asarray(image if image.mode in ("RGB", "L") else to_rgb(image))  # RGBA, palette, CMYK, ...
        except UnreadableImageError as error:  # 32-bit or float gray outside its range
            raise UnreadableImageError(f"{what}: {error}", str(error)) from None
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            tensor = torch.from_numpy(image.astype(np.float32) / 255.0)
        elif image.dtype == np.uint16:
            tensor = torch.from_numpy(image.astype(np.float32) / 65535.0)
        elif np.issubdtype(image.dtype, np.floating):
            tensor = torch.from_numpy(image.astype(np.float32))
        else:
            raise ValueError(f"{what}: unsupported numpy dtype {image.dtype}; use uint8 or float in [0, 1]")
        if tensor.ndim == 2:
            tensor = tensor[:, :, None]
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"{what}: numpy images must be (H, W), (H, W, C) or (B, H, W, C), got {image.shape}")
        tensor = tensor.permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float()  # stays on its device: a GPU batch is upsampled on the GPU
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"{what}: tensors must be (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
    else:
        raise TypeError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    tensor = _rgb_from_channels(tensor, what)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what}: holds NaN or infinite values")
    if tensor.numel() and (tensor.min() < -FLOAT_OVERSHOOT or tensor.max() > 1 + FLOAT_OVERSHOOT):
        raise ValueError(f"{what}: float values must lie in [0, 1], found [{tensor.min():.3f}, {tensor.max():.3f}]")
    return tensor.clamp(0, 1)


def images_to_tensor(images: ImageInput, what: str = "image") -> torch.Tensor:
    """Convert user images to one `(B, 3, H, W)` float32 batch in [-1, 1].

    Accepted: a PIL image (any mode: gray is repeated to RGB, alpha is discarded, colours in the space of an ICC
    profile in its `info` are converted to sRGB; 16-bit gray and float gray (`I;16`, `I`, `F`) keep 16 bits, with
    the white points files are read with: `F` in [0, 1], or [0, 255] where values reach 16), a numpy array (`(H,
    W)`, `(H, W, C)` or `(B, H, W, C)`; uint8 in [0, 255], uint16 in [0, 65535], float in [0, 1]), a torch tensor
    (`(C, H, W)` or `(B, C, H, W)`, float in [0, 1]), or a list of these. C may be 1, 3 or 4. All images must have
    the same size. Floats within half an 8-bit step (`FLOAT_OVERSHOOT`) of their range are clipped to it; beyond it,
    and NaN or infinite values, are refused.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"no {what} given")
    tensors = [_one_to_tensor(item, f"{what} {index}" if len(items) > 1 else what) for index, item in enumerate(items)]
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise ValueError(f"all {what}s in a batch must have the same size; got {listed} (HxW)")
    if not sum(len(tensor) for tensor in tensors):
        raise ValueError(f"no {what} given (an empty batch)")
    height, width = tensors[0].shape[-2:]
    if height < 1 or width < 1:
        raise ValueError(f"{what} is empty ({height}x{width})")
    return torch.cat(tensors) * 2 - 1


def resize_bicubic(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize (PIL's filter) to `size = (height, width)`, clamped to [-1, 1]."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    dtype = images.dtype
    resized = F.interpolate(images.float(), size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(-1, 1).to(dtype)


def upsample_condition(low_resolution: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The SR3 condition: the low-resolution image bicubic-upsampled to the output size."""
    return resize_bicubic(low_resolution, size)


def degrade(high_resolution: torch.Tensor, upscale_factor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Make a training/evaluation pair from high-resolution images.

    Args:
        high_resolution: `(B, 3, H, W)` in [-1, 1], `H` and `W` divisible by `upscale_factor`.
        upscale_factor: the super-resolution factor.

    Returns:
        `(low_resolution, condition)`: the antialiased bicubic downsample, and its bicubic upsample back to
        `H x W` (what the network is conditioned on).
    """
    height, width = high_resolution.shape[-2:]
    if height % upscale_factor or width % upscale_factor:
        raise ValueError(f"image size {height}x{width} is not divisible by the upscale factor {upscale_factor}")
    low_resolution = resize_bicubic(high_resolution, (height // upscale_factor, width // upscale_factor))
    return low_resolution, upsample_condition(low_resolution, (height, width))


def pad_to_multiple(images: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Pad height and width up to a multiple of `multiple` by reflection (replication when too small).

    Returns the padded batch and the original `(height, width)` to crop back to.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return images, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def tensor_to_pil(images: torch.Tensor) -> List[PIL.Image.Image]:
    """`(B, C, H, W)` in [-1, 1] -> list of PIL images (rounded to uint8), by channel count as Diffusers' pipelines
    write them: 3 "RGB", 1 "L" (gray), 2 "LA", 4 "RGBA"; other counts raise a `ValueError`."""
    channels = images.shape[1]
    if not 1 <= channels <= 4:
        raise ValueError(f"{channels}-channel images cannot be PIL images (1 to 4 channels); use output_type 'np'")
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(item[..., 0] if channels == 1 else item) for item in array]


OUTPUT_TYPES = ("pil", "np", "pt")


def check_output_type(output_type: str) -> None:
    """Refuse an `output_type` that [`postprocess`] cannot give, before a pipeline spends its refinement on it.

    Raises:
        ValueError: for anything but "pil", "np" and "pt". SR3 refines pixels, so Diffusers' "latent" has nothing to
            return: "pt" is the result as a tensor.
    """
    if output_type not in OUTPUT_TYPES:
        hint = (
            " (SR3 refines pixels, not latents: 'pt' gives the result as a tensor)" if output_type == "latent" else ""
        )
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}{hint}")


def postprocess(images: torch.Tensor, output_type: str) -> Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]:
    """Convert `(B, C, H, W)` in [-1, 1] to the pipelines' output types, keeping the channel count `C`.

    `"pil"`: list of PIL images (RGB; "L" for one channel, see [`tensor_to_pil`]); `"np"`: `(B, H, W, C)` float32
    in [0, 1]; `"pt"`: `(B, C, H, W)` float32 in [0, 1].
    """
    check_output_type(output_type)
    if output_type == "pil":
        return tensor_to_pil(images)
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return unit
    return unit.permute(0, 2, 3, 1).cpu().numpy()


def load_image(path: str) -> PIL.Image.Image:
    """Open an image file fully, upright (EXIF orientation), as RGB; errors name the file (`image_io.open_image`)."""
    return open_image(path)


def grid(rows: Sequence[Sequence[PIL.Image.Image]], size: Optional[Tuple[int, int]] = None) -> PIL.Image.Image:
    """Paste rows of images into one picture, each cell resized (nearest) to `size` or the largest image."""
    cells = [image for row in rows for image in row]
    if not cells:
        raise ValueError("no images to put in a grid")
    width = size[0] if size else max(image.width for image in cells)
    height = size[1] if size else max(image.height for image in cells)
    columns = max(len(row) for row in rows)
    canvas = PIL.Image.new("RGB", (columns * width, len(rows) * height), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image.convert("RGB").resize((width, height), PIL.Image.NEAREST), (c * width, r * height))
    return canvas


def process_strip(frames: Sequence[PIL.Image.Image], alpha: Optional[PIL.Image.Image] = None) -> PIL.Image.Image:
    """The refinement process as one row: `frames` side by side (`grid`), with `alpha` (an image's transparency, or
    None) resized bicubic to each frame and put on the strip, as the image's own result gets it."""
    strip = grid([frames])
    if alpha is not None:
        # `grid` pastes RGB: the frames' transparency is laid out in the same cells and put on the strip.
        strip.putalpha(grid([[alpha.resize(frame.size, PIL.Image.BICUBIC) for frame in frames]]).convert("L"))
    return strip


def lowpass(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `images` `(B, C, H, W)` with standard deviation `sigma` pixels, reflection at the borders."""
    radius = min(max(1, math.ceil(3 * sigma)), images.shape[-2] - 1, images.shape[-1] - 1)
    return gaussian_blur(images, kernel_size=[2 * radius + 1] * 2, sigma=[sigma] * 2)
