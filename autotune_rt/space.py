"""The discrete search space of loss weights: grid steps, snapping, edges and user files."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autotune_rt.exceptions import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "DEFAULT_GRIDS",
    "DEFAULT_WEIGHTS",
    "WEIGHT_NAMES",
    "Move",
    "SearchSpace",
    "Weights",
    "condense_validation_error",
    "load_search_space",
]

WEIGHT_NAMES = ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl", "max_grad_norm")

Weights = dict[str, float]
Move = tuple[str, int]  # (weight name, +1 raise / -1 lower)

# The seed's default search space, verbatim.
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "lambda_dol": (0.3, 0.4, 0.5, 0.6, 0.7),
    "lambda_col": (0.1, 0.2, 0.3, 0.4, 0.5),
    "lambda_hier": (1.0, 1.2, 1.5, 1.8, 2.0),
    "lambda_scl": (0.1, 0.15, 0.2, 0.25, 0.3),
    "max_grad_norm": (0.5, 1.0, 1.5, 2.0),
}

# The seed's default command-line values; max_grad_norm is not a seed option, so a weights
# dict may lack it and moves start from this value.
DEFAULT_WEIGHTS: Weights = {
    "lambda_dol": 0.5,
    "lambda_col": 0.3,
    "lambda_hier": 1.5,
    "lambda_scl": 0.2,
    "max_grad_norm": 1.0,
}

# Grid arithmetic produces values like 0.30000000000000004; those count as the grid point.
_REL_TOL = 1e-9
_ABS_TOL = 1e-12


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)


def _fmt(value: float) -> str:
    """Format a number for a message: 0.30000000000000004 reads as 0.3."""
    return repr(round(value, 10)) if math.isfinite(value) else repr(value)


def _fmt_list(values: Sequence[float]) -> str:
    return "[" + ", ".join(_fmt(v) for v in values) + "]"


def _check_grid(name: Any, values: Any) -> tuple[float, ...]:
    """Return one grid as floats, or raise ValueError with a one-line message naming it."""
    if name not in WEIGHT_NAMES:
        raise ValueError(f"{name}: unknown weight name; use one of {', '.join(WEIGHT_NAMES)}")
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name}: grid must be a list of numbers (got {type(values).__name__})")
    if not values:
        raise ValueError(f"{name}: grid must not be empty; list at least one value")
    grid: list[float] = []
    for value in values:
        # bool is an int subclass, but 'true' in a grid is a typo, not a weight.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: grid values must be numbers (got {value!r})")
        number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise ValueError(f"{name}: grid values must be finite numbers (got {_fmt(number)})")
        if number < 0:
            raise ValueError(f"{name}: grid values must not be negative (got {_fmt(number)})")
        grid.append(number)
    for low, high in itertools.pairwise(grid):
        if not (high > low and not _close(low, high)):
            raise ValueError(f"{name}: grid must be strictly increasing (got {_fmt_list(grid)})")
    return tuple(grid)


def condense_validation_error(error: ValidationError) -> str:
    """Condense pydantic's multi-line ValidationError into one line.

    Args:
        error: The error pydantic raised.

    Returns:
        ``"<where>: <message>"`` parts joined by ``"; "``, without pydantic's URLs.
    """
    parts = []
    for item in error.errors(include_url=False):
        cause = (item.get("ctx") or {}).get("error")
        message = str(cause) if isinstance(cause, ValueError) else item["msg"]
        loc = [str(p) for p in item["loc"] if p != "grids"]
        text = f"{'.'.join(loc)}: {message}" if loc else message
        parts.append(" ".join(text.split()))
    return "; ".join(parts)


class SearchSpace(BaseModel):
    """The grid of values each weight may take; moves go one grid point at a time.

    A grid may name a subset of :data:`WEIGHT_NAMES`; the others keep the seed's grid.
    A grid with one value pins that weight.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    grids: dict[str, tuple[float, ...]] = Field(default_factory=lambda: dict(DEFAULT_GRIDS))

    @field_validator("grids", mode="before")
    @classmethod
    def _validate_grids(cls, value: Any) -> dict[str, tuple[float, ...]]:
        if not isinstance(value, Mapping):
            raise ValueError(
                f"expected a mapping of weight name -> list of numbers (got {type(value).__name__})"
            )
        checked = {name: _check_grid(name, values) for name, values in value.items()}
        return {name: checked.get(name, DEFAULT_GRIDS[name]) for name in WEIGHT_NAMES}

    @classmethod
    def default(cls) -> SearchSpace:
        """Return the seed's default search space."""
        return cls()

    def _grid(self, name: str) -> tuple[float, ...]:
        try:
            return self.grids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the search space; use one of {WEIGHT_NAMES}") from None

    def contains(self, name: str, value: float) -> bool:
        """Return True when ``value`` is a grid point of ``name`` (within float tolerance)."""
        return any(_close(point, value) for point in self._grid(name))

    def snap(self, name: str, value: float) -> float:
        """Return the grid point of ``name`` nearest to ``value`` (the lower one on a tie)."""
        return min(self._grid(name), key=lambda point: abs(point - value))

    def step(self, name: str, value: float, direction: int) -> float:
        """Move ``value`` one grid step.

        A value off the grid goes to the nearest grid point in the asked direction (0.55
        raised is 0.6, lowered is 0.5); a value at the edge stays where it is, and so does a
        pinned weight (a grid of one value).

        Args:
            name: One of :data:`WEIGHT_NAMES`.
            value: The current value, on the grid or not.
            direction: ``+1`` to raise, ``-1`` to lower.

        Returns:
            The new value; a grid point unless ``value`` was beyond the edge it moves toward.

        Raises:
            ValueError: ``direction`` is not +1 or -1, or ``value`` is not finite.
        """
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1 (got {direction!r})")
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value!r}; a weight must be a finite number")
        grid = self._grid(name)
        if len(grid) == 1:
            return value  # pinned: the user asked that this weight never move
        ordered = grid if direction == 1 else tuple(reversed(grid))
        for point in ordered:
            if _close(point, value):
                continue
            if (point > value) == (direction == 1):
                return point
        # At (or beyond) the edge: stay, but return the canonical grid point when on it.
        on_grid = [point for point in grid if _close(point, value)]
        return on_grid[0] if on_grid else value

    def _current(self, weights: Mapping[str, float], name: str) -> float:
        return float(weights.get(name, DEFAULT_WEIGHTS[name]))

    def _moves(self, weights: Mapping[str, float]) -> list[tuple[Move, float]]:
        """Every single-step move that changes a weight, with the value it leads to."""
        found = []
        for name in WEIGHT_NAMES:
            current = self._current(weights, name)
            for direction in (1, -1):
                new = self.step(name, current, direction)
                if not _close(new, current):
                    found.append(((name, direction), new))
        return found

    def neighbours(self, weights: Mapping[str, float]) -> list[tuple[Move, Weights]]:
        """Return every weights dict one grid step away, with the move that leads to it.

        Args:
            weights: The current weights; a missing weight counts as its default value.

        Returns:
            ``(move, new_weights)`` pairs in :data:`WEIGHT_NAMES` order, raise before lower;
            moves that would change nothing (at an edge, or pinned) are left out.
        """
        return [(move, {**weights, move[0]: new}) for move, new in self._moves(weights)]

    def check_initial(self, weights: Mapping[str, float]) -> None:
        """Check that each initial weight lies within its grid's [min, max] range.

        Args:
            weights: The weights given on the command line.

        Raises:
            ConfigError: A weight is not finite or lies outside its grid's range.
        """
        for name, value in weights.items():
            if name not in self.grids:
                continue
            grid = self.grids[name]
            if not math.isfinite(value):
                raise ConfigError(
                    f"--{name} {value!r} is not a finite number; pick a value in {_fmt_list(grid)}"
                )
            inside = (value > grid[0] or _close(value, grid[0])) and (
                value < grid[-1] or _close(value, grid[-1])
            )
            if not inside:
                raise ConfigError(
                    f"--{name} {_fmt(value)} is outside the search space [{_fmt(grid[0])}, {_fmt(grid[-1])}] "
                    f"for {name}; widen the grid in your --search_space file or pick a value inside it"
                )

    def perturb(self, weights: Mapping[str, float], rng: random.Random) -> tuple[Weights, tuple[Move, ...]]:
        """Move one or two randomly chosen weights one grid step each.

        Only moves that change a value are drawn, so the result differs from ``weights``
        unless every weight is pinned (then ``weights`` comes back unchanged with no moves).

        Args:
            weights: The current weights; keys outside :data:`WEIGHT_NAMES` pass through.
            rng: The source of randomness; a seeded ``random.Random`` makes runs reproducible.

        Returns:
            The new weights and the moves made.
        """
        candidates = self._moves(weights)
        result: Weights = dict(weights)
        if not candidates:
            return result, ()
        chosen = [rng.choice(candidates)]
        if rng.randint(1, 2) == 2:
            others = [c for c in candidates if c[0][0] != chosen[0][0][0]]
            if others:
                chosen.append(rng.choice(others))
        for (name, _direction), new in chosen:
            result[name] = new
        return result, tuple(move for move, _new in chosen)


def _read_file(path: Path) -> Any:
    """Parse a JSON or TOML file, raising ConfigError with one line on any failure."""
    where = f"search space file {path}"
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(
            f"{where}: unknown format {suffix or '(no extension)'!s}; use a .json or .toml file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; check the --search_space path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read it ({exc.strerror or exc}); check the path and its permissions"
        ) from None
    try:
        return json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix the syntax"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {' '.join(str(exc).split())}; fix the syntax") from None


def load_search_space(path: str | Path) -> SearchSpace:
    """Load a search space from a JSON or TOML file.

    The top level maps weight names to lists of numbers, optionally wrapped in a
    ``search_space`` table; names left out keep the seed's grid.

    Args:
        path: A ``.json`` or ``.toml`` file.

    Returns:
        The validated search space.

    Raises:
        ConfigError: The file is missing, unreadable, malformed or describes a bad grid;
            the message is one line naming the file.
    """
    path = Path(path)
    data = _read_file(path)
    if isinstance(data, Mapping) and set(data) == {"search_space"}:
        data = data["search_space"]
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"search space file {path}: top level must be a mapping of weight name -> list of numbers "
            f"(got {type(data).__name__})"
        )
    try:
        return SearchSpace.model_validate({"grids": data})
    except ValidationError as exc:
        raise ConfigError(f"search space file {path}: {condense_validation_error(exc)}") from None
