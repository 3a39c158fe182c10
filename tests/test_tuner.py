"""Tests for autotune_rt.tuner: the seed's actions, the fallback, subclassing and --tuner loading."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from autotune_rt.diagnose import Diagnosis, diagnose
from autotune_rt.exceptions import ConfigError
from autotune_rt.space import DEFAULT_GRIDS, SearchSpace, load_search_space
from autotune_rt.tuner import ACTIONS, AdaptiveTuner, Adjustment, AutoTuner, load_tuner_class

DOCS = Path(__file__).resolve().parent.parent / "docs" / "customising.md"
SEED = {"lambda_dol": 0.5, "lambda_col": 0.3, "lambda_hier": 1.5, "lambda_scl": 0.2}


def _diag(problem: str) -> Diagnosis:
    return Diagnosis(problem, {}, ())


@pytest.mark.parametrize(
    ("problem", "weights", "expected", "moves"),
    [
        ("poor_tail", SEED, {"lambda_col": 0.4, "lambda_scl": 0.25}, (("lambda_col", 1), ("lambda_scl", 1))),
        ("poor_head", SEED, {"lambda_dol": 0.6, "lambda_col": 0.2}, (("lambda_dol", 1), ("lambda_col", -1))),
        (
            "high_loss",
            SEED,  # no max_grad_norm: it starts from its default 1.0
            {"max_grad_norm": 1.5, "lambda_dol": 0.4},
            (("max_grad_norm", 1), ("lambda_dol", -1)),
        ),
        (
            "high_loss",
            {**SEED, "max_grad_norm": 0.5},
            {"max_grad_norm": 1.0, "lambda_dol": 0.4},
            (("max_grad_norm", 1), ("lambda_dol", -1)),
        ),
        ("poor_tail", {**SEED, "lambda_col": 0.25}, {"lambda_col": 0.3, "lambda_scl": 0.25}, None),
    ],
)
def test_seed_actions(
    problem: str,
    weights: dict[str, float],
    expected: dict[str, float],
    moves: tuple[tuple[str, int], ...] | None,
) -> None:
    """Each diagnosed problem moves its ACTIONS weights one grid step and nothing else."""
    adjustment = AutoTuner(seed=0).tune(_diag(problem), dict(weights))
    assert adjustment.weights == {**weights, **expected}
    assert adjustment.previous == weights
    assert adjustment.reason == problem
    assert adjustment.note is None
    assert adjustment.moves == (moves or ACTIONS[problem])


def test_other_keys_pass_through() -> None:
    """Keys outside the weight names come back unchanged."""
    weights = {**SEED, "lr": 0.01, "epoch_hint": 3.0}
    adjustment = AutoTuner(seed=0).tune(_diag("poor_tail"), weights)
    assert adjustment.weights["lr"] == 0.01
    assert adjustment.weights["epoch_hint"] == 3.0


def test_partial_edge_is_noted() -> None:
    """When one of a rule's moves is blocked at the edge, the other is made and the edge is noted."""
    adjustment = AutoTuner(seed=0).tune(_diag("poor_tail"), {**SEED, "lambda_scl": 0.3})
    assert adjustment.moves == (("lambda_col", 1),)
    assert adjustment.changed == {"lambda_col": (0.3, 0.4)}
    assert adjustment.note == "at_grid_edge: lambda_scl"


@pytest.mark.parametrize(
    ("problem", "edge"),
    [
        ("poor_tail", {"lambda_col": 0.5, "lambda_scl": 0.3}),
        ("poor_head", {"lambda_dol": 0.7, "lambda_col": 0.1}),
        ("high_loss", {"max_grad_norm": 2.0, "lambda_dol": 0.3}),
    ],
)
def test_all_moves_at_edge_fall_back_to_perturbation(problem: str, edge: dict[str, float]) -> None:
    """A decision that would change nothing perturbs instead, and says why in the note."""
    weights = {**SEED, **edge}
    adjustment = AutoTuner(seed=3).tune(_diag(problem), weights)
    assert adjustment.note == f"fallback_perturbation: {problem} moves were all at the grid edge"
    assert adjustment.reason == problem
    assert 1 <= len(adjustment.moves) <= 2
    assert adjustment.changed
    assert adjustment.weights != weights


def test_fallback_when_everything_is_pinned() -> None:
    """With every weight pinned the fallback changes nothing and the note says so."""
    space = SearchSpace(grids={name: (grid[0],) for name, grid in DEFAULT_GRIDS.items()})
    weights = {name: grid[0] for name, grid in DEFAULT_GRIDS.items()}
    adjustment = AutoTuner(space).tune(_diag("poor_tail"), weights)
    assert (adjustment.weights, adjustment.moves, adjustment.changed) == (weights, (), {})
    assert adjustment.note == (
        "fallback_perturbation: poor_tail moves were all at the grid edge; "
        "no_move: every weight is pinned to a single grid value"
    )


@pytest.mark.parametrize("problem", ["stagnation", "something_custom"])
def test_stagnation_perturbs_reproducibly(problem: str) -> None:
    """Stagnation (and any problem without an action) perturbs, the same way for the same seed."""

    def run(seed: int) -> list[Adjustment]:
        tuner = AdaptiveTuner(seed=seed)
        weights, out = dict(SEED), []
        for _ in range(10):
            adjustment = tuner.tune(_diag(problem), weights)
            out.append(adjustment)
            weights = adjustment.weights
        return out

    first = run(42)
    assert first == run(42)
    assert first != run(43)
    assert all(a.moves and a.changed and a.note is None and a.reason == problem for a in first)


def test_to_dict_is_json_ready() -> None:
    """Adjustment.to_dict() round-trips through JSON with the changes spelled out."""
    adjustment = AutoTuner(seed=0).tune(_diag("high_loss"), dict(SEED))
    assert json.loads(json.dumps(adjustment.to_dict())) == {
        "weights": {**SEED, "lambda_dol": 0.4, "max_grad_norm": 1.5},
        "previous": SEED,
        "reason": "high_loss",
        "moves": [["max_grad_norm", 1], ["lambda_dol", -1]],
        "note": None,
        "changed": {"max_grad_norm": [1.0, 1.5], "lambda_dol": [0.5, 0.4]},
    }


def test_explicit_search_space_wins() -> None:
    """A search space passed to the constructor is used instead of _default_search_space()."""
    space = SearchSpace(grids={"lambda_col": (0.3, 0.35)})
    adjustment = AutoTuner(space).tune(_diag("poor_tail"), dict(SEED))
    assert adjustment.weights["lambda_col"] == 0.35


def test_bad_default_search_space_is_one_line_config_error() -> None:
    """A subclass whose _default_search_space() is invalid fails with a one-line ConfigError."""

    class Broken(AutoTuner):
        def _default_search_space(self) -> dict[str, list[float]]:
            return {"lambda_col": [0.3, 0.2], "lambda_foo": [1.0]}

    with pytest.raises(ConfigError) as info:
        Broken()
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("Broken._default_search_space(): ")


def test_adaptive_tuner_is_an_auto_tuner() -> None:
    """AdaptiveTuner applies the same rules as AutoTuner under its own name."""
    assert issubclass(AdaptiveTuner, AutoTuner)
    a = AutoTuner(seed=1).tune(_diag("poor_head"), dict(SEED))
    b = AdaptiveTuner(seed=1).tune(_diag("poor_head"), dict(SEED))
    assert a == b


CUSTOM_TUNER = '''
"""A user's tuner: its own grid, and a tune() that always raises lambda_hier."""

from autotune_rt.tuner import AdaptiveTuner, Adjustment


class HierTuner(AdaptiveTuner):
    def _default_search_space(self):
        return {"lambda_hier": [1.0, 1.1, 1.2, 1.3]}

    def tune(self, diagnosis, weights):
        new = dict(weights)
        new["lambda_hier"] = self.search_space.step("lambda_hier", weights["lambda_hier"], 1)
        return Adjustment(new, dict(weights), diagnosis.problem, (("lambda_hier", 1),))


class NotATuner:
    pass


def not_a_class():
    pass
'''


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding user tuner modules, removed from sys.modules afterwards."""
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _check_hier_tuner(cls: type[AutoTuner]) -> None:
    tuner = cls(seed=0)
    assert tuner.search_space.grids["lambda_hier"] == (1.0, 1.1, 1.2, 1.3)
    assert tuner.search_space.grids["lambda_col"] == DEFAULT_GRIDS["lambda_col"]
    adjustment = tuner.tune(diagnose({"tail_acc": 0.1, "head_acc": 0.9}), {**SEED, "lambda_hier": 1.1})
    assert adjustment.changed == {"lambda_hier": (1.1, 1.2)}
    assert adjustment.reason == "poor_tail"


def test_load_tuner_from_file(module_dir: Path) -> None:
    """'path/to/file.py:Class' loads a subclass overriding _default_search_space() and tune()."""
    path = module_dir / "hier_tuner_file.py"
    path.write_text(CUSTOM_TUNER, encoding="utf-8")
    cls = load_tuner_class(f"{path}:HierTuner")
    assert cls.__name__ == "HierTuner"
    assert issubclass(cls, AdaptiveTuner)
    _check_hier_tuner(cls)
    assert load_tuner_class(f"{path}:HierTuner") is cls


def test_load_tuner_from_module_in_working_directory(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'module:Class' finds a module in the working directory and leaves sys.path as it was."""
    (module_dir / "hier_tuner_mod.py").write_text(CUSTOM_TUNER, encoding="utf-8")
    monkeypatch.chdir(module_dir)
    path_before = list(sys.path)
    _check_hier_tuner(load_tuner_class("hier_tuner_mod:HierTuner"))
    assert sys.path == path_before


def test_load_builtin_tuner_by_module() -> None:
    """The package's own tuners load by module name."""
    assert load_tuner_class("autotune_rt.tuner:AdaptiveTuner") is AdaptiveTuner


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hier_tuner_bad", "expected module:Class or path/to/file.py:Class"),
        (":HierTuner", "expected module:Class"),
        ("{dir}/hier_tuner_bad.py:", "expected module:Class"),
        ("{dir}/nope.py:HierTuner", "no such file"),
        ("no_such_module_xyz:HierTuner", "cannot import module 'no_such_module_xyz'"),
        ("{dir}/hier_tuner_bad.py:Missing", "has no attribute 'Missing'"),
        ("{dir}/hier_tuner_bad.py:NotATuner", "NotATuner is not a subclass of autotune_rt.tuner.AutoTuner"),
        ("{dir}/hier_tuner_bad.py:not_a_class", "not_a_class is not a subclass"),
        ("{dir}/broken_syntax.py:X", "importing {dir}/broken_syntax.py failed: SyntaxError"),
        ("{dir}/needs_missing_dep.py:X", "failed: ModuleNotFoundError: No module named 'not_installed_dep"),
        ("needs_missing_dep:X", "importing needs_missing_dep failed: ModuleNotFoundError"),
        ("raises_on_import:X", "importing raises_on_import failed: RuntimeError: boom"),
    ],
)
def test_load_tuner_errors(
    module_dir: Path, monkeypatch: pytest.MonkeyPatch, spec: str, message: str
) -> None:
    """Every way --tuner can be wrong is a one-line ConfigError saying what and where."""
    (module_dir / "hier_tuner_bad.py").write_text(CUSTOM_TUNER, encoding="utf-8")
    (module_dir / "broken_syntax.py").write_text("def (:\n", encoding="utf-8")
    (module_dir / "needs_missing_dep.py").write_text("import not_installed_dep_q\n", encoding="utf-8")
    (module_dir / "raises_on_import.py").write_text(
        "raise RuntimeError('boom\\nsecond line')\n", encoding="utf-8"
    )
    monkeypatch.chdir(module_dir)
    with pytest.raises(ConfigError) as info:
        load_tuner_class(spec.format(dir=module_dir))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("--tuner ")
    assert message.format(dir=module_dir) in text


def _doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_docs_example_tuner_works(module_dir: Path) -> None:
    """The MyTuner example in docs/customising.md loads via --tuner's loader and behaves as described."""
    source = next(block for block in _doc_blocks("python") if "class MyTuner" in block)
    path = module_dir / "my_tuner.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    cls = load_tuner_class(f"{path}:MyTuner")
    tuner = cls(seed=0)
    assert tuner.search_space.grids["lambda_col"][:3] == (0.1, 0.15, 0.2)
    assert tuner.search_space.grids["max_grad_norm"] == (1.0,)
    weights = dict(SEED)
    adjustment = tuner.tune(diagnose({"tail_acc": 0.18, "head_acc": 0.71}), weights)
    assert adjustment.changed == {
        "lambda_col": (0.3, 0.35),
        "lambda_scl": (0.2, 0.25),
        "lambda_hier": (1.5, 1.8),
    }
    high_loss = tuner.tune(diagnose({"loss": 3.0}), weights)
    assert high_loss.changed == {"lambda_dol": (0.5, 0.4)}
    assert high_loss.note == "at_grid_edge: max_grad_norm"


def test_docs_other_python_blocks_run() -> None:
    """The other Python snippets in docs/customising.md run as written."""
    blocks = [block for block in _doc_blocks("python") if "class MyTuner" not in block]
    assert blocks
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {})


@pytest.mark.parametrize("language", ["json", "toml"])
def test_docs_search_space_files_load(tmp_path: Path, language: str) -> None:
    """The search-space files shown in docs/customising.md load and describe the same space."""
    (block,) = _doc_blocks(language)
    path = tmp_path / f"space.{language}"
    path.write_text(block, encoding="utf-8")
    space = load_search_space(path)
    assert space.grids["lambda_scl"] == (0.05, 0.1, 0.2, 0.4)
    assert space.grids["max_grad_norm"] == (1.0,)
