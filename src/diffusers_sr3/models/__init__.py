"""The SR3 networks."""

from .unet_sr3 import SR3UNet2DModel, SR3UNet2DOutput

__all__ = ["SR3UNet2DModel", "SR3UNet2DOutput"]
