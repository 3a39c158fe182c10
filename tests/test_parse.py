"""Tests for autotune_rt.parse: every accepted line format, hostile input, and properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune_rt.exceptions import ConfigError
from autotune_rt.parse import MAX_LINE_CHARS, EpochMetrics, LineParser, parse_line

SEED_LINE = (
    "Epoch 10[150.23s]: {'epoch': 10, 'ce': 1.5678, 'acc1': 0.4567, 'head_acc': 0.71, 'tail_acc': 0.18}"
)
SEED_METRICS = {"epoch": 10.0, "ce": 1.5678, "acc1": 0.4567, "head_acc": 0.71, "tail_acc": 0.18}
NAN = math.nan
INF = math.inf
KV = LineParser(key_value=True)
PATTERN = r"it (?P<epoch>\d+) loss=(?P<loss>\S+) acc=(?P<acc>\S+)(?: note=(?P<note>\S+))?"

PROPERTY = settings(max_examples=200, deadline=None)


def assert_parsed(got: EpochMetrics | None, metrics: dict[str, float], epoch: int | None) -> None:
    """Compare a parse result with the expected metrics (nan equals nan) and epoch."""
    assert got is not None
    assert got.epoch == epoch
    assert got.metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        actual = got.metrics[key]
        assert type(actual) is float
        assert actual == value or (math.isnan(actual) and math.isnan(value)), key


DEFAULT_CASES = [
    pytest.param(SEED_LINE, SEED_METRICS, 10, id="seed"),
    pytest.param("Epoch 10: {'loss': 0.5}", {"loss": 0.5}, 10, id="prefix-colon"),
    pytest.param("epoch 10 [12s]: {'loss': 0.5}", {"loss": 0.5}, 10, id="prefix-lower-spaced"),
    pytest.param("Epoch 3/10: {'loss': 0.5}", {"loss": 0.5}, 3, id="prefix-of-total"),
    pytest.param("EPOCH 7 : {'loss': 0.5}", {"loss": 0.5}, 7, id="prefix-upper"),
    pytest.param("Epoch 4: {'epoch': 9, 'loss': 1}", {"epoch": 9.0, "loss": 1.0}, 4, id="prefix-wins"),
    pytest.param(
        "{'loss': 0.51, 'learning_rate': 2e-05, 'epoch': 3.0}",
        {"loss": 0.51, "learning_rate": 2e-05, "epoch": 3.0},
        3,
        id="hf-whole-epoch",
    ),
    pytest.param(
        "{'loss': 0.51, 'grad_norm': 1.2, 'epoch': 0.5}",
        {"loss": 0.51, "grad_norm": 1.2, "epoch": 0.5},
        None,
        id="hf-fractional-epoch",
    ),
    pytest.param("{'loss': 1, 'epoch': -1}", {"loss": 1.0, "epoch": -1.0}, None, id="negative-epoch"),
    pytest.param(
        '{"loss": 0.5, "epoch": 2, "ok": true, "bad": false, "none": null, "s": "x"}',
        {"loss": 0.5, "epoch": 2.0, "ok": 1.0, "bad": 0.0},
        2,
        id="json",
    ),
    pytest.param(
        '{"a": NaN, "b": Infinity, "c": -Infinity}',
        {"a": NAN, "b": INF, "c": -INF},
        None,
        id="json-nonfinite",
    ),
    pytest.param("INFO: {'loss': 0.5}", {"loss": 0.5}, None, id="text-before"),
    pytest.param(
        "2024-05-01 12:00:00,123 INFO Epoch 2[3.1s]: {'loss': 0.5}", {"loss": 0.5}, 2, id="logging-prefix"
    ),
    pytest.param(
        "100%|##########| 50/50 [00:10<00:00, 5.00it/s]{'loss': 0.5}", {"loss": 0.5}, None, id="tqdm-residue"
    ),
    pytest.param("config {a} -> {'loss': 0.5}", {"loss": 0.5}, None, id="braces-before"),
    pytest.param(
        "{'a': np.float64(0.45), 'b': np.float32(0.5), 'c': np.int64(3), 'd': numpy.float64(0.25),"
        " 'e': np.True_, 'f': np.float64(nan), 'g': np.str_('x'), 'h': np.float64(-inf)}",
        {"a": 0.45, "b": 0.5, "c": 3.0, "d": 0.25, "e": 1.0, "f": NAN, "h": -INF},
        None,
        id="numpy-reprs",
    ),
    pytest.param(
        "{'a': tensor(0.45), 'b': tensor(0.5, device='cuda:0'),"
        " 'c': tensor(0.25, device='cuda:0', dtype=torch.float64), 'd': tensor(1.2, grad_fn=<AddBackward0>),"
        " 'e': tensor([1., 2.]), 'f': tensor(nan, requires_grad=True,)}",
        {"a": 0.45, "b": 0.5, "c": 0.25, "d": 1.2, "f": NAN},
        None,
        id="tensor-reprs",
    ),
    pytest.param(
        "{'a': nan, 'b': inf, 'c': -inf, 'd': NaN, 'e': -Infinity}",
        {"a": NAN, "b": INF, "c": -INF, "d": NAN, "e": -INF},
        None,
        id="python-nonfinite",
    ),
    pytest.param(
        "{'a': 3, 'b': True, 'c': False, 'd': -2, 'e': 1e3, 'f': .5, 'g': +1., 'h': 2E-2}",
        {"a": 3.0, "b": 1.0, "c": 0.0, "d": -2.0, "e": 1000.0, "f": 0.5, "g": 1.0, "h": 0.02},
        None,
        id="ints-bools-exponents",
    ),
    pytest.param(
        "{'a': 1, 's': 'str', 'l': [1, 2], 't': (1, 2), 'n': None, 'o': <object at 0x7f>}",
        {"a": 1.0},
        None,
        id="non-numeric-dropped",
    ),
    pytest.param(
        "{'val': {'acc': 0.5, 'deep': {'x': 1}}, 'train': {'loss': 2}}",
        {"val.acc": 0.5, "val.deep.x": 1.0, "train.loss": 2.0},
        None,
        id="nested-flattened",
    ),
    pytest.param("{'a': 1, 'hist': [{'b': 2}]}", {"a": 1.0}, None, id="dict-in-list-dropped"),
    pytest.param(
        "{'a': {'b': {'c': {'d': {'e': {'f': {'g': {'h': 1}}}}}}}, 'z': [[[[[[[2]]]]]]]}",
        {"a.b.c.d.e.f.g.h": 1.0},
        None,
        id="depth-8",
    ),
    pytest.param("{1: 0.5, 'b': 2, True: 3}", {"1": 0.5, "b": 2.0, "True": 3.0}, None, id="non-string-keys"),
    pytest.param(
        r"""{'it\'s': 1, "tab\there": 2, "caf\u00e9": 3, "\ud83d\ude00": 4, 'x\\y': 5}""",
        {"it's": 1.0, "tab\there": 2.0, "café": 3.0, "😀": 4.0, "x\\y": 5.0},
        None,
        id="escaped-keys",
    ),
    pytest.param("{'a': 1, 'b': [1, 2,],}", {"a": 1.0}, None, id="trailing-commas"),
    pytest.param("  {  'a' :1 , 'b':{} }  ", {"a": 1.0}, None, id="whitespace-and-empty-dict"),
]

CLEANING_CASES = [
    pytest.param(SEED_LINE + "\n", id="newline"),
    pytest.param(SEED_LINE + "\r\n", id="crlf"),
    pytest.param(SEED_LINE + "\r", id="trailing-cr"),
    pytest.param("Train 10%|#   |\rTrain 50%|##  |\r" + SEED_LINE + "\r\n", id="cr-redraws"),
    pytest.param(SEED_LINE + "\r   \r\n", id="cleared-redraw-after"),
    pytest.param("\x1b[32mEpoch 10[150.23s]:\x1b[0m " + SEED_LINE[19:] + "\x1b[0m", id="ansi-colour"),
    pytest.param("\x1b[2K\x1b[1A" + SEED_LINE, id="ansi-cursor"),
    pytest.param("\x1b]0;title\x07" + SEED_LINE, id="ansi-osc"),
    pytest.param("[rank0]: " + SEED_LINE, id="torchrun-rank"),
    pytest.param("[default0]:" + SEED_LINE, id="torchrun-default"),
    pytest.param("[default3]:[rank3]: " + SEED_LINE, id="torchrun-both"),
    pytest.param("[1,0]<stdout>:" + SEED_LINE, id="mpirun"),
    pytest.param("0: " + SEED_LINE, id="srun"),
    pytest.param(SEED_LINE.encode(), id="bytes"),
    pytest.param(b"\xff\xfe garbage " + SEED_LINE.encode() + b"\r\n", id="bytes-invalid-utf8-before"),
]

HOSTILE = [
    pytest.param("", id="empty"),
    pytest.param("no braces here", id="no-dict"),
    pytest.param("Epoch 3:", id="prefix-only"),
    pytest.param("{'name': 'x'}", id="no-numeric-values"),
    pytest.param("{}", id="empty-dict"),
    pytest.param("{'a': None, 'b': [1]}", id="only-dropped-values"),
    pytest.param("{'a': __import__('os').system('x')}", id="import-call"),
    pytest.param("{'a': os.system('x')}", id="attribute-call"),
    pytest.param("{'a': eval('1')}", id="eval-call"),
    pytest.param("{'a': (lambda x: x)(1)}", id="lambda"),
    pytest.param("{'a': np.float64}", id="bare-wrapper"),
    pytest.param("{'a': np.float64(1)(2)}", id="wrapper-called-twice"),
    pytest.param("{'a': np.float64(0.5}", id="wrapper-unclosed"),
    pytest.param("{'a': tensor(0.5, device=)}", id="tensor-kwarg-missing"),
    pytest.param("{'a': 1, **b}", id="dict-unpacking"),
    pytest.param("{'a': 1j}", id="complex"),
    pytest.param("{'a': 0x10}", id="hex"),
    pytest.param("{'a': f'x'}", id="f-string"),
    pytest.param("{1, 2}", id="set"),
    pytest.param("{'a':" * 10_000 + "1" + "}" * 10_000, id="deep-dicts"),
    pytest.param("{'a': " + "[" * 10_000 + "]" * 10_000 + "}", id="deep-lists"),
    pytest.param("[" * 10_000 + "{", id="brackets"),
    pytest.param("{'a': {'b': {'c': {'d': {'e': {'f': {'g': {'h': {'i': 1}}}}}}}}}", id="depth-9"),
    pytest.param("{'a': [[[[[[[[1]]]]]]]]}", id="depth-9-lists"),
    pytest.param("{'a': " + "9" * 5_000 + "}", id="5000-digit-int"),
    pytest.param("{'a': " + "9" * 401 + "}", id="401-digit-int"),
    pytest.param("{'a': 1e" + "9" * 5_000 + "}", id="huge-exponent"),
    pytest.param("{'a': 1,", id="truncated-after-comma"),
    pytest.param("{'a': 1", id="truncated"),
    pytest.param("{'a': 1}}", id="extra-close"),
    pytest.param("{'a: 1}", id="unbalanced-quote"),
    pytest.param("""{"a': 1}""", id="mismatched-quotes"),
    pytest.param("{'a': 1 'b': 2}", id="missing-comma"),
    pytest.param("{'a': 1} trailing", id="dict-not-last"),
    pytest.param("{'a': 1}\x00", id="nul-after-dict"),
    pytest.param("{'a': '\n'}", id="newline-in-string"),
    pytest.param("x" * (5 << 20) + "{'a': 1}", id="several-mib"),
    pytest.param(b"\xff" * (3 << 20) + b"{'a': 1}", id="several-mib-bytes"),
    pytest.param("{'a': 1}" + " " * (5 << 20) + "x", id="several-mib-of-spaces"),
    pytest.param("x" * (MAX_LINE_CHARS - 7) + "{'a': 1}", id="one-over-max"),
    pytest.param(b"{'a': \xff}", id="invalid-utf8-value"),
    pytest.param(b"\xc3\x28{\xa0\xa1}", id="invalid-utf8-braces"),
]


@pytest.mark.parametrize(("line", "metrics", "epoch"), DEFAULT_CASES)
def test_default_formats(line: str, metrics: dict[str, float], epoch: int | None) -> None:
    """Each supported dict/JSON line yields exactly its numeric metrics and the right epoch."""
    assert_parsed(parse_line(line), metrics, epoch)


@pytest.mark.parametrize(("line", "metrics", "epoch"), DEFAULT_CASES)
def test_default_formats_as_bytes(line: str, metrics: dict[str, float], epoch: int | None) -> None:
    """The same lines given as UTF-8 bytes parse identically."""
    assert_parsed(parse_line(line.encode()), metrics, epoch)


@pytest.mark.parametrize("line", CLEANING_CASES)
def test_decorations_are_stripped(line: str | bytes) -> None:
    """Line endings, \\r redraws, ANSI codes, launcher prefixes and bad bytes do not hide the seed line."""
    assert_parsed(parse_line(line), SEED_METRICS, 10)


@pytest.mark.parametrize("line", HOSTILE)
def test_hostile_or_metricless_lines_give_none(line: str | bytes) -> None:
    """Malformed, hostile, oversized or metric-free lines return None instead of raising."""
    assert parse_line(line) is None
    assert KV.parse(line) is None


def test_key_value_pairs_need_key_value_mode() -> None:
    """The default parser ignores key=value pairs that a key_value parser reads."""
    assert parse_line("Epoch 3: loss=0.5") is None
    assert_parsed(KV.parse("Epoch 3: loss=0.5"), {"loss": 0.5}, 3)


def test_line_of_exactly_max_chars_parses() -> None:
    """A line of MAX_LINE_CHARS characters is still parsed; one more is refused."""
    line = "x" * (MAX_LINE_CHARS - 8) + "{'a': 1}"
    assert len(line) == MAX_LINE_CHARS
    assert_parsed(parse_line(line), {"a": 1.0}, None)
    assert parse_line("x" + line) is None


def test_last_redraw_of_a_huge_progress_line_parses() -> None:
    """A multi-MiB line of \\r progress redraws still yields the metric line drawn last."""
    bar = "\r 42%|####      | 420/1000 [00:42<00:58, 10.0it/s]" * 100_000
    assert len(bar) > 4 * MAX_LINE_CHARS
    assert_parsed(parse_line(bar + "\r" + SEED_LINE + "\n"), SEED_METRICS, 10)
    assert_parsed(parse_line((bar + "\r" + SEED_LINE + "\r\n").encode()), SEED_METRICS, 10)
    assert parse_line(bar + SEED_LINE + "x" * MAX_LINE_CHARS) is None


KV_CASES = [
    pytest.param("epoch=3 loss=0.5 acc1=0.41", {"epoch": 3.0, "loss": 0.5, "acc1": 0.41}, 3, id="equals"),
    pytest.param(
        "epoch: 3, loss: 0.5 | acc1: 0.41", {"epoch": 3.0, "loss": 0.5, "acc1": 0.41}, 3, id="colons"
    ),
    pytest.param(
        "Epoch 3/10: train/loss=1e-3 val.acc=0.5 lr-0=2e-05",
        {"train/loss": 1e-3, "val.acc": 0.5, "lr-0": 2e-05},
        3,
        id="prefix-and-path-keys",
    ),
    pytest.param(
        "step=100 loss=nan grad=inf low=-Infinity",
        {"step": 100.0, "loss": NAN, "grad": INF, "low": -INF},
        None,
        id="nonfinite",
    ),
    pytest.param("loss=-0.5 acc=+.5", {"loss": -0.5, "acc": 0.5}, None, id="signs"),
    pytest.param(
        "version=1.2.3 ratio=3/10 time=12:30:45 name=abc loss=0.5",
        {"loss": 0.5},
        None,
        id="non-numbers-skipped",
    ),
    pytest.param("[rank0]: epoch=2 loss=0.1", {"epoch": 2.0, "loss": 0.1}, 2, id="launcher-prefix"),
    pytest.param("Epoch 10[t=150]: loss=0.5", {"loss": 0.5}, 10, id="pairs-in-prefix-skipped"),
    pytest.param(
        "step=500 loss=0.5 best epoch 3: acc=0.4",
        {"step": 500.0, "loss": 0.5, "acc": 0.4},
        3,
        id="mid-line-prefix",
    ),
    pytest.param("Epoch: 4 - loss: 0.3", {"Epoch": 4.0, "loss": 0.3}, 4, id="capitalised-epoch-key"),
    pytest.param("epoch=2.5 loss=1", {"epoch": 2.5, "loss": 1.0}, None, id="fractional-epoch"),
    pytest.param(SEED_LINE, SEED_METRICS, 10, id="dict-still-parsed"),
    pytest.param(b"\x1b[1mepoch=1\x1b[0m loss=2\r\n", {"epoch": 1.0, "loss": 2.0}, 1, id="bytes-ansi"),
]


@pytest.mark.parametrize(("line", "metrics", "epoch"), KV_CASES)
def test_key_value_formats(line: str | bytes, metrics: dict[str, float], epoch: int | None) -> None:
    """With key_value=True, numeric key=value / key: value pairs are metrics."""
    assert_parsed(KV.parse(line), metrics, epoch)


@pytest.mark.parametrize(
    "line",
    ["nothing: here", "a=b c=d", "Epoch 3:", "{'a': 1,", "loss=" + "9" * 500, "12:30:45", "x=1.2.3"],
)
def test_key_value_lines_without_numeric_pairs_give_none(line: str) -> None:
    """A key_value line with no numeric pair returns None."""
    assert KV.parse(line) is None


@pytest.mark.parametrize(
    ("line", "metrics", "epoch"),
    [
        pytest.param("it 3 loss=0.5 acc=nan", {"epoch": 3.0, "loss": 0.5, "acc": NAN}, 3, id="numbers"),
        pytest.param(
            "[rank0]: it 3 loss=tensor(0.5) acc=np.float64(0.25) note=hello",
            {"epoch": 3.0, "loss": 0.5, "acc": 0.25},
            3,
            id="wrappers-and-text-group",
        ),
        pytest.param("it 3 loss=abc acc=1e400", {"epoch": 3.0, "acc": INF}, 3, id="non-numeric-group"),
    ],
)
def test_user_pattern(line: str, metrics: dict[str, float], epoch: int | None) -> None:
    """Each named group of a user pattern that reads as a number is a metric; `epoch` is the epoch."""
    assert_parsed(LineParser(pattern=PATTERN).parse(line), metrics, epoch)


@pytest.mark.parametrize("line", ["unrelated", SEED_LINE, "it x loss=a acc=b"])
def test_user_pattern_without_match_gives_none(line: str) -> None:
    """With a user pattern, lines it does not match (even seed lines) return None."""
    assert LineParser(pattern=PATTERN).parse(line) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"pattern": "(?P<loss>"}, id="invalid-regex"),
        pytest.param({"pattern": r"loss=(\d+)"}, id="no-named-groups"),
        pytest.param({"pattern": r"(?P<loss>\d+)", "key_value": True}, id="pattern-and-key-value"),
    ],
)
def test_bad_configuration_raises_config_error(kwargs: dict[str, object]) -> None:
    """A bad pattern, or a pattern combined with key_value, raises a one-line ConfigError."""
    with pytest.raises(ConfigError) as info:
        LineParser(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_needles_per_mode() -> None:
    """The default parser needs '{', key_value adds '=' and ':', a user pattern allows no pre-filter."""
    assert LineParser().needles == (b"{",)
    assert set(KV.needles) == {b"{", b"=", b":"}
    assert LineParser(pattern=PATTERN).needles == ()


def _as_bytes(line: str | bytes) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")


@pytest.mark.parametrize(
    ("parser", "line"),
    [(LineParser(), p.values[0]) for p in DEFAULT_CASES + CLEANING_CASES]
    + [(KV, p.values[0]) for p in KV_CASES],
)
def test_needles_are_a_correct_prefilter(parser: LineParser, line: str | bytes) -> None:
    """Every line that parses contains one of its parser's needles."""
    assert parser.parse(line) is not None
    assert any(needle in _as_bytes(line) for needle in parser.needles)


SYNTAX = st.text(alphabet="{}[]()<>'\":,=.-+_ 0123456789eEnaifTrueNoFlsxtpd\\\r\n\x1b", max_size=300)
PARSERS = [LineParser(), KV, LineParser(pattern=PATTERN)]


@PROPERTY
@given(st.text() | SYNTAX)
def test_arbitrary_text_never_raises(line: str) -> None:
    """No text makes any parser raise; whatever parses contains a needle."""
    for parser in PARSERS:
        got = parser.parse(line)
        assert got is None or isinstance(got, EpochMetrics)
        if got is not None and parser.needles:
            assert any(needle in _as_bytes(line) for needle in parser.needles)


@PROPERTY
@given(st.binary())
def test_arbitrary_bytes_never_raise(line: bytes) -> None:
    """No byte string makes any parser raise."""
    for parser in PARSERS:
        got = parser.parse(line)
        assert got is None or isinstance(got, EpochMetrics)


KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True).filter(lambda k: k != "epoch")
NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**18), 10**18)
METRICS = st.dictionaries(KEYS, NUMBERS, min_size=1, max_size=12)
EPOCHS = st.integers(0, 100_000)


@PROPERTY
@given(METRICS, EPOCHS, st.floats(0, 1e6))
def test_seed_format_round_trips(metrics: dict[str, float], epoch: int, seconds: float) -> None:
    """A dict printed in the seed's `Epoch N[T s]: {repr}` format parses back to the same numbers."""
    line = f"Epoch {epoch}[{seconds:.2f}s]: { ({'epoch': epoch, **metrics})!r}"
    expected = {"epoch": float(epoch)} | {k: float(v) for k, v in metrics.items()}
    assert_parsed(parse_line(line), expected, epoch)
    assert_parsed(parse_line(line.encode()), expected, epoch)


@PROPERTY
@given(METRICS, EPOCHS)
def test_json_round_trips(metrics: dict[str, float], epoch: int) -> None:
    """A dict printed with json.dumps parses back to the same numbers, epoch from its 'epoch' key."""
    line = json.dumps({**metrics, "epoch": epoch})
    expected = {k: float(v) for k, v in metrics.items()} | {"epoch": float(epoch)}
    assert_parsed(parse_line(line), expected, epoch)


@PROPERTY
@given(st.dictionaries(KEYS, st.floats(allow_nan=False) | st.integers(-(2**63), 2**63 - 1), min_size=1))
def test_numpy_reprs_round_trip(metrics: dict[str, float | int]) -> None:
    """A dict of numpy float64/int64 scalars, printed with numpy 2 reprs, parses back to the same numbers."""
    wrapped = {k: np.float64(v) if isinstance(v, float) else np.int64(v) for k, v in metrics.items()}
    line = f"Epoch 1[0.10s]: {wrapped!r}"
    assert_parsed(parse_line(line), {k: float(v) for k, v in metrics.items()}, 1)


DECORATIONS = st.tuples(
    st.sampled_from(["", "[rank0]: ", "[default1]:", "[1,0]<stdout>:", "0: "]),
    st.sampled_from(["", "\x1b[32m", "\x1b[2K", "progress 10%\rprogress 90%\r"]),
    st.sampled_from(["", "\n", "\r\n", "\r", "\x1b[0m\n"]),
)


@PROPERTY
@given(METRICS, EPOCHS, DECORATIONS)
def test_decorated_lines_parse_like_plain_ones(
    metrics: dict[str, float], epoch: int, decoration: tuple[str, str, str]
) -> None:
    """Launcher prefixes, ANSI codes, redraws and line endings never change what a line parses to."""
    launcher, ansi, ending = decoration
    plain = f"Epoch {epoch}[1.00s]: {metrics!r}"
    decorated = launcher + ansi + plain + ending
    expected = parse_line(plain)
    assert expected is not None
    assert parse_line(decorated) == expected
    assert parse_line(decorated.encode()) == expected


@pytest.mark.parametrize(
    ("line", "total"),
    [
        ("Epoch 3/50: {'acc1': 0.5}", 50),
        ("Epoch 3 / 50 [1.2s]: {'acc1': 0.5}", 50),
        ("Epoch 3[1.2s]: {'acc1': 0.5}", None),
        ("{'acc1': 0.5, 'epoch': 3}", None),
    ],
)
def test_total_epoch_count_comes_from_the_prefix(line: str, total: int | None) -> None:
    """`Epoch N/M:` gives the training's epoch count; other forms give none."""
    parsed = parse_line(line)
    assert parsed is not None and parsed.total == total
