"""`python -m diffusers_sr3 ...` runs the `sr3` command line."""

import sys

from .cli import main

sys.exit(main())
