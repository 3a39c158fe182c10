"""Tests for autotune_rt.batch that need no real training: signals between trials, the table."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from autotune_rt.batch import BatchRunner, Trial, trial_command
from autotune_rt.channel import ControlFile
from autotune_rt.settings import Settings
from autotune_rt.space import DEFAULT_WEIGHTS


class SignalledBetweenTrials(BatchRunner):
    """A batch whose first "trial" finishes at once and then gets a real Ctrl-C."""

    async def _run_trial(self, number: int, total: int, control: ControlFile | None) -> None:
        weights = dict(self.next_weights)
        trial = Trial(number, weights, ["train.py"], status="ok", best_metric=0.5, best_epoch=3, epochs=4)
        self.trials.append(trial)
        self.next_weights = {**weights, "lambda_col": 0.4}
        os.kill(os.getpid(), signal.SIGINT)  # no trial runs now: the batch itself must catch it
        await asyncio.sleep(0.05)


def test_ctrl_c_between_trials_ends_the_batch_with_its_summary(tmp_path: Path) -> None:
    """A SIGINT between two trials stops the batch (exit 130) and still writes the summary."""
    settings = Settings(
        command=[sys.executable, "train.py"],
        weights=dict(DEFAULT_WEIGHTS),
        mode_name="batch",
        max_trials=3,
        run_dir=tmp_path / "run",
        write_config=False,
    )
    runner = SignalledBetweenTrials(settings)
    assert asyncio.run(runner.run()) == 130
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [t["number"] for t in summary["trials"]] == [1]
    assert summary["interrupted"] is True
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "signal_received" and e.get("between_trials") for e in events)


@pytest.mark.parametrize(
    ("with_grad_norm", "expected"),
    [
        (False, ["python", "train.py", "--lambda_dol", "0.6", "--lambda_col", "0.4"]),
        (
            True,
            ["python", "train.py", "--lambda_dol", "0.6", "--lambda_col", "0.4", "--max_grad_norm", "1.5"],
        ),
    ],
)
def test_trial_command_appends_the_weights(with_grad_norm: bool, expected: list[str]) -> None:
    """A trial's weights go after the training's own options; max_grad_norm only when asked."""
    weights = {"lambda_dol": 0.6, "lambda_col": 0.4, "max_grad_norm": 1.5}
    assert trial_command(["python", "train.py"], weights, with_grad_norm=with_grad_norm) == expected
