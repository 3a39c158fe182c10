"""The validated settings of one run (realtime or batch), built by the CLI or by code."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from autotune_rt.diagnose import MetricNames, Thresholds
from autotune_rt.exceptions import ConfigError, LaunchError
from autotune_rt.space import Weights

__all__ = ["DEFAULT_CONFIG_FILE", "DEFAULT_RUNS_DIR", "Settings", "build_command", "default_run_dir"]

DEFAULT_CONFIG_FILE = "/tmp/auto_tune_config.json"  # the seed's path
DEFAULT_RUNS_DIR = "autotune_runs"


@dataclass
class Settings:
    """Everything one run needs; :meth:`validate` turns a bad value into a one-line ConfigError."""

    command: list[str]
    weights: Weights
    mode_name: Literal["realtime", "batch"] = "realtime"
    min_epochs: int = 10
    patience: int = 5
    cooldown: int | None = None
    max_adjustments: int | None = None
    max_trials: int = 5
    check_interval: float = 30.0
    stall_timeout: float = 600.0
    grace_period: float = 30.0
    ack_epochs: int = 3
    config_file: Path = Path(DEFAULT_CONFIG_FILE)
    write_config: bool = True
    run_dir: Path | None = None
    metric: str | None = None
    mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0
    relative_delta: bool = False
    names: MetricNames = field(default_factory=MetricNames)
    thresholds: Thresholds = field(default_factory=Thresholds)
    search_space: Path | None = None
    seed: int | None = None
    tuner: str | None = None
    strategy: Literal["seed", "adaptive"] = "adaptive"
    lang: str = "en"
    key_value: bool = False
    metric_regex: str | None = None
    stop_on_stagnation: bool = False
    resume: Path | None = None
    max_grad_norm_set: bool = False  # batch: pass --max_grad_norm only when the user set it

    def validate(self) -> None:
        """Check ranges; raise ConfigError with a one-line message naming the fix."""
        positive_ints = {
            "patience": self.patience,
            "max_trials": self.max_trials,
            "ack_epochs": self.ack_epochs,
        }
        for name, value in positive_ints.items():
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1 (got {value})")
        non_negative: dict[str, float | int | None] = {
            "min_epochs": self.min_epochs,
            "cooldown": self.cooldown,
            "max_adjustments": self.max_adjustments,
            "min_delta": self.min_delta,
        }
        for name, maybe in non_negative.items():
            if maybe is not None and maybe < 0:
                raise ConfigError(f"--{name} must not be negative (got {maybe})")
        for name, seconds in {
            "check_interval": self.check_interval,
            "stall_timeout": self.stall_timeout,
            "grace_period": self.grace_period,
        }.items():
            if not seconds > 0 or seconds == float("inf"):
                raise ConfigError(f"--{name} must be a positive number of seconds (got {seconds})")
        for name, weight in self.weights.items():
            if not 0 <= weight < float("inf"):
                raise ConfigError(f"--{name} must be a finite, non-negative number (got {weight})")
        if self.metric is not None and not self.metric.strip():
            raise ConfigError("--metric must name a metric the training prints, for example --metric acc1")
        if not self.command:
            raise ConfigError(
                "no training command: pass --base_cmd train.py --base_args ... or `-- python train.py ...`"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the ``run_started`` event and the summary."""
        data = asdict(self)
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in data.items()}


def build_command(base_cmd: str, base_args: list[str]) -> list[str]:
    """The seed's rule: ``<this python> <base_cmd> <args>`` for a ``.py`` file, else as is."""
    if base_cmd.endswith(".py"):
        return [sys.executable, base_cmd, *base_args]
    return [base_cmd, *base_args]


def check_command(command: list[str]) -> None:
    """Fail early (LaunchError) when the training command cannot possibly start."""
    program = command[0]
    script = command[1] if len(command) > 1 and Path(program).name.startswith("python") else None
    if script is not None and script.endswith(".py") and not Path(script).is_file():
        raise LaunchError(f"cannot start the training: {script} not found in {os.getcwd()}; check --base_cmd")
    if os.sep in program:
        path = Path(program)
        if not path.is_file():
            raise LaunchError(f"cannot start the training: {program} not found; check the command")
        if not os.access(path, os.X_OK):
            raise LaunchError(
                f"cannot start the training: {program} is not executable; run `chmod +x {program}` "
                f"or start it through its interpreter"
            )
    elif shutil.which(program) is None:
        raise LaunchError(f"cannot start the training: {program!r} not found on PATH; check the command")


def default_run_dir(mode_name: str, root: str | Path = DEFAULT_RUNS_DIR) -> Path:
    """``./autotune_runs/<UTC timestamp>-<mode>/``, made unique if it already exists."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(root) / f"{stamp}-{mode_name}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
