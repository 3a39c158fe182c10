"""Read a run directory: find it, stream its events.jsonl, fold them into a RunState.

Shared by ``status``, ``tail`` (views.py) and ``report`` (report.py); reads, never writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from autotune_rt._logging import json_safe
from autotune_rt.exceptions import ConfigError

__all__ = [
    "EVENTS_FILE",
    "EVENT_NAME_RE",
    "NOT_A_CHANGE",
    "RUNS_ROOT",
    "ChildInfo",
    "EventReader",
    "RunState",
    "StateCollector",
    "TrialRow",
    "VersionRow",
    "as_float",
    "as_int",
    "as_weights",
    "find_run_dir",
    "read_state",
    "require_events",
    "supervisor_alive",
    "timestamp_of",
]

RUNS_ROOT = Path("autotune_runs")
EVENTS_FILE = "events.jsonl"
# Config versions that are not a change of weights: the first write and a resumed run's rewrite.
NOT_A_CHANGE = ("initial", "resume")
# The epoch event's key order is fixed by _logging, so a cheap byte test finds epoch lines; status
# only decodes the last one, which keeps a million-epoch log to a one-second pass.
_EPOCH_MARK = b'"event": "epoch",'
EVENT_NAME_RE = re.compile(rb'"event": "([A-Za-z0-9_]+)"')
# How long status samples the child tree's CPU (psutil compares two readings).
CPU_SAMPLE_S = 0.2


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


def timestamp_of(ts: object) -> float | None:
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


def as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_weights(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if as_float(v) is not None}


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
        s.epoch = as_int(event.get("epoch"))
        s.metric = event.get("metric") or s.metric
        s.value = as_float(event.get("value"))
        s.best = as_float(event.get("best"))
        s.best_epoch = as_int(event.get("best_epoch"))
        s.since_improvement = as_int(event.get("since_improvement"))
        s.latest_metrics = as_weights(event.get("metrics"))
        row = self._trials.get(s.trial or -1)
        if row is not None and row.status == "running":
            row.best_metric, row.best_epoch, row.epochs = s.best, s.best_epoch, s.epochs

    def _on_run_started(self, event: Mapping[str, Any]) -> None:
        s = self.state
        s.run_id = event.get("run_id") or s.run_id
        s.mode = event.get("mode") or s.mode
        s.pid = as_int(event.get("pid"))
        s.started = s.started or event.get("ts")
        self.started_at = timestamp_of(event.get("ts"))
        self.finished = False  # a resumed run appends to the same file
        s.exit_code = s.exit = None
        settings = event.get("settings")
        if isinstance(settings, dict):
            self.sign = -1.0 if settings.get("mode") == "min" else 1.0
            s.max_trials = as_int(settings.get("max_trials")) if s.mode == "batch" else None
            if s.weights is None:
                s.weights = as_weights(settings.get("weights")) or None

    def _on_run_finished(self, event: Mapping[str, Any]) -> None:
        self.finished = True
        self.finished_at = timestamp_of(event.get("ts"))
        s = self.state
        if "exit_code" in event:
            s.exit_code = as_int(event.get("exit_code"))
        if "best_trial" in event:  # batch: the exit code follows from the trials (see batch.py)
            s.best_trial = as_int(event.get("best_trial"))
            ok = any(t.status in ("ok", "stopped_early") for t in self._trials.values())
            s.exit_code = 130 if event.get("interrupted") else 0 if ok else 1

    def _on_child_started(self, event: Mapping[str, Any]) -> None:
        self.child_pid = as_int(event.get("pid"))
        self.child_alive = True

    def _on_child_exited(self, event: Mapping[str, Any]) -> None:
        if as_int(event.get("pid")) == self.child_pid:
            self.child_alive = False
        self.state.exit = event.get("description")
        if self.state.mode != "batch":
            self.state.exit_code = as_int(event.get("exit_code"))

    def _on_trial_started(self, event: Mapping[str, Any]) -> None:
        s = self.state
        number = as_int(event.get("trial"))
        if number is None:
            return
        s.trial = number
        s.weights = as_weights(event.get("weights"))
        s.epochs, s.epoch, s.value, s.best, s.best_epoch = 0, None, None, None, None
        s.since_improvement, s.latest_metrics = None, {}
        self._trials[number] = TrialRow(trial=number, weights=s.weights)

    def _on_trial_finished(self, event: Mapping[str, Any]) -> None:
        row = self._trials.get(as_int(event.get("trial")) or -1)
        if row is None:
            return
        row.status = str(event.get("status", "?"))
        row.best_metric = as_float(event.get("best_metric"))
        row.best_epoch = as_int(event.get("best_epoch"))
        row.epochs = as_int(event.get("epochs")) or 0
        row.exit_code = as_int(event.get("exit_code"))

    def _version(self, event: Mapping[str, Any], reason: str, epoch: int | None) -> None:
        version = as_int(event.get("version"))
        if version is None:
            return
        row = VersionRow(
            version=version,
            reason=reason,
            epoch=epoch,
            weights=as_weights(event.get("new")),
            old=as_weights(event.get("old")) or None,
            note=event.get("note"),
            at_epoch=self.state.epoch if epoch is None else epoch,
            trial=as_int(event.get("trial")),
        )
        self.state.last_change = row
        self.state.config_version = version
        self.state.weights = row.weights
        if self._keep_versions:
            self.versions.append(row)

    def _on_config_written(self, event: Mapping[str, Any]) -> None:
        self._version(event, str(event.get("reason", "?")), as_int(event.get("epoch")))

    def _on_manual_override(self, event: Mapping[str, Any]) -> None:
        self._flush()  # the marker goes at the epoch the edit was seen
        self._version(event, "manual_override", None)

    def _on_config_applied(self, event: Mapping[str, Any]) -> None:
        version = as_int(event.get("version"))
        rows = self.versions if self._keep_versions else [self.state.last_change]
        for row in rows:
            if row is not None and row.version == version and not row.acknowledged:
                row.applied_epoch = as_int(event.get("epoch"))
                row.latency_s = as_float(event.get("latency_s"))

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
