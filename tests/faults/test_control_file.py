"""Faults around the control file (cases 13-19): locks, races, full disks, planted and bad files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from autotune_rt import client
from autotune_rt.channel import ControlFile
from autotune_rt.client import ConfigReloader
from tests.support import (
    CliProcess,
    alive,
    cli_env,
    events_so_far,
    memory_dir,
    other_uid,
    read_events,
    realtime_args,
    run_measured,
    temp_files,
    tiny_tmpfs,
    wait_event,
    wait_for,
    wait_log,
    write_script,
)

pytestmark = pytest.mark.faults

WEIGHTS = {"lambda_dol": 0.5, "lambda_col": 0.3, "lambda_hier": 1.5, "lambda_scl": 0.2, "max_grad_norm": 1.0}
# Retune as early as possible: from the second epoch on, after each epoch without improvement.
EAGER = ("--min_epochs", "2", "--patience", "1")
NEVER = ("--min_epochs", "100000")

# A training that applies the control file with ConfigReloader every epoch and prints the
# weights it uses as metrics (`w_lambda_col`...). After epoch 0 it does something to the
# control file (argv[1]); after epoch 3 it waits for the `go` file (argv[2]) so the test can
# look at the control file while the run is live.
CHANNEL_TRAIN = textwrap.dedent(
    """
    import errno, json, os, sys, time
    from autotune_rt.client import ConfigReloader

    cfg = os.environ["AUTOTUNE_CONFIG_FILE"]
    action, go = sys.argv[1], sys.argv[2]
    reloader = ConfigReloader()
    weights = {}

    def epoch_line(epoch):
        reloader.apply(weights, epoch=epoch)
        metrics = {"epoch": epoch, "acc1": 0.5, "head_acc": 0.7, "tail_acc": 0.2}
        metrics.update({"w_" + k: v for k, v in weights.items()})
        print(f"Epoch {epoch}[0.01s]: {metrics}", flush=True)

    def wait_until(done):
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)

    def replace(data, uid=None):
        tmp = cfg + ".edit"
        with open(tmp, "w") as f:
            f.write(data)
        if uid is not None:
            os.chown(tmp, uid, uid)
        os.replace(tmp, cfg)

    planted = {"lambda_dol": 0.6, "lambda_col": 0.9, "lambda_hier": 1.8, "lambda_scl": 0.3, "version": 99}
    epoch_line(0)
    if action == "symlink":
        victim = os.path.join(os.path.dirname(cfg), "victim.json")
        with open(victim, "w") as f:
            json.dump(planted, f)
        os.symlink(victim, cfg + ".lnk")
        os.replace(cfg + ".lnk", cfg)
    elif action == "other-owner":
        replace(json.dumps(planted), uid=65534)
    elif action == "directory":
        for _ in range(100):  # the supervisor may restore the file between unlink and mkdir
            try:
                os.unlink(cfg)
                os.mkdir(cfg)
                break
            except (FileNotFoundError, FileExistsError):
                continue
    elif action == "delete":
        os.unlink(cfg)
        reloader.apply(weights, epoch=0)
        print("while deleted:", weights, flush=True)
        wait_until(lambda: os.path.exists(cfg))
        with open(cfg) as f:
            print("restored version", json.load(f)["version"], flush=True)
    elif action == "fill":
        fd = os.open(os.path.join(os.path.dirname(cfg), "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        os.close(fd)
        print("disk full", flush=True)
    elif action == "bad":
        with open(sys.argv[3]) as f:
            contents = json.load(f)
        for number, content in enumerate(contents, 1):
            replace(content)
            epoch_line(number)
            epoch_line(number)  # a second read of the same bad file must stay silent
    for epoch in range(1, 4):
        epoch_line(epoch)
    wait_until(lambda: os.path.exists(go))
    if action == "fill":
        os.unlink(os.path.join(os.path.dirname(cfg), "filler"))
    for epoch in range(4, 8):
        epoch_line(epoch)
    """
)


def used(run_dir: Path, name: str = "lambda_col") -> list[float]:
    """The value of weight ``name`` the training printed at each epoch."""
    return [e["metrics"][f"w_{name}"] for e in read_events(run_dir) if e["event"] == "epoch"]


def channel_run(tmp_path: Path, action: str, *options: str, **kwargs: Any) -> CliProcess:
    """Start the supervisor on CHANNEL_TRAIN doing ``action``; the test touches ``tmp_path/go``."""
    write_script(tmp_path, "train.py", CHANNEL_TRAIN)
    extra = kwargs.pop("extra", [])
    args = realtime_args(tmp_path, *options, script_args=[action, str(tmp_path / "go"), *extra], **kwargs)
    return CliProcess(args, tmp_path)


def client_warnings(log: bytes) -> list[str]:
    """The lines ConfigReloader printed on stderr (into train.log, through the supervisor).

    train.log interleaves the two streams chunk by chunk, as a terminal would: an unbuffered
    ``print`` writes its text and its newline separately, so a stderr line can land between
    them, in the middle of a stdout line.
    """
    return re.findall(r"autotune-rt: [^\n]*", log.decode(errors="replace"))


# -- case 13: a second supervisor on the same control file -------------------------------------

WAITS = """
import os, sys, time
open(sys.argv[1], "w").close()
print("ready", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.02)
"""


def test_second_supervisor_is_refused_and_a_stale_lock_does_not_block(tmp_path: Path) -> None:
    """A second supervisor on the same control file stops at once naming the holder's pid; once
    the holder is SIGKILLed its stale lock does not stop a third."""
    write_script(tmp_path, "train.py", WAITS)
    go = str(tmp_path / "go")

    def args(name: str) -> list[str]:
        return realtime_args(
            tmp_path, run_dir=tmp_path / name, script_args=[str(tmp_path / name) + ".ran", go]
        )

    with CliProcess(args("first"), tmp_path) as first:
        wait_log(tmp_path / "first", b"ready")
        second = run_measured(args("second"), tmp_path, timeout=20)
        assert alive(first.pid)  # refused while the holder runs: at once, not after it
        child = next(e["pid"] for e in events_so_far(tmp_path / "first") if e["event"] == "child_started")
        first.send_signal(signal.SIGKILL)
        first.wait()
    err = second.stderr.decode()
    assert second.returncode == 2
    assert f"is in use by autotune-rt pid {first.pid}" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "second.ran").exists() and not (tmp_path / "second").exists()
    wait_for(lambda: not alive(child))
    assert (tmp_path / "c.json.lock").read_text().strip() == str(first.pid)  # stale
    (tmp_path / "go").touch()
    third = run_measured(args("third"), tmp_path)
    assert third.returncode == 0, third.stderr.decode()[-2000:]
    assert (tmp_path / "third.ran").exists()


# -- case 14: 10,000 rewrites under a reader in a loop -----------------------------------------

READER = textwrap.dedent(
    """
    import json, os, sys
    from autotune_rt.client import ConfigReloader

    path, stop = sys.argv[1], sys.argv[2]
    reloader = ConfigReloader(path, ack=False)
    counts = {"taken": 0, "raw": 0, "torn": 0, "missing": 0, "mixed": 0, "backwards": 0}
    last = 0
    while True:
        finished = os.path.exists(stop)  # then one last round sees the final version
        values = reloader.poll()
        if values is not None:
            counts["taken"] += 1
            counts["backwards"] += reloader.version < last
            counts["mixed"] += values["lambda_col"] != (reloader.version % 10) / 10
            last = reloader.version
            if counts["taken"] == 1:
                print("reading", flush=True)
        try:
            with open(path) as f:  # the seed's snippet, as plain as a reader gets
                doc = json.load(f)
            counts["raw"] += 1
            counts["mixed"] += doc["lambda_col"] != (doc["version"] % 10) / 10
        except FileNotFoundError:
            counts["missing"] += 1
        except (ValueError, KeyError):
            counts["torn"] += 1
        if finished:
            break
    counts["last"] = last
    print(json.dumps(counts), flush=True)
    """
)


def test_ten_thousand_rewrites_under_a_reading_client(tmp_path: Path) -> None:
    """10,000 rewrites while ConfigReloader and the seed's json.load read in a loop in another
    process: no torn, invalid, mixed or backwards read, no warning, and the last version is seen."""
    with memory_dir(tmp_path) as directory:
        path, stop = directory / "auto_tune_config.json", directory / "stop"
        with ControlFile(path, run_id="faults") as control:
            control.write({**WEIGHTS, "lambda_col": 0.1}, reason="initial", epoch=None)
            reader = subprocess.Popen(
                [sys.executable, "-c", READER, str(path), str(stop)],
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                assert reader.stdout is not None
                assert reader.stdout.readline() == b"reading\n"
                for _ in range(10_000):
                    version = control.version + 1
                    control.write(
                        {**WEIGHTS, "lambda_col": (version % 10) / 10}, reason="stagnation", epoch=1
                    )
            finally:
                stop.touch()
                out, err = reader.communicate(timeout=60)
        counts = json.loads(out.splitlines()[-1])
        assert (counts["torn"], counts["missing"], counts["mixed"], counts["backwards"]) == (0, 0, 0, 0)
        assert counts["taken"] > 1 and counts["raw"] > 1
        assert counts["last"] == control.version == 10_001
        assert err == b""  # not one warning from the client
        assert temp_files(directory) == []


# -- case 15: the disk fills up under the control file -----------------------------------------


def test_disk_full_during_a_control_file_write(tmp_path: Path) -> None:
    """A write on a full disk fails cleanly: old file intact, no temp file, an error event; the run
    goes on and writes again once there is space."""
    with tiny_tmpfs(tmp_path) as small:
        config = small / "c.json"
        with channel_run(tmp_path, "fill", *EAGER, config_file=config) as cli:
            wait_log(tmp_path / "run", b"disk full")
            before = config.read_bytes()
            failed = wait_event(tmp_path / "run", "config_write_failed")
            assert "No space left on device" in failed["error"]
            assert config.read_bytes() == before
            assert json.loads(before)["version"] == 1
            assert temp_files(small) == []
            (tmp_path / "go").touch()
            result = cli.wait(30)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"Could not write the control file" in result.stderr
    events = read_events(tmp_path / "run")
    assert [e["epoch"] for e in events if e["event"] == "epoch"][-4:] == [4, 5, 6, 7]  # the run went on
    written = [e for e in events if e["event"] == "config_written"]
    assert [e["version"] for e in written][:2] == [1, 2]  # and wrote again once the disk had room


def test_failed_write_leaves_the_weights_in_effect(tmp_path: Path) -> None:
    """After a failed write the supervisor still reports the weights the training really uses."""
    with (
        tiny_tmpfs(tmp_path) as small,
        channel_run(tmp_path, "fill", *EAGER, config_file=small / "c.json") as cli,
    ):
        wait_event(tmp_path / "run", "config_write_failed")
        (tmp_path / "go").touch()
        assert cli.wait(30).returncode == 0
    events = read_events(tmp_path / "run")
    second = next(e for e in events if e["event"] == "config_written" and e["version"] == 2)
    assert second["old"] == WEIGHTS  # version 1 was the last the training got


# -- case 16: a planted symlink, another user's file -------------------------------------------


def plant_symlink(tmp_path: Path, at: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    at.symlink_to(victim)
    return victim


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        ("symlink", "is a symlink (possibly planted by someone else)"),
        ("lock-symlink", "is a symlink; remove it or pass --config_file"),
        ("other-owner", "is owned by uid 65534; remove it or pass --config_file"),
    ],
    ids=["symlink", "lock-symlink", "other-owner"],
)
def test_planted_control_file_is_refused_at_start(tmp_path: Path, plant: str, message: str) -> None:
    """A symlink or another user's file at the control path (or its lock) is refused in one line
    before anything starts, and nothing outside is written."""
    write_script(tmp_path, "train.py", "open('ran', 'w').close()\n")
    config = tmp_path / "c.json"
    victim = None
    if plant == "symlink":
        victim = plant_symlink(tmp_path, config)
    elif plant == "lock-symlink":
        victim = plant_symlink(tmp_path, tmp_path / "c.json.lock")
    else:
        uid = other_uid()
        config.write_text(json.dumps({**WEIGHTS, "lambda_col": 0.9}))
        os.chown(config, uid, uid)
        victim = config
    before = victim.read_bytes()
    result = run_measured(realtime_args(tmp_path), tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 2
    assert message in err and err.count("\n") == 1
    assert victim.read_bytes() == before
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()


# What the supervisor's error event and the client's warning say about each planted file.
PLANTED_MESSAGES = {
    "symlink": ("is a symlink", "symlink"),
    "other-owner": ("is owned by uid 65534", "owned by uid 65534"),
    "directory": ("is not a regular file", "not a regular file"),
}


@pytest.mark.parametrize(
    "plant",
    [
        "symlink",
        "other-owner",
        "directory",
    ],
)
def test_planted_control_file_mid_run(tmp_path: Path, plant: str) -> None:
    """A symlink, another user's file or a directory swapped in mid-run: the client refuses it
    and keeps its weights, the supervisor refuses to write through it, and the run goes on."""
    if plant == "other-owner":
        other_uid()
    config = tmp_path / "c.json"
    event_text, warning_text = PLANTED_MESSAGES[plant]
    with channel_run(tmp_path, plant, *EAGER) as cli:
        failed = wait_event(tmp_path / "run", "config_write_failed")
        assert event_text in failed["error"]
        if plant != "directory":
            planted = tmp_path / "victim.json" if plant == "symlink" else config
            assert json.loads(planted.read_text())["lambda_col"] == 0.9  # not overwritten
        assert config.is_symlink() == (plant == "symlink")
        (tmp_path / "go").touch()
        result = cli.wait(30)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert (tmp_path / "run" / "summary.json").exists()
    assert set(used(tmp_path / "run")) == {WEIGHTS["lambda_col"]}  # 0.9 was never applied
    warnings = client_warnings((tmp_path / "run" / "train.log").read_bytes())
    assert len(warnings) == 1, warnings
    assert warning_text in warnings[0]
    if plant == "symlink":
        assert json.loads((tmp_path / "victim.json").read_text())["version"] == 99
    assert not [e for e in read_events(tmp_path / "run") if e["event"] == "manual_override"]


# -- case 17: the control file is deleted mid-run ----------------------------------------------


def test_deleted_control_file_is_restored_and_the_client_keeps_its_values(tmp_path: Path) -> None:
    """Deleting the control file mid-run: the client keeps its last values and the supervisor
    puts the same version back."""
    with channel_run(tmp_path, "delete", *NEVER) as cli:
        (tmp_path / "go").touch()
        result = cli.wait(30)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    run_dir = tmp_path / "run"
    assert b"restored version 1\n" in (run_dir / "train.log").read_bytes()
    assert f"while deleted: {WEIGHTS}".encode() in (run_dir / "train.log").read_bytes()
    assert set(used(run_dir)) == {WEIGHTS["lambda_col"]}
    restored = [e for e in read_events(run_dir) if e["event"] == "config_restored"]
    assert [e["version"] for e in restored] == [1]
    assert client_warnings((run_dir / "train.log").read_bytes()) == []


# -- case 18: two updates between two reads ----------------------------------------------------


@pytest.mark.parametrize("timestamps", ["ns", "coarse"])
def test_two_writes_between_two_reads_give_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timestamps: str
) -> None:
    """Two same-size versions written between two polls, whatever inode numbers the file system
    reuses and however coarse its timestamps, still give the client the newest one."""
    if timestamps == "coarse":
        # A file system whose only timestamp is a whole-second mtime (see tests/test_client.py).
        monkeypatch.setattr(client, "_signature", lambda st: (st.st_ino, st.st_size, st.st_mtime_ns // 10**9))
    path = tmp_path / "auto_tune_config.json"
    with ControlFile(path, run_id="faults") as control:
        control.write(WEIGHTS, reason="initial", epoch=None)
        control.version = 99  # every later version has three digits: every file has the same size
        reloader = ConfigReloader(path, ack=False)
        assert reloader.poll() is not None
        inodes = set()
        for round_ in range(150):
            sizes = set()
            for step in (1, 2):
                control.write(
                    {**WEIGHTS, "lambda_col": (round_ + step) % 10 / 10}, reason="stagnation", epoch=1
                )
                sizes.add(path.stat().st_size)
                inodes.add(path.stat().st_ino)
            assert len(sizes) == 1
            assert reloader.poll() == {**WEIGHTS, "lambda_col": (round_ + 2) % 10 / 10}
            assert reloader.version == control.version
    # The real writer makes a new inode per version; ext4 and friends hand old numbers out again.
    assert len(inodes) >= 2


# -- case 19: bad control-file contents --------------------------------------------------------

GOOD_REST = '"lambda_dol": 0.5, "lambda_hier": 1.5, "lambda_scl": 0.2'
BAD_CONTENTS = {
    "NaN": ('{"lambda_col": NaN, ' + GOOD_REST + ', "version": 2}', "lambda_col is nan"),
    "Infinity": ('{"lambda_col": Infinity, ' + GOOD_REST + ', "version": 3}', "lambda_col is inf"),
    "1e999": ('{"lambda_col": 1e999, ' + GOOD_REST + ', "version": 4}', "lambda_col is inf"),
    "string": ('{"lambda_col": "2.5", ' + GOOD_REST + ', "version": 5}', 'lambda_col is "2.5" (a string)'),
    "true": ('{"lambda_col": true, ' + GOOD_REST + ', "version": 6}', "lambda_col is true (a boolean)"),
    "unknown-key": (
        '{"lamda_col": 0.9, "lambda_col": 0.3, ' + GOOD_REST + ', "version": 7}',
        'ignoring unknown key "lamda_col"',
    ),
    "out-of-range": (
        '{"lambda_col": 150.0, ' + GOOD_REST + ', "version": 8}',
        "lambda_col is 150.0, outside",
    ),
    "list": ("[]", "not a JSON object"),
    "empty": ("", "the file is empty"),
    "truncated": ('{"lambda_col": 0.', "not valid JSON"),
}


def test_bad_contents_are_each_refused_with_one_warning(tmp_path: Path) -> None:
    """NaN, Infinity, 1e999, "2.5", true, an unknown key, out of range, [], empty and truncated
    JSON each give exactly one warning naming the field, and the previous weights stay."""
    contents = tmp_path / "contents.json"
    contents.write_text(json.dumps([content for content, _ in BAD_CONTENTS.values()]))
    with channel_run(tmp_path, "bad", *NEVER, extra=[str(contents)]) as cli:
        (tmp_path / "go").touch()
        result = cli.wait(30)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    run_dir = tmp_path / "run"
    warnings = client_warnings((run_dir / "train.log").read_bytes())
    assert len(warnings) == len(BAD_CONTENTS), warnings
    for warning, (name, (_, names_it)) in zip(warnings, BAD_CONTENTS.items(), strict=True):
        assert names_it in warning, name
    for name in WEIGHTS:
        if name != "max_grad_norm":
            assert set(used(run_dir, name)) == {WEIGHTS[name]}, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_weights"] == WEIGHTS
