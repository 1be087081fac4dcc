"""Subcommands of the `sr3` command line (see `diffusers_sr3.cli.COMMANDS`)."""
