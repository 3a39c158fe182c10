"""Faults in the training's output (cases 1-7): hostile bytes, floods, dead terminals, buffering."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    CLIENT_TRAIN,
    MEMORY_BOUND,
    CliProcess,
    Finished,
    cli_env,
    events_so_far,
    joined,
    read_events,
    realtime_args,
    replay_args,
    run_measured,
    wait_event,
    write_script,
)

pytestmark = pytest.mark.faults

# About 400 KiB of tqdm-style redraws: '\r' between frames and never a newline.
PROGRESS = b"".join(b"\r%5d/8000 [%-40s]" % (i, b"#" * (i * 40 // 8000)) for i in range(8000))
assert len(PROGRESS) >= 400 << 10


def epochs_of(run_dir: Path) -> list[int]:
    """The epochs the supervisor parsed, in the order it logged them."""
    return [e["epoch"] for e in read_events(run_dir) if e["event"] == "epoch"]


def check_passed_through(result: Finished, pieces: list[tuple[str, bytes]], run_dir: Path) -> None:
    """Each stream reached the terminal unchanged and train.log holds every byte in order."""
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == joined(pieces, "stdout")
    # The supervisor's own console lines go to stderr too, before and after the training's.
    assert joined(pieces, "stderr") in result.stderr
    assert (run_dir / "train.log").read_bytes() == joined(pieces)
    assert result.maxrss < MEMORY_BOUND


# -- case 1: a 3 MiB line and a 400 KiB progress bar ------------------------------------------

HUGE = [
    ("stdout", b"x" * (3 << 20) + b"\n"),
    ("stderr", PROGRESS),
    ("stdout", b"Epoch 0[1.00s]: {'acc1': 0.5}\n"),
    # tqdm(leave=False) ends its bar with '\r': the next line lands on the bar's line.
    ("stderr", b"\rEpoch 1[1.00s]: {'acc1': 0.6}\n"),
    ("stdout", b"after the big line\n"),
    ("stderr", b"stderr after the bar\n"),
]


@pytest.fixture(scope="module")
def huge_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Finished, Path]:
    """One supervised run of the HUGE output, shared by the tests of case 1."""
    tmp_path = tmp_path_factory.mktemp("huge")
    return run_measured(replay_args(tmp_path, HUGE), tmp_path), tmp_path / "run"


def test_huge_line_and_progress_bar_pass_through(huge_run: tuple[Finished, Path]) -> None:
    """A 3 MiB line and 400 KiB of \\r redraws pass through byte for byte, nothing after is lost,
    and the supervisor's memory stays bounded."""
    result, run_dir = huge_run
    check_passed_through(result, HUGE, run_dir)
    assert 0 in epochs_of(run_dir)


def test_metric_line_after_a_long_progress_bar_is_parsed(huge_run: tuple[Finished, Path]) -> None:
    """A metric line that follows a 400 KiB \\r progress bar on the same line is still parsed."""
    _, run_dir = huge_run
    assert sorted(epochs_of(run_dir)) == [0, 1]


# -- case 2: no newline at the end ------------------------------------------------------------


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_last_line_without_newline_is_logged_and_parsed(tmp_path: Path, stream: str) -> None:
    """The child's last line, unterminated, is still logged and parsed when it exits."""
    pieces = [
        (stream, b"Epoch 0[1.00s]: {'acc1': 0.5}\n"),
        (stream, b"Epoch 1[1.00s]: {'acc1': 0.6}"),
    ]
    result = run_measured(replay_args(tmp_path, pieces), tmp_path)
    check_passed_through(result, pieces, tmp_path / "run")
    assert epochs_of(tmp_path / "run") == [0, 1]


# -- case 3: bytes that are not UTF-8 ----------------------------------------------------------

BAD_UTF8 = [
    ("stdout", b"bad \xff\xfe utf-8 \xc3\x28\n"),
    ("stdout", b"caf\xc3"),  # a two-byte character cut between two reads
    ("stdout", b"\xa9 split\n"),
    ("stderr", b"Epoch 0[1.00s]: {'acc1': 0.5, 'tag': '\xff\xfe'}\n"),
    ("stdout", b"Epoch 1[1.00s]: {'acc1': 0.6, 'name': 'caf\xc3"),
    ("stdout", b"\xa9'}\n"),
    ("stderr", b"\xe2\x82"),  # a three-byte character cut after two bytes, on stderr
    ("stderr", b"\xac euro\n"),
]


def test_invalid_and_split_utf8_pass_through_unchanged(tmp_path: Path) -> None:
    """Invalid UTF-8 and characters split across reads pass through unchanged, parse, and raise nothing."""
    result = run_measured(replay_args(tmp_path, BAD_UTF8), tmp_path)
    check_passed_through(result, BAD_UTF8, tmp_path / "run")
    assert epochs_of(tmp_path / "run") == [0, 1]
    assert b"callback failed" not in result.stderr
    assert b"Traceback" not in result.stderr
    assert not [e for e in read_events(tmp_path / "run") if e["level"] == "error"]


# -- case 4: a flood on one stream while the other waits ---------------------------------------

TEN_MB = bytes(range(256)) * (10_000_000 // 256 + 1)


@pytest.mark.parametrize("noisy", ["stderr", "stdout"])
def test_ten_megabytes_on_one_stream_with_the_other_idle(tmp_path: Path, noisy: str) -> None:
    """10 MB on one stream while the other is idle: no deadlock, both drained, memory bounded."""
    quiet = "stdout" if noisy == "stderr" else "stderr"
    pieces = [(noisy, TEN_MB[:10_000_000]), (quiet, b"Epoch 0[1.00s]: {'acc1': 0.5}\n")]
    result = run_measured(replay_args(tmp_path, pieces), tmp_path)
    check_passed_through(result, pieces, tmp_path / "run")
    assert epochs_of(tmp_path / "run") == [0]


# -- case 5: a burst of a million lines --------------------------------------------------------

BURST = """
import sys
out = sys.stdout.buffer
for start in range(0, 1_000_000, 10_000):
    out.write(b"".join(b"%07d\\n" % i for i in range(start, start + 10_000)))
out.write(b"Epoch 0[1.00s]: {'acc1': 0.5}\\n")
"""


def test_a_million_line_burst_reaches_train_log(tmp_path: Path) -> None:
    """A burst of 1,000,000 lines: every byte reaches train.log and the terminal; memory stays bounded."""
    write_script(tmp_path, "train.py", BURST)
    result = run_measured(realtime_args(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = b"".join(b"%07d\n" % i for i in range(1_000_000)) + b"Epoch 0[1.00s]: {'acc1': 0.5}\n"
    assert (tmp_path / "run" / "train.log").read_bytes() == expected
    assert result.stdout == expected
    assert epochs_of(tmp_path / "run") == [0]
    assert result.maxrss < MEMORY_BOUND


# -- case 6: nobody reads the supervisor's stdout ----------------------------------------------

# A tuned training that first prints 2 MiB, far more than a pipe holds.
NOISY_CLIENT_TRAIN = CLIENT_TRAIN.replace(
    "\nbest = 0.0\n", '\nimport sys\nsys.stdout.write(("=" * 1023 + "\\n") * 2048)\nbest = 0.0\n'
)
assert NOISY_CLIENT_TRAIN != CLIENT_TRAIN


def check_tuned_to_the_end(run_dir: Path, epochs: int) -> None:
    """train.log is complete and the tuner kept writing versions the training applied."""
    log = (run_dir / "train.log").read_bytes()
    assert log.count(b"=" * 1023 + b"\n") == 2048
    assert log.count(b"Epoch ") == epochs
    events = read_events(run_dir)
    assert epochs_of(run_dir) == list(range(epochs))
    written = [e["version"] for e in events if e["event"] == "config_written" and e["reason"] != "initial"]
    applied = {e["version"] for e in events if e["event"] == "config_applied"}
    assert written, "the tuner never wrote a new version"
    assert written[0] in applied


@pytest.mark.parametrize(
    "reader",
    [
        "never-reads",
        "closed-after-one-line",
        "stderr-too-closed",
    ],
)
def test_supervisor_stdout_unread_or_closed(tmp_path: Path, reader: str) -> None:
    """With the supervisor's stdout a pipe nobody reads, or closed (`| head -1`, `2>&1 | head -1`),
    the child runs to its end, train.log is complete and the tuner keeps working."""
    write_script(tmp_path, "train.py", NOISY_CLIENT_TRAIN)
    args = realtime_args(tmp_path, "--min_epochs", "5", "--patience", "3", script_args=["--epochs", "30"])
    stderr = subprocess.STDOUT if reader == "stderr-too-closed" else None
    with CliProcess(args, tmp_path, stdout=subprocess.PIPE, stderr=stderr) as cli:
        pipe: Any = cli.proc.stdout
        try:
            if reader != "never-reads":
                assert pipe.readline()
                pipe.close()
            result = cli.wait(60)
        finally:
            pipe.close()
    assert result.returncode == 0, result.stderr[-2000:]
    check_tuned_to_the_end(tmp_path / "run", 30)
    assert b"Traceback" not in result.stderr


# -- case 7: the caller's environment has no PYTHONUNBUFFERED ----------------------------------

WAITS_AFTER_EPOCH = """
import os, sys, time
print("Epoch 0[0.01s]: {'acc1': 0.5}")  # no flush: block-buffered unless PYTHONUNBUFFERED is set
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)
print("Epoch 1[0.01s]: {'acc1': 0.6}")
"""


def test_epoch_lines_arrive_while_the_child_still_runs(tmp_path: Path) -> None:
    """Without PYTHONUNBUFFERED in the caller's environment an epoch line is logged while the
    child, having printed it without flushing, still waits before its next line."""
    write_script(tmp_path, "train.py", WAITS_AFTER_EPOCH)
    go = tmp_path / "go"
    env = cli_env()
    assert "PYTHONUNBUFFERED" not in env
    with CliProcess(realtime_args(tmp_path, script_args=[str(go)]), tmp_path, env=env) as cli:
        wait_event(tmp_path / "run", "epoch", lambda e: e["epoch"] == 0, timeout=10)
        # The child has not printed epoch 1 yet: it waits for `go`.
        assert [e["epoch"] for e in events_so_far(tmp_path / "run") if e["event"] == "epoch"] == [0]
        go.touch()
        result = cli.wait(30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert epochs_of(tmp_path / "run") == [0, 1]
