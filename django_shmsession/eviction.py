"""Making room: reclaiming expired entries and evicting the soonest-expiring ones.

Room is measured in free entries and free chunks. Inserts and growing updates must leave a
*reserve* of chunks free (enough for one value of the handle's ``max_value_size``), which only
updates that do not grow may dip into: such an update needs its new chain before it frees the
old one, and the reserve guarantees it, so it never evicts another session and never raises
TableFull. The cost is ``chunks_for(max_value_size)`` chunks of the data space (128 chunks, or
64 KiB, with the defaults).

Victims are sampled like Redis's volatile-ttl: up to ``EVICTION_SAMPLE`` used entries among
``EVICTION_PROBES`` random probes, the soonest-expiring one goes; each removal is an ordinary,
intent-logged delete.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .layout import ENTRY_USED, NIL
from .memory import TableMemory, Words

__all__ = ["EVICTION_PROBES", "EVICTION_SAMPLE", "has_room", "pick_victim"]

#: Entries sampled per eviction (Redis's volatile-ttl samples 5 by default).
EVICTION_SAMPLE = 8
EVICTION_PROBES = 64


def has_room(
    memory: TableMemory,
    words: Words,
    need_entry: bool,
    new: int,
    old: int | None,
    reserve: int,
) -> bool:
    """True when a free entry (if ``need_entry``) and the free chunks a write of ``new`` chunks
    needs exist; ``words`` are the checked :meth:`TableMemory.words` the write will plan from.

    ``old`` is the chunk count of the value an update replaces (None for an insert). An update
    that does not grow needs only its new chain (the reserve covers it); anything else must
    leave the reserve intact afterwards (capped at the capacity, so a lone maximal value fits).
    """
    free_entry, _free_chunk, entry_hwm, _chunk_hwm, _entries, used, _bytes = words
    capacity = memory.geometry.chunk_capacity
    if old is not None and new <= old:
        need = new
    else:
        need = max(new, min(new - (old or 0) + reserve, capacity))
    if need_entry and free_entry == NIL and entry_hwm >= memory.geometry.entry_capacity:
        return False
    return capacity - used >= need


def pick_victim(
    memory: TableMemory,
    protect: int,
    now: float,
    live_expiry: Callable[[int], float],
) -> tuple[int, bool]:
    """(index of the soonest-expiring sampled entry, whether it already expired); NIL if none.

    ``protect`` (the entry being updated) is never picked.
    """
    hwm = memory.entry_hwm()
    if hwm == 0:
        return NIL, False
    best, best_expiry, sampled = NIL, float("inf"), 0
    for _ in range(EVICTION_PROBES):
        index = random.randrange(hwm)
        if index == protect or memory.state(index) != ENTRY_USED:
            continue
        expiry = live_expiry(index)
        if expiry < best_expiry:
            best, best_expiry = index, expiry
        sampled += 1
        if sampled >= EVICTION_SAMPLE:
            break
    if best == NIL:  # sparse table: scan from a random start for any entry
        start = random.randrange(hwm)
        for offset in range(hwm):
            index = (start + offset) % hwm
            if index != protect and memory.state(index) == ENTRY_USED:
                best, best_expiry = index, live_expiry(index)
                break
    return best, best != NIL and best_expiry <= now
