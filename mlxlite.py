#!/usr/bin/env python3
"""Entry script for a checkout: `python mlxlite.py ...` runs the CLI without installing."""

import sys

from mlxlite.cli import main

if __name__ == "__main__":
    sys.exit(main())
