"""Django's ``JSONSerializer``, with msgspec's C encoder and decoder on the common path.

Django's serializer (``django.core.signing.JSONSerializer``, the default ``SESSION_SERIALIZER``)
is ``json.dumps(obj, separators=(",", ":")).encode("latin-1")`` and
``json.loads(data.decode("latin-1"))``: pure-Python work that costs more per request than the
table itself. :class:`JSONSerializer` here gives the same answers for every input, faster:

- **dumps**: a session whose every key is a ``str`` and every value, all the way down, is
  exactly a ``str``, ``int``, ``bool``, ``None``, finite ``float``, ``list``, ``tuple`` or
  ``dict`` (checked by one walk over the containers, not the bytes) is encoded by msgspec.
  msgspec would also accept datetimes, bytes, sets, Decimals, UUIDs, enums and more that
  Django refuses, encode NaN and Infinity as ``null`` where Django writes ``NaN``, and write
  non-ASCII text as UTF-8 where Django escapes it to ``\\uXXXX`` (and a worker still running
  the old code decodes as latin-1); so anything else (another type, a subclass, a non-str key,
  which json turns into a string, NaN, a lone surrogate, nesting deeper than
  :data:`MAX_FAST_DEPTH`, a cycle) and any session whose text is not all ASCII goes to
  Django's own serializer, which accepts or refuses it exactly as always. What msgspec writes
  is therefore always ASCII and decodes, with json or msgspec, to what Django's bytes decode
  to (the bytes differ only in spelling: ``1e16`` for ``1e+16``, a raw DEL for ``\\u007f``).
- **loads**: ASCII input (what every JSON serializer writes) is decoded by msgspec, which parses
  arbitrary-size integers exactly and refuses what it does not handle like json (NaN,
  Infinity, ``1e400``, lone surrogates): anything it refuses, and any non-ASCII input, is handed
  to Django's serializer, so the result or the error is Django's.

Why msgspec and not orjson: ``orjson.loads`` silently turns integers outside 64 bits into floats
(``12345678901234567890123`` loads as ``1.2345678901234568e+22``), which no cheap check can
catch, and its encoder also accepts UUIDs, enums and datetimes. Measurements are in the README.
"""

from __future__ import annotations

from typing import Any

import msgspec
from django.core import signing

#: Containers nested deeper than this go to the stdlib path (which also detects cycles).
MAX_FAST_DEPTH = 32

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_django = signing.JSONSerializer()
_django_dumps = _django.dumps
_django_loads = _django.loads


def _plain_dict(obj: dict[Any, Any], depth: int) -> bool:
    """Whether msgspec encodes ``obj`` exactly as ``json.dumps`` would (up to escapes)."""
    if depth > MAX_FAST_DEPTH:
        return False
    for key in obj:
        if type(key) is not str:  # json converts int/float/bool/None keys: leave it to json
            return False
    return _plain_values(obj.values(), depth)


def _plain_values(values: Any, depth: int) -> bool:
    """Whether every value (of a dict, list or tuple at ``depth``) is plain, recursively.

    The type tests are inline (no call per value): this runs on every save.
    """
    if depth > MAX_FAST_DEPTH:
        return False
    for value in values:
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            continue
        if kind is float:
            if value - value != 0.0:  # NaN, Infinity, -Infinity
                return False
        elif kind is dict:
            if not _plain_dict(value, depth + 1):
                return False
        elif kind is list or kind is tuple:
            if not _plain_values(value, depth + 1):
                return False
        else:
            return False
    return True


def dumps(obj: Any) -> bytes:
    """Django's ``JSONSerializer().dumps(obj)``, by msgspec when that gives the same value."""
    if type(obj) is dict and _plain_dict(obj, 0):
        try:
            out = _encode(obj)
        except (UnicodeEncodeError, TypeError, ValueError):  # lone surrogates, for one
            return _django_dumps(obj)
        if out.isascii():
            return out
    # Django's path: its exact bytes and its errors. Text outside ASCII lands here too: json's
    # C encoder escapes it faster than any escaping of msgspec's UTF-8 written in Python.
    return _django_dumps(obj)


def loads(data: bytes) -> Any:
    """Django's ``JSONSerializer().loads(data)``, by msgspec when the input is plain JSON."""
    if data.isascii():
        try:
            return _decode(data)
        except Exception:  # NaN, 1e400, lone surrogates, too deep: json decides
            pass
    return _django_loads(data)


class JSONSerializer:
    """Drop-in for ``django.core.signing.JSONSerializer`` (same results, same errors)."""

    def dumps(self, obj: Any) -> bytes:
        return dumps(obj)

    def loads(self, data: bytes) -> Any:
        return loads(data)
