"""The four writes (insert, update, delete, clear), each one armed intent, and their recovery.

Every write has the same shape: plan (reads and checks only, so CorruptTable comes before
anything is stored), arm the intent, the pre-commit stores, **the commit** (one byte: an
entry's ``state`` for inserts and deletes, its ``active`` descriptor for updates; arming itself
for clear), the post-commit stores, disarm. The post-commit stores are functions of the intent
alone (``_finish_*``, which take the recorded values as arguments: the write passes those it
recorded, recovery those of the record it reads back), so recovery after the commit calls the
very same functions; before the commit it calls ``_undo_*``, which puts back the old values
recorded in the intent. Whether the commit happened is read from the commit byte itself, which
is also what a full rebuild trusts: so recovery and rebuild always agree on which entries are
live.

Fault points (``faults.hook``) sit before the first and after every store, named
``"<write>:<before|after>-<store>"``; recovery's are ``"recover-<write>:..."`` (see
:data:`FAULT_POINTS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .alloc import (
    ChunkPlan,
    Hook,
    apply_chunks,
    free_chain,
    plan_chunks,
    plan_entry,
    take_entry,
    undo_chunks,
    undo_take_entry,
)
from .exceptions import CorruptTable
from .index import descriptor_of, predecessor, priority_of
from .intent import Intent, IntentLog
from .layout import (
    CTL_CHUNK_HWM,
    CTL_CHUNKS_USED,
    CTL_CLASS_ENTRIES,
    CTL_DELETES,
    CTL_ENTRIES,
    CTL_ENTRY_HWM,
    CTL_EVICT_CURSOR,
    CTL_EXPIRY_FLOOR,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    CTL_GENERATION,
    CTL_HINTS_STALE,
    CTL_VALUE_BYTES,
    ENTRY_FREE,
    ENTRY_USED,
    F_ACTIVE,
    F_HASH,
    F_NEXT,
    F_STATE,
    INTENT_OP_CLEAR,
    INTENT_OP_DELETE,
    INTENT_OP_INSERT,
    INTENT_OP_UPDATE,
    NIL,
    PRIORITY_CLASSES,
    U32,
)
from .memory import TableMemory, Words

if TYPE_CHECKING:
    from .eviction import Hints

__all__ = ["FAULT_POINTS", "clear", "delete", "insert", "recover", "update"]

_U64 = 0xFFFFFFFFFFFFFFFF
#: The eviction hints of an empty table (see :mod:`.eviction`): set by clear's fixed stores.
_EMPTY_HINTS = (
    *((CTL_CLASS_ENTRIES + klass, 0) for klass in range(PRIORITY_CLASSES)),
    (CTL_EXPIRY_FLOOR, _U64),
    (CTL_EVICT_CURSOR, 0),
    (CTL_HINTS_STALE, 0),
)
#: How each op changes the entry count (indexed by op; clear is not checked this way).
_ENTRY_DELTA = (0, 1, 0, -1, 0)

_ALLOC = (
    "after-chunk-owner",
    "after-chunk-link",
    "after-fresh-owner",
    "after-fresh-link",
    "after-free-chunk",
    "after-chunk-hwm",
    "after-chunks-used",
)
_FREE = ("after-free-owner", "after-free-link", "after-free-head")
_UNDO_ALLOC = ("after-undo-chunk-link", "after-undo-chunk-owners", "after-undo-chunk-words")
_INSERT_FINISH = ("after-bucket", "after-entries", "after-value-bytes")
_UPDATE_FINISH = (*_FREE, "after-chunks-used-final", "after-value-bytes")
_DELETE_FINISH = ("after-unlink", *_FREE, "after-entry-link", "after-free-entry", "after-counts")
_CLEAR_FINISH = ("after-buckets", "after-words", "after-counters")


def _points(step: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{step}:{name}" for name in names)


#: Every fault point of the writes and of their recovery, in the order a write passes them.
FAULT_POINTS: tuple[str, ...] = (
    *_points(
        "insert",
        (
            "before-arm",
            "after-arm",
            *_ALLOC,
            "after-take-entry",
            "after-value",
            "after-head",
            "after-descriptor",
            "after-commit",
            *_INSERT_FINISH,
            "after-disarm",
        ),
    ),
    *_points(
        "update",
        (
            "before-arm",
            "after-arm",
            *_ALLOC,
            "after-value",
            "after-descriptor",
            "after-commit",
            *_UPDATE_FINISH,
            "after-disarm",
        ),
    ),
    *_points(
        "delete", ("before-arm", "after-arm", "after-commit", *_DELETE_FINISH, "after-disarm")
    ),
    *_points("clear", ("before-arm", "after-arm", "after-commit", *_CLEAR_FINISH, "after-disarm")),
    *_points(
        "recover-insert",
        (*_INSERT_FINISH, *_UNDO_ALLOC, "after-undo-entry-link", "after-undo-take-entry"),
    ),
    *_points("recover-update", (*_UPDATE_FINISH, *_UNDO_ALLOC)),
    *_points("recover-delete", _DELETE_FINISH),
    *_points("recover-clear", _CLEAR_FINISH),
)


#: (entries, chunks used, value bytes) after a write: what its last stores set.
Counts = tuple[int, int, int]
#: (first chunk, chunk count, free-stack head to push them on, whether it is a run: None when
#: not known) of a chain a write frees.
Freed = tuple[int, int, int, bool | None]


def _record(
    memory: TableMemory,
    log: IntentLog,
    op: int,
    head: tuple[int, int, int, int, int, int],
    words: Words,
    chunks: ChunkPlan,
    freed: tuple[int, int, int, int],
) -> tuple[tuple[int, ...], Counts]:
    """The intent record (``INTENT_BODY`` fields, in order) of an insert, update or delete, and
    the counts it implies; refused, before arming, when they could not be stored.

    ``head`` is (old_active, from_hwm, entry, bucket, pred, succ), ``words`` the checked
    :meth:`TableMemory.words`, ``chunks`` the allocation plan, ``freed`` (freed_first,
    freed_count, length, old_length). A plain tuple, not an :class:`Intent`: packing a tuple
    subclass is twice as slow, and the write's stores take these same values as arguments
    (recovery passes the fields of the :class:`Intent` it reads back).
    """
    # Flat unpacking and one tuple display: star-unpacking into the record costs twice as much.
    old_active, from_hwm, entry, bucket, pred, succ = head
    free_entry, _free_chunk, entry_hwm, _chunk_hwm, entries, used, value_bytes = words
    count, taken, last_stack, last_link, free_chunk, free_mid, chunk_hwm, first, _run = chunks
    freed_first, freed_count, length, old_length = freed
    counts = (
        entries + _ENTRY_DELTA[op],
        used + count - freed_count,
        value_bytes + length - old_length,
    )
    geometry = memory.geometry
    if not (
        0 <= counts[0] <= geometry.entry_capacity
        and 0 <= counts[1] <= geometry.chunk_capacity
        and 0 <= counts[2] <= memory.data_capacity
    ):
        raise CorruptTable("the entry, chunk or value-byte count is impossible")
    record = (
        log.next_seq(),
        op,
        old_active,
        from_hwm,
        entry,
        bucket,
        pred,
        succ,
        free_entry,
        entry_hwm,
        count,
        taken,
        last_stack,
        last_link,
        free_chunk,
        free_mid,
        chunk_hwm,
        first,
        freed_first,
        freed_count,
        length,
        old_length,
        entries,
        used,
        value_bytes,
        0,  # deletes (clear only)
        0,  # generation (clear only)
    )
    return record, counts


def _counts_after(intent: Intent) -> Counts:
    """The counts a recorded insert, update or delete sets (what :func:`_record` computed)."""
    return (
        intent.entries + _ENTRY_DELTA[intent.op],
        intent.chunks_used_after,
        intent.value_bytes_after,
    )


# -- insert -------------------------------------------------------------------------------------


def insert(
    memory: TableMemory,
    log: IntentLog,
    hook: Hook,
    key: bytes,
    key_hash: int,
    words: Words,
    value: bytes,
    expires_at: float,
    crc: int,
    priority: int,
    hints: Hints,
) -> int:
    """Add a new entry for ``key`` with priority class ``priority``; returns its index.

    The caller made room; ``words`` are the checked :meth:`TableMemory.words` as of now.
    ``hints`` are updated before the disarm (see :class:`eviction.Hints`).
    """
    index, from_hwm, succ = plan_entry(memory, words[0], words[2])
    length = len(value)
    count = -(-length // memory.chunk_size)  # Geometry.chunks_for, inline
    plan = plan_chunks(memory, count, words[1], words[3])
    bucket = key_hash & memory.mask
    record, counts = _record(
        memory,
        log,
        INTENT_OP_INSERT,
        (0, from_hwm, index, bucket, NIL, succ),  # old_active, from_hwm, entry, bucket, pred, succ
        words,
        plan,
        (NIL, 0, length, 0),  # freed_first, freed_count, length, old_length
    )
    if from_hwm:
        # A slot above the mark may hold a committed entry from before clear(); it is unused,
        # so this store needs no undo, and after it ``state == used`` means "committed".
        memory.set_state(index, ENTRY_FREE)
    if hook is not None:
        hook("insert:before-arm")
    log.arm(record)
    if hook is not None:
        hook("insert:after-arm")
    run = apply_chunks(memory, hook, "insert", index, plan, words[5])
    take_entry(memory, hook, "insert", index, from_hwm, succ)
    first = plan[7]
    memory.write_value(first, value, run)
    if hook is not None:
        hook("insert:after-value")
    memory.write_head(index, key, key_hash, memory.buckets[bucket])
    if hook is not None:
        hook("insert:after-head")
    memory.write_descriptor(index, 0, expires_at, length, first, crc, priority)
    if hook is not None:
        hook("insert:after-descriptor")
    memory.set_state(index, ENTRY_USED)  # commit
    if hook is not None:
        hook("insert:after-commit")
    _finish_insert(memory, hook, "insert", bucket, index, counts)
    hints.inserted(index, expires_at, priority)
    log.disarm()
    if hook is not None:
        hook("insert:after-disarm")
    return index


def _finish_insert(
    memory: TableMemory, hook: Hook, step: str, bucket: int, index: int, counts: Counts
) -> None:
    memory.buckets[bucket] = index
    if hook is not None:
        hook(f"{step}:after-bucket")
    memory.control[CTL_ENTRIES] = counts[0]
    if hook is not None:
        hook(f"{step}:after-entries")
    memory.control[CTL_VALUE_BYTES] = counts[2]
    if hook is not None:
        hook(f"{step}:after-value-bytes")


def _undo_insert(memory: TableMemory, intent: Intent, hook: Hook, step: str) -> None:
    undo_chunks(memory, intent, hook, step)
    undo_take_entry(memory, intent, hook, step)


# -- update -------------------------------------------------------------------------------------


def update(
    memory: TableMemory,
    log: IntentLog,
    hook: Hook,
    index: int,
    active: int,
    old: tuple[float, int, int, int],
    words: Words,
    value: bytes,
    expires_at: float,
    crc: int,
    priority: int,
    hints: Hints,
    old_priority: int,
) -> None:
    """Give entry ``index`` a new value, expiry and priority class (``old_priority`` is the
    class of the value it replaces).

    The caller made room; ``words`` are the checked :meth:`TableMemory.words` as of now.
    ``active`` (checked) and ``old``, its live descriptor, are the entry as the lookup read it
    under this lock hold: still current (making room deletes *other* entries, which can change
    only this entry's chain link), so they are not read again.
    """
    _expiry, old_length, old_first, _crc = old
    freed, freed_run = memory.chain_span(index, old_first, old_length, words[3])  # checked
    freed_first = old_first if freed else NIL
    length = len(value)
    count = -(-length // memory.chunk_size)  # Geometry.chunks_for, inline
    plan = plan_chunks(memory, count, words[1], words[3])
    record, counts = _record(
        memory,
        log,
        INTENT_OP_UPDATE,
        (active, 0, index, 0, NIL, NIL),  # old_active, from_hwm, entry, bucket, pred, succ
        words,
        plan,
        (freed_first, freed, length, old_length),
    )
    if hook is not None:
        hook("update:before-arm")
    log.arm(record)
    if hook is not None:
        hook("update:after-arm")
    run = apply_chunks(memory, hook, "update", index, plan, words[5])
    first = plan[7]
    memory.write_value(first, value, run)
    if hook is not None:
        hook("update:after-value")
    memory.write_descriptor(index, 1 - active, expires_at, length, first, crc, priority)
    if hook is not None:
        hook("update:after-descriptor")
    memory.set_active(index, 1 - active)  # commit
    if hook is not None:
        hook("update:after-commit")
    _finish_update(memory, hook, "update", (freed_first, freed, plan[5], freed_run), counts)
    hints.updated(index, expires_at, old_priority, priority)
    log.disarm()
    if hook is not None:
        hook("update:after-disarm")


def _finish_update(
    memory: TableMemory, hook: Hook, step: str, freed: Freed, counts: Counts
) -> None:
    free_chain(memory, *freed, hook, step)
    memory.control[CTL_CHUNKS_USED] = counts[1]
    if hook is not None:
        hook(f"{step}:after-chunks-used-final")
    memory.control[CTL_VALUE_BYTES] = counts[2]
    if hook is not None:
        hook(f"{step}:after-value-bytes")


# -- delete -------------------------------------------------------------------------------------


def delete(
    memory: TableMemory,
    log: IntentLog,
    hook: Hook,
    index: int,
    hints: Hints,
    fields: tuple[Any, ...] | None = None,
) -> int:
    """Remove entry ``index`` (which must be used); returns the length of its value.

    ``fields`` is the entry as a lookup just unpacked it (read here when not given).
    """
    if fields is None:
        fields = memory.entry(index)
    if fields[F_STATE] != ENTRY_USED:
        raise CorruptTable(f"entry {index} is not in use")
    _expiry, length, first, _crc = descriptor_of(index, fields)  # active checked
    words = memory.words()
    freed, freed_run = memory.chain_span(index, first, length, words[3])  # checked
    freed_first = first if freed else NIL
    bucket = fields[F_HASH] & memory.mask
    pred = predecessor(memory, bucket, index)
    succ = fields[F_NEXT]
    if succ != NIL and succ >= words[2]:
        raise CorruptTable(f"entry {index} links to entry {succ}, out of range")
    record, counts = _record(
        memory,
        log,
        INTENT_OP_DELETE,
        (fields[F_ACTIVE], 0, index, bucket, pred, succ),
        words,
        plan_chunks(memory, 0, words[1], words[3]),  # nothing is allocated
        (freed_first, freed, 0, length),  # freed_first, freed_count, length, old_length
    )
    if hook is not None:
        hook("delete:before-arm")
    log.arm(record)
    if hook is not None:
        hook("delete:after-arm")
    memory.set_state(index, ENTRY_FREE)  # commit
    if hook is not None:
        hook("delete:after-commit")
    _finish_delete(
        memory,
        hook,
        "delete",
        (bucket, pred, succ),
        index,
        words[0],
        (freed_first, freed, words[1], freed_run),
        counts,
    )
    hints.deleted(priority_of(fields))
    log.disarm()
    if hook is not None:
        hook("delete:after-disarm")
    return length


def _finish_delete(
    memory: TableMemory,
    hook: Hook,
    step: str,
    unlink: tuple[int, int, int],
    index: int,
    free_entry: int,
    freed: Freed,
    counts: Counts,
) -> None:
    """Unlink ``index`` (``unlink`` is its bucket, predecessor and successor), free its chain,
    push it on the free-entry stack whose head was ``free_entry``, store the counts."""
    control = memory.control
    bucket, pred, succ = unlink
    if pred == NIL:
        memory.buckets[bucket] = succ
    else:
        memory.set_next(pred, succ)
    if hook is not None:
        hook(f"{step}:after-unlink")
    free_chain(memory, *freed, hook, step)
    memory.set_next(index, free_entry)
    if hook is not None:
        hook(f"{step}:after-entry-link")
    control[CTL_FREE_ENTRY] = index
    if hook is not None:
        hook(f"{step}:after-free-entry")
    control[CTL_ENTRIES], control[CTL_CHUNKS_USED], control[CTL_VALUE_BYTES] = counts
    if hook is not None:
        hook(f"{step}:after-counts")


# -- clear --------------------------------------------------------------------------------------


def clear(memory: TableMemory, log: IntentLog, hook: Hook) -> int:
    """Empty the table in O(buckets); returns how many entries there were.

    The commit is the store of 0 into the entry high-water mark: from then on no entry is in
    the range that lookups' checks and the rebuild examine. The old bucket array is too large
    to record, so a clear is never undone after its commit, only finished (every later store
    sets a fixed value, so redoing it is harmless); before it, nothing was stored.
    """
    control = memory.control
    entries, used, value_bytes = memory.counts()
    intent = Intent(
        seq=log.next_seq(),
        op=INTENT_OP_CLEAR,
        old_active=0,
        from_hwm=0,
        entry=0,
        bucket=0,
        pred=NIL,
        succ=NIL,
        free_entry=NIL,
        entry_hwm=0,
        chunks=0,
        stack_taken=0,
        last_stack=NIL,
        last_link=NIL,
        free_chunk=NIL,
        free_chunk_mid=NIL,
        chunk_hwm=0,
        first=NIL,
        freed_first=NIL,
        freed_count=0,
        length=0,
        old_length=0,
        entries=entries,
        chunks_used=used,
        value_bytes=value_bytes,
        deletes=control[CTL_DELETES],
        generation=control[CTL_GENERATION],
    )
    if hook is not None:
        hook("clear:before-arm")
    log.arm(intent)
    if hook is not None:
        hook("clear:after-arm")
    _commit_clear(memory, hook)
    _finish_clear(memory, intent, hook, "clear")
    log.disarm()
    if hook is not None:
        hook("clear:after-disarm")
    return entries


def _commit_clear(memory: TableMemory, hook: Hook) -> None:
    memory.control[CTL_ENTRY_HWM] = 0  # commit
    if hook is not None:
        hook("clear:after-commit")


def _finish_clear(memory: TableMemory, intent: Intent, hook: Hook, step: str) -> None:
    control = memory.control
    memory.buckets[:] = memoryview(b"\xff" * (memory.geometry.bucket_count * U32)).cast("I")
    if hook is not None:
        hook(f"{step}:after-buckets")
    for word, value in (
        (CTL_FREE_ENTRY, NIL),
        (CTL_FREE_CHUNK, NIL),
        (CTL_CHUNK_HWM, 0),
        (CTL_ENTRIES, 0),
        (CTL_CHUNKS_USED, 0),
        (CTL_VALUE_BYTES, 0),
        *_EMPTY_HINTS,
    ):
        control[word] = value
    if hook is not None:
        hook(f"{step}:after-words")
    control[CTL_DELETES] = (intent.deletes + intent.entries) & _U64
    control[CTL_GENERATION] = (intent.generation + 1) & _U64
    if hook is not None:
        hook(f"{step}:after-counters")


# -- recovery -----------------------------------------------------------------------------------


def recover(memory: TableMemory, intent: Intent, hook: Hook) -> bool:
    """Apply an armed, validated intent: finish it past its commit, else undo it.

    Returns True when the write was rolled forward. Raises CorruptTable when the table does
    not look like the intent says it should (the caller then rebuilds). The caller disarms.
    """
    op = intent.op
    step = ("", "recover-insert", "recover-update", "recover-delete", "recover-clear")[op]
    if op == INTENT_OP_CLEAR:
        if memory.control[CTL_ENTRY_HWM] != 0:
            return False  # killed before its commit: nothing was stored
        _finish_clear(memory, intent, hook, step)
        return True
    state = memory.state(intent.entry)
    counts = _counts_after(intent)
    freed = (intent.freed_first, intent.freed_count, intent.free_chunk_mid, None)
    if op == INTENT_OP_INSERT:
        if state == ENTRY_USED:
            _finish_insert(memory, hook, step, intent.bucket, intent.entry, counts)
            return True
        _undo_insert(memory, intent, hook, step)
        return False
    if op == INTENT_OP_DELETE:
        if state == ENTRY_FREE:
            unlink = (intent.bucket, intent.pred, intent.succ)
            _finish_delete(
                memory, hook, step, unlink, intent.entry, intent.free_entry, freed, counts
            )
            return True
        return False  # nothing is stored before a delete's commit
    active = memory.active(intent.entry)
    if state != ENTRY_USED:
        raise CorruptTable(f"the entry {intent.entry} of an interrupted update is not in use")
    if active != intent.old_active:
        _finish_update(memory, hook, step, freed, counts)
        return True
    undo_chunks(memory, intent, hook, step)
    return False
