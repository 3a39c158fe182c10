"""Tests for autotune_rt.strategy: the judging rule, rollbacks, the tabu list and follow-the-winner."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autotune_rt.engine import Decision, TuningEngine
from autotune_rt.parse import EpochMetrics
from autotune_rt.space import DEFAULT_WEIGHTS, SearchSpace, Weights
from autotune_rt.strategy import Verdict, judge, judge_trial
from autotune_rt.tracker import MetricTracker
from autotune_rt.trigger import Trigger
from autotune_rt.tuner import AdaptiveTuner

NAN = math.nan
INF = math.inf

# Head does well, tail lags: the seed's poor_tail rule raises lambda_col and lambda_scl.
POOR_TAIL = {"head_acc": 0.7, "tail_acc": 0.2, "ce": 1.0}


@pytest.mark.parametrize(
    ("window", "previous", "tracker_kwargs", "expected"),
    [
        pytest.param([0.50, 0.62, 0.55], [0.58, 0.60], {}, ("improved", 0.62, 0.60), id="improved"),
        pytest.param([0.50, 0.52, 0.55], [0.58, 0.60], {}, ("worse", 0.55, 0.60), id="worse"),
        pytest.param([0.60, 0.59], [0.58, 0.60], {}, ("no_change", 0.60, 0.60), id="tie"),
        pytest.param(
            [0.597, 0.604, 0.601],
            [0.600, 0.603, 0.598, 0.602],
            {"min_delta": 0.005},
            ("no_change", 0.604, 0.603),
            id="noisy-flat-within-min_delta",
        ),
        pytest.param(
            [0.61, 0.62],
            [0.60],
            {"min_delta": 0.05, "relative": True},
            ("no_change", 0.62, 0.60),
            id="relative",
        ),
        pytest.param([1.2, 1.1], [1.3, 1.25], {"mode": "min"}, ("improved", 1.1, 1.25), id="min-improved"),
        pytest.param([1.4, 1.3], [1.3, 1.25], {"mode": "min"}, ("worse", 1.3, 1.25), id="min-worse"),
        pytest.param([NAN, INF], [0.6], {}, ("worse", None, 0.6), id="only-non-finite"),
        pytest.param([NAN, 0.5, INF], [0.6], {}, ("worse", 0.5, 0.6), id="non-finite-ignored"),
        pytest.param([-INF], [1.0], {"mode": "min"}, ("worse", None, 1.0), id="min-inf-never-best"),
        pytest.param([None, None], [0.6], {}, ("no_change", None, 0.6), id="metric-missing"),
        pytest.param([0.4], [NAN, None], {}, ("improved", 0.4, None), id="previous-had-no-value"),
    ],
)
def test_judge_rules(
    window: list[float | None],
    previous: list[float | None],
    tracker_kwargs: dict[str, object],
    expected: tuple[str, float | None, float | None],
) -> None:
    """The verdict compares the best finite values of window and previous config by mode and min_delta."""
    tracker = MetricTracker(**tracker_kwargs)  # type: ignore[arg-type]
    assert judge(window, previous, tracker) == expected


@pytest.mark.parametrize(
    ("best", "reference", "mode", "expected"),
    [
        (0.7, 0.6, "max", "improved"),
        (0.5, 0.6, "max", "worse"),
        (0.6, 0.6, "max", "no_change"),
        (0.5, 0.6, "min", "improved"),
        (None, 0.6, "max", "worse"),
        (NAN, 0.6, "max", "worse"),
        (0.5, None, "max", "improved"),
    ],
)
def test_judge_trial(best: float | None, reference: float | None, mode: str, expected: str) -> None:
    """A batch trial is judged on its best metric against the reference trial's; no finite best is worse."""
    assert judge_trial(best, reference, MetricTracker(mode=mode)) == expected  # type: ignore[arg-type]


finite = st.floats(min_value=-10, max_value=10, allow_nan=False)


@given(
    window=st.lists(finite, max_size=5),
    previous=st.lists(finite, max_size=5),
    extra=st.lists(st.sampled_from([NAN, INF, -INF]), min_size=1, max_size=3),
    mode=st.sampled_from(["max", "min"]),
)
def test_non_finite_values_never_make_a_change_improved(
    window: list[float], previous: list[float], extra: list[float], mode: str
) -> None:
    """Adding nan/inf to a window never turns its verdict into 'improved'."""
    tracker = MetricTracker(mode=mode)  # type: ignore[arg-type]
    before = judge(window, previous, tracker)[0]
    after = judge(window + extra, previous, tracker)[0]
    assert after != "improved" or before == "improved"


# -- the engine with the adaptive strategy on scripted trainings ------------------------------


@dataclass
class Training:
    """A scripted training in a loop with an engine: it applies each new version *delay* epochs
    after the epoch that decided it, acknowledges it when *acks*, and prints the metric that
    *metric(weights, epoch)* gives for the weights it runs with."""

    engine: TuningEngine
    metric: Callable[[Weights, int], float]
    delay: int = 1
    acks: bool = False
    extra: dict[str, float] = field(default_factory=lambda: dict(POOR_TAIL))
    running: Weights = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    used: list[Weights] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    _pending: list[tuple[int, int, Weights]] = field(default_factory=list)
    _version: int = 1

    def run(self, epochs: range) -> None:
        for epoch in epochs:
            for item in [p for p in self._pending if p[0] <= epoch]:
                self._pending.remove(item)
                self.running = dict(item[2])
                if self.acks:
                    self.engine.note_applied(item[1], epoch)
            self.used.append(dict(self.running))
            line = EpochMetrics({"acc1": self.metric(self.running, epoch), **self.extra}, epoch)
            step = self.engine.observe(line)
            if step.verdict is not None:
                self.verdicts.append(step.verdict)
            if step.decision is not None:
                self.decisions.append(step.decision)
                self._version += 1
                self.engine.config_version = self._version
                self._pending.append(
                    (epoch + self.delay, self._version, dict(step.decision.adjustment.weights))
                )


def adaptive_engine(
    *,
    min_epochs: int = 4,
    patience: int = 3,
    space: SearchSpace | None = None,
    tracker: MetricTracker | None = None,
    seed: int = 3,
    **kwargs: object,
) -> TuningEngine:
    return TuningEngine(
        tracker or MetricTracker("acc1"),
        Trigger(min_epochs=min_epochs, patience=patience),
        AdaptiveTuner(space, seed=seed),
        dict(DEFAULT_WEIGHTS),
        strategy="adaptive",
        **kwargs,  # type: ignore[arg-type]
    )


def plateau(level: Callable[[Weights], float]) -> Callable[[Weights, int], float]:
    """A training that reaches its plateau at once: the metric depends only on the weights."""
    return lambda weights, _epoch: level(weights)


def test_harmful_change_is_judged_worse_and_rolled_back() -> None:
    """poor_tail raises lambda_col, the metric falls, the verdict is worse and the old weights return."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(12))
    first = training.decisions[0]
    assert (first.epoch, first.kind, first.diagnosis.problem) == (3, "adjust", "poor_tail")
    assert first.adjustment.weights["lambda_col"] == 0.4
    [verdict] = training.verdicts
    assert (verdict.outcome, verdict.version, verdict.window) == ("worse", 2, (4, 6))
    assert (verdict.window_best, verdict.previous_best, verdict.previous_epochs) == (0.5, 0.6, (0, 3))
    rollback = training.decisions[1]
    assert (rollback.epoch, rollback.kind, rollback.verdict) == (6, "rollback", verdict)
    assert rollback.adjustment.weights == DEFAULT_WEIGHTS
    assert rollback.adjustment.reason == "rollback"
    assert rollback.diagnosis.evidence == {"window_best": 0.5, "previous_best": 0.6}
    # The rollback takes effect the epoch after it; the next trigger waits a full cooldown.
    assert training.used[7:10] == [DEFAULT_WEIGHTS] * 3
    assert training.decisions[2].epoch == 9
    assert engine.verdicts == [verdict]


def test_rolled_back_move_is_not_tried_again() -> None:
    """After the rollback, the next poor_tail trigger replaces the tabu move with an untried one."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(12))
    third = training.decisions[2]
    assert third.kind == "adjust" and third.diagnosis.problem == "poor_tail"
    assert third.adjustment.note is not None
    assert third.adjustment.note.startswith(
        "tabu: lambda_col+, lambda_scl+ from these weights was rolled back"
    )
    assert third.adjustment.weights != training.decisions[0].adjustment.weights
    assert third.adjustment.weights != DEFAULT_WEIGHTS


def test_improved_change_is_kept_and_a_stagnation_follows_it() -> None:
    """An improved change stays; the next stagnation repeats its moves one more grid step."""
    engine = adaptive_engine()
    # Stagnation: no head/tail accuracy to diagnose, so the tuner would perturb at random.
    training = Training(engine, plateau(lambda w: round(0.2 + w["lambda_dol"] / 2, 4)), extra={})
    training.run(range(40))
    improved = [v for v in training.verdicts if v.outcome == "improved"]
    assert improved, training.verdicts
    first = improved[0]
    assert first.moves == (("lambda_dol", 1),)
    # The new best restarts the patience; the next stagnation continues the winning move.
    follow = next(d for d in training.decisions if d.epoch > first.epoch)
    assert follow.diagnosis.problem == "stagnation"
    assert follow.adjustment.previous == first.weights
    assert follow.adjustment.moves == first.moves
    assert follow.adjustment.weights["lambda_dol"] == first.weights["lambda_dol"] + 0.1
    assert follow.adjustment.note is not None and follow.adjustment.note.startswith("follow_winner")
    assert training.verdicts[-1].outcome == "improved"


def test_noisy_flat_metric_within_min_delta_is_no_change() -> None:
    """A change that leaves a noisy plateau within min_delta is judged no_change and kept."""
    noise = [0.001, -0.002, 0.002, 0.0, -0.001, 0.002, -0.002, 0.001, 0.0, 0.002]
    engine = adaptive_engine(tracker=MetricTracker("acc1", min_delta=0.01))
    training = Training(engine, lambda _w, epoch: 0.6 + noise[epoch % len(noise)])
    training.run(range(8))
    [verdict] = training.verdicts
    assert verdict.outcome == "no_change"
    assert [d.kind for d in training.decisions] == ["adjust", "adjust"]
    assert training.decisions[1].adjustment.previous == training.decisions[0].adjustment.weights


def test_change_that_makes_the_metric_nan_is_rolled_back() -> None:
    """A change under which the training prints only nan is judged worse and rolled back."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: 0.6 if w["lambda_col"] < 0.35 else NAN))
    training.run(range(9))
    [verdict] = training.verdicts
    assert (verdict.outcome, verdict.window_best, verdict.non_finite) == ("worse", None, 3)
    assert training.decisions[-1].kind == "rollback"
    assert engine.weights == DEFAULT_WEIGHTS


def test_nan_in_the_window_does_not_hide_a_regression() -> None:
    """nan epochs are left out of the window's best; the finite ones still decide."""
    values = {4: NAN, 5: 0.55, 6: NAN}
    engine = adaptive_engine()
    training = Training(engine, lambda _w, epoch: values.get(epoch, 0.6))
    training.run(range(7))
    [verdict] = training.verdicts
    assert (verdict.outcome, verdict.window_best, verdict.non_finite) == ("worse", 0.55, 2)


def test_rollback_returns_to_the_last_weights_kept() -> None:
    """A loser after a winner is rolled back to the winner's weights, not to the initial ones."""
    engine = adaptive_engine()
    # initial 0.60 -> first poor_tail step 0.65 (improved) -> second step 0.55 (worse).
    levels = {0.3: 0.60, 0.4: 0.65, 0.5: 0.55}
    training = Training(engine, plateau(lambda w: levels[w["lambda_col"]]))
    training.run(range(14))
    assert [v.outcome for v in training.verdicts] == ["improved", "worse"]
    winner = training.decisions[0].adjustment.weights
    rollback = training.decisions[2]
    assert rollback.kind == "rollback"
    assert rollback.adjustment.previous["lambda_col"] == 0.5
    assert rollback.adjustment.weights == winner
    assert training.used[-1] == winner


def test_window_starts_at_the_acknowledged_epoch() -> None:
    """With acknowledgements, the epochs before the training applied the change count for the old config."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)), delay=3, acks=True)
    engine.note_applied(1, 0)  # the initial version: this training acknowledges
    training.run(range(12))
    verdict = training.verdicts[0]
    assert verdict.window == (6, 8)
    assert verdict.previous_epochs == (0, 5)
    assert verdict.outcome == "worse"


def test_without_acks_the_change_counts_from_the_epoch_after_the_write() -> None:
    """With no acknowledgement at all, epoch written+1 starts the window even if the training was late."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)), delay=2)
    training.run(range(8))
    verdict = training.verdicts[0]
    # Epoch 4 still ran the old weights (0.6) but is attributed to the change.
    assert (verdict.window, verdict.window_best, verdict.outcome) == ((4, 6), 0.6, "no_change")


def test_a_missing_ack_is_waited_for_then_assumed() -> None:
    """Once acks were seen, a change's window waits for its ack, up to ack_wait epochs."""
    engine = adaptive_engine(ack_wait=4)
    engine.note_applied(1, 0)
    # acks=False: the training never acknowledges the change.
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(7))
    assert training.verdicts == []
    training.run(range(7, 9))
    assert training.verdicts[0].window == (4, 6)


def test_no_decision_while_a_change_is_being_judged() -> None:
    """Even with cooldown 1 the trigger waits until the change's window is judged."""
    engine = TuningEngine(
        MetricTracker("acc1"),
        Trigger(min_epochs=2, patience=1, cooldown=1),
        AdaptiveTuner(seed=1),
        dict(DEFAULT_WEIGHTS),
        strategy="adaptive",
        window=3,
    )
    training = Training(engine, plateau(lambda _w: 0.6))
    training.run(range(10))
    assert [d.epoch for d in training.decisions] == [1, 4, 7]
    assert [v.epoch for v in training.verdicts] == [4, 7]


def test_manual_override_cancels_the_pending_verdict() -> None:
    """A version the engine did not decide (a hand edit) ends the judging of the change in effect."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(5))
    engine.weights["lambda_col"] = 0.1
    engine.config_version = 9
    training.run(range(5, 8))
    assert training.verdicts == []
    assert all(d.kind == "adjust" for d in training.decisions)


def test_restart_cancels_the_pending_verdict() -> None:
    """A resume from a checkpoint mid-window gives no verdict for the change."""
    engine = adaptive_engine()
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(5))
    training.run(range(2, 6))
    assert training.verdicts == []


def test_no_untried_neighbour_keeps_the_weights_and_says_so() -> None:
    """When every one-step move was tried or rolled back, the decision keeps the weights with a note."""
    grids = {name: [value] for name, value in DEFAULT_WEIGHTS.items()}
    grids["lambda_col"] = [0.3, 0.4]
    space = SearchSpace.model_validate({"grids": grids})
    engine = adaptive_engine(space=space)
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(12))
    kinds = [(d.kind, d.adjustment.moves) for d in training.decisions]
    assert kinds[:2] == [("adjust", (("lambda_col", 1),)), ("rollback", ())]
    last = training.decisions[2]
    assert last.adjustment.weights == last.adjustment.previous == DEFAULT_WEIGHTS
    assert last.adjustment.note is not None and "no untried neighbour" in last.adjustment.note
    assert len(training.verdicts) == 1  # a decision that keeps the weights is not judged


def test_rollback_does_not_use_up_max_adjustments() -> None:
    """With max_adjustments=1 the harmful change is still rolled back, and nothing else is tried."""
    engine = adaptive_engine()
    engine.trigger.max_adjustments = 1
    training = Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4)))
    training.run(range(20))
    assert [d.kind for d in training.decisions] == ["adjust", "rollback"]
    assert engine.trigger.adjustments == 1
    assert engine.weights == DEFAULT_WEIGHTS


def test_verdict_to_dict_is_plain_data() -> None:
    """A verdict's dict has lists for tuples and copies of the weights."""
    engine = adaptive_engine()
    Training(engine, plateau(lambda w: round(0.9 - w["lambda_col"], 4))).run(range(7))
    data = engine.verdicts[0].to_dict()
    assert data["outcome"] == "worse"
    assert data["window"] == [4, 6] and data["previous_epochs"] == [0, 3]
    assert data["moves"] == [["lambda_col", 1], ["lambda_scl", 1]]
    assert data["weights"]["lambda_col"] == 0.4 and data["previous"] == DEFAULT_WEIGHTS


def noisy_training(weights: Weights, epoch: int) -> float:
    """A metric that depends on the weights and wobbles from epoch to epoch."""
    return round(0.3 + weights["lambda_col"] * 0.4 + 0.02 * math.sin(epoch * 1.7), 4)


def test_compacting_the_history_changes_no_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long runs keep a bounded history, and the verdicts and decisions equal those of an unbounded one."""
    import autotune_rt.strategy as strategy_module

    def simulate(compact_every: int) -> tuple[list[object], list[object], int]:
        monkeypatch.setattr(strategy_module, "_COMPACT_EVERY", compact_every)
        training = Training(adaptive_engine(), noisy_training, acks=True)
        training.run(range(6000))
        adaptive = training.engine.adaptive
        assert adaptive is not None
        decisions = [(d.epoch, d.kind, d.adjustment.weights) for d in training.decisions]
        verdicts = [(v.outcome, v.window, v.window_best, v.previous_best) for v in training.verdicts]
        return decisions, verdicts, len(adaptive._history)

    unbounded = simulate(10**9)
    compacted = simulate(16)
    assert compacted[:2] == unbounded[:2]
    assert len(unbounded[0]) > 50  # the run really kept deciding
    assert unbounded[2] == 6000 and compacted[2] < 200
