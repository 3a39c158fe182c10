#!/usr/bin/env python3
"""Compare the tuning strategies on the bundled demo and write the table into docs/strategy.md.

Usage: ``python scripts/compare_strategies.py [--seeds 3] [--epochs 60]``. For seeds
``0..N-1`` (each seed is a different task and batch order) it measures:

* the demo with its fixed initial weights (the seed's defaults), trained in-process;
* ``--strategy seed`` and ``--strategy adaptive``: the demo supervised by the real realtime
  supervisor (``run_realtime``, the settings of ``autotune-rt demo``, quiet sinks), with the
  training as a child process that hot-reloads the control file;
* the reference ceiling: every fixed point of a coarse grid (by default ``lambda_dol`` x
  ``lambda_col`` x ``lambda_scl`` on the seed's grids, the other weights at their defaults),
  trained in-process; the point with the best mean is "the grid optimum".

The optimised metric is the balanced accuracy ``acc1``; a run's result is its best ``acc1``
(what the demo prints as ``best_metric`` at the end). The tuned runs pass ``--metric acc1``
because the demo's own default metric, ``best_metric``, is a running maximum that can never
get worse, so no change could ever be judged ``worse`` on it; the seed strategy decides
exactly the same on either (``best_metric`` improves exactly when ``acc1`` beats its
maximum). The mean ``acc1`` of the last five epochs is reported too: where the run ends.
The table goes between the markers in the markdown file and every number into a JSON file.
"""

from __future__ import annotations

import os

# Same reason as in the demo: tiny matrices, so BLAS threads would only add contention.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

try:
    from autotune_rt.console import Console
    from autotune_rt.demo import train as demo
    from autotune_rt.demo.run import REALTIME_EPOCHS, demo_settings
    from autotune_rt.space import DEFAULT_GRIDS, DEFAULT_WEIGHTS
    from autotune_rt.supervisor import run_realtime
except ImportError:  # run from a checkout without installing: use the package beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from autotune_rt.console import Console
    from autotune_rt.demo import train as demo
    from autotune_rt.demo.run import REALTIME_EPOCHS, demo_settings
    from autotune_rt.space import DEFAULT_GRIDS, DEFAULT_WEIGHTS
    from autotune_rt.supervisor import run_realtime

__all__ = ["fixed_run", "main", "render", "tuned_run"]

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- strategy-comparison:start -->"
END = "<!-- strategy-comparison:end -->"
# The epochs averaged into a run's "last epochs" number.
LAST = 5
GRID_AXES = ("lambda_dol", "lambda_col", "lambda_scl")
STRATEGIES = ("seed", "adaptive")


def _result(accs: Sequence[float]) -> dict[str, float]:
    finite = [a for a in accs if math.isfinite(a)]
    return {"best": max(finite), "last": round(statistics.fmean(accs[-LAST:]), 4)}


def fixed_run(weights: dict[str, float], seed: int, epochs: int) -> dict[str, float]:
    """Train the demo in-process with fixed *weights*; return its best and last-epochs acc1."""
    options = ["--no_reload", "--seed", str(seed), "--epochs", str(epochs)]
    for name, value in weights.items():
        options += [f"--{name}", str(value)]
    args, _ = demo.parse_args(options)
    history = demo.train(args, emit=lambda line: None)
    return _result([record["acc1"] for record in history])


def tuned_run(strategy: str, seed: int, epochs: int, epoch_time: float, workdir: Path) -> dict[str, Any]:
    """Run the demo under the realtime supervisor with *strategy*; return its results.

    Returns:
        ``best`` and ``last`` acc1, the decisions and rollbacks made, the verdicts' outcomes
        and the final weights.
    """
    run_dir = workdir / f"{strategy}-{seed}"
    namespace = argparse.Namespace(
        batch=False,
        epochs=epochs,
        epoch_time=epoch_time,
        trials=1,
        seed=seed,
        run_dir=run_dir,
        strategy=strategy,
        lang="en",
    )
    settings = dataclasses.replace(demo_settings(namespace), metric="acc1")
    settings.validate()
    with open(os.devnull, "wb") as sink:
        code = run_realtime(settings, stdout=sink, stderr=sink, console=Console("en", io.StringIO()))
    if code != 0:
        raise SystemExit(f"the {strategy} run of seed {seed} failed (exit {code}); see {run_dir}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    accs = [float(e["metrics"]["acc1"]) for e in events if e["event"] == "epoch"]
    summary = json.loads((run_dir / "summary.json").read_text())
    kinds = [d["kind"] for d in summary["decisions"]]
    return {
        **_result(accs),
        "changes": kinds.count("adjust"),
        "rollbacks": kinds.count("rollback"),
        "verdicts": [v["outcome"] for v in summary["verdicts"]],
        "final_weights": summary["final_weights"],
    }


def _grid_point(job: tuple[dict[str, float], int, int]) -> dict[str, float]:
    return fixed_run(*job)


def _stats(values: Sequence[float]) -> dict[str, float]:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(spread, 4)}


def _machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def render(data: dict[str, Any]) -> str:
    """Return the markdown table (and its caption) of a comparison stored as JSON."""
    rows = data["rows"]
    machine = data["machine"]
    optimum = ", ".join(
        f"{k}={v:g}" for k, v in data["grid_optimum"]["weights"].items() if k in data["grid_axes"]
    )
    lines = [
        f"Command: `{data['command']}` on {machine['cpu']} ({machine['nproc']} cores, Python "
        f"{machine['python']}); {data['seconds']:.0f} s.",
        "",
        f"The demo, {data['epochs']} epochs per run (`--epoch_time {data['epoch_time']:g}`), seeds "
        f"0..{len(data['seeds']) - 1}; mean ± std over the seeds. *best acc1* is the optimised metric at "
        f"the end of the run (its best epoch, the demo's final `best_metric`); *last {LAST}* is the mean "
        "acc1 of the last five epochs. *gap* is the share of the difference between the initial "
        "weights and the grid optimum that a run recovers. The grid: "
        + " x ".join(f"`{axis}`" for axis in data["grid_axes"])
        + " on the seed's grids, the other weights at their defaults, "
        f"{data['grid_epochs']} epochs.",
        "",
        f"| run | best acc1 | gap | last {LAST} acc1 | gap | changes | rollbacks |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        best, last = row["best"], row["last"]
        cells = [
            row["name"],
            f"{best['mean']:.4f} ± {best['std']:.4f}",
            f"{row['gap_best']:.0%}",
            f"{last['mean']:.4f} ± {last['std']:.4f}",
            f"{row['gap_last']:.0%}",
            "–" if row.get("changes") is None else f"{row['changes']:.1f}",
            "–" if row.get("rollbacks") is None else f"{row['rollbacks']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    paired = data["paired"]
    lines += [
        "",
        f"Grid optimum: {optimum}. Adaptive minus seed, paired by seed: best acc1 "
        f"{paired['best']['mean']:+.4f} ± {paired['best']['std']:.4f}, last {LAST} acc1 "
        f"{paired['last']['mean']:+.4f} ± {paired['last']['std']:.4f}.",
    ]
    return "\n".join(lines)


def _replace_between_markers(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers {START} ... {END} not found; add them where the table goes")
    path.write_text(text[: start + len(START)] + "\n" + table + "\n" + text[end:], encoding="utf-8")


def _row(
    name: str, runs: list[dict[str, Any]], base: dict[str, float], top: dict[str, float]
) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "runs": runs}
    for measure in ("best", "last"):
        values = [r[measure] for r in runs]
        row[measure] = _stats(values)
        gap = top[measure] - base[measure]
        row[f"gap_{measure}"] = (statistics.fmean(values) - base[measure]) / gap if gap else float("nan")
    if "changes" in runs[0]:
        row["changes"] = statistics.fmean(r["changes"] for r in runs)
        row["rollbacks"] = statistics.fmean(r["rollbacks"] for r in runs)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print the table, and write it into the docs.

    Args:
        argv: Options; None reads ``sys.argv``.

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per run (default: 3)")
    parser.add_argument("--epochs", type=int, default=REALTIME_EPOCHS, help="epochs per run (default: 60)")
    parser.add_argument(
        "--grid_epochs", type=int, default=None, help="epochs per grid point (default: --epochs)"
    )
    parser.add_argument(
        "--epoch_time",
        type=float,
        default=0.05,
        help="pad each supervised epoch to this many seconds, so the supervisor keeps up (default: 0.05)",
    )
    parser.add_argument("--grid", default=",".join(GRID_AXES), help="comma-separated weights the grid spans")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the grid")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "strategy.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "strategy-comparison.json")
    parser.add_argument("--no_write", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    axes = tuple(args.grid.split(","))
    grid_epochs = args.grid_epochs or args.epochs
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {text}", file=sys.stderr, flush=True)

    initial = dict(DEFAULT_WEIGHTS)
    fixed = [fixed_run(initial, seed, args.epochs) for seed in seeds]
    say(f"fixed initial weights: best acc1 {_stats([r['best'] for r in fixed])['mean']:.4f}")

    points = [
        dict(zip(axes, values, strict=True))
        for values in itertools.product(*(DEFAULT_GRIDS[a] for a in axes))
    ]
    jobs = [({**initial, **point}, seed, grid_epochs) for point in points for seed in seeds]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(_grid_point, jobs, chunksize=4))
    grid: list[dict[str, Any]] = []
    for index, point in enumerate(points):
        runs = results[index * len(seeds) : (index + 1) * len(seeds)]
        grid.append(
            {"weights": {**initial, **point}, "runs": runs, "best": _stats([r["best"] for r in runs])}
        )
    optimum = max(grid, key=lambda g: g["best"]["mean"])
    say(f"grid of {len(points)} points: optimum {optimum['weights']} best acc1 {optimum['best']['mean']:.4f}")
    if grid_epochs != args.epochs:  # the ceiling is compared at the same length as the others
        optimum["runs"] = [fixed_run(optimum["weights"], seed, args.epochs) for seed in seeds]

    tuned: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="compare-strategies-") as workdir:
        for strategy in STRATEGIES:
            tuned[strategy] = [
                tuned_run(strategy, seed, args.epochs, args.epoch_time, Path(workdir)) for seed in seeds
            ]
            say(
                f"--strategy {strategy}: best acc1 {_stats([r['best'] for r in tuned[strategy]])['mean']:.4f}"
            )

    base = {m: statistics.fmean(r[m] for r in fixed) for m in ("best", "last")}
    top = {m: statistics.fmean(r[m] for r in optimum["runs"]) for m in ("best", "last")}
    rows = [
        _row("fixed initial weights", fixed, base, top),
        _row("`--strategy seed`", tuned["seed"], base, top),
        _row("`--strategy adaptive` (default)", tuned["adaptive"], base, top),
        _row("grid optimum, fixed", optimum["runs"], base, top),
    ]
    paired = {
        m: _stats([a[m] - s[m] for a, s in zip(tuned["adaptive"], tuned["seed"], strict=True)])
        for m in ("best", "last")
    }
    data: dict[str, Any] = {
        "command": shlex.join(
            ["python", "scripts/compare_strategies.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": _machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "seeds": seeds,
        "epochs": args.epochs,
        "epoch_time": args.epoch_time,
        "grid_axes": list(axes),
        "grid_epochs": grid_epochs,
        "metric": "acc1",
        "last_epochs": LAST,
        "rows": rows,
        "paired": paired,
        "grid_optimum": optimum,
        "grid": [{"weights": g["weights"], "best": g["best"]} for g in grid],
    }
    table = render(data)
    print(table)
    if not args.no_write:
        _replace_between_markers(args.markdown, table)
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
