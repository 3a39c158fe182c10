"""``python -m autotune_rt``: the ``autotune-rt`` command."""

import sys

from autotune_rt.cli import main

sys.exit(main())
