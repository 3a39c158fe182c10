"""Tests for autotune_rt.diagnose: the seed's rules, boundaries, missing metrics, precedence."""

from __future__ import annotations

import json
import math

import pytest

from autotune_rt.diagnose import (
    PROBLEMS,
    RULES,
    Diagnosis,
    MetricNames,
    Thresholds,
    diagnose,
)

NAN = math.nan
INF = math.inf


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        # poor_tail: tail < 0.3 and head > 0.6
        ({"tail_acc": 0.18, "head_acc": 0.71}, "poor_tail"),
        ({"tail_acc": 0.29999, "head_acc": 0.60001}, "poor_tail"),
        ({"tail_acc": 0.3, "head_acc": 0.71}, "stagnation"),
        ({"tail_acc": 0.18, "head_acc": 0.6}, "stagnation"),
        # poor_head: head < 0.5 and tail > 0.4
        ({"tail_acc": 0.45, "head_acc": 0.4}, "poor_head"),
        ({"tail_acc": 0.40001, "head_acc": 0.49999}, "poor_head"),
        ({"tail_acc": 0.4, "head_acc": 0.4}, "stagnation"),
        ({"tail_acc": 0.45, "head_acc": 0.5}, "stagnation"),
        # high_loss: loss > 2.0
        ({"loss": 2.5}, "high_loss"),
        ({"loss": 2.0}, "stagnation"),
        ({"loss": 2.0000001}, "high_loss"),
        ({"loss": 1.2, "tail_acc": 0.35, "head_acc": 0.55}, "stagnation"),
        # stagnation: nothing else applies
        ({}, "stagnation"),
        ({"acc1": 0.45}, "stagnation"),
    ],
)
def test_rule_table(metrics: dict[str, float], problem: str) -> None:
    """Each rule fires exactly when its strict seed condition holds."""
    assert diagnose(metrics).problem == problem


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        # poor_tail wins over high_loss
        ({"tail_acc": 0.1, "head_acc": 0.9, "loss": 5.0}, "poor_tail"),
        # poor_head wins over high_loss
        ({"tail_acc": 0.5, "head_acc": 0.3, "loss": 5.0}, "poor_head"),
        # neither accuracy rule applies, so the loss decides
        ({"tail_acc": 0.35, "head_acc": 0.55, "loss": 5.0}, "high_loss"),
    ],
)
def test_precedence(metrics: dict[str, float], problem: str) -> None:
    """Rules apply in the seed's order: poor_tail, poor_head, high_loss, stagnation."""
    assert diagnose(metrics).problem == problem


@pytest.mark.parametrize(
    ("metrics", "problem", "missing"),
    [
        ({"tail_acc": 0.1, "loss": 3.0}, "high_loss", ("head_acc",)),
        ({"head_acc": 0.9, "loss": 3.0}, "high_loss", ("tail_acc",)),
        ({"head_acc": 0.9}, "stagnation", ("tail_acc", "loss")),
        ({}, "stagnation", ("tail_acc", "head_acc", "loss")),
        ({"tail_acc": NAN, "head_acc": 0.9, "loss": 3.0}, "high_loss", ("tail_acc",)),
        ({"tail_acc": 0.1, "head_acc": INF}, "stagnation", ("head_acc", "loss")),
        ({"tail_acc": 0.1, "head_acc": 0.9, "loss": NAN}, "poor_tail", ()),
        ({"tail_acc": 0.1, "head_acc": 0.9, "loss": INF}, "poor_tail", ()),
        ({"tail_acc": 0.35, "head_acc": 0.55, "loss": NAN}, "stagnation", ("loss",)),
        ({"tail_acc": 0.35, "head_acc": 0.55, "loss": -INF}, "stagnation", ("loss",)),
        ({"tail_acc": "high", "head_acc": None, "loss": 3.0}, "high_loss", ("tail_acc", "head_acc")),
    ],
)
def test_missing_and_non_finite(metrics: dict[str, float], problem: str, missing: tuple[str, ...]) -> None:
    """A missing, non-finite or non-numeric metric makes its rules not apply and is listed."""
    result = diagnose(metrics)
    assert (result.problem, result.missing) == (problem, missing)
    assert all(math.isfinite(v) for v in result.evidence.values())


@pytest.mark.parametrize(
    ("metrics", "evidence"),
    [
        ({"ce": 2.3456, "acc1": 0.12}, {"ce": 2.3456}),
        ({"ce": 2.3456, "loss": 1.0}, None),
        ({"ce": 2.3456, "loss": NAN}, None),
    ],
)
def test_ce_stands_in_for_loss(metrics: dict[str, float], evidence: dict[str, float] | None) -> None:
    """With the default loss name, 'ce' is read only when there is no 'loss' key."""
    result = diagnose(metrics)
    if evidence is None:
        assert result.problem == "stagnation"
    else:
        assert (result.problem, result.evidence) == ("high_loss", evidence)


def test_ce_not_used_for_custom_loss_name() -> None:
    """A custom loss name is read as given, without falling back to 'ce'."""
    result = diagnose({"ce": 5.0}, MetricNames(loss="train_loss"))
    assert (result.problem, result.missing) == ("stagnation", ("tail_acc", "head_acc", "train_loss"))


def test_evidence_carries_the_values_used() -> None:
    """The deciding rule's evidence holds exactly the metric values it compared."""
    result = diagnose({"tail_acc": 0.18, "head_acc": 0.71, "ce": 1.5, "acc1": 0.45})
    assert result == Diagnosis("poor_tail", {"tail_acc": 0.18, "head_acc": 0.71}, ())


def test_stagnation_evidence_holds_what_was_present() -> None:
    """Stagnation's evidence includes every finite head/tail/loss value present."""
    result = diagnose({"tail_acc": 0.35, "head_acc": 0.55, "ce": 1.2, "acc1": 0.4})
    assert result.evidence == {"head_acc": 0.55, "tail_acc": 0.35, "ce": 1.2}
    assert diagnose({"tail_acc": 0.35, "head_acc": NAN}).evidence == {"tail_acc": 0.35}


def test_custom_names_and_thresholds() -> None:
    """Metric names and thresholds are configurable."""
    names = MetricNames(head="many_acc", tail="few_acc", loss="total")
    metrics = {"many_acc": 0.8, "few_acc": 0.35, "total": 0.9}
    assert diagnose(metrics, names).problem == "stagnation"
    assert diagnose(metrics, names, Thresholds(tail_low=0.4)).problem == "poor_tail"
    assert diagnose(metrics, names, Thresholds(loss_high=0.5)).problem == "high_loss"
    assert diagnose(metrics, names, Thresholds(loss_high=0.5)).evidence == {"total": 0.9}


def test_ints_count_as_numbers() -> None:
    """Integer metric values are compared like floats."""
    assert diagnose({"loss": 3}).problem == "high_loss"


def test_rules_are_callables_in_seed_order() -> None:
    """RULES holds one callable per problem, in PROBLEMS order, each returning None or its problem."""
    assert PROBLEMS == ("poor_tail", "poor_head", "high_loss", "stagnation")
    metrics = {"tail_acc": 0.1, "head_acc": 0.9, "loss": 5.0}
    results = [rule(metrics, MetricNames(), Thresholds()) for rule in RULES]
    assert [r.problem if r else None for r in results] == ["poor_tail", None, "high_loss", "stagnation"]


def test_to_dict_is_json_ready() -> None:
    """Diagnosis.to_dict() round-trips through JSON."""
    result = diagnose({"tail_acc": 0.1, "loss": 3.0})
    assert json.loads(json.dumps(result.to_dict())) == {
        "problem": "high_loss",
        "evidence": {"loss": 3.0},
        "missing": ["head_acc"],
    }
