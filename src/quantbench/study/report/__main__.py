"""`python -m quantbench.study.report` is `quantbench report`."""

import sys

from quantbench.study.report import main

sys.exit(main())
