"""Subcommands of the `sr3` command line (see `diffusers_sr3.cli.COMMANDS`).

`sr3 --help` imports every module here, so they stay light: torch, Diffusers, torchvision, tqdm and the package's
modules that import them are imported inside the functions that use them (mostly `run`), and the figures the parsers
show come from `diffusers_sr3.defaults`. Start-up is then a fraction of a second instead of seconds
(benchmarks/startup.py); tests/test_startup.py checks that no parser imports torch.
"""
