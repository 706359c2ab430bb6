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
4..7   GUARD            per-stripe count of L1 copies the listener invalidated; a worker that
                        filled or wrote a copy while its stripe moved drops that copy (it may
                        have been read from L2 before the change the listener acted on).
=====  ===============  =====================================================================
"""

from __future__ import annotations

import time
import zlib
from typing import Protocol

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


def stripe(key: str) -> int:
    """The guard word for ``key``."""
    return GUARD_FIRST + (zlib.crc32(key.encode()) % GUARD_STRIPES)


def guard(table: ReadWords, key: str) -> int:
    """The current guard count of ``key``'s stripe (compare before and after an L1 fill)."""
    return table.read_app_word(stripe(key))


def bump_guard(table: AppWords, key: str) -> None:
    """Listener only: mark ``key``'s stripe as changed *before* dropping the key's copy."""
    index = stripe(key)
    table.write_app_word(index, table.read_app_word(index) + 1)


def bump_all_guards(table: AppWords) -> None:
    """Listener only: before a flush every stripe changes, so no fill in flight survives it."""
    for index in range(GUARD_FIRST, GUARD_FIRST + GUARD_STRIPES):
        table.write_app_word(index, table.read_app_word(index) + 1)


def increment(table: AppWords, index: int, by: int = 1) -> None:
    """Listener only (single writer): add to a counter word."""
    table.write_app_word(index, table.read_app_word(index) + by)
