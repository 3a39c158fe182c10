#!/usr/bin/env python3
"""Measure the bundled demo under fixed loss weights and write the table into docs/demo-weights.md.

Usage: ``python scripts/weights_table.py [--seeds 3] [--epochs 60]``. Every setting is trained
with ``--no_reload`` on seeds ``0..N-1``; "final" is the mean of the last five epochs of a run,
which smooths the epoch-to-epoch noise of SGD. The markdown table replaces whatever stands
between the markers in the markdown file, and the numbers go to a JSON file next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Same reason as in the demo: tiny matrices, so BLAS threads would only add contention.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

try:
    from autotune_rt.demo import train as demo
    from autotune_rt.diagnose import diagnose
except ImportError:  # run from a checkout without installing: use the package beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from autotune_rt.demo import train as demo
    from autotune_rt.diagnose import diagnose

__all__ = ["SETTINGS", "main", "measure", "render"]

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- weights-table:start -->"
END = "<!-- weights-table:end -->"
METRICS = ("head_acc", "tail_acc", "acc1", "best_metric", "loss")
# The epochs averaged into a run's "final" numbers.
LAST = 5

SEED_WEIGHTS = {
    "lambda_dol": 0.5,
    "lambda_col": 0.3,
    "lambda_hier": 1.5,
    "lambda_scl": 0.2,
    "max_grad_norm": 1.0,
}

# (name, changes from the seed's weights). The first six stay on the seed's search grid.
SETTINGS: tuple[tuple[str, dict[str, float]], ...] = (
    ("seed default", {}),
    ("one poor_tail step", {"lambda_col": 0.4, "lambda_scl": 0.25}),
    ("two poor_tail steps (grid edge)", {"lambda_col": 0.5, "lambda_scl": 0.3}),
    ("more lambda_col", {"lambda_col": 0.5}),
    ("more lambda_scl", {"lambda_scl": 0.3}),
    ("tail-leaning grid corner", {"lambda_dol": 0.3, "lambda_col": 0.5, "lambda_scl": 0.3}),
    ("head-leaning grid corner", {"lambda_dol": 0.7, "lambda_col": 0.1, "lambda_scl": 0.1}),
    ("high lambda_hier", {"lambda_hier": 2.0}),
    ("no lambda_hier", {"lambda_hier": 0.0}),
    ("max_grad_norm 0.5", {"max_grad_norm": 0.5}),
    ("max_grad_norm 2.0", {"max_grad_norm": 2.0}),
    ("far too much lambda_col", {"lambda_col": 3.0}),
    ("far too much lambda_scl", {"lambda_scl": 2.0}),
)


def measure(weights: dict[str, float], seeds: Sequence[int], epochs: int) -> list[dict[str, float]]:
    """Train the demo once per seed with fixed ``weights``.

    Args:
        weights: Every name in the demo's ``LOSS_WEIGHTS``.
        seeds: The seeds (each one is a different task and batch order).
        epochs: Epochs per run.

    Returns:
        Per seed, the mean of each metric over the run's last epochs.
    """
    runs = []
    for seed in seeds:
        options = ["--no_reload", "--seed", str(seed), "--epochs", str(epochs)]
        for name, value in weights.items():
            options += [f"--{name}", str(value)]
        args, _ = demo.parse_args(options)
        history = demo.train(args, emit=lambda line: None)
        tail = history[-LAST:]
        runs.append({m: round(statistics.fmean(r[m] for r in tail), 4) for m in METRICS})
    return runs


def _summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population) standard deviation of each metric over the runs."""
    return {
        m: {
            "mean": round(statistics.fmean(r[m] for r in runs), 4),
            "std": round(statistics.pstdev(r[m] for r in runs), 4),
        }
        for m in METRICS
    }


def render(rows: list[dict[str, Any]], seeds: int, epochs: int) -> str:
    """Return the markdown table of ``rows`` (as stored in the JSON file)."""
    names = ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl", "max_grad_norm")
    head = ["setting", *names, "head_acc", "tail_acc", "acc1 (balanced)", "seed rule says"]
    lines = [
        f"Final accuracy on the balanced test set, mean ± std over {seeds} seeds, {epochs} epochs "
        f'each, weights fixed (`--no_reload`); "final" is the mean of the last {LAST} epochs.',
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(head) - 2) + ["---"]) + "|",
    ]
    for row in rows:
        stats = row["summary"]
        cells = [row["name"], *(f"{row['weights'][n]:g}" for n in names)]
        cells += [f"{stats[m]['mean']:.3f} ± {stats[m]['std']:.3f}" for m in ("head_acc", "tail_acc", "acc1")]
        cells.append(f"`{row['diagnosis']}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _replace_between_markers(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers {START} ... {END} not found; add them where the table goes")
    path.write_text(text[: start + len(START)] + "\n" + table + "\n" + text[end:], encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every setting, print the table, and write it into the docs.

    Args:
        argv: Options; None reads ``sys.argv``.

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting (default: 3)")
    parser.add_argument("--epochs", type=int, default=60, help="epochs per run (default: 60)")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "demo-weights.md")
    parser.add_argument("--json", type=Path, default=None, help="default: the markdown path with .json")
    parser.add_argument("--no_write", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name, changes in SETTINGS:
        weights = {**SEED_WEIGHTS, **changes}
        runs = measure(weights, seeds, args.epochs)
        summary = _summary(runs)
        verdict = diagnose({m: s["mean"] for m, s in summary.items()}).problem
        rows.append(
            {"name": name, "weights": weights, "summary": summary, "diagnosis": verdict, "runs": runs}
        )
        print(f"  {name}: acc1 {summary['acc1']['mean']:.3f}", file=sys.stderr, flush=True)
    table = render(rows, args.seeds, args.epochs)
    print(table)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if not args.no_write:
        _replace_between_markers(args.markdown, table)
        record = {"seeds": seeds, "epochs": args.epochs, "final": f"mean of the last {LAST} epochs"}
        json_path = args.json or args.markdown.with_suffix(".json")
        json_path.write_text(json.dumps({**record, "settings": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
