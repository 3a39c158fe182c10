"""Tests for autotune_rt.engine: tracker, trigger, diagnosis and a real seeded tuner together."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from autotune_rt.diagnose import Diagnosis, MetricNames, Thresholds
from autotune_rt.engine import Decision, Step, TuningEngine
from autotune_rt.exceptions import ConfigError
from autotune_rt.parse import EpochMetrics, parse_line
from autotune_rt.space import DEFAULT_WEIGHTS, Weights
from autotune_rt.tracker import MetricTracker
from autotune_rt.trigger import Trigger
from autotune_rt.tuner import AdaptiveTuner, Adjustment, AutoTuner

DOC = Path(__file__).resolve().parents[1] / "docs" / "trigger.md"

# Head does well, tail lags: the seed's poor_tail rule.
POOR_TAIL = {"head_acc": 0.7, "tail_acc": 0.2, "ce": 1.0}


def _doc_tables() -> list[
    tuple[str, dict[str, Any], dict[str, Any], str, list[tuple[int, float | None, bool]]]
]:
    """Read docs/trigger.md's examples as (title, trigger kwargs, tracker kwargs, metric, rows).

    tests/test_trigger.py checks every column of these tables; here only the lines and the
    ``fires?`` column matter.
    """

    def kwargs(text: str, name: str) -> dict[str, Any]:
        match = re.search(rf"`({name}\(.*?\))`", text, re.DOTALL)
        assert match, name
        call = ast.parse(match.group(1), mode="eval").body
        assert isinstance(call, ast.Call)
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}

    tables = []
    for section in re.split(r"^### ", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]:
        title, _, body = section.partition("\n")
        prose = body.partition("\n|")[0]
        cells = [
            [c.strip() for c in ln.strip("|").split("|")] for ln in body.splitlines() if ln.startswith("|")
        ]
        rows = [(int(r[0]), None if r[1] == "—" else float(r[1]), r[3] == "yes") for r in cells[2:]]
        tables.append((title, kwargs(prose, "Trigger"), kwargs(prose, "MetricTracker"), cells[0][1], rows))
    return tables


TABLES = _doc_tables()


def engine_for(
    trigger: Trigger, tracker: MetricTracker | None = None, *, seed: int = 7, **kwargs: Any
) -> TuningEngine:
    tuner = AdaptiveTuner(seed=seed)
    return TuningEngine(tracker or MetricTracker(), trigger, tuner, dict(DEFAULT_WEIGHTS), **kwargs)


def stalled_lines(epochs: int, **extra: float) -> list[EpochMetrics]:
    """Epoch lines whose acc1 improves only on epoch 0."""
    return [EpochMetrics(metrics={"acc1": 0.5, **extra}, epoch=e) for e in range(epochs)]


@pytest.mark.parametrize("table", TABLES, ids=[t[0] for t in TABLES])
def test_decisions_fall_on_the_epochs_the_trigger_doc_predicts(table: Any) -> None:
    """Feeding a docs/trigger.md table through the engine decides exactly on its 'fires? yes' rows."""
    _title, trigger_kwargs, tracker_kwargs, metric, rows = table
    engine = engine_for(Trigger(**trigger_kwargs), MetricTracker(**tracker_kwargs))
    fired = []
    for epoch, value, _fires in rows:
        metrics = {**POOR_TAIL, **({} if value is None else {metric: value})}
        step = engine.observe(EpochMetrics(metrics=metrics, epoch=epoch))
        fired.append(step.decision is not None)
    assert fired == [fires for _e, _v, fires in rows]
    assert [d.epoch for d in engine.decisions] == [e for e, _v, fires in rows if fires]


def test_poor_tail_raises_col_and_scl() -> None:
    """A stall with good head and poor tail accuracy raises lambda_col and lambda_scl one step."""
    engine = engine_for(Trigger(min_epochs=3, patience=2))
    steps = [engine.observe(line) for line in stalled_lines(4, **POOR_TAIL)]
    assert [s.decision is not None for s in steps] == [False, False, True, False]
    decision = steps[2].decision
    assert decision is not None
    assert decision.epoch == 2
    assert decision.diagnosis.problem == "poor_tail"
    assert decision.diagnosis.evidence == {"head_acc": 0.7, "tail_acc": 0.2}
    assert decision.adjustment.previous == DEFAULT_WEIGHTS
    assert decision.adjustment.weights == {**DEFAULT_WEIGHTS, "lambda_col": 0.4, "lambda_scl": 0.25}
    assert engine.weights == decision.adjustment.weights
    assert engine.trigger.adjustments == 1


def test_later_decisions_start_from_the_new_weights() -> None:
    """A persisting poor_tail keeps raising lambda_col and lambda_scl from the weights now in effect."""
    engine = engine_for(Trigger(min_epochs=2, patience=1, cooldown=1))
    for line in stalled_lines(4, **POOR_TAIL):
        engine.observe(line)
    first, second, third = (d.adjustment for d in engine.decisions)
    assert (first.weights["lambda_col"], first.weights["lambda_scl"]) == (0.4, 0.25)
    assert second.previous == first.weights
    assert (second.weights["lambda_col"], second.weights["lambda_scl"]) == (0.5, 0.3)
    # Both at the top of their grid: the tuner falls back to a perturbation and says so.
    assert third.previous == second.weights
    assert third.note is not None and third.note.startswith("fallback_perturbation")
    assert engine.weights == third.weights != second.weights


def test_diagnosis_reads_the_merged_latest_metrics() -> None:
    """Head/tail accuracy printed on a separate line of the epoch still reach the diagnosis."""
    engine = engine_for(Trigger(min_epochs=0, patience=1))
    engine.observe(EpochMetrics(metrics={"acc1": 0.5}, epoch=0))
    engine.observe(EpochMetrics(metrics={"loss": 3.0}, epoch=1))  # training line: no acc1 yet
    step = engine.observe(EpochMetrics(metrics={"acc1": 0.4, "head_acc": 0.3, "tail_acc": 0.5}, epoch=1))
    assert step.observation is not None and step.observation.duplicate
    assert step.decision is not None
    assert step.decision.diagnosis.problem == "poor_head"
    assert step.decision.adjustment.moves == (("lambda_dol", 1), ("lambda_col", -1))


def test_names_and_thresholds_reach_the_diagnosis() -> None:
    """Custom metric names and thresholds are the ones the rules use."""
    engine = engine_for(
        Trigger(min_epochs=0, patience=1),
        names=MetricNames(head="h", tail="t", loss="l"),
        thresholds=Thresholds(tail_low=0.2, loss_high=3.5),
    )
    # With the seed's names and thresholds this would be poor_tail, or nothing read at all.
    for line in stalled_lines(2, h=0.9, t=0.25, loss=1.0, l=4.0):
        step = engine.observe(line)
    assert step.decision is not None
    assert step.decision.diagnosis == Diagnosis("high_loss", {"l": 4.0}, ())


def test_step_log_gives_no_observation_and_no_decision() -> None:
    """A line with neither epoch nor metric is a Step with nothing in it."""
    engine = engine_for(Trigger(min_epochs=0, patience=1))
    assert engine.observe(EpochMetrics(metrics={"lr": 0.1}, epoch=None)) == Step(None, None)


def test_config_version_is_attributed_to_later_epochs() -> None:
    """Epochs observed after the caller sets config_version belong to that version."""
    engine = engine_for(Trigger(min_epochs=0, patience=1), config_version=1)
    lines = stalled_lines(4)
    for line in lines[:2]:
        engine.observe(line)
    engine.config_version = 2
    for line in lines[2:]:
        engine.observe(line)
    spans = [(s.version, s.first_epoch, s.last_epoch) for s in engine.tracker.version_spans]
    assert spans == [(1, 0, 1), (2, 2, 3)]


def test_same_seed_same_decisions() -> None:
    """Two engines with the same seed make identical stagnation perturbations."""
    runs = []
    for _ in range(2):
        engine = engine_for(Trigger(min_epochs=0, patience=1, cooldown=1), seed=123)
        for line in stalled_lines(8):
            engine.observe(line)
        runs.append([(d.epoch, d.diagnosis.problem, d.adjustment.moves) for d in engine.decisions])
    assert len(runs[0]) == 7
    assert all(problem == "stagnation" for _e, problem, _m in runs[0])
    assert runs[0] == runs[1]


def test_initial_weights_are_copied() -> None:
    """The engine owns its weights: neither the caller's dict nor the tuner can change them."""

    class MutatingTuner(AutoTuner):
        def tune(self, diagnosis: Diagnosis, weights: Weights) -> Adjustment:
            adjustment = super().tune(diagnosis, weights)
            weights["lambda_hier"] = 99.0
            return adjustment

    initial = dict(DEFAULT_WEIGHTS)
    engine = TuningEngine(MetricTracker(), Trigger(min_epochs=0, patience=1), MutatingTuner(seed=1), initial)
    initial["lambda_dol"] = 42.0
    assert engine.weights == DEFAULT_WEIGHTS
    for line in stalled_lines(2, **POOR_TAIL):
        engine.observe(line)
    assert engine.weights["lambda_hier"] == DEFAULT_WEIGHTS["lambda_hier"]


def test_tuner_error_propagates_and_nothing_is_recorded() -> None:
    """A failing tune() raises to the caller, records no adjustment, and the next line tries again."""

    class FlakyTuner(AutoTuner):
        calls = 0

        def tune(self, diagnosis: Diagnosis, weights: Weights) -> Adjustment:
            FlakyTuner.calls += 1
            if FlakyTuner.calls == 1:
                raise RuntimeError("user tuner bug")
            return super().tune(diagnosis, weights)

    engine = TuningEngine(
        MetricTracker(), Trigger(min_epochs=0, patience=1), FlakyTuner(seed=1), DEFAULT_WEIGHTS
    )
    lines = stalled_lines(3, **POOR_TAIL)
    engine.observe(lines[0])
    with pytest.raises(RuntimeError, match="user tuner bug"):
        engine.observe(lines[1])
    assert (engine.decisions, engine.trigger.adjustments, engine.weights) == ([], 0, DEFAULT_WEIGHTS)
    step = engine.observe(lines[2])
    assert isinstance(step.decision, Decision)
    assert engine.trigger.adjustments == 1


def test_seed_output_through_the_real_parser() -> None:
    """The seed's own epoch lines, parsed by parse_line, stall into a poor_tail decision at epoch 9."""
    engine = engine_for(Trigger(min_epochs=10, patience=5))
    accs = [0.10, 0.20, 0.30, 0.40, 0.45, 0.44, 0.45, 0.43, 0.45, 0.44, 0.45]
    decisions = []
    for epoch, acc in enumerate(accs):
        text = (
            f"Epoch {epoch}[150.23s]: {{'epoch': {epoch}, 'ce': 1.5678, 'acc1': {acc}, "
            "'head_acc': 0.71, 'tail_acc': 0.18}"
        )
        parsed = parse_line(text)
        assert parsed is not None
        step = engine.observe(parsed)
        decisions.append(step.decision)
    fired = [d for d in decisions if d is not None]
    assert [d.epoch for d in fired] == [9]
    assert fired[0].diagnosis.problem == "poor_tail"
    assert engine.tracker.metric == "acc1"


# -- strategies -----------------------------------------------------------------------------


def harmful_lines(engine: TuningEngine, epochs: int) -> list[Step]:
    """Run a training whose acc1 falls as lambda_col rises, applying each change the next epoch."""
    steps = []
    running = dict(DEFAULT_WEIGHTS)
    for epoch in range(epochs):
        line = EpochMetrics({"acc1": round(0.9 - running["lambda_col"], 4), **POOR_TAIL}, epoch)
        step = engine.observe(line)
        steps.append(step)
        if step.decision is not None:
            engine.config_version += 1
            running = dict(step.decision.adjustment.weights)
    return steps


def test_seed_strategy_is_the_default_and_never_judges() -> None:
    """Without a strategy argument the engine decides as the seed: no verdicts, no rollbacks."""
    engine = engine_for(Trigger(min_epochs=4, patience=3))
    assert engine.strategy == "seed" and engine.adaptive is None
    steps = harmful_lines(engine, 9)
    assert all(s.verdict is None for s in steps)
    assert engine.verdicts == []
    assert [d.kind for d in engine.decisions] == ["adjust", "adjust"]
    assert engine.weights["lambda_col"] == 0.5  # the seed keeps raising it


def test_adaptive_strategy_reports_the_verdict_and_rolls_back() -> None:
    """With strategy='adaptive' the step that completes the window carries the verdict and a rollback."""
    engine = engine_for(Trigger(min_epochs=4, patience=3), strategy="adaptive")
    steps = harmful_lines(engine, 8)
    judged = [s for s in steps if s.verdict is not None]
    assert len(judged) == 1
    step = judged[0]
    assert step.verdict is not None and step.verdict.outcome == "worse"
    assert step.decision is not None and step.decision.kind == "rollback"
    assert step.decision.verdict is step.verdict
    assert engine.weights == DEFAULT_WEIGHTS
    assert engine.verdicts == [step.verdict]


def test_window_defaults_to_patience_and_can_be_set() -> None:
    """The evaluation window is the trigger's patience unless given."""
    default = engine_for(Trigger(min_epochs=4, patience=3), strategy="adaptive")
    assert default.adaptive is not None and default.adaptive.window == 3
    short = engine_for(Trigger(min_epochs=4, patience=3), strategy="adaptive", window=1)
    steps = harmful_lines(short, 6)
    assert [s.observation.epoch for s in steps if s.verdict is not None and s.observation] == [4]


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"strategy": "greedy"}, "--strategy"), ({"window": 0}, "window")]
)
def test_bad_strategy_arguments_raise_config_error(kwargs: dict[str, Any], match: str) -> None:
    """An unknown strategy or an empty window is a one-line ConfigError."""
    with pytest.raises(ConfigError, match=match):
        engine_for(Trigger(), **kwargs)


def test_verdict_survives_a_tuner_error_on_its_line() -> None:
    """A verdict rendered on a line whose tune() raises is returned with the next line."""

    class Flaky(AdaptiveTuner):
        fail = False

        def tune(self, diagnosis: Diagnosis, weights: Weights) -> Adjustment:
            if Flaky.fail:
                Flaky.fail = False
                raise RuntimeError("user tuner bug")
            return super().tune(diagnosis, weights)

    engine = TuningEngine(
        MetricTracker(),
        Trigger(min_epochs=2, patience=1),
        Flaky(seed=1),
        DEFAULT_WEIGHTS,
        strategy="adaptive",
    )
    flat = [EpochMetrics({"acc1": 0.5, **POOR_TAIL}, e) for e in range(4)]
    assert engine.observe(flat[0]).decision is None
    assert engine.observe(flat[1]).decision is not None
    Flaky.fail = True
    with pytest.raises(RuntimeError):
        engine.observe(flat[2])  # completes the 1-epoch window, then the trigger's tune() fails
    assert len(engine.verdicts) == 1
    step = engine.observe(flat[3])
    assert step.verdict is engine.verdicts[0]
    assert step.decision is not None and step.decision.kind == "adjust"
