"""Tests for autotune_rt.demo.train: the bundled long-tailed training the demo supervises."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autotune_rt.demo import TRAIN_MODULE, TRAIN_SCRIPT
from autotune_rt.demo.train import (
    BIAS_LR_SCALE,
    LossConstants,
    Model,
    loss_and_grad,
    make_task,
    parse_args,
    train,
)

KEYS = ["epoch", "ce", "loss", "acc1", "head_acc", "tail_acc", "best_metric"]
EPOCH_LINE = re.compile(r"Epoch (\d+)\[(\d+\.\d\d)s\]: (\{.*\})")
# The seed's training options, verbatim from its README.
SEED_OPTIONS = shlex.split(
    "--task ICL --model ResNet1D_MoE --dataset mp20 --use_processed_npy --processed_data_dir /data/x "
    "--dataset_name ccdc_sg --rule_matrix_path /data/rule_matrix.csv --device 0 --loss_scheme scheme2 "
    "--use_contrast_scheme2 --use_adamw --adjust_lr_strategy"
)
SEED_WEIGHTS = shlex.split("--lambda_dol 0.5 --lambda_col 0.3 --lambda_hier 1.5 --lambda_scl 0.2")
TIMEOUT = 60


def demo(*options: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run the demo as a module to the end; return its output after checking it exited 0."""
    done = subprocess.run(
        [sys.executable, "-m", TRAIN_MODULE, *options],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def records(output: str) -> list[dict[str, Any]]:
    """The dicts of the output's epoch lines, read as the Python literals they are."""
    found = []
    for line in output.splitlines():
        match = EPOCH_LINE.fullmatch(line)
        if match:
            record = ast.literal_eval(match.group(3))
            assert record["epoch"] == int(match.group(1))
            found.append(record)
    return found


def write_control(path: Path, weights: dict[str, Any]) -> None:
    """Replace the control file atomically, as the supervisor does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(weights))
    os.replace(tmp, path)


def test_prints_the_seed_epoch_lines_and_finishes(tmp_path: Path) -> None:
    """Every epoch prints the seed's line with the seven metrics, and the run ends with the best metric."""
    control = tmp_path / "control.json"
    write_control(control, {"lambda_col": 0.5, "version": 1})
    output = demo("--epochs", "5", "--no_reload", env={"AUTOTUNE_CONFIG_FILE": str(control)})

    got = records(output)
    assert [r["epoch"] for r in got] == [0, 1, 2, 3, 4]
    best = 0.0
    for r in got:
        assert list(r) == KEYS
        assert type(r["epoch"]) is int
        assert all(type(r[k]) is float and round(r[k], 4) == r[k] for k in KEYS[1:])
        assert all(0.0 <= r[k] <= 1.0 for k in ("acc1", "head_acc", "tail_acc"))
        best = max(best, r["acc1"])
        assert r["best_metric"] == best
    assert output.splitlines()[-1] == f"Training finished, best_metric: {best:.4f}"
    assert "applied new weights" not in output  # --no_reload leaves the control file alone


def test_runs_as_a_file_path(tmp_path: Path) -> None:
    """``python <path>/train.py`` runs the same training from any directory."""
    done = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--epochs", "2", "--no_reload"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in records(done.stdout)] == [0, 1]


def test_accepts_and_ignores_the_seed_training_options() -> None:
    """The seed's command line runs as it is: unknown options are listed once and ignored."""
    output = demo(*SEED_OPTIONS, "--epochs", "2", *SEED_WEIGHTS, "--no_reload")
    lines = output.splitlines()
    assert lines[0] == "[demo] ignoring options meant for another training: " + " ".join(SEED_OPTIONS)
    assert "lambda_dol=0.5, lambda_col=0.3, lambda_hier=1.5, lambda_scl=0.2, max_grad_norm=1" in lines[1]
    assert len(records(output)) == 2


def test_applies_a_control_file_written_mid_run(tmp_path: Path) -> None:
    """A control file replaced while the run goes on changes the weights from the next epoch on."""
    control = tmp_path / "control.json"
    lines = []
    with subprocess.Popen(
        [sys.executable, "-m", TRAIN_MODULE, "--epochs", "30", "--epoch_time", "0.05", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "AUTOTUNE_CONFIG_FILE": str(control)},
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("Epoch 0["):
                    write_control(control, {"lambda_col": 0.5, "version": 1})
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            proc.kill()

    applied = [
        m for line in lines if (m := re.fullmatch(r"\[demo\] applied new weights at epoch (\d+): (.*)", line))
    ]
    assert len(applied) == 1
    assert applied[0].group(2) == "lambda_col 0.3->0.5"
    at = int(applied[0].group(1))
    assert lines[lines.index(applied[0].group(0)) + 1].startswith(f"Epoch {at}[")
    got = records("\n".join(lines))
    assert [r["epoch"] for r in got] == list(range(30))
    assert got[at]["acc1"] > got[0]["acc1"]  # the model kept what it had learnt
    ack = json.loads(control.with_name("control.json.ack").read_text())
    assert ack["version"] == 1
    assert ack["epoch"] == at


def test_more_lambda_col_lifts_tail_accuracy() -> None:
    """Raising lambda_col over the seed's default gives clearly better tail accuracy in a short run."""

    def tail_accuracy(*options: str) -> float:
        args, _ = parse_args(["--no_reload", "--epochs", "15", "--seed", "0", *options])
        history = train(args, emit=lambda line: None)
        return statistics.fmean(r["tail_acc"] for r in history[-5:])

    default = tail_accuracy()
    assert default < 0.3  # the seed's poor_tail regime
    assert tail_accuracy("--lambda_col", "1.0") > default + 0.05


def test_analytic_gradient_matches_finite_differences() -> None:
    """The hand-written gradient of the four-term loss is the numerical gradient."""
    task = make_task(n_classes=6, n_super=2, max_per_class=20, imbalance=10, seed=3)
    const = LossConstants.from_task(task, tau=1.3)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 6))
    y = rng.integers(0, 6, size=7)
    weights = {"lambda_dol": 0.5, "lambda_col": 0.3, "lambda_hier": 1.5, "lambda_scl": 0.2}

    _, grad = loss_and_grad(logits, y, weights, const)
    numeric = np.zeros_like(logits)
    eps = 1e-6
    for index in np.ndindex(logits.shape):
        bump = np.zeros_like(logits)
        bump[index] = eps
        up, _ = loss_and_grad(logits + bump, y, weights, const)
        down, _ = loss_and_grad(logits - bump, y, weights, const)
        numeric[index] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_clipping_bounds_the_gradient_norm() -> None:
    """A step with a huge gradient moves the parameters as if its norm were max_grad_norm."""
    x = np.ones((4, 3))
    model = Model(3, np.zeros(2))
    grad_logits = np.full((4, 2), 100.0)
    unclipped = float(np.sqrt(np.sum((x.T @ grad_logits) ** 2) + np.sum(grad_logits.sum(axis=0) ** 2)))

    norm = model.step(x, grad_logits, lr=1.0, max_grad_norm=0.5, weight_decay=0.0)

    assert norm == pytest.approx(unclipped)
    # the first step moves by lr times the clipped gradient (the bias with its larger step)
    moved = np.sqrt(np.sum(model.weight**2) + np.sum((model.bias / BIAS_LR_SCALE) ** 2))
    assert moved == pytest.approx(0.5)


def test_task_is_long_tailed_and_reproducible() -> None:
    """The default task has 600 down to 6 samples per class, head and tail thirds, and repeats per seed."""
    task = make_task(seed=5)
    again = make_task(seed=5)
    assert task.counts[0] == 600 and task.counts[-1] == 6
    assert list(np.diff(task.counts) <= 0) == [True] * 23
    assert task.head.sum() == task.tail.sum() == 8
    assert task.head[:8].all() and task.tail[-8:].all()
    assert (np.bincount(task.y_test) == 100).all()
    np.testing.assert_array_equal(task.x_train, again.x_train)
    assert not np.array_equal(task.x_train[:10], make_task(seed=6).x_train[:10])


@pytest.mark.parametrize("options", [["--n_classes", "2"], ["--imbalance", "0.5"], ["--batch_size", "0"]])
def test_rejects_impossible_task_options(options: list[str]) -> None:
    """Options that cannot make a task are a usage error (exit 2), not a crash mid-run."""
    with pytest.raises(SystemExit) as exc:
        parse_args(options)
    assert exc.value.code == 2
