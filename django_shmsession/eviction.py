"""Making room: reclaiming expired entries first, then evicting the least valuable live one.

Room is measured in free entries and free chunks. Inserts and growing updates must leave a
*reserve* of chunks free (enough for one value of the handle's ``max_value_size``), which only
updates that do not grow may dip into: such an update needs its new chain before it frees the
old one, and the reserve guarantees it, so it never evicts another session and never raises
TableFull. The cost is ``chunks_for(max_value_size)`` chunks of the data space (128 chunks, or
64 KiB, with the defaults).

Which entry goes, in order:

1. expired ones, under every policy, before any live entry. Each range of entries has a floor
   (``FLOORS_OFFSET``): a whole second none of its entries expires before; writes lower it, and
   reclaiming a range (a walk that removes every expired entry in it) makes it exact.
   ``CTL_EXPIRY_FLOOR`` is the least of them, so "nothing can have expired" costs one
   comparison, and finding what did costs a walk of one range (1/256 of the entries).
2. an entry of the lowest *priority class* present (the caller's: the engine gives signed-in
   sessions class 1, anonymous ones class 0). ``CTL_CLASS_ENTRIES`` counts live entries per
   class, so when the sample holds only higher classes although a lower one exists, a directed
   search (``CTL_EVICT_CURSOR``) finds one: a lower class is always emptied first.
3. within that class, the least recently used: ``EVICTION_SAMPLE`` used entries are sampled
   (like Redis's allkeys-lru) and the one with the oldest coarse access second goes.

Each removal is an ordinary, intent-logged delete. The hints (floors, class counts, cursor)
steer only the choice: they are stored outside the intent log, so a write interrupted by a
crash may leave a class count off by one; recovery then sets ``CTL_HINTS_STALE`` and the next
eviction that relies on the counts recounts them in one pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .layout import (
    CTL_CLASS_ENTRIES,
    CTL_EVICT_CURSOR,
    CTL_EXPIRY_FLOOR,
    CTL_HINTS_STALE,
    ENTRY_HINTS,
    ENTRY_SIZE,
    ENTRY_USED,
    FLOOR_REGIONS,
    FLOORS_OFFSET,
    NIL,
    PRIORITY_CLASSES,
)
from .memory import TableMemory, Words

__all__ = [
    "EVICTION_PROBES",
    "EVICTION_SAMPLE",
    "NO_FLOOR",
    "Hints",
    "Victim",
    "has_room",
    "pick_victim",
]

#: Entries sampled per eviction (Redis samples 5 by default).
EVICTION_SAMPLE = 8
EVICTION_PROBES = 64
#: The floor of a range with no entry: nothing in it can expire.
NO_FLOOR_U32 = 0xFFFFFFFF
#: CTL_EXPIRY_FLOOR of an empty table.
NO_FLOOR = NO_FLOOR_U32

#: (entry index or NIL, whether it expired, its priority class).
Victim = tuple[int, bool, int]


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


class Hints:
    """The eviction hints of one mapped table: class counts and per-range expiry floors.

    The writes update them *before* they disarm their intent (:mod:`.writes` calls
    :meth:`inserted`, :meth:`updated`, :meth:`deleted`), so a write interrupted anywhere leaves
    an armed intent, whose recovery marks the hints stale (``CTL_HINTS_STALE``); they are then
    recounted before the next eviction relies on them.
    """

    def __init__(self, memory: TableMemory) -> None:
        self.memory = memory
        self.control = memory.control
        self.floors = memory.u32_array(FLOORS_OFFSET, FLOOR_REGIONS)
        self.span = -(-memory.geometry.entry_capacity // FLOOR_REGIONS)

    def release(self) -> None:
        self.floors.release()

    # -- kept up to date by the writes -----------------------------------------------------------

    def inserted(self, index: int, expires_at: float, priority: int) -> None:
        self.control[CTL_CLASS_ENTRIES + priority] += 1
        self._lower(index, expires_at)

    def updated(self, index: int, expires_at: float, old_priority: int, priority: int) -> None:
        if old_priority != priority:
            self.deleted(old_priority)
            self.control[CTL_CLASS_ENTRIES + priority] += 1
        self._lower(index, expires_at)

    def deleted(self, priority: int) -> None:
        """One entry of class ``priority`` less; a count already at 0 was wrong: recount."""
        control = self.control
        if control[CTL_CLASS_ENTRIES + priority]:
            control[CTL_CLASS_ENTRIES + priority] -= 1
        else:
            control[CTL_HINTS_STALE] = 1

    def _lower(self, index: int, expires_at: float) -> None:
        """Keep the floor of entry ``index``'s range (and the least floor) <= ``expires_at``."""
        second = int(expires_at) if 0 < expires_at < NO_FLOOR_U32 else 0
        floors = self.floors
        region = index // self.span
        if second < floors[region]:
            floors[region] = second
        # Checked apart: after clear() the least floor is reset but the range floors are not,
        # and the least must stay at or below every floor a write relies on.
        if second < self.control[CTL_EXPIRY_FLOOR]:
            self.control[CTL_EXPIRY_FLOOR] = second

    # -- used when making room -------------------------------------------------------------------

    def reclaim(
        self,
        now: float,
        live_expiry: Callable[[int], float],
        delete: Callable[[int], object],
        protect: int,
        every_range: bool,
    ) -> int:
        """Delete the expired entries of the first range whose floor has passed (of every such
        range with ``every_range``), making those floors exact; returns how many went."""
        memory = self.memory
        floors = self.floors
        hwm = memory.entry_hwm()
        removed = 0
        for region, floor in enumerate(floors.tolist()):
            if floor > now:
                continue
            start = region * self.span
            expired, earliest = self._expired_in(start, min(start + self.span, hwm), now)
            for index in expired:
                if index != protect and live_expiry(index) <= now:  # checked via the entry
                    delete(index)
                    removed += 1
            floors[region] = earliest
            if removed and not every_range:
                break
        self.control[CTL_EXPIRY_FLOOR] = min(floors.tolist())
        return removed

    def _expired_in(self, start: int, end: int, now: float) -> tuple[list[int], int]:
        """The used entries in [start, end) whose live value expired, and the earliest whole
        second at which one of the others expires (one ``iter_unpack``, nothing copied)."""
        expired: list[int] = []
        earliest = NO_FLOOR_U32
        if end <= start:
            return expired, earliest
        view = self.memory.view(
            self.memory.entries_offset + start * ENTRY_SIZE, (end - start) * ENTRY_SIZE
        )
        try:
            for offset, fields in enumerate(ENTRY_HINTS.iter_unpack(view)):
                state, active, expiry0, _p0, expiry1, _p1 = fields
                if state != ENTRY_USED:
                    continue
                expiry = expiry1 if active & 1 else expiry0
                if expiry <= now:
                    expired.append(start + offset)
                else:
                    second = int(expiry) if expiry < NO_FLOOR_U32 else NO_FLOOR_U32
                    earliest = min(earliest, second)
        finally:
            view.release()
        return expired, earliest

    def recount(self) -> None:
        """Recompute the class counts and every floor from the entries, in one pass that copies
        nothing but a few fields per entry (``ENTRY_HINTS``), and clear the stale mark."""
        memory = self.memory
        counts = [0] * PRIORITY_CLASSES
        floors = [NO_FLOOR_U32] * FLOOR_REGIONS
        top = PRIORITY_CLASSES - 1
        span = self.span
        start = memory.entries_offset
        view = memory.view(start, memory.entry_hwm() * ENTRY_SIZE)
        try:
            for index, fields in enumerate(ENTRY_HINTS.iter_unpack(view)):
                state, active, expiry0, priority0, expiry1, priority1 = fields
                if state != ENTRY_USED:
                    continue
                expiry, priority = (expiry1, priority1) if active & 1 else (expiry0, priority0)
                counts[min(priority, top)] += 1
                second = int(expiry) if 0 < expiry < NO_FLOOR_U32 else 0
                region = index // span
                if second < floors[region]:
                    floors[region] = second
        finally:
            view.release()
        control = self.control
        for klass, count in enumerate(counts):
            control[CTL_CLASS_ENTRIES + klass] = count
        for region, floor in enumerate(floors):
            self.floors[region] = floor
        control[CTL_EXPIRY_FLOOR] = min(floors)
        control[CTL_HINTS_STALE] = 0


def pick_victim(memory: TableMemory, protect: int) -> Victim:
    """The live entry to evict (see the module docstring); index NIL when there is none.

    ``protect`` (the entry being updated) is never picked. Expired entries are not looked for
    here: :meth:`Hints.reclaim` has removed them first.
    """
    best, best_rank = _sample(memory, protect)
    if best == NIL:
        return NIL, False, 0
    lowest = _lowest_class(memory, protect)
    if lowest < best_rank[0]:
        found = _search_class(memory, protect, lowest)
        if found != NIL:
            return found, False, lowest
    return best, False, best_rank[0]


def _sample(memory: TableMemory, protect: int) -> tuple[int, tuple[int, int]]:
    """The lowest (class, last access) among up to EVICTION_SAMPLE random used entries."""
    hwm = memory.entry_hwm()
    if hwm == 0:
        return NIL, (0, 0)
    access = memory.access
    best, best_rank, sampled = NIL, (PRIORITY_CLASSES, 0), 0
    for _ in range(EVICTION_PROBES):
        index = random.randrange(hwm)
        if index == protect or memory.state(index) != ENTRY_USED:
            continue
        rank = (memory.live_priority(index), access[index])
        if rank < best_rank:
            best, best_rank = index, rank
        sampled += 1
        if sampled >= EVICTION_SAMPLE:
            break
    if sampled < EVICTION_SAMPLE:  # sparse table: walk from a random start to fill the sample
        start = random.randrange(hwm)
        for offset in range(hwm):
            index = (start + offset) % hwm
            if index != protect and memory.state(index) == ENTRY_USED:
                rank = (memory.live_priority(index), access[index])
                if rank < best_rank:
                    best, best_rank = index, rank
                sampled += 1
                if sampled >= EVICTION_SAMPLE:
                    break
    return best, best_rank


def _lowest_class(memory: TableMemory, protect: int) -> int:
    """The lowest priority class with a live entry (besides ``protect``), from the counts."""
    control = memory.control
    protected_class = memory.live_priority(protect) if protect != NIL else -1
    for klass in range(PRIORITY_CLASSES):
        count = control[CTL_CLASS_ENTRIES + klass]
        if count > (1 if klass == protected_class else 0):
            return klass
    return PRIORITY_CLASSES


def _search_class(memory: TableMemory, protect: int, klass: int) -> int:
    """An entry of class ``klass`` found by walking from CTL_EVICT_CURSOR; NIL after a whole
    pass finds none (the counts were wrong: they are recounted)."""
    control = memory.control
    hwm = memory.entry_hwm()
    cursor = int(control[CTL_EVICT_CURSOR])
    if not 0 <= cursor < hwm:
        cursor = 0
    for step in range(hwm):
        index = (cursor + step) % hwm
        if (
            index != protect
            and memory.state(index) == ENTRY_USED
            and memory.live_priority(index) == klass
        ):
            control[CTL_EVICT_CURSOR] = (index + 1) % hwm
            return index
    control[CTL_HINTS_STALE] = 1  # the counts were wrong: recounted before the next eviction
    return NIL
