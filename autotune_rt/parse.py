"""Metric-line parsing: one line of training output -> EpochMetrics or None; pure, never raises."""

from __future__ import annotations

import re
from dataclasses import dataclass

from autotune_rt.exceptions import ConfigError

__all__ = ["MAX_LINE_CHARS", "EpochMetrics", "LineParser", "parse_line"]

# The seed's epoch line is ~100 characters and a dict of several hundred metrics stays under
# ~20 KiB, while parsing cost grows linearly with length (~1.5 us a token): anything longer is
# a dump or a progress bar, and the cap bounds what one crafted line can cost (~0.1 s).
# Bytes are measured before decoding, so multi-byte text reaches the cap a little sooner.
MAX_LINE_CHARS = 64 * 1024
# Deeper than any metrics dict, shallow enough that `[[[[...` stops long before recursion matters.
_MAX_DEPTH = 8
# A float repr is at most ~24 characters; int() of > 4300 digits raises on Python >= 3.11.
_MAX_NUMBER_CHARS = 400
# '{' positions tried per line when text precedes the dict; each try is linear, so this bounds
# the total cost of a line full of braces.
_MAX_DICT_STARTS = 4
# How far before the dict an `Epoch N[...]:` prefix is looked for; longer than any real prefix.
_PREFIX_WINDOW = 128
_MAX_EPOCH = 10**9

# One token of the Python-literal / JSON subset; `punct` tokens use the character as their kind.
_TOKEN_RE = re.compile(
    r"""\s*(?:
    (?P<num>[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)
    |(?P<name>[-+]?[A-Za-z_][\w.]*)
    |(?P<str>'[^'\\\n]*(?:\\.[^'\\\n]*)*'|"[^"\\\n]*(?:\\.[^"\\\n]*)*")
    |(?P<angle><[^<>\n]{0,200}>)
    |(?P<punct>[{}\[\]():,=])
    )""",
    re.VERBOSE,
)
# Scalar wrappers whose single argument is the value: numpy 2 reprs and torch tensors.
_WRAPPER_RE = re.compile(
    r"(?:np|numpy)\.(?:float(?:16|32|64|96|128)?|u?int(?:8|16|32|64)?|u?longlong|u?intc|u?intp"
    r"|half|single|double|longdouble|bool_?|str_)|tensor|array"
)
_NONFINITE = {
    f"{sign}{word}": float(f"{sign or '+'}{word}")
    for sign in ("", "-", "+")
    for word in ("nan", "inf", "infinity")
}
_CONSTANTS: dict[str, float | None] = {
    "True": 1.0,
    "False": 0.0,
    "None": None,
    "true": 1.0,
    "false": 0.0,
    "null": None,
    "np.True_": 1.0,
    "np.False_": 0.0,
    "numpy.True_": 1.0,
    "numpy.False_": 0.0,
}
_KEY_NAMES = frozenset({"True", "False", "None"})
_ESCAPE_RE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}

_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# torchrun `[rank0]:` / `[default0]:`, mpirun --tag-output `[1,0]<stdout>:`, srun -l `0: `.
_LAUNCHER_RE = re.compile(
    r"(?:\s*(?:\[(?:rank|default)?[0-9]{1,6}\]:|\[[0-9]{1,6},[0-9]{1,6}\]<std(?:out|err)>:"
    r"|[0-9]{1,6}:(?=\s)))+\s*"
)
# Bounded whitespace: three adjacent unbounded `\s*` would backtrack quadratically on a long run
# of spaces after `epoch 1`.
_EPOCH_SRC = (
    r"\bepoch\s{0,8}([0-9]{1,9})(?:\s{0,8}/\s{0,8}([0-9]{1,9}))?\s{0,8}(?:\[[^\[\]\n]{0,64}\])?\s{0,8}:"
)
_EPOCH_RE = re.compile(_EPOCH_SRC, re.IGNORECASE)
_EPOCH_BEFORE_DICT_RE = re.compile(_EPOCH_SRC + r"\s*\Z", re.IGNORECASE)
# `key=value` / `key: value`; the look-behind starts keys only at the start of a word and never
# inside quotes (that is dict syntax); the look-ahead refuses versions, ratios and clock times
# (`1.2.3`, `3/10`, `12:30`).
_KV_RE = re.compile(
    r"""(?<![\w./'"-])([A-Za-z_][\w./-]*)\s*[=:]\s*"""
    r"([-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|(?i:nan|inf(?:inity)?)))"
    r"(?![\w.:/])"
)


@dataclass(frozen=True, slots=True)
class EpochMetrics:
    """The metrics one output line carried.

    Attributes:
        metrics: Numeric values by name; ints and bools become floats, nan and inf are kept,
            nested dicts are flattened with '.' (`val.acc`).
        epoch: From the `Epoch N[...]:` prefix, else from the line's own `epoch` value when it
            is a whole number; None otherwise (e.g. Hugging Face's fractional `epoch: 0.5`).
        total: The epoch count when the line says it (`Epoch 3/50:`); None otherwise.
    """

    metrics: dict[str, float]
    epoch: int | None
    total: int | None = None


class _Malformed(Exception):
    """The text is not something the reader accepts (internal; never leaves this module)."""


class _Reader:
    """Recursive-descent reader for the Python-literal / JSON subset that metric dicts use.

    Numeric leaves go to ``out`` under their dotted key; everything else is parsed (so that
    malformed text is rejected) and dropped. Nothing is ever evaluated.
    """

    __slots__ = ("_kind", "_s", "_text", "out", "pos")

    def __init__(self, s: str, pos: int) -> None:
        self._s = s
        self.pos = pos
        self._kind = ""
        self._text = ""
        self.out: dict[str, float] = {}

    def read_dict(self) -> dict[str, float]:
        """Read a dict that must run to the end of the text."""
        self._advance()
        self._expect("{")
        self._dict(1, "")
        self._expect("eof")
        return self.out

    def read_scalar(self) -> float | None:
        """Read a single scalar that must be the whole text."""
        self._advance()
        self._value(1, "")
        self._expect("eof")
        return self.out.get("")

    def _advance(self) -> None:
        if self.pos >= len(self._s):
            self._kind = "eof"
            return
        m = _TOKEN_RE.match(self._s, self.pos)
        if m is None:
            raise _Malformed
        kind = m.lastgroup
        text = m.group(kind) if kind else ""
        self._kind = text if kind == "punct" else (kind or "")
        self._text = text
        self.pos = m.end()

    def _expect(self, kind: str) -> None:
        if self._kind != kind:
            raise _Malformed
        if kind != "eof":
            self._advance()

    def _record(self, key: str | None, value: float | None) -> None:
        if key is not None and value is not None:
            self.out[key] = value

    def _value(self, depth: int, key: str | None) -> None:
        kind, text = self._kind, self._text
        self._advance()
        if kind == "num":
            if len(text) > _MAX_NUMBER_CHARS:
                raise _Malformed
            self._record(key, float(text))
        elif kind == "name":
            self._name(text, depth, key)
        elif kind == "{":
            self._dict(depth + 1, key)
        elif kind == "[" or kind == "(":
            self._seq(depth + 1, "]" if kind == "[" else ")")
        elif kind != "str" and kind != "angle":  # strings and `<object reprs>` are dropped
            raise _Malformed

    def _name(self, text: str, depth: int, key: str | None) -> None:
        special = _NONFINITE.get(text.lower())
        if special is not None:
            self._record(key, special)
        elif text in _CONSTANTS:
            self._record(key, _CONSTANTS[text])
        elif self._kind == "(" and _WRAPPER_RE.fullmatch(text) and depth < _MAX_DEPTH:
            self._advance()
            self._value(depth + 1, key)
            # Keyword arguments (`device='cuda:0'`, `dtype=torch.float64`, `grad_fn=<...>`).
            while self._kind == ",":
                self._advance()
                if self._kind == ")":
                    break
                self._expect("name")
                self._expect("=")
                if self._kind not in ("str", "num", "name", "angle"):
                    raise _Malformed
                self._advance()
            self._expect(")")
        else:
            raise _Malformed

    def _dict(self, depth: int, prefix: str | None) -> None:
        if depth > _MAX_DEPTH:
            raise _Malformed
        while self._kind != "}":
            key = self._key()
            self._expect(":")
            self._value(depth, None if prefix is None else f"{prefix}.{key}" if prefix else key)
            if self._kind != ",":
                break
            self._advance()
        self._expect("}")

    def _seq(self, depth: int, closer: str) -> None:
        if depth > _MAX_DEPTH:
            raise _Malformed
        while self._kind != closer:
            self._value(depth, None)
            if self._kind != ",":
                break
            self._advance()
        self._expect(closer)

    def _key(self) -> str:
        kind, text = self._kind, self._text
        self._advance()
        if kind == "str":
            return _unescape(text[1:-1])
        if (kind == "num" and len(text) <= _MAX_NUMBER_CHARS) or (kind == "name" and text in _KEY_NAMES):
            return text  # `{1: ...}` -> '1'
        raise _Malformed


def _unescape(body: str) -> str:
    if "\\" not in body:
        return body
    text = _ESCAPE_RE.sub(_escape_char, body)
    # JSON writes astral characters as surrogate pairs: join them, replace any left alone.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _escape_char(m: re.Match[str]) -> str:
    code = m.group(1) or m.group(2) or m.group(3)
    if code:
        value = int(code, 16)
        return chr(value) if value <= 0x10FFFF else "\ufffd"
    char = m.group(4)
    if char in "\\'\"":
        return char
    return _SIMPLE_ESCAPES.get(char, "\\" + char)  # unknown escapes keep the backslash, as Python does


def _as_epoch(value: float | None) -> int | None:
    if value is not None and value.is_integer() and 0 <= value <= _MAX_EPOCH:
        return int(value)
    return None


def _clean(line: str | bytes) -> str | None:
    """Decode and strip line endings, `\\r` redraws, ANSI codes and launcher prefixes."""
    truncated = len(line) > MAX_LINE_CHARS
    if truncated:
        # A progress bar redrawn with '\r' all epoch long is one huge "line" whose last
        # redraw may still be a metric line; only that tail can matter (+2: a '\r\n').
        line = line[-(MAX_LINE_CHARS + 2) :]
    text = line if isinstance(line, str) else line.decode("utf-8", "replace")
    text = text.rstrip()
    cut = text.rfind("\r")
    if cut >= 0:
        text = text[cut + 1 :]
    elif truncated:
        return None
    if len(text) > MAX_LINE_CHARS:
        return None
    if "\x1b" in text:
        text = _ANSI_RE.sub("", text).rstrip()
    launcher = _LAUNCHER_RE.match(text)
    if launcher:
        text = text[launcher.end() :]
    return text


def _parse_dict_line(text: str) -> EpochMetrics | None:
    if not text.endswith("}"):
        return None  # the dict must be the line's last thing
    start = text.find("{")
    # Failed tries are paid for in characters read, so a line of nested braces that each
    # fail late costs about two passes, not _MAX_DICT_STARTS.
    budget = len(text)
    for _ in range(_MAX_DICT_STARTS):
        if start < 0 or budget < 0:
            return None
        reader = _Reader(text, start)
        try:
            metrics = reader.read_dict()
        except _Malformed:
            budget -= reader.pos - start
            start = text.find("{", start + 1)
            continue
        if not metrics:
            return None
        prefix = _EPOCH_BEFORE_DICT_RE.search(text, max(0, start - _PREFIX_WINDOW), start)
        epoch = int(prefix.group(1)) if prefix else _as_epoch(metrics.get("epoch"))
        return EpochMetrics(metrics, epoch, _total(prefix))
    return None


def _parse_key_values(text: str) -> EpochMetrics | None:
    prefix = _EPOCH_RE.search(text)
    epoch = int(prefix.group(1)) if prefix else None
    total = _total(prefix)
    # Pairs inside the prefix (`Epoch 3[t=12]:`) describe the line, not the model.
    skip = range(prefix.start(), prefix.end()) if prefix else range(0)
    metrics: dict[str, float] = {}
    for pair in _KV_RE.finditer(text):
        key, value = pair.group(1), pair.group(2)
        if pair.start() not in skip and len(value) <= _MAX_NUMBER_CHARS:
            metrics[key] = float(value)
            if epoch is None and key.lower() == "epoch":
                epoch = _as_epoch(metrics[key])
    return EpochMetrics(metrics, epoch, total) if metrics else None


def _total(prefix: re.Match[str] | None) -> int | None:
    """The `M` of an `Epoch N/M:` prefix."""
    return int(prefix.group(2)) if prefix is not None and prefix.group(2) else None


def _parse_scalar(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return _Reader(text, 0).read_scalar()
    except _Malformed:
        return None


def _parse_pattern(pattern: re.Pattern[str], text: str) -> EpochMetrics | None:
    match = pattern.search(text)
    if match is None:
        return None
    metrics: dict[str, float] = {}
    for name, raw in match.groupdict().items():
        value = None if raw is None else _parse_scalar(raw)
        if value is not None:
            metrics[name] = value
    return EpochMetrics(metrics, _as_epoch(metrics.get("epoch"))) if metrics else None


class LineParser:
    """Turns lines of training output into `EpochMetrics`.

    Always understood: a Python dict literal or JSON object that ends the line, optionally
    after an `Epoch N[T s]:` prefix or other text (the seed's epoch line, Hugging Face logs).
    Values may be numbers, nan/inf, bools, numpy 2 scalar reprs and `tensor(...)`; strings,
    lists and None are dropped. The text is read by a whitelisting reader, never evaluated.

    Attributes:
        needles: A raw line that contains none of these bytes can never parse, so a caller
            may skip it (or a whole chunk) without calling `parse`. Empty when a user
            pattern is set: then no pre-filter is possible.
    """

    __slots__ = ("_key_value", "_pattern", "_str_needles", "needles")

    def __init__(self, *, key_value: bool = False, pattern: str | None = None) -> None:
        """Build a parser.

        Args:
            key_value: Also accept `key=value` / `key: value` pairs with numeric values
                (`epoch=3 loss=0.5`, `epoch: 3, loss: 0.5 | acc1: 0.41`).
            pattern: A regular expression with named groups, used instead of the built-in
                formats: each group that reads as a number is a metric, `epoch` gives the epoch.

        Raises:
            ConfigError: The pattern is not a valid regex, has no named groups, or is
                combined with key_value.
        """
        self._key_value = key_value
        self._pattern: re.Pattern[str] | None = None
        if pattern is not None:
            if key_value:
                raise ConfigError("a metric pattern and key=value parsing cannot be combined; use one")
            try:
                self._pattern = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"invalid metric pattern {pattern!r}: {exc}; fix the regex") from None
            if not self._pattern.groupindex:
                raise ConfigError(
                    f"metric pattern {pattern!r} has no named groups; name them, e.g. (?P<loss>[0-9.]+)"
                )
        self.needles: tuple[bytes, ...]
        if self._pattern is not None:
            self.needles = ()
        elif key_value:
            self.needles = (b"{", b"=", b":")
        else:
            self.needles = (b"{",)
        self._str_needles = tuple(needle.decode() for needle in self.needles)

    def parse(self, line: str | bytes) -> EpochMetrics | None:
        """Parse one line of output.

        Args:
            line: One line, with or without its line ending; bytes are read as UTF-8 with
                undecodable bytes replaced.

        Returns:
            The metrics it carries, or None when it carries none or is malformed, too long
            (`MAX_LINE_CHARS`) or hostile. Never raises.
        """
        if isinstance(line, str):
            if self._str_needles and not any(needle in line for needle in self._str_needles):
                return None
        elif isinstance(line, (bytes, bytearray)):
            if self.needles and not any(needle in line for needle in self.needles):
                return None
        else:
            return None
        text = _clean(line)
        if text is None:
            return None
        if self._pattern is not None:
            return _parse_pattern(self._pattern, text)
        found = _parse_dict_line(text)
        if found is None and self._key_value:
            found = _parse_key_values(text)
        return found


_DEFAULT_PARSER = LineParser()


def parse_line(line: str | bytes) -> EpochMetrics | None:
    """Parse one line with the default `LineParser` (dict literals and JSON objects).

    Args:
        line: One line of output, str or bytes.

    Returns:
        The metrics it carries, or None. Never raises.
    """
    return _DEFAULT_PARSER.parse(line)
