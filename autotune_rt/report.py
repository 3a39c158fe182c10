"""``autotune-rt report``: a run's metrics and config changes as ``report.png`` and ``report.html``."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune_rt.exceptions import ConfigError
from autotune_rt.runs import (
    NOT_A_CHANGE,
    EventReader,
    RunState,
    StateCollector,
    VersionRow,
    find_run_dir,
    require_events,
)
from autotune_rt.views import SHORT_NAMES, command_parser, short_weights

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "COLUMNS",
    "ReportData",
    "Series",
    "build_figure",
    "read_report_data",
    "report_main",
    "write_report",
]

MATPLOTLIB_MISSING = "report needs matplotlib: pip install 'autotune-rt[plot]'"
FIGSIZE = (11.0, 7.0)
DPI = 100
# Beyond this many changes the marker labels would overlap: they shrink to the version number
# (the HTML table has the details).
MAX_LABELLED = 24
NAN = float("nan")
# One colour per reason, so the same kind of change looks the same on every report.
_REASON_COLOURS = {
    "poor_tail": "tab:red",
    "poor_head": "tab:orange",
    "high_loss": "tab:brown",
    "stagnation": "tab:gray",
    "manual_override": "tab:purple",
    "rollback": "tab:pink",
}


COLUMNS = ("epoch", "metric", "acc", "head", "tail", "loss")
# Plotted next to the optimised metric when that is another one (the seed's running best_metric).
ACCURACY_NAMES = ("acc1", "acc")


def _columns() -> dict[str, array[float]]:
    return {name: array("d") for name in COLUMNS}


@dataclass
class Series:
    """One training's per-epoch values, by column (NaN where missing, and at a restart)."""

    columns: dict[str, array[float]] = field(default_factory=_columns)

    def add(self, values: Mapping[str, float]) -> None:
        """Append one epoch; an epoch that goes backwards (a restart) breaks the lines first."""
        epochs = self.columns["epoch"]
        if epochs and values["epoch"] <= epochs[-1]:
            for column in self.columns.values():
                column.append(NAN)
        for name, column in self.columns.items():
            column.append(values.get(name, NAN))

    def __getitem__(self, name: str) -> array[float]:
        return self.columns[name]

    def has(self, name: str) -> bool:
        """Whether column *name* holds any value at all."""
        return any(not math.isnan(v) for v in self.columns[name])


@dataclass
class ReportData:
    """What the report shows, read from ``events.jsonl`` in one pass.

    Attributes:
        state: The run's state, as ``status`` shows it.
        names: The metric names plotted: ``metric`` (the optimised one), ``acc`` (acc1 or acc
            when that is another metric; else empty), ``head``, ``tail``, ``loss``.
        series: Per-epoch values; key 0 for a realtime run, the trial number in a batch.
        versions: Every config version written, in order.
    """

    state: RunState
    names: dict[str, str]
    series: dict[int, Series]
    versions: list[VersionRow]

    @property
    def changes(self) -> list[VersionRow]:
        """The versions that changed the weights (each gets a marker on the plot)."""
        return [v for v in self.versions if v.reason not in NOT_A_CHANGE]


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return NAN
    return float(value)


def read_report_data(run_dir: Path) -> ReportData:
    """Read a run directory's events into :class:`ReportData` (no matplotlib needed).

    Raises:
        ConfigError: *run_dir* is not a run directory.
    """
    reader = EventReader(require_events(run_dir))
    collector = StateCollector(run_dir, reader.decode, keep_versions=True)
    names = {"metric": "", "acc": "", "head": "head_acc", "tail": "tail_acc", "loss": "loss"}
    series: dict[int, Series] = {}
    events: Iterable[dict[str, Any]] = reader.events()
    for event in events:
        collector.feed(event)
        name = event["event"]
        if name == "run_started" and isinstance(event.get("settings"), dict):
            configured = event["settings"].get("names")
            if isinstance(configured, dict):
                names.update({k: str(v) for k, v in configured.items() if k in ("head", "tail", "loss")})
        elif name == "epoch":
            metrics = event.get("metrics") if isinstance(event.get("metrics"), dict) else {}
            assert isinstance(metrics, dict)
            names["metric"] = str(event.get("metric") or names["metric"])
            if names["loss"] not in metrics and "ce" in metrics:
                names["loss"] = "ce"  # the seed's trainings print ce; it stands in for loss
            if not names["acc"]:
                names["acc"] = next((k for k in ACCURACY_NAMES if k in metrics and k != names["metric"]), "")
            trial = event.get("trial")
            series.setdefault(trial if isinstance(trial, int) else 0, Series()).add(
                {
                    "epoch": _num(event.get("epoch")),
                    "metric": _num(event.get("value")),
                    **{key: _num(metrics.get(names[key])) for key in ("acc", "head", "tail", "loss")},
                }
            )
    state = collector.finish()
    state.damaged_lines = reader.damaged
    return ReportData(state=state, names=names, series=series, versions=collector.versions)


# -- the figure ---------------------------------------------------------------------------------
def _matplotlib() -> Any:
    try:
        # The Agg canvas directly, not pyplot: no display, no global figure registry.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ConfigError(MATPLOTLIB_MISSING) from None
    return FigureCanvasAgg


def _title(data: ReportData) -> str:
    s = data.state
    metric = data.names["metric"] or "metric"
    if s.mode == "batch":
        best = next((t for t in s.trials if t.trial == s.best_trial), None)
        result = "" if best is None else f" · best {metric} {best.best_metric:.4f} (trial {best.trial})"
    else:
        result = "" if s.best is None else f" · best {metric} {s.best:.4f} at epoch {s.best_epoch}"
    return f"autotune-rt {s.mode or '?'} run {s.run_id or '?'} ({s.state}){result}"


def _marker_label(change: VersionRow, short: bool) -> str:
    if short:
        return f"v{change.version}"
    return f"v{change.version} {change.reason}\n{short_weights(change.weights, change.old)}"


def _draw_changes(ax: Axes, changes: Sequence[VersionRow], *, labels: bool) -> None:
    short = len(changes) > MAX_LABELLED
    for i, change in enumerate(changes):
        x = change.at_epoch if change.at_epoch is not None else 0
        colour = _REASON_COLOURS.get(change.reason, "tab:gray")
        line = ax.axvline(x, color=colour, linestyle="--", linewidth=1.0, alpha=0.8)
        if not labels:
            continue
        line.set_gid("config_change")  # what the tests count: one per change, on the top panel
        if i == 0:
            line.set_label("config change")
        ax.text(
            x,
            0.99,
            _marker_label(change, short),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=7,
            color=colour,
        )


def _realtime_figure(fig: Figure, data: ReportData) -> None:
    from matplotlib.ticker import MaxNLocator

    series = data.series.get(0, Series())
    if series.has("loss"):
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    else:
        top, bottom = fig.subplots(1, 1), None
    names = data.names
    epochs = series["epoch"]
    top.plot(epochs, series["metric"], color="tab:blue", linewidth=2.0, label=names["metric"] or "metric")
    for key, colour in (("acc", "black"), ("head", "tab:green"), ("tail", "tab:orange")):
        if series.has(key):
            top.plot(epochs, series[key], color=colour, linewidth=1.2, label=names[key])
    s = data.state
    if s.best is not None and s.best_epoch is not None:
        top.plot(
            [s.best_epoch],
            [s.best],
            marker="*",
            markersize=12,
            color="tab:blue",
            linestyle="none",
            label=f"best {s.best:.4f}",
        )
    if data.changes:  # headroom above the curves for the rotated marker labels
        low, high = top.get_ylim()
        top.set_ylim(low, high + (high - low) * 0.45)
    _draw_changes(top, data.changes, labels=True)
    top.set_ylabel("metric")
    top.grid(alpha=0.3)
    # One row above the plot: inside it, a legend always hides some curve or label.
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=6, fontsize=8, frameon=False)
    if bottom is not None:
        bottom.plot(epochs, series["loss"], color="tab:red", linewidth=1.2, label=names["loss"])
        _draw_changes(bottom, data.changes, labels=False)
        bottom.set_ylabel(names["loss"])
        bottom.grid(alpha=0.3)
        bottom.legend(loc="upper right", fontsize=8)  # a loss falls: its upper right is empty
    (bottom or top).set_xlabel("epoch")
    top.xaxis.set_major_locator(MaxNLocator(integer=True))


def _trial_label(number: int, weights: Mapping[str, float], first: Mapping[str, float]) -> str:
    changed = [f"{SHORT_NAMES.get(k, k)}={v:g}" for k, v in weights.items() if first.get(k) != v]
    return f"trial {number}" + (f": {' '.join(changed)}" if changed else "")


def _batch_figure(fig: Figure, data: ReportData) -> None:
    from matplotlib.ticker import MaxNLocator

    lines, bars = fig.subplots(1, 2, width_ratios=[2.2, 1])
    s = data.state
    rows = {t.trial: t for t in s.trials}
    first = s.trials[0].weights if s.trials else {}
    for number in sorted(data.series):
        series = data.series[number]
        weights = rows[number].weights if number in rows else {}
        best = number == s.best_trial
        lines.plot(
            series["epoch"],
            series["metric"],
            linewidth=2.4 if best else 1.2,
            label=_trial_label(number, weights, first) + (" (best)" if best else ""),
        )
    lines.set_xlabel("epoch")
    lines.xaxis.set_major_locator(MaxNLocator(integer=True))
    lines.set_ylabel(data.names["metric"] or "metric")
    lines.set_title("metric per trial", fontsize=10)
    lines.grid(alpha=0.3)
    if data.series:
        lines.legend(loc="lower right", fontsize=8)
    numbers = [t.trial for t in s.trials]
    values = [NAN if t.best_metric is None else t.best_metric for t in s.trials]
    colours = [
        "tab:green" if t.trial == s.best_trial else "lightgray" if t.best_metric is None else "tab:blue"
        for t in s.trials
    ]
    bars.bar(numbers, [0.0 if math.isnan(v) else v for v in values], color=colours)
    finite = [v for v in values if not math.isnan(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = (high - low) * 0.5 or abs(high) * 0.05 or 0.05
        bars.set_ylim(low - pad, high + pad)  # differences between trials are what matters here
    for t, value in zip(s.trials, values, strict=True):
        text = t.status if math.isnan(value) else f"{value:.4f}"
        y = value if not math.isnan(value) else bars.get_ylim()[0]
        bars.annotate(
            text,
            (t.trial, y),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    bars.set_xticks(numbers)
    bars.set_xlabel("trial")
    metric = data.names["metric"] or "metric"
    bars.set_ylabel(metric if metric.startswith("best") else f"best {metric}")
    bars.set_title("best metric per trial", fontsize=10)
    bars.grid(axis="y", alpha=0.3)


def build_figure(run_dir: Path, dpi: int = DPI) -> tuple[Figure, ReportData]:
    """Read *run_dir* and draw its report figure (not saved yet).

    Realtime: the optimised metric, head and tail accuracy, and the loss (a second panel)
    against epochs, with a dashed vertical line (gid ``config_change``) at each config change.
    Batch: one metric line per trial and a bar chart of the best metric per trial.

    Raises:
        ConfigError: Not a run directory, or matplotlib is not installed.
    """
    require_events(run_dir)  # a wrong directory is the first thing to say, before a slow import
    canvas_class = _matplotlib()
    from matplotlib.figure import Figure

    data = read_report_data(run_dir)
    fig = Figure(figsize=FIGSIZE, dpi=dpi, layout="constrained")
    canvas_class(fig)
    if data.state.mode == "batch":
        _batch_figure(fig, data)
    else:
        _realtime_figure(fig, data)
    fig.suptitle(_title(data), fontsize=12)
    return fig, data


# -- the HTML page ------------------------------------------------------------------------------
def _cell(value: object, left: bool = False) -> str:
    text = "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
    return f"<td{' class=l' if left else ''}>{html.escape(text)}</td>"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _weights_cell(weights: Mapping[str, float]) -> str:
    return _cell(" ".join(f"{k}={v:g}" for k, v in weights.items()), left=True)


def render_html(data: ReportData, png: bytes) -> str:
    """The self-contained report page: the PNG inline, then the versions and trials tables."""
    s = data.state
    facts = [
        ("run", f"{s.run_id} ({s.mode})"),
        ("directory", s.run_dir),
        ("state", s.state + ("" if s.exit_code is None else f", exit code {s.exit_code}")),
        ("metric", data.names["metric"] or "–"),
    ]
    if s.best is not None and s.mode != "batch":
        facts.append(("best", f"{s.best:.4f} at epoch {s.best_epoch}"))
    if s.damaged_lines:
        facts.append(("damaged lines skipped", str(s.damaged_lines)))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>autotune-rt report {html.escape(str(s.run_id))}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1140px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:14px;margin-bottom:2em}"
        "td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}"
        "th{background:#f4f4f4}.l{text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(_title(data))}</h1>",
        _table(["", ""], [[_cell(k, True), _cell(v, True)] for k, v in facts]),
        f"<img alt='metrics against epochs' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
    ]
    if data.versions:
        parts.append("<h2>Config versions</h2>")
        parts.append(
            _table(
                [
                    "version",
                    "reason",
                    "decided at epoch",
                    "applied at epoch",
                    "latency (s)",
                    "weights",
                    "change",
                ],
                (
                    [
                        _cell(v.version),
                        _cell(v.reason, True),
                        _cell(v.epoch if v.epoch is not None else v.at_epoch),
                        _cell(v.applied_epoch),
                        _cell(v.latency_s),
                        _weights_cell(v.weights),
                        _cell(
                            (short_weights(v.weights, v.old) if v.old else "")
                            + (f" ({v.note})" if v.note else ""),
                            True,
                        ),
                    ]
                    for v in data.versions
                ),
            )
        )
    if s.trials:
        parts.append("<h2>Trials</h2>")
        parts.append(
            _table(
                ["trial", "weights", "best metric", "best epoch", "epochs", "status"],
                (
                    [
                        _cell(f"{t.trial}{' (best)' if t.trial == s.best_trial else ''}"),
                        _weights_cell(t.weights),
                        _cell(t.best_metric),
                        _cell(t.best_epoch),
                        _cell(t.epochs),
                        _cell(
                            t.status if t.exit_code in (None, 0) else f"{t.status} (exit {t.exit_code})", True
                        ),
                    ]
                    for t in s.trials
                ),
            )
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write *data* to a temporary file and rename it, so a viewer never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would make the report private, 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_report(run_dir: Path, out_dir: Path | None = None, dpi: int = DPI) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` for *run_dir* into *out_dir* (default: *run_dir*).

    Returns:
        The paths of the PNG and the HTML page.

    Raises:
        ConfigError: Not a run directory, matplotlib missing, or *out_dir* not writable.
    """
    fig, data = build_figure(run_dir, dpi=dpi)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    target = out_dir or run_dir
    try:
        target.mkdir(parents=True, exist_ok=True)
        png_path, html_path = target / "report.png", target / "report.html"
        _atomic_write(png_path, png)
        _atomic_write(html_path, render_html(data, png).encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {target}: {exc.strerror}; pass --out DIR") from None
    return png_path, html_path


def report_main(argv: Sequence[str]) -> int:
    """``autotune-rt report [run_dir] [--out DIR] [--dpi N]``."""
    parser = command_parser(
        "report", "Plot a run's metrics and config changes to report.png and report.html."
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="where to write (default: the run dir)"
    )
    parser.add_argument("--dpi", type=int, default=DPI, metavar="N", help=f"resolution (default: {DPI})")
    args = parser.parse_args(list(argv))
    if args.dpi < 20:
        raise ConfigError("--dpi must be at least 20")
    png, page = write_report(find_run_dir(args.run_dir, "report"), args.out, args.dpi)
    print(png)
    print(page)
    return 0
