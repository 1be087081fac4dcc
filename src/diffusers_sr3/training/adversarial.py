"""An adversarial term for SR3 training: a patch discriminator that learns what real detail looks like.

Where the noisy input leaves a texture's pixels uncertain, the regression loss is minimised by their mean, which is
smooth; a discriminator that tells the true clean image from the network's estimate of it penalises smoothness
itself, the way Real-ESRGAN and SRGAN do for one-step super-resolution. The discriminator judges the clean-image
estimate that every prediction target implies (`objective.predicted_clean`), next to the condition, so it asks for
detail that fits the low-resolution input. It is a training-time helper only: saved in checkpoints (exact resumes),
never in the pipeline.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .objective import NoisedBatch


class PatchDiscriminator(nn.Module):
    """A conditional PatchGAN (pix2pix's design) with spectral normalisation: one real/fake logit per image region.

    Args:
        in_channels: channels it judges: the condition's (none for unconditional models) plus the image's.
        width: channels of the first layer; each of the `num_downsamples` strided layers doubles it (up to 4x).
        num_downsamples: stride-2 convolutions; each logit sees a region of about 5 x 2^num_downsamples pixels
            (40 with the default 3), so it judges texture and local structure, not composition.
    """

    def __init__(self, in_channels: int, width: int = 64, num_downsamples: int = 3):
        super().__init__()
        layers = [spectral_norm(nn.Conv2d(in_channels, width, 3, padding=1)), nn.LeakyReLU(0.2)]
        channels = width
        for index in range(num_downsamples):
            out_channels = width * min(2 ** (index + 1), 4)
            layers += [spectral_norm(nn.Conv2d(channels, out_channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            channels = out_channels
        layers.append(spectral_norm(nn.Conv2d(channels, 1, 3, padding=1)))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`(B, 1, h, w)` logits: positive says real."""
        if condition is not None:
            images = torch.cat([condition, images], dim=1)
        return self.layers(images)


def batch_condition(batch: NoisedBatch, image_channels: int) -> Optional[torch.Tensor]:
    """The condition the network saw (in front of the noisy image in its input), or None for unconditional models."""
    if batch.network_input.shape[1] == image_channels:
        return None
    return batch.network_input[:, :-image_channels]


def generator_adversarial_loss(discriminator: nn.Module, estimate: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
    """Per-sample hinge generator loss, `-mean(D(estimate))`, weighted by alpha_bar like the texture loss.

    Weighting by alpha_bar (the share of the noisy input that is signal) leaves the noisiest levels, whose answer
    is the posterior mean that fidelity mode returns, to the regression. Call it with a discriminator whose
    parameters are frozen (`requires_grad_(False)`): this loss trains the network, not the discriminator.
    """
    logits = discriminator(estimate, batch_condition(batch, estimate.shape[1]))
    return -logits.float().flatten(1).mean(dim=1) * batch.noise_level**2


def discriminator_loss(discriminator: nn.Module, estimate: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
    """Hinge loss that teaches the discriminator the true clean images (`batch.clean`) from the detached estimates."""
    if batch.clean is None:
        raise ValueError("the adversarial loss needs the clean images of the batch (NoisedBatch.clean)")
    condition = batch_condition(batch, estimate.shape[1])
    real = discriminator(batch.clean, condition).float()
    fake = discriminator(estimate.detach(), condition).float()
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
