"""Per-stream helpers of the child-process layer: line splitting, recent lines, terminal echo.

Each works on the raw bytes of one of the child's streams, chunk by chunk, in bounded memory,
and never decodes on the hot path.
"""

from __future__ import annotations

import collections
import os
import select
import threading
from collections.abc import Callable
from itertools import pairwise
from typing import IO

__all__ = ["RECENT_LINES", "LineSplitter", "RecentLines", "TerminalWriter"]

# How many of the last output lines are kept for crash reports.
RECENT_LINES = 100


class LineSplitter:
    """Cuts one stream's chunks into complete lines with bounded memory.

    Both ``\n`` and ``\r`` end a line here (the parser only ever reads the text after the
    last ``\r``). Lines longer than ``max_line_bytes`` are skipped up to the next newline. With needles,
    a run of complete lines that holds none of them costs one ``bytes.find`` per needle.
    """

    def __init__(
        self, emit: Callable[[bytes], None], needles: tuple[bytes, ...], max_line_bytes: int
    ) -> None:
        self._emit = emit
        self._needles = needles
        self._max = max_line_bytes
        self._partial = bytearray()
        self._skipping = False
        self.too_long = 0  # lines holding a needle that were too long to hand over

    def _wanted(self, line: bytes | bytearray) -> bool:
        return not self._needles or any(needle in line for needle in self._needles)

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the stream."""
        if b"\r" in chunk:
            # A carriage return redraws the line, so what follows it is a line of its own: an
            # epoch line printed after a long progress bar must not drown in the bar.
            chunk = chunk.replace(b"\r", b"\n")
        pos = 0
        if self._skipping:
            pos = chunk.find(b"\n") + 1
            if pos == 0:
                return
            self._skipping = False
        if self._partial:
            end = chunk.find(b"\n", pos)
            if end < 0:
                self._keep(chunk, pos)
                return
            if len(self._partial) + end - pos <= self._max:
                line = bytes(self._partial) + chunk[pos:end]
                if self._wanted(line):
                    self._emit(line)
            elif self._wanted(self._partial):
                self.too_long += 1
            self._partial.clear()
            pos = end + 1
        last = chunk.rfind(b"\n", pos)
        if last >= 0:
            if self._needles:
                self._emit_needled(chunk, pos, last)
            else:
                for line in chunk[pos:last].split(b"\n"):
                    if len(line) <= self._max:
                        self._emit(line)
                    else:
                        self.too_long += 1
            pos = last + 1
        self._keep(chunk, pos)

    def _emit_needled(self, chunk: bytes, start: int, stop: int) -> None:
        """Hand over the lines of ``chunk[start:stop]`` (whole lines) that hold a needle."""
        while start < stop:
            hits = [i for needle in self._needles if (i := chunk.find(needle, start, stop)) >= 0]
            if not hits:
                return
            hit = min(hits)
            begin = chunk.rfind(b"\n", start, hit) + 1 or start
            end = chunk.find(b"\n", hit, stop + 1)
            if end - begin <= self._max:
                self._emit(chunk[begin:end])
            else:
                self.too_long += 1
            start = end + 1

    def _keep(self, chunk: bytes, pos: int) -> None:
        if len(self._partial) + len(chunk) - pos > self._max:
            if self._wanted(self._partial) or self._wanted(chunk[pos : pos + self._max]):
                self.too_long += 1
            self._partial.clear()
            self._skipping = True
        else:
            self._partial += chunk[pos:]

    def close(self) -> None:
        """End of stream: a last line without newline still counts."""
        if self._partial and not self._skipping:
            line = bytes(self._partial)
            if self._wanted(line):
                self._emit(line)
        self._partial.clear()


class RecentLines:
    """Keeps the last lines of one stream (each cut to its last bytes) for crash reports."""

    def __init__(self, ring: collections.deque[bytes], line_bytes: int) -> None:
        self._ring = ring
        self._cap = line_bytes
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the stream."""
        cap = self._cap
        last = chunk.rfind(b"\n")
        if last < 0:
            self._partial = (self._partial + chunk[-cap:])[-cap:]
            return
        # Only the newest lines can survive in the ring: find their ends walking backwards.
        ends = [last]
        limit = self._ring.maxlen or RECENT_LINES
        while len(ends) < limit:
            prev = chunk.rfind(b"\n", 0, ends[-1])
            if prev < 0:
                break
            ends.append(prev)
        ends.reverse()
        before = chunk.rfind(b"\n", 0, ends[0])
        if before < 0:
            first = (self._partial + chunk[max(0, ends[0] - cap) : ends[0]])[-cap:]
        else:
            first = chunk[max(before + 1, ends[0] - cap) : ends[0]]
        self._ring.append(first)
        self._ring.extend(chunk[max(a + 1, b - cap) : b] for a, b in pairwise(ends))
        self._partial = chunk[last + 1 :][-cap:]

    def close(self) -> bool:
        """End of stream; returns whether it ended with an unterminated line."""
        unterminated = bool(self._partial)
        if unterminated:
            self._ring.append(self._partial)
            self._partial = b""
        return unterminated


class TerminalWriter:
    """Copies one stream to a terminal from its own thread, so a stuck terminal stalls nothing.

    Chunks wait in a bounded queue; past the bound they are dropped and counted, and a
    one-line notice follows once the terminal has caught up. A broken sink (EPIPE, closed)
    silently discards the rest.
    """

    def __init__(self, sink: IO[bytes], name: str, limit: int, where: str) -> None:
        self._sink = sink
        self._limit = limit
        self._where = where
        self._cond = threading.Condition()
        self._queue: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._unreported = 0
        self._stopping = False
        self._broken = False
        self.dropped = 0
        try:
            sink.flush()  # what the supervisor printed before must come first
            self._fd: int | None = sink.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None
        # Written with os.write, not the buffered object: a daemon thread blocked inside a
        # BufferedWriter would hold its lock and abort the interpreter at exit.
        self._thread = threading.Thread(target=self._run, name=f"autotune-rt-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        with self._cond:
            if self._broken or self._stopping:
                self.dropped += len(chunk)
            elif self._pending + len(chunk) > self._limit:
                self.dropped += len(chunk)
                self._unreported += len(chunk)
            else:
                self._queue.append(chunk)
                self._pending += len(chunk)
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _next(self) -> bytes | None:
        with self._cond:
            while not (self._queue or self._unreported or self._stopping):
                self._cond.wait()
            if self._queue:
                chunk = self._queue.popleft()
                self._pending -= len(chunk)
                return chunk
            if self._unreported:
                notice = (
                    f"\n[autotune-rt: {self._unreported} bytes not shown on the terminal; see {self._where}]"
                )
                self._unreported = 0
                return notice.encode() + b"\n"
            return None

    def _run(self) -> None:
        while (chunk := self._next()) is not None:
            try:
                self._write(chunk)
            except (OSError, ValueError):
                with self._cond:
                    self._broken = True
                    self.dropped += self._pending
                    self._queue.clear()
                    self._pending = 0
                return

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._sink.write(data)
            self._sink.flush()
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                # Someone else made the terminal non-blocking; we still must not spin.
                select.select([], [self._fd], [], 1.0)
                continue
            view = view[written:]
