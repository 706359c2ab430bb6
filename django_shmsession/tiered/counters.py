"""Per-process counters of the tiered engine, summed per host by ``shmsession stats``.

Counting is a list increment (no lock, no shared store per request). Each process publishes its
counts into the L1 table at most once per PUBLISH_INTERVAL under a key of its own
(:mod:`.hoststats`), where ``shmsession stats`` finds and sums them.
"""

from __future__ import annotations

import os

NAMES = (
    "l1_hits",
    "l1_misses",
    "revalidations",
    "refetches",
    "l2_writes",
    "l2_errors",
    "served_during_outage",
    "guard_drops",
    "kept_newer",
    "refreshed",
)
(
    HITS,
    MISSES,
    REVALIDATIONS,
    REFETCHES,
    L2_WRITES,
    L2_ERRORS,
    SERVED_DURING_OUTAGE,
    GUARD_DROPS,
    KEPT_NEWER,  # the listener's: an invalidation older than the copy held, which it kept
    REFRESHED,  # the listener's: an older copy replaced by the one an invalidation carried
) = range(len(NAMES))

_counts = [0] * len(NAMES)


def count(index: int) -> None:
    _counts[index] += 1


def snapshot() -> dict[str, int]:
    """This process's counts since it started (or forked)."""
    return dict(zip(NAMES, _counts, strict=True))


def _reset_after_fork() -> None:
    """A forked worker starts from zero: the parent's counts are the parent's."""
    global _counts
    _counts = [0] * len(NAMES)


os.register_at_fork(after_in_child=_reset_after_fork)
