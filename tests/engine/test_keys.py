"""The session-key generator and the untrusted-key validator."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from django.contrib.sessions.backends.base import VALID_KEY_CHARS

from django_shmsession import keys


def test_key_shape() -> None:
    key = keys.new_session_key()
    assert len(key) == 32
    assert set(key) <= set(VALID_KEY_CHARS)


def test_keys_differ() -> None:
    assert len({keys.new_session_key() for _ in range(2000)}) == 2000


def test_entropy_at_least_djangos() -> None:
    """32 independent uniform draws from the same 36-character alphabet as Django."""
    assert keys.KEY_LENGTH * math.log2(len(VALID_KEY_CHARS)) >= 165


def test_mapping_is_unbiased(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fed every byte value once, each character comes out exactly 7 times: 252 bytes are kept
    (7 per character), 252..255 are rejected, so no character is favoured."""
    every_byte = bytes(range(256))
    monkeypatch.setattr(keys, "_DRAW", 256)
    monkeypatch.setattr(keys.os, "urandom", lambda n: every_byte[:n])
    key = keys.new_session_key(252)
    assert Counter(key) == dict.fromkeys(VALID_KEY_CHARS, 7)


def test_rejected_bytes_are_redrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A draw of only rejected bytes yields nothing; the generator draws again."""
    draws = iter([b"\xff" * 40, b"\x00" * 40])
    monkeypatch.setattr(keys.os, "urandom", lambda n: next(draws))
    assert keys.new_session_key() == "a" * 32


def test_distribution_roughly_uniform() -> None:
    """Sanity check on real randomness: 64k characters, each within 15% of the mean count."""
    counts = Counter("".join(keys.new_session_key() for _ in range(2000)))
    mean = 2000 * 32 / 36
    assert set(counts) == set(VALID_KEY_CHARS)
    assert all(abs(c - mean) < 0.15 * mean for c in counts.values())


@pytest.mark.parametrize(
    "key", ["12345678", "a" * 32, "z9" * 32, VALID_KEY_CHARS[:32], keys.new_session_key()]
)
def test_valid_keys(key: str) -> None:
    assert keys.is_valid_key(key)


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "1234567",
        "a" * 65,
        "ABCDEFGHIJ",
        "abcdefgh!",
        "!abcdefgh",
        "abcd efgh",
        "abcdéfghij",
        "abcdefgh\n",
        b"abcdefghij",
        12345678,
    ],
)
def test_invalid_keys(key: object) -> None:
    assert not keys.is_valid_key(key)
