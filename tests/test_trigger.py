"""Tests for autotune_rt.trigger, driven by the example tables in docs/trigger.md."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autotune_rt.exceptions import ConfigError
from autotune_rt.parse import EpochMetrics
from autotune_rt.tracker import MetricTracker
from autotune_rt.trigger import Trigger

DOC = Path(__file__).resolve().parents[1] / "docs" / "trigger.md"


@dataclass(frozen=True)
class Row:
    epoch: int
    value: float | None  # None: the line lacks the metric ("—")
    since: int
    fires: bool
    blocked_by: str | None


@dataclass(frozen=True)
class DocExample:
    title: str
    trigger: dict[str, Any]
    tracker: dict[str, Any]
    metric: str
    rows: tuple[Row, ...]


def _kwargs(text: str, name: str) -> dict[str, Any]:
    """Read the keyword arguments of a constructor call written in a code span."""
    match = re.search(rf"`({name}\(.*?\))`", text, re.DOTALL)
    assert match, f"no `{name}(...)` in the text above the table"
    call = ast.parse(match.group(1), mode="eval").body
    assert isinstance(call, ast.Call) and not call.args
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}


def _cell(text: str) -> str | None:
    return None if text == "—" else text


def load_examples(doc: Path = DOC) -> list[DocExample]:
    """Parse every '### Example' section of the doc: its constructors and its table."""
    examples = []
    for section in re.split(r"^### ", doc.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]:
        title, _, body = section.partition("\n")
        prose, _, _ = body.partition("\n|")
        table = [line for line in body.splitlines() if line.startswith("|")]
        header = [c.strip() for c in table[0].strip("|").split("|")]
        assert header[0] == "epoch" and header[2:5] == ["since", "fires?", "blocked by"], header
        rows = []
        for line in table[2:]:
            epoch, value, since, fires, blocked, *_ = (c.strip() for c in line.strip("|").split("|"))
            raw = _cell(value)
            assert fires in ("yes", "no"), line
            rows.append(
                Row(
                    int(epoch),
                    None if raw is None else float(raw),
                    int(since),
                    fires == "yes",
                    _cell(blocked),
                )
            )
        examples.append(
            DocExample(
                title, _kwargs(prose, "Trigger"), _kwargs(prose, "MetricTracker"), header[1], tuple(rows)
            )
        )
    return examples


EXAMPLES = load_examples()


def line(row: Row, metric: str) -> EpochMetrics:
    metrics = {"epoch": float(row.epoch)}
    if row.value is not None:
        metrics[metric] = row.value
    return EpochMetrics(metrics=metrics, epoch=row.epoch)


def test_doc_has_the_examples() -> None:
    """The doc's example tables are found, so the table test cannot pass vacuously."""
    assert [len(e.rows) for e in EXAMPLES] == [10, 10, 7]
    assert all(any(r.fires for r in e.rows) for e in EXAMPLES)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.title for e in EXAMPLES])
def test_doc_table(example: DocExample) -> None:
    """Feeding the table's lines gives exactly its since / fires? / blocked-by columns."""
    tracker = MetricTracker(**example.tracker)
    trigger = Trigger(**example.trigger)
    for row in example.rows:
        tracker.update(line(row, example.metric))
        blocked = trigger.reason_blocked(tracker)
        fires = trigger.should_fire(tracker)
        if fires:
            trigger.record_adjustment(tracker)
        assert (tracker.epochs_since_improvement, fires, blocked) == (row.since, row.fires, row.blocked_by), (
            row
        )
    assert trigger.adjustments == sum(r.fires for r in example.rows)


def _stalled(epochs: int) -> MetricTracker:
    """A tracker that saw *epochs* epochs, improving only on the first."""
    tracker = MetricTracker("acc1")
    for epoch in range(epochs):
        tracker.update(EpochMetrics(metrics={"acc1": 0.5}, epoch=epoch))
    return tracker


def test_min_epochs_counts_epochs_observed() -> None:
    """With min_epochs=10 the first possible firing is on the tenth epoch (epoch 9)."""
    trigger = Trigger(min_epochs=10, patience=1)
    assert trigger.reason_blocked(_stalled(9)) == "min_epochs"
    assert trigger.should_fire(_stalled(10))


def test_cooldown_defaults_to_patience() -> None:
    """Without a cooldown, a new config gets ``patience`` epochs before the next adjustment."""
    trigger = Trigger(min_epochs=0, patience=3)
    assert trigger.cooldown == 3
    tracker = _stalled(4)
    trigger.record_adjustment(tracker)
    for epoch, expected in [(4, "cooldown"), (5, "cooldown"), (6, None)]:
        tracker.update(EpochMetrics(metrics={"acc1": 0.1}, epoch=epoch))
        assert trigger.reason_blocked(tracker) == expected


def test_cooldown_zero_still_allows_one_adjustment_per_epoch() -> None:
    """cooldown=0 lets the next epoch fire, but a repeated line of the same epoch never does."""
    trigger = Trigger(min_epochs=0, patience=1, cooldown=0)
    tracker = _stalled(2)
    assert trigger.should_fire(tracker)
    trigger.record_adjustment(tracker)
    tracker.update(EpochMetrics(metrics={"acc1": 0.5}, epoch=1))
    assert trigger.reason_blocked(tracker) == "cooldown"
    tracker.update(EpochMetrics(metrics={"acc1": 0.5}, epoch=2))
    assert trigger.should_fire(tracker)


def test_max_adjustments_zero_never_fires() -> None:
    """max_adjustments=0 disables adjusting, and that reason wins over the others."""
    trigger = Trigger(min_epochs=100, patience=1, max_adjustments=0)
    assert trigger.reason_blocked(MetricTracker()) == "max_adjustments"


def test_no_metric_at_all_never_fires() -> None:
    """Epochs that never report the metric run into patience, but the trigger waits for a value."""
    trigger = Trigger(min_epochs=0, patience=2)
    tracker = MetricTracker()
    for epoch in range(5):
        tracker.update(EpochMetrics(metrics={"loss": 1.0}, epoch=epoch))
    assert tracker.epochs_since_improvement == 5
    assert trigger.reason_blocked(tracker) == "no_metric"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_epochs": -1}, "--min_epochs must be >= 0 (got -1)"),
        ({"patience": 0}, "--patience must be >= 1 (got 0)"),
        ({"cooldown": -2}, "--cooldown must be >= 0 (got -2)"),
        ({"max_adjustments": -1}, "--max_adjustments must be >= 0 (got -1)"),
        ({"patience": True}, "--patience must be a whole number (got True)"),
        ({"min_epochs": 2.5}, "--min_epochs must be a whole number (got 2.5)"),
    ],
)
def test_bad_values_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    """Out-of-range or non-integer settings are a one-line ConfigError naming the option."""
    with pytest.raises(ConfigError) as info:
        Trigger(**kwargs)
    assert str(info.value) == message


def test_repr_shows_the_effective_settings() -> None:
    """The repr shows the resolved cooldown, for logs."""
    assert repr(Trigger(patience=4)) == "Trigger(min_epochs=10, patience=4, cooldown=4, max_adjustments=None)"
