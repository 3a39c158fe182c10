"""Spawn the training child, stream its output, and stop its whole process tree."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

import psutil  # type: ignore[import-untyped,unused-ignore]

from autotune_rt._streams import RECENT_LINES, LineSplitter, RecentLines, TerminalWriter
from autotune_rt.exceptions import LaunchError

__all__ = ["ChildProcess", "ExitStatus", "LineCallback", "TreeStats", "check_launchable"]

LineCallback = Callable[[str, bytes], None]
"""``(stream, line)``: stream is ``"stdout"`` or ``"stderr"``; line is raw, without ``b"\\n"``."""

_PR_SET_PDEATHSIG = 1
# How often to re-check processes we cannot wait on (leftovers, a tree being killed).
_POLL_S = 0.05
# SIGKILL cannot be caught, but a process in uninterruptible sleep (GPU driver, NFS) takes a moment.
_KILL_SETTLE_S = 2.0
# A terminal that falls this far behind loses output (train.log never does): bounded memory.
_TERMINAL_BUFFER_BYTES = 16 << 20
# Enough for a Python traceback in a crash report; each line keeps at most its last bytes.
_RECENT_LINE_BYTES = 4096
_DEFAULT_HINT = "check --base_cmd"


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the child ended.

    Attributes:
        returncode: As ``Popen`` reports it: negative means killed by that signal.
        signal_name: ``"SIGKILL"`` and so on when killed by a signal, else None.
    """

    returncode: int
    signal_name: str | None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Build the status for a ``Popen`` return code."""
        if returncode >= 0:
            return cls(returncode, None)
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return cls(returncode, name)

    @property
    def exit_code(self) -> int:
        """The shell's convention: the exit code, or 128+N for signal N."""
        return self.returncode if self.returncode >= 0 else 128 - self.returncode

    def describe(self) -> str:
        """One phrase for humans, e.g. ``"killed by SIGTERM (exit code 143)"``."""
        if self.signal_name is None:
            return f"exited with code {self.returncode}"
        return f"killed by {self.signal_name} (exit code {self.exit_code})"


@dataclass(frozen=True, slots=True)
class TreeStats:
    """One psutil sample of the child and all its descendants.

    Attributes:
        cpu_percent: Sum over the tree, 100 per busy core, since the previous sample
            (the first sample of a process reads 0.0).
        rss: Sum of resident memory in bytes (pages shared between processes count once each).
        nprocs: Number of live processes in the tree.
    """

    cpu_percent: float
    rss: int
    nprocs: int


def check_launchable(
    argv: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    hint: str = _DEFAULT_HINT,
) -> None:
    """Check that ``argv`` names an executable the way ``exec`` will look for it.

    Args:
        argv: The command and its arguments.
        cwd: The child's working directory (relative commands resolve against it).
        env: The child's environment (its ``PATH`` is searched); None for ours.
        hint: The fix to suggest, e.g. ``"check --base_cmd"``.

    Raises:
        LaunchError: One line naming the command and the fix.
    """
    if not argv:
        raise LaunchError(f"cannot start training command: the command is empty; {hint}")
    if cwd is not None and not os.path.isdir(cwd):
        raise LaunchError(
            f"cannot start training command: working directory {str(cwd)!r} not found; "
            "create it or fix the working directory"
        )
    cmd = argv[0]
    if os.sep in cmd:
        candidates = [cmd if cwd is None else os.path.join(cwd, cmd)]
    else:
        candidates = [os.path.join(d, cmd) for d in os.get_exec_path(dict(env) if env is not None else None)]
    not_executable = None
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return
            not_executable = not_executable or path
    if not_executable is not None:
        raise LaunchError(
            f"cannot start training command: {cmd!r} is not executable; "
            f"run `chmod +x {not_executable}` or {hint}"
        )
    if len(candidates) == 1 and os.path.isdir(candidates[0]):
        raise LaunchError(f"cannot start training command: {cmd!r} is a directory; {hint}")
    raise LaunchError(f"cannot start training command: {cmd!r} not found; {hint}")


def _launch_message(cmd: str, exc: OSError, cwd: str | Path | None, hint: str) -> str:
    if cwd is not None and exc.filename is not None and os.fspath(exc.filename) == os.fspath(cwd):
        return f"cannot start training command: working directory {str(cwd)!r}: {exc.strerror}; {hint}"
    if isinstance(exc, FileNotFoundError):
        return f"cannot start training command: {cmd!r} not found; {hint}"
    if isinstance(exc, PermissionError):
        return f"cannot start training command: {cmd!r} is not executable; run `chmod +x {cmd}` or {hint}"
    return f"cannot start training command: {cmd!r}: {exc.strerror or exc}; {hint}"


@functools.cache
def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]  # type: ignore[attr-defined]
    prctl.restype = ctypes.c_int  # type: ignore[attr-defined]
    return prctl


def _pdeathsig_preexec(sig: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send ``sig`` to the child when we die."""
    if sig is None:
        return None
    # Resolved before the fork: between fork and exec only async-signal-safe work is sound.
    prctl = _load_prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        # We died between fork and prctl: the signal will never come, so do not run at all.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _open_pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:  # old kernel, or already reaped
        return None
    return fd


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _alive(proc: Any) -> bool:
    """True while ``proc`` (a psutil.Process) runs; a zombie is dead."""
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _group_members(pgid: int) -> list[Any]:
    """Live processes whose process group is ``pgid``: found even after re-parenting."""
    me = os.getpid()
    members = []
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _kill(proc: Any) -> None:
    with contextlib.suppress(psutil.Error):
        proc.kill()  # psutil checks the create time first: a reused pid is left alone


async def _poll_until(done: Callable[[], bool], timeout: float, interval: float = _POLL_S) -> bool:
    """Poll ``done()`` until it holds or ``timeout`` passes; returns whether it held.

    For state no event reports: the life of a process we are not the parent of, or of a
    thread.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


class _PipeProtocol(asyncio.Protocol):
    def __init__(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self._on_data = on_data
        self._on_eof = on_eof
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._on_eof()
        finally:
            if not self.done.done():
                self.done.set_result(None)


@dataclass(slots=True)
class _Stream:
    name: str
    recent: RecentLines
    splitter: LineSplitter | None
    writer: TerminalWriter | None
    protocol: _PipeProtocol | None = None
    transport: asyncio.BaseTransport | None = None


# Linux's F_SETPIPE_SZ: a 1 MiB pipe lets a burst of output reach the supervisor in fewer,
# larger reads (the default 64 KiB fills in microseconds).
_F_SETPIPE_SZ = 1031
_PIPE_BYTES = 1 << 20


def _enlarge_pipe(pipe: IO[bytes] | None) -> None:
    """Ask for a bigger pipe buffer; the default works too, so any refusal is fine."""
    if pipe is not None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)


def _default_callback_error(exc: Exception) -> None:
    text = " ".join(str(exc).split())
    print(
        f"autotune-rt: line callback failed ({type(exc).__name__}: {text}); output keeps flowing",
        file=sys.stderr,
    )


def _resolve_sink(sink: IO[bytes] | Literal["terminal"] | None, stream: Any) -> IO[bytes] | None:
    if sink != "terminal":
        return sink
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()  # text the supervisor printed before comes first
    buffer: IO[bytes] | None = getattr(stream, "buffer", None)
    return buffer


class ChildProcess:
    """The training child: spawned in its own session, drained, echoed, logged and stopped.

    Output is read in large chunks (no line-length limit), appended to ``log_path`` as it
    arrives, copied to the terminal sinks through bounded writer threads, and split into
    lines for ``on_line``. Stopping signals the child's process group, then kills the group
    and every descendant seen (psutil), so nothing the training spawned outlives it.

    On Linux the child gets ``PR_SET_PDEATHSIG``: if the supervisor dies, even by SIGKILL, the
    kernel sends ``pdeathsig`` to the child. It reaches only the child, not grandchildren,
    and fires when the *thread* that spawned the child exits, so call :meth:`start` from a
    thread that lives as long as the child (the event loop's).

    Args:
        argv: The command and its arguments.
        env: The child's environment; None inherits ours.
        cwd: The child's working directory.
        log_path: File that receives every byte of both streams (append mode).
        stdout_sink: Where the child's stdout is echoed; ``"terminal"`` is our own stdout at
            construction time, None does not echo.
        stderr_sink: The same for stderr.
        on_line: Called with each complete line; it runs on the event loop, so keep it quick.
        line_needles: When given, only lines containing one of these bytes reach ``on_line``.
        max_line_bytes: Longer lines are echoed and logged but not handed to ``on_line``.
        pdeathsig: Signal for the child when the supervisor dies; None disables it.
        leftover_grace: After the child exits, seconds its process group gets between
            SIGTERM and SIGKILL (and the pipes get to reach end of file).
        on_callback_error: Called with each exception ``on_line`` raises; the default
            prints the first one as one line on stderr.
        terminal_buffer_bytes: Output a terminal may fall behind by before it is dropped.
        terminal_flush_timeout: Seconds :meth:`wait` lets the terminals catch up at the end.
        launch_hint: The fix a :class:`LaunchError` suggests.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: Path | None = None,
        stdout_sink: BinaryIO | Literal["terminal"] | None = "terminal",
        stderr_sink: BinaryIO | Literal["terminal"] | None = "terminal",
        on_line: LineCallback | None = None,
        line_needles: tuple[bytes, ...] = (),
        max_line_bytes: int = 1 << 16,
        pdeathsig: int | None = signal.SIGTERM,
        leftover_grace: float = 2.0,
        on_callback_error: Callable[[Exception], None] | None = None,
        terminal_buffer_bytes: int = _TERMINAL_BUFFER_BYTES,
        terminal_flush_timeout: float = 2.0,
        launch_hint: str = _DEFAULT_HINT,
    ) -> None:
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._log_path = log_path
        self._sinks = (_resolve_sink(stdout_sink, sys.stdout), _resolve_sink(stderr_sink, sys.stderr))
        self._on_line = on_line
        self._needles = tuple(n for n in line_needles if n)
        self._max_line_bytes = max_line_bytes
        self._pdeathsig = pdeathsig
        self._leftover_grace = leftover_grace
        self._on_callback_error = on_callback_error
        self._terminal_buffer_bytes = terminal_buffer_bytes
        self._terminal_flush_timeout = terminal_flush_timeout
        self._launch_hint = launch_hint

        self.pid: int | None = None
        self.bytes_out = 0
        self.lines_out = 0
        self.last_output_at = time.monotonic()
        self.callback_errors = 0
        self.log_error: OSError | None = None

        self._recent: collections.deque[bytes] = collections.deque(maxlen=RECENT_LINES)
        self._streams: list[_Stream] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._root: Any = None
        self._known: dict[int, Any] = {}
        self._cpu_cache: dict[int, Any] = {}
        self._exit_status: ExitStatus | None = None
        self._exit_task: asyncio.Task[ExitStatus] | None = None
        self._finish_task: asyncio.Task[ExitStatus] | None = None
        self._terminate_task: asyncio.Task[ExitStatus] | None = None
        self._finished = False

    # -- public state -------------------------------------------------------------------

    @property
    def dropped_terminal_bytes(self) -> int:
        """Bytes not echoed because a terminal was too slow or closed (train.log has them)."""
        return sum(s.writer.dropped for s in self._streams if s.writer is not None)

    @property
    def too_long_lines(self) -> int:
        """Lines holding a needle that were longer than ``max_line_bytes``, never handed over."""
        return sum(s.splitter.too_long for s in self._streams if s.splitter is not None)

    @property
    def exit_status(self) -> ExitStatus | None:
        """The child's status once it has exited (its output may still be draining)."""
        return self._exit_status

    def last_lines(self, n: int = 20) -> list[str]:
        """The last ``n`` output lines of both streams, decoded, as a terminal shows them.

        Args:
            n: How many lines (at most 100 are kept).

        Returns:
            The lines, oldest first; a ``\\r`` redraw keeps only its last segment.
        """
        if n <= 0:
            return []
        lines = list(self._recent)[-n:]
        return [line.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1] for line in lines]

    def tree_stats(self) -> TreeStats | None:
        """Sample CPU, memory and process count of the child's tree; None once it is gone."""
        if self._root is None or self._exit_status is not None:
            return None
        try:
            kids = self._root.children(recursive=True)
        except psutil.Error:
            return None
        cpu, rss, cache = 0.0, 0, {}
        for fresh in [self._root, *kids]:
            cached = self._cpu_cache.get(fresh.pid)
            # cpu_percent compares with the previous call on the same Process object.
            proc = cached if cached is not None and cached == fresh else fresh
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
            cache[proc.pid] = proc
        self._cpu_cache = cache
        self._remember(kids)
        if not cache:
            return None
        return TreeStats(cpu_percent=cpu, rss=rss, nprocs=len(cache))

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child and begin draining its output.

        Raises:
            LaunchError: The command is missing or not executable (nothing was started).
            RuntimeError: Already started.
        """
        if self._proc is not None:
            raise RuntimeError("ChildProcess.start() called twice")
        check_launchable(self._argv, cwd=self._cwd, env=self._env, hint=self._launch_hint)
        self._open_log()
        self._streams = [
            self._make_stream(name, sink)
            for name, sink in zip(("stdout", "stderr"), self._sinks, strict=True)
        ]
        try:
            # Popen, not create_subprocess_exec: asyncio's wait() would hang while a grandchild
            # holds the pipes. fork+exec is quick; the pipes and the exit are watched below.
            proc = subprocess.Popen(  # noqa: ASYNC220
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(self._pdeathsig),
            )
        except OSError as exc:
            self._close_log()
            raise LaunchError(_launch_message(self._argv[0], exc, self._cwd, self._launch_hint)) from exc
        except subprocess.SubprocessError as exc:
            self._close_log()
            raise LaunchError(f"cannot start training command: {exc}; {self._launch_hint}") from exc
        self._proc = proc
        self.pid = proc.pid
        self.last_output_at = time.monotonic()
        for pipe in (proc.stdout, proc.stderr):
            _enlarge_pipe(pipe)
        try:
            self._root = psutil.Process(proc.pid)
            self._cpu_cache = {proc.pid: self._root}
            self._root.cpu_percent(None)  # the first reading is a baseline
        except psutil.Error:
            pass
        try:
            for stream in self._streams:
                if stream.writer is not None:
                    stream.writer.start()
            for stream, pipe in zip(self._streams, (proc.stdout, proc.stderr), strict=True):
                await self._connect(stream, pipe)
            self._exit_task = asyncio.get_running_loop().create_task(self._watch_exit(proc))
        except BaseException:
            self._abort()
            raise

    async def wait(self) -> ExitStatus:
        """Wait until the child has exited and both pipes are drained.

        Leftovers of the child's process group get SIGTERM, then SIGKILL after
        ``leftover_grace``; pipes still held open after that are closed. Cancelling this
        call leaves the child running.

        Returns:
            The child's exit status.
        """
        self._require_started()
        if self._exit_task is None and self._exit_status is not None:  # start() was interrupted
            return self._exit_status
        if self._finish_task is None:
            self._finish_task = asyncio.get_running_loop().create_task(self._finish())
        return await asyncio.shield(self._finish_task)

    async def terminate(self, grace: float, sig: int = signal.SIGTERM) -> ExitStatus:
        """Stop the tree: ``sig`` once to the process group, SIGKILL after ``grace``.

        The child and its descendants share the grace period; whatever is alive at its end
        is killed (group, every descendant seen, group members re-parented elsewhere). A
        second call while one runs waits for the first.

        Args:
            grace: Seconds the tree gets to exit after ``sig``.
            sig: The signal to forward (SIGTERM, SIGINT, SIGHUP...).

        Returns:
            The child's exit status.
        """
        self._require_started()
        if self._terminate_task is None:
            self._terminate_task = asyncio.get_running_loop().create_task(self._terminate(grace, sig))
        return await asyncio.shield(self._terminate_task)

    async def kill_now(self) -> ExitStatus:
        """SIGKILL the group and every descendant at once (the second Ctrl-C)."""
        self._require_started()
        if not self._finished:
            await self._kill_tree()
        return await self.wait()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group; a no-op once it is gone."""
        if self._proc is None or self._finished:
            return
        if not self._signal_group(sig) and self._exit_status is None:
            with contextlib.suppress(OSError):
                self._proc.send_signal(sig)  # it left its process group

    # -- internals ----------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._proc is None:
            raise RuntimeError("ChildProcess.start() must be awaited first")

    def _open_log(self) -> None:
        if self._log_path is None:
            return
        try:
            self._log = open(self._log_path, "ab", buffering=0)  # noqa: SIM115 - closed in _finish
        except OSError as exc:
            raise LaunchError(
                f"cannot open the training log {str(self._log_path)!r}: {exc.strerror}; "
                "choose a writable run directory"
            ) from exc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _make_stream(self, name: str, sink: IO[bytes] | None) -> _Stream:
        splitter = None
        if self._on_line is not None:
            on_line = self._on_line

            def emit(line: bytes) -> None:
                try:
                    on_line(name, line)
                except Exception as exc:  # the tuner must never stop the training's output
                    self._callback_failed(exc)

            splitter = LineSplitter(emit, self._needles, self._max_line_bytes)
        writer = None
        if sink is not None:
            where = str(self._log_path) if self._log_path is not None else "the training log"
            writer = TerminalWriter(sink, name, self._terminal_buffer_bytes, where)
        return _Stream(name, RecentLines(self._recent, _RECENT_LINE_BYTES), splitter, writer)

    def _callback_failed(self, exc: Exception) -> None:
        self.callback_errors += 1
        try:
            if self._on_callback_error is not None:
                self._on_callback_error(exc)
            elif self.callback_errors == 1:
                _default_callback_error(exc)
        except Exception:  # a failing error hook must not stop the draining either
            pass

    def _on_chunk(self, stream: _Stream, data: bytes) -> None:
        self.bytes_out += len(data)
        self.lines_out += data.count(b"\n")
        self.last_output_at = time.monotonic()
        self._write_log(data)
        if stream.writer is not None:
            stream.writer.put(data)
        stream.recent.feed(data)
        if stream.splitter is not None:
            stream.splitter.feed(data)

    def _on_eof(self, stream: _Stream) -> None:
        if stream.recent.close():
            self.lines_out += 1
        if stream.splitter is not None:
            stream.splitter.close()

    def _write_log(self, data: bytes) -> None:
        if self._log is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[self._log.write(view) or 0 :]
        except OSError as exc:  # disk full: keep the training and the terminal going
            if self.log_error is None:
                self.log_error = exc
                print(f"autotune-rt: cannot write {self._log_path}: {exc.strerror}", file=sys.stderr)

    async def _connect(self, stream: _Stream, pipe: IO[bytes] | None) -> None:
        def protocol() -> _PipeProtocol:
            return _PipeProtocol(lambda data: self._on_chunk(stream, data), lambda: self._on_eof(stream))

        loop = asyncio.get_running_loop()
        stream.transport, stream.protocol = await loop.connect_read_pipe(protocol, pipe)

    async def _watch_exit(self, proc: subprocess.Popen[bytes]) -> ExitStatus:
        returncode = proc.poll()
        pidfd = _open_pidfd(proc.pid) if returncode is None else None
        if pidfd is not None:
            loop = asyncio.get_running_loop()
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, _resolve, readable)
            try:
                await readable
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        await _poll_until(lambda: proc.poll() is not None, timeout=float("inf"))  # without pidfd
        returncode = proc.poll()
        assert returncode is not None
        self._exit_status = ExitStatus.from_returncode(returncode)
        return self._exit_status

    def _signal_group(self, sig: int) -> bool:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _remember(self, procs: list[Any]) -> None:
        """Keep descendants seen alive: once re-parented they are no longer our children."""
        merged = {**self._known, **{p.pid: p for p in procs}}
        self._known = {pid: p for pid, p in merged.items() if _alive(p)}

    def _remember_descendants(self) -> None:
        if self._root is None or self._exit_status is not None:
            return
        with contextlib.suppress(psutil.Error):
            self._remember(self._root.children(recursive=True))

    def _leftovers(self) -> list[Any]:
        assert self._proc is not None
        group = _group_members(self._proc.pid)
        seen = {p.pid for p in group}
        return group + [p for p in self._known.values() if p.pid not in seen and _alive(p)]

    def _tree_alive(self) -> bool:
        return self._exit_status is None or bool(self._leftovers())

    async def _wait_exited(self, timeout: float) -> None:
        assert self._exit_task is not None
        await asyncio.wait([self._exit_task], timeout=max(0.0, timeout))

    async def _kill_tree(self) -> None:
        """SIGKILL everything now, then give the kernel a moment to take them down."""
        assert self._proc is not None
        self._remember_descendants()
        self._signal_group(signal.SIGKILL)
        if self._exit_status is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
        for proc in self._leftovers():
            _kill(proc)
        await self._wait_exited(_KILL_SETTLE_S)
        await _poll_until(lambda: not self._leftovers(), _KILL_SETTLE_S)

    async def _terminate(self, grace: float, sig: int) -> ExitStatus:
        if self._exit_status is None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            self._remember_descendants()  # before the signal: orphans are not children
            self.send_signal(sig)
            await self._wait_exited(grace)
            if self._exit_status is not None:  # the rest of the tree gets the rest of the grace
                await _poll_until(lambda: not self._leftovers(), deadline - loop.time())
            if self._tree_alive():
                await self._kill_tree()
        status = await self.wait()
        self._known.clear()
        return status

    async def _finish(self) -> ExitStatus:
        assert self._exit_task is not None
        try:
            status = await self._exit_task
            await self._settle()
            await self._close_pipes()
            await self._flush_terminals()
        finally:
            for stream in self._streams:
                if stream.transport is not None:
                    stream.transport.close()
                if stream.writer is not None:
                    stream.writer.stop()
            self._close_log()
            self._finished = True
            if self._terminate_task is None:  # terminate() still needs the descendants it saw
                self._known.clear()
            self._cpu_cache.clear()
        return status

    async def _wait_drained(self, timeout: float) -> None:
        pending = [
            s.protocol.done for s in self._streams if s.protocol is not None and not s.protocol.done.done()
        ]
        if pending and timeout > 0:
            await asyncio.wait(pending, timeout=timeout)

    async def _settle(self) -> None:
        """After the child exited: stop its process group's leftovers, let the pipes reach EOF."""
        assert self._proc is not None
        pgid = self._proc.pid
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._leftover_grace
        if _group_members(pgid):
            self._signal_group(signal.SIGTERM)
            if not await _poll_until(lambda: not _group_members(pgid), self._leftover_grace):
                self._signal_group(signal.SIGKILL)
                for proc in _group_members(pgid):
                    _kill(proc)
                await _poll_until(lambda: not _group_members(pgid), _KILL_SETTLE_S)
                await self._wait_drained(_KILL_SETTLE_S)  # the killed held the pipes
                return
        # Whatever still holds the pipes now is outside the group: it gets the same grace.
        await self._wait_drained(deadline - loop.time())

    async def _close_pipes(self) -> None:
        """Close pipes something outside the group still holds; the protocols see EOF."""
        for stream in self._streams:
            if stream.transport is not None and not stream.transport.is_closing():
                stream.transport.close()
        await self._wait_drained(_KILL_SETTLE_S)

    async def _flush_terminals(self) -> None:
        writers = [s.writer for s in self._streams if s.writer is not None]
        for writer in writers:
            writer.stop()
        # Polled, not joined: a terminal nobody reads must not block the event loop.
        await _poll_until(lambda: not any(w.is_alive() for w in writers), self._terminal_flush_timeout, 0.01)

    def _abort(self) -> None:
        """Start was interrupted: kill what we started, synchronously, leaving nothing behind."""
        proc = self._proc
        assert proc is not None
        self._signal_group(signal.SIGKILL)
        proc.kill()
        proc.wait()
        self._exit_status = ExitStatus.from_returncode(proc.returncode)
        for stream in self._streams:
            if stream.transport is not None:
                stream.transport.close()
            if stream.writer is not None:
                stream.writer.stop()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self._close_log()
        self._finished = True
