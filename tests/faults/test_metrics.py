"""Hostile metric lines (case 20): rejected fast and counted, never a crash, CPU bounded."""

from __future__ import annotations

import json
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from tests.support import (
    MEMORY_BOUND,
    CliProcess,
    Finished,
    read_events,
    realtime_args,
    wait_event,
    write_script,
)

pytestmark = pytest.mark.faults

# Far above the ~0.5 s a supervisor needs to start and parse a few lines, far below what a
# reader that is quadratic in the line length (or evaluates it) spends on these lines.
CPU_BOUND_S = 10.0
REPEAT = 100

HOSTILE_METRICS = f"""
import os, sys, time
big = "Epoch 5[1.00s]: {{" + ", ".join("'k%d': %d.5" % (i, i) for i in range(80_000)) + "}}"
assert len(big) > 1_000_000
small = [
    "Epoch 1[1.00s]: {{'acc1': __import__('os').system('touch pwned')}}",
    "Epoch 2[1.00s]: {{'acc1': " + "[" * 10_000 + "]" * 10_000 + "}}",
    "Epoch 3[1.00s]: {{'acc1': " + "9" * 5_000 + "}}",
    "Epoch 4[1.00s]: " + "{{'a': " * 10_000 + "0.5" + "}}" * 10_000,
    "Epoch 6[1.00s]: {{'acc1': 0.5, 'ce': ",
]
print("Epoch 0[1.00s]: {{'acc1': 0.4}}")
for _ in range({REPEAT}):
    print("\\n".join(small))
for _ in range(3):
    print(big)
print("Epoch 7[1.00s]: {{'acc1': 0.6}}", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)
"""
HOSTILE_LINES = 5 * REPEAT + 3


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Finished, float, Path]:
    """One run over the hostile lines: how it ended, the supervisor's CPU seconds once it had
    read them all, and the run directory."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    write_script(tmp_path, "train.py", HOSTILE_METRICS)
    go = tmp_path / "go"
    with CliProcess(realtime_args(tmp_path, script_args=[str(go)]), tmp_path) as cli:
        wait_event(tmp_path / "run", "epoch", lambda e: e["epoch"] == 7, timeout=60)
        times = psutil.Process(cli.pid).cpu_times()
        go.touch()
        result = cli.wait(30)
    assert not (tmp_path / "pwned").exists()
    return result, times.user + times.system, tmp_path / "run"


def test_hostile_metric_lines_are_rejected_without_harm(hostile_run: tuple[Finished, float, Path]) -> None:
    """Code, 10,000-deep nesting, a 5,000-digit integer, a 1 MB dict and a truncated dict are
    rejected without a crash, with bounded CPU and memory, and later lines still parse."""
    result, cpu_s, run_dir = hostile_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert cpu_s < CPU_BOUND_S
    assert result.maxrss < MEMORY_BOUND
    events = read_events(run_dir)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [0, 7]
    assert not [e for e in events if e["level"] == "error"]
    assert b"callback failed" not in result.stderr and b"Traceback" not in result.stderr


def test_hostile_metric_lines_are_counted(hostile_run: tuple[Finished, float, Path]) -> None:
    """The summary counts the metric-looking lines the parser rejected (`rejected_lines`)."""
    _, _, run_dir = hostile_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.get("rejected_lines") == HOSTILE_LINES
