"""Tests for autotune_rt.tracker: best value, epochs since improvement, duplicates, restarts."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autotune_rt.exceptions import ConfigError
from autotune_rt.parse import EpochMetrics
from autotune_rt.tracker import DEFAULT_METRIC_CANDIDATES, MetricTracker, Observation, VersionSpan

NAN = float("nan")
INF = float("inf")


def em(epoch: int | None = None, **metrics: float) -> EpochMetrics:
    return EpochMetrics(metrics={k: float(v) for k, v in metrics.items()}, epoch=epoch)


def feed(tracker: MetricTracker, values: list[float], metric: str = "acc1") -> list[Observation | None]:
    return [tracker.update(em(i, **{metric: v})) for i, v in enumerate(values)]


def test_default_candidates_are_the_seeds() -> None:
    """The auto metric candidates are the seed's, in the seed's order."""
    assert DEFAULT_METRIC_CANDIDATES == ("best_metric", "acc1", "acc")


def test_auto_metric_prefers_best_metric_and_stays_fixed() -> None:
    """Auto resolution takes the first candidate present in the first epoch line, then never changes."""
    tracker = MetricTracker()
    assert tracker.metric is None
    tracker.update(em(0, acc=0.1, acc1=0.2, best_metric=0.3))
    assert tracker.metric == "best_metric"
    obs = tracker.update(em(1, acc1=0.9))
    assert tracker.metric == "best_metric"
    assert obs == Observation(1, None, improved=False, duplicate=False, restarted=False)
    assert tracker.best == 0.3


def test_auto_metric_waits_for_an_epoch_line_with_a_candidate() -> None:
    """Epoch lines without a candidate and unnumbered step logs do not resolve the metric."""
    tracker = MetricTracker()
    assert tracker.update(em(None, acc=0.05, loss=3.0)) is None  # a step log's batch accuracy
    assert tracker.metric is None
    assert tracker.update(em(0, loss=2.5)) == Observation(0, None, False, False, False)
    assert tracker.metric is None
    tracker.update(em(1, acc1=0.4, acc=0.5))
    assert tracker.metric == "acc1"
    assert (tracker.best, tracker.best_epoch, tracker.epochs_seen) == (0.4, 1, 2)


def test_step_log_without_epoch_or_metric_only_updates_latest() -> None:
    """A line with neither epoch nor metric returns None and changes nothing but ``latest``."""
    tracker = MetricTracker("acc1")
    tracker.update(em(0, acc1=0.5, loss=2.0))
    assert tracker.update(em(None, loss=1.5, lr=0.01)) is None
    assert tracker.latest == {"acc1": 0.5, "loss": 1.5, "lr": 0.01}
    assert (tracker.epochs_seen, tracker.last_epoch, tracker.epochs_since_improvement) == (1, 0, 0)


def test_unnumbered_metric_lines_count_from_zero() -> None:
    """Lines with the metric but no epoch number are epochs 0, 1, 2, ..."""
    tracker = MetricTracker("acc1")
    observations = [tracker.update(em(None, acc1=v)) for v in (0.1, 0.2, 0.2)]
    assert [o.epoch for o in observations if o is not None] == [0, 1, 2]
    assert (tracker.epochs_seen, tracker.best_epoch, tracker.epochs_since_improvement) == (3, 1, 1)


@pytest.mark.parametrize(
    ("mode", "min_delta", "relative", "values", "improved"),
    [
        ("max", 0.0, False, [0.5, 0.5, 0.6, 0.59], [True, False, True, False]),
        ("min", 0.0, False, [2.0, 2.0, 1.5, 1.6], [True, False, True, False]),
        ("max", 0.1, False, [0.5, 0.6, 0.61, 0.72], [True, False, True, True]),
        ("min", 0.1, False, [1.0, 0.9, 0.89, 0.78], [True, False, True, True]),
        # relative: the threshold is abs(best) * min_delta, also for negative metrics
        ("max", 0.1, True, [-10.0, -9.5, -8.9], [True, False, True]),
        ("min", 0.1, True, [-10.0, -10.5, -11.1], [True, False, True]),
        ("max", 0.1, True, [10.0, 10.9, 11.1], [True, False, True]),
    ],
)
def test_improvement_thresholds(
    mode: str, min_delta: float, relative: bool, values: list[float], improved: list[bool]
) -> None:
    """A value improves only when it beats the best by more than the (absolute or relative) delta."""
    tracker = MetricTracker("m", mode, min_delta, relative)  # type: ignore[arg-type]
    observations = feed(tracker, values, "m")
    assert [o.improved for o in observations if o is not None] == improved


def test_non_finite_values_never_improve_but_count() -> None:
    """nan and inf are epochs without improvement; the first finite value after them improves."""
    tracker = MetricTracker("acc1")
    observations = feed(tracker, [NAN, INF, 0.2, NAN, -INF])
    assert [o.improved for o in observations if o is not None] == [False, False, True, False, False]
    assert (tracker.best, tracker.best_epoch, tracker.epochs_since_improvement) == (0.2, 2, 2)
    assert tracker.epochs_seen == 5


def test_min_mode_does_not_take_minus_infinity_as_best() -> None:
    """In min mode -inf (a diverged loss) is not an improvement."""
    tracker = MetricTracker("loss", "min")
    feed(tracker, [1.0, -INF], "loss")
    assert (tracker.best, tracker.epochs_since_improvement) == (1.0, 1)


def test_epoch_without_metric_counts_without_improvement() -> None:
    """A numbered line lacking the metric counts as an epoch whose value is None."""
    tracker = MetricTracker("acc1")
    tracker.update(em(0, acc1=0.5))
    obs = tracker.update(em(1, loss=1.0))
    assert obs == Observation(1, None, improved=False, duplicate=False, restarted=False)
    assert (tracker.epochs_seen, tracker.epochs_since_improvement, tracker.last_value) == (2, 1, None)


def test_duplicate_epoch_is_not_counted_twice() -> None:
    """A repeated epoch (another rank) keeps the counters and the first value of each key."""
    tracker = MetricTracker("acc1")
    tracker.update(em(0, acc1=0.5, loss=2.0))
    obs = tracker.update(em(0, acc1=0.9, loss=1.0, tail_acc=0.2))
    assert obs == Observation(0, None, improved=False, duplicate=True, restarted=False)
    assert (tracker.epochs_seen, tracker.best, tracker.epochs_since_improvement) == (1, 0.5, 0)
    assert tracker.latest == {"acc1": 0.5, "loss": 2.0, "tail_acc": 0.2}


def test_validation_line_supplies_a_late_value() -> None:
    """A training line without the metric, then a validation line of the same epoch, judge the value once."""
    tracker = MetricTracker("acc1")
    tracker.update(em(0, acc1=0.5))
    assert tracker.update(em(1, loss=1.0)) == Observation(1, None, False, False, False)
    assert tracker.epochs_since_improvement == 1
    assert tracker.update(em(1, acc1=0.6)) == Observation(
        1, 0.6, improved=True, duplicate=True, restarted=False
    )
    assert (tracker.best, tracker.best_epoch, tracker.epochs_since_improvement) == (0.6, 1, 0)
    assert tracker.epochs_seen == 2


def test_unnumbered_validation_line_completes_the_current_epoch() -> None:
    """An unnumbered line with the metric fills in the current epoch when it lacks the value."""
    tracker = MetricTracker("acc1")
    tracker.update(em(0, loss=2.0))
    assert tracker.update(em(None, acc1=0.3)) == Observation(0, 0.3, True, duplicate=True, restarted=False)
    assert tracker.update(em(None, acc1=0.2)) == Observation(1, 0.2, False, duplicate=False, restarted=False)
    assert (tracker.epochs_seen, tracker.epochs_since_improvement) == (2, 1)


def test_late_value_without_improvement_keeps_counters() -> None:
    """A late value that does not improve leaves the already-counted epoch as it was."""
    tracker = MetricTracker("acc1")
    tracker.update(em(0, acc1=0.5))
    tracker.update(em(1, loss=1.0))
    assert tracker.update(em(1, acc1=0.4)) == Observation(1, 0.4, False, duplicate=True, restarted=False)
    assert (tracker.epochs_seen, tracker.epochs_since_improvement, tracker.last_value) == (2, 1, 0.4)
    assert tracker.update(em(1, acc1=0.9)).value is None  # type: ignore[union-attr]
    assert tracker.best == 0.5


def test_restart_from_checkpoint_counts_as_new_epoch() -> None:
    """A lower epoch is a restart: recorded, counted again, best kept, new version span."""
    tracker = MetricTracker("acc1")
    for epoch, value in enumerate([0.1, 0.3, 0.2, 0.2]):
        tracker.update(em(epoch, acc1=value), config_version=1)
    obs = tracker.update(em(2, acc1=0.25), config_version=1)
    assert obs == Observation(2, 0.25, improved=False, duplicate=False, restarted=True)
    assert tracker.restarts == [(3, 2)]
    assert (tracker.epochs_seen, tracker.epochs_since_improvement, tracker.best) == (5, 3, 0.3)
    tracker.update(em(3, acc1=0.2), config_version=1)
    assert tracker.version_spans == [VersionSpan(1, 0, 3), VersionSpan(1, 2, 3)]


def test_version_spans_follow_config_changes() -> None:
    """Each config version gets a span of the epochs observed while it was in effect."""
    tracker = MetricTracker("acc1")
    for epoch, version in enumerate([1, 1, 1, 2, 2, 3]):
        tracker.update(em(epoch, acc1=0.5), config_version=version)
    tracker.update(em(5, acc1=0.5), config_version=4)  # a duplicate belongs to the first report
    assert tracker.version_spans == [VersionSpan(1, 0, 2), VersionSpan(2, 3, 4), VersionSpan(3, 5, 5)]


def test_state_stays_constant_size_over_a_long_run() -> None:
    """Ten thousand epochs leave no per-epoch state behind."""
    tracker = MetricTracker()
    for epoch in range(10_000):
        tracker.update(em(epoch, acc1=(epoch % 7) / 10, loss=1.0), config_version=epoch // 5000)
    assert tracker.epochs_seen == 10_000
    assert len(tracker.version_spans) == 2
    sizes = [len(v) for v in vars(tracker).values() if isinstance(v, (list, dict, set))]
    assert max(sizes) <= 2


def test_to_dict_is_plain_data() -> None:
    """``to_dict`` reports the state as JSON-compatible plain data."""
    tracker = MetricTracker()
    tracker.update(em(0, acc1=0.5, loss=1.0), config_version=1)
    tracker.update(em(1, acc1=0.4), config_version=2)
    data = tracker.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["metric"] == "acc1"
    assert (data["best"], data["best_epoch"], data["epochs_seen"], data["epochs_since_improvement"]) == (
        0.5,
        0,
        2,
        1,
    )
    assert data["version_spans"] == [
        {"version": 1, "first_epoch": 0, "last_epoch": 0},
        {"version": 2, "first_epoch": 1, "last_epoch": 1},
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "maximum"}, "--mode must be 'max' or 'min' (got 'maximum')"),
        ({"min_delta": -0.1}, "--min_delta must be a finite number >= 0 (got -0.1)"),
        ({"min_delta": NAN}, "--min_delta must be a finite number >= 0 (got nan)"),
    ],
)
def test_bad_options_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    """A bad mode or min_delta is a one-line ConfigError."""
    with pytest.raises(ConfigError) as info:
        MetricTracker(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("mode", "a", "b", "better"),
    [
        ("max", 0.6, 0.5, True),
        ("max", 0.5, 0.5, False),
        ("min", 0.4, 0.5, True),
        ("max", 0.1, None, True),
        ("max", NAN, None, False),
        ("min", -INF, 1.0, False),
    ],
)
def test_is_better(mode: str, a: float, b: float | None, better: bool) -> None:
    """``is_better`` compares by the tracker's direction and rejects non-finite candidates."""
    assert MetricTracker("m", mode).is_better(a, b) is better  # type: ignore[arg-type]


def _reference(values: list[float], mode: str, min_delta: float, relative: bool) -> tuple[float | None, int]:
    """Recompute best and epochs-since-improvement from the whole history."""
    best: float | None = None
    since = 0
    for value in values:
        delta = 0.0 if best is None else (abs(best) * min_delta if relative else min_delta)
        better = math.isfinite(value) and (
            best is None or (value > best + delta if mode == "max" else value < best - delta)
        )
        if better:
            best, since = value, 0
        else:
            since += 1
    return best, since


@given(
    values=st.lists(
        st.one_of(st.floats(-1e6, 1e6), st.sampled_from([NAN, INF, -INF])),
        max_size=60,
    ),
    mode=st.sampled_from(["max", "min"]),
    min_delta=st.floats(0, 10),
    relative=st.booleans(),
)
def test_incremental_state_matches_full_history(
    values: list[float], mode: str, min_delta: float, relative: bool
) -> None:
    """The O(1) tracker agrees with a recomputation over the whole history."""
    tracker = MetricTracker("m", mode, min_delta, relative)  # type: ignore[arg-type]
    feed(tracker, values, "m")
    assert (tracker.best, tracker.epochs_since_improvement) == _reference(values, mode, min_delta, relative)
    assert tracker.epochs_seen == len(values)
