"""Look at a run from outside: ``autotune-rt status`` and ``tail`` (``report`` is report.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil  # type: ignore[import-untyped,unused-ignore]

from autotune_rt._logging import json_safe
from autotune_rt.exceptions import ConfigError

__all__ = [
    "NOT_A_CHANGE",
    "SHORT_NAMES",
    "ChildInfo",
    "EventReader",
    "RunState",
    "StateCollector",
    "TrialRow",
    "VersionRow",
    "command_parser",
    "find_run_dir",
    "format_event",
    "format_status",
    "read_state",
    "require_events",
    "short_weights",
    "status_main",
    "supervisor_alive",
    "tail_main",
    "views_main",
]

RUNS_ROOT = Path("autotune_runs")
EVENTS_FILE = "events.jsonl"
# Config versions that are not a change of weights: the first write and a resumed run's rewrite.
NOT_A_CHANGE = ("initial", "resume")
# The epoch event's key order is fixed by _logging, so a cheap byte test finds epoch lines; status
# only decodes the last one, which keeps a million-epoch log to a one-second pass.
_EPOCH_MARK = b'"event": "epoch",'
_EVENT_NAME = re.compile(rb'"event": "([A-Za-z0-9_]+)"')
# How long status samples the child tree's CPU (psutil compares two readings).
CPU_SAMPLE_S = 0.2
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


# -- finding and reading a run ------------------------------------------------------------------
def find_run_dir(path: str | Path | None, command: str = "status", root: Path = RUNS_ROOT) -> Path:
    """The run directory to look at: *path*, or the most recently active run under *root*.

    Args:
        path: A run directory (or its ``events.jsonl``); None picks the run under *root*
            whose ``events.jsonl`` changed last.
        command: The subcommand, for the hint in the error message.
        root: Where default run directories live (``./autotune_runs``).

    Raises:
        ConfigError: No such directory, or no run under *root*.
    """
    if path is None:
        runs = [d for d in root.iterdir() if (d / EVENTS_FILE).is_file()] if root.is_dir() else []
        if not runs:
            raise ConfigError(
                f"no run directory under ./{root}; pass the run directory: autotune-rt {command} <run_dir>"
            )
        return max(runs, key=_last_change)
    run_dir = Path(path)
    if run_dir.name == EVENTS_FILE and run_dir.is_file():
        return run_dir.parent
    if not run_dir.is_dir():
        raise ConfigError(f"no such run directory: {run_dir}; pass the directory of a run (see ./{root})")
    return run_dir


def _last_change(run_dir: Path) -> float:
    try:
        return (run_dir / EVENTS_FILE).stat().st_mtime
    except OSError:  # removed since the listing
        return 0.0


def require_events(run_dir: Path) -> Path:
    """``run_dir/events.jsonl``; ConfigError when the directory is not a run directory."""
    events = run_dir / EVENTS_FILE
    if not events.is_file():
        raise ConfigError(f"{run_dir} is not an autotune-rt run directory (no {EVENTS_FILE})")
    return events


def _loads(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        return None
    return obj


class EventReader:
    """Reads ``events.jsonl`` from where the last call stopped: whole lines only, constant memory.

    A line that is complete but not a JSON event is skipped and counted in :attr:`damaged`.
    The last line may still be being written; it is left for the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.damaged = 0
        self._partial = b""

    def lines(self) -> Iterator[bytes]:
        """Yield the complete, non-blank lines added since the last call."""
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            if os.fstat(handle.fileno()).st_size < self.offset:  # truncated or replaced: start over
                self.offset = 0
            handle.seek(self.offset)
            self._partial = b""
            for line in handle:
                if not line.endswith(b"\n"):
                    self._partial = line  # re-read from the same offset next time
                    return
                self.offset += len(line)
                if line.strip():
                    yield line

    def decode(self, line: bytes) -> dict[str, Any] | None:
        """The event on *line*, or None (counted as damaged)."""
        event = _loads(line)
        if event is None:
            self.damaged += 1
        return event

    def events(self) -> Iterator[dict[str, Any]]:
        """Yield the events of the complete lines added since the last call."""
        for line in self.lines():
            event = self.decode(line)
            if event is not None:
                yield event

    def unfinished(self) -> dict[str, Any] | None:
        """The last line without its newline yet, if it already parses (a finished file's tail)."""
        return _loads(self._partial) if self._partial.strip() else None


def _timestamp(ts: object) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def supervisor_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether *pid* is still the supervisor that started the run at *started* (epoch seconds)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and proc.create_time() > started + 1.0:
            return False  # the pid was reused after the run started
        command = " ".join(proc.cmdline()).lower()
    except psutil.AccessDenied:
        return True  # someone else's live process: it exists, which is all we can tell
    except psutil.Error:
        return False
    return "autotune" in command or "python" in command


# -- the state of a run -------------------------------------------------------------------------
@dataclass
class ChildInfo:
    """The training process and its descendants (CPU and memory only while it runs)."""

    pid: int
    alive: bool
    cpu_percent: float | None = None
    rss: int | None = None
    nprocs: int | None = None


@dataclass
class TrialRow:
    """One trial of a batch run."""

    trial: int
    weights: dict[str, float]
    status: str = "running"
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    exit_code: int | None = None


@dataclass
class VersionRow:
    """One control-file version: what was written, why, and when the training applied it."""

    version: int
    reason: str
    epoch: int | None
    weights: dict[str, float]
    old: dict[str, float] | None = None
    note: str | None = None
    applied_epoch: int | None = None
    latency_s: float | None = None
    #: The last epoch seen when the change was made, where a marker goes on the plot.
    at_epoch: int | None = None
    trial: int | None = None

    @property
    def acknowledged(self) -> bool:
        """The training reported loading this version."""
        return self.applied_epoch is not None or self.latency_s is not None


@dataclass
class RunState:
    """Everything ``status`` shows, read from one pass over ``events.jsonl``."""

    run_dir: str
    run_id: str | None = None
    mode: str | None = None
    #: running | finished | stopped (the supervisor is gone without run_finished) | unknown (not probed)
    state: str = "unknown"
    pid: int | None = None
    started: str | None = None
    uptime_s: float | None = None
    child: ChildInfo | None = None
    metric: str | None = None
    epoch: int | None = None
    epochs: int = 0
    value: float | None = None
    best: float | None = None
    best_epoch: int | None = None
    since_improvement: int | None = None
    latest_metrics: dict[str, float] = field(default_factory=dict)
    progress: dict[str, Any] | None = None
    config_version: int | None = None
    weights: dict[str, float] | None = None
    last_change: VersionRow | None = None
    last_diagnosis: dict[str, Any] | None = None
    last_warning: dict[str, Any] | None = None
    exit_code: int | None = None
    exit: str | None = None
    trial: int | None = None
    max_trials: int | None = None
    best_trial: int | None = None
    trials: list[TrialRow] = field(default_factory=list)
    damaged_lines: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``status --json`` prints)."""
        data = dataclasses.asdict(self)
        if self.last_change is not None:
            data["last_change"]["acknowledged"] = self.last_change.acknowledged
        safe: dict[str, Any] = json_safe(data)
        return safe


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _weights(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if _float(v) is not None}


class StateCollector:
    """Folds events into a :class:`RunState`, keeping only the latest values.

    Args:
        run_dir: The run directory (for the state's ``run_dir``).
        decode: Turns a raw epoch line into an event (see :meth:`feed_epoch_line`).
        keep_versions: Also keep every config version in :attr:`versions` (the report's table).
    """

    def __init__(
        self,
        run_dir: Path,
        decode: Callable[[bytes], dict[str, Any] | None] = _loads,
        keep_versions: bool = False,
    ) -> None:
        self.state = RunState(run_dir=str(run_dir))
        self.versions: list[VersionRow] = []
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.finished = False
        self.child_pid: int | None = None
        self.child_alive = False
        self._decode = decode
        self._keep_versions = keep_versions
        self._pending: bytes | None = None
        self._trials: dict[int, TrialRow] = {}
        self.sign = 1.0  # -1.0 when the metric is minimised (--mode min)

    # Epoch lines come by the million: count them, decode only the latest.
    def feed_epoch_line(self, line: bytes) -> None:
        """Count an epoch line whose event is only decoded if it stays the latest."""
        self.state.epochs += 1
        self._pending = line

    def _flush(self) -> None:
        if self._pending is not None:
            event = self._decode(self._pending)
            self._pending = None
            if event is not None:
                self._epoch(event)

    def feed(self, event: Mapping[str, Any]) -> None:
        """Fold one event into the state."""
        name = event.get("event")
        if name == "epoch":
            self.state.epochs += 1
            self._pending = None
            self._epoch(event)
            return
        if name in ("run_started", "trial_started", "trial_finished"):
            self._flush()
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(event)
        if event.get("level") in ("warning", "error", "critical"):
            self.state.last_warning = {k: v for k, v in event.items() if k != "run_id"}

    def _epoch(self, event: Mapping[str, Any]) -> None:
        s = self.state
        s.epoch = _int(event.get("epoch"))
        s.metric = event.get("metric") or s.metric
        s.value = _float(event.get("value"))
        s.best = _float(event.get("best"))
        s.best_epoch = _int(event.get("best_epoch"))
        s.since_improvement = _int(event.get("since_improvement"))
        s.latest_metrics = _weights(event.get("metrics"))
        row = self._trials.get(s.trial or -1)
        if row is not None and row.status == "running":
            row.best_metric, row.best_epoch, row.epochs = s.best, s.best_epoch, s.epochs

    def _on_run_started(self, event: Mapping[str, Any]) -> None:
        s = self.state
        s.run_id = event.get("run_id") or s.run_id
        s.mode = event.get("mode") or s.mode
        s.pid = _int(event.get("pid"))
        s.started = s.started or event.get("ts")
        self.started_at = _timestamp(event.get("ts"))
        self.finished = False  # a resumed run appends to the same file
        s.exit_code = s.exit = None
        settings = event.get("settings")
        if isinstance(settings, dict):
            self.sign = -1.0 if settings.get("mode") == "min" else 1.0
            s.max_trials = _int(settings.get("max_trials")) if s.mode == "batch" else None
            if s.weights is None:
                s.weights = _weights(settings.get("weights")) or None

    def _on_run_finished(self, event: Mapping[str, Any]) -> None:
        self.finished = True
        self.finished_at = _timestamp(event.get("ts"))
        s = self.state
        if "exit_code" in event:
            s.exit_code = _int(event.get("exit_code"))
        if "best_trial" in event:  # batch: the exit code follows from the trials (see batch.py)
            s.best_trial = _int(event.get("best_trial"))
            ok = any(t.status in ("ok", "stopped_early") for t in self._trials.values())
            s.exit_code = 130 if event.get("interrupted") else 0 if ok else 1

    def _on_child_started(self, event: Mapping[str, Any]) -> None:
        self.child_pid = _int(event.get("pid"))
        self.child_alive = True

    def _on_child_exited(self, event: Mapping[str, Any]) -> None:
        if _int(event.get("pid")) == self.child_pid:
            self.child_alive = False
        self.state.exit = event.get("description")
        if self.state.mode != "batch":
            self.state.exit_code = _int(event.get("exit_code"))

    def _on_trial_started(self, event: Mapping[str, Any]) -> None:
        s = self.state
        number = _int(event.get("trial"))
        if number is None:
            return
        s.trial = number
        s.weights = _weights(event.get("weights"))
        s.epochs, s.epoch, s.value, s.best, s.best_epoch = 0, None, None, None, None
        s.since_improvement, s.latest_metrics = None, {}
        self._trials[number] = TrialRow(trial=number, weights=s.weights)

    def _on_trial_finished(self, event: Mapping[str, Any]) -> None:
        row = self._trials.get(_int(event.get("trial")) or -1)
        if row is None:
            return
        row.status = str(event.get("status", "?"))
        row.best_metric = _float(event.get("best_metric"))
        row.best_epoch = _int(event.get("best_epoch"))
        row.epochs = _int(event.get("epochs")) or 0
        row.exit_code = _int(event.get("exit_code"))

    def _version(self, event: Mapping[str, Any], reason: str, epoch: int | None) -> None:
        version = _int(event.get("version"))
        if version is None:
            return
        row = VersionRow(
            version=version,
            reason=reason,
            epoch=epoch,
            weights=_weights(event.get("new")),
            old=_weights(event.get("old")) or None,
            note=event.get("note"),
            at_epoch=self.state.epoch if epoch is None else epoch,
            trial=_int(event.get("trial")),
        )
        self.state.last_change = row
        self.state.config_version = version
        self.state.weights = row.weights
        if self._keep_versions:
            self.versions.append(row)

    def _on_config_written(self, event: Mapping[str, Any]) -> None:
        self._version(event, str(event.get("reason", "?")), _int(event.get("epoch")))

    def _on_manual_override(self, event: Mapping[str, Any]) -> None:
        self._flush()  # the marker goes at the epoch the edit was seen
        self._version(event, "manual_override", None)

    def _on_config_applied(self, event: Mapping[str, Any]) -> None:
        version = _int(event.get("version"))
        rows = self.versions if self._keep_versions else [self.state.last_change]
        for row in rows:
            if row is not None and row.version == version and not row.acknowledged:
                row.applied_epoch = _int(event.get("epoch"))
                row.latency_s = _float(event.get("latency_s"))

    def _on_diagnosis(self, event: Mapping[str, Any]) -> None:
        self.state.last_diagnosis = {
            key: event.get(key) for key in ("ts", "trial", "epoch", "problem", "evidence", "missing")
        }

    def _on_progress(self, event: Mapping[str, Any]) -> None:
        self.state.progress = {key: event.get(key) for key in ("epoch", "epochs", "elapsed_s", "left_s")}

    def finish(self, *, probe: bool = True) -> RunState:
        """The state after the last event; *probe* asks psutil whether the run still lives."""
        self._flush()
        s = self.state
        s.trials = [self._trials[n] for n in sorted(self._trials)]
        if s.mode == "batch" and s.best_trial is None:
            s.best_trial = _best_trial(s.trials, self.sign)
        alive = not self.finished and probe and supervisor_alive(s.pid, self.started_at)
        if self.finished:
            s.state = "finished"
        elif probe:
            s.state = "running" if alive else "stopped"
        if alive and self.started_at is not None:
            s.uptime_s = max(0.0, time.time() - self.started_at)
        elif self.started_at is not None and self.finished_at is not None:
            s.uptime_s = max(0.0, self.finished_at - self.started_at)
        if self.child_pid is not None:
            child_alive = alive and self.child_alive
            s.child = _sample_tree(self.child_pid) if child_alive else ChildInfo(self.child_pid, False)
        if not alive:
            for row in s.trials:
                if row.status == "running":
                    row.status = "interrupted" if self.finished else "stopped"
        return s


def _best_trial(trials: Sequence[TrialRow], sign: float) -> int | None:
    scored = [t for t in trials if t.best_metric is not None and math.isfinite(t.best_metric)]
    return max(scored, key=lambda t: sign * (t.best_metric or 0.0)).trial if scored else None


def _sample_tree(pid: int) -> ChildInfo:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return ChildInfo(pid, False)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)  # the first reading only starts the interval
    time.sleep(CPU_SAMPLE_S)
    cpu, rss, alive = 0.0, 0, 0
    for proc in procs:
        try:
            with proc.oneshot():
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            alive += 1
        except psutil.Error:
            continue
    if not alive:
        return ChildInfo(pid, False)
    return ChildInfo(pid, True, round(cpu, 1), rss, alive)


def read_state(run_dir: Path, *, probe: bool = True) -> RunState:
    """Read a run's ``events.jsonl`` in one streaming pass and return its state.

    Args:
        run_dir: The run directory.
        probe: Ask psutil whether the supervisor and the training still run (and sample them).

    Raises:
        ConfigError: *run_dir* has no ``events.jsonl``.
    """
    reader = EventReader(require_events(run_dir))
    collector = StateCollector(run_dir, reader.decode)
    for line in reader.lines():
        if _EPOCH_MARK in line[:100]:
            collector.feed_epoch_line(line)
            continue
        event = reader.decode(line)
        if event is not None:
            collector.feed(event)
    last = reader.unfinished()
    if last is not None:
        collector.feed(last)
    state = collector.finish(probe=probe)
    state.damaged_lines = reader.damaged
    return state


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
        facts = " ".join(f"{k}={_num(_float(v))}" for k, v in (evidence or {}).items())
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
    stamp = _timestamp(ts)
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
    value, best = _num(_float(e.get("value"))), _num(_float(e.get("best")))
    text = f"{e.get('epoch')} {metric}={value} best={best} ({trend})"
    version = e.get("config_version")
    return text + (f" v{version}" if version else "")


def _config_written(e: Mapping[str, Any]) -> str:
    where = "" if e.get("epoch") is None else f" at epoch {e.get('epoch')}"
    note = f" ({e['note']})" if e.get("note") else ""
    changes = _changes(_weights(e.get("new")), _weights(e.get("old")))
    return f"v{e.get('version')} {e.get('reason')}{where}: {changes}{note}"


def _bodies() -> dict[str, Callable[[Mapping[str, Any]], str]]:
    def run_started(e: Mapping[str, Any]) -> str:
        settings = e.get("settings") if isinstance(e.get("settings"), dict) else {}
        command = (settings or {}).get("command") or []
        return f"{e.get('mode')} pid={e.get('pid')} dir={e.get('run_dir')} command={_value(command, 200)}"

    def diagnosis(e: Mapping[str, Any]) -> str:
        evidence = e.get("evidence") if isinstance(e.get("evidence"), dict) else {}
        facts = " ".join(f"{k}={_num(_float(v))}" for k, v in (evidence or {}).items())
        missing = f" missing={','.join(map(str, e['missing']))}" if e.get("missing") else ""
        return f"epoch {e.get('epoch')} {e.get('problem')}: {facts}{missing}"

    def trigger(e: Mapping[str, Any]) -> str:
        return (
            f"epoch {e.get('epoch')}: {e.get('since_improvement')} epochs without improvement, "
            f"best {_num(_float(e.get('best')))} at epoch {e.get('best_epoch')}"
        )

    def applied(e: Mapping[str, Any]) -> str:
        latency = _float(e.get("latency_s"))
        return f"v{e.get('version')} at epoch {e.get('epoch')}" + (
            "" if latency is None else f" ({latency:.3g} s after writing)"
        )

    def override(e: Mapping[str, Any]) -> str:
        return (
            f"v{e.get('version')} edited by hand: {_changes(_weights(e.get('new')), _weights(e.get('old')))}"
        )

    def child_started(e: Mapping[str, Any]) -> str:
        return f"pid {e.get('pid')}: {_value(e.get('command') or [], 200)}"

    def child_exited(e: Mapping[str, Any]) -> str:
        text = f"pid {e.get('pid')} {e.get('description')}, {e.get('epochs')} epochs"
        last = e.get("last_lines")
        return text + (f", last line: {_value(last[-1])}" if isinstance(last, list) and last else "")

    def trial_started(e: Mapping[str, Any]) -> str:
        return _weight_text(_weights(e.get("weights")))

    def trial_finished(e: Mapping[str, Any]) -> str:
        code = e.get("exit_code")
        return (
            f"{e.get('status')} best={_num(_float(e.get('best_metric')))} at epoch {e.get('best_epoch')}, "
            f"{e.get('epochs')} epochs" + (f", exit code {code}" if code else "")
        )

    def candidate(e: Mapping[str, Any]) -> str:
        changes = _changes(_weights(e.get("new")), _weights(e.get("old")))
        return f"epoch {e.get('epoch')} {e.get('problem')}: {changes}"

    def next_config(e: Mapping[str, Any]) -> str:
        return f"{e.get('reason')} ({e.get('basis')}): {_weight_text(_weights(e.get('weights')))}"

    def health(e: Mapping[str, Any]) -> str:
        cpu = _float(e.get("cpu_percent"))
        rss = _int(e.get("rss"))
        return f"cpu {_num(cpu, 0)}% rss {_bytes(rss)} procs {e.get('nprocs')}"

    def progress(e: Mapping[str, Any]) -> str:
        left = _float(e.get("left_s"))
        return f"epoch {e.get('epoch')}/{e.get('epochs')}, about {_duration(left)} left"

    def verdict(e: Mapping[str, Any]) -> str:
        window = e.get("window") if isinstance(e.get("window"), list) else None
        span = f" in epochs {window[0]}-{window[-1]}" if window else ""
        best, before = _num(_float(e.get("window_best"))), _num(_float(e.get("previous_best")))
        return f"v{e.get('version')} {e.get('outcome')}: best {best}{span} (before: {before})"

    def rollback(e: Mapping[str, Any]) -> str:
        changes = _changes(_weights(e.get("new")), _weights(e.get("old")))
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
            finished, pid, started = False, _int(event.get("pid")), _timestamp(event.get("ts"))
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
            name = _EVENT_NAME.search(line, 0, 120)
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
