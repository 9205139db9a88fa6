"""``python -m inference``: see inference.cli."""

import sys

from .cli import main

sys.exit(main())
