"""The tiered engine's numbers for the whole host, as ``manage.py shmsession stats`` shows them.

Workers count in process memory (:mod:`.counters`) and publish their counts into L1 at most once
per PUBLISH_INTERVAL, as a small JSON value under ``_tiered_stats_<pid>`` (``_`` is outside
Django's key alphabet, so no session can collide), expiring after KEEP seconds without a
refresh. ``collect`` sums the entries it finds with ``SessionTable.scan`` and adds the listener's
words (:mod:`.words`). The sums cover the processes that ran within the last KEEP seconds.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

from django_shmsession.table import SessionTable

from . import counters, words

PREFIX = "_tiered_stats_"
PUBLISH_INTERVAL = 1.0
KEEP = 3600.0

_next_publish = 0.0


class _Settable(Protocol):
    def set(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> None: ...


def maybe_publish(table: _Settable) -> None:
    """Publish this process's counts if PUBLISH_INTERVAL has passed (one clock read otherwise)."""
    global _next_publish
    now = time.monotonic()
    if now < _next_publish:
        return
    _next_publish = now + PUBLISH_INTERVAL
    publish(table)


def publish(table: _Settable) -> None:
    value = json.dumps(counters.snapshot(), separators=(",", ":")).encode()
    table.set(f"{PREFIX}{os.getpid()}", value, time.time() + KEEP)


def _reset_after_fork() -> None:
    global _next_publish
    _next_publish = 0.0


os.register_at_fork(after_in_child=_reset_after_fork)


def collect(table: SessionTable) -> dict[str, Any]:
    """Host-wide counts, the L1 hit ratio and the listener's state."""
    totals = dict.fromkeys(counters.NAMES, 0)
    processes = 0
    cursor = 0
    while True:
        items, cursor = table.scan(cursor)
        for item in items:
            if item.key.startswith(PREFIX):
                processes += 1
                for name, value in json.loads(item.value).items():
                    if name in totals:
                        totals[name] += int(value)
        if cursor == 0:
            break
    reads = totals["l1_hits"] + totals["l1_misses"] + totals["revalidations"]
    age = words.heartbeat_age(table)
    result: dict[str, Any] = {f"tiered_{name}": value for name, value in totals.items()}
    result.update(
        tiered_processes_counted=processes,
        tiered_l1_hit_ratio=round(totals["l1_hits"] / reads, 6) if reads else 0.0,
        tiered_listener="up" if words.listener_up(table) else "DOWN",
        tiered_listener_pid=table.read_app_word(words.LISTENER_PID),
        tiered_heartbeat_age_s=None if age is None else round(age, 3),
        tiered_l1_flushes=table.read_app_word(words.FLUSHES),
        tiered_invalidations_received=table.read_app_word(words.INVALIDATIONS),
    )
    return result
