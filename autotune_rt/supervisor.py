"""Realtime mode: supervise one training and retune its weights through the control file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from autotune_rt._logging import EventLog, json_safe
from autotune_rt.channel import ChannelEvent, ChannelWatcher, ControlFile
from autotune_rt.console import Console, format_weights
from autotune_rt.engine import Decision, TuningEngine
from autotune_rt.exceptions import ChannelError, ConfigError
from autotune_rt.parse import EpochMetrics
from autotune_rt.session import ChildRun, RunOutcome, build_engine, new_run_id
from autotune_rt.settings import Settings, default_run_dir
from autotune_rt.space import Weights
from autotune_rt.tuner import AutoTuner

__all__ = ["Recovered", "Supervisor", "recover", "run_realtime"]


@dataclass
class _Version:
    """One control-file version and what became of it."""

    version: int
    weights: Weights
    reason: str
    written_epoch: int | None
    written_at: float
    applied_epoch: int | None = None
    latency: float | None = None
    warned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "weights": self.weights,
            "reason": self.reason,
            "written_epoch": self.written_epoch,
            "applied_epoch": self.applied_epoch,
            "latency_s": None if self.latency is None else round(self.latency, 4),
        }


class Supervisor:
    """Realtime mode: one training run whose weights change through the control file.

    Template: :meth:`run` = startup (run dir, log, lock, initial weights) -> supervise the
    child -> shutdown (summary). Subclasses may override :meth:`handle_decision`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        console: Console | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        tuner: AutoTuner | None = None,
    ) -> None:
        self.settings = settings
        self.console = console or Console(settings.lang)
        self.engine = build_engine(settings, tuner)
        self.recovered: Recovered | None = None
        if settings.resume is not None:
            self.recovered = recover(settings.resume)
            self.run_id, self.run_dir = self.recovered.run_id, settings.resume
            self.recovered.restore(self.engine)
        else:
            self.run_id = new_run_id()
            self.run_dir = settings.run_dir or default_run_dir("realtime")
        self.control = ControlFile(settings.config_file, self.run_id)
        if self.recovered is not None:
            self.control.version = self.recovered.version  # the sequence goes on, never backwards
        self.versions: list[_Version] = []
        # Versions written and not yet acknowledged, oldest first; an ack of a version
        # supersedes every older one (the training may skip a version it never saw).
        self._pending: dict[int, _Version] = {}
        self._ack_signature: tuple[int, int, int] | None = None
        self._stdout = stdout
        self._stderr = stderr
        self._warned_unacked = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events: EventLog | None = None
        self.child_run: ChildRun | None = None

    # -- startup ------------------------------------------------------------------------
    async def run(self) -> int:
        """Supervise the training to its end; return the exit code to use."""
        self._loop = asyncio.get_running_loop()
        self.control.acquire()  # LockHeldError / ChannelError before anything else happens
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.events = EventLog(self.run_dir / "events.jsonl", self.run_id)
            return await self._run_with_log(self.events)
        finally:
            self.control.release()
            if self.events is not None:
                self.events.close()

    async def _run_with_log(self, events: EventLog) -> int:
        settings = self.settings
        events.info(
            "run_started",
            mode="realtime",
            pid=os.getpid(),
            run_dir=str(self.run_dir),
            settings=settings.to_dict(),
        )
        self.console.say("run_dir", run_dir=self.run_dir)
        if self.recovered is not None:
            events.info("run_resumed", **self.recovered.to_dict())
        self._write(self.engine.weights, reason="initial" if self.recovered is None else "resume", epoch=None)
        self.console.say("config_file", path=self.control.path, version=self.control.version)
        self.console.say("command", command=" ".join(settings.command))
        env = dict(os.environ)
        env.update(
            {
                "AUTOTUNE_CONFIG_FILE": str(self.control.path),
                "PYTHONUNBUFFERED": "1",
                "AUTOTUNE_RUN_ID": self.run_id,
            }
        )
        self.child_run = ChildRun(
            settings,
            settings.command,
            self.engine,
            events,
            self.console,
            log_path=self.run_dir / "train.log",
            env=env,
            on_decision=self.handle_decision,
            on_epoch=self._on_epoch,
            on_tick=self._on_tick,
            stdout=self._stdout,
            stderr=self._stderr,
        )
        watcher = ChannelWatcher(self.control, self._on_channel_event_threadsafe)
        watching = False
        try:
            watcher.start()
            watching = True
        except Exception as exc:  # watchdog unavailable: the health check still polls
            events.warning("watcher_unavailable", error=f"{type(exc).__name__}: {exc}")
        try:
            outcome = await self.child_run.run()
        finally:
            if watching:
                watcher.stop()
        self._poll_ack()
        tracker = self.engine.tracker
        best = "n/a" if tracker.best is None else f"{tracker.best:.4f}"
        self.console.say("finished", best=best)
        self._retire_control_file()
        summary = self._summary(outcome)
        summary_path = self.run_dir / "summary.json"
        summary_path.write_text(json.dumps(json_safe(summary), indent=2, ensure_ascii=False) + "\n")
        events.info(
            "run_finished",
            exit_code=outcome.status.exit_code,
            best=tracker.best,
            best_epoch=tracker.best_epoch,
            versions=len(self.versions),
            summary=str(summary_path),
        )
        self.console.say("summary", path=summary_path)
        return outcome.status.exit_code

    def _retire_control_file(self) -> None:
        """Move the final weights from the control file into the run directory.

        A control file left behind in /tmp would be applied by the next training that uses
        the seed's snippet, even one started without autotune-rt.
        """
        assert self.events is not None
        final = self.control.last_written
        try:
            if final is not None:
                (self.run_dir / "final_config.json").write_text(final.model_dump_json(indent=2) + "\n")
            # This run held the path's lock all along: a regular file of ours there is its control
            # file (or a hand edit it adopted). Anything else someone planted is left alone.
            removed = _unlink_own_file(self.control.path)
            _unlink_own_file(self.control.ack_path)
        except OSError as exc:  # never let cleanup cost the user the summary
            self.events.warning("config_file_kept", path=str(self.control.path), error=str(exc))
            return
        if not removed:
            self.events.warning(
                "config_file_kept", path=str(self.control.path), error="not a regular file of ours"
            )
            return
        self.events.info(
            "config_file_removed",
            path=str(self.control.path),
            final_config=str(self.run_dir / "final_config.json"),
        )

    # -- decisions ----------------------------------------------------------------------
    def handle_decision(self, decision: Decision) -> None:
        """Write the decision's weights to the control file (override to do more)."""
        adjustment = decision.adjustment
        written = self._write(
            adjustment.weights,
            reason=adjustment.reason,
            epoch=decision.epoch,
            previous=adjustment.previous,
            note=adjustment.note,
        )
        if written:
            self.console.say("new_config", weights=format_weights(adjustment.weights))
        else:  # the training keeps the weights it has: so must our bookkeeping
            self.engine.undo(decision)

    def _write(
        self,
        weights: Weights,
        *,
        reason: str,
        epoch: int | None,
        previous: Weights | None = None,
        note: str | None = None,
    ) -> bool:
        """Write *weights* as a new version; False (logged, never raised) when that failed."""
        assert self.events is not None
        try:
            config = self.control.write(weights, reason=reason, epoch=epoch)
        except ChannelError as exc:
            self.events.error("config_write_failed", error=str(exc), reason=reason, weights=weights)
            self.console.say("write_failed", error=exc)
            return False
        self.engine.config_version = config.version
        self._add_version(_Version(config.version, dict(weights), reason, epoch, time.time()))
        self.events.info(
            "config_written",
            version=config.version,
            reason=reason,
            epoch=epoch,
            old=previous,
            new=dict(weights),
            note=note,
            path=str(self.control.path),
        )
        return True

    # -- acknowledgements, manual edits, deletions -----------------------------------------
    def _on_channel_event_threadsafe(self, event: ChannelEvent) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_channel_event, event)

    def _on_channel_event(self, event: ChannelEvent) -> None:
        assert self.events is not None
        if event.kind == "ack":
            self._poll_ack()
        elif event.kind == "deleted":
            self._restore()
        elif event.kind == "manual_edit" and event.config is not None:
            new = {
                k: v
                for k, v in event.config.model_dump().items()
                if k in self.engine.weights and isinstance(v, float)
            }
            old = dict(self.engine.weights)
            self.engine.weights.update(new)
            self.engine.config_version = event.config.version
            self._add_version(
                _Version(
                    event.config.version,
                    dict(self.engine.weights),
                    "manual_override",
                    self.engine.tracker.last_epoch,
                    time.time(),
                )
            )
            self.events.warning(
                "manual_override", old=old, new=dict(self.engine.weights), version=event.config.version
            )
            self.console.say("manual_override", weights=format_weights(self.engine.weights))

    def _restore(self) -> None:
        assert self.events is not None
        try:
            restored = self.control.restore_if_missing()
        except ChannelError as exc:
            self.events.error("config_restore_failed", error=str(exc))
            return
        if restored:
            self.events.warning("config_restored", version=self.control.version, path=str(self.control.path))
            self.console.say("config_restored", path=self.control.path, version=self.control.version)

    def _add_version(self, entry: _Version) -> None:
        self.versions.append(entry)
        self._pending[entry.version] = entry

    def _poll_ack(self) -> None:
        """Take in the training's acknowledgement if it changed (one stat when it did not)."""
        assert self.events is not None
        try:
            st = os.stat(self.control.ack_path)
        except OSError:
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._ack_signature or not self._pending:
            return
        self._ack_signature = signature
        ack = self.control.read_ack()
        if ack is None or ack.version is None or ack.time is None:
            return
        entry = self._pending.get(ack.version)
        if entry is None:
            return
        for version in [v for v in self._pending if v <= ack.version]:
            del self._pending[version]
        entry.applied_epoch = ack.epoch
        entry.latency = max(0.0, ack.time - entry.written_at)
        self.engine.note_applied(ack.version, ack.epoch)
        self.events.info(
            "config_applied",
            version=ack.version,
            epoch=ack.epoch,
            latency_s=round(entry.latency, 4),
            pid=ack.pid,
        )
        if entry.reason != "initial":
            self.console.say("config_applied", version=ack.version, epoch=ack.epoch, latency=entry.latency)

    def _on_epoch(self, metrics: EpochMetrics) -> None:
        self._poll_ack()
        last_epoch = self.engine.tracker.last_epoch
        if self._warned_unacked or last_epoch is None:
            return
        oldest = next((e for e in self._pending.values() if e.reason != "manual_override"), None)
        if oldest is None:
            return
        since = last_epoch - (oldest.written_epoch if oldest.written_epoch is not None else -1)
        if since > self.settings.ack_epochs:
            self._warned_unacked = True
            assert self.events is not None
            self.events.warning(
                "config_not_acknowledged",
                version=oldest.version,
                epochs=since - 1,
                path=str(self.control.path),
            )
            self.console.say(
                "not_acknowledged", path=self.control.path, version=oldest.version, epochs=since - 1
            )

    def _on_tick(self) -> None:
        self._restore()
        self._poll_ack()

    # -- shutdown -----------------------------------------------------------------------
    def _summary(self, outcome: RunOutcome) -> dict[str, Any]:
        tracker = self.engine.tracker
        versions = []
        for entry in self.versions:
            data = entry.to_dict()
            # A restart from a checkpoint can give one version several spans: list them all.
            data["epochs"] = [
                [span.first_epoch, span.last_epoch]
                for span in tracker.version_spans
                if span.version == entry.version
            ]
            versions.append(data)
        return {
            "run_id": self.run_id,
            "mode": "realtime",
            "command": self.settings.command,
            "metric": tracker.metric,
            "mode_direction": tracker.mode,
            "best_metric": tracker.best,
            "best_epoch": tracker.best_epoch,
            "epochs": outcome.epochs_parsed,
            "rejected_lines": outcome.rejected_lines,
            "last_epoch": tracker.last_epoch,
            "final_weights": self.engine.weights,
            "versions": versions,
            "decisions": [
                {
                    "epoch": d.epoch,
                    "problem": d.diagnosis.problem,
                    "evidence": d.diagnosis.evidence,
                    "old": d.adjustment.previous,
                    "new": d.adjustment.weights,
                    "note": d.adjustment.note,
                    "kind": d.kind,
                }
                for d in self.engine.decisions
            ],
            "strategy": self.engine.strategy,
            "verdicts": [v.to_dict() for v in self.engine.verdicts],
            "exit_code": outcome.status.exit_code,
            "exit": outcome.status.describe(),
            "signal": outcome.status.signal_name,
            "interrupted_by": outcome.interrupted_by,
            "last_lines": outcome.last_lines if outcome.status.exit_code != 0 else [],
            "latest_metrics": tracker.latest,
            "config_file": str(self.control.path),
            "run_dir": str(self.run_dir),
        }


def _unlink_own_file(path: Path) -> bool:
    """Remove *path* if it is a regular file of ours (True); anything else someone planted stays."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
        path.unlink()
        return True
    return False


@dataclass
class Recovered:
    """What a resumed supervisor takes over from the events log of the one that died."""

    run_id: str
    version: int
    weights: Weights
    metric: str | None
    best: float | None
    best_epoch: int | None
    last_epoch: int | None
    decisions: int
    events: int

    def restore(self, engine: TuningEngine) -> None:
        """Put the recovered weights and best value back into a fresh engine."""
        engine.weights = {**engine.weights, **self.weights}
        tracker = engine.tracker
        if self.metric is not None and tracker.metric is None:
            tracker.metric = self.metric
        tracker.best, tracker.best_epoch = self.best, self.best_epoch
        engine.trigger.adjustments = self.decisions

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "run_id"}


def recover(run_dir: Path) -> Recovered:
    """Read back run id, weights, version, best metric and decisions from ``events.jsonl``.

    Raises:
        ConfigError: *run_dir* has no readable events log of a realtime run.
    """
    path = run_dir / "events.jsonl"
    found: dict[str, Any] = {
        "run_id": None,
        "version": 0,
        "weights": {},
        "metric": None,
        "best": None,
        "best_epoch": None,
        "last_epoch": None,
        "decisions": 0,
        "events": 0,
    }
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(
            f"cannot resume from {run_dir}: {exc.strerror or exc}; pass the run directory "
            f"of the interrupted realtime run"
        ) from None
    with handle:
        for line in handle:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line torn by the kill: skip it
            found["events"] += 1
            found["run_id"] = found["run_id"] or event.get("run_id")
            kind = event.get("event")
            if kind in ("config_written", "manual_override") and isinstance(event.get("new"), dict):
                found["version"] = max(found["version"], int(event.get("version") or 0))
                found["weights"] = event["new"]
            elif kind == "epoch":
                found.update(
                    metric=event.get("metric"),
                    best=event.get("best"),
                    best_epoch=event.get("best_epoch"),
                    last_epoch=event.get("epoch"),
                )
            elif kind == "diagnosis":
                found["decisions"] += 1
    if not found["run_id"]:
        raise ConfigError(f"cannot resume from {run_dir}: {path.name} holds no autotune-rt events")
    if isinstance(found["best"], str):  # a non-finite best was logged as a string
        found["best"] = None
    return Recovered(**found)


def run_realtime(settings: Settings, **kwargs: Any) -> int:
    """Run realtime mode to the end (blocking); return the exit code."""
    supervisor = Supervisor(settings, **kwargs)
    return asyncio.run(supervisor.run())
