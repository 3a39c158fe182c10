"""The adaptive strategy: judge every change, roll back losers, follow winners (realtime mode).

``--strategy seed`` never looks back: a change stays in force whatever it did. The adaptive
strategy treats every change as an experiment. :class:`AdaptiveStrategy` keeps the metric of
each epoch, knows which config was in effect when (from the training's acknowledgements, or
the epoch after the write when it sends none), and renders a :class:`Verdict` once a change
has run for its evaluation window. The rules are in ``docs/strategy.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from autotune_rt.space import DEFAULT_WEIGHTS, Move, SearchSpace, Weights
from autotune_rt.tuner import ACTIONS, Adjustment

if TYPE_CHECKING:  # pragma: no cover
    from autotune_rt.diagnose import Diagnosis
    from autotune_rt.tracker import MetricTracker, Observation
    from autotune_rt.tuner import AutoTuner

__all__ = [
    "PERTURB_ATTEMPTS",
    "STRATEGIES",
    "AdaptiveStrategy",
    "Outcome",
    "Verdict",
    "judge",
    "judge_trial",
]

STRATEGIES = ("seed", "adaptive")

Outcome = Literal["improved", "no_change", "worse"]

# Random draws to try before walking the neighbours in order for an untried one: enough to
# keep the seed's randomness when a few moves are ruled out, cheap when many are.
PERTURB_ATTEMPTS = 20

_FALLBACK_PREFIX = "fallback_perturbation"


@dataclass(frozen=True)
class Verdict:
    """What one change did to the optimised metric.

    Attributes:
        outcome: ``improved``, ``no_change`` or ``worse``.
        version: The config version judged (None when it was never written).
        epoch: The epoch whose line completed the evaluation window.
        window: First and last epoch of the evaluation window.
        window_best: The best finite value in the window; None when it had none.
        previous_best: The best finite value under the config before the change; None when
            it had none.
        previous_epochs: First and last epoch the config before the change ran, or None.
        epochs: Epochs in the window.
        non_finite: nan/inf values in the window (they never count as improvements).
        weights: The weights judged.
        previous: The weights before the change.
        moves: The grid steps the change made.
        reason: The problem the change answered (``poor_tail``, ``stagnation``, ...).
    """

    outcome: Outcome
    version: int | None
    epoch: int
    window: tuple[int, int]
    window_best: float | None
    previous_best: float | None
    previous_epochs: tuple[int, int] | None
    epochs: int
    non_finite: int
    weights: Weights
    previous: Weights
    moves: tuple[Move, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (for the events log and the summary)."""
        return {
            "outcome": self.outcome,
            "version": self.version,
            "epoch": self.epoch,
            "window": list(self.window),
            "window_best": self.window_best,
            "previous_best": self.previous_best,
            "previous_epochs": None if self.previous_epochs is None else list(self.previous_epochs),
            "epochs": self.epochs,
            "non_finite": self.non_finite,
            "weights": dict(self.weights),
            "previous": dict(self.previous),
            "moves": [list(move) for move in self.moves],
            "reason": self.reason,
        }


# How often (in counted epochs) the history is compacted; also the least it drops at once.
_COMPACT_EVERY = 1024


def _best(values: Iterable[float | None], mode: str) -> float | None:
    """The best finite value by the mode alone (no threshold); None when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)


def judge(
    window: Sequence[float | None], previous: Sequence[float | None], tracker: MetricTracker
) -> tuple[Outcome, float | None, float | None]:
    """Judge a change from the metric values before and after it took effect.

    Rules, in order, with ``tracker.is_better`` (the mode and ``min_delta``):

    1. No finite value in the window: ``worse`` if it has a nan/inf (the change broke the
       training), else ``no_change`` (nothing to judge on).
    2. ``improved`` when the window's best beats the previous best (or there is none).
    3. ``worse`` when the previous best beats the window's best.
    4. Otherwise ``no_change``: the difference is within ``min_delta``.

    Args:
        window: The optimised metric of each epoch of the evaluation window (None: missing).
        previous: The same for the epochs the config before the change ran.
        tracker: The run's tracker: its ``mode`` picks the best values, its ``is_better``
            compares them.

    Returns:
        ``(outcome, window_best, previous_best)``.
    """
    window_best = _best(window, tracker.mode)
    previous_best = _best(previous, tracker.mode)
    if window_best is None:
        broken = any(v is not None and not math.isfinite(v) for v in window)
        return ("worse" if broken else "no_change"), None, previous_best
    if tracker.is_better(window_best, previous_best):
        return "improved", window_best, previous_best
    if previous_best is not None and tracker.is_better(previous_best, window_best):
        return "worse", window_best, previous_best
    return "no_change", window_best, previous_best


def judge_trial(best: float | None, reference: float | None, tracker: MetricTracker) -> Outcome:
    """Judge a batch trial's best metric against the reference (best earlier) trial's.

    A trial without a finite best (failed, or the metric never printed) is ``worse``;
    otherwise :func:`judge` decides on the two values.

    Args:
        best: The trial's best value of the optimised metric.
        reference: The reference trial's best value; None when it has none.
        tracker: The trial's tracker (mode and ``min_delta``).

    Returns:
        ``improved``, ``no_change`` or ``worse``.
    """
    if best is None or not math.isfinite(best):
        return "worse"
    return judge([best], [reference], tracker)[0]


# A weights dict as a hashable point; rounding makes 0.30000000000000004 the grid's 0.3.
_Point = tuple[tuple[str, float], ...]


def _key(weights: Weights) -> _Point:
    return tuple(sorted((name, round(value, 9)) for name, value in weights.items()))


def _fmt_moves(moves: Sequence[Move]) -> str:
    return ", ".join(f"{name}{'+' if direction > 0 else '-'}" for name, direction in moves) or "no move"


@dataclass
class _Entry:
    """One counted epoch and its value of the optimised metric."""

    epoch: int
    value: float | None


@dataclass
class _Config:
    """One config the training ran, from its decision to the next one."""

    weights: Weights
    kind: str  # initial | adjust | rollback | manual
    decided_at: int  # len(history) when it was decided
    written_epoch: int | None
    previous: Weights = field(default_factory=dict)
    moves: tuple[Move, ...] = ()
    reason: str = "initial"
    version: int | None = None
    effective_epoch: int | None = None
    start: int | None = None  # index in history of its first epoch
    verdict: Verdict | None = None
    cancelled: str | None = None

    @property
    def judged(self) -> bool:
        """Whether this config is an experiment to judge (a tuner's change)."""
        return self.kind == "adjust" and _key(self.weights) != _key(self.previous)


class AdaptiveStrategy:
    """Judge each change on its evaluation window; pick rollbacks and untried moves. No I/O.

    The engine feeds every observation (:meth:`record`), the config versions it is told
    about (:meth:`note_version`, :meth:`note_applied`) and every change it makes
    (:meth:`start`); it asks :meth:`settle` for a verdict after each line, does not decide
    while :attr:`busy`, and asks :meth:`propose` for the next change.

    Attributes:
        window: Epochs a change runs before it is judged.
        ack_wait: Once the training has acknowledged a version, epochs to wait for a
            change's acknowledgement before assuming it took effect the epoch after the write.
        tabu: ``(from-weights, to-weights)`` of every change judged ``worse``: never proposed
            again.
        visited: Every weights point that has been in effect.
    """

    def __init__(
        self,
        weights: Weights,
        tracker: MetricTracker,
        space: SearchSpace,
        *,
        window: int,
        ack_wait: int | None = None,
    ) -> None:
        """Create the strategy for one run.

        Args:
            weights: The initial weights.
            tracker: The run's tracker (mode and ``min_delta`` of the comparisons).
            space: The tuner's search space.
            window: Epochs a change runs before it is judged (>= 1).
            ack_wait: See :attr:`ack_wait`; None means ``2 * window``.
        """
        self.window = max(1, window)
        self.ack_wait = 2 * self.window if ack_wait is None else max(0, ack_wait)
        self.tracker = tracker
        self.space = space
        self.tabu: set[tuple[_Point, _Point]] = set()
        self.visited: set[_Point] = {_key(weights)}
        self._history: list[_Entry] = []
        self._configs = [_Config(dict(weights), "initial", 0, None, start=0)]
        self._acks_seen = False
        # A decision that kept the weights is still written as a new version: not an edit.
        self._same_weights_write = False

    # -- what the engine feeds in -----------------------------------------------------------
    def record(self, observation: Observation) -> None:
        """Keep the metric of a counted epoch (or a late value of the current one)."""
        if observation.restarted:
            # A resume from a checkpoint mixes epochs of two configs: no fair window.
            self._cancel("restart")
        if not observation.duplicate:
            self._history.append(_Entry(observation.epoch, observation.value))
            if len(self._history) % _COMPACT_EVERY == 0:
                self._compact()
        elif observation.value is not None and self._history and self._history[-1].value is None:
            self._history[-1].value = observation.value

    def _compact(self) -> None:
        """Keep memory flat over millions of epochs.

        A judgement reads the current config's window and the best value of the config
        before it, nothing older: epochs before the previous config's first one are dropped
        (every stored index moves down with them), and once the current config is settled its
        epochs between the first and the last fold into one entry holding their best value.
        """
        current = self._configs[-1]
        settled = current.cancelled is not None or current.verdict is not None or not current.judged
        if current.start is not None and settled and len(self._history) - current.start > 2:
            middle = self._history[current.start + 1 : -1]
            best = _best((e.value for e in middle), self.tracker.mode)
            self._history[current.start + 1 : -1] = [_Entry(middle[0].epoch, best)]
        if len(self._configs) < 2 or self._configs[-2].start is None:
            return
        drop = min(self._configs[-2].start, current.decided_at, current.start or current.decided_at)
        if drop < _COMPACT_EVERY:
            return
        del self._history[:drop]
        for config in self._configs:  # configs older than the last two are never indexed again
            config.decided_at -= drop
            if config.start is not None:
                config.start -= drop

    def note_version(self, version: int, weights: Weights, epoch: int | None) -> None:
        """Attribute a written config version; an unexpected new one is a manual edit.

        Args:
            version: The version the caller just set.
            weights: The weights in effect now (after a manual edit: the edited ones).
            epoch: The last epoch observed.
        """
        current = self._configs[-1]
        if (
            self._same_weights_write
            or current.version is None
            or (current.kind == "initial" and not self._history)
        ):
            self._same_weights_write = False
            current.version = version
            return
        if current.version == version:
            return
        self._cancel("manual_override")
        previous = current.weights
        self._configs.append(
            _Config(dict(weights), "manual", len(self._history), epoch, dict(previous), version=version)
        )
        self.visited.add(_key(weights))

    def note_applied(self, version: int, epoch: int | None) -> None:
        """The training acknowledged *version* at *epoch* (its first epoch with it)."""
        self._acks_seen = True
        for config in reversed(self._configs):
            if config.version == version and config.start is None:
                last = self._history[-1].epoch if self._history else -1
                config.effective_epoch = epoch if epoch is not None else last + 1
                return

    def start(self, adjustment: Adjustment, epoch: int, kind: str) -> None:
        """Begin a change the engine decided at *epoch* (``adjust`` or ``rollback``)."""
        if _key(adjustment.weights) == _key(self._configs[-1].weights):
            self._same_weights_write = True  # nothing to judge or wait for
            return
        self._configs.append(
            _Config(
                dict(adjustment.weights),
                kind,
                len(self._history),
                epoch,
                dict(adjustment.previous),
                tuple(adjustment.moves),
                adjustment.reason,
            )
        )
        self.visited.add(_key(adjustment.weights))

    def abandon(self, adjustment: Adjustment) -> None:
        """Forget the change just started: the training never received it (a failed write)."""
        self._same_weights_write = False
        current = self._configs[-1]
        if (
            len(self._configs) > 1
            and current.start is None
            and _key(current.weights) == _key(adjustment.weights)
        ):
            self._configs.pop()

    # -- verdicts -------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A change has not taken effect yet, or has not been judged yet."""
        current = self._configs[-1]
        if current.cancelled is not None:
            return False
        return current.start is None or (current.judged and current.verdict is None)

    def settle(self) -> Verdict | None:
        """Locate the current change's first epoch and judge it once its window is complete."""
        current = self._configs[-1]
        if current.cancelled is not None or current.verdict is not None:
            return None
        if current.start is None:
            current.start = self._find_start(current)
        if current.start is None or not current.judged:
            return None
        window = self._history[current.start : current.start + self.window]
        complete = len(self._history) - current.start > self.window or (
            len(window) == self.window and window[-1].value is not None
        )
        if not complete:
            return None
        before = self._configs[-2]
        assert before.start is not None  # a config is only decided after the last one started
        previous = self._history[before.start : current.start]
        outcome, window_best, previous_best = judge(
            [e.value for e in window], [e.value for e in previous], self.tracker
        )
        current.verdict = Verdict(
            outcome=outcome,
            version=current.version,
            epoch=self._history[-1].epoch,
            window=(window[0].epoch, window[-1].epoch),
            window_best=window_best,
            previous_best=previous_best,
            previous_epochs=(previous[0].epoch, previous[-1].epoch) if previous else None,
            epochs=len(window),
            non_finite=sum(1 for e in window if e.value is not None and not math.isfinite(e.value)),
            weights=dict(current.weights),
            previous=dict(current.previous),
            moves=current.moves,
            reason=current.reason,
        )
        if outcome == "worse":
            self.tabu.add((_key(current.previous), _key(current.weights)))
        return current.verdict

    def _find_start(self, config: _Config) -> int | None:
        """The history index of the config's first epoch, once it is known."""
        effective = config.effective_epoch
        if effective is None:
            waited = len(self._history) - config.decided_at
            if self._acks_seen and waited < self.ack_wait:
                return None  # this training acknowledges: wait for the real epoch
            effective = (config.written_epoch if config.written_epoch is not None else -1) + 1
            config.effective_epoch = effective
        for index in range(config.decided_at, len(self._history)):
            if self._history[index].epoch >= effective:
                return index
        return None

    def _cancel(self, why: str) -> None:
        current = self._configs[-1]
        if current.kind != "initial" and current.verdict is None and current.cancelled is None:
            current.cancelled = why
            if current.start is None:
                current.start = len(self._history)

    def rollback(self, verdict: Verdict, weights: Weights) -> Adjustment:
        """The adjustment that undoes a change judged ``worse``: back to :meth:`rollback_target`.

        Args:
            verdict: The losing change's verdict.
            weights: The weights in effect (the loser's).
        """
        note = (
            f"rollback: version {verdict.version} ({_fmt_moves(verdict.moves)}) was worse; "
            "back to the best-known weights"
        )
        return Adjustment(self.rollback_target(), dict(weights), "rollback", (), note)

    def rollback_target(self) -> Weights:
        """The best-known weights: those the losing change replaced.

        Every change the strategy keeps was judged at least as good as the config before it
        (``improved`` or ``no_change``) and a loser is undone at once, so the config a loser
        replaced is the last one kept: the best the verdicts know of. Comparing raw epochs of
        configs that ran at different times instead would favour whichever ran later in a
        rising training, or had one lucky epoch on a plateau, and could return to weights the
        latest verdicts had just beaten.
        """
        return dict(self._configs[-1].previous)

    # -- proposals ------------------------------------------------------------------------
    def last_verdict(self) -> Verdict | None:
        """The verdict of the config in effect, if it was judged."""
        return self._configs[-1].verdict

    def untried(self, start: Weights, end: Weights) -> bool:
        """Whether moving from *start* to *end* is neither tabu nor back to a visited point."""
        return (_key(start), _key(end)) not in self.tabu and _key(end) not in self.visited

    def propose(self, diagnosis: Diagnosis, weights: Weights, tuner: AutoTuner) -> Adjustment:
        """Decide the next change: the seed's move, a winner's next step, or an untried one.

        1. The tuner's move for a diagnosed problem (``poor_tail``, ``poor_head``,
           ``high_loss``) is taken unless that move from these weights was rolled back.
        2. Before any random perturbation (``stagnation``, a fallback at the grid edge, or a
           rolled-back move), when the change in effect was judged ``improved``, the same
           moves are made again, one grid step, if that point is untried.
        3. A random perturbation must lead to an untried point: the tuner's own draw, else up
           to :data:`PERTURB_ATTEMPTS` fresh draws, else the first untried neighbour.
        4. With no untried neighbour left, the weights stay and the note says so.

        Args:
            diagnosis: What the rules found.
            weights: The weights in effect.
            tuner: The run's tuner (its ``tune``, ``perturb`` and random stream are used).

        Returns:
            The adjustment; its note says when and why it differs from the tuner's.
        """
        proposed = tuner.tune(diagnosis, dict(weights))
        if not proposed.moves and _key(proposed.weights) == _key(weights):
            return proposed  # every weight pinned: the tuner already says so
        seed_rule = diagnosis.problem in ACTIONS and not (proposed.note or "").startswith(_FALLBACK_PREFIX)
        tabu = (_key(weights), _key(proposed.weights)) in self.tabu
        if seed_rule and not tabu:
            return proposed
        why = f"tabu: {_fmt_moves(proposed.moves)} from these weights was rolled back" if tabu else None
        follow = self._follow(weights, diagnosis.problem)
        if follow is not None:
            return _with_note(follow, why)
        if not seed_rule and not tabu and self.untried(weights, proposed.weights):
            return proposed
        if why is None:
            why = f"tried: {_fmt_moves(proposed.moves)} leads back to a point already run"
        for _ in range(PERTURB_ATTEMPTS):
            drawn = tuner.perturb(dict(weights), diagnosis.problem)
            if drawn.moves and self.untried(weights, drawn.weights):
                return _with_note(drawn, f"{why}; replaced by an untried perturbation")
        for move, neighbour in self.space.neighbours(weights):
            if self.untried(weights, neighbour):
                replacement = Adjustment(neighbour, dict(weights), diagnosis.problem, (move,))
                return _with_note(replacement, f"{why}; replaced by the first untried neighbour")
        return Adjustment(
            dict(weights),
            dict(weights),
            diagnosis.problem,
            (),
            f"{why}; no untried neighbour: every one-step move from these weights was tried "
            "or rolled back, keeping the weights",
        )

    def _follow(self, weights: Weights, reason: str) -> Adjustment | None:
        """The improved change's moves once more from *weights*, or None."""
        verdict = self.last_verdict()
        if verdict is None or verdict.outcome != "improved" or not verdict.moves:
            return None
        new = dict(weights)
        moves: list[Move] = []
        for name, direction in verdict.moves:
            current = float(weights.get(name, DEFAULT_WEIGHTS[name]))
            value = self.space.step(name, current, direction)
            if not math.isclose(value, current, rel_tol=1e-9, abs_tol=1e-12):
                new[name] = value
                moves.append((name, direction))
        if not moves or not self.untried(weights, new):
            return None
        note = f"follow_winner: {_fmt_moves(verdict.moves)} improved version {verdict.version}; one more step"
        return Adjustment(new, dict(weights), reason, tuple(moves), note)


def _with_note(adjustment: Adjustment, why: str | None) -> Adjustment:
    if why is None:
        return adjustment
    note = f"{why}; {adjustment.note}" if adjustment.note else why
    return Adjustment(adjustment.weights, adjustment.previous, adjustment.reason, adjustment.moves, note)
