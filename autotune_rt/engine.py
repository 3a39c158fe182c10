"""The decision core both modes feed: metric line -> tracker -> trigger -> diagnose -> tuner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autotune_rt.diagnose import Diagnosis, MetricNames, Thresholds, diagnose
from autotune_rt.exceptions import ConfigError
from autotune_rt.strategy import STRATEGIES, AdaptiveStrategy, Verdict

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
        epoch: The epoch whose line fired the trigger (or completed a losing change's window).
        diagnosis: What the rules found in the latest metrics; for a rollback, the problem
            ``rollback`` with the verdict's window and previous best as evidence.
        adjustment: The tuner's answer; ``adjustment.weights`` are now in effect in the engine.
        kind: ``adjust`` for a tuner's change, ``rollback`` for a return to the best-known
            weights after a change was judged ``worse`` (adaptive strategy only).
        verdict: For a rollback, the verdict that caused it.
    """

    epoch: int
    diagnosis: Diagnosis
    adjustment: Adjustment
    kind: Literal["adjust", "rollback"] = "adjust"
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """What one metric line led to.

    Attributes:
        observation: What the tracker made of the line; None for a line with neither an
            epoch nor the optimised metric.
        decision: Set when the trigger fired on this line, or a rollback was decided.
        verdict: Set when this line completed a change's evaluation window (adaptive).
    """

    observation: Observation | None
    decision: Decision | None
    verdict: Verdict | None = None


class TuningEngine:
    """Tie a tracker, a trigger, the diagnosis rules and a tuner together; no I/O.

    The caller writes the new weights wherever they go (control file, next trial's command
    line) and then sets :attr:`config_version`, so later epochs are attributed to it; with
    the adaptive strategy it also reports acknowledgements with :meth:`note_applied`.

    ``strategy="seed"`` decides exactly as the seed: whenever the trigger fires. With
    ``"adaptive"`` each change is judged after it has run ``window`` epochs (a
    :class:`~autotune_rt.strategy.Verdict` in :attr:`verdicts` and in :attr:`Step.verdict`),
    a ``worse`` change is rolled back at once (a ``rollback`` decision), no new change is
    decided while one is pending, and proposals avoid rolled-back moves and follow improved
    ones (``docs/strategy.md``).

    Attributes:
        tracker: Follows the optimised metric.
        trigger: Decides when to adjust.
        tuner: Turns a diagnosis into new weights.
        names: The names head accuracy, tail accuracy and loss are printed under.
        thresholds: The numbers the diagnosis rules compare against.
        weights: The weights in effect (after the last decision); the engine's own dict.
        strategy: ``"seed"`` or ``"adaptive"``.
        adaptive: The adaptive strategy's state; None with ``"seed"``.
        decisions: Every decision so far, oldest first (rollbacks included).
        verdicts: Every verdict so far, oldest first (adaptive only).
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
        strategy: Literal["seed", "adaptive"] = "seed",
        window: int | None = None,
        ack_wait: int | None = None,
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
            strategy: ``"seed"`` (no judging) or ``"adaptive"``.
            window: Adaptive: epochs a change runs before it is judged; None means the
                trigger's ``patience``.
            ack_wait: Adaptive: epochs to wait for a change's acknowledgement once the
                training has sent one; None means twice the window.

        Raises:
            ConfigError: ``strategy`` is unknown or ``window`` is below 1.
        """
        if strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
        if window is not None and window < 1:
            raise ConfigError(f"the evaluation window must be at least 1 epoch (got {window})")
        self.tracker = tracker
        self.trigger = trigger
        self.tuner = tuner
        self.names = MetricNames() if names is None else names
        self.thresholds = Thresholds() if thresholds is None else thresholds
        self.weights: Weights = dict(weights)
        self.strategy: Literal["seed", "adaptive"] = strategy
        self.adaptive: AdaptiveStrategy | None = None
        if strategy == "adaptive":
            self.adaptive = AdaptiveStrategy(
                self.weights,
                tracker,
                tuner.search_space,
                window=trigger.patience if window is None else window,
                ack_wait=ack_wait,
            )
        self._config_version = config_version
        self.decisions: list[Decision] = []
        self.verdicts: list[Verdict] = []
        # A verdict not yet returned in a Step (the tuner raised on its line).
        self._unreported: Verdict | None = None

    @property
    def config_version(self) -> int:
        """The config version in effect; set by the caller after each write."""
        return self._config_version

    @config_version.setter
    def config_version(self, version: int) -> None:
        self._config_version = version
        if self.adaptive is not None:
            self.adaptive.note_version(version, self.weights, self.tracker.last_epoch)

    def note_applied(self, version: int, epoch: int | None) -> None:
        """Tell the engine the training acknowledged *version* at *epoch*.

        Args:
            version: The acknowledged config version.
            epoch: The training's epoch when it applied the version (its first epoch with
                it); None when the training did not say.
        """
        if self.adaptive is not None:
            self.adaptive.note_applied(version, epoch)

    def observe(self, em: EpochMetrics) -> Step:
        """Feed one parsed metric line; judge, roll back, or diagnose and tune.

        On a decision the trigger records the adjustment and :attr:`weights` become the
        adjustment's weights.

        Args:
            em: The parsed line.

        Returns:
            The tracker's observation, the decision and the verdict, if any.

        Raises:
            Exception: Whatever the tuner's ``tune()`` raises (a user subclass may raise
                anything). The line is then tracked but nothing is decided or recorded, so
                the trigger fires again on the next line; a verdict rendered on the line is
                returned with the next one.
        """
        observation = self.tracker.update(em, self.config_version)
        if observation is None:
            return Step(None, None, self._take_verdict())
        adaptive = self.adaptive
        if adaptive is not None:
            adaptive.record(observation)
            verdict = adaptive.settle()
            if verdict is not None:
                self.verdicts.append(verdict)
                self._unreported = verdict
                if verdict.outcome == "worse":
                    return Step(observation, self._rollback(observation.epoch, verdict), self._take_verdict())
            if adaptive.busy:
                return Step(observation, None, self._take_verdict())
        if not self.trigger.should_fire(self.tracker):
            return Step(observation, None, self._take_verdict())
        diagnosis = diagnose(self.tracker.latest, self.names, self.thresholds)
        # A copy: a tuner that edits its argument must not change the weights in effect.
        if adaptive is None:
            adjustment = self.tuner.tune(diagnosis, dict(self.weights))
        else:
            adjustment = adaptive.propose(diagnosis, dict(self.weights), self.tuner)
        decision = Decision(observation.epoch, diagnosis, adjustment)
        self.trigger.record_adjustment(self.tracker)
        self._apply(decision)
        return Step(observation, decision, self._take_verdict())

    def _rollback(self, epoch: int, verdict: Verdict) -> Decision:
        """Return to the best-known weights after *verdict* judged the change in effect worse."""
        assert self.adaptive is not None
        evidence = {
            name: value
            for name, value in (
                ("window_best", verdict.window_best),
                ("previous_best", verdict.previous_best),
            )
            if value is not None
        }
        adjustment = self.adaptive.rollback(verdict, self.weights)
        decision = Decision(epoch, Diagnosis("rollback", evidence), adjustment, "rollback", verdict)
        # The rolled-back config gets a full cooldown, but undoing a change does not use up
        # one of the --max_adjustments the tuner may make.
        self.trigger.record_adjustment(self.tracker)
        self.trigger.adjustments -= 1
        self._apply(decision)
        return decision

    def _apply(self, decision: Decision) -> None:
        self.weights = dict(decision.adjustment.weights)
        self.decisions.append(decision)
        if self.adaptive is not None:
            self.adaptive.start(decision.adjustment, decision.epoch, decision.kind)

    def undo(self, decision: Decision) -> None:
        """Take back *decision*: the caller could not deliver it (the control file write failed).

        The weights in effect stay those before it, it is not judged, and the trigger may fire
        again after its cooldown.

        Args:
            decision: The decision :meth:`observe` just returned.
        """
        self.weights = dict(decision.adjustment.previous)
        if decision in self.decisions:
            self.decisions.remove(decision)
        if self.adaptive is not None:
            self.adaptive.abandon(decision.adjustment)

    def _take_verdict(self) -> Verdict | None:
        verdict, self._unreported = self._unreported, None
        return verdict
