"""Verifying and rebuilding a table: the recovery path after crashes and corruption.

The committed entries are the source of truth. An entry is *valid* when it is marked used, its
key hashes to its stored hash, its active descriptor's chunk chain is in range, does not share a
chunk with another valid entry, and its value matches the descriptor's checksum. Everything else
(bucket chains, the free stacks, chunk owners, counts) is derived, so :func:`rebuild` recomputes
it from the valid entries and drops the invalid ones. A writer killed mid-write therefore loses
at most the write it was making; intact entries always survive.

Both functions run with the table lock held; both are O(entries + chunks + buckets).
"""

from __future__ import annotations

from dataclasses import dataclass

from .exceptions import CorruptTable
from .layout import (
    CTL_CHUNK_HWM,
    CTL_CHUNKS_USED,
    CTL_DIRTY,
    CTL_ENTRIES,
    CTL_ENTRY_HWM,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    CTL_GENERATION,
    CTL_REPAIRS,
    CTL_VALUE_BYTES,
    DIRTY_REPAIRING,
    ENTRY_FREE,
    ENTRY_USED,
    KEY_MAX,
    NIL,
    U32,
)
from .memory import TableMemory

MAX_REPORTED = 50


@dataclass
class _Entry:
    index: int
    key: bytes
    expires_at: float
    length: int
    chunks: list[int]


def _validate(memory: TableMemory, index: int, chunk_hwm: int, check_owner: bool) -> _Entry | str:
    """The entry at ``index`` if it is valid, else a description of what is wrong with it."""
    try:
        _state, active, key_len, _next, key_hash = memory.head(index)
        if active > 1:
            return f"entry {index}: invalid active descriptor {active}"
        if not 0 < key_len <= KEY_MAX:
            return f"entry {index}: invalid key length {key_len}"
        key = memory.key(index, key_len)
        if memory.key_hash(key) != key_hash:
            return f"entry {index}: stored hash does not match its key"
        expires_at, length, first, crc = memory.descriptor(index, active)
    except CorruptTable as err:
        return f"entry {index}: {err}"
    chunks = []
    seen = set()
    chunk = first
    for _ in range(memory.geometry.chunks_for(length)):
        if chunk >= chunk_hwm or chunk in seen:
            return f"entry {index}: chunk chain leaves the table or loops at chunk {chunk}"
        if check_owner and memory.owners[chunk] != index + 1:
            return f"entry {index}: chunk {chunk} is not marked as owned by it"
        seen.add(chunk)
        chunks.append(chunk)
        chunk = memory.links[chunk]
    value = b"".join(
        memory.mm[start : start + memory.geometry.chunk_size]
        for start in map(memory.geometry.chunk_offset, chunks)
    )[:length]
    if memory.checksum(key_hash, expires_at, value) != crc:
        return f"entry {index}: value fails its checksum"
    return _Entry(index, key, expires_at, length, chunks)


def _bounded_hwm(memory: TableMemory) -> tuple[int, int]:
    geometry = memory.geometry
    control = memory.control
    return (
        min(control[CTL_ENTRY_HWM], geometry.entry_capacity),
        min(control[CTL_CHUNK_HWM], geometry.chunk_capacity),
    )


def verify(memory: TableMemory) -> list[str]:
    """Every inconsistency found (at most ``MAX_REPORTED``); an empty list means healthy."""
    problems: list[str] = []
    control = memory.control
    geometry = memory.geometry
    if not memory.segment.header_intact():
        problems.append("header: magic, geometry or checksum damaged")
    if control[CTL_ENTRY_HWM] > geometry.entry_capacity:
        problems.append("control: entry high-water mark beyond capacity")
    if control[CTL_CHUNK_HWM] > geometry.chunk_capacity:
        problems.append("control: chunk high-water mark beyond capacity")
    if control[CTL_DIRTY]:
        problems.append("control: a write was left half-done")
    entry_hwm, chunk_hwm = _bounded_hwm(memory)
    valid: dict[int, _Entry] = {}
    keys: set[bytes] = set()
    for index in range(entry_hwm):
        state = memory.state(index)
        if state == ENTRY_FREE:
            continue
        if state != ENTRY_USED:
            problems.append(f"entry {index}: invalid state {state}")
            continue
        entry = _validate(memory, index, chunk_hwm, check_owner=True)
        if isinstance(entry, str):
            problems.append(entry)
        elif entry.key in keys:
            problems.append(f"entry {index}: duplicate key")
        else:
            keys.add(entry.key)
            valid[index] = entry
    problems += _verify_chains(memory, valid, entry_hwm)
    problems += _verify_free_entries(memory, valid, entry_hwm)
    problems += _verify_chunks(memory, valid, chunk_hwm)
    if control[CTL_ENTRIES] != len(valid):
        problems.append(f"control: entry count {control[CTL_ENTRIES]} != {len(valid)}")
    value_bytes = sum(entry.length for entry in valid.values())
    if control[CTL_VALUE_BYTES] != value_bytes:
        problems.append(f"control: value byte count {control[CTL_VALUE_BYTES]} != {value_bytes}")
    return problems[:MAX_REPORTED]


def _verify_chains(memory: TableMemory, valid: dict[int, _Entry], entry_hwm: int) -> list[str]:
    problems: list[str] = []
    reached: set[int] = set()
    buckets = memory.buckets
    for bucket in range(memory.geometry.bucket_count):
        index = buckets[bucket]
        steps = 0
        while index != NIL:
            if index >= entry_hwm or steps > entry_hwm:
                problems.append(f"bucket {bucket}: chain leaves the table or loops")
                break
            if index in reached:
                problems.append(f"bucket {bucket}: entry {index} is chained twice")
                break
            reached.add(index)
            if index in valid and memory.key_hash(valid[index].key) & memory.mask != bucket:
                problems.append(f"bucket {bucket}: entry {index} belongs to another bucket")
            if memory.state(index) != ENTRY_USED:
                problems.append(f"bucket {bucket}: entry {index} is chained but not in use")
            index = memory.head(index)[3]
            steps += 1
    missing = len(set(valid) - reached)
    if missing:
        problems.append(f"buckets: {missing} live entries are not reachable")
    return problems


def _verify_free_entries(
    memory: TableMemory, valid: dict[int, _Entry], entry_hwm: int
) -> list[str]:
    index = memory.control[CTL_FREE_ENTRY]
    seen: set[int] = set()
    while index != NIL:
        if index >= entry_hwm or index in seen:
            return ["free-entry stack leaves the table or loops"]
        if memory.state(index) != ENTRY_FREE:
            return [f"free-entry stack holds entry {index}, which is in use"]
        seen.add(index)
        index = memory.head(index)[3]
    unused = sum(1 for index in range(entry_hwm) if memory.state(index) != ENTRY_USED)
    if len(seen) != unused:
        return [f"free-entry stack holds {len(seen)} entries, {unused} are free"]
    return []


def _verify_chunks(memory: TableMemory, valid: dict[int, _Entry], chunk_hwm: int) -> list[str]:
    problems: list[str] = []
    owned = {chunk for entry in valid.values() for chunk in entry.chunks}
    owners = memory.owners
    stray = sum(1 for chunk in range(chunk_hwm) if owners[chunk] and chunk not in owned)
    if stray:
        problems.append(f"chunks: {stray} chunks are marked owned but belong to no live entry")
    chunk = memory.control[CTL_FREE_CHUNK]
    seen: set[int] = set()
    while chunk != NIL:
        if chunk >= chunk_hwm or chunk in seen or chunk in owned:
            problems.append("free-chunk stack leaves the table, loops or holds a used chunk")
            break
        seen.add(chunk)
        chunk = memory.links[chunk]
    else:
        if len(seen) + len(owned) != chunk_hwm:
            problems.append(f"chunks: {chunk_hwm - len(seen) - len(owned)} chunks leaked")
    if memory.control[CTL_CHUNKS_USED] != len(owned):
        problems.append(f"control: chunk count {memory.control[CTL_CHUNKS_USED]} != {len(owned)}")
    return problems


@dataclass
class RepairResult:
    kept: int
    dropped: int
    problems: list[str]


def rebuild(memory: TableMemory) -> RepairResult:
    """Drop invalid entries and recompute every derived structure from the valid ones."""
    control = memory.control
    control[CTL_DIRTY] = DIRTY_REPAIRING
    problems: list[str] = []
    if not memory.segment.header_intact():
        memory.segment.rewrite_header()
        problems.append("header rewritten from this process's copy")
    entry_hwm, chunk_hwm = _bounded_hwm(memory)
    control[CTL_ENTRY_HWM], control[CTL_CHUNK_HWM] = entry_hwm, chunk_hwm
    kept = _select_valid(memory, entry_hwm, chunk_hwm, problems)
    dropped = sum(
        1 for index in range(entry_hwm) if memory.state(index) != ENTRY_FREE and index not in kept
    )
    _rewrite_entries(memory, kept, entry_hwm)
    _rewrite_chunks(memory, kept, chunk_hwm)
    control[CTL_ENTRIES] = len(kept)
    control[CTL_VALUE_BYTES] = sum(entry.length for entry in kept.values())
    control[CTL_REPAIRS] += 1
    control[CTL_GENERATION] += 1
    control[CTL_DIRTY] = 0
    return RepairResult(kept=len(kept), dropped=dropped, problems=problems[:MAX_REPORTED])


def _select_valid(
    memory: TableMemory, entry_hwm: int, chunk_hwm: int, problems: list[str]
) -> dict[int, _Entry]:
    """Valid entries by index; of two entries with one key, the later-expiring one wins."""
    kept: dict[int, _Entry] = {}
    by_key: dict[bytes, int] = {}
    claimed: set[int] = set()
    for index in range(entry_hwm):
        if memory.state(index) != ENTRY_USED:
            continue
        entry = _validate(memory, index, chunk_hwm, check_owner=False)
        if isinstance(entry, str):
            problems.append(entry)
            continue
        if claimed.intersection(entry.chunks):
            problems.append(f"entry {index}: shares chunks with another entry")
            continue
        rival = by_key.get(entry.key)
        if rival is not None:
            if kept[rival].expires_at >= entry.expires_at:
                problems.append(f"entry {index}: duplicate key")
                continue
            claimed.difference_update(kept.pop(rival).chunks)
            problems.append(f"entry {rival}: duplicate key")
        by_key[entry.key] = index
        kept[index] = entry
        claimed.update(entry.chunks)
    return kept


def _rewrite_entries(memory: TableMemory, kept: dict[int, _Entry], entry_hwm: int) -> None:
    buckets = memory.buckets
    buckets[:] = memoryview(b"\xff" * (memory.geometry.bucket_count * U32)).cast("I")
    free_head = NIL
    for index in range(entry_hwm - 1, -1, -1):
        entry = kept.get(index)
        if entry is None:
            memory.set_state(index, ENTRY_FREE)
            memory.set_next(index, free_head)
            free_head = index
        else:
            bucket = memory.key_hash(entry.key) & memory.mask
            memory.set_next(index, buckets[bucket])
            buckets[bucket] = index
    memory.control[CTL_FREE_ENTRY] = free_head


def _rewrite_chunks(memory: TableMemory, kept: dict[int, _Entry], chunk_hwm: int) -> None:
    owners = memory.owners
    links = memory.links
    owners[:chunk_hwm] = memoryview(bytes(chunk_hwm * U32)).cast("I")
    used = 0
    for entry in kept.values():
        chunks = entry.chunks
        for position, chunk in enumerate(chunks):
            owners[chunk] = entry.index + 1
            links[chunk] = chunks[position + 1] if position + 1 < len(chunks) else NIL
        used += len(chunks)
    free_head = NIL
    for chunk in range(chunk_hwm - 1, -1, -1):
        if not owners[chunk]:
            links[chunk] = free_head
            free_head = chunk
    memory.control[CTL_FREE_CHUNK] = free_head
    memory.control[CTL_CHUNKS_USED] = used
