"""The error hierarchy of autotune-rt.

::

    AutotuneError                 anything autotune-rt raises on purpose
    ├── ConfigError               bad options, bad search-space file (usage error: exit 2)
    ├── LaunchError               the training command cannot be started (exit 2)
    └── ChannelError              the control file cannot be written or is unsafe
        └── LockHeldError         another supervisor owns this control file

Every message is one line that names the problem and how to fix it.
"""

from __future__ import annotations

__all__ = ["AutotuneError", "ChannelError", "ConfigError", "LaunchError", "LockHeldError"]


class AutotuneError(Exception):
    """Base class of every error autotune-rt raises on purpose."""


class ConfigError(AutotuneError):
    """A bad option, option value or configuration file; a usage error (exit 2)."""


class LaunchError(AutotuneError):
    """The training command cannot be started (missing file, not executable)."""


class ChannelError(AutotuneError):
    """The control file cannot be written, or is not safe to write."""


class LockHeldError(ChannelError):
    """Another live supervisor holds the lock on this control file."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
