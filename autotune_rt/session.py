"""One supervised training run: output -> parse -> engine, health checks, signals, clean stop.

Realtime mode runs one :class:`ChildRun`; batch mode runs one per trial. They differ only in
what they do with a :class:`~autotune_rt.engine.Decision`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from autotune_rt._logging import EventLog
from autotune_rt._process import ChildProcess, ExitStatus
from autotune_rt.console import Console, format_weights
from autotune_rt.engine import Decision, TuningEngine
from autotune_rt.parse import EpochMetrics, LineParser
from autotune_rt.settings import Settings
from autotune_rt.space import Weights, load_search_space
from autotune_rt.tracker import MetricTracker, Observation
from autotune_rt.trigger import Trigger
from autotune_rt.tuner import AdaptiveTuner, AutoTuner, load_tuner_class

__all__ = [
    "FORWARDED_SIGNALS",
    "ChildRun",
    "RunOutcome",
    "build_engine",
    "make_tuner",
    "new_run_id",
    "total_epochs",
]

# Signals the supervisor forwards to the training's process group.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def new_run_id() -> str:
    """A short random id that ties events, control file and summary together."""
    return uuid.uuid4().hex[:12]


def make_tuner(settings: Settings) -> AutoTuner:
    """The tuner *settings* ask for: ``--tuner`` or the mode's class, ``--search_space``, ``--seed``.

    Raises:
        ConfigError: A bad search-space file or tuner class, or an initial weight outside
            the search space.
    """
    space = load_search_space(settings.search_space) if settings.search_space else None
    default_cls: type[AutoTuner] = AdaptiveTuner if settings.mode_name == "realtime" else AutoTuner
    tuner_cls = load_tuner_class(settings.tuner) if settings.tuner else default_cls
    tuner = tuner_cls(space, seed=settings.seed)
    tuner.search_space.check_initial(settings.weights)
    return tuner


def build_engine(
    settings: Settings, tuner: AutoTuner | None = None, weights: Weights | None = None
) -> TuningEngine:
    """Wire tracker, trigger and tuner from *settings* (the same for both modes).

    Args:
        settings: The run's settings.
        tuner: The tuner to use (batch mode shares one across trials); default: a new one.
        weights: The weights the training starts with; default: the initial ones.
    """
    if tuner is None:
        tuner = make_tuner(settings)
    tracker = MetricTracker(
        settings.metric, settings.mode, min_delta=settings.min_delta, relative=settings.relative_delta
    )
    trigger = Trigger(
        min_epochs=settings.min_epochs,
        patience=settings.patience,
        cooldown=settings.cooldown,
        max_adjustments=settings.max_adjustments,
    )
    # Batch trials never change weights mid-run: their decision only proposes the next trial.
    strategy = settings.strategy if settings.mode_name == "realtime" else "seed"
    return TuningEngine(
        tracker,
        trigger,
        tuner,
        dict(settings.weights if weights is None else weights),
        names=settings.names,
        thresholds=settings.thresholds,
        strategy=strategy,
    )


def total_epochs(command: list[str]) -> int | None:
    """The training's epoch count when its command line says it (``--epochs N``)."""
    for i, arg in enumerate(command):
        value = None
        if arg == "--epochs" and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith("--epochs="):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class RunOutcome:
    """What one supervised child run produced."""

    status: ExitStatus
    engine: TuningEngine
    interrupted_by: str | None
    last_lines: list[str]
    epochs_parsed: int
    stopped_early: bool = False
    rejected_lines: int = 0


@dataclass
class _SignalState:
    received: list[str] = field(default_factory=list)
    stopping: asyncio.Future[ExitStatus] | None = None
    killing: asyncio.Future[ExitStatus] | None = None
    early: int | None = None  # a signal that came before the child had started


class ChildRun:
    """Run one training child: stream its output into the engine, watch its health, stop it cleanly.

    Realtime and batch mode both run their children through this class; they differ only
    in what they do with a :class:`Decision` (``on_decision``).
    """

    def __init__(
        self,
        settings: Settings,
        command: list[str],
        engine: TuningEngine,
        events: EventLog,
        console: Console,
        *,
        log_path: Path,
        env: dict[str, str],
        on_decision: Callable[[Decision], None],
        on_epoch: Callable[[EpochMetrics], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        label: str = "",
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.events = events
        self.console = console
        self.on_decision = on_decision
        self.on_epoch = on_epoch
        self.on_tick = on_tick
        self.label = label
        self.total_epochs = total_epochs(command)
        self._started = time.monotonic()
        self.parser = LineParser(key_value=settings.key_value, pattern=settings.metric_regex)
        self.epochs_parsed = 0
        self._unparsed = 0
        self._engine_errors: set[str] = set()
        self._warned_missing_metric = False
        self._signals = _SignalState()
        self._stop_requested = False
        self._stall_warned = False
        self._handle_signals = handle_signals  # False: the caller owns them (batch)
        self._command = list(command)
        self.child = ChildProcess(
            command,
            env=env,
            log_path=log_path,
            stdout_sink="terminal" if stdout is None else stdout,
            stderr_sink="terminal" if stderr is None else stderr,
            on_line=self._on_line,
            line_needles=self.parser.needles,
        )

    # -- output -> parse -> engine ------------------------------------------------------
    def _on_line(self, stream: str, raw: bytes) -> None:
        metrics = self.parser.parse(raw)
        if metrics is None:
            self._unparsed += 1
            return
        try:
            self._observe(metrics)
        except Exception as exc:  # the tuner must never block the training's output
            kind = type(exc).__name__
            if kind not in self._engine_errors:
                self._engine_errors.add(kind)
                self.events.error(
                    "engine_error", error=f"{kind}: {exc}", line=raw[:300].decode(errors="replace")
                )

    def _observe(self, metrics: EpochMetrics) -> None:
        step = self.engine.observe(metrics)
        observation = step.observation
        if observation is None:
            return
        if not observation.duplicate:
            self._record_epoch(metrics, observation)
        if step.verdict is not None:
            verdict = step.verdict
            self.events.info("verdict", **verdict.to_dict())
            best, previous = (
                "n/a" if v is None else f"{v:.4f}" for v in (verdict.window_best, verdict.previous_best)
            )
            window = f"{verdict.window[0]}-{verdict.window[1]}"
            self.console.say(
                "verdict",
                version=verdict.version,
                outcome=verdict.outcome,
                window=window,
                best=best,
                previous=previous,
            )
        if step.decision is not None:
            self._report_decision(step.decision)

    def _record_epoch(self, metrics: EpochMetrics, observation: Observation) -> None:
        tracker = self.engine.tracker
        self.epochs_parsed += 1
        if metrics.total is not None:  # what the training prints beats what its command says
            self.total_epochs = metrics.total
        self.events.info(
            "epoch",
            epoch=observation.epoch,
            metrics=metrics.metrics,
            metric=tracker.metric,
            value=observation.value,
            improved=observation.improved,
            best=tracker.best,
            best_epoch=tracker.best_epoch,
            since_improvement=tracker.epochs_since_improvement,
            config_version=self.engine.config_version,
            restarted=observation.restarted,
        )
        self._check_metric_present(metrics)
        if self.on_epoch is not None:
            self.on_epoch(metrics)

    def _report_decision(self, decision: Decision) -> None:
        tracker = self.engine.tracker
        diagnosis = decision.diagnosis
        if decision.kind == "rollback":
            verdict = decision.verdict
            self.events.warning(
                "rollback",
                epoch=decision.epoch,
                version=None if verdict is None else verdict.version,
                old=decision.adjustment.previous,
                new=decision.adjustment.weights,
                evidence=None if verdict is None else verdict.to_dict(),
            )
            self.console.say(
                "rollback",
                version=None if verdict is None else verdict.version,
                weights=format_weights(decision.adjustment.weights),
            )
            self.on_decision(decision)
            return
        self.events.info(
            "trigger",
            epoch=decision.epoch,
            since_improvement=tracker.epochs_since_improvement,
            best=tracker.best,
            best_epoch=tracker.best_epoch,
        )
        self.events.info(
            "diagnosis",
            epoch=decision.epoch,
            problem=diagnosis.problem,
            evidence=diagnosis.evidence,
            missing=list(diagnosis.missing),
        )
        self.console.say("stagnation")
        evidence = ", ".join(f"{k}={v:.4g}" for k, v in diagnosis.evidence.items())
        self.console.say("diagnosis", epoch=decision.epoch, problem=diagnosis.problem, evidence=evidence)
        self.on_decision(decision)

    def _check_metric_present(self, metrics: EpochMetrics) -> None:
        wanted = self.settings.metric
        if wanted is None or self._warned_missing_metric or wanted in metrics.metrics:
            return
        self._warned_missing_metric = True
        available = ", ".join(sorted(metrics.metrics))
        self.events.warning("metric_missing", metric=wanted, available=sorted(metrics.metrics))
        self.console.say("metric_missing", metric=wanted, available=available)

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self) -> RunOutcome:
        """Start the child, supervise it to the end, and return what happened."""
        loop = asyncio.get_running_loop()
        await self.child.start()
        self.events.info("child_started", pid=self.child.pid, command=self.child_command)
        if self._signals.early is not None:
            self._stop_with(self._signals.early)
        installed: list[int] = []
        for sig in FORWARDED_SIGNALS if self._handle_signals else ():
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, self.on_signal, sig)
                installed.append(sig)
        health = asyncio.create_task(self._health_loop())
        try:
            status = await self.child.wait()
            if self._signals.stopping is not None:
                status = await self._signals.stopping
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
            for signum in installed:
                loop.remove_signal_handler(signum)
        interrupted = self._signals.received[0] if self._signals.received else None
        self.events.info(
            "child_exited",
            pid=self.child.pid,
            returncode=status.returncode,
            exit_code=status.exit_code,
            signal=status.signal_name,
            description=status.describe(),
            epochs=self.epochs_parsed,
            rejected_lines=self.rejected_lines,
            dropped_terminal_bytes=self.child.dropped_terminal_bytes,
            last_lines=self.child.last_lines(20) if status.exit_code != 0 else [],
        )
        self.console.say("child_exited", description=status.describe())
        return RunOutcome(
            status=status,
            engine=self.engine,
            interrupted_by=interrupted,
            last_lines=self.child.last_lines(20),
            epochs_parsed=self.epochs_parsed,
            stopped_early=self._stop_requested,
            rejected_lines=self.rejected_lines,
        )

    @property
    def rejected_lines(self) -> int:
        """Metric-looking lines (holding a needle such as ``{``) that did not parse, or were too
        long to try."""
        return self._unparsed + self.child.too_long_lines

    @property
    def child_command(self) -> list[str]:
        """The command line the child runs."""
        return list(self._command)

    def request_stop(self) -> None:
        """Stop the child gracefully (batch ``--stop_on_stagnation``)."""
        if self._signals.stopping is None:
            self._stop_requested = True
            self._stop_with(signal.SIGTERM)

    def on_signal(self, sig: int) -> None:
        """Forward *sig* to the training once; a second SIGINT kills the tree at once."""
        name = signal.Signals(sig).name
        first = not self._signals.received
        self._signals.received.append(name)
        self.events.warning("signal_received", signal=name, first=first)
        if self.child.pid is None:  # not started yet: run() stops it as soon as it is
            self._signals.early = self._signals.early or sig
            return
        if first:
            self.console.say("signal", signal=name, grace=self.settings.grace_period)
            self._stop_with(sig)
        elif sig == signal.SIGINT:  # a second Ctrl-C: do not wait for the grace period
            self.events.warning("kill_now", reason="second SIGINT")
            self._signals.killing = asyncio.ensure_future(self.child.kill_now())

    def _stop_with(self, sig: int) -> None:
        if self._signals.stopping is None:
            self._signals.stopping = asyncio.ensure_future(
                self.child.terminate(self.settings.grace_period, sig)
            )

    async def _health_loop(self) -> None:
        interval = self.settings.check_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self._health_check()
            except Exception as exc:  # health checks are advisory; never stop supervision
                self.events.error("health_error", error=f"{type(exc).__name__}: {exc}")

    def _health_check(self) -> None:
        stats = self.child.tree_stats()
        if stats is not None:
            self.events.info(
                "health",
                cpu_percent=round(stats.cpu_percent, 1),
                rss=stats.rss,
                nprocs=stats.nprocs,
                bytes_out=self.child.bytes_out,
                lines_out=self.child.lines_out,
            )
        silent = time.monotonic() - self.child.last_output_at
        if silent >= self.settings.stall_timeout:
            if not self._stall_warned:
                self._stall_warned = True
                self.events.warning("child_stalled", silent_seconds=round(silent, 1))
                self.console.say("stalled", seconds=silent)
        else:
            self._stall_warned = False
        self._report_progress()
        if self.on_tick is not None:
            self.on_tick()

    def _report_progress(self) -> None:
        """Epoch e/E and the time left, when the command says how many epochs it runs."""
        done, total = self.epochs_parsed, self.total_epochs
        if not total or not done:
            return
        elapsed = time.monotonic() - self._started
        left = elapsed / done * max(total - done, 0)
        self.events.info("progress", epoch=done, epochs=total, elapsed_s=round(elapsed), left_s=round(left))
        self.console.say("progress", label=self.label, done=done, total=total, left=_duration(left))
