"""status and tail on real run directories made by the realtime and batch modes (live and finished)."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from autotune_rt.cli import main
from autotune_rt.runs import read_state
from autotune_rt.views import format_event
from tests.support import CLIENT_TRAIN, REPO, SEED_TRAIN, cli_env, run_cli, wait_for, write_script

# Prints 12 epochs (the tuner changes the weights twice), then one endless epoch that keeps
# applying the control file: a run that is live for as long as a test needs it.
LIVE_TRAIN = """
import time
from autotune_rt.client import ConfigReloader

class Model:
    lambda_dol, lambda_col, lambda_hier, lambda_scl, max_grad_norm = 0.5, 0.3, 1.5, 0.2, 1.0

model, reloader = Model(), ConfigReloader()
for epoch in range(12):
    reloader.apply(model, epoch=epoch)
    tail = round(0.05 + 0.5 * model.lambda_col, 4)
    acc1 = round((0.7 + tail) / 2 * min(1.0, (epoch + 1) / 3), 4)
    metrics = {"epoch": epoch, "loss": 1.1, "acc1": acc1, "head_acc": 0.7, "tail_acc": tail}
    print(f"Epoch {epoch}[0.02s]: {metrics}", flush=True)
    time.sleep(0.02)
while True:
    reloader.apply(model, epoch=12)
    time.sleep(0.05)
"""
TUNING = ["--min_epochs", "5", "--patience", "3", "--grace_period", "2"]
BATCH_ENV = cli_env(SEED_CONFIG_FILE="/nonexistent/autotune-test.json")


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    """The complete events so far ([] while the file does not exist)."""
    try:
        data = (run_dir / "events.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]


def finished_realtime_run(base: Path) -> Path:
    """A realtime run of the client-helper training, 30 epochs, to its end."""
    base.mkdir(parents=True, exist_ok=True)
    write_script(base, "train.py", CLIENT_TRAIN)
    run_dir = base / "run"
    result = run_cli(
        ["realtime", *TUNING, "--config_file", str(base / "c.json"), "--run_dir", str(run_dir),
         "--", "python", "train.py", "--epochs", "30"],
        base,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return run_dir


def finished_batch_run(base: Path) -> Path:
    """A batch run of 3 trials of 15 epochs, to its end."""
    base.mkdir(parents=True, exist_ok=True)
    write_script(base, "train.py", SEED_TRAIN)
    run_dir = base / "run"
    result = run_cli(
        ["batch", "--max_trials", "3", *TUNING, "--seed", "1", "--run_dir", str(run_dir),
         "--", "python", "train.py", "--epochs", "15"],
        base,
        env=BATCH_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return run_dir


class LiveRun:
    """A supervisor running LIVE_TRAIN in a subprocess; stop() ends it like Ctrl-C would."""

    def __init__(self, base: Path, mode: str) -> None:
        base.mkdir(parents=True, exist_ok=True)
        write_script(base, "live.py", LIVE_TRAIN)
        self.run_dir = base / "run"
        self.config = base / "c.json"
        extra = ["--max_trials", "2"] if mode == "batch" else []
        argv = [sys.executable, "-m", "autotune_rt", mode, *TUNING, *extra, "--config_file", str(self.config),
                "--run_dir", str(self.run_dir), "--", "python", "live.py"]  # fmt: skip
        self.log = (base / "supervisor.log").open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=base, env=cli_env(), stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL
        )

    def wait_for_event(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        """The first event matching *predicate*, waiting for it to be logged."""
        return dict(
            wait_for(lambda: next((e for e in events_of(self.run_dir) if predicate(e)), None), timeout)
        )

    def stop(self) -> None:
        """SIGTERM the supervisor and wait for it to finish its run."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def realtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_realtime_run(tmp_path_factory.mktemp("realtime"))


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_batch_run(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveRun, LiveRun]]:
    """A live realtime run (with a manual edit applied) and a live batch run, both in their first epochs."""
    realtime = LiveRun(tmp_path_factory.mktemp("live-realtime"), "realtime")
    batch = LiveRun(tmp_path_factory.mktemp("live-batch"), "batch")
    try:
        realtime.wait_for_event(lambda e: e["event"] == "epoch" and e["epoch"] == 11)
        realtime.config.write_text(json.dumps({"lambda_hier": 1.2, "version": 10}))
        override = realtime.wait_for_event(lambda e: e["event"] == "manual_override")
        realtime.wait_for_event(
            lambda e: e["event"] == "config_applied" and e["version"] == override["version"]
        )
        batch.wait_for_event(lambda e: e["event"] == "epoch" and e["epoch"] == 11)
        yield realtime, batch
    finally:
        realtime.stop()
        batch.stop()


def status_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", str(run_dir), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return dict(json.loads(out))


def test_status_of_finished_realtime_run(realtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished realtime run: exit code, best metric and epoch, last version and its acknowledgement."""
    summary = json.loads((realtime_dir / "summary.json").read_text())
    events = events_of(realtime_dir)
    written = [e for e in events if e["event"] == "config_written"]
    applied = {e["version"] for e in events if e["event"] == "config_applied"}
    state = status_json(realtime_dir, capsys)
    assert state["state"] == "finished" and state["exit_code"] == 0 and state["mode"] == "realtime"
    assert (state["best"], state["best_epoch"]) == (summary["best_metric"], summary["best_epoch"])
    assert state["metric"] == "acc1" and state["epoch"] == 29 and state["epochs"] == 30
    assert state["config_version"] == written[-1]["version"] and state["weights"] == written[-1]["new"]
    assert state["last_change"]["acknowledged"] == (written[-1]["version"] in applied)
    diagnosis = [e for e in events if e["event"] == "diagnosis"][-1]
    assert state["last_diagnosis"]["problem"] == diagnosis["problem"]
    assert state["last_diagnosis"]["evidence"] == diagnosis["evidence"]
    assert state["child"]["alive"] is False and state["damaged_lines"] == 0

    assert main(["status", str(realtime_dir)]) == 0
    text = capsys.readouterr().out
    assert "finished: exit 0" in text
    assert f"best {summary['best_metric']:.4f} at epoch {summary['best_epoch']}" in text
    assert f"v{written[-1]['version']}: lambda_dol=" in text
    assert f"diagnosis  epoch {diagnosis['epoch']} {diagnosis['problem']}:" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_status_of_finished_batch_run(batch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished batch run: the trial table matches summary.json, with the best trial marked."""
    summary = json.loads((batch_dir / "summary.json").read_text())
    state = status_json(batch_dir, capsys)
    assert state["state"] == "finished" and state["exit_code"] == 0
    assert state["best_trial"] == summary["best_trial"] and state["max_trials"] == 3
    rows = [(t["trial"], t["weights"], t["best_metric"], t["best_epoch"], t["epochs"], t["status"])
            for t in state["trials"]]  # fmt: skip
    expected = [(t["number"], t["weights"], t["best_metric"], t["best_epoch"], t["epochs"], t["status"])
                for t in summary["trials"]]  # fmt: skip
    assert rows == expected

    assert main(["status", str(batch_dir)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.strip().startswith("trial "))
    assert header.split() == [
        "trial",
        "dol",
        "col",
        "hier",
        "scl",
        "gnorm",
        "best",
        "@epoch",
        "epochs",
        "status",
    ]
    best = summary["trials"][summary["best_trial"] - 1]
    assert re.search(rf"^\s+\*{best['number']}\s.*{best['best_metric']:.4f}\s.*\sok$", text, re.M)
    assert max(len(line) for line in text.splitlines()) <= 80


def test_status_of_live_realtime_run(
    live_runs: tuple[LiveRun, LiveRun], capsys: pytest.CaptureFixture[str]
) -> None:
    """A live run is reported alive with the supervisor's pid, the child's pid and its memory."""
    live, _ = live_runs
    events = events_of(live.run_dir)
    child = next(e["pid"] for e in events if e["event"] == "child_started")
    override = next(e for e in events if e["event"] == "manual_override")
    state = status_json(live.run_dir, capsys)
    assert state["state"] == "running" and state["pid"] == live.proc.pid
    assert state["child"]["pid"] == child and state["child"]["alive"] is True
    assert state["child"]["rss"] > 1_000_000 and state["child"]["nprocs"] >= 1
    assert state["epoch"] == 11 and state["uptime_s"] > 0 and state["exit_code"] is None
    assert state["last_change"]["reason"] == "manual_override"
    assert state["last_change"]["acknowledged"] is True
    assert state["weights"]["lambda_hier"] == 1.2 and state["config_version"] == override["version"]

    assert main(["status", str(live.run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"running: supervisor pid {live.proc.pid}, up " in text
    assert f"child      pid {child}: cpu " in text
    assert f"change     v{override['version']} manual_override: applied at epoch" in text


def test_status_of_live_batch_run(
    live_runs: tuple[LiveRun, LiveRun], capsys: pytest.CaptureFixture[str]
) -> None:
    """A live batch run shows trial i/N and the running trial in the table."""
    _, live = live_runs
    state = status_json(live.run_dir, capsys)
    assert state["state"] == "running" and state["trial"] == 1 and state["max_trials"] == 2
    assert [(t["trial"], t["status"], t["epochs"]) for t in state["trials"]] == [(1, "running", 12)]
    assert main(["status", str(live.run_dir)]) == 0
    assert "running, trial 1/2: supervisor pid" in capsys.readouterr().out


def test_status_defaults_to_latest_run(
    realtime_dir: Path, batch_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Without a run_dir, status looks at the most recently active run under ./autotune_runs."""
    runs = tmp_path / "autotune_runs"
    shutil.copytree(realtime_dir, runs / "20260101T000000Z-realtime")
    shutil.copytree(batch_dir, runs / "20250101T000000Z-batch")
    os.utime(runs / "20260101T000000Z-realtime" / "events.jsonl", (1e9, 1e9))
    (runs / "not-a-run").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "batch"


@pytest.mark.parametrize("command", ["status", "report", "tail"])
def test_missing_or_foreign_dir_is_one_line_error(command: str, tmp_path: Path) -> None:
    """A missing directory, one without events.jsonl, or no run at all: exit 2 and one line on stderr."""
    (tmp_path / "empty").mkdir()
    no_follow = ["--no-follow"] if command == "tail" else []
    cases = [
        ([command, "/nope"], "no such run directory: /nope"),
        ([command, "empty", *no_follow], "empty is not an autotune-rt run directory (no events.jsonl)"),
        ([command], f"no run directory under ./autotune_runs; pass the run directory: autotune-rt {command}"),
    ]
    for args, message in cases:
        result = run_cli(args, tmp_path)
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert err.startswith("autotune-rt: error: ") and err.count("\n") == 1 and message in err
        assert result.stdout == b""


def test_damaged_lines_are_skipped_and_counted(realtime_dir: Path, tmp_path: Path) -> None:
    """Garbage lines in events.jsonl are skipped and counted; status and tail still work."""
    run_dir = tmp_path / "run"
    shutil.copytree(realtime_dir, run_dir)
    lines = (run_dir / "events.jsonl").read_bytes().splitlines(keepends=True)
    lines[5:5] = [b'{"ts": "2026-01-01T00:00:00Z", "event": "epo\n', b"\xff\xfe not json\n", b"[1, 2]\n"]
    (run_dir / "events.jsonl").write_bytes(b"".join(lines) + b'{"ts": "2026')  # and a cut-off last line
    state = read_state(run_dir)
    assert state.damaged_lines == 3 and state.state == "finished" and state.epochs == 30
    result = run_cli(["status", str(run_dir)], tmp_path)
    assert result.returncode == 0 and "3 damaged line(s) of events.jsonl skipped" in result.stdout.decode()
    result = run_cli(["tail", str(run_dir), "--no-follow"], tmp_path)
    assert result.returncode == 0
    assert len(result.stdout.decode().splitlines()) == len(lines) - 3
    assert "skipped 3 damaged line(s)" in result.stderr.decode()


def test_tail_filters_by_event(realtime_dir: Path, tmp_path: Path) -> None:
    """tail --no-follow --event config_written prints exactly those events, one readable line each."""
    written = [e for e in events_of(realtime_dir) if e["event"] == "config_written"]
    result = run_cli(["tail", str(realtime_dir), "--no-follow", "--event", "config_written"], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(written) >= 3
    for line, event in zip(lines, written, strict=True):
        assert re.match(rf"^\d\d:\d\d:\d\d info +config_written +v{event['version']} {event['reason']}", line)
    assert "lambda_col 0.3->0.4" in lines[1]  # a change shows old -> new


def test_tail_condenses_epochs_and_tags_trials(batch_dir: Path, tmp_path: Path) -> None:
    """Epoch events are one short line; batch events carry their trial."""
    epoch = next(
        e for e in events_of(batch_dir) if e["event"] == "epoch" and e["trial"] == 2 and e["epoch"] == 7
    )
    result = run_cli(["tail", str(batch_dir), "--no-follow", "--event", "epoch,trial_finished"], tmp_path)
    out = result.stdout.decode().splitlines()
    assert len(out) == 3 * 15 + 3
    line = f"epoch           [trial 2] 7 acc1={epoch['value']:.4f} best={epoch['best']:.4f} (since "
    assert any(line in text for text in out), out[:20]
    assert sum("trial_finished  [trial " in text for text in out) == 3


def read_pty(argv: list[str], env: dict[str, str]) -> str:
    """Run *argv* with its stdout on a terminal and return what it printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    return b"".join(chunks).decode()


def test_tail_colours_a_terminal_unless_no_color(realtime_dir: Path) -> None:
    """On a terminal tail colours its lines; NO_COLOR turns that off; a pipe never gets colour."""
    argv = [
        sys.executable,
        "-m",
        "autotune_rt",
        "tail",
        str(realtime_dir),
        "--no-follow",
        "--event",
        "run_finished",
    ]
    env = cli_env()
    env.pop("NO_COLOR", None)
    assert "\x1b[1mrun_finished" in read_pty(argv, env)
    assert "\x1b[" not in read_pty(argv, {**env, "NO_COLOR": "1"})
    assert "\x1b[" not in format_event(events_of(realtime_dir)[-1], color=False)


def test_tail_follows_a_run_from_before_it_starts_until_it_finishes(tmp_path: Path) -> None:
    """tail started before the run waits for events.jsonl, prints every event, exits after run_finished."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = (tmp_path / "tail.out").open("wb")
    tail = subprocess.Popen([sys.executable, "-m", "autotune_rt", "tail", str(run_dir)], env=cli_env(),
                            stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        write_script(tmp_path, "train.py", CLIENT_TRAIN)
        wait_for(lambda: tail.stderr is not None and tail.stderr.readline().startswith(b"waiting for "))
        result = run_cli(
            ["realtime", *TUNING, "--config_file", str(tmp_path / "c.json"), "--run_dir", str(run_dir),
             "--", "python", "train.py", "--epochs", "12", "--epoch_time", "0.05"],
            tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        _, err = tail.communicate(timeout=20)
        assert tail.returncode == 0, err.decode()
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
        out.close()
    lines = (tmp_path / "tail.out").read_text().splitlines()
    assert len(lines) == len(events_of(run_dir))
    assert " run_started " in lines[0] and " run_finished " in lines[-1]


def test_tail_stops_on_ctrl_c(live_runs: tuple[LiveRun, LiveRun], tmp_path: Path) -> None:
    """Following a live run, Ctrl-C ends tail cleanly with exit code 0."""
    live, _ = live_runs
    out_path = tmp_path / "tail.out"
    with out_path.open("wb") as out:
        argv = [sys.executable, "-m", "autotune_rt", "tail", str(live.run_dir)]
        tail = subprocess.Popen(
            argv, env=cli_env(), stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        wait_for(lambda: b" manual_override " in out_path.read_bytes())
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=20)
    assert tail.returncode == 0, err.decode()
    assert err == b""


def test_killed_supervisor_is_reported_stopped(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL: status says stopped, and tail stops following on its own."""
    live = LiveRun(tmp_path, "realtime")
    try:
        child = live.wait_for_event(lambda e: e["event"] == "child_started")["pid"]
        live.wait_for_event(lambda e: e["event"] == "epoch")
        live.proc.kill()
        live.proc.wait(timeout=10)
        wait_for(
            lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        live.stop()
    state = read_state(live.run_dir)
    assert state.state == "stopped" and state.child is not None and state.child.alive is False
    result = run_cli(["tail", str(live.run_dir)], tmp_path, timeout=30)
    assert result.returncode == 0
    assert f"supervisor (pid {live.proc.pid}) is gone without logging run_finished" in result.stderr.decode()


def test_every_logged_event_is_documented() -> None:
    """docs/observing.md has a row for every event name the package logs."""
    source = "".join(path.read_text() for path in (REPO / "autotune_rt").glob("*.py"))
    logged = set(re.findall(r'events\.(?:info|warning|error)\(\s*"([a-z_]+)"', source))
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (REPO / "docs" / "observing.md").read_text(), re.M))
    assert len(logged) > 25
    assert logged <= documented, f"add to docs/observing.md: {sorted(logged - documented)}"
