"""Loads SR3UNet2DModel from the installed diffusers-sr3 package (pip install diffusers-sr3)."""

from diffusers_sr3 import SR3UNet2DModel  # noqa: F401
