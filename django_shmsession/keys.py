"""Fast, unbiased session-key generation.

Django's ``get_random_string(32, VALID_KEY_CHARS)`` calls ``secrets.choice`` once per character
(~45 µs per key), which dominates the cost of creating a session in a store as fast as ours. This
module draws one block of random bytes from the OS and maps it to the same 36-character alphabet
with ``bytes.translate``, a single C call.

Unbiased by rejection sampling: 256 is not a multiple of 36, so a plain ``byte % 36`` would favour
the first 4 characters. Only bytes below 252 (= 7 * 36) are used; bytes 252..255 are deleted by the
same ``translate`` call and more bytes are drawn if too few survive. Every character is therefore
uniform over the alphabet and independent of the others: 32 * log2(36) ≈ 165 bits per key, exactly
Django's entropy.
"""

from __future__ import annotations

import os
from typing import TypeGuard

from django.contrib.sessions.backends.base import VALID_KEY_CHARS

#: Length of the keys we generate (Django's own length).
KEY_LENGTH = 32

_ALPHABET = VALID_KEY_CHARS.encode("ascii")
_ACCEPTED = 256 - 256 % len(_ALPHABET)  # 252: the largest multiple of 36 that fits in a byte
_TABLE = bytes(_ALPHABET[b % len(_ALPHABET)] for b in range(256))
_REJECTED = bytes(range(_ACCEPTED, 256))
# 40 bytes keep 32 or more with probability > 1 - 1e-9; the loop below covers the rest.
_DRAW = KEY_LENGTH + 8


def new_session_key(length: int = KEY_LENGTH) -> str:
    """Return ``length`` characters drawn uniformly from Django's ``VALID_KEY_CHARS``.

    Uses ``os.urandom`` (what ``secrets`` uses) so keys are unpredictable across processes and
    forks: no user-space random state is shared by gunicorn workers forked from one master.
    """
    chars = os.urandom(_DRAW).translate(_TABLE, _REJECTED)
    while len(chars) < length:
        chars += os.urandom(_DRAW).translate(_TABLE, _REJECTED)
    return chars[:length].decode("ascii")


_KEY_CHARS = VALID_KEY_CHARS
#: Shortest key accepted (Django's own lower bound) and longest (the table's key limit).
MIN_KEY_LENGTH = 8
MAX_KEY_LENGTH = 64


def is_valid_key(key: object) -> TypeGuard[str]:
    """Whether ``key`` (untrusted: it comes from a cookie) may be looked up in the table.

    Only strings of 8 to 64 characters from the key alphabet pass, so a hostile cookie can never
    make the table raise (keys over 64 bytes are a ``ValueError`` there) and never matches a key
    we would not have generated. ``str.strip`` with the alphabet removes every valid character in
    C; anything left over is a character outside the alphabet.
    """
    return (
        type(key) is str
        and MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH
        and not key.strip(_KEY_CHARS)
    )
