"""Structured JSON event log (structlog) for a run: one object per line, flushed per event."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import structlog
from structlog.typing import EventDict

__all__ = ["EventLog", "json_safe"]

# The keys every event starts with, in this order, so `tail -f | jq -c` stays readable.
_LEADING_KEYS = ("ts", "level", "event", "run_id")


def json_safe(value: Any) -> Any:
    """Return *value* with non-finite floats as strings, so the output stays valid JSON.

    ``json.dumps`` writes ``NaN``/``Infinity`` by default, which ``jq`` rejects.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _timestamp(_: Any, __: str, event_dict: EventDict) -> EventDict:
    now = _dt.datetime.now(_dt.timezone.utc)
    event_dict["ts"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event_dict


def _order_and_sanitize(_: Any, __: str, event_dict: EventDict) -> EventDict:
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return {key: json_safe(value) for key, value in ordered.items()}


class EventLog:
    """The run's ``events.jsonl``: every event has ``ts``, ``level``, ``event`` and ``run_id``.

    A local structlog logger (no global configuration), so a library user's own structlog
    setup is left alone and several runs in one process (tests) do not interfere.
    """

    def __init__(self, path: Path, run_id: str, **context: Any) -> None:
        self.path = path
        self.run_id = run_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._log = structlog.wrap_logger(
            structlog.WriteLogger(self._file),  # writes a line and flushes per event
            processors=[
                structlog.processors.add_log_level,
                _timestamp,
                _order_and_sanitize,
                structlog.processors.JSONRenderer(sort_keys=False, ensure_ascii=False),
            ],
            context_class=dict,
        ).bind(run_id=run_id, **context)

    def bind(self, **context: Any) -> None:
        """Add *context* to every later event (for example ``trial=3``)."""
        self._log = self._log.bind(**context)

    def unbind(self, *keys: str) -> None:
        """Remove *keys* from the context of later events."""
        self._log = self._log.try_unbind(*keys)

    def info(self, event: str, **fields: Any) -> None:
        """Log an ``info`` event."""
        if not self._file.closed:
            self._log.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log a ``warning`` event."""
        if not self._file.closed:
            self._log.warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log an ``error`` event."""
        if not self._file.closed:
            self._log.error(event, **fields)

    def close(self) -> None:
        """Flush and close the file; later events are dropped."""
        if not self._file.closed:
            self._file.close()
