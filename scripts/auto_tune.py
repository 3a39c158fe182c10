#!/usr/bin/env python3
"""The seed's `auto_tune.py` (batch mode): `python scripts/auto_tune.py --base_cmd train.py ...`."""

import sys
from pathlib import Path

try:
    from autotune_rt.cli import batch_main
except ImportError:  # run from a checkout without installing: use the package beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from autotune_rt.cli import batch_main

if __name__ == "__main__":
    sys.exit(batch_main())
