"""`python -m cluster.cli ...` runs the `treelm` console script."""

import sys

from cluster.cli import main

sys.exit(main())
