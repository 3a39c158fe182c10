"""Incremental best / epochs-since-improvement / config-version bookkeeping of one training run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune_rt.exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from autotune_rt.parse import EpochMetrics

__all__ = ["DEFAULT_METRIC_CANDIDATES", "MetricTracker", "Observation", "VersionSpan"]

# The seed optimises the first of these that the training prints.
DEFAULT_METRIC_CANDIDATES = ("best_metric", "acc1", "acc")


@dataclass(frozen=True, slots=True)
class Observation:
    """What one metric line changed.

    Attributes:
        epoch: The epoch the line was attributed to.
        value: The optimised metric's value this line contributed (may be nan/inf); None when
            the line lacks the metric, or repeats an epoch that already has its value.
        improved: The value beat the best so far (and is now the best).
        duplicate: The epoch had already been counted; the line did not count a new epoch.
        restarted: The epoch is lower than the last one (resumed from a checkpoint).
    """

    epoch: int
    value: float | None
    improved: bool
    duplicate: bool
    restarted: bool


@dataclass(slots=True)
class VersionSpan:
    """A run of consecutive epochs observed while one config version was in effect."""

    version: int
    first_epoch: int
    last_epoch: int


class MetricTracker:
    """Follow one optimised metric through a stream of :class:`EpochMetrics`, in O(1) per line.

    Nothing per epoch is kept: only the best value, counters, the merged latest value of every
    metric, and one :class:`VersionSpan` per config change or restart.

    Rules:

    * **Epoch number**: ``em.epoch``, else the line continues the current epoch when that
      epoch has no value of the metric yet and the line brings one (a separate validation
      line), else it is ``last_epoch + 1`` (the first epoch is 0).
    * **Duplicates**: a repeated epoch number (several ranks printing, a train and a
      validation line) does not count again. It can still supply the metric's value when the
      epoch's earlier lines lacked it; metric keys not yet reported for the epoch are merged
      into ``latest``, keys already reported keep their first value.
    * **Restarts**: an epoch lower than the last one is a resume from a checkpoint. It is
      recorded in ``restarts`` as ``(from, to)``, counts as a new epoch and starts a new
      version span; the best value is kept.
    * **Improvement**: the first finite value always improves. Later, in ``max`` mode a value
      improves when ``value > best + delta`` (``min`` mode: ``value < best - delta``), where
      ``delta`` is ``min_delta``, or ``abs(best) * min_delta`` when ``relative``. nan and inf
      never improve.
    * **Epochs without the metric**: a line with an epoch number but without the metric
      counts as an epoch with value None, i.e. an epoch without improvement, so a training
      that stops reporting the metric still runs into its patience. ``last_value`` stays None
      until a line brings the value, so a trigger can wait for it.
    * **Lines with neither an epoch nor the metric** (step logs) only update ``latest``.

    Attributes:
        metric: The optimised metric; None until auto-resolved from the first line with an
            epoch number that carries one of :data:`DEFAULT_METRIC_CANDIDATES`. Lines without
            an epoch number do not resolve it, because step logs often carry a training-batch
            ``acc``; pass ``metric`` for a training that prints no epoch numbers.
        mode: ``"max"`` or ``"min"``.
        min_delta: The improvement threshold (absolute, or a fraction of ``abs(best)``).
        relative: Whether ``min_delta`` is relative.
        best: The best finite value so far, or None.
        best_epoch: The epoch of ``best``, or None.
        epochs_seen: Distinct epochs counted (restarted epochs count again).
        epochs_since_improvement: Counted epochs since the last improvement.
        last_epoch: The current epoch, or None before the first.
        last_value: The current epoch's value of the metric, or None when not (yet) reported.
        latest: The latest value of every metric seen.
        restarts: ``(from_epoch, to_epoch)`` of every resume from a checkpoint.
        version_spans: Which config version was in effect at which epochs.
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: Literal["max", "min"] = "max",
        min_delta: float = 0.0,
        relative: bool = False,
    ) -> None:
        """Create an empty tracker.

        Args:
            metric: The metric to optimise; None picks the first of
                :data:`DEFAULT_METRIC_CANDIDATES` that the training prints.
            mode: ``"max"`` if larger is better, ``"min"`` if smaller is better.
            min_delta: How much a value must beat the best by to count as an improvement.
            relative: Read ``min_delta`` as a fraction of ``abs(best)``.

        Raises:
            ConfigError: ``mode`` is not max/min, or ``min_delta`` is negative or not finite.
        """
        if mode not in ("max", "min"):
            raise ConfigError(f"--mode must be 'max' or 'min' (got {mode!r})")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ConfigError(f"--min_delta must be a finite number >= 0 (got {min_delta})")
        self.metric: str | None = metric
        self.mode: Literal["max", "min"] = mode
        self.min_delta = float(min_delta)
        self.relative = relative
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.epochs_seen = 0
        self.epochs_since_improvement = 0
        self.last_epoch: int | None = None
        self.last_value: float | None = None
        self.latest: dict[str, float] = {}
        self.restarts: list[tuple[int, int]] = []
        self.version_spans: list[VersionSpan] = []
        # Keys already reported for the current epoch: a duplicate line must not overwrite
        # them, so ``latest`` keeps agreeing with the value the tracker judged.
        self._epoch_keys: set[str] = set()

    def is_better(self, a: float, b: float | None) -> bool:
        """Return whether *a* beats *b* by this tracker's mode and threshold.

        Args:
            a: The candidate value.
            b: The reference value; None means "nothing yet", which any finite *a* beats.

        Returns:
            False whenever *a* is nan or infinite.
        """
        if not math.isfinite(a):
            return False
        if b is None:
            return True
        delta = abs(b) * self.min_delta if self.relative else self.min_delta
        return a > b + delta if self.mode == "max" else a < b - delta

    def update(self, em: EpochMetrics, config_version: int = 0) -> Observation | None:
        """Take in one parsed metric line.

        Args:
            em: The parsed line.
            config_version: The control-file version in effect while this epoch ran.

        Returns:
            What the line changed; None when it carries neither an epoch nor the metric.
        """
        if self.metric is None and em.epoch is not None:
            self.metric = next((m for m in DEFAULT_METRIC_CANDIDATES if m in em.metrics), None)
        value = em.metrics.get(self.metric) if self.metric is not None else None

        if em.epoch is None and value is None:
            self.latest.update(em.metrics)
            return None
        epoch = em.epoch
        if epoch is None:
            if self.last_epoch is not None and self.last_value is None:
                # An unnumbered line with the metric completes an epoch that still lacks it.
                epoch = self.last_epoch
            else:
                epoch = self._next_epoch()

        if epoch == self.last_epoch:
            return self._repeat(epoch, em.metrics, value)

        restarted = False
        if self.last_epoch is not None and epoch < self.last_epoch:
            restarted = True
            self.restarts.append((self.last_epoch, epoch))
        self._record_span(epoch, config_version, force_new=restarted)
        self.last_epoch = epoch
        self.last_value = value
        self.epochs_seen += 1
        self.latest.update(em.metrics)
        self._epoch_keys = set(em.metrics)
        improved = value is not None and self._judge(value, epoch)
        if not improved:
            self.epochs_since_improvement += 1
        return Observation(epoch, value, improved, duplicate=False, restarted=restarted)

    def to_dict(self) -> dict[str, Any]:
        """Return the state as plain data for the run summary.

        Values in ``latest`` may be nan/inf; pass the result through a JSON-safe encoder.
        """
        return {
            "metric": self.metric,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "relative": self.relative,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs_seen": self.epochs_seen,
            "epochs_since_improvement": self.epochs_since_improvement,
            "last_epoch": self.last_epoch,
            "latest": dict(self.latest),
            "restarts": [list(r) for r in self.restarts],
            "version_spans": [
                {"version": s.version, "first_epoch": s.first_epoch, "last_epoch": s.last_epoch}
                for s in self.version_spans
            ],
        }

    def _next_epoch(self) -> int:
        return 0 if self.last_epoch is None else self.last_epoch + 1

    def _repeat(self, epoch: int, metrics: dict[str, float], value: float | None) -> Observation:
        """Handle another line for the current epoch: merge new keys, accept a late value."""
        for key, val in metrics.items():
            if key not in self._epoch_keys:
                self.latest[key] = val
                self._epoch_keys.add(key)
        if value is None or self.last_value is not None:
            return Observation(epoch, None, improved=False, duplicate=True, restarted=False)
        # The epoch was already counted as one without improvement; only an improvement
        # changes the counters now.
        self.last_value = value
        improved = self._judge(value, epoch)
        return Observation(epoch, value, improved, duplicate=True, restarted=False)

    def _judge(self, value: float, epoch: int) -> bool:
        """Make *value* the best if it improves on it; return whether it did."""
        if not self.is_better(value, self.best):
            return False
        self.best = value
        self.best_epoch = epoch
        self.epochs_since_improvement = 0
        return True

    def _record_span(self, epoch: int, version: int, *, force_new: bool) -> None:
        spans = self.version_spans
        if spans and spans[-1].version == version and not force_new:
            spans[-1].last_epoch = epoch
        else:
            spans.append(VersionSpan(version, epoch, epoch))
