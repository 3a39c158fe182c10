"""Tests for autotune_rt.client: the stdlib-only reloader used inside train.py."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from autotune_rt import client
from autotune_rt.client import DEFAULT_CONFIG_FILE, ENV_VAR, ConfigReloader

GOOD = {"lambda_dol": 0.5, "lambda_col": 0.3, "lambda_hier": 1.5, "lambda_scl": 0.2}
METADATA = {"updated_at": "2024-01-01T00:00:00.000Z", "reason": "initial", "epoch": None, "run_id": "r1"}


def put(path: Path, content: str | bytes | dict[str, Any], *, mode: int = 0o644) -> None:
    """Replace ``path`` atomically, as the supervisor does."""
    data = json.dumps(content) if isinstance(content, dict) else content
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def doc(version: int, **weights: Any) -> dict[str, Any]:
    """A full control file: the good weights overridden by ``weights``."""
    return {**GOOD, **weights, "version": version, **METADATA}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "auto_tune_config.json"


@pytest.fixture
def reloader(path: Path) -> Iterator[ConfigReloader]:
    """A reloader that has already taken version 1 (the good weights)."""
    put(path, doc(1))
    r = ConfigReloader(path)
    assert r.poll() == GOOD
    yield r


def warnings_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("autotune-rt:")]


# -- path resolution ----------------------------------------------------------------------------


def test_path_defaults_to_the_seed_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an argument or environment variable the seed's /tmp path is used."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert ConfigReloader().path == DEFAULT_CONFIG_FILE == "/tmp/auto_tune_config.json"


def test_path_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """$AUTOTUNE_CONFIG_FILE, set by the supervisor for its child, overrides the default."""
    monkeypatch.setenv(ENV_VAR, str(path))
    assert ConfigReloader().path == str(path)


def test_path_argument_wins(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """An explicit path (str or PathLike) beats the environment variable."""
    monkeypatch.setenv(ENV_VAR, "/nowhere.json")
    assert ConfigReloader(path).path == str(path)


# -- reading ------------------------------------------------------------------------------------


def test_missing_file_is_no_change(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file returns None without a warning, and a file that appears later is read."""
    r = ConfigReloader(path)
    assert r.poll() is None
    assert r.apply(argparse.Namespace(), epoch=0) == {}
    put(path, doc(1))
    assert r.poll() == GOOD
    assert r.version == 1
    assert warnings_of(capsys) == []


def test_unchanged_file_returns_none(reloader: ConfigReloader) -> None:
    """A second poll without a rewrite returns None."""
    assert reloader.poll() is None


def test_unchanged_old_file_costs_one_stat(
    path: Path, reloader: ConfigReloader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the file is old and unchanged, poll stats it and opens nothing."""
    os.utime(path, ns=(0, 1_000_000_000))
    assert reloader.poll() is None  # the signature changed, so this one re-reads
    opened: list[object] = []
    real_open = os.open

    def counting_open(*args: Any, **kwargs: Any) -> int:
        opened.append(args)
        return real_open(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", counting_open)
        assert reloader.poll() is None
    assert opened == []


def rewrite_in_place(path: Path, content: dict[str, Any]) -> None:
    """Rewrite keeping the inode, size and mtime: the worst case for stat-based detection."""
    before = path.stat()
    data = json.dumps(content).encode()
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_ino == before.st_ino


@pytest.mark.parametrize("coarse", [False, True], ids=["ns-timestamps", "coarse-timestamps"])
def test_two_equal_size_rewrites_between_calls_are_seen(
    path: Path, reloader: ConfigReloader, monkeypatch: pytest.MonkeyPatch, coarse: bool
) -> None:
    """Two same-size rewrites of the same inode between polls still yield the newest version."""
    if coarse:
        # A filesystem whose only timestamp is a whole-second mtime: the stat signature of
        # every rewrite below is identical, so only the re-read of a recent file can see it.
        monkeypatch.setattr(client, "_signature", lambda st: (st.st_ino, st.st_size, st.st_mtime_ns // 10**9))
    put(path, doc(2, lambda_col=0.1))
    assert reloader.poll() is not None
    rewrite_in_place(path, doc(3, lambda_col=0.2))
    rewrite_in_place(path, doc(4, lambda_col=0.4))
    assert reloader.poll() == {**GOOD, "lambda_col": 0.4}
    assert reloader.version == 4
    assert reloader.poll() is None


def test_partial_file_merges_onto_current_values(path: Path, reloader: ConfigReloader) -> None:
    """A file with only some keys changes those keys and keeps the others."""
    put(path, {"version": 2, "lambda_col": 0.4})
    assert reloader.poll() == {**GOOD, "lambda_col": 0.4}


def test_integers_count_and_null_means_absent(path: Path, reloader: ConfigReloader) -> None:
    """An integer is a number; a null weight leaves the current value alone."""
    put(path, doc(2, lambda_hier=2, lambda_col=None, max_grad_norm=1))
    assert reloader.poll() == {**GOOD, "lambda_hier": 2.0, "max_grad_norm": 1.0}


def test_bounds_can_be_widened(path: Path) -> None:
    """A caller-supplied bound replaces the default range for that key."""
    put(path, doc(1, lambda_hier=250.0))
    assert ConfigReloader(path, bounds={"lambda_hier": (0.0, 500.0)}).poll() == {**GOOD, "lambda_hier": 250.0}


# -- bad files ------------------------------------------------------------------------------------


def _chown_other(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    put(path, doc(2, lambda_col=0.9))
    os.chown(path, 65534, 65534)


def _symlink(path: Path) -> None:
    target = path.with_name("planted.json")
    put(target, doc(2, lambda_col=0.9))
    path.unlink()
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o644)


BAD_FILES: dict[str, Callable[[Path], None]] = {
    "nan": lambda p: put(p, '{"version": 2, "lambda_col": NaN}'),
    "infinity": lambda p: put(p, '{"version": 2, "lambda_col": Infinity}'),
    "1e999": lambda p: put(p, '{"version": 2, "lambda_col": 1e999}'),
    "string": lambda p: put(p, doc(2, lambda_col="2.5")),
    "true": lambda p: put(p, doc(2, lambda_col=True)),
    "list-value": lambda p: put(p, doc(2, lambda_col=[0.4])),
    "out-of-range": lambda p: put(p, doc(2, lambda_col=150.0)),
    "negative": lambda p: put(p, doc(2, lambda_col=-0.1)),
    "zero-grad-norm": lambda p: put(p, doc(2, max_grad_norm=0)),
    "huge-int": lambda p: put(p, '{"version": 2, "lambda_col": 1' + "0" * 400 + "}"),
    "list": lambda p: put(p, "[]"),
    "number": lambda p: put(p, "3"),
    "empty": lambda p: put(p, ""),
    "truncated": lambda p: put(p, '{"version": 2, "lambda_col": 0.'),
    "not-utf8": lambda p: put(p, b'{"version": 2, "lambda_col": "\xff"}'),
    "other-owner": _chown_other,
    "world-writable": lambda p: put(p, doc(2, lambda_col=0.9), mode=0o666),
    "group-writable": lambda p: put(p, doc(2, lambda_col=0.9), mode=0o664),
    "symlink": _symlink,
    "fifo": _fifo,
}


@pytest.mark.parametrize("make_bad", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_keeps_values_with_one_warning(
    path: Path, reloader: ConfigReloader, capsys: pytest.CaptureFixture[str], make_bad: Callable[[Path], None]
) -> None:
    """A bad or unsafe version is ignored with exactly one warning, and a later good one is taken."""
    reloader.apply({})
    capsys.readouterr()
    make_bad(path)
    for _ in range(3):
        assert reloader.poll() is None
        assert reloader.apply({}, epoch=5) == {}
    assert reloader.values == GOOD
    assert reloader.version == 1
    warnings = warnings_of(capsys)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"autotune-rt: ignoring {path}")
    assert "; keeping " in warnings[0]
    if path.is_fifo():
        path.unlink()
    put(path, doc(3, lambda_col=0.4))
    assert reloader.poll() == {**GOOD, "lambda_col": 0.4}


def test_warning_names_the_key_and_the_kept_value(
    path: Path, reloader: ConfigReloader, capsys: pytest.CaptureFixture[str]
) -> None:
    """The warning says which key was wrong, how, and what value stays in effect."""
    capsys.readouterr()
    put(path, doc(7, lambda_col="2.5"))
    reloader.poll()
    assert warnings_of(capsys) == [
        f'autotune-rt: ignoring {path} version 7: lambda_col is "2.5" (a string), not a number; '
        "keeping lambda_col=0.3"
    ]


def test_unknown_key_is_ignored_with_one_warning(
    path: Path, reloader: ConfigReloader, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown key is warned about once and skipped; the known keys of that version apply."""
    capsys.readouterr()
    put(path, doc(2, lamda_col=0.9))
    assert reloader.poll() == GOOD
    assert reloader.poll() is None
    warnings = warnings_of(capsys)
    assert len(warnings) == 1
    assert '"lamda_col"' in warnings[0]


def test_metadata_keys_are_not_warned_about(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """version, updated_at, reason, epoch and run_id are expected and silent."""
    put(path, doc(1, epoch=3))
    ConfigReloader(path).poll()
    assert warnings_of(capsys) == []


def test_directory_at_the_path_never_raises(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory where the file should be is refused with one warning, not an exception."""
    path.mkdir()
    r = ConfigReloader(path)
    assert r.poll() is None
    assert r.poll() is None
    assert len(warnings_of(capsys)) == 1


# -- apply and acknowledge -------------------------------------------------------------------------


class Model:
    lambda_dol = 0.5
    lambda_col = 0.3


@pytest.mark.parametrize(
    "make",
    [
        Model,
        lambda: {"lambda_dol": 0.5, "lambda_col": 0.3},
        lambda: argparse.Namespace(lambda_dol=0.5, lambda_col=0.3),
    ],
    ids=["object", "dict", "namespace"],
)
def test_apply_sets_changed_keys(path: Path, make: Callable[[], Any]) -> None:
    """apply sets the changed known keys on an object, a dict or a Namespace and reports them."""
    obj = make()
    put(path, doc(1, lambda_col=0.4))
    changes = ConfigReloader(path).apply(obj, epoch=3)
    assert changes == {"lambda_col": (0.3, 0.4), "lambda_hier": (None, 1.5), "lambda_scl": (None, 0.2)}
    get = obj.get if isinstance(obj, dict) else lambda k: getattr(obj, k)
    assert (get("lambda_dol"), get("lambda_col"), get("lambda_hier")) == (0.5, 0.4, 1.5)


def test_apply_twice_changes_nothing(path: Path) -> None:
    """Without a new version apply returns {} and leaves the object alone."""
    put(path, doc(1))
    r = ConfigReloader(path)
    ns = argparse.Namespace(**GOOD)
    assert r.apply(ns) == {}
    ns.lambda_col = 0.9  # the training's own change is not undone
    assert r.apply(ns) == {}
    assert ns.lambda_col == 0.9


def test_poll_then_apply_still_applies(path: Path) -> None:
    """Values returned by poll are still applied by the next apply."""
    put(path, doc(1))
    r = ConfigReloader(path)
    assert r.poll() == GOOD
    ns = argparse.Namespace()
    assert set(r.apply(ns)) == set(GOOD)


def test_ack_is_written_after_apply(path: Path) -> None:
    """apply writes <config>.ack with the version, epoch, pid, time and values, leaving no temp file."""
    put(path, doc(4, lambda_col=0.4))
    ConfigReloader(path).apply(argparse.Namespace(), epoch=12)
    ack = json.loads(Path(f"{path}.ack").read_text())
    assert ack["version"] == 4
    assert ack["epoch"] == 12
    assert ack["pid"] == os.getpid()
    assert isinstance(ack["time"], float)
    assert ack["applied"] == {**GOOD, "lambda_col": 0.4}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.ack"]


def test_ack_is_not_group_writable_under_a_loose_umask(path: Path) -> None:
    """With umask 002 the ack is still 0644, so the supervisor, which refuses writable files, trusts it."""
    put(path, doc(1))
    old = os.umask(0o002)
    try:
        ConfigReloader(path).apply({})
    finally:
        os.umask(old)
    assert Path(f"{path}.ack").stat().st_mode & 0o777 == 0o644


def test_no_ack_when_disabled(path: Path) -> None:
    """ack=False writes nothing beside the control file."""
    put(path, doc(1))
    ConfigReloader(path, ack=False).apply({})
    assert not Path(f"{path}.ack").exists()


def test_ack_failure_is_silent_after_one_warning(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An ack that cannot be written warns once, leaves no temp file and does not stop apply."""
    Path(f"{path}.ack").mkdir()
    r = ConfigReloader(path)
    put(path, doc(1))
    assert r.apply({}) != {}
    put(path, doc(2, lambda_col=0.4))
    assert r.apply({}) != {}
    warnings = warnings_of(capsys)
    assert len(warnings) == 1
    assert ".ack" in warnings[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.ack"]


# -- import weight ---------------------------------------------------------------------------------


def test_import_pulls_in_no_heavy_module() -> None:
    """Importing the client in a fresh interpreter loads none of the supervisor's dependencies."""
    code = textwrap.dedent(
        """
        import json, sys
        import autotune_rt.client
        from autotune_rt import ConfigReloader
        heavy = ("pydantic", "structlog", "psutil", "watchdog", "asyncio", "torch")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


# -- torchrun --------------------------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent(
    """
    import argparse, json, sys
    import torch
    import torch.distributed as dist
    from autotune_rt.client import ConfigReloader

    dist.init_process_group("gloo")
    reloader = ConfigReloader(sys.argv[1])
    ns = argparse.Namespace(lambda_col=0.3)
    changes = reloader.apply(ns, epoch=2)
    print(json.dumps({"rank": dist.get_rank(), "changes": changes, "version": reloader.version}))
    dist.barrier()
    dist.destroy_process_group()
    """
)


class FakeDistributed:
    """Stands in for torch.distributed in one process: rank 0 fills ``wire``, other ranks read it."""

    def __init__(self, rank: int, wire: list[Any]) -> None:
        self.rank = rank
        self.wire = wire

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_rank(self) -> int:
        return self.rank

    def broadcast_object_list(self, box: list[Any], src: int = 0) -> None:
        assert src == 0
        if self.rank == 0:
            self.wire[:] = box
        else:
            box[:] = self.wire


def test_distributed_ranks_share_rank0s_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a process group up, only rank 0 reads and acknowledges; the others apply what it sent."""
    shared = tmp_path / "ctl.json"
    put(shared, doc(3, lambda_col=0.4))
    wire: list[Any] = []
    torch = argparse.Namespace(distributed=FakeDistributed(0, wire))
    monkeypatch.setitem(sys.modules, "torch", torch)
    rank0 = ConfigReloader(shared)
    assert rank0.apply(argparse.Namespace(lambda_col=0.3), epoch=2)["lambda_col"] == (0.3, 0.4)
    torch.distributed = FakeDistributed(1, wire)
    rank1 = ConfigReloader(tmp_path / "never-read.json")
    assert rank1.apply(argparse.Namespace(lambda_col=0.3), epoch=2)["lambda_col"] == (0.3, 0.4)
    assert rank1.version == 3
    assert Path(f"{shared}.ack").exists()
    assert not (tmp_path / "never-read.json.ack").exists()


def test_torchrun_rank0_reads_and_broadcasts(tmp_path: Path) -> None:
    """Under torch.distributed every rank applies rank 0's version, and only rank 0 acknowledges."""
    pytest.importorskip("torch")
    shared = tmp_path / "ctl.json"
    put(shared, doc(3, lambda_col=0.4))
    # Rank 1 points at a file that does not exist: it can only learn the weights from rank 0.
    paths = [shared, tmp_path / "rank1-never-read.json"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(paths[rank])],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=90)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outputs:
        assert out["changes"]["lambda_col"] == [0.3, 0.4]
        assert out["version"] == 3
    assert json.loads(Path(f"{shared}.ack").read_text())["pid"] == procs[0].pid
    assert not Path(f"{paths[1]}.ack").exists()
