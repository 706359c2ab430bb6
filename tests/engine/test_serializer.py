"""Our fast JSONSerializer against Django's: same values, same refusals, bytes each side reads.

Django's ``django.core.signing.JSONSerializer`` is the oracle. For generated session data: what
Django accepts, ours accepts and both round-trip to equal values (through either decoder: a
rolling upgrade has old and new workers reading each other's sessions); what Django refuses
(datetime, bytes, set, Decimal, objects, lazy strings, bad keys, cycles), ours refuses with the
same exception type. NaN, Infinity, huge ints, lone surrogates, non-str keys and non-ASCII text
are drawn on purpose, since those are where msgspec and json differ.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import math
import uuid
from typing import Any

import pytest
from django.core import signing
from django.utils.functional import lazy
from django.utils.safestring import mark_safe
from hypothesis import given, settings
from hypothesis import strategies as st

from django_shmsession import serializers
from django_shmsession.serializers import JSONSerializer

DJANGO = signing.JSONSerializer()
OURS = JSONSerializer()


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and tells 1 from 1.0 and True from 1.

    Iterative: a blob nested 5,000 deep decodes on Python 3.13 (its json has no C recursion
    limit at that depth), and a recursive comparison would overflow the Python stack.
    """
    pending = [(a, b)]
    while pending:
        x, y = pending.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if not ((math.isnan(x) and math.isnan(y)) or x == y):
                return False
        elif isinstance(x, dict):
            if list(x) != list(y):
                return False
            pending.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            pending.extend(zip(x, y, strict=True))
        elif x != y:
            return False
    return True


text = st.text(st.characters(codec="utf-8") | st.characters(), max_size=20) | st.sampled_from(
    ["", "é", "€", "😀", "\ud800", "\udfff", "a\ud83dx", '\x00\x1f\x7f"\\/']
)
huge = st.integers(min_value=-(2**200), max_value=2**200) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]
)
scalars = st.none() | st.booleans() | huge | st.floats(allow_nan=True, allow_infinity=True) | text
# Keys json turns into strings (int/float/bool/None), as Django does: ours must match it.
keys = text | st.integers() | st.floats() | st.booleans() | st.none()
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(keys, inner, max_size=5)
    ),
    max_leaves=30,
)


class Thing:
    pass


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


lazy_str = lazy(lambda: "hello", str)
refused = st.sampled_from(
    [
        datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
        datetime.date(2020, 1, 1),
        datetime.time(12, 0),
        datetime.timedelta(seconds=1),
        b"bytes",
        bytearray(b"x"),
        {1, 2},
        frozenset({1}),
        decimal.Decimal("1.5"),
        uuid.UUID(int=1),
        Colour.RED,
        Thing(),
        lazy_str(),
        complex(1, 2),
        object(),
    ]
)
accepted_subclasses = st.sampled_from([mark_safe("safe <b>"), Level.HIGH, True])
sessions = st.dictionaries(keys, json_values | accepted_subclasses, max_size=8)


def outcome(serializer: Any, obj: Any) -> tuple[str, Any]:
    try:
        return "ok", serializer.dumps(obj)
    except Exception as err:
        return "error", type(err)


def check_against_django(obj: Any) -> None:
    theirs, ours = outcome(DJANGO, obj), outcome(OURS, obj)
    if theirs[0] == "error":
        assert ours == theirs, f"Django raised {theirs[1]}, ours gave {ours}"
        return
    assert ours[0] == "ok", f"Django accepted, ours raised {ours[1]}"
    django_bytes, our_bytes = theirs[1], ours[1]
    assert isinstance(our_bytes, bytes)
    assert our_bytes.isascii(), "old workers decode as latin-1: the bytes must be ASCII"
    expected = DJANGO.loads(django_bytes)
    # Both directions of a rolling upgrade, and ours on ours.
    assert same(DJANGO.loads(our_bytes), expected)
    assert same(OURS.loads(django_bytes), expected)
    assert same(OURS.loads(our_bytes), expected)


@settings(max_examples=600, deadline=None)
@given(sessions)
def test_generated_sessions_behave_as_djangos(obj: dict[Any, Any]) -> None:
    check_against_django(obj)


@settings(max_examples=300, deadline=None)
@given(sessions, st.lists(keys, min_size=1, max_size=3), refused)
def test_refused_values_are_refused_with_type_error(
    obj: dict[Any, Any], path: list[Any], bad: Any
) -> None:
    """A refused value anywhere (top level or nested in dicts and lists) is a TypeError."""
    node: Any = bad
    for key in reversed(path[1:]):
        node = {key: [node]} if isinstance(key, str) else [node]
    obj = {**obj, str(path[0]): node}
    assert outcome(DJANGO, obj)[1] is TypeError
    check_against_django(obj)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_decoding_any_json_text_matches_django(value: Any) -> None:
    """Whatever json can write (NaN, Infinity, huge ints, escaped lone surrogates), ours reads
    back the same, and text that is no JSON at all fails the same way."""
    try:
        blob = json.dumps(value).encode("latin-1")
    except (UnicodeEncodeError, ValueError):
        return
    assert same(OURS.loads(blob), DJANGO.loads(blob))


@pytest.mark.parametrize(
    "obj",
    [
        {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")},
        {"big": 2**64, "neg": -(2**64), "huge": 10**40},
        {"lone": "\ud800", "pair": "\ud83d\ude00"},
        {"fr": "Zoë Ünïcødé", "emoji": "😀", "euro": "€"},
        {2: "int key", 1.5: "float key", True: "bool key", None: "null key", "2": "dup"},
        {"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
        {"tuple": (1, "a", None), "safe": mark_safe("<b>"), "level": Level.HIGH},
        {"ctrl": '\x00\x1f\x7f"\\/', "float": [1e16, 1e-7, -0.0, 5e-324]},
        {},
    ],
)
def test_edge_cases(obj: dict[Any, Any]) -> None:
    check_against_django(obj)


def test_django_behaviour_we_match() -> None:
    """What Django does with the tricky cases (so a change in Django fails here first)."""
    assert DJANGO.dumps({"x": float("nan")}) == b'{"x":NaN}'
    assert DJANGO.dumps({2: 1, None: 2, True: 3, 1.5: 4}) == b'{"2":1,"null":2,"true":3,"1.5":4}'
    assert DJANGO.dumps({"é": "€"}) == b'{"\\u00e9":"\\u20ac"}'
    assert DJANGO.loads(b'{"x":NaN,"y":123456789012345678901234567890}')["y"] == 10**29 + (
        23456789012345678901234567890
    )
    with pytest.raises(TypeError):
        DJANGO.dumps({(1, 2): "tuple key"})


@pytest.mark.parametrize(
    "bad",
    [{(1, 2): 1}, {"a": {frozenset(): 1}}, {"a": datetime.datetime(2020, 1, 1)}, {"a": {1, 2}}],
)
def test_bad_keys_and_values_raise_type_error(bad: dict[Any, Any]) -> None:
    with pytest.raises(TypeError):
        OURS.dumps(bad)


def test_cycle_is_refused_like_django() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    looped: list[Any] = []
    looped.append(looped)
    for obj in (cyclic, {"l": looped}):
        with pytest.raises(ValueError, match="Circular reference"):
            DJANGO.dumps(obj)
        with pytest.raises(ValueError, match="Circular reference"):
            OURS.dumps(obj)


def test_the_fast_path_is_taken_for_plain_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain ASCII sessions never reach the stdlib (the point of the module)."""

    def boom(*args: Any) -> Any:
        raise AssertionError("stdlib path used")

    monkeypatch.setattr(serializers, "_django_dumps", boom)
    monkeypatch.setattr(serializers, "_django_loads", boom)
    session = {"_auth_user_id": "42", "n": 3, "cart": [1, 2.5, None, True], "d": {"k": "v"}}
    assert OURS.loads(OURS.dumps(session)) == session


@pytest.mark.parametrize(
    "blob",
    [
        b"NaN",
        b'{"x":Infinity}',
        b"1e400",
        b'"\\ud800"',
        b'"\xe9"',  # latin-1 text: Django reads it as "é", not as broken UTF-8
        b'"\xc3\xa9"',  # UTF-8 bytes: Django reads two latin-1 characters
        b"12345678901234567890123456789",
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_decoder_falls_back_to_django(blob: bytes) -> None:
    try:
        expected: Any = ("ok", DJANGO.loads(blob))
    except Exception as err:
        expected = ("error", type(err))
    try:
        got: Any = ("ok", OURS.loads(blob))
    except Exception as err:
        got = ("error", type(err))
    assert got[0] == expected[0]
    assert same(got[1], expected[1]) if got[0] == "ok" else got == expected


@pytest.mark.parametrize("blob", [b"", b"{", b'{"a":1}x', b"01", b"\xff\xfe", b"TAG{}"])
def test_undecodable_input_raises_json_error_like_django(blob: bytes) -> None:
    with pytest.raises(json.JSONDecodeError):
        DJANGO.loads(blob)
    with pytest.raises(json.JSONDecodeError):
        OURS.loads(blob)
