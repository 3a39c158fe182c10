"""Batch mode (the seed's scheme 1): rerun whole trainings with adjusted weights, keep the best.

Policy for the next trial's weights (documented in docs/batch.md):

1. The *reference* is the best trial so far (ties keep the earlier one).
2. If the latest trial is the reference and it stagnated, the move diagnosed at that
   moment is taken (the seed's behaviour). Otherwise the reference trial's final metrics
   are diagnosed and the move is made from the reference weights: a worse trial is a
   step that did not pay off, so we go back to the best point and try another step
   (hill climbing), instead of walking further away from it.
3. A failed trial (non-zero exit, or no epoch parsed) is recorded and followed by a
   random perturbation of the reference weights.
4. Weights already run in this batch are never run again: the tuner's move is replaced by
   fresh perturbations, then by any untried grid neighbour; when none is left the batch
   says so and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from autotune_rt._logging import EventLog, json_safe
from autotune_rt.channel import ControlFile
from autotune_rt.console import Console, format_weights
from autotune_rt.diagnose import Diagnosis, diagnose
from autotune_rt.engine import Decision
from autotune_rt.exceptions import ChannelError, ConfigError
from autotune_rt.session import FORWARDED_SIGNALS, ChildRun, build_engine, make_tuner, new_run_id
from autotune_rt.settings import Settings, default_run_dir
from autotune_rt.space import Weights
from autotune_rt.strategy import judge_trial
from autotune_rt.tuner import AutoTuner

__all__ = ["BatchRunner", "Trial", "run_batch", "trial_command"]

STATE_FILE = "state.json"
# How many random perturbations to try before walking the grid for an untried point.
PERTURB_ATTEMPTS = 50


@dataclass
class Trial:
    """One finished (or failed) training of the batch."""

    number: int
    weights: Weights
    command: list[str]
    status: str = "pending"  # ok | stopped_early | failed | interrupted
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    exit_code: int | None = None
    exit: str | None = None
    diagnosis: dict[str, Any] | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    last_lines: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    # Adaptive strategy: outcome against the best earlier trial, with the evidence.
    verdict: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """A trial that counts (resume reruns interrupted ones)."""
        return self.status in ("ok", "stopped_early", "failed")


def trial_command(base: list[str], weights: Weights, *, with_grad_norm: bool) -> list[str]:
    """The training command with the trial's weights appended as its own options."""
    command = list(base)
    for name, value in weights.items():
        if name == "max_grad_norm" and not with_grad_norm:
            continue
        command += [f"--{name}", f"{value:g}"]
    return command


def _key(weights: Weights) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, round(value, 9)) for name, value in weights.items()))


def _atomic_write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(json_safe(data), handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class BatchRunner:
    """Runs trials in sequence, each supervised exactly like realtime mode."""

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
        self._stdout = stdout
        self._stderr = stderr
        self.tuner = tuner if tuner is not None else make_tuner(settings)
        self.trials: list[Trial] = []
        self.next_weights: Weights = dict(settings.weights)
        self.run_id = new_run_id()
        self.run_dir = settings.resume or settings.run_dir or default_run_dir("batch")
        self.interrupted = False
        self.exhausted = False
        self.events: EventLog | None = None
        self._current: ChildRun | None = None
        self._pending_decision: Decision | None = None
        if settings.resume is not None:
            self._load_state(settings.resume)
        # The random stream as it stands before the next trial: what resume restores, so an
        # interrupted trial's own draws do not shift the stream.
        self._rng_checkpoint = self.tuner.rng.getstate()

    # -- state (resume) -----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "trials": [asdict(t) for t in self.trials],
            "next_weights": self.next_weights,
            "rng_state": _rng_to_json(self._rng_checkpoint),
            "exhausted": self.exhausted,
        }

    def _load_state(self, run_dir: Path) -> None:
        path = run_dir / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot resume from {run_dir}: {path.name} unreadable ({exc}); "
                f"pass the run directory of an earlier batch"
            ) from None
        self.run_id = state["run_id"]
        self.trials = [Trial(**t) for t in state["trials"] if t["status"] != "interrupted"]
        self.next_weights = state["next_weights"]
        self.tuner.rng.setstate(_rng_from_json(state["rng_state"]))
        self.exhausted = bool(state.get("exhausted", False))

    def _save_state(self) -> None:
        _atomic_write_json(self.run_dir / STATE_FILE, self._state())

    # -- the batch ----------------------------------------------------------------------
    async def run(self) -> int:
        """Run the remaining trials; return 0 if any trial succeeded, 130 if interrupted, else 1."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.run_dir / "events.jsonl", self.run_id)
        control: ControlFile | None = None
        try:
            self.events.info(
                "run_started",
                mode="batch",
                pid=os.getpid(),
                run_dir=str(self.run_dir),
                settings=self.settings.to_dict(),
                resumed_trials=len(self.trials),
            )
            self.console.say("run_dir", run_dir=self.run_dir)
            if self.settings.write_config:
                control = ControlFile(self.settings.config_file, self.run_id)
                control.acquire()
            total = self.settings.max_trials
            self._catch_signals(True)
            while len(self.trials) < total and not self.exhausted and not self.interrupted:
                await self._run_trial(len(self.trials) + 1, total, control)
            return self._finish()
        finally:
            self._catch_signals(False)
            if control is not None:
                control.release()
            self.events.close()

    def _catch_signals(self, on: bool) -> None:
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                if on:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                else:
                    loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        """The batch owns the signals for its whole run: a trial's child gets them forwarded,
        and between trials they just end the batch (after its summary)."""
        if self._current is not None:
            self._current.on_signal(sig)
            return
        assert self.events is not None
        self.interrupted = True
        self.events.warning("signal_received", signal=signal.Signals(sig).name, between_trials=True)

    async def _run_trial(self, number: int, total: int, control: ControlFile | None) -> None:
        assert self.events is not None
        settings = self.settings
        weights = dict(self.next_weights)
        grad_norm = settings.max_grad_norm_set or weights.get("max_grad_norm") != settings.weights.get(
            "max_grad_norm"
        )
        command = trial_command(settings.command, weights, with_grad_norm=grad_norm)
        trial = Trial(number=number, weights=weights, command=command)
        trial_dir = self.run_dir / f"trial_{number:03d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        log_path = trial_dir / "train.log"
        if log_path.exists():  # a resumed batch reruns an interrupted trial: keep its old log aside
            log_path.replace(trial_dir / "train.interrupted.log")
        self.events.bind(trial=number)
        self.console.say("trial_start", trial=number, trials=total)
        self.console.say("command", command=shlex.join(command))
        if control is not None:
            try:
                control.write(weights, reason=f"trial_{number}", epoch=None)
            except ChannelError as exc:
                self.events.error("config_write_failed", error=str(exc))
        self.events.info("trial_started", weights=weights, command=command, dir=str(trial_dir))
        engine = build_engine(settings, self.tuner, weights)
        engine.trigger.max_adjustments = 1  # one diagnosis per trial: the next trial's move
        self._pending_decision = None
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "AUTOTUNE_CONFIG_FILE": str(settings.config_file),
                "AUTOTUNE_RUN_ID": self.run_id,
            }
        )
        run = ChildRun(
            settings,
            command,
            engine,
            self.events,
            self.console,
            log_path=log_path,
            env=env,
            on_decision=self._on_decision,
            stdout=self._stdout,
            stderr=self._stderr,
            label=f"trial {number}/{total}: ",
            handle_signals=False,  # the batch owns them: see _on_signal
        )
        self._current = run
        started = time.monotonic()
        outcome = await run.run()
        self._current = None
        tracker = engine.tracker
        trial.duration_s = round(time.monotonic() - started, 3)
        trial.best_metric, trial.best_epoch = tracker.best, tracker.best_epoch
        trial.epochs, trial.final_metrics = outcome.epochs_parsed, dict(tracker.latest)
        trial.exit_code, trial.exit = outcome.status.exit_code, outcome.status.describe()
        if self._pending_decision is not None:
            trial.diagnosis = {
                "epoch": self._pending_decision.epoch,
                **self._pending_decision.diagnosis.to_dict(),
            }
        if outcome.interrupted_by is not None:
            trial.status = "interrupted"
            self.interrupted = True
        elif outcome.stopped_early:
            trial.status = "stopped_early"
        elif outcome.status.exit_code != 0 or outcome.epochs_parsed == 0 or tracker.best is None:
            trial.status = "failed"
            trial.last_lines = outcome.last_lines
            reason = (
                outcome.status.describe() if outcome.status.exit_code != 0 else "no epoch line was parsed"
            )
            self.console.say("trial_failed", trial=number, description=reason)
        else:
            trial.status = "ok"
        reference = self.best_trial()
        if settings.strategy == "adaptive" and reference is not None and not self.interrupted:
            trial.verdict = {
                "outcome": judge_trial(trial.best_metric, reference.best_metric, tracker),
                "best_metric": trial.best_metric,
                "reference_trial": reference.number,
                "reference_best": reference.best_metric,
            }
        self.trials.append(trial)
        self.events.info(
            "trial_finished",
            status=trial.status,
            best_metric=trial.best_metric,
            best_epoch=trial.best_epoch,
            epochs=trial.epochs,
            exit_code=trial.exit_code,
            last_lines=trial.last_lines,
            verdict=trial.verdict,
        )
        if trial.best_metric is not None:
            self.console.say("finished", best=f"{trial.best_metric:.4f}")
        if not self.interrupted:
            self._choose_next(trial)
            self._rng_checkpoint = self.tuner.rng.getstate()
            self._save_state()
        self.events.unbind("trial")

    def _on_decision(self, decision: Decision) -> None:
        assert self.events is not None
        self._pending_decision = decision
        self.console.say("new_config", weights=format_weights(decision.adjustment.weights))
        self.events.info(
            "candidate_config",
            epoch=decision.epoch,
            problem=decision.diagnosis.problem,
            old=decision.adjustment.previous,
            new=decision.adjustment.weights,
            note=decision.adjustment.note,
        )
        if self.settings.stop_on_stagnation and self._current is not None:
            trial = len(self.trials) + 1
            self.console.say("stop_trial", trial=trial)
            self.events.info("stop_on_stagnation", epoch=decision.epoch)
            self._current.request_stop()

    # -- choosing the next weights ----------------------------------------------------------
    def best_trial(self) -> Trial | None:
        """The best trial so far by its best metric (the earliest among equals)."""
        best: Trial | None = None
        sign = 1.0 if self.settings.mode == "max" else -1.0
        for trial in self.trials:
            if trial.best_metric is None or not math.isfinite(trial.best_metric):
                continue
            if best is None or sign * trial.best_metric > sign * (best.best_metric or 0.0):
                best = trial
        return best

    def _choose_next(self, latest: Trial) -> None:
        assert self.events is not None
        if len(self.trials) >= self.settings.max_trials:
            return
        reference = self.best_trial()
        base = reference.weights if reference is not None else latest.weights
        if latest.status == "failed" or reference is None:
            adjustment = self.tuner.perturb(dict(base), "failed_trial")
            basis = "failed trial: random perturbation of the best weights"
        elif reference is latest and self._pending_decision is not None:
            adjustment = self._pending_decision.adjustment
            basis = "diagnosis during this trial"
        else:
            diagnosis: Diagnosis = diagnose(
                reference.final_metrics, self.settings.names, self.settings.thresholds
            )
            adjustment = self.tuner.tune(diagnosis, dict(base))
            basis = f"final metrics of trial {reference.number} (the best so far)"
        weights = self._untried(adjustment.weights, base)
        if weights is None:
            self.exhausted = True
            self.events.warning("space_exhausted", tried=len(self.trials))
            self.console.say("space_exhausted")
            return
        if weights != adjustment.weights or not (reference is latest and self._pending_decision is not None):
            self.console.say("new_config", weights=format_weights(weights))
        self.next_weights = weights
        self.events.info(
            "next_config",
            weights=weights,
            basis=basis,
            reason=adjustment.reason,
            reference_trial=None if reference is None else reference.number,
            replaced_duplicate=weights != adjustment.weights,
        )

    def _untried(self, candidate: Weights, base: Weights) -> Weights | None:
        tried = {_key(t.weights) for t in self.trials}
        if _key(candidate) not in tried:
            return candidate
        for _ in range(PERTURB_ATTEMPTS):
            weights, _moves = self.tuner.search_space.perturb(dict(base), self.tuner.rng)
            if _key(weights) not in tried:
                return weights
        for trial in sorted(self.trials, key=lambda t: -(t.best_metric or -math.inf)):
            for _move, weights in self.tuner.search_space.neighbours(trial.weights):
                if _key(weights) not in tried:
                    return weights
        return None

    # -- the end ------------------------------------------------------------------------
    def _finish(self) -> int:
        assert self.events is not None
        best = self.best_trial()
        table = self._table()
        self.console.write(table)
        summary: dict[str, Any] = {
            "run_id": self.run_id,
            "mode": "batch",
            "command": self.settings.command,
            "metric_mode": self.settings.mode,
            "trials": [asdict(t) for t in self.trials],
            "interrupted": self.interrupted,
            "space_exhausted": self.exhausted,
            "best_trial": None if best is None else best.number,
            "best_metric": None if best is None else best.best_metric,
            "best_weights": None if best is None else best.weights,
            "rerun_command": None,
            "run_dir": str(self.run_dir),
        }
        if best is not None:
            rerun = trial_command(self.settings.command, best.weights, with_grad_norm=True)
            summary["rerun_command"] = shlex.join(rerun)
            best_config = {
                **best.weights,
                "version": 1,
                "reason": f"best of batch (trial {best.number})",
                "epoch": best.best_epoch,
                "run_id": self.run_id,
                "best_metric": best.best_metric,
            }
            _atomic_write_json(self.run_dir / "best_config.json", best_config)
            self.console.say(
                "best_config",
                trial=best.number,
                best=f"{best.best_metric:.4f}",
                weights=format_weights(best.weights),
            )
            self.console.say("rerun", command=shlex.join(rerun))
        _atomic_write_json(self.run_dir / "summary.json", summary)
        self._save_state()
        self.events.info(
            "run_finished",
            trials=len(self.trials),
            best_trial=summary["best_trial"],
            best_metric=summary["best_metric"],
            interrupted=self.interrupted,
        )
        self.console.say("summary", path=self.run_dir / "summary.json")
        if self.interrupted:
            return 130
        return 0 if any(t.status in ("ok", "stopped_early") for t in self.trials) else 1

    def _table(self) -> str:
        names = list(self.settings.weights)
        header = ["trial", *names, "best_metric", "best_epoch", "epochs", "status"]
        rows = [header]
        for t in self.trials:
            best = "-" if t.best_metric is None else f"{t.best_metric:.4f}"
            rows.append(
                [
                    str(t.number),
                    *(f"{t.weights.get(n, float('nan')):g}" for n in names),
                    best,
                    "-" if t.best_epoch is None else str(t.best_epoch),
                    str(t.epochs),
                    t.status,
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def run_batch(settings: Settings, **kwargs: Any) -> int:
    """Run batch mode to the end (blocking); return the exit code."""
    runner = BatchRunner(settings, **kwargs)
    return asyncio.run(runner.run())
