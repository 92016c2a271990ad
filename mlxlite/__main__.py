"""`python -m mlxlite`: the same entry point as the `mlxlite` console script."""

import sys

from mlxlite.cli import main

sys.exit(main())
