"""The supervisor's side of the control file: model, atomic writer, single-writer lock, watcher."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from autotune_rt.client import _MAX_BYTES, DEFAULT_BOUNDS, KNOWN_KEYS, _parse
from autotune_rt.exceptions import ChannelError, LockHeldError

__all__ = ["Ack", "ChannelEvent", "ChannelWatcher", "ControlConfig", "ControlFile"]

_WEIGHT_LIMIT = DEFAULT_BOUNDS["lambda_dol"][1]  # the client refuses anything above this
_OTHER_PATH_HINT = "pass --config_file <other path>"
# How many of our own recent writes the watcher recognises; its events may lag a few writes.
_RECENT_WRITES = 64


class ControlConfig(BaseModel):
    """One version of the control file: the weights plus who wrote them, when and why."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid", frozen=True)

    lambda_dol: float = Field(ge=0, le=_WEIGHT_LIMIT)
    lambda_col: float = Field(ge=0, le=_WEIGHT_LIMIT)
    lambda_hier: float = Field(ge=0, le=_WEIGHT_LIMIT)
    lambda_scl: float = Field(ge=0, le=_WEIGHT_LIMIT)
    max_grad_norm: float | None = Field(default=None, gt=0)
    version: int = Field(ge=0)
    updated_at: str
    reason: str
    epoch: int | None
    run_id: str

    @property
    def weights(self) -> dict[str, float]:
        """The weights present in this version, by name."""
        return {k: v for k in KNOWN_KEYS if (v := getattr(self, k)) is not None}

    def to_json(self) -> bytes:
        """Serialise with the weights as top-level keys; an absent max_grad_norm is omitted.

        ``null`` would break the seed's ``config.get('max_grad_norm', default)`` snippet.
        """
        doc: dict[str, Any] = self.weights
        doc.update(self.model_dump(include={"version", "updated_at", "reason", "epoch", "run_id"}))
        return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()


@dataclass(frozen=True)
class Ack:
    """What the training's ``ConfigReloader`` wrote after applying a version."""

    version: int | None
    epoch: int | None
    pid: int | None
    time: float | None
    applied: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelEvent:
    """Something happened to the control file that the supervisor did not do itself.

    Attributes:
        kind: ``"ack"`` (the training applied a version), ``"deleted"`` (call
            :meth:`ControlFile.restore_if_missing`) or ``"manual_edit"`` (someone else wrote
            the file; it is already adopted as :attr:`ControlFile.last_written`).
        ack: The acknowledgement, for ``"ack"``.
        config: The edited file merged onto the previous weights, for ``"manual_edit"``.
        previous: The weights before the edit, for ``"manual_edit"``.
    """

    kind: Literal["ack", "deleted", "manual_edit"]
    ack: Ack | None = None
    config: ControlConfig | None = None
    previous: dict[str, float] | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _one_line(exc: ValidationError) -> str:
    """Flatten a pydantic error into ``field=value: problem; ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "value"
        if err["type"] != "missing":
            where += f"={err.get('input')!r}"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _read_safely(path: Path) -> bytes | None:
    """Read a small regular file we (or root) own, never following a symlink; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        # The same refusals as the client's: what the training would ignore is never adopted.
        trusted = st.st_uid in (os.geteuid(), 0) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if not stat.S_ISREG(st.st_mode) or not trusted or st.st_size > _MAX_BYTES:
            return None
        # Not a 1 MiB buffer for a 200-byte file on every epoch; the extra byte makes a file
        # that grew since fstat (an edit in place) read short and fail to parse, like a torn one.
        return os.read(fd, min(st.st_size + 1, _MAX_BYTES))
    except OSError:
        return None
    finally:
        os.close(fd)


def _content_key(weights: Mapping[str, float], version: int | None) -> tuple[object, ...]:
    return (tuple(sorted(weights.items())), version)


class ControlFile:
    """The single writer of one control file.

    Every write is atomic and durable (temp file in the same directory, fsync, ``os.replace``,
    fsync of the directory) and the file is never group- or world-writable. An exclusive
    ``flock`` on ``<path>.lock``, held from :meth:`acquire` to :meth:`release`, keeps a second
    supervisor off the same path; the kernel drops it when the holder dies.

    Attributes:
        path: The control file.
        ack_path: ``<path>.ack``, written by the training's ``ConfigReloader``.
        lock_path: ``<path>.lock``, holding the owner's pid.
        version: The version of the last write (0 before the first).
        last_written: The content now in effect: the last write, or an adopted manual edit.
    """

    def __init__(self, path: str | Path, run_id: str, *, mode: int = 0o644) -> None:
        """Describe the control file; touches nothing until :meth:`acquire`.

        Args:
            path: The control file; made absolute, symlinks are not resolved.
            run_id: Written into every version, so a reader can tell runs apart.
            mode: Permission bits of the file; must not be group- or world-writable.

        Raises:
            ChannelError: ``mode`` is group- or world-writable.
        """
        if mode & 0o022:
            raise ChannelError(
                f"mode {mode:#o} would let others rewrite the control file; use 0o644 or 0o600"
            )
        self.path = Path(os.path.abspath(path))
        self.ack_path = self.path.with_name(self.path.name + ".ack")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.run_id = run_id
        self.mode = mode
        self.version = 0
        self.last_written: ControlConfig | None = None
        self._last_bytes: bytes | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()  # the watcher thread reads what write() updates
        self._ours: deque[tuple[object, ...]] = deque(maxlen=_RECENT_WRITES)

    def __enter__(self) -> ControlFile:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- lock and safety -----------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock and check that the path is safe to write; does nothing if held.

        Raises:
            LockHeldError: Another live process holds the lock.
            ChannelError: The path, or its lock file, is a symlink, not a regular file, or
                owned by another user; or the directory cannot be used.
        """
        if self._lock_fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ChannelError(
                    f"lock file {self.lock_path} is a symlink; remove it or {_OTHER_PATH_HINT}"
                ) from None
            raise ChannelError(
                f"cannot create lock file {self.lock_path}: {exc.strerror}; {_OTHER_PATH_HINT}"
            ) from None
        try:
            self._check_owner(self.lock_path, os.fstat(fd))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                holder = f"autotune-rt pid {pid}" if pid else "another autotune-rt process"
                raise LockHeldError(
                    f"control file {self.path} is in use by {holder}; stop it or {_OTHER_PATH_HINT}",
                    pid=pid,
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._check_path()
            self._remove_stale_ack()
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock; the lock file stays (unlinking it would race a new holder)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _check_owner(self, path: Path, st: os.stat_result) -> None:
        if st.st_uid != os.geteuid():
            raise ChannelError(f"{path} is owned by uid {st.st_uid}; remove it or {_OTHER_PATH_HINT}")

    def _check_path(self) -> None:
        """Refuse a symlink, a non-file or another user's file at the control path."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ChannelError(f"cannot inspect {self.path}: {exc.strerror}; {_OTHER_PATH_HINT}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ChannelError(
                f"control file {self.path} is a symlink (possibly planted by someone else); "
                f"remove it or {_OTHER_PATH_HINT}"
            )
        if not stat.S_ISREG(st.st_mode):
            raise ChannelError(
                f"control file {self.path} is not a regular file; remove it or {_OTHER_PATH_HINT}"
            )
        self._check_owner(self.path, st)

    def _remove_stale_ack(self) -> None:
        """Forget an acknowledgement left by an earlier run, so it is never taken for ours."""
        with contextlib.suppress(OSError):
            if os.lstat(self.ack_path).st_uid == os.geteuid():
                os.unlink(self.ack_path)

    # -- writing ---------------------------------------------------------------------------

    def write(self, weights: Mapping[str, float], *, reason: str, epoch: int | None) -> ControlConfig:
        """Write the next version atomically.

        Args:
            weights: ``lambda_dol``, ``lambda_col``, ``lambda_hier``, ``lambda_scl`` and
                optionally ``max_grad_norm``; finite, in the client's bounds.
            reason: Why these weights (``"initial"``, ``"poor_tail"``, ...).
            epoch: The epoch that triggered the change, if any.

        Returns:
            The version written.

        Raises:
            ChannelError: A weight is missing, unknown, not finite or out of bounds; the path
                became unsafe; or the write failed (the previous file is intact and no
                temporary file is left behind).
        """
        self.acquire()
        with self._mutex:
            try:
                config = ControlConfig(
                    **dict(weights),
                    version=self.version + 1,
                    updated_at=_now(),
                    reason=reason,
                    epoch=epoch,
                    run_id=self.run_id,
                )
            except ValidationError as exc:
                raise ChannelError(f"refusing to write {self.path}: {_one_line(exc)}") from None
            data = config.to_json()
            self._ours.append(_content_key(config.weights, config.version))
            self._check_path()
            self._replace(data)
            self.version = config.version
            self.last_written = config
            self._last_bytes = data
            return config

    def restore_if_missing(self) -> bool:
        """Write the content in effect again, same version, if the file has vanished.

        Returns:
            True if the file was missing and has been rewritten.

        Raises:
            ChannelError: The rewrite failed.
        """
        with self._mutex:
            if self._last_bytes is None or os.path.lexists(self.path):
                return False
            return self._replace(self._last_bytes, only_if_missing=True)

    def _replace(self, data: bytes, *, only_if_missing: bool = False) -> bool:
        """Temp file, write, fsync, chmod, then rename over (or link to) the path.

        Returns:
            False if ``only_if_missing`` and a file appeared at the path meanwhile.
        """
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.fchmod(fd, self.mode)
            finally:
                os.close(fd)
            if only_if_missing:
                written = self._link_if_missing(tmp)
            else:
                os.replace(tmp, self.path)
                written = True
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            name = errno.errorcode.get(exc.errno or 0, "error")
            raise ChannelError(
                f"cannot write control file {self.path}: {exc.strerror} ({name}); "
                "free space or fix permissions in that directory; the previous version stays in effect"
            ) from None
        self._sync_directory()
        return written

    def _link_if_missing(self, tmp: Path) -> bool:
        """Put ``tmp`` at the path only if nothing is there now, so a fresh manual file wins."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            os.unlink(tmp)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.replace(tmp, self.path)  # a filesystem without hard links
            return True
        os.unlink(tmp)
        return True

    def _sync_directory(self) -> None:
        """Make the rename durable; the new content is already visible, so failure is not fatal."""
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- reading ---------------------------------------------------------------------------

    def read(self) -> ControlConfig | None:
        """Return the file now at the path if it is a complete, valid version, else None."""
        data = _read_safely(self.path)
        if data is None:
            return None
        try:
            return ControlConfig.model_validate_json(data)
        except ValidationError:
            return None

    def read_ack(self) -> Ack | None:
        """Return the training's last acknowledgement, or None if absent or malformed."""
        data = _read_safely(self.ack_path)
        try:
            doc = json.loads(data) if data is not None else None
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        applied = doc.get("applied")
        return Ack(
            version=_int_or_none(doc.get("version")),
            epoch=_int_or_none(doc.get("epoch")),
            pid=_int_or_none(doc.get("pid")),
            time=float(t) if isinstance((t := doc.get("time")), (int, float)) else None,
            applied={
                k: float(v)
                for k, v in (applied.items() if isinstance(applied, dict) else ())
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
        )

    def _check_edit(self) -> ChannelEvent | None:
        """Adopt the file now at the path if someone other than us wrote it.

        A partial file merges onto the weights in effect; a file the client would refuse is
        ignored (the training prints why).
        """
        data = _read_safely(self.path)
        if data is None:
            return None
        values, version, problems, _ = _parse(data, DEFAULT_BOUNDS)
        if problems or not values:
            return None
        # Keyed on the file's own values: merging first would make a late event for one of
        # our older writes look like an edit.
        key = _content_key(values, version)
        with self._mutex:
            if key in self._ours:
                return None
            previous = self.last_written.weights if self.last_written else {}
            merged = {**previous, **values}
            try:
                doc = json.loads(data)
                config = ControlConfig(
                    **merged,
                    version=version if version is not None and version >= 0 else self.version,
                    updated_at=str(doc.get("updated_at") or _now()),
                    reason=str(doc.get("reason") or "manual edit"),
                    epoch=_int_or_none(doc.get("epoch")),
                    run_id=str(doc.get("run_id") or self.run_id),
                )
            except (ValidationError, ValueError):
                return None  # e.g. a partial file before any write of ours: nothing to merge onto
            self.last_written = config
            self._last_bytes = data
            self.version = max(self.version, config.version)
            self._ours.append(key)
            return ChannelEvent("manual_edit", config=config, previous=previous)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


class ChannelWatcher:
    """Watch the control file's directory and report acks, deletions and manual edits.

    ``on_event`` runs on the watchdog thread: marshal it to the supervisor's loop (for
    example with ``loop.call_soon_threadsafe``) and :meth:`stop` the watcher before closing
    that loop. Our own writes are recognised and not reported.
    """

    def __init__(self, control: ControlFile, on_event: Callable[[ChannelEvent], None]) -> None:
        """Prepare the watcher; nothing is watched until :meth:`start`.

        Args:
            control: The control file to watch; manual edits are adopted into it.
            on_event: Called with each :class:`ChannelEvent`, from the watchdog thread.
        """
        self.control = control
        self.on_event = on_event
        self._observer: BaseObserver | None = None
        self._last_ack: Ack | None = None

    def start(self) -> None:
        """Start watching; falls back to polling where inotify is unavailable.

        Raises:
            ChannelError: The directory cannot be watched at all.
        """
        if self._observer is not None:
            return
        directory = str(self.control.path.parent)
        try:
            self._observer = _start_observer(Observer(), _Handler(self), directory)
        except OSError:  # inotify instances or watches exhausted
            try:
                self._observer = _start_observer(PollingObserver(), _Handler(self), directory)
            except OSError as exc:
                raise ChannelError(f"cannot watch {directory}: {exc}; {_OTHER_PATH_HINT}") from None

    def stop(self) -> None:
        """Stop watching and wait for the watchdog thread to finish."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=10)

    def _dispatch(self, kind: str, src: str, dest: str) -> None:
        """Turn one raw watchdog event into at most one :class:`ChannelEvent`."""
        control = self.control
        path, ack_path = str(control.path), str(control.ack_path)
        target = dest if kind == "moved" else src
        event: ChannelEvent | None = None
        if target == path and kind in ("moved", "created", "modified", "closed"):
            event = control._check_edit()
        elif target == ack_path and kind in ("moved", "created", "closed"):
            ack = control.read_ack()
            if ack is not None and ack != self._last_ack:  # a plain writer fires created and closed
                self._last_ack = ack
                event = ChannelEvent("ack", ack=ack)
        elif src == path and kind in ("deleted", "moved") and not os.path.lexists(path):
            event = ChannelEvent("deleted")
        if event is not None:
            self.on_event(event)


class _Handler(FileSystemEventHandler):
    """Forward every raw watchdog event to the watcher."""

    def __init__(self, watcher: ChannelWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._dispatch(event.event_type, os.fsdecode(event.src_path), os.fsdecode(event.dest_path))


# The events a change of the control or ack file arrives as. Opens, reads and in-place
# modifications of *other* files in the directory (/tmp is busy) would wake the watcher for
# nothing; a write by hand ends with a close, which inotify reports.
_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent]


def _start_observer(observer: BaseObserver, handler: _Handler, directory: str) -> BaseObserver:
    # Polling sees no closes: it reports a changed file as modified.
    events = [*_EVENTS, FileModifiedEvent] if isinstance(observer, PollingObserver) else _EVENTS
    observer.schedule(handler, directory, recursive=False, event_filter=events)
    observer.start()
    return observer
