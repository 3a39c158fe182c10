"""The decision core both modes feed: metric line -> tracker -> trigger -> diagnose -> tuner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune_rt.diagnose import Diagnosis, MetricNames, Thresholds, diagnose

if TYPE_CHECKING:  # pragma: no cover
    from autotune_rt.parse import EpochMetrics
    from autotune_rt.space import Weights
    from autotune_rt.tracker import MetricTracker, Observation
    from autotune_rt.trigger import Trigger
    from autotune_rt.tuner import Adjustment, AutoTuner

__all__ = ["Decision", "Step", "TuningEngine"]


@dataclass(frozen=True, slots=True)
class Decision:
    """One adjustment: at which epoch, on what evidence, to which weights.

    Attributes:
        epoch: The epoch whose line fired the trigger.
        diagnosis: What the rules found in the latest metrics.
        adjustment: The tuner's answer; ``adjustment.weights`` are now in effect in the engine.
    """

    epoch: int
    diagnosis: Diagnosis
    adjustment: Adjustment


@dataclass(frozen=True, slots=True)
class Step:
    """What one metric line led to.

    Attributes:
        observation: What the tracker made of the line; None for a line with neither an
            epoch nor the optimised metric.
        decision: Set when the trigger fired on this line.
    """

    observation: Observation | None
    decision: Decision | None


class TuningEngine:
    """Tie a tracker, a trigger, the diagnosis rules and a tuner together; no I/O.

    The caller writes the new weights wherever they go (control file, next trial's command
    line) and then sets :attr:`config_version`, so later epochs are attributed to it.

    Attributes:
        tracker: Follows the optimised metric.
        trigger: Decides when to adjust.
        tuner: Turns a diagnosis into new weights.
        names: The names head accuracy, tail accuracy and loss are printed under.
        thresholds: The numbers the diagnosis rules compare against.
        weights: The weights in effect (after the last decision); the engine's own dict.
        config_version: The config version in effect; set by the caller after a write.
        decisions: Every decision so far, oldest first.
    """

    def __init__(
        self,
        tracker: MetricTracker,
        trigger: Trigger,
        tuner: AutoTuner,
        weights: Weights,
        *,
        names: MetricNames | None = None,
        thresholds: Thresholds | None = None,
        config_version: int = 1,
    ) -> None:
        """Create an engine.

        Args:
            tracker: A fresh tracker for this run.
            trigger: A fresh trigger for this run.
            tuner: The tuner (``AutoTuner``, ``AdaptiveTuner`` or a user subclass).
            weights: The initial weights; copied.
            names: Metric names for the diagnosis; None for the seed's names.
            thresholds: Thresholds for the diagnosis; None for the seed's values.
            config_version: The version of the initial config.
        """
        self.tracker = tracker
        self.trigger = trigger
        self.tuner = tuner
        self.names = MetricNames() if names is None else names
        self.thresholds = Thresholds() if thresholds is None else thresholds
        self.weights: Weights = dict(weights)
        self.config_version = config_version
        self.decisions: list[Decision] = []

    def observe(self, em: EpochMetrics) -> Step:
        """Feed one parsed metric line; diagnose and tune when the trigger fires.

        On a decision the trigger records the adjustment and :attr:`weights` become the
        adjustment's weights.

        Args:
            em: The parsed line.

        Returns:
            The tracker's observation and the decision, if any.

        Raises:
            Exception: Whatever the tuner's ``tune()`` raises (a user subclass may raise
                anything). The line is then tracked but nothing is decided or recorded, so
                the trigger fires again on the next line.
        """
        observation = self.tracker.update(em, self.config_version)
        if observation is None or not self.trigger.should_fire(self.tracker):
            return Step(observation, None)
        diagnosis = diagnose(self.tracker.latest, self.names, self.thresholds)
        # A copy: a tuner that edits its argument must not change the weights in effect.
        adjustment = self.tuner.tune(diagnosis, dict(self.weights))
        decision = Decision(observation.epoch, diagnosis, adjustment)
        self.trigger.record_adjustment(self.tracker)
        self.weights = dict(adjustment.weights)
        self.decisions.append(decision)
        return Step(observation, decision)
