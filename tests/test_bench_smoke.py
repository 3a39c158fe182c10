"""Smoke tests of scripts/bench.py: quick parse and client benchmarks run and report well-formed figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"
FIGURE_KEYS = {
    "key",
    "label",
    "value",
    "unit",
    "reference",
    "reference_label",
    "target",
    "met",
    "ratio",
    "details",
}


def run_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the benchmark script with this interpreter."""
    return subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=cwd, capture_output=True, text=True, timeout=100
    )


def test_quick_parse_and_client_write_every_figure_next_to_its_reference(tmp_path: Path) -> None:
    """A quick parse+client run exits 0, prints the table and writes each figure next to its reference."""
    out = tmp_path / "bench.json"
    proc = run_bench("--quick", "--only", "parse", "client", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    report: dict[str, Any] = json.loads(out.read_text())
    assert report["quick"] is True
    assert {"nproc", "cpu_model", "python", "platform"} <= report["machine"].keys()
    assert report["machine"]["nproc"] >= 1
    figures = report["figures"]
    keys = [figure["key"] for figure in figures]
    assert {key.split(".")[0] for key in keys} == {"parse", "client"}
    assert {"parse.metric_line", "parse.reject_line", "client.apply_unchanged", "client.import"} <= set(keys)
    for figure in figures:
        assert figure.keys() == FIGURE_KEYS, figure["key"]
        assert math.isfinite(figure["value"]) and figure["value"] > 0, figure["key"]
        assert figure["reference"] > 0, figure["key"]
        assert math.isclose(figure["ratio"], figure["value"] / figure["reference"]), figure["key"]
        assert (figure["met"] is None) == (figure["target"] == ""), figure["key"]
    apply = figures[keys.index("client.apply_unchanged")]
    assert apply["unit"] == "µs" and isinstance(apply["met"], bool)
    assert figures[keys.index("client.import")]["details"]["heavy_modules_loaded"] == []
    for key in keys:
        assert key in proc.stdout


def test_unknown_benchmark_name_is_refused(tmp_path: Path) -> None:
    """`--only` with a name that is not a benchmark exits 2 naming the valid choices, and writes nothing."""
    proc = run_bench("--only", "nonsense", "--json", str(tmp_path / "bench.json"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'nonsense'" in proc.stderr and "throughput" in proc.stderr
    assert not (tmp_path / "bench.json").exists()
