"""`python -m quantbench <command>`: the same as the `quantbench` console script."""

import sys

from quantbench.ops.cli import main

sys.exit(main())
