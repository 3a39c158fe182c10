"""Faults in the process tree (cases 8-12): signals, stubborn grandchildren, a killed supervisor."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from tests.support import (
    CliProcess,
    alive,
    events_so_far,
    kill_leftovers,
    processes_mentioning,
    read_events,
    realtime_args,
    run_measured,
    wait_for,
    wait_log,
    write_script,
)

pytestmark = pytest.mark.faults

GRACE = 1.0


@pytest.fixture(autouse=True)
def reap_the_tree(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test leaves behind is killed: every process started here names tmp_path."""
    yield
    kill_leftovers(processes_mentioning(str(tmp_path)))


def start(tmp_path: Path, source: str, *options: str, script_args: tuple[str, ...] = ()) -> CliProcess:
    """Start the supervisor on ``source`` run by its absolute path, so its processes name tmp_path."""
    script = write_script(tmp_path, "train.py", source)
    return CliProcess(
        realtime_args(tmp_path, *options, script=str(script), script_args=script_args), tmp_path
    )


PIDS = re.compile(rb"^pids (\d+) (\d+)\n", re.M)


def pids_from_log(run_dir: Path) -> dict[str, int]:
    """``{"child": pid, "grandchild": pid}`` from the ``pids <child> <grandchild>`` line in train.log."""
    # print() of several values makes several writes: wait for the whole line.
    match = wait_for(lambda: PIDS.search(wait_log(run_dir, b"pids ")))
    return {"child": int(match[1]), "grandchild": int(match[2])}


def no_survivor(marker: str) -> None:
    """Nothing started from ``marker`` (the test's tmp_path) is alive, waiting out dying processes."""
    wait_for(lambda: not processes_mentioning(marker), timeout=5)


# -- case 8: SIGTERM, SIGINT, SIGHUP to the supervisor -----------------------------------------

# The child and a grandchild in its process group record every signal and keep running.
RECORDS_SIGNALS = """
import os, signal, subprocess, sys, time
records = sys.argv[1]

def install(who):
    def record(signum, frame):
        with open(os.path.join(records, who), "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, record)

if sys.argv[2:] == ["grandchild"]:
    install("grandchild")
    open(os.path.join(records, "ready"), "w").close()
    while True:
        time.sleep(0.1)
install("child")
kid = subprocess.Popen([sys.executable, __file__, records, "grandchild"])
while not os.path.exists(os.path.join(records, "ready")):
    time.sleep(0.01)
print("pids", os.getpid(), kid.pid, flush=True)
while True:
    time.sleep(0.1)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_is_forwarded_once_then_the_tree_is_killed(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal to the supervisor reaches the child's process group exactly once; a tree that
    ignores it is SIGKILLed after the grace period and no descendant stays alive."""
    records = tmp_path / "records"
    records.mkdir()
    cli = start(tmp_path, RECORDS_SIGNALS, "--grace_period", str(GRACE), script_args=(str(records),))
    with cli:
        pids = pids_from_log(tmp_path / "run")
        cli.send_signal(sig)
        result = cli.wait(GRACE + 20)
        no_survivor(str(tmp_path))
    assert not any(alive(pid) for pid in pids.values())
    assert result.returncode == 128 + signal.SIGKILL
    assert (records / "child").read_text() == f"{sig.name}\n"
    assert (records / "grandchild").read_text() == f"{sig.name}\n"
    events = read_events(tmp_path / "run")
    assert [e["signal"] for e in events if e["event"] == "signal_received"] == [sig.name]
    exited = next(e for e in events if e["event"] == "child_exited")
    assert (exited["signal"], exited["exit_code"]) == ("SIGKILL", 128 + signal.SIGKILL)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted_by"] == sig.name


# -- case 9: a grandchild that ignores SIGTERM and holds the pipes -----------------------------

STUBBORN_GRANDCHILD = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "grandchild":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[2], "w").close()
    time.sleep(600)  # holding the supervisor's pipes (inherited stdout and stderr)
    sys.exit()
how, session = sys.argv[1:3]
ready = os.path.abspath("grandchild.ready")
kid = subprocess.Popen([sys.executable, __file__, "grandchild", ready], start_new_session=session == "own")
while not os.path.exists(ready):
    time.sleep(0.01)
print("pids", os.getpid(), kid.pid, flush=True)
if how == "signalled":
    while True:
        time.sleep(0.1)  # until the supervisor's SIGTERM ends it
"""


# A grace period longer than the 2 s ChildProcess gives leftovers after the child exits.
LONG_GRACE = 3.0


@pytest.mark.parametrize(
    ("how", "session", "grace"),
    [
        ("exits", "group", GRACE),
        ("signalled", "group", GRACE),
        ("signalled", "own", LONG_GRACE),
    ],
    ids=["child-exits", "sigterm", "sigterm-own-session-grandchild"],
)
def test_stubborn_grandchild_holding_the_pipes(tmp_path: Path, how: str, session: str, grace: float) -> None:
    """A grandchild that ignores SIGTERM and keeps the pipes open cannot hold the supervisor past
    the grace period, and is gone when it exits."""
    cli = start(tmp_path, STUBBORN_GRANDCHILD, "--grace_period", str(grace), script_args=(how, session))
    with cli:
        pids = pids_from_log(tmp_path / "run")
        if how == "signalled":
            cli.send_signal(signal.SIGTERM)
        # The grandchild would hold the pipes for 600 s: finishing at all is the guarantee.
        result = cli.wait(grace + 15)
        no_survivor(str(tmp_path))
    assert not alive(pids["grandchild"])
    expected = 0 if how == "exits" else 128 + signal.SIGTERM
    assert result.returncode == expected, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["exit_code"] == expected


# -- case 10: the supervisor is SIGKILLed ------------------------------------------------------

CHILD_WITH_GRANDCHILD = """
import os, subprocess, sys, time
kid = subprocess.Popen([sys.executable, __file__, "grandchild"]) if sys.argv[1:] != ["grandchild"] else None
if kid is not None:
    print("pids", os.getpid(), kid.pid, flush=True)
    print("Epoch 0[0.01s]: {'acc1': 0.5}", flush=True)
while True:
    time.sleep(0.1)
"""


def test_sigkilled_supervisor_takes_the_child_along(tmp_path: Path) -> None:
    """SIGKILL of the supervisor: the kernel stops the child (PR_SET_PDEATHSIG); exactly the
    grandchild survives, and the run directory keeps a complete events log."""
    cli = start(tmp_path, CHILD_WITH_GRANDCHILD)
    with cli:
        pids = pids_from_log(tmp_path / "run")
        wait_for(lambda: [e for e in events_so_far(tmp_path / "run") if e["event"] == "epoch"])
        cli.send_signal(signal.SIGKILL)
        assert cli.wait(10).returncode == -signal.SIGKILL
        wait_for(lambda: not alive(pids["child"]), timeout=10)
        # What survives, recorded: PDEATHSIG reaches the child only, so its own children
        # are re-parented and run on (docs/reliability.md says so).
        assert processes_mentioning(str(tmp_path)) == [pids["grandchild"]]
    run_dir = tmp_path / "run"
    events = read_events(run_dir)  # every line complete: each event is one flushed write
    assert events[-1]["event"] == "epoch"
    assert not (run_dir / "summary.json").exists()
    assert json.loads((tmp_path / "c.json").read_text())["version"] == 1  # left for --resume


# -- case 11: Ctrl-C while the child is still starting -----------------------------------------

SLOW_START = """
import os, subprocess, sys, time
if sys.argv[1:] == ["grandchild"]:
    time.sleep(600)
    sys.exit()
kid = subprocess.Popen([sys.executable, __file__, "grandchild"])
time.sleep(0.5)  # "import torch"
print("pids", os.getpid(), kid.pid, flush=True)
while True:
    time.sleep(0.1)
"""


def first_child(pid: int) -> bool:
    """True once the supervisor ``pid`` has forked (the training is being spawned)."""
    try:
        return bool(psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("moment", ["before-spawn", "during-spawn", "child-importing"])
def test_ctrl_c_while_the_child_is_starting_leaves_no_orphan(tmp_path: Path, moment: str) -> None:
    """Ctrl-C (SIGINT) at any point of the child's start leaves no process of the run alive."""
    cli = start(tmp_path, SLOW_START, "--grace_period", str(GRACE))
    with cli:
        run_dir = tmp_path / "run"
        if moment == "before-spawn":
            wait_for(lambda: any(e["event"] == "run_started" for e in events_so_far(run_dir)), interval=0.001)
        elif moment == "during-spawn":
            wait_for(lambda: first_child(cli.pid), interval=0.001)
        else:
            wait_for(lambda: any(e["event"] == "child_started" for e in events_so_far(run_dir)))
        cli.send_signal(signal.SIGINT)
        result = cli.wait(20)
        no_survivor(str(tmp_path))
    # 130: the supervisor's own Ctrl-C exit, or the child's death by the forwarded SIGINT. A
    # Python child interrupted while it initialises exits with 1, or (CPython swallows the
    # KeyboardInterrupt while it checks argv[0]) runs on until the grace period ends: 137.
    assert result.returncode in (128 + signal.SIGINT, 1, 128 + signal.SIGKILL), result.stderr[-2000:]


# -- case 12: how the child ended --------------------------------------------------------------

ENDS = """
import os, signal, sys
print("bye", flush=True)
how = sys.argv[1]
if how.startswith("SIG"):
    sig = getattr(signal, how)
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)  # Python turns SIGINT into KeyboardInterrupt
    os.kill(os.getpid(), sig)
sys.exit(int(how))
"""


@pytest.mark.parametrize(
    ("how", "exit_code", "name"),
    [
        ("0", 0, None),
        ("3", 3, None),
        ("SIGKILL", 137, "SIGKILL"),
        ("SIGTERM", 143, "SIGTERM"),
        ("SIGINT", 130, "SIGINT"),
    ],
    ids=["exit-0", "exit-3", "SIGKILL", "SIGTERM", "SIGINT"],
)
def test_child_end_is_reported_and_propagated(
    tmp_path: Path, how: str, exit_code: int, name: str | None
) -> None:
    """An exit code or a death by signal is reported with the right code and signal name and
    becomes the supervisor's exit code."""
    write_script(tmp_path, "train.py", ENDS)
    result = run_measured(realtime_args(tmp_path, script_args=[how]), tmp_path)
    assert result.returncode == exit_code
    run_dir = tmp_path / "run"
    exited = next(e for e in read_events(run_dir) if e["event"] == "child_exited")
    summary = json.loads((run_dir / "summary.json").read_text())
    description = f"killed by {name} (exit code {exit_code})" if name else f"exited with code {exit_code}"
    for report in (exited, summary):
        assert (report["exit_code"], report["signal"]) == (exit_code, name)
    assert exited["description"] == summary["exit"] == description
    assert f"Training {description}".encode() in result.stderr
    assert summary["last_lines"] == ([] if exit_code == 0 else ["bye"])
