"""report on real run directories: a valid PNG of sensible size, one marker per config change, the HTML."""

from __future__ import annotations

import base64
import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pytest

from autotune_rt.cli import main
from autotune_rt.exceptions import ConfigError
from autotune_rt.report import MATPLOTLIB_MISSING, build_figure, write_report
from autotune_rt.views import views_main
from tests.support import run_cli
from tests.test_views import LiveRun, events_of, finished_batch_run, finished_realtime_run

if TYPE_CHECKING:
    from matplotlib.container import BarContainer
    from matplotlib.lines import Line2D

# matplotlib is the optional [plot] extra (scripts/test installs it).
needs_matplotlib = pytest.mark.skipif(find_spec("matplotlib") is None, reason="needs autotune-rt[plot]")


@pytest.fixture(scope="module")
def realtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_realtime_run(tmp_path_factory.mktemp("realtime"))


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_batch_run(tmp_path_factory.mktemp("batch"))


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def xs(line: Line2D) -> list[float]:
    """A plotted line's x values."""
    return [float(x) for x in np.asarray(line.get_xdata())]


def changes_in(run_dir: Path) -> list[dict[str, object]]:
    """The events that change the weights: non-initial config_written, and manual_override."""
    return [
        e
        for e in events_of(run_dir)
        if (e["event"] == "config_written" and e["reason"] not in ("initial", "resume"))
        or e["event"] == "manual_override"
    ]


@needs_matplotlib
def test_report_writes_png_and_html(realtime_dir: Path, tmp_path: Path) -> None:
    """`autotune-rt report RUN` writes a valid PNG of sensible size and an HTML page embedding it."""
    result = run_cli(["report", str(realtime_dir)], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    png_path, html_path = realtime_dir / "report.png", realtime_dir / "report.html"
    assert result.stdout.decode().split() == [str(png_path), str(html_path)]
    png = png_path.read_bytes()
    assert len(png) > 10_000
    assert png_size(png) == (1100, 700)
    page = html_path.read_text(encoding="utf-8")
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    written = [e for e in events_of(realtime_dir) if e["event"] == "config_written"]
    versions = page.split("<h2>Config versions</h2>")[1].split("</table>")[0]
    assert versions.count("<tr>") == 1 + len(written)  # the header, then one row per version
    assert "poor_tail" in page and "lambda_col=0.4" in page


@needs_matplotlib
def test_one_marker_per_config_change(realtime_dir: Path) -> None:
    """One vertical marker per config change, at its epoch, labelled with the reason and the weights."""
    fig, data = build_figure(realtime_dir)
    changes = changes_in(realtime_dir)
    assert len(changes) >= 3
    markers = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "config_change"]
    assert len(markers) == len(changes) == len(data.changes)
    assert [xs(line)[0] for line in markers] == [e["epoch"] for e in changes]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[0].startswith(f"v{changes[0]['version']} {changes[0]['reason']}\n")
    assert "col 0.3→0.4" in texts[0]
    top, loss = fig.axes
    assert [line.get_label() for line in top.get_lines()][:3] == ["acc1", "head_acc", "tail_acc"]
    assert loss.get_ylabel() == "ce" and len(xs(loss.get_lines()[0])) == 30
    assert "realtime run" in fig.get_suptitle() and "(finished)" in fig.get_suptitle()


@needs_matplotlib
def test_batch_report_has_a_line_per_trial_and_bars(batch_dir: Path, tmp_path: Path) -> None:
    """A batch report draws one metric line per trial and a bar per trial; --out puts it elsewhere."""
    summary = json.loads((batch_dir / "summary.json").read_text())
    fig, data = build_figure(batch_dir)
    lines, bars = fig.axes
    assert [str(line.get_label()).split(":")[0] for line in lines.get_lines()] == [
        "trial 1",
        "trial 2",
        "trial 3",
    ]
    assert [len(xs(line)) for line in lines.get_lines()] == [15, 15, 15]
    heights = [float(v) for v in np.asarray(cast("BarContainer", bars.containers[0]).datavalues)]
    assert heights == [t["best_metric"] for t in summary["trials"]]
    assert data.changes == []
    assert main(["report", str(batch_dir), "--out", str(tmp_path / "out")]) == 0
    assert png_size((tmp_path / "out" / "report.png").read_bytes()) == (1100, 700)
    assert "<h2>Trials</h2>" in (tmp_path / "out" / "report.html").read_text()
    assert not (batch_dir / "report.png").exists()


@needs_matplotlib
def test_report_of_live_run_marks_manual_override(tmp_path: Path) -> None:
    """A live run can be reported; a manual edit of the control file gets its own marker."""
    live = LiveRun(tmp_path, "realtime")
    try:
        live.wait_for_event(lambda e: e["event"] == "epoch" and e["epoch"] == 11)
        live.config.write_text(json.dumps({"lambda_hier": 1.2, "version": 10}))
        live.wait_for_event(lambda e: e["event"] == "manual_override")
        png, page = write_report(live.run_dir, dpi=80)
        fig, data = build_figure(live.run_dir)
    finally:
        live.stop()
    assert png_size(png.read_bytes()) == (880, 560)
    markers = [line for line in fig.axes[0].get_lines() if line.get_gid() == "config_change"]
    assert len(markers) == len(data.changes) == len(changes_in(live.run_dir))
    assert data.changes[-1].reason == "manual_override" and data.changes[-1].at_epoch == 11
    assert "(running)" in fig.get_suptitle()
    assert "manual_override" in page.read_text()


def test_without_matplotlib_names_the_extra(
    realtime_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib the report is a one-line error naming the [plot] extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"^report needs matplotlib: pip install 'autotune-rt\[plot\]'$"):
        views_main("report", [str(realtime_dir)])
    assert main(["report", str(realtime_dir)]) == 2
    assert capsys.readouterr().err == f"autotune-rt: error: {MATPLOTLIB_MISSING}\n"
