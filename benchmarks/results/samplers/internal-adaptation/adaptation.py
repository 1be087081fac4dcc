"""Adapt a super-resolution pipeline's network to one image before super-resolving it (the probe's code, not part of
the package: it helps the never-seen film scans and harms the held-out photos, see README.md beside this file).

A network draws the texture it learned from its training photographs; on a photo of another kind (the film scans of
the never-seen test set) it draws less of it, and what it draws is less like the photo's. The photo's own input
holds some of that texture one scale up: the input is a high-resolution image, and its own downsample the
low-resolution one (zero-shot super-resolution, Shocher et al., 2018). `adapted_to` fine-tunes the pipeline's UNet on
such pairs, cut from the input at a few scales and in its 8 orientations and degraded as the training data was, with
the model's own training objective (SR3's L1 loss), and puts its own weights back when the block ends.

The cost does not depend on the image's size: `steps` batches of `batch_size` training crops (300 x 16 crops of 64
pixels took about 80 s on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from diffusers_sr3.backends import AutocastUNet, fast_bfloat16
from diffusers_sr3.image_processing import ImageInput, degrade, images_to_tensor, resize_bicubic
from diffusers_sr3.noise import training_betas
from diffusers_sr3.training.objective import diffusion_loss, noise_batch, predict

ADAPTATION_SCALES = (1.0, 0.9, 0.8, 0.7)
DEFAULT_ADAPTATION_STEPS = 300
DEFAULT_ADAPTATION_LEARNING_RATE = 1e-4


@dataclass
class Adaptation:
    """What `adapted_to` did: the loss on the image's own pairs at the start and the end (means of up to 20 steps),
    and the seconds it took."""

    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def internal_training_crops(
    image: torch.Tensor,
    count: int,
    crop_size: int,
    generator: torch.Generator,
    scales: Sequence[float] = ADAPTATION_SCALES,
) -> torch.Tensor:
    """`count` square crops of `crop_size` pixels of `image` (`(1, 3, H, W)` in [-1, 1]): each from the image resized
    by one of `scales` (those that leave it at least `crop_size` on both sides), at a random place, mirrored or not and
    turned by a random quarter-turn."""
    height, width = image.shape[-2:]
    fitting = [scale for scale in scales if min(round(height * scale), round(width * scale)) >= crop_size]
    if not fitting:
        raise ValueError(
            f"adaptation trains on {crop_size}-pixel crops of the input itself: a {width}x{height} input is too "
            f"small (at least {crop_size} pixels on each side)"
        )
    resized = [
        image if scale == 1.0 else resize_bicubic(image, (round(height * scale), round(width * scale)))
        for scale in fitting
    ]
    crops: List[torch.Tensor] = []
    for _ in range(count):
        source = resized[int(torch.randint(len(resized), (1,), generator=generator))]
        top = int(torch.randint(source.shape[-2] - crop_size + 1, (1,), generator=generator))
        left = int(torch.randint(source.shape[-1] - crop_size + 1, (1,), generator=generator))
        crop = source[..., top : top + crop_size, left : left + crop_size]
        if bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        crops.append(torch.rot90(crop, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1)))
    return torch.cat(crops).clamp(-1, 1)


def weights_copy(unet: torch.nn.Module) -> dict:
    """A copy of `unet`'s weights (its state dict), detached, to load back later."""
    return {name: value.detach().clone() for name, value in unet.state_dict().items()}


def bfloat16_training(device: torch.device) -> bool:
    """Whether adaptation runs under bfloat16 autocast on `device`: where bfloat16 is native (`fast_bfloat16`, which
    includes CPUs with AVX-512 bfloat16 instructions: a training step there measured 1.4x faster than in float32).
    probe.py overrides it to compare the precisions."""
    return fast_bfloat16(device)


@contextlib.contextmanager
def adapted_to(
    pipeline,
    image: ImageInput,
    steps: int = DEFAULT_ADAPTATION_STEPS,
    learning_rate: float = DEFAULT_ADAPTATION_LEARNING_RATE,
    batch_size: int = 16,
    seed: int = 0,
    crop_size: Optional[int] = None,
) -> Iterator[Adaptation]:
    """Fine-tune `pipeline.unet` on pairs cut from `image` itself for the duration of a `with` block.

    Inside the block the pipeline super-resolves with the adapted weights; when it ends (or raises), the UNet gets
    its own weights back exactly. The guidance UNet, if any, is left as it is. Adapt to the image you then
    super-resolve: the adapted weights know that image's texture, and would draw it on another.

    Args:
        pipeline: an `SR3Pipeline` (super-resolution).
        image: the low-resolution input, one image in any form `SR3Pipeline` takes, at least `crop_size` pixels on
            each side: it is the high-resolution side of the pairs.
        steps: optimizer steps (AdamW); the probe's runs took 300 (docs/quality.md).
        learning_rate: AdamW learning rate, from the model's own weights.
        batch_size: crops per step.
        seed: draws the crops, the noise levels and the noise: the same seed adapts to the same weights.
        crop_size: training crop size (default: the UNet's `sample_size`, the size it was trained on).

    Yields:
        An `Adaptation` with the loss at the start and the end and the time it took.

    Example:

    ```py
    >>> from diffusers_sr3 import SR3Pipeline
    >>> from adaptation import adapted_to  # this file
    >>> from PIL import Image

    >>> pipe = SR3Pipeline.from_pretrained("path/to/sr3-photos-x4")
    >>> image = Image.open("film-scan.png")
    >>> with adapted_to(pipe, image):
    ...     upscaled = pipe(image, mode="detail").images[0]
    ```
    """
    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            f"adaptation needs steps >= 1, batch_size >= 1 and a positive learning rate, got {steps}, {batch_size} "
            f"and {learning_rate}"
        )
    source = images_to_tensor(image)
    if source.shape[0] != 1:
        raise ValueError(f"adaptation learns one image's texture: give one image, not {source.shape[0]}")
    unet = pipeline.unet
    if isinstance(unet, AutocastUNet):  # inside `use_backend(pipeline, "bf16")`: train the UNet the stand-in runs
        unet = unet.unet
    if not isinstance(unet, torch.nn.Module):
        raise ValueError(
            f"adaptation trains the pipeline's PyTorch UNet, and this pipeline runs a stand-in for it "
            f"({type(unet).__name__}): adapt outside the backend's block, or use the torch or bf16 backend"
        )
    if unet.dtype != torch.float32:
        raise ValueError(f"adaptation trains the network: load it in float32, not {unet.dtype}")
    factor = pipeline.config.upscale_factor
    crop_size = crop_size or unet.config.sample_size
    if crop_size % factor:
        raise ValueError(f"crop_size {crop_size} is not divisible by the upscale factor {factor}")
    residual = bool(pipeline.config.get("residual", False))
    prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon")
    betas = training_betas(pipeline.scheduler)
    device = unet.device
    generator = torch.Generator().manual_seed(seed)
    internal_training_crops(source, 1, crop_size, torch.Generator())  # refuses a too small input before any work

    original_weights = weights_copy(unet)
    original_requires_grad = [parameter.requires_grad for parameter in unet.parameters()]
    was_training = unet.training
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bfloat16_training(device) else contextlib.nullcontext()
    )
    try:
        unet.requires_grad_(True)
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
        started, losses = time.perf_counter(), []
        with torch.enable_grad():
            for _ in range(steps):
                high = internal_training_crops(source, batch_size, crop_size, generator)
                _, condition = degrade(high, factor)
                batch = noise_batch(
                    unet,
                    betas,
                    high.to(device),
                    condition.to(device),
                    prediction_type=prediction_type,
                    generator=generator,
                    residual=residual,
                    residual_scale=pipeline.config.get("residual_scale", 1.0) if residual else 1.0,
                )
                with autocast:
                    prediction = predict(unet, batch)
                loss = diffusion_loss(prediction, batch, "l1", prediction_type=prediction_type)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        del optimizer
        unet.train(was_training)
        window = min(20, len(losses))
        yield Adaptation(
            steps=steps,
            first_loss=sum(losses[:window]) / window,
            last_loss=sum(losses[-window:]) / window,
            seconds=time.perf_counter() - started,
        )
    finally:
        unet.load_state_dict(original_weights)
        for parameter, requires_grad in zip(unet.parameters(), original_requires_grad):
            parameter.requires_grad_(requires_grad)
        unet.train(was_training)
