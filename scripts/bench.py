"""Benchmarks: what the supervisor and the client cost, each next to a reference from the same run.

Run ``.venv/bin/python scripts/bench.py [--quick] [--only NAME ...]``; docs/benchmarks.md
explains every figure and holds the latest results.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # a clean checkout runs without `pip install -e .`

import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

from autotune_rt._streams import LineSplitter  # noqa: E402  # the pre-filter exactly as the supervisor runs it
from autotune_rt.client import ConfigReloader  # noqa: E402
from autotune_rt.parse import LineParser  # noqa: E402

__all__ = ["BENCHMARKS", "Figure", "Scale", "main"]

DEFAULT_JSON = REPO / "docs" / "benchmarks.json"
# Generous bounds for one supervised run: a hang must fail the run, not stall it forever.
RUN_TIMEOUT_S = 600.0
# How often completion is polled; it bounds the resolution of the pass-through times.
POLL_S = 0.0005
# The latency child's stat() poll: the resolution of each latency sample.
LATENCY_POLL_S = 0.0001
# Between two epochs of the latency child: epochs never come back to back, so each
# trigger's remaining work (logging, directory fsync) finishes before the next line.
LATENCY_PAUSE_S = 0.02
# Modules that must never come with `import autotune_rt.client` (the client is stdlib only).
HEAVY_MODULES = ("pydantic", "structlog", "psutil", "watchdog", "numpy", "asyncio", "autotune_rt.parse")

SEED_LINE = (
    "Epoch {e}[1.00s]: {{'epoch': {e}, 'ce': 1.2345, 'loss': 1.3456, 'acc1': {acc}, "
    "'head_acc': 0.7012, 'tail_acc': 0.2345}}\n"
)
PLAIN_LINE = "step {i} loss {loss:.4f} lr 0.0001\n"

# The children the benchmarks supervise; written to the work directory as files.
PRODUCER = """\
import os, sys, time

mode, source, t0_path = sys.argv[1:4]
with open(t0_path, "w") as f:
    f.write(repr(time.monotonic()))
if mode == "cat":
    os.execvp("cat", ["cat", source])
pause = float(sys.argv[4]) if mode == "paced" else 0.0
with open(source) as lines:
    for line in lines:
        print(line, end="")
        if pause:
            time.sleep(pause)
if pause:
    time.sleep(0.5)  # stay alive while the reader's CPU time is sampled
"""

LATENCY_CHILD = """\
import json, os, sys, time

control, result = sys.argv[1], sys.argv[3]
epochs, poll, pause = int(sys.argv[2]), float(sys.argv[4]), float(sys.argv[5])

def signature():
    try:
        st = os.stat(control)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)

samples = []
for epoch in range(epochs):
    before = signature()
    # A flat metric: with patience 1 and cooldown 0 every epoch after the first triggers.
    metrics = {"epoch": epoch, "ce": 1.2345, "acc1": 0.5, "head_acc": 0.7, "tail_acc": 0.2}
    line = f"Epoch {epoch}[1.00s]: {metrics}\\n"
    started = time.monotonic()
    os.write(1, line.encode())
    deadline = started + 2.0
    seen = None
    while True:
        time.sleep(poll)
        now = time.monotonic()
        if signature() != before:
            seen = now
            break
        if now > deadline:
            break
    samples.append(None if seen is None else seen - started)
    time.sleep(pause)
with open(result, "w") as f:
    json.dump(samples, f)
"""

GROWTH_CHILD = """\
import os, sys
from autotune_rt.client import ConfigReloader

fifo, period, plateau = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
template = sys.argv[4]
reloader = ConfigReloader()
weights = {}
out = sys.stdout.buffer
epoch = 0
with open(fifo) as commands:
    for command in commands:
        count = int(command)
        if count <= 0:
            break
        batch = []
        for _ in range(count):
            reloader.apply(weights, epoch=epoch)
            k = epoch % period
            acc = 0.1 + 1e-7 * (epoch - k if 1 <= k <= plateau else epoch)
            batch.append(template.format(e=epoch, acc=f"{acc:.9f}"))
            epoch += 1
            if len(batch) >= 500:
                out.write("".join(batch).encode())
                out.flush()
                batch = []
        out.write("".join(batch).encode())
        out.flush()
"""


@dataclass
class Figure:
    """One measured figure next to its reference.

    Attributes:
        key: Stable dotted name, e.g. ``"client.apply_unchanged"``.
        label: What was measured, for humans.
        value: The measured figure (a median unless the label says otherwise).
        unit: Unit of ``value`` and ``reference``.
        reference: The same quantity for the reference, measured in the same run.
        reference_label: What the reference is.
        ratio: ``value / reference``, computed (None without a non-zero reference).
        target: The target in words; empty when the issue sets none.
        met: Whether the target is met; None without a target.
        details: Raw samples and secondary figures.
    """

    key: str
    label: str
    value: float
    unit: str
    reference: float | None
    reference_label: str
    target: str = ""
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.reference:
            self.ratio = self.value / self.reference


@dataclass(frozen=True)
class Scale:
    """How big each benchmark is; ``--quick`` shrinks everything.

    Attributes:
        quick: Whether this is the quick scale.
        lines: Lines of the pass-through benchmark.
        repeats: Runs per supervised measurement (the median is reported).
        triggers: Reaction-latency samples.
        idle_s: Seconds of silence measured by the idle benchmark.
        growth_epochs: Epoch lines before the second growth measurement.
        growth_windows: 1,000-epoch windows timed at each end of the growth run.
        training_epochs: Epochs of the demo training.
        parse_lines: Lines per parsing batch.
        client_calls: ``apply()`` calls per batch.
        import_runs: Interpreter starts per import measurement.
    """

    quick: bool
    lines: int
    repeats: int
    triggers: int
    idle_s: float
    growth_epochs: int
    growth_windows: int
    training_epochs: int
    parse_lines: int
    client_calls: int
    import_runs: int

    @classmethod
    def make(
        cls, quick: bool, idle_s: float | None, repeats: int | None, growth_epochs: int | None = None
    ) -> Scale:
        """The full or the quick scale, with the command line's overrides."""
        scale = QUICK if quick else FULL
        return dataclasses.replace(
            scale,
            idle_s=scale.idle_s if idle_s is None else idle_s,
            repeats=scale.repeats if repeats is None else repeats,
            growth_epochs=scale.growth_epochs if growth_epochs is None else growth_epochs,
        )


FULL = Scale(
    quick=False,
    lines=2_000_000,
    repeats=3,
    triggers=400,
    idle_s=60.0,
    growth_epochs=1_000_000,
    growth_windows=5,
    training_epochs=30,
    parse_lines=20_000,
    client_calls=10_000,
    import_runs=30,
)
QUICK = Scale(
    quick=True,
    lines=200_000,
    repeats=1,
    triggers=60,
    idle_s=10.0,
    growth_epochs=30_000,
    growth_windows=3,
    training_epochs=30,
    parse_lines=5_000,
    client_calls=2_000,
    import_runs=10,
)


class Bench:
    """Work directory, environment and helpers shared by the benchmarks."""

    def __init__(self, scale: Scale, workdir: Path) -> None:
        self.scale = scale
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env["LANG"] = "C.UTF-8"
        self.env.pop("LC_ALL", None)
        self._counter = 0
        self.scripts: dict[str, Path] = {}
        for name, source in (
            ("producer", PRODUCER),
            ("latency_child", LATENCY_CHILD),
            ("growth_child", GROWTH_CHILD),
        ):
            path = workdir / f"{name}.py"
            path.write_text(source)
            self.scripts[name] = path

    def fresh_dir(self, tag: str) -> Path:
        """A new empty directory for one run."""
        self._counter += 1
        path = self.workdir / f"{self._counter:03d}-{tag}"
        path.mkdir()
        return path

    def supervisor_argv(self, run: Path, child: Sequence[str], *options: str) -> list[str]:
        """``autotune-rt realtime`` with its control file and run directory inside ``run``.

        The control file gets a directory of its own: the supervisor watches that directory,
        and the benchmark's output files there would wake it on every write.
        """
        return [
            sys.executable,
            "-m",
            "autotune_rt",
            "realtime",
            "--config_file",
            str(run / "control" / "control.json"),
            "--run_dir",
            str(run / "run"),
            *options,
            "--",
            *child,
        ]

    @contextlib.contextmanager
    def spawn(self, argv: Sequence[str], run: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
        """Start ``argv`` with stdout to ``run/out`` and stderr to ``run/err``; reap it at the end."""
        with (run / "out").open("wb") as out, (run / "err").open("wb") as err:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=run, env={**self.env, **env}
            )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    @staticmethod
    def check_exit(proc: subprocess.Popen[bytes], run: Path, expected: int = 0) -> None:
        """Fail loudly (with the run's stderr) when a run did not end as expected."""
        code = proc.wait(timeout=RUN_TIMEOUT_S)
        if code != expected:
            err = (run / "err").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{str(proc.args)[:200]} exited {code}:\n{err}")


# -- small measuring helpers ------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100) of non-empty ``samples``."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def per_call(fn: Callable[[], object], calls: int, batches: int) -> list[float]:
    """Seconds per call of ``fn``, one figure per batch of ``calls`` calls."""
    out = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - started) / calls)
    return out


def task_stats(pid: int) -> tuple[int, int]:
    """``(cpu_ns, times_scheduled)`` summed over every thread of ``pid`` (from schedstat)."""
    cpu = runs = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
            cpu += int(fields[0])
            runs += int(fields[2])
    return cpu, runs


def wait_until(done: Callable[[], bool], timeout: float, what: str, interval: float = POLL_S) -> float:
    """Poll ``done()``; return the monotonic time it first held. Raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if done():
            return now
        if now > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def size(path: Path) -> int:
    """File size, 0 while it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def fsync_times(directory: Path, count: int, pause: float) -> list[float]:
    """Seconds of one ``fsync`` of a freshly written 200-byte file in ``directory``.

    Probes are ``pause`` apart, the rhythm of the measurement they stand next to: an fsync
    right after another is cheaper than one after a pause (the journal is warm).
    """
    out = []
    for i in range(count):
        path = directory / f".fsync-probe-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 200)
            started = time.perf_counter()
            os.fsync(fd)
            out.append(time.perf_counter() - started)
        finally:
            os.close(fd)
            path.unlink()
        time.sleep(pause)
    return out


# -- 1. pass-through throughput ---------------------------------------------------------


def _write_output(path: Path, lines: int, metric_every: int | None) -> None:
    """The child's output: short non-metric lines, every ``metric_every``-th a seed epoch line."""
    epochs = lines // metric_every if metric_every else 0
    with path.open("w") as f:
        epoch = 0
        chunk: list[str] = []
        for i in range(lines):
            if metric_every and i % metric_every == metric_every - 1:
                # Strictly rising: a throughput run must not turn into a trigger benchmark.
                chunk.append(SEED_LINE.format(e=epoch, acc=f"{0.1 + 0.8 * epoch / epochs:.7f}"))
                epoch += 1
            else:
                chunk.append(PLAIN_LINE.format(i=i, loss=0.5 + (i % 997) / 1e4))
            if len(chunk) >= 10_000:
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))


def _bare_seconds(bench: Bench, run: Path, argv: list[str], **env: str) -> float:
    """From the producer's start (``run/t0``) to the end of ``argv``, which writes ``run/out``."""
    with bench.spawn(argv, run, **env) as proc:
        bench.check_exit(proc, run)
        end = time.monotonic()
    return end - float((run / "t0").read_text())


def _supervised_seconds(bench: Bench, tag: str, mode: str, source: Path) -> float:
    """From the child's start to the last byte in both the output file and train.log."""
    run = bench.fresh_dir(tag)
    t0_file = run / "t0"
    child = [sys.executable, str(bench.scripts["producer"]), mode, str(source), str(t0_file)]
    expected = source.stat().st_size
    out, log = run / "out", run / "run" / "train.log"
    with bench.spawn(bench.supervisor_argv(run, child), run) as proc:
        end = wait_until(
            lambda: size(log) >= expected and (size(out) >= expected or proc.poll() is not None),
            RUN_TIMEOUT_S,
            "the supervised output",
        )
        bench.check_exit(proc, run)
    if size(out) < expected:
        raise RuntimeError(f"the supervisor dropped {expected - size(out)} bytes of a file sink")
    seconds = end - float(t0_file.read_text())
    shutil.rmtree(run)  # hundreds of MB per run
    return seconds


def _references(bench: Bench, source: Path, run: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The bare commands that stand next to the supervisor: name -> (argv, extra env)."""
    producer = [sys.executable, str(bench.scripts["producer"])]
    cat = shlex.join([*producer, "cat", str(source), str(run / "t0")])
    return {
        "cat": ([*producer, "cat", str(source), str(run / "t0")], {}),
        "cat_pipe": (["sh", "-c", f"{cat} | cat"], {}),
        "tee": (["sh", "-c", f"{cat} | tee {shlex.quote(str(run / 'log'))}"], {}),
        "print": ([*producer, "print", str(source), str(run / "t0")], {"PYTHONUNBUFFERED": "1"}),
    }


def bench_throughput(bench: Bench) -> list[Figure]:
    """Lines/s through ``autotune-rt realtime`` next to ``cat`` and to the bare child."""
    scale = bench.scale
    figures: list[Figure] = []
    for variant, metric_every in (("plain", None), ("metric10", 10)):
        # A printing child over metric lines adds nothing the plain one and growth do not show.
        printing = metric_every is None
        source = bench.workdir / f"{variant}.txt"
        _write_output(source, scale.lines, metric_every)
        times: dict[str, list[float]] = {}
        for _ in range(scale.repeats):  # interleaved, so a noisy moment hits every variant alike
            for name in ("cat", "cat_pipe", "tee", "print") if printing else ("cat", "cat_pipe", "tee"):
                run = bench.fresh_dir(f"{variant}-{name}")
                argv, env = _references(bench, source, run)[name]
                times.setdefault(name, []).append(_bare_seconds(bench, run, argv, **env))
                shutil.rmtree(run)
            for name, mode in (
                (("sup_cat", "cat"), ("sup_print", "print")) if printing else (("sup_cat", "cat"),)
            ):
                seconds = _supervised_seconds(bench, f"{variant}-{name}", mode, source)
                times.setdefault(name, []).append(seconds)
        source.unlink()
        rate = {k: scale.lines / statistics.median(v) for k, v in times.items()}
        what = "non-metric lines" if metric_every is None else "10% seed epoch lines"
        raw = {f"{k}_s": v for k, v in times.items()} | {"lines": scale.lines}
        sup = rate["sup_cat"]
        figures += [
            Figure(
                f"throughput.{variant}.vs_cat",
                f"pass-through, {what}: `cat` as the child, through the supervisor",
                sup,
                "lines/s",
                rate["cat"],
                "`cat file > out` (the issue's reference)",
                target=">= 0.8x reference",
                met=sup >= 0.8 * rate["cat"],
                details=raw,
            ),
            Figure(
                f"throughput.{variant}.vs_cat_pipe",
                "the same run",
                sup,
                "lines/s",
                rate["cat_pipe"],
                "`cat file | cat > out` (cat in the supervisor's seat: a pipe, one copy)",
            ),
            Figure(
                f"throughput.{variant}.vs_tee",
                "the same run",
                sup,
                "lines/s",
                rate["tee"],
                "`cat file | tee log > out` (a pipe and two copies: the supervisor's work)",
            ),
        ]
        if printing:
            figures.append(
                Figure(
                    f"throughput.{variant}.print_child",
                    f"pass-through, {what}: a Python child printing each line, through the supervisor",
                    rate["sup_print"],
                    "lines/s",
                    rate["print"],
                    "the same child straight to a file (PYTHONUNBUFFERED=1, as the supervisor sets)",
                )
            )
    figures.append(_paced(bench))
    return figures


def _paced(bench: Bench) -> Figure:
    """CPU per line when a child prints at a training's pace: each line is its own wake-up."""
    lines = 2_000 if bench.scale.quick else 5_000
    source = bench.workdir / "paced.txt"
    _write_output(source, lines, None)
    expected = source.stat().st_size
    producer = [sys.executable, str(bench.scripts["producer"]), "paced", str(source)]

    def sample(run: Path, pid: int) -> float:
        out = run / "out"
        wait_until(lambda: size(out) > 0, 60, "the first paced line", 0.0002)
        cpu0 = task_stats(pid)[0]
        wait_until(lambda: size(out) >= expected, RUN_TIMEOUT_S, "the last paced line", 0.001)
        return (task_stats(pid)[0] - cpu0) / (lines - 1) / 1e3

    run = bench.fresh_dir("paced-sup")
    with bench.spawn(bench.supervisor_argv(run, [*producer, str(run / "t0"), "0.0005"]), run) as proc:
        supervised = sample(run, proc.pid)
        bench.check_exit(proc, run)
    run = bench.fresh_dir("paced-cat")
    with (run / "out").open("wb") as out:
        child = subprocess.Popen(
            [*producer, str(run / "t0"), "0.0005"],
            stdout=subprocess.PIPE,
            env={**bench.env, "PYTHONUNBUFFERED": "1"},  # as under the supervisor: a write per line
            cwd=run,
        )
        cat = subprocess.Popen(["cat"], stdin=child.stdout, stdout=out)
        assert child.stdout is not None
        child.stdout.close()
        reference = sample(run, cat.pid)
        child.wait()
        cat.wait()
    source.unlink()
    return Figure(
        "throughput.paced_cpu_per_line",
        "supervisor CPU per line, child printing one line every 0.5 ms (each line one wake-up)",
        supervised,
        "µs",
        reference,
        "`cat`'s CPU per line reading the same paced pipe",
        details={"lines": lines},
    )


# -- 2. parsing ---------------------------------------------------------------------------


def bench_parse(bench: Bench) -> list[Figure]:
    """Metric lines parsed and non-metric lines rejected per second, per line and per chunk."""
    n = bench.scale.parse_lines
    parser = LineParser()
    metric = [SEED_LINE.format(e=e, acc=f"{(e % 1000) / 1000:.4f}").rstrip("\n").encode() for e in range(n)]
    plain = [PLAIN_LINE.format(i=i, loss=(i % 997) / 1e4).rstrip("\n").encode() for i in range(n)]
    assert all(parser.parse(line) is not None for line in metric[:100])
    assert all(parser.parse(line) is None for line in plain[:100])
    dicts = [line[line.index(b"{") :].decode() for line in metric]

    def rate(fn: Callable[[Any], object], lines: Sequence[Any]) -> float:
        best: list[float] = []
        for _ in range(5):
            started = time.perf_counter()
            for line in lines:
                fn(line)
            best.append(len(lines) / (time.perf_counter() - started))
        return statistics.median(best)

    def noop(line: object) -> None:
        return None

    parsed = rate(parser.parse, metric)
    literal = rate(ast.literal_eval, dicts)
    rejected = rate(parser.parse, plain)
    empty_call = rate(noop, plain)

    # The chunk pre-filter: 64 KiB chunks (a pipe's worth) of non-metric and of 10% metric output.
    def chunk_rate(text: bytes, lines: int) -> tuple[float, float]:
        chunks = [text[i : i + 65536] for i in range(0, len(text), 65536)]
        kept = 0

        def emit(line: bytes) -> None:
            nonlocal kept
            kept += 1

        splitter_rates, split_rates = [], []
        for _ in range(5):
            splitter = LineSplitter(emit, parser.needles, 1 << 16)
            started = time.perf_counter()
            for chunk in chunks:
                splitter.feed(chunk)
            splitter_rates.append(lines / (time.perf_counter() - started))
            started = time.perf_counter()
            for chunk in chunks:
                chunk.split(b"\n")
            split_rates.append(lines / (time.perf_counter() - started))
        return statistics.median(splitter_rates), statistics.median(split_rates)

    plain_blob = b"\n".join(plain * 10) + b"\n"
    mixed = [m if i % 10 == 9 else p for i, (p, m) in enumerate(zip(plain, metric, strict=True))]
    mixed_blob = b"\n".join(mixed * 10) + b"\n"
    scan_plain, split_plain = chunk_rate(plain_blob, len(plain) * 10)
    scan_mixed, split_mixed = chunk_rate(mixed_blob, len(mixed) * 10)
    return [
        Figure(
            "parse.metric_line",
            "LineParser.parse of a seed epoch line",
            parsed,
            "lines/s",
            literal,
            "`ast.literal_eval` of the same dict alone",
        ),
        Figure(
            "parse.reject_line",
            "LineParser.parse of a non-metric line (rejected)",
            rejected,
            "lines/s",
            empty_call,
            "an empty Python function call per line",
        ),
        Figure(
            "parse.prefilter_plain",
            "needle pre-filter (LineSplitter) over 64 KiB chunks of non-metric lines",
            scan_plain,
            "lines/s",
            split_plain,
            "`chunk.split(b'\\n')` of the same chunks (no per-line work at all)",
        ),
        Figure(
            "parse.prefilter_metric10",
            "needle pre-filter over chunks with 10% epoch lines (lines handed on, not parsed)",
            scan_mixed,
            "lines/s",
            split_mixed,
            "`chunk.split(b'\\n')` of the same chunks (no per-line work at all)",
        ),
    ]


# -- 3. reaction latency ------------------------------------------------------------------


def bench_latency(bench: Bench) -> list[Figure]:
    """From the epoch line that completes the patience window to the control file replaced."""
    run = bench.fresh_dir("latency")
    control, result = run / "control" / "control.json", run / "samples.json"
    epochs = bench.scale.triggers + 1  # epoch 0 only sets the best
    child = [
        sys.executable,
        str(bench.scripts["latency_child"]),
        str(control),
        str(epochs),
        str(result),
        str(LATENCY_POLL_S),
        str(LATENCY_PAUSE_S),
    ]
    control.parent.mkdir()
    fsync_before = fsync_times(control.parent, 100, LATENCY_PAUSE_S)
    options = ("--min_epochs", "0", "--patience", "1", "--cooldown", "0", "--metric", "acc1", "--seed", "0")
    with bench.spawn(bench.supervisor_argv(run, child, *options), run) as proc:
        bench.check_exit(proc, run)
    fsync = fsync_before + fsync_times(control.parent, 100, LATENCY_PAUSE_S)
    raw: list[float | None] = json.loads(result.read_text())[1:]
    samples = [s * 1e3 for s in raw if s is not None]
    if not samples:
        raise RuntimeError("no control-file replacement was seen; see " + str(run / "err"))
    p99, fsync_p99 = percentile(samples, 99), percentile(fsync, 99) * 1e3
    details = {
        "samples_ms": [round(s, 3) for s in samples],
        "missed": len(raw) - len(samples),
        "fsync_ms": [round(s * 1e3, 3) for s in fsync],
        "resolution_ms": LATENCY_POLL_S * 1e3,
    }
    fsync_label = "one fsync of a 200-byte file in the control file's directory"
    return [
        Figure(
            "latency.median",
            f"reaction latency, median of {len(samples)} triggers",
            statistics.median(samples),
            "ms",
            statistics.median(fsync) * 1e3,
            f"{fsync_label} (median of {len(fsync)})",
            details=details,
        ),
        Figure(
            "latency.p99",
            f"reaction latency, p99 of {len(samples)} triggers",
            p99,
            "ms",
            fsync_p99,
            f"{fsync_label} (p99 of {len(fsync)})",
            target="<= reference + 5 ms",
            met=p99 <= fsync_p99 + 5.0,
        ),
    ]


# -- 4. client cost -------------------------------------------------------------------------


def _import_seconds(bench: Bench, code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=bench.env, cwd=bench.workdir)
    return time.perf_counter() - started


def bench_client(bench: Bench) -> list[Figure]:
    """``ConfigReloader.apply()`` on an unchanged file, and ``import autotune_rt.client``."""
    scale = bench.scale
    run = bench.fresh_dir("client")
    path = run / "control.json"
    path.write_text(json.dumps({"lambda_dol": 0.5, "lambda_col": 0.3, "version": 1}))
    path.chmod(0o644)
    old = time.time() - 60  # older than the client's 2 s racy-timestamp window, as in a real run
    os.utime(path, (old, old))
    reloader = ConfigReloader(path)
    target: dict[str, float] = {}
    reloader.apply(target)  # the one real read
    assert target and reloader.apply(target) == {}
    batches = 20
    apply_us = [s * 1e6 for s in per_call(lambda: reloader.apply(target), scale.client_calls, batches)]
    stat_us = [s * 1e6 for s in per_call(lambda: os.stat(path), scale.client_calls, batches)]

    bare, imported = [], []
    for _ in range(scale.import_runs):  # interleaved: both see the same disk cache and load
        bare.append(_import_seconds(bench, "pass"))
        imported.append(_import_seconds(bench, "import autotune_rt.client"))
    bare_ms, import_ms = statistics.median(bare) * 1e3, statistics.median(imported) * 1e3
    probe = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import sys, autotune_rt.client; print(' '.join(sorted(sys.modules)))",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=bench.env,
        cwd=bench.workdir,
    )
    modules = set(probe.stdout.split())
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES or m in HEAVY_MODULES)
    cumulative = [
        int(m.group(1))
        for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \| autotune_rt\.client$", probe.stderr, re.M)
    ]
    return [
        Figure(
            "client.apply_unchanged",
            "ConfigReloader.apply() with the file unchanged",
            statistics.median(apply_us),
            "µs",
            statistics.median(stat_us),
            "a bare os.stat of the same file",
            target="<= 20 µs",
            met=statistics.median(apply_us) <= 20.0,
            details={"apply_us": apply_us, "stat_us": stat_us},
        ),
        Figure(
            "client.import",
            "`python -c 'import autotune_rt.client'` wall time",
            import_ms,
            "ms",
            bare_ms,
            "`python -c pass`",
            target="<= reference + 15 ms",
            met=import_ms - bare_ms <= 15.0,
            details={
                "difference_ms": import_ms - bare_ms,
                "importtime_cumulative_us": cumulative[0] if cumulative else None,
                "heavy_modules_loaded": heavy,
                "import_s": imported,
                "pass_s": bare,
            },
        ),
    ]


# -- 5. idle cost -------------------------------------------------------------------------


NEIGHBOUR = """\
import sys, time
end = time.monotonic() + float(sys.argv[2])
with open(sys.argv[1], "ab", buffering=0) as f:
    while time.monotonic() < end:
        f.write(b"a line of someone else's log\\n")
        time.sleep(0.001)
time.sleep(5)  # stay alive while its CPU time is sampled
"""


def bench_idle(bench: Bench) -> list[Figure]:
    """Supervisor CPU, wake-ups and RSS while the child prints nothing."""
    run = bench.fresh_dir("idle")
    child = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(3600)"]
    with bench.spawn(bench.supervisor_argv(run, child), run) as proc:
        wait_until(lambda: b"ready" in (run / "out").read_bytes(), 60, "the idle child", 0.05)
        time.sleep(1.0)  # let start-up settle: imports, first health sample
        sup = psutil.Process(proc.pid)
        kid = sup.children()[0]
        quiet = _window(bench.scale.idle_s, proc.pid, kid.pid)
        rss, kid_rss = sup.memory_info().rss, kid.memory_info().rss
        threads = sup.num_threads()
        # The default control file lives in /tmp, a directory other programs write to.
        busy_s = min(bench.scale.idle_s / 2, 5.0)
        neighbour = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR, str(run / "control" / "neighbour.log"), str(busy_s)]
        )
        busy = _window(busy_s, proc.pid, neighbour.pid)
        neighbour.kill()
        neighbour.wait()
        proc.send_signal(signal.SIGTERM)
        bench.check_exit(proc, run, 128 + signal.SIGTERM)
    return [
        Figure(
            "idle.cpu",
            f"supervisor CPU over {quiet.seconds:.0f} s of a silent child (all threads)",
            quiet.cpu_pct,
            "% of a core",
            quiet.other_cpu_pct,
            "the sleeping child itself",
            target="<= 0.5% of one core",
            met=quiet.cpu_pct <= 0.5,
            details={"seconds": quiet.seconds, "threads": threads},
        ),
        Figure(
            "idle.wakeups",
            "supervisor wake-ups (times any thread was scheduled), per second",
            quiet.runs_per_s,
            "1/s",
            quiet.other_runs_per_s,
            "the sleeping child itself",
        ),
        Figure(
            "idle.rss",
            "supervisor resident memory while idle",
            rss / 2**20,
            "MiB",
            kid_rss / 2**20,
            "the child: a bare Python interpreter",
        ),
        Figure(
            "idle.cpu_busy_directory",
            "supervisor CPU while another program appends to a file next to the control file, 1,000 writes/s",
            busy.cpu_pct,
            "% of a core",
            busy.other_cpu_pct,
            "the writing program itself",
            details={"seconds": busy.seconds},
        ),
    ]


@dataclass(frozen=True)
class _Window:
    seconds: float
    cpu_pct: float
    runs_per_s: float
    other_cpu_pct: float
    other_runs_per_s: float


def _window(seconds: float, pid: int, other: int) -> _Window:
    """CPU (% of a core) and scheduling rate of ``pid`` and ``other`` over ``seconds``."""
    cpu0, runs0 = task_stats(pid)
    other_cpu0, other_runs0 = task_stats(other)
    started = time.monotonic()
    time.sleep(seconds)
    cpu1, runs1 = task_stats(pid)
    other_cpu1, other_runs1 = task_stats(other)
    wall = time.monotonic() - started
    return _Window(
        wall,
        (cpu1 - cpu0) / 1e7 / wall,
        (runs1 - runs0) / wall,
        (other_cpu1 - other_cpu0) / 1e7 / wall,
        (other_runs1 - other_runs0) / wall,
    )


# -- 6. growth ----------------------------------------------------------------------------


def _last_epoch(events: Path) -> int:
    """The epoch of the newest ``epoch`` event in events.jsonl (-1 before the first)."""
    try:
        with events.open("rb") as f:
            f.seek(max(0, size(events) - 8192))
            tail = f.read().split(b"\n")
    except FileNotFoundError:
        return -1
    for raw in reversed(tail):
        if b'"epoch"' in raw:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                event = json.loads(raw)
                if event["event"] == "epoch":
                    return int(event["epoch"])
    return -1


def bench_growth(bench: Bench) -> list[Figure]:
    """Supervisor RSS and CPU per epoch line after 1,000 and after ``growth_epochs`` epochs."""
    scale = bench.scale
    run = bench.fresh_dir("growth")
    fifo = run / "commands"
    os.mkfifo(fifo)
    period = 1000  # one plateau (and so one trigger and one control-file version) per window
    child = [sys.executable, str(bench.scripts["growth_child"]), str(fifo), str(period), "6", SEED_LINE]
    events = run / "run" / "events.jsonl"
    emitted = 0
    with bench.spawn(bench.supervisor_argv(run, child), run) as proc:
        deadline = time.monotonic() + 60
        while True:  # the child opens the FIFO once the supervisor has started it
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the growth child never started; see " + str(run / "err")) from None
                time.sleep(0.01)
        os.set_blocking(fd, True)
        commands: IO[str] = os.fdopen(fd, "w", buffering=1)

        def advance(count: int, poll: float = 0.005) -> None:
            nonlocal emitted
            commands.write(f"{count}\n")
            emitted += count
            # Polling late only adds idle time to a window; the CPU figures come from schedstat.
            wait_until(lambda: _last_epoch(events) >= emitted - 1, RUN_TIMEOUT_S, f"epoch {emitted}", poll)

        def windows() -> list[float]:
            costs = []
            for _ in range(scale.growth_windows):
                cpu0, _ = task_stats(proc.pid)
                advance(period)
                costs.append((task_stats(proc.pid)[0] - cpu0) / period / 1e3)
            return costs

        sup = psutil.Process(proc.pid)
        advance(period)
        rss_early = sup.memory_info().rss
        early = windows()
        started = time.monotonic()
        advance(scale.growth_epochs - emitted, poll=0.05)
        bulk_s = time.monotonic() - started
        rss_late = sup.memory_info().rss
        late = windows()
        commands.write("0\n")
        commands.close()
        bench.check_exit(proc, run)
    versions = len(json.loads((run / "run" / "summary.json").read_text())["versions"])
    shutil.rmtree(run)
    early_us, late_us = statistics.median(early), statistics.median(late)
    n = f"{scale.growth_epochs:,}"
    return [
        Figure(
            "growth.cpu_per_epoch",
            f"supervisor CPU per epoch line after {n} epochs",
            late_us,
            "µs",
            early_us,
            "the same after 1,000 epochs",
            target="flat (ratio <= 1.25)",
            met=late_us <= 1.25 * early_us,
            details={
                "early_windows_us": early,
                "late_windows_us": late,
                "versions_written": versions,
                "bulk_epochs_per_s": (scale.growth_epochs - period * (1 + scale.growth_windows)) / bulk_s,
            },
        ),
        Figure(
            "growth.rss",
            f"supervisor RSS after {n} epochs",
            rss_late / 2**20,
            "MiB",
            rss_early / 2**20,
            "the same after 1,000 epochs",
            target="flat (ratio <= 1.10)",
            met=rss_late <= 1.10 * rss_early,
        ),
    ]


# -- 7. overhead on a real training -------------------------------------------------------


def bench_training(bench: Bench) -> list[Figure]:
    """The demo training's wall time, bare and under the supervisor, and the fixed cost."""
    epochs = str(bench.scale.training_epochs)
    demo = [sys.executable, "-m", "autotune_rt.demo.train", "--epochs", epochs, "--no_reload"]
    # Ten times the data: epochs of ~0.1 s instead of ~1 ms, still 30 epoch lines.
    heavy = [*demo, "--max_per_class", "6000"]
    commands = {"demo": demo, "heavy": heavy, "empty": ["true"]}
    times: dict[str, list[float]] = {}
    for _ in range(bench.scale.repeats):  # interleaved, so a noisy moment hits both alike
        for name, command in commands.items():
            for supervised in (False, True):
                run = bench.fresh_dir(f"train-{name}")
                argv = bench.supervisor_argv(run, command) if supervised else command
                started = time.perf_counter()
                with bench.spawn(argv, run) as proc:
                    bench.check_exit(proc, run)
                times.setdefault(f"{name}_{'sup' if supervised else 'bare'}", []).append(
                    time.perf_counter() - started
                )
    med = {k: statistics.median(v) for k, v in times.items()}
    raw = {f"{k}_s": v for k, v in times.items()}
    return [
        Figure(
            "training.demo",
            f"demo training ({epochs} epochs, --no_reload) under the supervisor, wall time",
            med["demo_sup"],
            "s",
            med["demo_bare"],
            "the same training run bare",
            details=raw | {"difference_s": med["demo_sup"] - med["demo_bare"]},
        ),
        Figure(
            "training.heavy",
            "the same with --max_per_class 6000 (epochs of ~0.1 s), wall time",
            med["heavy_sup"],
            "s",
            med["heavy_bare"],
            "the same training run bare",
            details={"difference_s": med["heavy_sup"] - med["heavy_bare"]},
        ),
        Figure(
            "training.fixed_cost",
            "supervisor start-up and shut-down around an empty child (`true`), wall time",
            med["empty_sup"],
            "s",
            med["empty_bare"],
            "`true` run bare",
            details={"difference_s": med["empty_sup"] - med["empty_bare"]},
        ),
    ]


BENCHMARKS: dict[str, Callable[[Bench], list[Figure]]] = {
    "throughput": bench_throughput,
    "parse": bench_parse,
    "latency": bench_latency,
    "client": bench_client,
    "idle": bench_idle,
    "growth": bench_growth,
    "training": bench_training,
}


# -- report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "tmp_filesystem": _filesystem(Path(tempfile.gettempdir())),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": commit or None,
    }


def _filesystem(path: Path) -> str:
    best, kind = "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, part.fstype
    return kind


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0 or 0.01 <= abs(value) < 1e6:
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.3g}"


def table(figures: Sequence[Figure], *, markdown: bool = False) -> str:
    """The figures as an aligned text table, or as a Markdown table (for docs/benchmarks.md)."""
    rows = [("figure", "value", "reference", "ratio", "target", "met?")]
    for f in figures:
        met = "—" if f.met is None else ("yes" if f.met else "NO")
        rows.append(
            (
                f"`{f.key}`" if markdown else f.key,
                f"{_fmt(f.value)} {f.unit}",
                f"{_fmt(f.reference)} {f.unit}" if f.reference is not None else "—",
                "—" if f.ratio is None else f"{f.ratio:.3g}x",
                f.target or "—",
                f"**{met}**" if markdown and f.met is False else met,
            )
        )
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description="Measure autotune-rt next to its physical references; see docs/benchmarks.md.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: about a minute")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only these: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=None, help="idle window (default 60; 10 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per supervised figure (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the figures here (default: docs/benchmarks.json, but only for a full run of everything)",
    )
    parser.add_argument(
        "--growth-epochs",
        type=int,
        default=None,
        help="epoch lines of the growth run (default 1,000,000; 30,000 with --quick)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the final table as Markdown")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (for inspection)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks, print the table, write the JSON; returns the exit code."""
    args = _parser().parse_args(argv)
    names = args.only or list(BENCHMARKS)
    scale = Scale.make(args.quick, args.idle_seconds, args.repeats, args.growth_epochs)
    json_path = args.json
    if json_path is None and not args.quick and args.only is None:
        json_path = DEFAULT_JSON
    info = machine()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="autotune-bench-"))
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    try:
        bench = Bench(scale, workdir)
        for name in names:
            t0 = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            produced = BENCHMARKS[name](bench)
            timings[name] = round(time.monotonic() - t0, 1)
            print(table(produced), file=sys.stderr, flush=True)
            figures += produced
    finally:
        if args.keep:
            print(f"[bench] work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(table(figures, markdown=args.markdown))
    report = {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": scale.quick,
        "scale": asdict(scale),
        "machine": info,
        "seconds": {"total": round(time.monotonic() - started, 1), **timings},
        "figures": [asdict(f) for f in figures],
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"[bench] wrote {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
