"""autotune-rt: tune a training's loss weights while it runs.

Importing the package is cheap: heavy names (pydantic, structlog, psutil, watchdog and
asyncio users) are loaded lazily on first attribute access, so ``import
autotune_rt.client`` inside a training loop pulls in nothing but the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AdaptiveTuner",
    "AutoTuner",
    "ConfigReloader",
    "__version__",
]

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {
    "AutoTuner": "autotune_rt.tuner",
    "AdaptiveTuner": "autotune_rt.tuner",
    "ConfigReloader": "autotune_rt.client",
}

if TYPE_CHECKING:  # pragma: no cover
    from autotune_rt.client import ConfigReloader
    from autotune_rt.tuner import AdaptiveTuner, AutoTuner


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autotune_rt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
