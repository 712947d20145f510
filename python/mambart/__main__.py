"""`python -m mambart ...` runs the command line (see mambart.cli)."""

import sys

from .cli import main

sys.exit(main())
