"""Tests for autotune_rt.channel: atomic writes, the single-writer lock, /tmp safety, the watcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autotune_rt.channel import Ack, ChannelEvent, ChannelWatcher, ControlConfig, ControlFile
from autotune_rt.client import ConfigReloader
from autotune_rt.exceptions import ChannelError, LockHeldError

WEIGHTS = {"lambda_dol": 0.5, "lambda_col": 0.3, "lambda_hier": 1.5, "lambda_scl": 0.2}
TIMEOUT = 15.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "auto_tune_config.json"


@pytest.fixture
def control(path: Path) -> Iterator[ControlFile]:
    with ControlFile(path, run_id="run-1") as cf:
        yield cf


def leftovers(directory: Path) -> list[str]:
    """Temporary files the writer left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def replace_with(path: Path, content: str) -> None:
    """Write ``content`` the way a careful human or tool would: temp file and os.replace."""
    tmp = path.with_name("edit.tmp")
    tmp.write_text(content)
    os.replace(tmp, path)


# -- writing --------------------------------------------------------------------------------------


def test_write_puts_weights_at_top_level(control: ControlFile, path: Path) -> None:
    """The file holds the weights as top-level keys plus version, updated_at, reason, epoch, run_id."""
    config = control.write({**WEIGHTS, "max_grad_norm": 1.0}, reason="initial", epoch=None)
    on_disk = json.loads(path.read_text())
    assert on_disk == {
        **WEIGHTS,
        "max_grad_norm": 1.0,
        "version": 1,
        "updated_at": config.updated_at,
        "reason": "initial",
        "epoch": None,
        "run_id": "run-1",
    }
    assert config.updated_at.endswith("Z")
    assert (path.stat().st_mode & 0o777) == 0o644
    assert control.version == 1
    assert control.last_written == config
    assert leftovers(path.parent) == []


def test_versions_increase_and_absent_grad_norm_is_omitted(control: ControlFile, path: Path) -> None:
    """Each write bumps the version; max_grad_norm=None is left out rather than written as null."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    config = control.write({**WEIGHTS, "lambda_col": 0.4}, reason="poor_tail", epoch=12)
    on_disk = json.loads(path.read_text())
    assert (config.version, on_disk["version"], on_disk["epoch"]) == (2, 2, 12)
    assert "max_grad_norm" not in on_disk


def test_seed_snippet_reads_the_file(control: ControlFile, path: Path) -> None:
    """The seed's own json.load + config.get snippet still works on the file."""
    control.write({**WEIGHTS, "lambda_col": 0.4}, reason="poor_tail", epoch=3)

    class Model:
        lambda_dol = 0.1
        lambda_col = 0.1

    model = Model()
    config_file = str(path)
    if os.path.exists(config_file):
        with open(config_file) as f:
            config = json.load(f)
        model.lambda_dol = config.get("lambda_dol", model.lambda_dol)
        model.lambda_col = config.get("lambda_col", model.lambda_col)
    assert (model.lambda_dol, model.lambda_col) == (0.5, 0.4)


@pytest.mark.parametrize(
    "weights",
    [
        {**WEIGHTS, "lambda_col": float("nan")},
        {**WEIGHTS, "lambda_col": float("inf")},
        {**WEIGHTS, "lambda_col": -0.1},
        {**WEIGHTS, "lambda_col": 101.0},
        {**WEIGHTS, "max_grad_norm": 0.0},
        {**WEIGHTS, "lambda_typo": 0.1},
        {"lambda_dol": 0.5},
    ],
    ids=["nan", "inf", "negative", "too-large", "zero-grad-norm", "unknown", "missing"],
)
def test_invalid_weights_are_never_written(
    control: ControlFile, path: Path, weights: dict[str, float]
) -> None:
    """A weight the client would refuse raises ChannelError and leaves the previous version in place."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    before = path.read_bytes()
    with pytest.raises(ChannelError, match="refusing to write"):
        control.write(weights, reason="poor_tail", epoch=1)
    assert path.read_bytes() == before
    assert control.version == 1


def test_client_applies_what_the_writer_wrote_and_acknowledges(control: ControlFile, path: Path) -> None:
    """A version written here is applied by ConfigReloader, whose ack read_ack returns."""
    control.write({**WEIGHTS, "max_grad_norm": 2.0}, reason="initial", epoch=None)
    ns: dict[str, float] = {}
    ConfigReloader(path).apply(ns, epoch=7)
    assert ns == {**WEIGHTS, "max_grad_norm": 2.0}
    ack = control.read_ack()
    assert ack is not None
    assert (ack.version, ack.epoch, ack.pid, ack.applied) == (1, 7, os.getpid(), ns)


def test_read_returns_the_valid_file_only(control: ControlFile, path: Path) -> None:
    """read() returns the file's version when valid and None when it is not."""
    assert control.read() is None
    written = control.write(WEIGHTS, reason="initial", epoch=None)
    assert control.read() == written
    replace_with(path, '{"lambda_dol": 0.5')
    assert control.read() is None


def test_restore_if_missing_rewrites_the_same_version(control: ControlFile, path: Path) -> None:
    """A vanished file comes back byte for byte; a present one is left alone."""
    assert control.restore_if_missing() is False
    control.write(WEIGHTS, reason="initial", epoch=None)
    before = path.read_bytes()
    assert control.restore_if_missing() is False
    path.unlink()
    assert control.restore_if_missing() is True
    assert path.read_bytes() == before
    assert (path.stat().st_mode & 0o777) == 0o644
    assert leftovers(path.parent) == []


# -- many rewrites, a concurrent reader ------------------------------------------------------------

READER = textwrap.dedent(
    """
    import json, os, sys
    path, stop = sys.argv[1], sys.argv[2]
    keys = ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl", "version")
    reads = bad = missing = backwards = last = 0
    done = False
    while not done:
        done = os.path.exists(stop)  # one more read after the writer stopped: the last version
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            missing += 1
            continue
        except ValueError:
            bad += 1
            continue
        if not isinstance(doc, dict) or any(k not in doc for k in keys):
            bad += 1
            continue
        backwards += doc["version"] < last
        last = doc["version"]
        reads += 1
        if reads == 1:
            print("reading", flush=True)
    print(json.dumps({"reads": reads, "bad": bad, "missing": missing, "backwards": backwards, "last": last}))
    """
)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory where there is one: fsync on a busy disk can take milliseconds."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="autotune-test-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_concurrent_reader_never_sees_a_partial_file(fast_dir: Path) -> None:
    """A second process reading in a tight loop during 10,000 rewrites sees only whole, valid versions."""
    path = fast_dir / "auto_tune_config.json"
    stop = fast_dir / "stop"
    with ControlFile(path, run_id="run-1") as control:
        control.write(WEIGHTS, reason="initial", epoch=None)
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(stop)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "reading"
            for i in range(10_000):
                control.write({**WEIGHTS, "lambda_col": (i % 10) / 10}, reason="stagnation", epoch=i)
        finally:
            stop.touch()
            out, _ = reader.communicate(timeout=60)
    counts = json.loads(out.splitlines()[-1])
    assert counts["bad"] == 0
    assert counts["missing"] == 0
    assert counts["backwards"] == 0
    assert counts["reads"] > 0
    assert counts["last"] == control.version == 10_001
    assert leftovers(path.parent) == []


# -- failures -------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, so a write can really run out of space."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_disk_full_keeps_the_old_file(tiny_tmpfs: Path) -> None:
    """When the disk is full the write fails cleanly: old file intact, no temp file, version kept."""
    path = tiny_tmpfs / "ctl.json"
    with ControlFile(path, run_id="run-1") as control:
        control.write(WEIGHTS, reason="initial", epoch=None)
        before = path.read_bytes()
        filler = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(filler, b"x" * 4096)
        finally:
            os.close(filler)
        with pytest.raises(ChannelError, match="No space left on device"):
            control.write({**WEIGHTS, "lambda_col": 0.4}, reason="poor_tail", epoch=3)
        assert path.read_bytes() == before
        assert control.version == 1
        assert leftovers(tiny_tmpfs) == []


def test_failed_write_is_one_line(control: ControlFile, path: Path) -> None:
    """A write that cannot happen says so in one line naming the file."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    path.unlink()
    path.mkdir()
    with pytest.raises(ChannelError) as err:
        control.write(WEIGHTS, reason="poor_tail", epoch=2)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert leftovers(path.parent) == []


# -- lock -------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from autotune_rt.channel import ControlFile
    ControlFile(sys.argv[1], run_id="holder").acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_second_supervisor_is_refused_until_the_holder_dies(path: Path) -> None:
    """Another process's lock stops acquire at once naming its pid; once it is killed, acquire works."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        second = ControlFile(path, run_id="run-2")
        with pytest.raises(LockHeldError) as err:
            second.acquire()
        assert err.value.pid == holder.pid
        assert str(err.value) == (
            f"control file {path} is in use by autotune-rt pid {holder.pid}; "
            "stop it or pass --config_file <other path>"
        )
    finally:
        holder.kill()
        holder.communicate()  # reaps it and closes the pipes
    with second:
        assert second.lock_path.read_text().strip() == str(os.getpid())
        second.write(WEIGHTS, reason="initial", epoch=None)


def test_acquire_is_idempotent_and_release_frees(path: Path) -> None:
    """acquire twice is harmless; after release another ControlFile can take the lock."""
    first = ControlFile(path, run_id="a")
    first.acquire()
    first.acquire()
    with pytest.raises(LockHeldError):
        ControlFile(path, run_id="b").acquire()
    first.release()
    with ControlFile(path, run_id="b"):
        pass


def test_acquire_forgets_a_stale_ack(path: Path) -> None:
    """An ack left by an earlier run is removed so it is never taken for this run's."""
    Path(f"{path}.ack").write_text('{"version": 1}')
    with ControlFile(path, run_id="a") as control:
        assert control.read_ack() is None


# -- /tmp safety ------------------------------------------------------------------------------------


def test_planted_symlink_is_refused(path: Path, tmp_path: Path) -> None:
    """A symlink at the control path is refused and its target is never touched."""
    target = tmp_path / "victim"
    target.write_text("precious")
    path.symlink_to(target)
    with pytest.raises(ChannelError, match="is a symlink"):
        ControlFile(path, run_id="a").acquire()
    assert target.read_text() == "precious"


def test_symlink_planted_between_writes_is_refused(control: ControlFile, path: Path, tmp_path: Path) -> None:
    """A symlink that appears after acquire is refused at the next write."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    target = tmp_path / "victim"
    target.write_text("precious")
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(ChannelError, match="is a symlink"):
        control.write(WEIGHTS, reason="poor_tail", epoch=1)
    assert target.read_text() == "precious"
    assert path.is_symlink()


def test_planted_lock_symlink_is_refused(path: Path, tmp_path: Path) -> None:
    """A symlink at the lock path is refused rather than followed."""
    target = tmp_path / "victim"
    target.write_text("precious")
    Path(f"{path}.lock").symlink_to(target)
    with pytest.raises(ChannelError, match=r"lock file .* is a symlink"):
        ControlFile(path, run_id="a").acquire()
    assert target.read_text() == "precious"


def test_file_of_another_user_is_refused(path: Path) -> None:
    """A control file owned by someone else is not taken over."""
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path.write_text("{}")
    os.chown(path, 65534, 65534)
    with pytest.raises(ChannelError, match="is owned by uid 65534; remove it or pass --config_file"):
        ControlFile(path, run_id="a").acquire()


def test_writable_mode_is_refused(path: Path) -> None:
    """A group- or world-writable mode is rejected up front."""
    with pytest.raises(ChannelError, match="0o664"):
        ControlFile(path, run_id="a", mode=0o664)


# -- watcher ----------------------------------------------------------------------------------------


class Recorder:
    """Collects watcher events from the watchdog thread and lets the test wait for one."""

    def __init__(self) -> None:
        self.events: list[ChannelEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: ChannelEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[ChannelEvent], bool]) -> ChannelEvent:
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((e for e in self.events if predicate(e)), None), timeout=TIMEOUT
            )
        assert found is not None, f"no matching event within {TIMEOUT}s; got {self.events}"
        return found

    def kinds(self) -> list[str]:
        with self._changed:
            return [e.kind for e in self.events]


@pytest.fixture
def recorder(control: ControlFile) -> Iterator[Recorder]:
    rec = Recorder()
    watcher = ChannelWatcher(control, rec)
    watcher.start()
    try:
        yield rec
    finally:
        watcher.stop()


def test_deletion_is_reported(control: ControlFile, path: Path, recorder: Recorder) -> None:
    """Removing the control file produces a "deleted" event, after which it can be restored."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    path.unlink()
    recorder.wait_for(lambda e: e.kind == "deleted")
    assert control.restore_if_missing() is True


def test_manual_edit_is_reported_and_adopted(control: ControlFile, path: Path, recorder: Recorder) -> None:
    """A replaced file that we did not write is a manual edit with the new and old weights; ours are not."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    control.write({**WEIGHTS, "lambda_col": 0.4}, reason="poor_tail", epoch=3)
    edited = {**WEIGHTS, "lambda_col": 0.45, "version": 2}
    replace_with(path, json.dumps(edited))
    event = recorder.wait_for(lambda e: e.kind == "manual_edit")
    assert event.config is not None
    assert event.config.lambda_col == 0.45
    assert event.config.version == 2
    assert event.previous == {**WEIGHTS, "lambda_col": 0.4}
    assert recorder.kinds() == ["manual_edit"]
    assert control.last_written == event.config
    path.unlink()
    recorder.wait_for(lambda e: e.kind == "deleted")
    assert control.restore_if_missing() is True
    assert json.loads(path.read_text()) == edited


def test_partial_manual_edit_merges(control: ControlFile, path: Path, recorder: Recorder) -> None:
    """A hand-written file with only some keys is adopted merged onto the weights in effect."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    replace_with(path, '{"lambda_scl": 0.25}')
    event = recorder.wait_for(lambda e: e.kind == "manual_edit")
    assert event.config is not None
    assert event.config.weights == {**WEIGHTS, "lambda_scl": 0.25}
    assert event.config.reason == "manual edit"


def test_in_place_edit_is_reported_once(control: ControlFile, path: Path, recorder: Recorder) -> None:
    """An editor writing the file in place yields one manual edit; an invalid edit yields none."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    replace_with(path, '{"lambda_col": NaN}')
    path.write_text(json.dumps({**WEIGHTS, "lambda_hier": 1.8}))
    recorder.wait_for(lambda e: e.kind == "manual_edit")
    path.unlink()  # a marker: its event comes after every event of the edits above
    recorder.wait_for(lambda e: e.kind == "deleted")
    assert recorder.kinds() == ["manual_edit", "deleted"]


def test_ack_is_reported(control: ControlFile, path: Path, recorder: Recorder) -> None:
    """The training's acknowledgement arrives as an "ack" event carrying the version applied."""
    control.write(WEIGHTS, reason="initial", epoch=None)
    ConfigReloader(path).apply({}, epoch=4)
    event = recorder.wait_for(lambda e: e.kind == "ack")
    assert isinstance(event.ack, Ack)
    assert (event.ack.version, event.ack.epoch) == (1, 4)


def test_control_config_rejects_non_finite() -> None:
    """The model itself refuses NaN and infinity."""
    with pytest.raises(ValueError, match="finite"):
        ControlConfig(
            **{**WEIGHTS, "lambda_col": float("nan")},
            version=1,
            updated_at="2024-01-01T00:00:00Z",
            reason="x",
            epoch=None,
            run_id="r",
        )
