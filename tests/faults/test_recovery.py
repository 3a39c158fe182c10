"""A training that crashes (case 21) and a supervisor killed then resumed (case 22)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support import (
    CLIENT_TRAIN,
    CliProcess,
    alive,
    events_so_far,
    read_events,
    realtime_args,
    run_measured,
    wait_event,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.faults

# -- case 21: the training crashes mid-run -----------------------------------------------------

CRASHES = """
import os, signal, sys
from autotune_rt.client import ConfigReloader
reloader = ConfigReloader()
weights = {}
for epoch in range(6):
    reloader.apply(weights, epoch=epoch)
    print(f"Epoch {epoch}[0.01s]: {{'acc1': 0.5, 'head_acc': 0.7, 'tail_acc': 0.2}}", flush=True)
if sys.argv[1] == "exception":
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
print("Segmentation fault in the data loader", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGSEGV)
"""


@pytest.mark.parametrize(
    ("how", "exit_code", "last_line"),
    [
        ("exception", 1, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("SIGSEGV", 128 + signal.SIGSEGV, "Segmentation fault in the data loader"),
    ],
    ids=["exception", "SIGSEGV"],
)
def test_crash_mid_run_still_writes_summary_and_events(
    tmp_path: Path, how: str, exit_code: int, last_line: str
) -> None:
    """A training that crashes mid-run leaves a summary and events with its exit code and its
    last lines of output, and the crash's exit code is the supervisor's."""
    write_script(tmp_path, "train.py", CRASHES)
    result = run_measured(
        realtime_args(tmp_path, "--min_epochs", "2", "--patience", "1", script_args=[how]), tmp_path
    )
    assert result.returncode == exit_code
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    events = read_events(run_dir)
    exited = next(e for e in events if e["event"] == "child_exited")
    for report in (summary, exited):
        assert report["exit_code"] == exit_code
        assert report["last_lines"][-1] == last_line
    assert summary["epochs"] == 6
    assert len(summary["versions"]) >= 2  # the tuning done before the crash is on record
    assert events[-1]["event"] == "run_finished" and events[-1]["exit_code"] == exit_code
    assert (
        json.loads((run_dir / "final_config.json").read_text())["version"]
        == summary["versions"][-1]["version"]
    )


# -- case 22: the supervisor is killed, then resumed on the same run directory -------------------

OPTIONS = ("--min_epochs", "5", "--patience", "3")


def test_resume_continues_the_events_log_and_the_versions(tmp_path: Path) -> None:
    """After a SIGKILL, `--resume RUN_DIR` appends to the same events log under the same run_id,
    logs run_resumed, and goes on with version last+1 carrying the last weights."""
    write_script(tmp_path, "train.py", CLIENT_TRAIN)
    run_dir = tmp_path / "run"
    with CliProcess(realtime_args(tmp_path, *OPTIONS, script_args=["--epochs", "100000"]), tmp_path) as first:
        wait_event(run_dir, "config_written", lambda e: e["version"] >= 3)
        first.send_signal(signal.SIGKILL)
        first.wait()
    before = [e for e in events_so_far(run_dir) if e["event"] != "run_finished"]
    child = next(e["pid"] for e in before if e["event"] == "child_started")
    wait_for(lambda: not alive(child))
    log_before = (run_dir / "events.jsonl").read_bytes()
    train_log_before = (run_dir / "train.log").read_bytes()
    last = max((e for e in before if e["event"] == "config_written"), key=lambda e: e["version"])

    args = realtime_args(tmp_path, *OPTIONS, "--resume", str(run_dir), script_args=["--epochs", "8"])
    result = run_measured(args, tmp_path)
    assert result.returncode == 0, result.stderr.decode()[-2000:]

    assert (run_dir / "events.jsonl").read_bytes().startswith(log_before)
    assert (run_dir / "train.log").read_bytes().startswith(train_log_before)
    events = read_events(run_dir)
    assert {e["run_id"] for e in events} == {before[0]["run_id"]}
    after = events[len(before) :]
    assert [e["event"] for e in after].count("run_resumed") == 1
    written = [e for e in after if e["event"] == "config_written"]
    assert (written[0]["version"], written[0]["reason"], written[0]["new"]) == (
        last["version"] + 1,
        "resume",
        last["new"],
    )
    versions = [e["version"] for e in written]
    assert versions == sorted(set(versions))
    applied = {e["version"] for e in after if e["event"] == "config_applied"}
    assert last["version"] + 1 in applied  # the restarted training got the last weights
    first_epoch = next(e for e in after if e["event"] == "epoch")
    assert first_epoch["metrics"]["lambda_col"] == last["new"]["lambda_col"]
