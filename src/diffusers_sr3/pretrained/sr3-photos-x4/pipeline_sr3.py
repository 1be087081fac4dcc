"""Loads SR3Pipeline from the installed diffusers-sr3 package (not on PyPI: pip install -e . in a checkout)."""

from diffusers_sr3 import SR3Pipeline  # noqa: F401
