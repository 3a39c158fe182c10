"""Look at a run from outside: ``autotune-rt status`` and ``tail`` (``report`` is report.py)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from autotune_rt.exceptions import ConfigError
from autotune_rt.runs import (
    EVENT_NAME_RE,
    EVENTS_FILE,
    RUNS_ROOT,
    EventReader,
    RunState,
    as_float,
    as_int,
    as_weights,
    find_run_dir,
    read_state,
    require_events,
    supervisor_alive,
    timestamp_of,
)

__all__ = [
    "SHORT_NAMES",
    "command_parser",
    "format_event",
    "format_status",
    "short_weights",
    "status_main",
    "tail_main",
    "views_main",
]

# tail: seconds between polls of events.jsonl, and between checks that the supervisor still lives.
POLL_S = 0.2
ALIVE_CHECK_S = 2.0
WIDTH = 80
LABEL = 11
SHORT_NAMES = {
    "lambda_dol": "dol",
    "lambda_col": "col",
    "lambda_hier": "hier",
    "lambda_scl": "scl",
    "max_grad_norm": "gnorm",
}


# -- human output -------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else repr(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop always returns


def _weight_text(weights: Mapping[str, float], *, short: bool = False, sep: str = " ") -> str:
    names = SHORT_NAMES if short else {}
    return sep.join(f"{names.get(k, k)}={v:g}" for k, v in weights.items())


def short_weights(new: Mapping[str, float], old: Mapping[str, float] | None = None) -> str:
    """The weights that changed, short: ``col 0.3→0.4, scl 0.2→0.25`` (all of them without *old*)."""
    if not old:
        return _weight_text(new, short=True, sep=", ")
    changed = [k for k, v in new.items() if old.get(k) != v]
    return ", ".join(f"{SHORT_NAMES.get(k, k)} {old.get(k, float('nan')):g}→{new[k]:g}" for k in changed)


def _changes(new: Mapping[str, float], old: Mapping[str, float] | None) -> str:
    if not old:
        return _weight_text(new)
    changed = [f"{k} {old.get(k, float('nan')):g}->{v:g}" for k, v in new.items() if old.get(k) != v]
    return " ".join(changed) or "no change"


def _row(label: str, text: str, width: int = WIDTH) -> str:
    return textwrap.fill(
        text,
        width=width,
        initial_indent=label.ljust(LABEL),
        subsequent_indent=" " * LABEL,
        break_on_hyphens=False,
        break_long_words=False,
    )


def _trial_table(state: RunState) -> list[str]:
    names: list[str] = []
    for row in state.trials:
        names += [n for n in row.weights if n not in names]
    header = ["trial", *(SHORT_NAMES.get(n, n) for n in names), "best", "@epoch", "epochs", "status"]
    rows = [header]
    for t in state.trials:
        mark = "*" if t.trial == state.best_trial else " "
        rows.append(
            [
                f"{mark}{t.trial}",
                *(f"{t.weights[n]:g}" if n in t.weights else "-" for n in names),
                _num(t.best_metric),
                "-" if t.best_epoch is None else str(t.best_epoch),
                str(t.epochs),
                t.status if t.exit_code in (None, 0) else f"{t.status} ({t.exit_code})",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1] for r in rows]
    return lines


def format_status(state: RunState) -> str:
    """The human layout of ``status``: one labelled line per fact, wrapped to 80 columns."""
    out = [f"run {state.run_id or '?'} ({state.mode or '?'})  {state.run_dir}"]
    trial = f", trial {state.trial}/{state.max_trials}" if state.trial and state.max_trials else ""
    if state.state == "running":
        out.append(
            _row("state", f"running{trial}: supervisor pid {state.pid}, up {_duration(state.uptime_s)}")
        )
    elif state.state == "finished":
        code = "-" if state.exit_code is None else state.exit_code
        how = f" ({state.exit})" if state.exit and state.mode != "batch" else ""
        out.append(_row("state", f"finished: exit {code}{how}, ran {_duration(state.uptime_s)}"))
    else:
        out.append(
            _row("state", f"stopped{trial}: supervisor pid {state.pid} is gone and never logged run_finished")
        )
    child = state.child
    if child is not None and child.alive:
        out.append(
            _row(
                "child",
                f"pid {child.pid}: cpu {child.cpu_percent:.0f}%, rss {_bytes(child.rss)}, "
                f"{child.nprocs} process{'es' if child.nprocs != 1 else ''}",
            )
        )
    if state.epoch is not None:
        where = f" of trial {state.trial}" if state.trial else ""
        text = f"{state.epoch}{where} ({state.epochs} epoch lines)"
        p = state.progress
        if p and state.state == "running" and p.get("epochs"):
            text += f"; {p.get('epoch')}/{p.get('epochs')}, about {_duration(p.get('left_s'))} left"
        out.append(_row("epoch", text))
        n = state.since_improvement
        since = "" if n is None else f" ({n} epoch{'' if n == 1 else 's'} ago)"
        best = f"best {_num(state.best)} at epoch {state.best_epoch}{since}"
        out.append(_row("metric", f"{state.metric or '?'} {_num(state.value)} now, {best}"))
    elif state.state != "finished":
        out.append(_row("epoch", "no epoch line parsed yet"))
    if state.weights:
        version = f"v{state.config_version}: " if state.config_version is not None else ""
        out.append(_row("weights", version + _weight_text(state.weights)))
    change = state.last_change
    if change is not None:
        where = "" if change.epoch is None else f" at epoch {change.epoch}"
        if change.acknowledged:
            ack = f"applied at epoch {change.applied_epoch}"
            ack += "" if change.latency_s is None else f" ({change.latency_s:.2g} s later)"
        elif state.state == "running":
            ack = "not applied by the training yet"
        else:
            ack = "never applied by the training"
        out.append(_row("change", f"v{change.version} {change.reason}{where}: {ack}"))
    d = state.last_diagnosis
    if d is not None:
        evidence = d.get("evidence") if isinstance(d.get("evidence"), dict) else {}
        facts = " ".join(f"{k}={_num(as_float(v))}" for k, v in (evidence or {}).items())
        missing = d.get("missing") or []
        facts += f" (missing {', '.join(map(str, missing))})" if missing else ""
        where = f"trial {d['trial']} " if d.get("trial") else ""
        out.append(_row("diagnosis", f"{where}epoch {d.get('epoch')} {d.get('problem')}: {facts}".rstrip()))
    w = state.last_warning
    if w is not None:
        # One line, as `tail` shows it: a warning can carry whole weight sets (a rollback).
        line = format_event(w)
        room = WIDTH - LABEL
        out.append("warning".ljust(LABEL) + (line if len(line) <= room else line[: room - 1] + "…"))
    if state.trials:
        best = f"best: trial {state.best_trial}" if state.best_trial else "no trial has a metric yet"
        out.append(_row("trials", f"{len(state.trials)} of {state.max_trials or '?'}; {best} (*)"))
        out += ["  " + line for line in _trial_table(state)]
    if state.damaged_lines:
        out.append(_row("note", f"{state.damaged_lines} damaged line(s) of {EVENTS_FILE} skipped"))
    return "\n".join(out)


# -- tail: one line per event -------------------------------------------------------------------
_LEVEL_COLOURS = {"warning": "33", "error": "31;1", "critical": "31;1"}
_EVENT_COLOURS = {
    "config_written": "32;1",
    "config_applied": "32",
    "manual_override": "35;1",
    "rollback": "35",
    "verdict": "36",
    "diagnosis": "36",
    "trigger": "36",
    "candidate_config": "36",
    "next_config": "32;1",
    "run_started": "1",
    "run_finished": "1",
    "trial_started": "1",
    "trial_finished": "1",
    "child_exited": "1",
}
_SKIP = ("ts", "level", "event", "run_id", "trial")


def _clock(ts: object) -> str:
    stamp = timestamp_of(ts)
    if stamp is None:
        return "--:--:--"
    return _dt.datetime.fromtimestamp(stamp).strftime("%H:%M:%S")


def _value(value: Any, limit: int = 100) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, str):
        text = value if value and " " not in value else json.dumps(value, ensure_ascii=False)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = shlex.join(value)
    elif value is None or isinstance(value, (bool, int)):
        text = json.dumps(value)
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _generic(event: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in event.items() if k not in _SKIP)


def _epoch_line(e: Mapping[str, Any]) -> str:
    metric = e.get("metric") or "metric"
    since = e.get("since_improvement")
    trend = "new best" if e.get("improved") else f"since {since}"
    value, best = _num(as_float(e.get("value"))), _num(as_float(e.get("best")))
    text = f"{e.get('epoch')} {metric}={value} best={best} ({trend})"
    version = e.get("config_version")
    return text + (f" v{version}" if version else "")


def _config_written(e: Mapping[str, Any]) -> str:
    where = "" if e.get("epoch") is None else f" at epoch {e.get('epoch')}"
    note = f" ({e['note']})" if e.get("note") else ""
    changes = _changes(as_weights(e.get("new")), as_weights(e.get("old")))
    return f"v{e.get('version')} {e.get('reason')}{where}: {changes}{note}"


def _bodies() -> dict[str, Callable[[Mapping[str, Any]], str]]:
    def run_started(e: Mapping[str, Any]) -> str:
        settings = e.get("settings") if isinstance(e.get("settings"), dict) else {}
        command = (settings or {}).get("command") or []
        return f"{e.get('mode')} pid={e.get('pid')} dir={e.get('run_dir')} command={_value(command, 200)}"

    def diagnosis(e: Mapping[str, Any]) -> str:
        evidence = e.get("evidence") if isinstance(e.get("evidence"), dict) else {}
        facts = " ".join(f"{k}={_num(as_float(v))}" for k, v in (evidence or {}).items())
        missing = f" missing={','.join(map(str, e['missing']))}" if e.get("missing") else ""
        return f"epoch {e.get('epoch')} {e.get('problem')}: {facts}{missing}"

    def trigger(e: Mapping[str, Any]) -> str:
        return (
            f"epoch {e.get('epoch')}: {e.get('since_improvement')} epochs without improvement, "
            f"best {_num(as_float(e.get('best')))} at epoch {e.get('best_epoch')}"
        )

    def applied(e: Mapping[str, Any]) -> str:
        latency = as_float(e.get("latency_s"))
        return f"v{e.get('version')} at epoch {e.get('epoch')}" + (
            "" if latency is None else f" ({latency:.3g} s after writing)"
        )

    def override(e: Mapping[str, Any]) -> str:
        changes = _changes(as_weights(e.get("new")), as_weights(e.get("old")))
        return f"v{e.get('version')} edited by hand: {changes}"

    def child_started(e: Mapping[str, Any]) -> str:
        return f"pid {e.get('pid')}: {_value(e.get('command') or [], 200)}"

    def child_exited(e: Mapping[str, Any]) -> str:
        text = f"pid {e.get('pid')} {e.get('description')}, {e.get('epochs')} epochs"
        last = e.get("last_lines")
        return text + (f", last line: {_value(last[-1])}" if isinstance(last, list) and last else "")

    def trial_started(e: Mapping[str, Any]) -> str:
        return _weight_text(as_weights(e.get("weights")))

    def trial_finished(e: Mapping[str, Any]) -> str:
        code = e.get("exit_code")
        return (
            f"{e.get('status')} best={_num(as_float(e.get('best_metric')))} at epoch {e.get('best_epoch')}, "
            f"{e.get('epochs')} epochs" + (f", exit code {code}" if code else "")
        )

    def candidate(e: Mapping[str, Any]) -> str:
        changes = _changes(as_weights(e.get("new")), as_weights(e.get("old")))
        return f"epoch {e.get('epoch')} {e.get('problem')}: {changes}"

    def next_config(e: Mapping[str, Any]) -> str:
        return f"{e.get('reason')} ({e.get('basis')}): {_weight_text(as_weights(e.get('weights')))}"

    def health(e: Mapping[str, Any]) -> str:
        cpu = as_float(e.get("cpu_percent"))
        rss = as_int(e.get("rss"))
        return f"cpu {_num(cpu, 0)}% rss {_bytes(rss)} procs {e.get('nprocs')}"

    def progress(e: Mapping[str, Any]) -> str:
        left = as_float(e.get("left_s"))
        return f"epoch {e.get('epoch')}/{e.get('epochs')}, about {_duration(left)} left"

    def verdict(e: Mapping[str, Any]) -> str:
        window = e.get("window") if isinstance(e.get("window"), list) else None
        span = f" in epochs {window[0]}-{window[-1]}" if window else ""
        best, before = _num(as_float(e.get("window_best"))), _num(as_float(e.get("previous_best")))
        return f"v{e.get('version')} {e.get('outcome')}: best {best}{span} (before: {before})"

    def rollback(e: Mapping[str, Any]) -> str:
        changes = _changes(as_weights(e.get("new")), as_weights(e.get("old")))
        return f"epoch {e.get('epoch')}: v{e.get('version')} did not pay off, back to {changes}"

    return {
        "epoch": _epoch_line,
        "verdict": verdict,
        "rollback": rollback,
        "run_started": run_started,
        "config_written": _config_written,
        "config_applied": applied,
        "manual_override": override,
        "diagnosis": diagnosis,
        "trigger": trigger,
        "child_started": child_started,
        "child_exited": child_exited,
        "trial_started": trial_started,
        "trial_finished": trial_finished,
        "candidate_config": candidate,
        "next_config": next_config,
        "health": health,
        "progress": progress,
    }


_BODIES = _bodies()


def _paint(text: str, code: str | None, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


def format_event(event: Mapping[str, Any], color: bool = False) -> str:
    """One event as one readable line: ``HH:MM:SS level event details`` (local time).

    Args:
        event: A decoded line of ``events.jsonl``.
        color: Add ANSI colours (by level and by kind of event).
    """
    name = str(event.get("event"))
    level = str(event.get("level", "info"))
    try:
        body = _BODIES.get(name, _generic)(event)
    except (TypeError, ValueError, KeyError):  # an odd field never stops the tail
        body = _generic(event)
    if event.get("trial") is not None:
        body = f"[trial {event['trial']}] {body}"
    return " ".join(
        [
            _paint(_clock(event.get("ts")), "2", color),
            _paint(f"{level:<7}", _LEVEL_COLOURS.get(level), color),
            _paint(f"{name:<15}", _LEVEL_COLOURS.get(level) or _EVENT_COLOURS.get(name), color),
            body,
        ]
    ).rstrip()


def _use_color(stream: Any) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def _tail(run_dir: Path, wanted: set[str], follow: bool, color: bool) -> int:
    path = run_dir / EVENTS_FILE
    reader = EventReader(path)
    finished, pid, started = False, None, None
    next_check = time.monotonic()  # the first check at the first end of file: a dead run ends at once
    said_waiting = False

    def show(event: Mapping[str, Any]) -> None:
        nonlocal finished, pid, started
        name = event["event"]
        if name == "run_started":
            finished, pid, started = False, as_int(event.get("pid")), timestamp_of(event.get("ts"))
        elif name == "run_finished":
            finished = True
        if not wanted or name in wanted:
            print(format_event(event, color), flush=True)

    # With a filter, lines of other events are skipped before decoding (the run's start and end
    # are always decoded: following depends on them).
    needed = {*wanted, "run_started", "run_finished"} if wanted else set()
    while True:
        got = False
        for line in reader.lines():
            got = True
            name = EVENT_NAME_RE.search(line, 0, 120)
            if needed and name is not None and name.group(1).decode() not in needed:
                continue
            event = reader.decode(line)
            if event is not None:
                show(event)
        if not follow:
            last = reader.unfinished()
            if last is not None:
                show(last)
            break
        if got:
            continue
        if finished:
            break
        if not said_waiting and not path.exists():
            said_waiting = True
            print(f"waiting for {path} ...", file=sys.stderr, flush=True)
        if pid is not None and time.monotonic() >= next_check:
            next_check = time.monotonic()  # the first check at the first end of file: a dead run ends at once
            if not supervisor_alive(pid, started):
                print(
                    f"the run's supervisor (pid {pid}) is gone without logging run_finished",
                    file=sys.stderr,
                    flush=True,
                )
                break
        time.sleep(POLL_S)
    if reader.damaged:
        print(f"skipped {reader.damaged} damaged line(s) of {path}", file=sys.stderr)
    return 0


# -- command lines ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like the rest of the CLI."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of a view subcommand, with its optional ``run_dir`` argument."""
    parser = _Parser(prog=f"autotune-rt {command}", description=description)
    parser.add_argument(
        "run_dir",
        nargs="?",
        default=None,
        help=f"the run directory (default: the most recently active run under ./{RUNS_ROOT})",
    )
    return parser


def status_main(argv: Sequence[str]) -> int:
    """``autotune-rt status [run_dir] [--json]``: how a run is going, live or finished."""
    parser = command_parser(
        "status", "How a run is going, at a glance: live or finished, metric, weights, trials."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(list(argv))
    state = read_state(find_run_dir(args.run_dir, "status"))
    if args.json:
        print(json.dumps(state.to_dict(), ensure_ascii=False))
    else:
        print(format_status(state))
    return 0


def tail_main(argv: Sequence[str]) -> int:
    """``autotune-rt tail [run_dir] [--event NAME ...] [--no-follow]``: events as readable lines."""
    parser = command_parser("tail", "Follow a run's events.jsonl and print each event as one readable line.")
    parser.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="NAME",
        help="only events named NAME (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--no-follow",
        "--no_follow",
        dest="follow",
        action="store_false",
        help="print what is there and exit (default: follow until the run finishes or Ctrl-C)",
    )
    args = parser.parse_args(list(argv))
    run_dir = find_run_dir(args.run_dir, "tail")
    if not args.follow:
        require_events(run_dir)
    wanted = {name.strip() for item in args.event for name in item.split(",") if name.strip()}
    try:
        return _tail(run_dir, wanted, args.follow, _use_color(sys.stdout))
    except KeyboardInterrupt:  # Ctrl-C is how a follow ends
        return 0


def views_main(command: str, argv: list[str]) -> int:
    """Run ``status``, ``report`` or ``tail`` with *argv*; return the exit code.

    Raises:
        ConfigError: Bad options, or the run directory is missing or is not a run directory.
    """
    mains: dict[str, Callable[[Sequence[str]], int]] = {"status": status_main, "tail": tail_main}
    if command == "report":
        from autotune_rt.report import report_main

        mains["report"] = report_main
    if command not in mains:
        raise ConfigError(f"unknown command {command!r}; choose one of status, report, tail")
    try:
        return mains[command](argv)
    except BrokenPipeError:  # `autotune-rt status | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
