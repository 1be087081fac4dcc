"""Loads SR3Pipeline from the installed diffusers-sr3 package (pip install diffusers-sr3)."""

from diffusers_sr3 import SR3Pipeline  # noqa: F401
