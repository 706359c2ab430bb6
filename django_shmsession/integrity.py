"""Verifying and rebuilding a table: the recovery path after crashes and corruption.

The committed entries are the source of truth. An entry is *valid* when it is marked used, its
key hashes to its stored hash, its active descriptor's chunk chain is in range, does not share a
chunk with another valid entry, and its value matches the descriptor's checksum. Everything else
(bucket chains, the free stacks, chunk owners, counts) is derived, so :func:`rebuild` recomputes
it from the valid entries and drops the invalid ones. A writer killed mid-write therefore loses
at most the write it was making; intact entries always survive.

:func:`rebuild` runs with the table lock held for its whole O(entries + chunks + buckets) run:
it is only for detected corruption (``CTL_REPAIR``) and ``check(repair=True)``; crashes are
recovered from the intent log in O(1) (:mod:`django_shmsession.recovery`). Verification runs in
batches (:class:`BatchCheck`), each under the lock, so checking never stalls requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .exceptions import CorruptTable
from .index import find
from .layout import (
    CTL_CHUNK_HWM,
    CTL_CHUNKS_USED,
    CTL_ENTRIES,
    CTL_ENTRY_HWM,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    CTL_GENERATION,
    CTL_REPAIR,
    CTL_REPAIRS,
    CTL_VALUE_BYTES,
    ENTRY_FREE,
    ENTRY_USED,
    INTENT_BODY,
    INTENT_BODY_OFFSET,
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
        if memory.key(index, KEY_MAX)[key_len:].strip(b"\0"):
            # Lookups compare the whole zero-padded field: such an entry is unreachable, and
            # repairing it would resurrect a key that deletes already reported missing.
            return f"entry {index}: damaged key padding"
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
    """Every inconsistency found (at most ``MAX_REPORTED``); an empty list means healthy.

    The whole check in one go (the caller holds the lock throughout): for tests and small
    tables. ``SessionTable.check`` runs the same :class:`BatchCheck` a batch per lock hold.
    """
    check = BatchCheck(memory)
    while not check.step(memory):
        pass
    return check.problems[:MAX_REPORTED]


class BatchCheck:
    """A verification split into short steps, each run under the lock, the lock released between.

    Every step checks something that is local to the moment it runs (one entry, one bucket
    chain, one chunk's owner), so what it reports is a real problem whatever happened between
    steps. The global counts (live entries, value bytes, chunks in use, free-stack lengths) add
    up over the whole scan; they are compared only when no write happened during it (the intent
    sequence and the generation did not move): otherwise ``counts_checked`` stays False rather
    than reporting a false problem. A structural change (clear, rebuild: the generation moved)
    restarts the scan, up to ``MAX_RESTARTS`` times.
    """

    MAX_RESTARTS = 3

    def __init__(self, memory: TableMemory, batch: int = 256) -> None:
        self.batch = batch
        self.problems: list[str] = []
        self.counts_checked = False
        self.restarts = 0
        self._memory = memory
        self._reset()

    def _reset(self) -> None:
        memory = self._memory
        self._phase = 0
        self._position = 0
        self._stamp = _stamp(memory)
        self._entry_hwm, self._chunk_hwm = _bounded_hwm(memory)
        self._live = self._value_bytes = self._chain_chunks = self._owned = 0
        self._keys_checked: set[int] = set()
        self._walk_node = NIL
        self._walk_steps = 0
        self._free_entries = self._free_chunks = -1

    def step(self, memory: TableMemory) -> bool:
        """Run one batch (lock held); True when the check is complete."""
        stamp = _stamp(memory)
        if stamp[1] != self._stamp[1] and self.restarts < self.MAX_RESTARTS:
            self.restarts += 1
            self.problems.clear()
            self._reset()
        phases = (
            self._header,
            self._entries,
            self._buckets,
            self._chunks,
            self._free_entry_stack,
            self._free_chunk_stack,
            self._counts,
        )
        if phases[self._phase](memory):
            self._phase += 1
            self._position = 0
            self._walk_node = NIL
            self._walk_steps = 0
        return self._phase >= len(phases)

    def _header(self, memory: TableMemory) -> bool:
        control = memory.control
        geometry = memory.geometry
        if not memory.segment.header_intact():
            self.problems.append("header: magic, geometry or checksum damaged")
        if control[CTL_ENTRY_HWM] > geometry.entry_capacity:
            self.problems.append("control: entry high-water mark beyond capacity")
        if control[CTL_CHUNK_HWM] > geometry.chunk_capacity:
            self.problems.append("control: chunk high-water mark beyond capacity")
        if control[CTL_REPAIR]:
            self.problems.append("control: a repair is pending")
        return True

    def _entries(self, memory: TableMemory) -> bool:
        end = min(self._position + self.batch, self._entry_hwm, memory.control[CTL_ENTRY_HWM])
        chunk_hwm = min(memory.control[CTL_CHUNK_HWM], memory.geometry.chunk_capacity)
        for index in range(self._position, end):
            state = memory.state(index)
            if state == ENTRY_FREE:
                continue
            if state != ENTRY_USED:
                self.problems.append(f"entry {index}: invalid state {state}")
                continue
            entry = _validate(memory, index, chunk_hwm, check_owner=True)
            if isinstance(entry, str):
                self.problems.append(entry)
                continue
            problem = _reachable(memory, entry)
            if problem:
                self.problems.append(problem)
            self._live += 1
            self._value_bytes += entry.length
            self._chain_chunks += len(entry.chunks)
        self._position = end
        return end >= min(self._entry_hwm, memory.control[CTL_ENTRY_HWM])

    def _buckets(self, memory: TableMemory) -> bool:
        count = memory.geometry.bucket_count
        end = min(self._position + 16 * self.batch, count)
        for bucket in range(self._position, end):
            problem = _verify_chain(memory, bucket)
            if problem:
                self.problems.append(problem)
        self._position = end
        return end >= count

    def _chunks(self, memory: TableMemory) -> bool:
        owners = memory.owners
        entry_hwm = min(memory.control[CTL_ENTRY_HWM], memory.geometry.entry_capacity)
        chunk_hwm = min(self._chunk_hwm, memory.control[CTL_CHUNK_HWM])
        end = min(self._position + 16 * self.batch, chunk_hwm)
        for chunk in range(self._position, end):
            tag = owners[chunk]
            if not tag:
                continue
            self._owned += 1
            if tag > entry_hwm or memory.state(tag - 1) != ENTRY_USED:
                self.problems.append(f"chunk {chunk}: owned by entry {tag - 1}, which is not used")
        self._position = end
        return end >= chunk_hwm

    def _walk(self, memory: TableMemory, head_word: int, bound: int, is_free: Any) -> int | None:
        """Advance a free-stack walk by one batch: its length when done, -1 when broken or
        abandoned, None when it needs more batches. A walk longer than ``bound`` loops."""
        node = memory.control[head_word] if self._walk_steps == 0 else self._walk_node
        for _ in range(16 * self.batch):
            if node == NIL:
                return self._walk_steps
            if node >= bound or self._walk_steps >= bound or not is_free(node):
                return -1
            self._walk_steps += 1
            node = memory.head(node)[3] if head_word == CTL_FREE_ENTRY else memory.links[node]
        self._walk_node = node
        return None

    def _free_entry_stack(self, memory: TableMemory) -> bool:
        bound = min(memory.control[CTL_ENTRY_HWM], memory.geometry.entry_capacity)
        length = self._walk(
            memory, CTL_FREE_ENTRY, bound, lambda index: memory.state(index) != ENTRY_USED
        )
        if length is None:
            return False
        if length < 0 and _stamp(memory) == self._stamp:
            self.problems.append("free-entry stack leaves the table, loops or holds a used entry")
        self._free_entries = length
        return True

    def _free_chunk_stack(self, memory: TableMemory) -> bool:
        bound = min(memory.control[CTL_CHUNK_HWM], memory.geometry.chunk_capacity)
        owners = memory.owners
        length = self._walk(memory, CTL_FREE_CHUNK, bound, lambda chunk: owners[chunk] == 0)
        if length is None:
            return False
        if length < 0 and _stamp(memory) == self._stamp:
            self.problems.append("free-chunk stack leaves the table, loops or holds a used chunk")
        self._free_chunks = length
        return True

    def _counts(self, memory: TableMemory) -> bool:
        if _stamp(memory) != self._stamp:
            return True  # writes happened during the scan: the sums mean nothing
        self.counts_checked = True
        control = memory.control
        expected = (
            ("entry count", control[CTL_ENTRIES], self._live),
            ("value byte count", control[CTL_VALUE_BYTES], self._value_bytes),
            ("chunk count", control[CTL_CHUNKS_USED], self._chain_chunks),
        )
        for label, stored, counted in expected:
            if stored != counted:
                self.problems.append(f"control: {label} {stored} != {counted}")
        if self._owned != self._chain_chunks:
            self.problems.append(
                f"chunks: {self._owned} chunks are marked owned, live chains hold "
                f"{self._chain_chunks}"
            )
        unused = self._entry_hwm - self._live
        if self._free_entries >= 0 and self._free_entries != unused:
            self.problems.append(
                f"free-entry stack holds {self._free_entries} entries, {unused} are free"
            )
        unowned = self._chunk_hwm - self._owned
        if self._free_chunks >= 0 and self._free_chunks != unowned:
            self.problems.append(f"chunks: {unowned - self._free_chunks} chunks leaked")
        return True


def _stamp(memory: TableMemory) -> tuple[int, int]:
    """(last intent sequence, generation): moves on every write and every structural change."""
    seq: int = INTENT_BODY.unpack_from(memory.mm, INTENT_BODY_OFFSET)[0]
    return seq, memory.control[CTL_GENERATION]


def _reachable(memory: TableMemory, entry: _Entry) -> str:
    """'' when a lookup of the entry's key finds this very entry, else what is wrong."""
    try:
        found, _fields = find(memory, entry.key, memory.key_hash(entry.key))
    except CorruptTable as err:
        return f"entry {entry.index}: lookup fails: {err}"
    if found == NIL:
        return f"entry {entry.index}: not reachable from its bucket"
    if found != entry.index:
        return f"entry {entry.index}: duplicate key (entry {found} has it too)"
    return ""


def _verify_chain(memory: TableMemory, bucket: int) -> str:
    """'' when ``bucket``'s chain is acyclic and holds only used entries of this bucket."""
    hwm = min(memory.control[CTL_ENTRY_HWM], memory.geometry.entry_capacity)
    index = memory.buckets[bucket]
    seen: set[int] = set()
    while index != NIL:
        if index >= hwm or index in seen:
            return f"bucket {bucket}: chain leaves the table or loops"
        seen.add(index)
        state, _active, _key_len, next_index, key_hash = memory.head(index)
        if state != ENTRY_USED:
            return f"bucket {bucket}: entry {index} is chained but not in use"
        if key_hash & memory.mask != bucket:
            return f"bucket {bucket}: entry {index} belongs to another bucket"
        index = next_index
    return ""


@dataclass
class RepairResult:
    kept: int
    dropped: int
    problems: list[str]


def rebuild(memory: TableMemory) -> RepairResult:
    """Drop invalid entries and recompute every derived structure from the valid ones."""
    control = memory.control
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
