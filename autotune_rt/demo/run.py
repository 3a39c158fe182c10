"""``autotune-rt demo``: the bundled training supervised in realtime (or batch) mode."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autotune_rt.console import detect_lang
from autotune_rt.settings import Settings, default_run_dir
from autotune_rt.space import DEFAULT_WEIGHTS

__all__ = ["demo_command", "demo_main"]

# Short enough for about a minute on 2 cores, long enough for the default weights to
# plateau in the poor_tail regime and for the tuner's changes to show.
REALTIME_EPOCHS = 60
BATCH_EPOCHS = 30
# An epoch of the demo takes a few milliseconds; pacing it lets a person watch the tuner
# react (about 50 s for the realtime demo).
REALTIME_EPOCH_TIME = 0.8
BATCH_EPOCH_TIME = 0.1


def demo_command(
    epochs: int, seed: int, *, reload: bool = True, epoch_time: float = 0.0, extra: Sequence[str] = ()
) -> list[str]:
    """The demo training's command line (run with this interpreter, as a module)."""
    command = [sys.executable, "-m", "autotune_rt.demo.train", "--epochs", str(epochs), "--seed", str(seed)]
    if epoch_time:
        command += ["--epoch_time", str(epoch_time)]
    if not reload:
        command.append("--no_reload")
    return [*command, *extra]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotune-rt demo",
        description="Run the bundled long-tailed demo training (numpy) under autotune-rt and show "
        "what the tuner changed.",
    )
    parser.add_argument("--batch", action="store_true", help="batch mode: a few short trials instead")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per training (default: 60, batch: 30)"
    )
    parser.add_argument(
        "--epoch_time",
        type=float,
        default=None,
        help=f"seconds each epoch is paced to (default: {REALTIME_EPOCH_TIME}, batch: {BATCH_EPOCH_TIME})",
    )
    parser.add_argument("--trials", type=int, default=4, help="batch mode: number of trials (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="data and tuner seed (default: 0)")
    parser.add_argument("--run_dir", type=Path, default=None, help="default: ./autotune_runs/<time>-demo")
    parser.add_argument("--strategy", choices=("seed", "adaptive"), default="adaptive")
    parser.add_argument("--lang", choices=("auto", "en", "zh"), default="auto")
    parser.add_argument("--quiet", action="store_true", help="do not echo the training's own output")
    return parser


def demo_settings(args: argparse.Namespace) -> Settings:
    """Settings for the demo run described by the parsed *args*."""
    mode = "batch" if args.batch else "realtime"
    epochs = args.epochs or (BATCH_EPOCHS if args.batch else REALTIME_EPOCHS)
    if args.epoch_time is None:
        args.epoch_time = BATCH_EPOCH_TIME if args.batch else REALTIME_EPOCH_TIME
    run_dir = args.run_dir or default_run_dir(f"demo-{mode}")
    return Settings(
        command=demo_command(epochs, args.seed, reload=not args.batch, epoch_time=args.epoch_time),
        weights=dict(DEFAULT_WEIGHTS),
        mode_name=mode,  # type: ignore[arg-type]
        min_epochs=8,
        patience=3,
        max_trials=args.trials,
        check_interval=5.0,
        config_file=run_dir / "control.json",  # the demo never touches the seed's /tmp default
        write_config=not args.batch,
        run_dir=run_dir,
        seed=args.seed,
        # The demo prints best_metric as a running maximum: judging changes needs the raw acc1.
        metric="acc1",
        strategy=args.strategy,
        lang=detect_lang(args.lang),
    )


def demo_main(argv: Sequence[str]) -> int:
    """Run the demo; print what the tuner changed and the metric before and after."""
    args = _parser().parse_args(list(argv))
    settings = demo_settings(args)
    settings.validate()
    sink: Any = open(Path("/dev/null"), "wb") if args.quiet else None  # noqa: SIM115
    streams: dict[str, Any] = {} if sink is None else {"stdout": sink, "stderr": sink}
    try:
        if args.batch:
            from autotune_rt.batch import run_batch

            code = run_batch(settings, **streams)
        else:
            from autotune_rt.supervisor import run_realtime

            code = run_realtime(settings, **streams)
    finally:
        if sink is not None:
            sink.close()
    assert settings.run_dir is not None
    print(_story(settings.run_dir, batch=args.batch), file=sys.stderr)
    return code


def _story(run_dir: Path, *, batch: bool) -> str:
    """A few lines a newcomer can read: what changed, and what it did to the metric."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return f"(no summary in {run_dir})"
    lines = ["", "=" * 72, "What autotune-rt did"]
    if batch:
        for trial in summary["trials"]:
            best = trial["best_metric"]
            diag = (trial.get("diagnosis") or {}).get("problem", "-")
            weights = ", ".join(f"{k}={v:g}" for k, v in trial["weights"].items())
            lines.append(
                f"  trial {trial['number']}: {weights}  ->  best acc1 "
                f"{'n/a' if best is None else f'{best:.4f}'}  (diagnosis: {diag})"
            )
        if summary["trials"]:
            first = summary["trials"][0]["best_metric"]
            lines.append(
                f"  first trial {first:.4f}  ->  best trial {summary['best_metric']:.4f} "
                f"(trial {summary['best_trial']})"
                if first is not None and summary["best_metric"] is not None
                else "  no trial finished"
            )
        lines.append("=" * 72)
        return "\n".join(lines)
    decisions = summary.get("decisions", [])
    if not decisions:
        lines.append("  no change was needed: the metric kept improving")
    for d in decisions:
        changed = ", ".join(
            f"{k} {d['old'][k]:g}->{d['new'][k]:g}" for k in d["new"] if d["old"].get(k) != d["new"][k]
        )
        lines.append(f"  epoch {d['epoch']}: {d['problem']} -> {changed or 'no change'}")
    before = _best_before(run_dir, decisions[0]["epoch"] if decisions else None)
    best = summary.get("best_metric")
    if before is not None and best is not None:
        lines.append(
            f"  {summary.get('metric')}: best {before:.4f} before the first change  ->  "
            f"best {best:.4f} at the end (epoch {summary.get('best_epoch')})"
        )
    lines.append("=" * 72)
    return "\n".join(lines)


def _best_before(run_dir: Path, epoch: int | None) -> float | None:
    """The best metric up to *epoch* (inclusive), read back from events.jsonl."""
    if epoch is None:
        return None
    best: float | None = None
    try:
        with (run_dir / "events.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                event = json.loads(line)
                if event.get("event") == "epoch" and event["epoch"] <= epoch:
                    best = event.get("best", best)
    except (OSError, ValueError):
        return None
    return best
