"""Shared helpers of the end-to-end and fault tests: real trainings in tmp_path, real CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# A seed-style training: it reads the control file with the seed's own snippet (json +
# config.get), leaves stdout buffering alone, and its tail accuracy responds to lambda_col.
SEED_TRAIN = textwrap.dedent(
    """
    import argparse, json, os, time

    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lambda_dol", type=float, default=0.5)
    p.add_argument("--lambda_col", type=float, default=0.3)
    p.add_argument("--lambda_hier", type=float, default=1.5)
    p.add_argument("--lambda_scl", type=float, default=0.2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--epoch_time", type=float, default=0.02)
    args, _unknown = p.parse_known_args()

    class Model:
        pass

    args.model = Model()
    for name in ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl"):
        setattr(args.model, name, getattr(args, name))

    best = 0.0
    for epoch in range(args.epochs):
        config_file = os.environ.get("SEED_CONFIG_FILE", "/tmp/auto_tune_config.json")
        if os.path.exists(config_file):
            with open(config_file, "r") as f:
                config = json.load(f)
            args.model.lambda_dol = config.get("lambda_dol", args.model.lambda_dol)
            args.model.lambda_col = config.get("lambda_col", args.model.lambda_col)
            args.model.lambda_scl = config.get("lambda_scl", args.model.lambda_scl)
        time.sleep(args.epoch_time)
        tail = round(0.05 + 0.5 * args.model.lambda_col, 4)
        head = 0.7
        acc1 = round((head + tail) / 2 * min(1.0, (epoch + 1) / 3), 4)
        best = max(best, acc1)
        metrics = {"epoch": epoch, "ce": 1.2, "acc1": acc1, "head_acc": head, "tail_acc": tail,
                   "lambda_col": args.model.lambda_col}
        print(f"Epoch {epoch}[{args.epoch_time:.2f}s]: {metrics}")
    print(f"final best_metric: {best}")
    """
)

# The same training, wired through the client helper instead of the seed's snippet.
_SNIPPET = """\
    config_file = os.environ.get("SEED_CONFIG_FILE", "/tmp/auto_tune_config.json")
    if os.path.exists(config_file):
        with open(config_file, "r") as f:
            config = json.load(f)
        args.model.lambda_dol = config.get("lambda_dol", args.model.lambda_dol)
        args.model.lambda_col = config.get("lambda_col", args.model.lambda_col)
        args.model.lambda_scl = config.get("lambda_scl", args.model.lambda_scl)
"""
assert _SNIPPET in SEED_TRAIN and "\nbest = 0.0\n" in SEED_TRAIN
CLIENT_TRAIN = SEED_TRAIN.replace(_SNIPPET, "    reloader.apply(args.model, epoch=epoch)\n").replace(
    "\nbest = 0.0\n",
    "\nfrom autotune_rt.client import ConfigReloader\nreloader = ConfigReloader()\nbest = 0.0\n",
)


def write_script(directory: Path, name: str, source: str) -> Path:
    """Write a training script and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout importable, no PYTHONUNBUFFERED."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LANG"] = "C.UTF-8"
    env.pop("LC_ALL", None)
    env.update(extra)
    return env


def run_cli(
    args: list[str], cwd: Path, *, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m autotune_rt <args>`` (or a seed script when args[0] ends in .py)."""
    if args and args[0].endswith(".py"):
        argv = [sys.executable, *args]
    else:
        argv = [sys.executable, "-m", "autotune_rt", *args]
    return subprocess.run(
        argv, cwd=cwd, env=env or cli_env(), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of ``events.jsonl`` (each line must be valid JSON)."""
    lines = (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll *predicate* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")
