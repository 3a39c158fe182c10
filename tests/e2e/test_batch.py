"""End-to-end: batch mode reruns real trainings whose metrics respond to the weights."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import (
    REPO,
    SEED_BATCH_OPTIONS,
    SEED_TRAIN,
    cli_env,
    read_events,
    run_cli,
    wait_for,
    write_script,
)

SEED_BATCH = shlex.split(SEED_BATCH_OPTIONS)

# Batch trainings take their weights from the command line only.
BATCH_ENV = cli_env(SEED_CONFIG_FILE="/nonexistent/autotune-test.json")


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def only_run_dir(cwd: Path) -> Path:
    runs = list((cwd / "autotune_runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_seed_batch_command_line_verbatim(tmp_path: Path) -> None:
    """The seed's batch command line runs 5 trials and finds the best lambda_col."""
    write_script(tmp_path, "train.py", SEED_TRAIN)
    result = run_cli(
        [str(REPO / "scripts" / "auto_tune.py"), *SEED_BATCH], tmp_path, timeout=120, env=BATCH_ENV
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err[-3000:]
    run_dir = only_run_dir(tmp_path)
    summary = summary_of(run_dir)
    trials = summary["trials"]
    assert len(trials) == 5
    assert [t["number"] for t in trials] == [1, 2, 3, 4, 5]
    assert all(t["status"] == "ok" and t["epochs"] == 50 for t in trials)
    # lambda_col is what this training rewards; the best trial has the grid's top value.
    assert summary["best_weights"]["lambda_col"] == 0.5
    assert summary["best_metric"] == max(t["best_metric"] for t in trials)
    assert len({json.dumps(t["weights"], sort_keys=True) for t in trials}) == 5  # never the same twice
    assert trials[1]["weights"]["lambda_col"] == 0.4  # poor_tail raised it, as the seed says
    # Trial 2 was better, so its own stagnation diagnosis moves on from its weights.
    assert (trials[2]["weights"]["lambda_col"], trials[2]["weights"]["lambda_scl"]) == (0.5, 0.3)
    candidates = [e for e in read_events(run_dir) if e["event"] == "candidate_config"]
    assert all(e["old"] == trials[e["trial"] - 1]["weights"] for e in candidates)
    assert "--lambda_col 0.4" in " ".join(trials[1]["command"])
    for i in range(1, 6):
        assert (run_dir / f"trial_{i:03d}" / "train.log").read_bytes().count(b"Epoch ") == 50
    assert "Starting trial 1/5" in err and "Training command: " in err
    assert "Stagnation detected, adjusting loss weights..." in err
    assert "Training finished, final best_metric: " in err
    best = json.loads((run_dir / "best_config.json").read_text())
    assert best["lambda_col"] == 0.5 and "version" in best
    assert "--lambda_col 0.5" in summary["rerun_command"]
    events = read_events(run_dir)
    assert all("trial" in e for e in events if e["event"] in ("epoch", "trial_started", "diagnosis"))


FAILS_AT_04 = SEED_TRAIN.replace(
    "\nbest = 0.0\n",
    "\nimport sys\nif args.lambda_col == 0.4 and args.lambda_scl == 0.25:\n"
    "    print('CUDA out of memory', flush=True)\n    sys.exit(3)\nbest = 0.0\n",
)
assert FAILS_AT_04 != SEED_TRAIN


def test_failed_trial_is_recorded_and_batch_continues(tmp_path: Path) -> None:
    """A trial that exits 3 is recorded with its exit code and last lines; the batch goes on."""
    write_script(tmp_path, "train.py", FAILS_AT_04)
    result = run_cli(
        [
            "batch",
            "--max_trials",
            "3",
            "--min_epochs",
            "5",
            "--patience",
            "3",
            "--seed",
            "1",
            "--run_dir",
            str(tmp_path / "run"),
            "--",
            "python",
            "train.py",
            "--epochs",
            "20",
        ],
        tmp_path,
        env=BATCH_ENV,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    trials = summary_of(tmp_path / "run")["trials"]
    assert [t["status"] for t in trials] == ["ok", "failed", "ok"]
    assert trials[1]["exit_code"] == 3 and trials[1]["last_lines"] == ["CUDA out of memory"]
    assert trials[2]["weights"] != trials[0]["weights"]


def test_stop_on_stagnation_saves_epochs(tmp_path: Path) -> None:
    """--stop_on_stagnation ends a stalled trial early instead of running all its epochs."""
    write_script(tmp_path, "train.py", SEED_TRAIN)
    result = run_cli(
        [
            "batch",
            "--max_trials",
            "2",
            "--min_epochs",
            "5",
            "--patience",
            "3",
            "--stop_on_stagnation",
            "--grace_period",
            "5",
            "--run_dir",
            str(tmp_path / "run"),
            "--",
            "python",
            "train.py",
            "--epochs",
            "200",
        ],
        tmp_path,
        env=BATCH_ENV,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    trials = summary_of(tmp_path / "run")["trials"]
    assert all(t["status"] == "stopped_early" for t in trials)
    assert all(t["epochs"] < 20 for t in trials)


def test_ctrl_c_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """Ctrl-C during trial 3, then --resume, gives the same trials as an uninterrupted batch."""
    write_script(tmp_path, "train.py", SEED_TRAIN)
    common = ["--max_trials", "4", "--min_epochs", "5", "--patience", "3", "--seed", "11"]
    train = ["--", "python", "train.py", "--epochs", "30", "--epoch_time", "0.05"]
    full = run_cli(
        ["batch", *common, "--run_dir", str(tmp_path / "full"), *train], tmp_path, env=BATCH_ENV, timeout=120
    )
    assert full.returncode == 0, full.stderr.decode()[-3000:]

    argv = [sys.executable, "-m", "autotune_rt", "batch", *common, "--run_dir", str(tmp_path / "cut"), *train]
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=BATCH_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )

    def in_trial_3() -> bool:
        log = tmp_path / "cut" / "trial_003" / "train.log"
        return log.exists() and b"Epoch 2[" in log.read_bytes()

    wait_for(in_trial_3, timeout=60)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()[-2000:]
    partial = summary_of(tmp_path / "cut")
    assert [t["status"] for t in partial["trials"]] == ["ok", "ok", "interrupted"]

    resumed = run_cli(
        ["batch", *common, "--resume", str(tmp_path / "cut"), *train], tmp_path, env=BATCH_ENV, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]

    def key(summary: dict[str, Any]) -> list[Any]:
        return [(t["weights"], t["best_metric"], t["epochs"], t["status"]) for t in summary["trials"]]

    assert key(summary_of(tmp_path / "cut")) == key(summary_of(tmp_path / "full"))


def test_progress_shows_trial_epoch_and_time_left(tmp_path: Path) -> None:
    """Batch mode shows trial i/N, epoch e/E (from the training's --epochs) and the time left."""
    write_script(tmp_path, "train.py", SEED_TRAIN)
    result = run_cli(
        [
            "batch",
            "--max_trials",
            "2",
            "--check_interval",
            "0.2",
            "--run_dir",
            str(tmp_path / "run"),
            "--",
            "python",
            "train.py",
            "--epochs",
            "30",
            "--epoch_time",
            "0.05",
        ],
        tmp_path,
        env=BATCH_ENV,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    assert re.search(r"trial 1/2: epoch \d+/30, about \d+m\d\ds left", err)
    assert re.search(r"trial 2/2: epoch \d+/30, about \d+m\d\ds left", err)
    progress = [e for e in read_events(tmp_path / "run") if e["event"] == "progress"]
    assert progress and all(e["epochs"] == 30 and e["left_s"] >= 0 for e in progress)


def test_exhausted_space_is_said_and_the_batch_stops(tmp_path: Path) -> None:
    """With only two points in the search space, the batch runs both, says so and stops early."""
    write_script(tmp_path, "train.py", SEED_TRAIN)
    space = tmp_path / "space.json"
    space.write_text(
        json.dumps(
            {
                "lambda_dol": [0.5],
                "lambda_col": [0.3, 0.4],
                "lambda_hier": [1.5],
                "lambda_scl": [0.2],
                "max_grad_norm": [1.0],
            }
        )
    )
    result = run_cli(
        [
            "batch",
            "--max_trials",
            "5",
            "--min_epochs",
            "3",
            "--patience",
            "2",
            "--search_space",
            str(space),
            "--run_dir",
            str(tmp_path / "run"),
            "--",
            "python",
            "train.py",
            "--epochs",
            "8",
            "--epoch_time",
            "0",
        ],
        tmp_path,
        env=BATCH_ENV,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    summary = summary_of(tmp_path / "run")
    assert [t["weights"]["lambda_col"] for t in summary["trials"]] == [0.3, 0.4]
    assert summary["space_exhausted"] is True
    assert "Every configuration near the best one was already tried" in err
