"""Loads SR3UNet2DModel from the installed diffusers-sr3 package (not on PyPI: pip install -e . in a checkout)."""

from diffusers_sr3 import SR3UNet2DModel  # noqa: F401
