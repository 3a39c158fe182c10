"""Tests for autotune_rt._process: real children, real pipes, real signals, real files."""

from __future__ import annotations

import asyncio
import collections
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune_rt._process import ChildProcess, ExitStatus, check_launchable
from autotune_rt._streams import LineSplitter, RecentLines
from autotune_rt.exceptions import LaunchError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
T = TypeVar("T")

# The hostile output of a real training, piece by piece (one write + flush each).
PROGRESS = b"".join(b"\r[%-50s] %3d%%" % (b"#" * (i % 51), i % 101) for i in range(7200))
HOSTILE = [
    b"first line\n",
    b"y" * (3 << 20) + b"\n",
    b"after the big line\n",
    PROGRESS,  # about 400 KiB of redraws and no newline
    b"\n",
    b"bad \xff\xfe utf-8\n",
    b"caf\xc3",  # a multi-byte character cut in two writes
    b"\xa9 split\n",
    b"\x1b[1;31mred\x1b[0m\n",
    b"Epoch 3: {'acc1': 0.5}\n",
    b"last line without newline",
]
HOSTILE_LINES = [
    b"first line",
    b"after the big line",
    b"bad \xff\xfe utf-8",
    b"caf\xc3\xa9 split",
    b"\x1b[1;31mred\x1b[0m",
    b"Epoch 3: {'acc1': 0.5}",
    b"last line without newline",
]

WRITE_PIECES = """
    import pickle, sys, time
    stream = getattr(sys, sys.argv[1]).buffer
    with open(sys.argv[2], "rb") as f:
        pieces = pickle.load(f)
    for piece in pieces:
        stream.write(piece)
        stream.flush()
        time.sleep(0.01)  # separate writes reach the pipe separately
"""


def script(tmp_path: Path, source: str, *args: str) -> list[str]:
    """Write a child script under tmp_path and return the argv that runs it."""
    path = tmp_path / f"child_{len(list(tmp_path.glob('child_*.py')))}.py"
    path.write_text(textwrap.dedent(source))
    return [PY, str(path), *args]


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def gone(pid: int) -> bool:
    """A process that no longer exists, or a zombie, is gone."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def poll(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Lines:
    """An on_line callback that records lines and lets a test wait for one."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, stream: str, line: bytes) -> None:
        self.got.append((stream, line))

    async def wait_for(self, prefix: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in self.got:
                if line.startswith(prefix):
                    return line
            await asyncio.sleep(0.01)
        raise AssertionError(f"no line starting with {prefix!r} in {self.got!r}")


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        yield out, err


# -- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_hostile_output_passes_through_byte_for_byte(
    tmp_path: Path, sinks: tuple[Any, Any], stream: str
) -> None:
    """A 3 MiB line, 400 KiB of \\r redraws, bad UTF-8, a split character, ANSI codes and an
    unterminated last line reach the terminal and train.log unchanged, and on_line gets
    every line except the oversized ones."""
    pieces = tmp_path / "pieces.pkl"
    pieces.write_bytes(pickle.dumps(HOSTILE))
    lines = Lines()
    child = ChildProcess(
        script(tmp_path, WRITE_PIECES, stream, str(pieces)),
        log_path=tmp_path / "train.log",
        stdout_sink=sinks[0],
        stderr_sink=sinks[1],
        on_line=lines,
    )

    async def main() -> ExitStatus:
        await child.start()
        return await child.wait()

    assert run(main()).returncode == 0
    expected = b"".join(HOSTILE)
    quiet = "stderr" if stream == "stdout" else "stdout"
    assert (tmp_path / stream[3:]).read_bytes() == expected
    assert (tmp_path / quiet[3:]).read_bytes() == b""
    assert (tmp_path / "train.log").read_bytes() == expected
    # A \r ends a line for on_line too (each progress-bar redraw is one); the 3 MiB line is skipped.
    wanted = [ln for ln in expected.replace(b"\r", b"\n").split(b"\n") if len(ln) <= 1 << 16]
    assert lines.got == [(stream, line) for line in wanted]
    assert [line for _, line in lines.got if line in HOSTILE_LINES] == HOSTILE_LINES
    assert child.bytes_out == len(expected)
    assert child.lines_out == expected.count(b"\n") + 1
    assert child.last_lines(2) == ["Epoch 3: {'acc1': 0.5}", "last line without newline"]
    assert child.dropped_terminal_bytes == 0


def test_needles_select_the_lines_handed_to_on_line(tmp_path: Path) -> None:
    """With line_needles, only lines holding one of them reach on_line, in order."""
    lines = Lines()
    argv = script(
        tmp_path,
        """
        for i in range(2000):
            print(f"step {i} loss=1.0")
            if i % 500 == 0:
                print(f"Epoch {i}: {{'acc1': 0.5}}")
        print("val_acc=0.7", end="")
        """,
    )
    child = ChildProcess(
        argv, stdout_sink=None, stderr_sink=None, on_line=lines, line_needles=(b"Epoch", b"val_")
    )

    async def main() -> None:
        await child.start()
        await child.wait()

    run(main())
    expected = [f"Epoch {i}: {{'acc1': 0.5}}".encode() for i in range(0, 2000, 500)] + [b"val_acc=0.7"]
    assert [line for _, line in lines.got] == expected


@pytest.mark.parametrize("noisy", ["stdout", "stderr"])
def test_ten_megabytes_on_one_stream_while_the_other_is_idle(
    tmp_path: Path, sinks: tuple[Any, Any], noisy: str
) -> None:
    """10 MB on one stream with the other idle drains both without deadlock."""
    quiet = "stderr" if noisy == "stdout" else "stdout"
    argv = script(
        tmp_path,
        f"""
        import sys
        block = bytes(range(256)) * 256
        for _ in range(160):
            sys.{noisy}.buffer.write(block)
        sys.{noisy}.buffer.flush()
        sys.{quiet}.buffer.write(b"done\\n")
        """,
    )
    child = ChildProcess(argv, log_path=tmp_path / "train.log", stdout_sink=sinks[0], stderr_sink=sinks[1])

    async def main() -> ExitStatus:
        await child.start()
        return await child.wait()

    assert run(main()).returncode == 0
    assert (tmp_path / noisy[3:]).read_bytes() == bytes(range(256)) * 256 * 160
    assert (tmp_path / quiet[3:]).read_bytes() == b"done\n"
    assert (tmp_path / "train.log").stat().st_size == 256 * 256 * 160 + 5


FOUR_MIB = """
    import sys
    for _ in range(64):
        sys.stdout.buffer.write(b"z" * 65535 + b"\\n")
    sys.stdout.buffer.write(b"end\\n")
"""
FOUR_MIB_SIZE = (4 << 20) + 4


def writer_threads_done() -> bool:
    return not any(t.name.startswith("autotune-rt-") and t.is_alive() for t in threading.enumerate())


def test_a_terminal_nobody_reads_does_not_stall_the_child_or_the_log(tmp_path: Path) -> None:
    """A sink pipe that is never read: the child finishes, train.log is complete, output is dropped."""
    read_end, write_end = os.pipe()
    try:
        with open(write_end, "wb") as sink:
            child = ChildProcess(
                script(tmp_path, FOUR_MIB),
                log_path=tmp_path / "train.log",
                stdout_sink=sink,
                stderr_sink=None,
                terminal_buffer_bytes=256 << 10,
                terminal_flush_timeout=0.1,
            )

            async def main() -> ExitStatus:
                await child.start()
                return await child.wait()

            assert run(main()).returncode == 0
            os.close(read_end)  # EPIPE frees the writer thread blocked on the full pipe
            read_end = -1
            assert poll(writer_threads_done)
    finally:
        if read_end >= 0:
            os.close(read_end)
    assert (tmp_path / "train.log").stat().st_size == FOUR_MIB_SIZE
    assert child.dropped_terminal_bytes > 0


def test_a_closed_terminal_is_dropped_silently(tmp_path: Path) -> None:
    """A sink whose reader is gone (EPIPE, `| head -1`): the child finishes and train.log is complete."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as sink:
        child = ChildProcess(
            script(tmp_path, FOUR_MIB), log_path=tmp_path / "train.log", stdout_sink=sink, stderr_sink=None
        )

        async def main() -> ExitStatus:
            await child.start()
            return await child.wait()

        assert run(main()).returncode == 0
    assert (tmp_path / "train.log").stat().st_size == FOUR_MIB_SIZE
    assert child.dropped_terminal_bytes > 0


def test_a_terminal_that_falls_behind_gets_a_notice_when_it_catches_up(tmp_path: Path) -> None:
    """Output dropped for a slow terminal is announced on it once it has drained."""
    read_end, write_end = os.pipe()
    received = bytearray()

    def reader() -> None:
        while data := os.read(read_end, 1 << 16):
            received.extend(data)

    thread = threading.Thread(target=reader)

    def on_line(stream: str, line: bytes) -> None:
        thread.start()  # the terminal stays stuck until all output has been produced

    with open(write_end, "wb") as sink:
        child = ChildProcess(
            script(tmp_path, FOUR_MIB),
            log_path=tmp_path / "train.log",
            stdout_sink=sink,
            stderr_sink=None,
            on_line=on_line,
            line_needles=(b"end",),
            terminal_buffer_bytes=256 << 10,
            terminal_flush_timeout=30,
        )

        async def main() -> ExitStatus:
            await child.start()
            return await child.wait()

        assert run(main()).returncode == 0
    thread.join(10)
    os.close(read_end)
    dropped = child.dropped_terminal_bytes
    notice = f"\n[autotune-rt: {dropped} bytes not shown on the terminal; see {tmp_path / 'train.log'}]\n"
    assert dropped > 0
    assert received.endswith(notice.encode())
    assert len(received) == FOUR_MIB_SIZE - dropped + len(notice)


# -- exit status ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "returncode", "exit_code", "name", "text"),
    [
        ("sys.exit(0)", 0, 0, None, "exited with code 0"),
        ("sys.exit(3)", 3, 3, None, "exited with code 3"),
        ("os.kill(os.getpid(), signal.SIGKILL)", -9, 137, "SIGKILL", "killed by SIGKILL (exit code 137)"),
        ("os.kill(os.getpid(), signal.SIGTERM)", -15, 143, "SIGTERM", "killed by SIGTERM (exit code 143)"),
        (
            "signal.signal(signal.SIGINT, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGINT)",
            -2,
            130,
            "SIGINT",
            "killed by SIGINT (exit code 130)",
        ),
    ],
)
def test_exit_status_reports_code_and_signal(
    tmp_path: Path, code: str, returncode: int, exit_code: int, name: str | None, text: str
) -> None:
    """Exit codes and deaths by signal come back with the shell's exit code and the signal name."""
    argv = [PY, "-c", f"import os, signal, sys, time\n{code}\ntime.sleep(30)"]
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None)

    async def main() -> ExitStatus:
        await child.start()
        return await child.wait()

    status = run(main())
    assert (status.returncode, status.exit_code, status.signal_name) == (returncode, exit_code, name)
    assert status.describe() == text
    assert child.exit_status == status


# -- stopping -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_terminate_forwards_the_signal_once(tmp_path: Path, sig: signal.Signals) -> None:
    """terminate() delivers its signal exactly once, and the child's own exit code comes back."""
    argv = script(
        tmp_path,
        f"""
        import signal, time
        got = []
        signal.signal({int(sig)}, lambda *_: got.append(1))
        print("ready", flush=True)
        while not got:
            time.sleep(0.01)
        time.sleep(0.3)  # a second signal would arrive in here
        print(f"signals={{len(got)}}", flush=True)
        raise SystemExit(7)
        """,
    )
    lines = Lines()
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None, on_line=lines)

    async def main() -> ExitStatus:
        await child.start()
        await lines.wait_for(b"ready")
        return await child.terminate(grace=10, sig=sig)

    assert run(main()).returncode == 7
    assert (("stdout", b"signals=1")) in lines.got


IGNORES_SIGTERM = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(60)
"""


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    """A child ignoring SIGTERM is SIGKILLed once the grace period is over."""
    argv = script(tmp_path, IGNORES_SIGTERM)
    lines = Lines()
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None, on_line=lines)

    async def main() -> ExitStatus:
        await child.start()
        await lines.wait_for(b"ready")
        return await child.terminate(grace=0.3)

    status = run(main())
    assert (status.signal_name, status.exit_code) == ("SIGKILL", 137)
    assert child.pid is not None and gone(child.pid)


SPAWNS_GRANDCHILDREN = """
    import os, time
    pids = []
    for detach in (False, True):
        pid = os.fork()
        if pid == 0:
            if detach:
                os.setsid()  # leaves the process group: only psutil can still find it
            time.sleep(60)
            os._exit(0)
        pids.append(pid)
    print("pids", *pids, flush=True)
    time.sleep(60)
"""


def test_terminate_leaves_no_descendant_alive(tmp_path: Path) -> None:
    """Grandchildren, in the process group or in a session of their own, die with the child."""
    lines = Lines()
    child = ChildProcess(
        script(tmp_path, SPAWNS_GRANDCHILDREN), stdout_sink=None, stderr_sink=None, on_line=lines
    )

    async def main() -> list[int]:
        await child.start()
        pids = [int(p) for p in (await lines.wait_for(b"pids")).split()[1:]]
        assert not any(gone(pid) for pid in pids)
        await child.terminate(grace=0.5)
        return pids

    pids = run(main())
    assert child.pid is not None
    assert all(gone(pid) for pid in [child.pid, *pids])


def test_kill_now_escalates_a_pending_terminate(tmp_path: Path) -> None:
    """A second Ctrl-C (kill_now) during a long grace period kills the tree at once."""
    lines = Lines()
    argv = script(tmp_path, IGNORES_SIGTERM)
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None, on_line=lines)

    async def main() -> tuple[ExitStatus, ExitStatus]:
        await child.start()
        await lines.wait_for(b"ready")
        polite = asyncio.ensure_future(child.terminate(grace=60))
        await asyncio.sleep(0)  # let terminate() send its SIGTERM
        killed = await asyncio.wait_for(child.kill_now(), 10)
        return killed, await asyncio.wait_for(polite, 10)

    killed, polite = run(main())
    assert killed == polite == ExitStatus(-9, "SIGKILL")


def test_cancelling_start_leaves_no_child(tmp_path: Path) -> None:
    """Ctrl-C while the child is still starting (start() cancelled) kills what was spawned."""
    child = ChildProcess(script(tmp_path, IGNORES_SIGTERM), stdout_sink=None, stderr_sink=None)

    async def main() -> ExitStatus:
        task = asyncio.ensure_future(child.start())
        await asyncio.sleep(0)  # start() has spawned the child and awaits its pipes
        assert child.pid is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await child.wait()

    assert run(main()).signal_name == "SIGKILL"
    assert child.pid is not None and gone(child.pid)


def test_a_grandchild_holding_the_pipes_does_not_hang_wait(tmp_path: Path) -> None:
    """After the child exits, a grandchild that ignores SIGTERM and keeps the pipes is killed."""
    argv = script(
        tmp_path,
        """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        print("grandchild", pid, flush=True)
        """,
    )
    lines = Lines()
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None, on_line=lines, leftover_grace=0.5)

    async def main() -> ExitStatus:
        await child.start()
        return await asyncio.wait_for(child.wait(), 0.5 + 5)

    assert run(main()).returncode == 0
    grandchild = int(lines.got[0][1].split()[1])
    assert gone(grandchild)


def test_pipes_held_outside_the_group_are_closed_after_the_grace(tmp_path: Path) -> None:
    """A detached grandchild (own session) keeping the pipes cannot hang wait(); it is not killed."""
    argv = script(
        tmp_path,
        """
        import os, time
        pid = os.fork()
        if pid == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        print("grandchild", pid, flush=True)
        """,
    )
    lines = Lines()
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None, on_line=lines, leftover_grace=0.3)

    async def main() -> ExitStatus:
        await child.start()
        return await asyncio.wait_for(child.wait(), 0.3 + 5)

    try:
        assert run(main()).returncode == 0
    finally:
        grandchild = int(lines.got[0][1].split()[1])
        os.kill(grandchild, signal.SIGKILL)


def test_the_child_dies_with_a_sigkilled_supervisor(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed supervisor's child is stopped by the kernel; the
    child's own children are not signalled and survive (what the docs must say)."""
    child_argv = script(
        tmp_path,
        """
        import os, time
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        print("grandchild", pid, flush=True)
        time.sleep(60)
        """,
    )
    supervisor = tmp_path / "supervisor.py"
    supervisor.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from autotune_rt._process import ChildProcess

            async def main():
                child = ChildProcess(
                    {child_argv!r},
                    stdout_sink=None,
                    stderr_sink=None,
                    on_line=lambda stream, line: print(line.decode(), flush=True),
                )
                await child.start()
                print("child", child.pid, flush=True)
                await child.wait()

            asyncio.run(main())
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([PY, str(supervisor)], stdout=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None
        pids = dict(proc.stdout.readline().decode().split() for _ in range(2))
        child, grandchild = int(pids["child"]), int(pids["grandchild"])
        assert not gone(child) and not gone(grandchild)
        proc.kill()
        proc.wait()
    try:
        assert poll(lambda: gone(child))
        assert not gone(grandchild)
    finally:
        for pid in (child, grandchild):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_send_signal_after_the_end_is_a_no_op(tmp_path: Path) -> None:
    """Signalling or waiting again once the child is gone is harmless and repeats the status."""
    child = ChildProcess([PY, "-c", "raise SystemExit(4)"], stdout_sink=None, stderr_sink=None)

    async def main() -> tuple[ExitStatus, ExitStatus, ExitStatus]:
        await child.start()
        first = await child.wait()
        child.send_signal(signal.SIGTERM)
        return first, await child.wait(), await child.terminate(grace=1)

    assert set(run(main())) == {ExitStatus(4, None)}


# -- launching ------------------------------------------------------------------------------


def test_a_missing_command_is_one_line_launch_error(tmp_path: Path) -> None:
    """A missing command is a one-line LaunchError naming it, and nothing is created."""
    for command in [str(tmp_path / "nope.py"), "autotune-rt-no-such-command"]:
        child = ChildProcess([command], log_path=tmp_path / "train.log", stdout_sink=None, stderr_sink=None)
        with pytest.raises(LaunchError) as info:
            run(child.start())
        assert str(info.value) == f"cannot start training command: {command!r} not found; check --base_cmd"
        assert not (tmp_path / "train.log").exists()


def test_a_file_that_is_not_executable_is_a_launch_error(tmp_path: Path) -> None:
    """A file without execute permission is a one-line LaunchError that names the fix."""
    path = tmp_path / "train.sh"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    with pytest.raises(LaunchError, match=r"'.*train\.sh' is not executable; run `chmod \+x .*train\.sh`"):
        run(ChildProcess([str(path)], stdout_sink=None, stderr_sink=None).start())


def test_check_launchable_follows_the_childs_path_and_cwd(tmp_path: Path) -> None:
    """Bare names are looked up in the child's PATH, relative paths from its working directory."""
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "train-tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    check_launchable(["train-tool"], env={"PATH": str(tmp_path / "bin")})
    check_launchable(["bin/train-tool"], cwd=tmp_path)
    with pytest.raises(LaunchError, match="not found"):
        check_launchable(["train-tool"], env={"PATH": str(tmp_path)})
    with pytest.raises(LaunchError, match="is a directory"):
        check_launchable([str(tmp_path / "bin")])
    with pytest.raises(LaunchError, match=r"working directory .* not found"):
        check_launchable([PY], cwd=tmp_path / "missing")
    with pytest.raises(LaunchError, match="command is empty"):
        check_launchable([])


def test_env_and_cwd_reach_the_child(tmp_path: Path) -> None:
    """The child runs with the given environment and working directory."""
    lines = Lines()
    argv = [PY, "-c", "import os; print(os.environ['AUTOTUNE_X'], os.getcwd())"]
    child = ChildProcess(
        argv,
        env={**os.environ, "AUTOTUNE_X": "42"},
        cwd=tmp_path,
        stdout_sink=None,
        stderr_sink=None,
        on_line=lines,
    )

    async def main() -> None:
        await child.start()
        await child.wait()

    run(main())
    assert lines.got == [("stdout", f"42 {tmp_path}".encode())]


# -- callbacks and statistics ---------------------------------------------------------------


def test_a_failing_on_line_never_stops_the_draining(tmp_path: Path, sinks: tuple[Any, Any]) -> None:
    """Every exception on_line raises goes to the error hook; all output still flows."""
    seen: list[bytes] = []
    errors: list[Exception] = []

    def on_line(stream: str, line: bytes) -> None:
        seen.append(line)
        raise ValueError(f"bad {line!r}")

    argv = [PY, "-c", "for i in range(50): print('line', i)"]
    child = ChildProcess(
        argv, stdout_sink=sinks[0], stderr_sink=sinks[1], on_line=on_line, on_callback_error=errors.append
    )

    async def main() -> ExitStatus:
        await child.start()
        return await child.wait()

    assert run(main()).returncode == 0
    assert seen == [f"line {i}".encode() for i in range(50)]
    assert len(errors) == child.callback_errors == 50
    assert (tmp_path / "out").read_bytes() == b"".join(f"line {i}\n".encode() for i in range(50))


def test_the_default_error_hook_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a hook, only the first callback failure is printed, on one line of stderr."""

    def on_line(stream: str, line: bytes) -> None:
        raise RuntimeError("boom\nwith a second line")

    child = ChildProcess(
        [PY, "-c", "print('a'); print('b')"], stdout_sink=None, stderr_sink=None, on_line=on_line
    )

    async def main() -> None:
        await child.start()
        await child.wait()

    run(main())
    assert capsys.readouterr().err == (
        "autotune-rt: line callback failed (RuntimeError: boom with a second line); output keeps flowing\n"
    )
    assert child.callback_errors == 2


def test_tree_stats_samples_the_live_tree(tmp_path: Path) -> None:
    """tree_stats counts the child and its grandchildren while they run, and None after."""
    lines = Lines()
    child = ChildProcess(
        script(tmp_path, SPAWNS_GRANDCHILDREN), stdout_sink=None, stderr_sink=None, on_line=lines
    )

    async def main() -> None:
        await child.start()
        await lines.wait_for(b"pids")
        first, second = child.tree_stats(), child.tree_stats()
        assert first is not None and second is not None
        assert first.nprocs == second.nprocs == 3
        assert second.rss > 0 and second.cpu_percent >= 0.0
        await child.terminate(grace=0.2)
        assert child.tree_stats() is None

    run(main())


def test_last_lines_shows_what_a_terminal_would(tmp_path: Path) -> None:
    """last_lines decodes leniently and keeps only the final redraw of a \\r progress line."""
    argv = [PY, "-c", "import sys\nsys.stdout.buffer.write(b'a\\n10%\\r50%\\r100%\\r\\n\\xff end')"]
    child = ChildProcess(argv, stdout_sink=None, stderr_sink=None)

    async def main() -> None:
        await child.start()
        await child.wait()

    run(main())
    assert child.last_lines() == ["a", "100%", "\ufffd end"]
    assert child.last_lines(1) == ["\ufffd end"]


# -- the line machinery, on arbitrary chunkings ---------------------------------------------

LINE_BYTES = st.lists(
    st.sampled_from([b"a", b"Ep", b"och", b"Epoch", b"\n", b"\r", b"xyz"]), max_size=40
).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@settings(max_examples=300, deadline=None)
@given(
    data=LINE_BYTES,
    cuts=st.lists(st.integers(0, 200), max_size=8),
    needles=st.sampled_from([(), (b"Epoch",), (b"och", b"xyz")]),
    max_line=st.integers(0, 12),
)
def test_line_splitter_matches_a_plain_split(
    data: bytes, cuts: list[int], needles: tuple[bytes, ...], max_line: int
) -> None:
    """However the stream is cut, the splitter yields the short lines (ended by \\n or \\r) holding
    a needle, in order."""
    got: list[bytes] = []
    splitter = LineSplitter(got.append, needles, max_line)
    for chunk in chunked(data, cuts):
        splitter.feed(chunk)
    splitter.close()
    lines = data.replace(b"\r", b"\n").split(b"\n")  # \r ends a line too
    if lines[-1] == b"":
        lines.pop()
    wanted = [ln for ln in lines if len(ln) <= max_line and (not needles or any(n in ln for n in needles))]
    assert got == wanted


@settings(max_examples=300, deadline=None)
@given(data=LINE_BYTES, cuts=st.lists(st.integers(0, 200), max_size=8), keep=st.integers(1, 5))
def test_recent_lines_keep_the_tail_of_the_last_lines(data: bytes, cuts: list[int], keep: int) -> None:
    """However the stream is cut, the ring holds the last lines, each cut to its last bytes."""
    ring: collections.deque[bytes] = collections.deque(maxlen=keep)
    recent = RecentLines(ring, 4)
    for chunk in chunked(data, cuts):
        recent.feed(chunk)
    unterminated = recent.close()
    lines = data.split(b"\n")
    assert unterminated == (lines[-1] != b"")
    if lines[-1] == b"":
        lines.pop()
    assert list(ring) == [ln[-4:] for ln in lines][-keep:]
