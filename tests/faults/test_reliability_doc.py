"""docs/reliability.md cannot drift: every test it names exists, and it names every fault test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.faults

DOC = REPO / "docs" / "reliability.md"
# `tests/faults/test_x.py::test_y` or `...::test_y[variant]`
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")


def named_tests() -> list[tuple[str, str, str]]:
    """``(path, function, variant)`` of every node id the page names."""
    return NODE_ID.findall(DOC.read_text())


def test_every_test_the_page_names_exists() -> None:
    """Each node id in docs/reliability.md is a test function (and variant) of that file."""
    assert named_tests()
    for path, function, variant in named_tests():
        source = (REPO / path).read_text()
        assert re.search(rf"^def {function}\(", source, re.M), f"{path}::{function} does not exist"
        assert variant in source, f"{path}::{function}[{variant}] does not exist"


def test_every_fault_test_is_on_the_page() -> None:
    """Each test of tests/faults/ appears in the table of docs/reliability.md."""
    named = {(path, function) for path, function, _ in named_tests()}
    for module in sorted((REPO / "tests" / "faults").glob("test_*.py")):
        if module.name == Path(__file__).name:
            continue
        for function in re.findall(r"^def (test_\w+)\(", module.read_text(), re.M):
            assert (f"tests/faults/{module.name}", function) in named, (
                f"{module.name}::{function} is not listed"
            )
