"""What the tiered engine keeps in the table's application words (``SessionTable.*_app_word``).

The table reserves ``layout.APP_WORDS`` aligned 64-bit words in its header for layers above it:
lock-free loads and stores, zero in a new segment. Each word here has exactly one writer, the
host's listener (:mod:`.listener`), so no read-modify-write can lose an update; workers only
read them.

=====  ===============  =====================================================================
word   name             meaning
=====  ===============  =====================================================================
0      HEARTBEAT        µs since the epoch when the listener last heard L2 answer on its
                        subscription; 0 when it has stopped. Workers trust their L1 copies
                        (within MAX_STALENESS) only while it is younger than LISTENER_TIMEOUT.
1      LISTENER_PID     the listener's pid (0 when none has run), for ``shmsession stats``.
2      FLUSHES          how many times the listener flushed L1 (at each (re)connect).
3      INVALIDATIONS    invalidations received from L2 since the segment was created.
4..7   GUARD            per stripe of keys: how many invalidations the listener applied to
                        it, and what the last one was (below). A worker that filled or wrote
                        a copy while its stripe moved may hold a version older than the change
                        the listener acted on: unless the word shows it cannot, it asks L2.
=====  ===============  =====================================================================

A guard word (written whole, in one store, before the listener drops the copy):

=======  =================================================================================
bits     meaning
=======  =================================================================================
40..63   invalidations applied to the stripe, mod 2**24
39       the last one carried no version: a delete or a flush (``bump_all_guards``)
31..38   the last one's key tag: bits 8..15 of the key's CRC-32 (the stripe is bits 0..1)
0..30    the last one's version, mod 2**31
=======  =================================================================================

Why: a worker's own save sends an invalidation that usually reaches the listener before the
worker has stored its copy, so the stripe moves on most saves under load. When exactly one
invalidation landed in the window and it was another key's, or this key's at a version no newer
than the copy (versions of one session grow in commit order on both L2s), the copy is at least
as new as anything the listener acted on and is kept without a round trip to L2. Any later
invalidation either lands in the window too (two: ask L2) or is applied after the worker's
second read, and its delete then removes the copy.
"""

from __future__ import annotations

import time
import zlib
from typing import Protocol

from .l2 import DELETED

HEARTBEAT = 0
LISTENER_PID = 1
FLUSHES = 2
INVALIDATIONS = 3
GUARD_FIRST = 4
GUARD_STRIPES = 4

#: Seconds between heartbeats (each one a round trip to L2 on the listener's connection).
HEARTBEAT_INTERVAL = 0.1
#: A heartbeat older than this means the listener is down or cut off from L2.
LISTENER_TIMEOUT = 0.5


class ReadWords(Protocol):
    """The part of ``SessionTable`` workers use: they only read the words."""

    def read_app_word(self, index: int) -> int: ...


class AppWords(ReadWords, Protocol):
    """The part of ``SessionTable`` the listener uses."""

    def write_app_word(self, index: int, value: int) -> None: ...


def now_us() -> int:
    return int(time.time() * 1_000_000)


def listener_up(table: ReadWords, now: float | None = None) -> bool:
    """True while the host's listener is subscribed and heard L2 within LISTENER_TIMEOUT."""
    beat = table.read_app_word(HEARTBEAT)
    if beat == 0:
        return False
    current = time.time() if now is None else now
    return current * 1_000_000 - beat < LISTENER_TIMEOUT * 1_000_000


def heartbeat_age(table: ReadWords) -> float | None:
    """Seconds since the last heartbeat, None when the listener has stopped (or never ran)."""
    beat = table.read_app_word(HEARTBEAT)
    return None if beat == 0 else max(0.0, time.time() - beat / 1_000_000)


_COUNT_SHIFT = 40
_COUNT_MASK = (1 << 24) - 1
_NO_VERSION = 1 << 39
_TAG_SHIFT = 31
_TAG_MASK = 0xFF
_VERSION_BITS = 31
_VERSION_MASK = (1 << _VERSION_BITS) - 1


def stripe(key: str) -> int:
    """The guard word for ``key``."""
    return GUARD_FIRST + (zlib.crc32(key.encode()) % GUARD_STRIPES)


def _tag(key: str) -> int:
    return (zlib.crc32(key.encode()) >> 8) & _TAG_MASK


def guard(table: ReadWords, key: str) -> int:
    """The guard word of ``key``'s stripe (read before an L2 call, compared after the L1 write)."""
    return table.read_app_word(stripe(key))


def guard_count(word: int) -> int:
    """How many invalidations (mod 2**24) a guard word has counted."""
    return (word >> _COUNT_SHIFT) & _COUNT_MASK


def _one_with_a_version(before: int, after: int) -> bool:
    """Exactly one invalidation landed between the two reads, and it carried a version."""
    return (guard_count(after) - guard_count(before)) & _COUNT_MASK == 1 and not (
        after & _NO_VERSION
    )


def copy_survives(before: int, after: int, key: str, version: int) -> bool:
    """True if a copy of ``key`` at ``version``, stored between reading the stripe's guard word
    as ``before`` and as ``after``, is known to be at least as new as every invalidation the
    listener applied meanwhile; False means: ask L2 (see the module docstring)."""
    if after == before:
        return True
    if not _one_with_a_version(before, after):
        return False
    if (after >> _TAG_SHIFT) & _TAG_MASK != _tag(key):
        return True  # the one invalidation was another key's
    behind = (version - (after & _VERSION_MASK)) & _VERSION_MASK
    return behind < 1 << (_VERSION_BITS - 1)  # its version <= ours (mod 2**31)


def copy_is_stale(before: int, after: int, key: str, version: int) -> bool:
    """True if the one invalidation that landed between ``before`` and ``after`` was of
    ``key`` at a later version than the copy: L2 holds a newer one, so the copy is dropped
    without asking (a tag shared with another key at worst costs a miss)."""
    if not _one_with_a_version(before, after) or (after >> _TAG_SHIFT) & _TAG_MASK != _tag(key):
        return False
    ahead = (version - (after & _VERSION_MASK)) & _VERSION_MASK
    return ahead >= 1 << (_VERSION_BITS - 1)  # its version > ours (mod 2**31)


def _next_word(word: int, key: str | None, version: int) -> int:
    count = ((guard_count(word) + 1) & _COUNT_MASK) << _COUNT_SHIFT
    if key is None or version == DELETED:
        return count | _NO_VERSION
    return count | _tag(key) << _TAG_SHIFT | (version & _VERSION_MASK)


def bump_guard(table: AppWords, key: str, version: int) -> None:
    """Listener only: record an invalidation of ``key`` at ``version`` (DELETED) in its
    stripe *before* dropping the key's copy."""
    index = stripe(key)
    table.write_app_word(index, _next_word(table.read_app_word(index), key, version))


def bump_all_guards(table: AppWords) -> None:
    """Listener only: before a flush every stripe changes, so no fill in flight survives it."""
    for index in range(GUARD_FIRST, GUARD_FIRST + GUARD_STRIPES):
        table.write_app_word(index, _next_word(table.read_app_word(index), None, 0))


def increment(table: AppWords, index: int, by: int = 1) -> None:
    """Listener only (single writer): add to a counter word."""
    table.write_app_word(index, table.read_app_word(index) + by)
