"""The seed's diagnosis rules: latest epoch metrics -> the problem to fix next."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PROBLEMS",
    "RULES",
    "Diagnosis",
    "MetricNames",
    "Rule",
    "Thresholds",
    "diagnose",
]

PROBLEMS = ("poor_tail", "poor_head", "high_loss", "stagnation")

# The seed's training prints its loss as 'ce'; it stands in when the default name is absent.
_LOSS_FALLBACK = ("loss", "ce")


@dataclass(frozen=True)
class Thresholds:
    """The numbers the seed rules compare against; every comparison is strict.

    Attributes:
        tail_low: ``poor_tail`` needs tail accuracy below this.
        head_high: ``poor_tail`` needs head accuracy above this.
        head_low: ``poor_head`` needs head accuracy below this.
        tail_high: ``poor_head`` needs tail accuracy above this.
        loss_high: ``high_loss`` needs the loss above this.
    """

    tail_low: float = 0.3
    head_high: float = 0.6
    head_low: float = 0.5
    tail_high: float = 0.4
    loss_high: float = 2.0


@dataclass(frozen=True)
class MetricNames:
    """The names under which the training prints head accuracy, tail accuracy and loss.

    When ``loss`` is left at ``"loss"`` and a line has no ``loss`` but has ``ce`` (as the
    seed's training prints), ``ce`` is used instead.
    """

    head: str = "head_acc"
    tail: str = "tail_acc"
    loss: str = "loss"


@dataclass(frozen=True)
class Diagnosis:
    """What the rules decided and on which numbers.

    Attributes:
        problem: One of :data:`PROBLEMS`.
        evidence: The metric values the deciding rule used, by the name they were read under.
        missing: Metric names that were absent or not finite, so an earlier rule could not
            apply.
    """

    problem: str
    evidence: dict[str, float] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (for structured logs and the control file)."""
        return {"problem": self.problem, "evidence": dict(self.evidence), "missing": list(self.missing)}


Rule = Callable[[Mapping[str, float], MetricNames, Thresholds], Diagnosis | None]


def _value(metrics: Mapping[str, float], name: str) -> float | None:
    """Return the metric as a finite float, or None when absent, non-numeric or nan/inf."""
    raw = metrics.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _loss_name(metrics: Mapping[str, float], names: MetricNames) -> str:
    """Return the name the loss is read under: the configured one, or 'ce' for the seed."""
    if names.loss == _LOSS_FALLBACK[0] and names.loss not in metrics and _LOSS_FALLBACK[1] in metrics:
        return _LOSS_FALLBACK[1]
    return names.loss


def _read(metrics: Mapping[str, float], *keys: str) -> dict[str, float] | None:
    """Return ``{name: value}`` for all ``keys``, or None if any is missing or not finite."""
    found = {key: _value(metrics, key) for key in keys}
    if any(value is None for value in found.values()):
        return None
    return {key: value for key, value in found.items() if value is not None}


def poor_tail(metrics: Mapping[str, float], names: MetricNames, t: Thresholds) -> Diagnosis | None:
    """Tail classes lag while head classes do well: ``tail < tail_low and head > head_high``."""
    values = _read(metrics, names.tail, names.head)
    if values is None or not (values[names.tail] < t.tail_low and values[names.head] > t.head_high):
        return None
    return Diagnosis("poor_tail", values)


def poor_head(metrics: Mapping[str, float], names: MetricNames, t: Thresholds) -> Diagnosis | None:
    """Head classes lag while tail classes do well: ``head < head_low and tail > tail_high``."""
    values = _read(metrics, names.head, names.tail)
    if values is None or not (values[names.head] < t.head_low and values[names.tail] > t.tail_high):
        return None
    return Diagnosis("poor_head", values)


def high_loss(metrics: Mapping[str, float], names: MetricNames, t: Thresholds) -> Diagnosis | None:
    """The loss is still high: ``loss > loss_high``."""
    loss = _loss_name(metrics, names)
    values = _read(metrics, loss)
    if values is None or not values[loss] > t.loss_high:
        return None
    return Diagnosis("high_loss", values)


def stagnation(metrics: Mapping[str, float], names: MetricNames, t: Thresholds) -> Diagnosis | None:
    """Nothing specific is wrong; always applies, with whatever head/tail/loss was present."""
    keys = (names.head, names.tail, _loss_name(metrics, names))
    found = {key: _value(metrics, key) for key in keys}
    return Diagnosis("stagnation", {key: value for key, value in found.items() if value is not None})


# The seed's rules in its order of precedence; the first that returns a Diagnosis wins.
RULES: list[Rule] = [poor_tail, poor_head, high_loss, stagnation]

# Which metrics each seed rule reads, so diagnose() can report the ones that kept it from applying.
_NEEDS: dict[Rule, Callable[[Mapping[str, float], MetricNames], tuple[str, ...]]] = {
    poor_tail: lambda m, n: (n.tail, n.head),
    poor_head: lambda m, n: (n.head, n.tail),
    high_loss: lambda m, n: (_loss_name(m, n),),
}


def diagnose(
    metrics: Mapping[str, float],
    names: MetricNames = MetricNames(),
    thresholds: Thresholds = Thresholds(),
) -> Diagnosis:
    """Apply :data:`RULES` in order and return the first diagnosis.

    A metric that is absent or not finite makes every rule that reads it not apply; it never
    raises. The last rule (``stagnation``) always applies.

    Args:
        metrics: The latest value of every metric (e.g. ``MetricTracker.latest``).
        names: The names under which head accuracy, tail accuracy and loss are printed.
        thresholds: The numbers the rules compare against.

    Returns:
        The first rule's :class:`Diagnosis`, with ``missing`` naming the metrics that kept an
        earlier rule from applying.
    """
    missing: list[str] = []
    for rule in RULES:
        found = rule(metrics, names, thresholds)
        if found is not None:
            return Diagnosis(found.problem, found.evidence, tuple(missing))
        needs = _NEEDS.get(rule)
        if needs is not None:
            for key in needs(metrics, names):
                if _value(metrics, key) is None and key not in missing:
                    missing.append(key)
    return Diagnosis("stagnation", {}, tuple(missing))
