"""The bundled demo: a real (numpy) long-tailed training for autotune-rt to supervise.

Run it with ``python -m autotune_rt.demo.train`` or ``python <TRAIN_SCRIPT>``; importing
this package loads nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TRAIN_MODULE", "TRAIN_SCRIPT"]

# For `python -m`, and for a plain file path: both work from an installed package.
TRAIN_MODULE = "autotune_rt.demo.train"
TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")
