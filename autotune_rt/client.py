"""Hot-reload the tuner's loss weights inside ``train.py``: standard library only, never raises."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["DEFAULT_CONFIG_FILE", "ENV_VAR", "KNOWN_KEYS", "ConfigReloader"]

DEFAULT_CONFIG_FILE = "/tmp/auto_tune_config.json"
ENV_VAR = "AUTOTUNE_CONFIG_FILE"
KNOWN_KEYS = ("lambda_dol", "lambda_col", "lambda_hier", "lambda_scl", "max_grad_norm")

# Written by the supervisor next to the weights; expected, so never warned about.
METADATA_KEYS = frozenset({"version", "updated_at", "reason", "epoch", "run_id"})

# Inclusive ranges; max_grad_norm must also be > 0 (a clipping bound of 0 zeroes every gradient).
DEFAULT_BOUNDS: Mapping[str, tuple[float, float]] = {
    "lambda_dol": (0.0, 100.0),
    "lambda_col": (0.0, 100.0),
    "lambda_hier": (0.0, 100.0),
    "lambda_scl": (0.0, 100.0),
    "max_grad_norm": (0.0, math.inf),
}

# A control file is a few hundred bytes; anything this big is not ours.
_MAX_BYTES = 1 << 20

# Timestamps can be as coarse as the kernel tick (or 1-2 s on some filesystems): a file whose
# mtime was this close to the moment we looked at it may be rewritten without changing its
# stat signature, so it is re-read (and compared byte for byte) until it is older than this.
_RACY_WINDOW_NS = 2_000_000_000


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """Return what a rewrite must change: the writer's os.replace gives a new inode every time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _describe(value: object) -> str:
    """Return a short human description of a JSON value for a warning."""
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null"}
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    for cls, name in kind.items():
        if type(value) is cls:
            return f"{text} ({name})"
    return text


def _check_value(name: str, raw: object, bounds: Mapping[str, tuple[float, float]]) -> float | str:
    """Return ``raw`` as a float, or a one-phrase reason why it is not acceptable."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return f"{name} is {_describe(raw)}, not a number"
    try:
        value = float(raw)
    except OverflowError:
        return f"{name} is too large"
    if not math.isfinite(value):
        return f"{name} is {value!r}, not a finite number"
    low, high = bounds.get(name, DEFAULT_BOUNDS[name])
    if not low <= value <= high:
        return f"{name} is {value!r}, outside [{low:g}, {high:g}]"
    if name == "max_grad_norm" and value <= 0:
        return f"max_grad_norm is {value!r}, must be > 0"
    return value


def _parse(
    data: bytes, bounds: Mapping[str, tuple[float, float]]
) -> tuple[dict[str, float], int | None, list[tuple[str | None, str]], list[str]]:
    """Parse a control file's bytes.

    Args:
        data: The file's content.
        bounds: Inclusive range of each known key.

    Returns:
        ``(values, version, problems, unknown)``: the known keys present (``null`` counts as
        absent), the ``version`` if it is an integer, the ``(key or None, reason)`` pairs for
        which the whole version must be ignored (empty when it is good), and the unknown keys.
    """
    if not data.strip():
        return {}, None, [(None, "the file is empty")], []
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return {}, None, [(None, f"it is not valid JSON ({exc})")], []
    if not isinstance(doc, dict):
        return {}, None, [(None, f"it holds {_describe(doc)}, not a JSON object")], []
    raw_version = doc.get("version")
    version = raw_version if isinstance(raw_version, int) and not isinstance(raw_version, bool) else None
    values: dict[str, float] = {}
    problems: list[tuple[str | None, str]] = []
    for name in KNOWN_KEYS:
        raw = doc.get(name)
        if raw is None:
            continue
        checked = _check_value(name, raw, bounds)
        if isinstance(checked, str):
            problems.append((name, checked))
        else:
            values[name] = checked
    unknown = sorted(k for k in doc if k not in KNOWN_KEYS and k not in METADATA_KEYS)
    return values, version, problems, unknown


def _dist() -> Any:
    """Return ``torch.distributed`` when a process group is up, else None; never imports torch."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist
    except Exception:  # a half-imported or exotic torch build must not break the training
        return None
    return None


class ConfigReloader:
    """Re-read the control file once per epoch and apply the weights that changed.

    Typical use in ``train.py``::

        reloader = ConfigReloader()            # before the loop
        for epoch in range(epochs):
            reloader.apply(args.model, epoch=epoch)
            ...

    Nothing here raises: a missing file means no change, a bad or unsafe file is ignored with
    one warning on stderr, and the last good values stay. Under ``torchrun`` (when
    ``torch.distributed`` is already imported and initialised) rank 0 reads the file and
    broadcasts what it found, so every rank must call :meth:`poll`/:meth:`apply` at the same
    point, as with any collective.

    Attributes:
        path: The control file.
        values: The merged weights of every good version seen so far.
        version: The ``version`` of the last good file, or None.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        ack: bool = True,
        bounds: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        """Create a reloader; reads nothing yet.

        Args:
            path: The control file; defaults to ``$AUTOTUNE_CONFIG_FILE``, else
                ``/tmp/auto_tune_config.json``.
            ack: Write ``<path>.ack`` after applying a new version.
            bounds: Inclusive ``(low, high)`` per key, replacing the default range
                (weights in [0, 100], max_grad_norm > 0) for the keys given.
        """
        self.path = os.fspath(path) if path is not None else os.environ.get(ENV_VAR) or DEFAULT_CONFIG_FILE
        self.ack_path = self.path + ".ack"
        self.values: dict[str, float] = {}
        self.version: int | None = None
        self._ack = ack
        self._bounds: dict[str, tuple[float, float]] = {**DEFAULT_BOUNDS, **(bounds or {})}
        self._signature: tuple[int, ...] | None = None
        self._racy = False
        self._content: bytes | None = None
        self._last_warning: object = None
        self._ack_warned = False
        self._unapplied = False

    # -- public API -------------------------------------------------------------------------

    def poll(self) -> dict[str, float] | None:
        """Return the full merged weights if a new good version appeared since the last call.

        Returns:
            A copy of :attr:`values` when a new good version was read, else None (no file,
            nothing changed, or the new version was bad and ignored with a warning).
        """
        dist = _dist()
        found = self._safe_read() if dist is None else self._broadcast(dist)
        if found is None:
            return None
        self.values, self.version = found
        self._unapplied = True
        return dict(self.values)

    def apply(self, obj: object, epoch: int | None = None) -> dict[str, tuple[Any, float]]:
        """Set the weights of a new version on ``obj`` and acknowledge it.

        Args:
            obj: A mutable mapping (items are set) or any other object, such as an argparse
                ``Namespace`` or a model (attributes are set).
            epoch: The training's current epoch, recorded in the acknowledgement.

        Returns:
            ``{name: (old, new)}`` for each known key whose value changed on ``obj``; ``{}``
            when there was no new version or it changed nothing.
        """
        self.poll()
        if not self._unapplied:
            return {}
        self._unapplied = False
        changes: dict[str, tuple[Any, float]] = {}
        for name, new in self.values.items():
            old = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
            if _same(old, new):
                continue
            try:
                if isinstance(obj, MutableMapping):
                    obj[name] = new
                else:
                    setattr(obj, name, new)
            except Exception as exc:  # a read-only attribute must not stop the training
                self._warn(("set", name), f"cannot set {name} on {type(obj).__name__}: {exc}")
                continue
            changes[name] = (old, new)
        if self._ack and self._is_rank0():
            self._write_ack(epoch)
        return changes

    # -- reading ----------------------------------------------------------------------------

    def _broadcast(self, dist: Any) -> tuple[dict[str, float], int | None] | None:
        """Read on rank 0 and hand the same result to every rank."""
        try:
            box: list[Any] = [self._safe_read() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            found: tuple[dict[str, float], int | None] | None = box[0]
            return found
        except Exception as exc:
            self._warn(("broadcast", type(exc)), f"cannot share the control file between ranks: {exc}")
            return None

    def _is_rank0(self) -> bool:
        dist = _dist()
        try:
            return dist is None or int(dist.get_rank()) == 0
        except Exception:
            return True

    def _safe_read(self) -> tuple[dict[str, float], int | None] | None:
        try:
            return self._read()
        except Exception as exc:  # the promise is: never raise inside the training loop
            self._warn(("internal", repr(exc)), f"cannot read {self.path}: {exc!r}; keeping the last values")
            return None

    def _read(self) -> tuple[dict[str, float], int | None] | None:
        """Return ``(merged values, version)`` of a new good version, else None."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            self._signature = None
            return None
        except OSError as exc:
            self._refuse(("stat", exc.errno), None, f"cannot stat it ({exc.strerror})")
            return None
        signature = _signature(st)
        if signature == self._signature and not self._racy:
            return None
        if stat.S_ISLNK(st.st_mode):
            self._signature, self._racy = signature, False
            self._refuse(("unsafe", signature), None, "it is a symlink (possibly planted); remove it")
            return None
        data = self._read_bytes()
        if data is None:
            return None
        if data == self._content:
            return None
        self._content = data
        values, version, problems, unknown = _parse(data, self._bounds)
        if problems:
            reason = "; ".join(text for _, text in problems)
            self._refuse(("bad", data), version, reason, [k for k, _ in problems if k is not None])
            return None
        if unknown:
            names = ", ".join(json.dumps(k) for k in unknown)
            self._warn(
                ("unknown", data),
                f"{self.path}{_version_text(version)}: ignoring unknown key {names} "
                f"(known: {', '.join(KNOWN_KEYS)})",
            )
        return {**self.values, **values}, version

    def _read_bytes(self) -> bytes | None:
        """Open without following symlinks or blocking, check the owner and mode, read."""
        # O_NONBLOCK: a FIFO planted at the path must not hang the training.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        started = time.time_ns()
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            self._signature = None
            return None
        except OSError as exc:
            reason = (
                "it is a symlink (possibly planted); remove it" if exc.errno == errno.ELOOP else exc.strerror
            )
            self._signature = None
            self._refuse(("open", exc.errno), None, f"cannot open it ({reason})")
            return None
        try:
            st = os.fstat(fd)
            signature = _signature(st)
            self._signature = signature
            self._racy = st.st_mtime_ns >= started - _RACY_WINDOW_NS
            unsafe = self._unsafe(st)
            if unsafe:
                self._refuse(("unsafe", signature), None, unsafe)
                return None
            chunks: list[bytes] = []
            size = 0
            while size <= _MAX_BYTES:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > _MAX_BYTES:
                self._refuse(("unsafe", signature), None, f"it is larger than {_MAX_BYTES} bytes")
                return None
            return b"".join(chunks)
        except OSError as exc:
            self._refuse(("read", exc.errno), None, f"cannot read it ({exc.strerror})")
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _unsafe(st: os.stat_result) -> str | None:
        """Return why a file with this status must not be trusted, or None."""
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        # root-owned files are trusted: only root could have planted them.
        if st.st_uid not in (os.geteuid(), 0):
            return f"it is owned by uid {st.st_uid}, not {os.geteuid()}; remove it"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o}); chmod go-w it"
        return None

    # -- warnings and acknowledgements ------------------------------------------------------

    def _refuse(self, key: object, version: int | None, reason: str, names: list[str] | None = None) -> None:
        """Warn once that a version is ignored, naming the values kept (of ``names``, else all)."""
        kept_values = {k: v for k, v in self.values.items() if not names or k in names}
        if kept_values:
            kept = ", ".join(f"{k}={v:g}" for k, v in kept_values.items())
        else:
            kept = "the training's own values"
        self._warn(key, f"ignoring {self.path}{_version_text(version)}: {reason}; keeping {kept}")

    def _warn(self, key: object, message: str) -> None:
        """Print ``message`` on stderr unless the same problem was just reported."""
        if key == self._last_warning:
            return
        self._last_warning = key
        try:
            sys.stderr.write(f"autotune-rt: {message}\n")
            sys.stderr.flush()
        except Exception:  # a closed stderr is no reason to stop a training
            pass

    def _write_ack(self, epoch: int | None) -> None:
        """Atomically write ``<path>.ack``; best effort, at most one warning ever."""
        record = {
            "version": self.version,
            "epoch": epoch,
            "pid": os.getpid(),
            "time": time.time(),
            "applied": self.values,
        }
        directory, name = os.path.split(self.ack_path)
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                # Explicit, as a umask of 002 would make it group-writable, which the supervisor refuses.
                os.fchmod(fd, 0o644)
                os.write(fd, json.dumps(record).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.ack_path)
        except Exception as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._ack_warned:
                self._ack_warned = True
                self._warn(("ack",), f"cannot write the acknowledgement {self.ack_path}: {exc}")


def _same(old: object, new: float) -> bool:
    """Compare without trusting ``==`` to return a bool (tensors and arrays do not)."""
    try:
        return bool(old == new)
    except Exception:
        return False


def _version_text(version: int | None) -> str:
    return f" version {version}" if version is not None else ""
