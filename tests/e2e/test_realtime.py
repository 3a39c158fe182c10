"""End-to-end: the realtime command line on real training scripts."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import (
    CLIENT_TRAIN,
    REPO,
    SEED_REALTIME_OPTIONS,
    SEED_TRAIN,
    cli_env,
    read_events,
    realtime_args,
    run_cli,
    strip_console,
    wait_for,
    write_script,
)

SEED_REALTIME = shlex.split(SEED_REALTIME_OPTIONS)


def only_run_dir(cwd: Path) -> Path:
    runs = list((cwd / "autotune_runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_seed_realtime_command_line_verbatim(tmp_path: Path) -> None:
    """The seed's realtime command line runs as is; the seed-snippet training applies new weights mid-run."""
    write_script(tmp_path, "train.py", SEED_TRAIN)
    result = run_cli([str(REPO / "scripts" / "auto_tune_realtime.py"), *SEED_REALTIME], tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    run_dir = only_run_dir(tmp_path)
    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    for needed in (
        "run_started",
        "child_started",
        "epoch",
        "trigger",
        "diagnosis",
        "config_written",
        "child_exited",
        "run_finished",
    ):
        assert needed in kinds, needed
    assert all({"ts", "level", "event", "run_id"} <= e.keys() for e in events)
    diagnosis = next(e for e in events if e["event"] == "diagnosis")
    assert diagnosis["problem"] == "poor_tail"
    assert diagnosis["evidence"]["tail_acc"] < 0.3
    # The training printed the lambda_col it used: it changed mid-run.
    used = [e["metrics"]["lambda_col"] for e in events if e["event"] == "epoch"]
    assert used[0] == 0.3 and max(used) > 0.3
    assert len(used) == 200
    out = result.stdout.decode()
    assert "Epoch 199[" in out  # passed through
    err = result.stderr.decode()
    assert "Stagnation detected, adjusting loss weights..." in err
    assert "New config: lambda_dol=" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and summary["best_metric"] > used[0]
    assert summary["versions"][0]["reason"] == "initial"
    # The seed snippet never acknowledges: the supervisor warns once, with the one-line fix.
    assert "does not seem to read the control file" in err
    assert (run_dir / "train.log").read_bytes().count(b"Epoch ") == 200


def test_client_helper_acknowledges_with_latency(tmp_path: Path) -> None:
    """A training using ConfigReloader acknowledges each version; config_applied carries the latency."""
    write_script(tmp_path, "train.py", CLIENT_TRAIN)
    config = tmp_path / "control.json"
    result = run_cli(
        [
            "realtime",
            "--min_epochs",
            "5",
            "--patience",
            "3",
            "--config_file",
            str(config),
            "--run_dir",
            str(tmp_path / "run"),
            "--",
            "python",
            "train.py",
            "--epochs",
            "60",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    events = read_events(tmp_path / "run")
    applied = [e for e in events if e["event"] == "config_applied"]
    written = [e for e in events if e["event"] == "config_written"]
    assert len(written) >= 2
    # A version written during one of the last epochs may never be read: the training ended.
    settled = {e["version"] for e in written if e["epoch"] is None or e["epoch"] <= 57}
    assert settled <= {e["version"] for e in applied}
    assert {e["version"] for e in applied} <= {e["version"] for e in written}
    assert all(e["latency_s"] >= 0 for e in applied)
    assert "config_not_acknowledged" not in [e["event"] for e in events]
    assert "Training applied config version 2" in result.stderr.decode()


def test_chinese_console(tmp_path: Path) -> None:
    """--lang zh prints the seed's Chinese wording."""
    write_script(tmp_path, "train.py", CLIENT_TRAIN)
    result = run_cli(
        realtime_args(
            tmp_path, "--lang", "zh", "--min_epochs", "5", "--patience", "3", script_args=["--epochs", "20"]
        ),
        tmp_path,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "检测到性能停滞，调整损失权重..." in err
    assert "新配置: lambda_dol=" in err
    assert "训练完成，最终best_metric:" in err


IGNORES_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""

GRANDCHILDREN = """
import subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
print("pids", *[k.pid for k in kids], flush=True)
while True:
    time.sleep(0.1)
"""


def start_supervisor(tmp_path: Path, script: str, *extra: str) -> subprocess.Popen[bytes]:
    write_script(tmp_path, "train.py", script)
    argv = [
        sys.executable,
        "-m",
        "autotune_rt",
        "realtime",
        "--config_file",
        str(tmp_path / "c.json"),
        "--run_dir",
        str(tmp_path / "run"),
        *extra,
        "--",
        "python",
        "train.py",
    ]
    return subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def child_pid(tmp_path: Path) -> int:
    def started() -> int | None:
        try:
            events = read_events(tmp_path / "run")
        except (OSError, ValueError):
            return None
        return next((e["pid"] for e in events if e["event"] == "child_started"), None)

    return int(wait_for(started))


def test_sigterm_ignored_escalates_to_sigkill(tmp_path: Path) -> None:
    """A training that ignores SIGTERM is killed after the grace period; exit code is 128+9."""
    proc = start_supervisor(tmp_path, IGNORES_TERM, "--grace_period", "1")
    pid = child_pid(tmp_path)
    wait_for(lambda: b"ready" in (tmp_path / "run" / "train.log").read_bytes())
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert proc.returncode == 128 + signal.SIGKILL
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    exited = next(e for e in read_events(tmp_path / "run") if e["event"] == "child_exited")
    assert exited["signal"] == "SIGKILL"


def test_ctrl_c_leaves_no_grandchildren(tmp_path: Path) -> None:
    """After Ctrl-C (SIGINT) neither the training nor its grandchildren are alive."""
    proc = start_supervisor(tmp_path, GRANDCHILDREN, "--grace_period", "2")
    child_pid(tmp_path)
    line = wait_for(
        lambda: [
            ln for ln in (tmp_path / "run" / "train.log").read_bytes().splitlines() if ln.startswith(b"pids")
        ]
    )
    pids = [int(p) for p in line[0].split()[1:]]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGINT
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_child_killed_by_signal_exit_code(tmp_path: Path, sig: int) -> None:
    """A training killed by a signal makes the supervisor exit with 128+N and name the signal."""
    script = f"import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), {int(sig)})\n"
    write_script(tmp_path, "train.py", script)
    result = run_cli(
        realtime_args(tmp_path),
        tmp_path,
    )
    assert result.returncode == 128 + sig
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["signal"] == signal.Signals(sig).name
    assert summary["last_lines"] == ["bye"]


HOSTILE = r"""
import sys
out, err = sys.stdout.buffer, sys.stderr.buffer
out.write(b"x" * (3 << 20) + b"\n")
err.write(b"".join(b"\r%6d/100000 [" % i + b"#" * 10 + b"]" for i in range(0, 400 * 1024 // 20)))
out.write(b"bad utf8 \xff\xfe\xc3\n\x1b[31mred\x1b[0m\n")
for epoch in range(12):
    acc = "np.float64(0.%02d)" % (40 + min(epoch, 3))
    out.write(("Epoch %d[1.00s]: {'epoch': %d, 'acc1': %s, 'head_acc': np.float64(0.7), "
               "'tail_acc': tensor(0.2), 'ce': 1.0}\n" % (epoch, epoch, acc)).encode())
out.write(b"final line without newline")
"""


def test_hostile_output_passes_through_and_still_tunes(tmp_path: Path) -> None:
    """A 3 MiB line, a long \\r progress bar, invalid UTF-8 and numpy reprs pass through byte for byte."""
    write_script(tmp_path, "train.py", HOSTILE)
    result = run_cli(
        realtime_args(tmp_path, "--min_epochs", "4", "--patience", "3"),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    expected = subprocess.run([sys.executable, str(tmp_path / "train.py")], capture_output=True)
    assert result.stdout == expected.stdout
    # The supervisor's own console lines share stderr with the child's, anywhere between its chunks.
    assert strip_console(result.stderr) == expected.stderr
    log = (tmp_path / "run" / "train.log").read_bytes()
    assert len(log) == len(expected.stdout) + len(expected.stderr)
    events = read_events(tmp_path / "run")
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(12))
    assert any(e["event"] == "config_written" and e["reason"] == "poor_tail" for e in events)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no_such_option", "1"], "unrecognized arguments"),
        (["--patience", "0"], "--patience must be at least 1"),
        (["--check_interval", "-1"], "--check_interval must be a positive number"),
        (["--search_space", "missing.json"], "missing.json"),
        (["--metric_regex", "(unclosed"], "regex"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad option is a one-line error naming the problem, exit 2, and nothing is started."""
    write_script(tmp_path, "train.py", "print('started')\n")
    result = run_cli(
        ["realtime", "--config_file", str(tmp_path / "c.json"), *args, "--", "python", "train.py"], tmp_path
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "autotune_runs").exists()


def test_missing_training_script_is_exit_2(tmp_path: Path) -> None:
    """A training script that does not exist is a one-line error and exit 2 before anything happens."""
    result = run_cli(
        ["realtime", "--config_file", str(tmp_path / "c.json"), "--base_cmd", "nope.py"], tmp_path
    )
    assert result.returncode == 2
    assert "nope.py not found" in result.stderr.decode()
    assert not (tmp_path / "c.json").exists()


def test_second_supervisor_on_same_control_file_is_refused(tmp_path: Path) -> None:
    """A second supervisor on the same control file stops at once, naming the holder's pid."""
    proc = start_supervisor(tmp_path, IGNORES_TERM, "--grace_period", "1")
    try:
        child_pid(tmp_path)
        write_script(tmp_path, "other.py", "print('x')\n")
        result = run_cli(
            [
                "realtime",
                "--config_file",
                str(tmp_path / "c.json"),
                "--run_dir",
                str(tmp_path / "run2"),
                "--",
                "python",
                "other.py",
            ],
            tmp_path,
        )
        assert result.returncode == 2
        assert str(proc.pid) in result.stderr.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_python_dash_m_and_console_scripts_show_help(tmp_path: Path) -> None:
    """`python -m autotune_rt realtime --help` documents the options with their defaults."""
    result = run_cli(["realtime", "--help"], tmp_path)
    assert result.returncode == 0
    text = result.stdout.decode()
    for option in ("--max_trials", "--max-trials", "--patience", "--config_file", "default: 30.0"):
        assert option in text
    assert os.path.exists(REPO / "scripts" / "auto_tune.py")
