"""End-to-end: the adaptive strategy rolls a harmful change back mid-run through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import read_events, run_cli, write_script

# Its tail accuracy is poor, so the seed's poor_tail rule raises lambda_col, but its balanced
# accuracy falls as lambda_col rises: every such change is a loser. It reads the control file
# through the client helper, which acknowledges each version with the epoch it applied it.
HARMED_BY_COL = """
    import argparse, time
    from autotune_rt.client import ConfigReloader

    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--lambda_dol", type=float, default=0.5)
    p.add_argument("--lambda_col", type=float, default=0.3)
    p.add_argument("--lambda_hier", type=float, default=1.5)
    p.add_argument("--lambda_scl", type=float, default=0.2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--epoch_time", type=float, default=0.05)
    args, _unknown = p.parse_known_args()
    reloader = ConfigReloader()
    for epoch in range(args.epochs):
        reloader.apply(args, epoch=epoch)
        time.sleep(args.epoch_time)
        acc1 = round(0.9 - args.lambda_col, 4)
        metrics = {"epoch": epoch, "ce": 1.0, "acc1": acc1, "head_acc": 0.7, "tail_acc": 0.2,
                   "lambda_col": args.lambda_col}
        print(f"Epoch {epoch}[{args.epoch_time:.2f}s]: {metrics}", flush=True)
"""

# The same training with the seed's own snippet (no acknowledgement). It saves a "checkpoint"
# after printing, so a change written on its metric line is read at the start of the next
# epoch: the epoch-after-the-write rule the supervisor assumes without acknowledgements.
SEED_SNIPPET = (
    HARMED_BY_COL.replace("    from autotune_rt.client import ConfigReloader\n", "    import json, os\n")
    .replace("    reloader = ConfigReloader()\n", "")
    .replace(
        "        reloader.apply(args, epoch=epoch)\n",
        "        config_file = os.environ.get('AUTOTUNE_CONFIG_FILE', '/tmp/auto_tune_config.json')\n"
        "        if os.path.exists(config_file):\n"
        "            with open(config_file, 'r') as f:\n"
        "                config = json.load(f)\n"
        "            args.lambda_col = config.get('lambda_col', args.lambda_col)\n",
    )
    .replace(", flush=True)\n", ", flush=True)\n        time.sleep(0.3)  # checkpoint\n")
)


def run_adaptive(tmp_path: Path, script: str, *extra: str) -> tuple[Path, str, list[dict[str, Any]]]:
    write_script(tmp_path, "train.py", script)
    run_dir = tmp_path / "run"
    options = ["realtime", "--min_epochs", "5", "--patience", "3", "--max_adjustments", "1", "--seed", "1"]
    paths = ["--config_file", str(tmp_path / "control.json"), "--run_dir", str(run_dir)]
    result = run_cli(
        [*options, *paths, *extra, "--", "python", "train.py"],
        tmp_path,
        timeout=90,
    )
    err = result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    return run_dir, err, read_events(run_dir)


def used_col(events: list[dict[str, Any]]) -> list[float]:
    """The lambda_col the training printed for each epoch: what it really ran with."""
    return [e["metrics"]["lambda_col"] for e in events if e["event"] == "epoch"]


@pytest.mark.parametrize("script", [HARMED_BY_COL, SEED_SNIPPET], ids=["acknowledged", "seed-snippet"])
def test_harmful_change_is_rolled_back_and_the_run_ends_on_the_better_weights(
    tmp_path: Path, script: str
) -> None:
    """poor_tail raises lambda_col, acc1 falls, it is judged worse, and the last epochs run the old value."""
    run_dir, err, events = run_adaptive(tmp_path, script)
    written = [e for e in events if e["event"] == "config_written"]
    assert [e["reason"] for e in written] == ["initial", "poor_tail", "rollback"]
    assert written[1]["new"]["lambda_col"] == 0.4
    assert written[2]["new"] == written[0]["new"]

    [verdict] = [e for e in events if e["event"] == "verdict"]
    assert verdict["outcome"] == "worse"
    assert verdict["version"] == written[1]["version"]
    assert (verdict["window_best"], verdict["previous_best"]) == (0.5, 0.6)
    assert verdict["window"][1] - verdict["window"][0] == 2  # patience epochs

    [rollback] = [e for e in events if e["event"] == "rollback"]
    assert rollback["level"] == "warning"
    assert rollback["old"]["lambda_col"] == 0.4 and rollback["new"]["lambda_col"] == 0.3
    assert rollback["evidence"]["outcome"] == "worse"

    used = used_col(events)
    assert used[0] == 0.3 and 0.4 in used
    # The harmful value ran exactly the judged window (no stale epoch in it), then never again.
    first, last = verdict["window"]
    assert used[first : last + 1] == [0.4] * 3
    assert 0.4 not in used[last + 3 :]
    assert used[-5:] == [0.3] * 5

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == "adaptive"
    assert [d["kind"] for d in summary["decisions"]] == ["adjust", "rollback"]
    assert [v["outcome"] for v in summary["verdicts"]] == ["worse"]
    assert summary["final_weights"]["lambda_col"] == 0.3
    assert summary["best_metric"] == 0.6
    assert f"Config version {verdict['version']} judged worse" in err
    assert "rolling back to the best-known weights" in err


def test_seed_strategy_keeps_the_harmful_change(tmp_path: Path) -> None:
    """--strategy seed judges nothing: the raised lambda_col stays to the end of the run."""
    _run_dir, err, events = run_adaptive(tmp_path, HARMED_BY_COL, "--strategy", "seed")
    kinds = {e["event"] for e in events}
    assert "verdict" not in kinds and "rollback" not in kinds
    used = used_col(events)
    assert used[0] == 0.3 and used[-5:] == [0.4] * 5
    assert "judged" not in err


def test_batch_records_each_trials_verdict_against_the_best(tmp_path: Path) -> None:
    """Batch mode judges the harmful trial worse than the best one, and never reruns its weights."""
    write_script(tmp_path, "train.py", HARMED_BY_COL)
    run_dir = tmp_path / "batch"
    options = ["batch", "--max_trials", "3", "--min_epochs", "5", "--patience", "3", "--seed", "1"]
    paths = ["--run_dir", str(run_dir), "--config_file", str(tmp_path / "unused.json")]
    result = run_cli([*options, *paths, "--", "python", "train.py", "--epochs", "8"], tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    finished = [e for e in read_events(run_dir) if e["event"] == "trial_finished"]
    assert [e["trial"] for e in finished] == [1, 2, 3]
    assert finished[0]["verdict"] is None  # nothing to compare the first trial to
    second = finished[1]["verdict"]
    assert second == {"outcome": "worse", "best_metric": 0.5, "reference_trial": 1, "reference_best": 0.6}
    summary = json.loads((run_dir / "summary.json").read_text())
    trials = summary["trials"]
    assert trials[1]["weights"]["lambda_col"] == 0.4 and trials[1]["verdict"] == second
    assert trials[2]["verdict"]["reference_trial"] == 1
    assert trials[2]["weights"] not in (trials[0]["weights"], trials[1]["weights"])
    assert summary["best_trial"] == 1
