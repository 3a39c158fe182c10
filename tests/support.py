"""Shared helpers of the end-to-end and fault tests: real trainings in tmp_path, real CLI runs."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

REPO = Path(__file__).resolve().parents[1]

# A seed-style training: it reads the control file with the seed's own snippet (json +
# config.get), leaves stdout buffering alone, and its tail accuracy responds to lambda_col.
SEED_TRAIN = textwrap.dedent(
    """
    import argparse, json, os, time

    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--lambda_dol", type=float, default=0.5)
    p.add_argument("--lambda_col", type=float, default=0.3)
    p.add_argument("--lambda_hier", type=float, default=1.5)
    p.add_argument("--lambda_scl", type=float, default=0.2)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--epoch_time", type=float, default=0.02)
    args, _unknown = p.parse_known_args()

    class Model:
        pass

    args.model = Model()
    for name in ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl"):
        setattr(args.model, name, getattr(args, name))

    best = 0.0
    for epoch in range(args.epochs):
        config_file = os.environ.get("SEED_CONFIG_FILE", "/tmp/auto_tune_config.json")
        if os.path.exists(config_file):
            with open(config_file, "r") as f:
                config = json.load(f)
            args.model.lambda_dol = config.get("lambda_dol", args.model.lambda_dol)
            args.model.lambda_col = config.get("lambda_col", args.model.lambda_col)
            args.model.lambda_scl = config.get("lambda_scl", args.model.lambda_scl)
        time.sleep(args.epoch_time)
        tail = round(0.05 + 0.5 * args.model.lambda_col, 4)
        head = 0.7
        acc1 = round((head + tail) / 2 * min(1.0, (epoch + 1) / 3), 4)
        best = max(best, acc1)
        metrics = {"epoch": epoch, "ce": 1.2, "acc1": acc1, "head_acc": head, "tail_acc": tail,
                   "lambda_col": args.model.lambda_col}
        print(f"Epoch {epoch}[{args.epoch_time:.2f}s]: {metrics}")
    print(f"final best_metric: {best}")
    """
)

# The same training, wired through the client helper instead of the seed's snippet.
_SNIPPET = """\
    config_file = os.environ.get("SEED_CONFIG_FILE", "/tmp/auto_tune_config.json")
    if os.path.exists(config_file):
        with open(config_file, "r") as f:
            config = json.load(f)
        args.model.lambda_dol = config.get("lambda_dol", args.model.lambda_dol)
        args.model.lambda_col = config.get("lambda_col", args.model.lambda_col)
        args.model.lambda_scl = config.get("lambda_scl", args.model.lambda_scl)
"""
assert _SNIPPET in SEED_TRAIN and "\nbest = 0.0\n" in SEED_TRAIN
CLIENT_TRAIN = SEED_TRAIN.replace(_SNIPPET, "    reloader.apply(args.model, epoch=epoch)\n").replace(
    "\nbest = 0.0\n",
    "\nfrom autotune_rt.client import ConfigReloader\nreloader = ConfigReloader()\nbest = 0.0\n",
)


# The seed's command lines (seed-usage.zh.md), verbatim after `python auto_tune*.py`
# (split with shlex.split).
SEED_OPTIONS = """\
--base_cmd train.py --base_args --task ICL --model ResNet1D_MoE --dataset mp20
    --use_processed_npy --processed_data_dir /opt/data/private/xrd2c_data --dataset_name ccdc_sg
    --rule_matrix_path /opt/data/private/ICL/rule_matrix.csv --device 0 --loss_scheme scheme2
    --use_contrast_scheme2 --use_adamw --adjust_lr_strategy --epochs {epochs}
    --lambda_dol 0.5 --lambda_col 0.3 --lambda_hier 1.5 --lambda_scl 0.2
"""
SEED_REALTIME_OPTIONS = SEED_OPTIONS.format(epochs=200) + (
    "    --min_epochs 5 --patience 3 --check_interval 30.0 --config_file /tmp/auto_tune_config.json"
)
SEED_BATCH_OPTIONS = SEED_OPTIONS.format(epochs=50) + "    --max_trials 5 --min_epochs 10 --patience 5"


def write_script(directory: Path, name: str, source: str) -> Path:
    """Write a training script and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout importable, no PYTHONUNBUFFERED."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["LANG"] = "C.UTF-8"
    env.pop("LC_ALL", None)
    env.update(extra)
    return env


def run_cli(
    args: list[str], cwd: Path, *, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m autotune_rt <args>`` (or a seed script when args[0] ends in .py)."""
    if args and args[0].endswith(".py"):
        argv = [sys.executable, *args]
    else:
        argv = [sys.executable, "-m", "autotune_rt", *args]
    return subprocess.run(
        argv, cwd=cwd, env=env or cli_env(), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every event of ``events.jsonl`` (each line must be valid JSON)."""
    lines = (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll *predicate* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")


# -- the fault suite: measured CLI processes, events read while a run is live, tmpfs ------------

# Peak memory the supervisor may reach in any fault test: ~40 MiB is its normal size, so only
# a buffer that grows with the child's output can cross this.
MEMORY_BOUND = 200 << 20


@dataclass(frozen=True)
class Finished:
    """How a CLI process ended, with its resource usage as the kernel counted it.

    Attributes:
        returncode: As ``Popen`` reports it: negative means killed by that signal.
        stdout: What it wrote to its stdout (empty when the test gave it another sink).
        stderr: What it wrote to its stderr.
        maxrss: Peak resident memory in bytes of the process, or of its largest waited-for
            child if that was bigger (``wait4``'s ``ru_maxrss``).
        cpu_s: User plus system CPU seconds of the process and its waited-for children.
    """

    returncode: int
    stdout: bytes
    stderr: bytes
    maxrss: int
    cpu_s: float


def realtime_args(
    tmp_path: Path,
    *options: str,
    script: str = "train.py",
    script_args: Sequence[str] = (),
    config_file: Path | None = None,
    run_dir: Path | None = None,
) -> list[str]:
    """``realtime`` arguments; control file ``tmp_path/c.json`` and run directory ``tmp_path/run``
    unless given."""
    return [
        "realtime",
        "--config_file",
        str(config_file or tmp_path / "c.json"),
        "--run_dir",
        str(run_dir or tmp_path / "run"),
        *options,
        "--",
        sys.executable,
        script,
        *script_args,
    ]


class CliProcess:
    """A running ``python -m autotune_rt ...``: reaped with ``wait4``, killed if a test leaves early.

    stdout and stderr go to temporary files unless ``stdout`` names another sink, so a
    chatty run can never block on a pipe the test is not reading.

    Args:
        args: The arguments after ``python -m autotune_rt``.
        cwd: Working directory.
        env: Environment; ``cli_env()`` by default.
        stdout: A file object, ``subprocess.PIPE`` or ``subprocess.DEVNULL`` instead of a file.
        stderr: The same for stderr; ``subprocess.STDOUT`` shares stdout's sink.
    """

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        *,
        env: dict[str, str] | None = None,
        stdout: Any = None,
        stderr: Any = None,
    ) -> None:
        # Files, not pipes: a test that never reads them cannot make the run block.
        self._out = tempfile.TemporaryFile() if stdout is None else None  # noqa: SIM115 - closed in close()
        self._err = tempfile.TemporaryFile() if stderr is None else None  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autotune_rt", *args],
            cwd=cwd,
            env=env or cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._out if stdout is None else stdout,
            stderr=self._err if stderr is None else stderr,
        )
        self.pid = self.proc.pid
        self.finished: Finished | None = None

    def __enter__(self) -> CliProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_signal(self, sig: int) -> None:
        """Signal the supervisor (not its child)."""
        if self.finished is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 60.0) -> Finished:
        """Reap the process, polling; fail the test (after killing it) past ``timeout``."""
        if self.finished is not None:
            return self.finished
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"autotune-rt did not exit within {timeout}s")
            time.sleep(0.02)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
        self.finished = Finished(
            returncode=self.proc.returncode,
            stdout=_drain(self._out),
            stderr=_drain(self._err),
            maxrss=usage.ru_maxrss * 1024,  # KiB on Linux
            cpu_s=usage.ru_utime + usage.ru_stime,
        )
        return self.finished

    def close(self) -> None:
        """Kill the supervisor if it still runs (its child follows through PDEATHSIG) and reap it."""
        if self.finished is None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()
        for f in (self._out, self._err):
            if f is not None:
                f.close()


def _drain(f: IO[bytes] | None) -> bytes:
    if f is None:
        return b""
    f.seek(0)
    return f.read()


def run_measured(args: Sequence[str], cwd: Path, *, timeout: float = 60.0, **kwargs: Any) -> Finished:
    """Run ``python -m autotune_rt <args>`` to its end and return what the kernel measured."""
    with CliProcess(args, cwd, **kwargs) as cli:
        return cli.wait(timeout)


def events_so_far(run_dir: Path) -> list[dict[str, Any]]:
    """The events of a live run: a missing log or a line still being written is skipped."""
    try:
        text = (run_dir / "events.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def wait_event(
    run_dir: Path, kind: str, where: Callable[[dict[str, Any]], bool] = lambda e: True, timeout: float = 20.0
) -> dict[str, Any]:
    """Poll ``events.jsonl`` until an event ``kind`` matching ``where`` is logged; return it."""
    found: dict[str, Any] = wait_for(
        lambda: next((e for e in events_so_far(run_dir) if e["event"] == kind and where(e)), None), timeout
    )
    return found


def wait_log(run_dir: Path, needle: bytes, timeout: float = 20.0) -> bytes:
    """Poll ``train.log`` until it contains ``needle``; return the log."""

    def read() -> bytes | None:
        try:
            data = (run_dir / "train.log").read_bytes()
        except FileNotFoundError:
            return None
        return data if needle in data else None

    log: bytes = wait_for(read, timeout)
    return log


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped) is not alive."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def kill_leftovers(pids: Iterable[int]) -> None:
    """SIGKILL whichever of ``pids`` still run: cleanup after a test that found a survivor."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def temp_files(directory: Path) -> list[str]:
    """Temporary files a control-file writer left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@contextlib.contextmanager
def tiny_tmpfs(directory: Path, size: str = "64k") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` under ``directory`` (root only; skips the test otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = directory / "tmpfs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


@contextlib.contextmanager
def memory_dir(fallback: Path) -> Iterator[Path]:
    """A fresh directory in /dev/shm where there is one (fsync there costs nothing), else ``fallback``."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield fallback
        return
    directory = Path(tempfile.mkdtemp(prefix="autotune-test-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def other_uid() -> int:
    """A uid that is not ours, for files "owned by another user" (root only; skips otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    return 65534  # nobody


# A training that writes given pieces of output, each as one write; before each piece it
# waits until train.log holds everything written so far, so every piece reaches the
# supervisor as reads of its own and train.log must equal the pieces joined, in order.
REPLAY = """
import os, pickle, sys, time
pieces_path, log = sys.argv[1], sys.argv[2]
with open(pieces_path, "rb") as f:
    pieces = pickle.load(f)
written = 0
for stream, data in pieces:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if os.path.getsize(log) >= written:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    out = getattr(sys, stream).buffer
    out.write(data)
    out.flush()
    written += len(data)
"""


def replay_args(tmp_path: Path, pieces: Sequence[tuple[str, bytes]], *options: str) -> list[str]:
    """``realtime`` arguments for a training that replays ``(stream, bytes)`` pieces in order."""
    write_script(tmp_path, "train.py", REPLAY)
    (tmp_path / "pieces.pkl").write_bytes(pickle.dumps(list(pieces)))
    log = str(tmp_path / "run" / "train.log")
    return realtime_args(tmp_path, *options, script_args=[str(tmp_path / "pieces.pkl"), log])


def joined(pieces: Sequence[tuple[str, bytes]], stream: str | None = None) -> bytes:
    """The bytes of ``pieces`` (of one stream only, if given) in order."""
    return b"".join(data for name, data in pieces if stream is None or name == stream)


def processes_mentioning(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line contains ``marker``, e.g. a tmp_path."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        info = proc.info
        if info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(info["cmdline"] or ()):
            found.append(int(info["pid"]))
    return found


def strip_console(stderr: bytes) -> bytes:
    """*stderr* without the supervisor's own console lines (any language), wherever they landed."""
    from autotune_rt.console import MESSAGES

    patterns = []
    for texts in MESSAGES.values():
        for template in texts.values():
            parts = re.split(r"\{[^}]*\}", template)
            if not parts[0]:  # a leading placeholder is empty in realtime mode; a wildcard
                parts = parts[1:]  # at the start would be quadratic on a long line
            patterns.append("[^\n]*?".join(re.escape(part) for part in parts))
    # Tables and the demo story are printed in batch/demo mode only; realtime prints messages.
    console = re.compile(("(?:" + "|".join(patterns) + ")\n").encode())
    return console.sub(b"", stderr)
