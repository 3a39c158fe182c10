"""Tests for autotune_rt.space: grid steps, snapping, edges, perturbation and search-space files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from autotune_rt.exceptions import ConfigError
from autotune_rt.space import (
    DEFAULT_GRIDS,
    DEFAULT_WEIGHTS,
    WEIGHT_NAMES,
    SearchSpace,
    condense_validation_error,
    load_search_space,
)

SPACE = SearchSpace.default()
SEED_WEIGHTS = {"lambda_dol": 0.5, "lambda_col": 0.3, "lambda_hier": 1.5, "lambda_scl": 0.2}


def test_defaults_are_the_seeds() -> None:
    """The default grids and weights are the seed's."""
    assert SPACE.grids == {
        "lambda_dol": (0.3, 0.4, 0.5, 0.6, 0.7),
        "lambda_col": (0.1, 0.2, 0.3, 0.4, 0.5),
        "lambda_hier": (1.0, 1.2, 1.5, 1.8, 2.0),
        "lambda_scl": (0.1, 0.15, 0.2, 0.25, 0.3),
        "max_grad_norm": (0.5, 1.0, 1.5, 2.0),
    }
    assert SPACE.grids == DEFAULT_GRIDS
    assert tuple(SPACE.grids) == WEIGHT_NAMES
    assert DEFAULT_WEIGHTS == {**SEED_WEIGHTS, "max_grad_norm": 1.0}


@pytest.mark.parametrize(
    ("name", "value", "direction", "expected"),
    [
        ("lambda_dol", 0.5, 1, 0.6),
        ("lambda_dol", 0.5, -1, 0.4),
        ("lambda_dol", 0.55, 1, 0.6),
        ("lambda_dol", 0.55, -1, 0.5),
        ("lambda_dol", 0.7, 1, 0.7),
        ("lambda_dol", 0.3, -1, 0.3),
        ("lambda_col", 0.1 + 0.2, 1, 0.4),  # 0.30000000000000004 is on-grid 0.3
        ("lambda_col", 0.1 + 0.2, -1, 0.2),
        ("lambda_col", 0.5000000000000001, 1, 0.5),  # at the edge, canonicalised
        ("lambda_col", 0.05, 1, 0.1),  # below the range snaps up
        ("lambda_col", 0.05, -1, 0.05),  # ... and stays when lowered
        ("lambda_col", 0.9, -1, 0.5),  # above the range snaps down
        ("lambda_col", 0.9, 1, 0.9),  # ... and stays when raised
        ("lambda_scl", 0.2, 1, 0.25),
        ("lambda_scl", 0.2, -1, 0.15),
        ("max_grad_norm", 1.0, 1, 1.5),
        ("max_grad_norm", 2.0, 1, 2.0),
    ],
)
def test_step(name: str, value: float, direction: int, expected: float) -> None:
    """step() moves one grid point, snaps off-grid values in the asked direction, stays at edges."""
    assert SPACE.step(name, value, direction) == expected


@pytest.mark.parametrize(("value", "direction"), [(0.5, 0), (0.5, 2), (float("nan"), 1), (float("inf"), -1)])
def test_step_rejects_bad_input(value: float, direction: int) -> None:
    """step() refuses a direction other than +1/-1 and a non-finite value."""
    with pytest.raises(ValueError, match=r"direction|finite"):
        SPACE.step("lambda_dol", value, direction)


def test_step_unknown_name() -> None:
    """step() on a name outside the space raises KeyError naming it."""
    with pytest.raises(KeyError, match="lambda_foo"):
        SPACE.step("lambda_foo", 0.5, 1)


@pytest.mark.parametrize(
    ("name", "value", "expected", "contained"),
    [
        ("lambda_dol", 0.54, 0.5, False),
        ("lambda_dol", 0.56, 0.6, False),
        ("max_grad_norm", 0.75, 0.5, False),  # an exact tie goes to the lower point
        ("lambda_dol", 9.0, 0.7, False),
        ("lambda_col", 0.1 + 0.2, 0.3, True),
        ("lambda_scl", 0.15, 0.15, True),
    ],
)
def test_snap_and_contains(name: str, value: float, expected: float, contained: bool) -> None:
    """snap() returns the nearest grid point; contains() uses the float tolerance."""
    assert SPACE.snap(name, value) == expected
    assert SPACE.contains(name, value) is contained


def test_neighbours() -> None:
    """neighbours() lists every move that changes a weight, leaving out blocked ones."""
    weights = {"lambda_dol": 0.7, "lambda_col": 0.1, "lambda_hier": 1.5, "lambda_scl": 0.2, "tag": 7.0}
    found = dict(SPACE.neighbours(weights))
    assert set(found) == {
        ("lambda_dol", -1),
        ("lambda_col", 1),
        ("lambda_hier", 1),
        ("lambda_hier", -1),
        ("lambda_scl", 1),
        ("lambda_scl", -1),
        ("max_grad_norm", 1),
        ("max_grad_norm", -1),
    }
    assert found[("lambda_dol", -1)] == {**weights, "lambda_dol": 0.6}
    assert found[("max_grad_norm", 1)] == {**weights, "max_grad_norm": 1.5}


def test_neighbours_of_pinned_space_is_empty() -> None:
    """A space whose grids all hold one value has no neighbours, even for values off the pins."""
    pinned = SearchSpace(grids={name: (grid[0],) for name, grid in DEFAULT_GRIDS.items()})
    assert pinned.neighbours(DEFAULT_WEIGHTS) == []


@pytest.mark.parametrize(
    "weights",
    [
        SEED_WEIGHTS,
        {"lambda_col": 0.1, "lambda_dol": 0.7},
        {"lambda_col": 0.5000000000000001},
        {"lambda_col": 0.25},  # off-grid but inside the range
        {"unknown_weight": 99.0},
    ],
)
def test_check_initial_accepts_values_in_range(weights: dict[str, float]) -> None:
    """Initial values inside each grid's [min, max] range pass."""
    SPACE.check_initial(weights)


def test_check_initial_rejects_values_out_of_range() -> None:
    """An initial value outside its grid's range is a one-line ConfigError naming the fix."""
    with pytest.raises(ConfigError) as info:
        SPACE.check_initial({"lambda_dol": 0.5, "lambda_col": 0.9})
    assert str(info.value) == (
        "--lambda_col 0.9 is outside the search space [0.1, 0.5] for lambda_col; "
        "widen the grid in your --search_space file or pick a value inside it"
    )
    with pytest.raises(ConfigError, match="not a finite number"):
        SPACE.check_initial({"lambda_dol": float("nan")})


def test_perturb_is_reproducible() -> None:
    """The same seed gives the same sequence of perturbations."""

    def run(seed: int) -> list[object]:
        rng = random.Random(seed)
        weights = dict(SEED_WEIGHTS)
        out: list[object] = []
        for _ in range(20):
            weights, moves = SPACE.perturb(weights, rng)
            out.append((dict(weights), moves))
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("seed", range(40))
def test_perturb_moves_one_or_two_weights_one_step(seed: int) -> None:
    """perturb() changes one or two distinct weights by exactly one grid step each."""
    rng = random.Random(seed)
    weights = {"lambda_dol": 0.7, "lambda_col": 0.1, "lambda_hier": 2.0, "lambda_scl": 0.2, "epoch": 3.0}
    new, moves = SPACE.perturb(weights, rng)
    assert 1 <= len(moves) <= 2
    assert len({name for name, _ in moves}) == len(moves)
    assert new["epoch"] == 3.0
    for name, direction in moves:
        before = weights.get(name, DEFAULT_WEIGHTS[name])
        assert new[name] == SPACE.step(name, before, direction) != before
    untouched = set(weights) - {name for name, _ in moves}
    assert all(new[name] == weights[name] for name in untouched)


def test_perturb_draws_both_counts_and_every_weight() -> None:
    """Over many draws perturb() sometimes moves one weight, sometimes two, and reaches all weights."""
    rng = random.Random(0)
    counts: set[int] = set()
    names: set[str] = set()
    for _ in range(200):
        _, moves = SPACE.perturb(SEED_WEIGHTS, rng)
        counts.add(len(moves))
        names.update(name for name, _ in moves)
    assert counts == {1, 2}
    assert names == set(WEIGHT_NAMES)


def test_perturb_with_one_movable_weight() -> None:
    """When only one weight can move, perturb() moves that one, in the only open direction."""
    grids: dict[str, tuple[float, ...]] = {name: (grid[0],) for name, grid in DEFAULT_GRIDS.items()}
    grids["lambda_hier"] = (1.0, 2.0)
    space = SearchSpace(grids=grids)
    for seed in range(10):
        new, moves = space.perturb({"lambda_hier": 2.0}, random.Random(seed))
        assert (new, moves) == ({"lambda_hier": 1.0}, (("lambda_hier", -1),))


def test_perturb_all_pinned_returns_same_weights() -> None:
    """When every weight is pinned, perturb() returns equal weights and no moves."""
    space = SearchSpace(grids={name: (grid[0],) for name, grid in DEFAULT_GRIDS.items()})
    weights = {name: grid[0] for name, grid in DEFAULT_GRIDS.items()}
    new, moves = space.perturb(weights, random.Random(0))
    assert (new, moves) == (weights, ())
    assert new is not weights


def test_subset_takes_default_grids() -> None:
    """A space naming some weights keeps the seed grid for the others, in WEIGHT_NAMES order."""
    space = SearchSpace(grids={"max_grad_norm": (1.0, 5.0), "lambda_col": (0, 1)})
    assert tuple(space.grids) == WEIGHT_NAMES
    assert space.grids["lambda_col"] == (0.0, 1.0)
    assert space.grids["max_grad_norm"] == (1.0, 5.0)
    assert space.grids["lambda_dol"] == DEFAULT_GRIDS["lambda_dol"]


def test_space_is_frozen() -> None:
    """A SearchSpace cannot be changed after it is built."""
    with pytest.raises(ValidationError):
        SPACE.grids = {}


def test_validation_error_condenses_to_one_line() -> None:
    """condense_validation_error() turns pydantic's multi-line error into one line."""
    with pytest.raises(ValidationError) as info:
        SearchSpace(grids={"lambda_col": (0.3, 0.2)})
    assert "\n" in str(info.value)
    assert (
        condense_validation_error(info.value)
        == "lambda_col: grid must be strictly increasing (got [0.3, 0.2])"
    )
    with pytest.raises(ValidationError) as info:
        SearchSpace.model_validate({"grids": {}, "other": 1})
    assert "\n" not in condense_validation_error(info.value)


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("space.json", json.dumps({"lambda_col": [0.2, 0.3, 0.4], "lambda_scl": [0.2]})),
        ("space.json", json.dumps({"search_space": {"lambda_col": [0.2, 0.3, 0.4], "lambda_scl": [0.2]}})),
        ("space.toml", "lambda_col = [0.2, 0.3, 0.4]\nlambda_scl = [0.2]\n"),
        ("space.TOML", "[search_space]\nlambda_col = [0.2, 0.3, 0.4]\nlambda_scl = [0.2]\n"),
    ],
)
def test_load_search_space(tmp_path: Path, name: str, content: str) -> None:
    """JSON and TOML files, bare or under 'search_space', load; names left out keep the defaults."""
    space = load_search_space(_write(tmp_path, name, content))
    assert space.grids["lambda_col"] == (0.2, 0.3, 0.4)
    assert space.grids["lambda_scl"] == (0.2,)
    assert space.grids["lambda_dol"] == DEFAULT_GRIDS["lambda_dol"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("s.json", '{"lambda_col": []}', "lambda_col: grid must not be empty; list at least one value"),
        (
            "s.json",
            '{"lambda_col": [0.3, 0.2]}',
            "lambda_col: grid must be strictly increasing (got [0.3, 0.2])",
        ),
        (
            "s.json",
            '{"lambda_col": [0.2, 0.2]}',
            "lambda_col: grid must be strictly increasing (got [0.2, 0.2])",
        ),
        ("s.json", '{"lambda_foo": [0.2]}', "lambda_foo: unknown weight name; use one of lambda_dol,"),
        ("s.json", '{"lambda_col": [0.2, NaN]}', "lambda_col: grid values must be finite numbers (got nan)"),
        ("s.toml", "lambda_col = [0.2, inf]", "lambda_col: grid values must be finite numbers (got inf)"),
        (
            "s.json",
            '{"lambda_col": [0.2, 1e400]}',
            "lambda_col: grid values must be finite numbers (got inf)",
        ),
        (
            "s.json",
            '{"lambda_col": [0.2, 1%s]}' % ("0" * 400),
            "grid values must be finite numbers (got inf)",
        ),
        ("s.json", '{"lambda_col": [-0.1, 0.2]}', "lambda_col: grid values must not be negative (got -0.1)"),
        ("s.json", '{"lambda_col": [0.1, "0.2"]}', "lambda_col: grid values must be numbers (got '0.2')"),
        ("s.json", '{"lambda_col": [true]}', "lambda_col: grid values must be numbers (got True)"),
        ("s.json", '{"lambda_col": 0.2}', "lambda_col: grid must be a list of numbers (got float)"),
        ("s.json", "[0.1, 0.2]", "top level must be a mapping of weight name -> list of numbers (got list)"),
        ("s.json", '{"search_space": [1]}', "top level must be a mapping of weight name -> list of numbers"),
        ("s.json", '{"lambda_col": [0.1,', "invalid JSON at line 1 column"),
        ("s.toml", "lambda_col = [0.1,\nlambda_dol = 3", "invalid TOML:"),
        ("s.json", b'{"lambda_col": [0.1]}\xff', "not UTF-8 text; save it as UTF-8"),
        ("s.yaml", "lambda_col: [0.1]", "unknown format .yaml; use a .json or .toml file"),
    ],
)
def test_bad_search_space_file(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    """Every bad search-space file is a one-line ConfigError naming the file and the problem."""
    path = _write(tmp_path, name, content)
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"search space file {path}: ")
    assert message in text


def test_missing_search_space_file(tmp_path: Path) -> None:
    """A missing file is a one-line ConfigError pointing at the --search_space path."""
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_search_space(str(path))
    assert str(info.value) == f"search space file {path}: no such file; check the --search_space path"


def test_unreadable_search_space_file(tmp_path: Path) -> None:
    """A path that cannot be read (a directory) is a one-line ConfigError."""
    path = tmp_path / "dir.json"
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"search space file {path}: cannot read it (")


@pytest.mark.parametrize(("value", "direction"), [(0.4, 1), (0.4, -1), (0.9, -1), (0.1, 1)])
def test_pinned_weight_never_moves(value: float, direction: int) -> None:
    """A weight whose grid has one value stays where it is, on or off that value."""
    space = SearchSpace(grids={"lambda_col": (0.4,)})
    assert space.step("lambda_col", value, direction) == value
