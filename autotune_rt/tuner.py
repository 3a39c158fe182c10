"""The seed's extension API: AutoTuner / AdaptiveTuner turn a Diagnosis into new weights."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from autotune_rt.diagnose import Diagnosis
from autotune_rt.exceptions import ConfigError
from autotune_rt.space import (
    DEFAULT_GRIDS,
    DEFAULT_WEIGHTS,
    Move,
    SearchSpace,
    Weights,
    condense_validation_error,
)

__all__ = ["ACTIONS", "AdaptiveTuner", "Adjustment", "AutoTuner", "load_tuner_class"]

# The seed's actions: each problem raises (+1) or lowers (-1) these weights one grid step.
ACTIONS: dict[str, tuple[Move, ...]] = {
    "poor_tail": (("lambda_col", 1), ("lambda_scl", 1)),
    "poor_head": (("lambda_dol", 1), ("lambda_col", -1)),
    "high_loss": (("max_grad_norm", 1), ("lambda_dol", -1)),
}

_PINNED_NOTE = "no_move: every weight is pinned to a single grid value"

# The same tolerance as SearchSpace: a step that only canonicalises 0.30000000000000004 to
# 0.3 is not a move.
_REL_TOL = 1e-9
_ABS_TOL = 1e-12


@dataclass(frozen=True)
class Adjustment:
    """New weights and why they were chosen.

    Attributes:
        weights: The weights to apply next (keys the tuner does not know pass through).
        previous: The weights the decision started from.
        reason: The diagnosed problem (``poor_tail``, ``stagnation``, ...).
        moves: The grid steps actually made, as ``(name, +1 | -1)``.
        note: Why the decision differs from the plain rule (fallback, edge), else None.
    """

    weights: Weights
    previous: Weights
    reason: str
    moves: tuple[Move, ...] = ()
    note: str | None = None

    @property
    def changed(self) -> dict[str, tuple[float, float]]:
        """Return ``{name: (old, new)}`` for every weight whose value changed."""
        out: dict[str, tuple[float, float]] = {}
        for name, new in self.weights.items():
            old = self.previous.get(name, DEFAULT_WEIGHTS.get(name))
            if old is None or old != new:
                out[name] = (float("nan") if old is None else old, new)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (for structured logs)."""
        return {
            "weights": dict(self.weights),
            "previous": dict(self.previous),
            "reason": self.reason,
            "moves": [list(move) for move in self.moves],
            "note": self.note,
            "changed": {name: list(pair) for name, pair in self.changed.items()},
        }


class AutoTuner:
    """Batch mode's tuner: the seed's rules over a discrete search space.

    Customise it by subclassing: override :meth:`_default_search_space` for another grid and
    :meth:`tune` for another strategy, then pass ``--tuner module:Class``.

    Attributes:
        search_space: The grid moves go along.
        rng: The seeded source of randomness for perturbations.
    """

    def __init__(self, search_space: SearchSpace | None = None, *, seed: int | None = None) -> None:
        """Create a tuner.

        Args:
            search_space: The grid to use; None builds one from :meth:`_default_search_space`.
            seed: Seed for the perturbation's random choices; the same seed repeats a run.

        Raises:
            ConfigError: :meth:`_default_search_space` returned an invalid grid.
        """
        if search_space is None:
            try:
                search_space = SearchSpace.model_validate({"grids": self._default_search_space()})
            except ValidationError as exc:
                raise ConfigError(
                    f"{type(self).__name__}._default_search_space(): {condense_validation_error(exc)}"
                ) from None
        self.search_space: SearchSpace = search_space
        self.rng: random.Random = random.Random(seed)

    def _default_search_space(self) -> dict[str, list[float]]:
        """Return the grid of each weight; override in a subclass for another default.

        Names left out keep the seed's grid.
        """
        return {name: list(grid) for name, grid in DEFAULT_GRIDS.items()}

    def tune(self, diagnosis: Diagnosis, weights: Weights) -> Adjustment:
        """Decide the next weights for a diagnosis.

        ``poor_tail``, ``poor_head`` and ``high_loss`` move the weights in :data:`ACTIONS`
        one grid step each; ``stagnation`` (or any other problem) perturbs. A decision whose
        moves are all blocked at the grid edge falls back to a perturbation, with a note.

        Args:
            diagnosis: What the rules found.
            weights: The weights in effect; a missing weight counts as its default value.

        Returns:
            The adjustment to apply.
        """
        actions = ACTIONS.get(diagnosis.problem)
        if actions is None:
            return self.perturb(weights, diagnosis.problem)
        new = dict(weights)
        moves: list[Move] = []
        blocked: list[str] = []
        for name, direction in actions:
            current = float(weights.get(name, DEFAULT_WEIGHTS[name]))
            value = self.search_space.step(name, current, direction)
            if math.isclose(value, current, rel_tol=_REL_TOL, abs_tol=_ABS_TOL):
                blocked.append(name)
                continue
            new[name] = value
            moves.append((name, direction))
        if not moves:
            fallback = self.perturb(weights, diagnosis.problem)
            why = f"fallback_perturbation: {diagnosis.problem} moves were all at the grid edge"
            return replace(fallback, note=f"{why}; {fallback.note}" if fallback.note else why)
        edge_note = f"at_grid_edge: {', '.join(blocked)}" if blocked else None
        return Adjustment(new, dict(weights), diagnosis.problem, tuple(moves), edge_note)

    def perturb(self, weights: Weights, reason: str) -> Adjustment:
        """Move one or two random weights one grid step (the seed's stagnation action).

        Args:
            weights: The weights in effect.
            reason: The problem recorded on the adjustment.

        Returns:
            The adjustment; with no moves and a note only when every weight is pinned.
        """
        new, moves = self.search_space.perturb(weights, self.rng)
        return Adjustment(new, dict(weights), reason, moves, None if moves else _PINNED_NOTE)


class AdaptiveTuner(AutoTuner):
    """Realtime mode's tuner; same rules, its own name so users can subclass it separately."""


def _import_file(path: Path, spec_text: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"--tuner {spec_text}: no such file {path}; check the path before ':'")
    # A name derived from the path: loading the same file twice returns the same classes, and
    # the module's own dataclasses find it in sys.modules.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_autotune_user_{digest}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--tuner {spec_text}: cannot load {path} as Python; pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"--tuner {spec_text}: importing {path} failed: {_one_line(exc)}") from exc
    return module


def _import_module(module_name: str, spec_text: str) -> ModuleType:
    # Console scripts do not put the working directory on sys.path; users expect
    # 'mymodule' to mean ./mymodule.py, as with 'python -m'.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.split(".")[0] == exc.name.split(".")[0]:
            raise ConfigError(
                f"--tuner {spec_text}: cannot import module {module_name!r}; put it on PYTHONPATH "
                "or pass a file path like ./my_tuner.py:MyTuner"
            ) from None
        raise ConfigError(f"--tuner {spec_text}: importing {module_name} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"--tuner {spec_text}: importing {module_name} failed: {_one_line(exc)}") from exc
    finally:
        if added:
            sys.path.remove(cwd)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_tuner_class(spec: str) -> type[AutoTuner]:
    """Load a user's tuner class named on the command line.

    Args:
        spec: ``"module:Class"`` (importable, or a module in the working directory) or
            ``"path/to/file.py:Class"``.

    Returns:
        The class, a subclass of :class:`AutoTuner`.

    Raises:
        ConfigError: The spec is malformed, the module or class is missing, importing it
            failed, or the class is not an AutoTuner subclass; the message is one line.
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"--tuner {spec}: expected module:Class or path/to/file.py:Class")
    is_path = where.endswith(".py") or "/" in where or os.sep in where
    module = _import_file(Path(where), spec) if is_path else _import_module(where, spec)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"--tuner {spec}: {where} has no attribute {attr!r}; check the class name"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, AutoTuner)):
        raise ConfigError(
            f"--tuner {spec}: {attr} is not a subclass of autotune_rt.tuner.AutoTuner; "
            "subclass AutoTuner or AdaptiveTuner"
        )
    return obj
