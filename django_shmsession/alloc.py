"""Entry and chunk allocation: planning (read-only, checked) and the stores that apply it.

A write first *plans* what it takes (which entry, which chunks, what the free stacks look like
afterwards) without storing anything, so every CorruptTable is raised before its intent is
armed. The stores then follow the plan recorded in the intent (:class:`~.intent.Intent`), and
the undo puts back exactly what they overwrote. Chunk chains are walked, never listed in the
record: a walk is bounded by the value's chunk count, not by the table size.

Allocation order keeps the undo small: chunks taken from the free-chunk stack keep their stack
links (which already chain them in order), so the only overwritten link is the last taken one;
fresh chunks come from above the chunk high-water mark, where nothing needs undoing.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from .exceptions import CorruptTable
from .intent import Intent
from .layout import (
    CTL_CHUNK_HWM,
    CTL_CHUNKS_USED,
    CTL_ENTRY_HWM,
    CTL_FREE_CHUNK,
    CTL_FREE_ENTRY,
    ENTRY_FREE,
    NIL,
)
from .memory import TableMemory

Hook = Callable[[str], None] | None

__all__ = ["ChunkPlan", "apply_chunks", "free_chain", "plan_chunks", "plan_entry", "undo_chunks"]


#: What :func:`plan_chunks` returns, in the order of the intent's fields ``chunks`` ..
#: ``first``: (chunks, stack_taken, last_stack, last_link, free_chunk, free_chunk_mid,
#: chunk_hwm, first), then stack_run (not recorded: see :func:`plan_chunks`). A plain tuple,
#: unpacked straight into the record.
ChunkPlan = tuple[int, int, int, int, int, int, int, int, int]


def plan_entry(memory: TableMemory, free_entry: int, entry_hwm: int) -> tuple[int, int, int]:
    """(index, from_hwm, stack successor) of the entry an insert will take; stores nothing.

    ``free_entry`` and ``entry_hwm`` are the checked words of :meth:`TableMemory.words`.
    """
    if free_entry != NIL:
        state, _active, _key_len, next_index, _hash = memory.head(free_entry)
        if state != ENTRY_FREE:
            raise CorruptTable(f"free-entry stack holds entry {free_entry}, which is in use")
        if next_index != NIL and next_index >= entry_hwm:
            raise CorruptTable(f"free-entry stack links to entry {next_index}, out of range")
        return free_entry, 0, next_index
    if entry_hwm >= memory.geometry.entry_capacity:
        raise CorruptTable("no free entry although the free count said there was one")
    return entry_hwm, 1, NIL


def plan_chunks(memory: TableMemory, count: int, head: int, hwm: int) -> ChunkPlan:
    """Which chunks ``count`` new chunks will be; checked, stores nothing.

    ``head`` and ``hwm`` are the checked free-chunk head and chunk high-water mark
    (:meth:`TableMemory.words`). Stacked chunks are taken first, then fresh ones at the mark.

    The first eight fields are what the intent records; the ninth (not recorded) is 1 when the
    stacked chunks taken were checked to be a run, so :func:`apply_chunks`, in the same lock
    hold, need not check again.
    """
    if count == 0:
        return 0, 0, NIL, NIL, head, head, hwm, NIL, 0
    links, owners = memory.links, memory.owners
    if count == 1 and head != NIL and head < hwm and owners[head] == 0:
        # The usual case (a small value, a chunk on the stack): the loop below, unrolled.
        following = links[head]
        if following == NIL or following < hwm:
            return 1, 1, head, following, head, following, hwm, head, 0
    if head != NIL and _stack_run(memory, head, count, hwm):
        # The usual case for a larger value: the stack's top ``count`` chunks are a run (the
        # chain an update of the same size just freed). Distinct by construction: no cycle set.
        last = head + count - 1
        following = links[last]
        if following == NIL or following < hwm:
            return count, count, last, following, head, following, hwm, head, 1
    if count > 1 and hwm + count <= memory.geometry.chunk_capacity:
        # No run on the stack, but room above the mark: take fresh chunks, which are a run,
        # rather than a chain stitched from the stack (a value that grows by one chunk would
        # otherwise take the chunks it freed plus one fresh, and every later update of it would
        # alternate between a run and a chain walked chunk by chunk, ~1.4x the cost at 4 KB).
        # The stack's chunks stay for the values that fit them.
        return count, 0, NIL, NIL, head, head, hwm, hwm, 0
    seen: set[int] | None = None if count == 1 else set()
    taken, last, chunk = 0, NIL, head
    while taken < count and chunk != NIL:
        if chunk >= hwm or owners[chunk] != 0 or (seen is not None and chunk in seen):
            raise CorruptTable(f"free-chunk stack holds chunk {chunk}, which is in use")
        if seen is not None:
            seen.add(chunk)
        last, chunk = chunk, links[chunk]
        taken += 1
    if chunk != NIL and chunk >= hwm:
        raise CorruptTable(f"free-chunk stack links to chunk {chunk}, out of range")
    if hwm + count - taken > memory.geometry.chunk_capacity:
        raise CorruptTable("no free chunk although the free count said there was one")
    if taken == 0:
        return count, 0, NIL, NIL, head, head, hwm, hwm, 0
    return count, taken, last, chunk, head, chunk, hwm, head, 0


def _stack_run(memory: TableMemory, head: int, count: int, hwm: int) -> bool:
    """Whether the free stack's top ``count`` chunks are the free run ``head`` .. ``+count-1``."""
    return (
        count > 1
        and head + count <= hwm
        and memory.owners[head : head + count].tolist().count(0) == count
        and memory.links_run(head, count)
    )


def _fill(view: memoryview, start: int, stop: int, value: int) -> None:
    """Store ``value`` into ``view[start:stop]`` with one copy."""
    view[start:stop] = array("I", (value,)) * (stop - start)


def take_entry(
    memory: TableMemory, hook: Hook, step: str, index: int, from_hwm: int, succ: int
) -> None:
    """Pop the planned entry off the free stack, or raise the entry high-water mark over it."""
    if from_hwm:
        memory.control[CTL_ENTRY_HWM] = index + 1
    else:
        memory.control[CTL_FREE_ENTRY] = succ
    if hook is not None:
        hook(f"{step}:after-take-entry")


def undo_take_entry(memory: TableMemory, intent: Intent, hook: Hook, step: str) -> None:
    """Give the entry back: its stack link (overwritten by the key's chain link) and the head."""
    if intent.from_hwm:
        memory.control[CTL_ENTRY_HWM] = intent.entry_hwm
    else:
        memory.set_next(intent.entry, intent.succ)
        if hook is not None:
            hook(f"{step}:after-undo-entry-link")
        memory.control[CTL_FREE_ENTRY] = intent.free_entry
    if hook is not None:
        hook(f"{step}:after-undo-take-entry")


def apply_chunks(
    memory: TableMemory, hook: Hook, step: str, index: int, plan: ChunkPlan, chunks_used: int
) -> bool:
    """Take the planned chunks for entry ``index``: owners, the one link, then the words.

    ``plan`` is :func:`plan_chunks`'s (its first eight fields are what the intent records),
    ``chunks_used`` the recorded old count, so the undo puts back what this overwrites.
    Returns whether the new chain is a run (so the value is written with one copy).
    """
    count, taken, last_stack, _last_link, chunk, free_mid, hwm, _first, stack_run = plan
    if count == 0:
        return False
    control, links, owners = memory.control, memory.links, memory.owners
    tag = index + 1
    if hook is None and stack_run:
        _fill(owners, chunk, chunk + taken, tag)  # a run: one copy (as the loop, minus hooks)
    else:
        for _ in range(taken):
            owners[chunk] = tag
            if hook is not None:
                hook(f"{step}:after-chunk-owner")
            chunk = links[chunk]
    end = hwm + count - taken
    if taken:
        links[last_stack] = hwm if end > hwm else NIL
        if hook is not None:
            hook(f"{step}:after-chunk-link")
    if hook is None and end - hwm > 1:
        # Fresh chunks (above the mark: unused until the mark moves) in two copies.
        _fill(owners, hwm, end, tag)
        links[hwm:end] = array("I", range(hwm + 1, end + 1))
        links[end - 1] = NIL
    else:
        for chunk in range(hwm, end) if end > hwm else ():  # usually none: no range built
            owners[chunk] = tag
            if hook is not None:
                hook(f"{step}:after-fresh-owner")
            links[chunk] = chunk + 1 if chunk + 1 < end else NIL
            if hook is not None:
                hook(f"{step}:after-fresh-link")
    control[CTL_FREE_CHUNK] = free_mid
    if hook is not None:
        hook(f"{step}:after-free-chunk")
    control[CTL_CHUNK_HWM] = end
    if hook is not None:
        hook(f"{step}:after-chunk-hwm")
    control[CTL_CHUNKS_USED] = chunks_used + count
    if hook is not None:
        hook(f"{step}:after-chunks-used")
    # A run: stacked chunks plan_chunks checked to be one (then it took no fresh chunk), or
    # fresh chunks only, which are linked in order above.
    return bool(stack_run) or taken == 0


def undo_chunks(memory: TableMemory, intent: Intent, hook: Hook, step: str) -> None:
    """Put the free-chunk stack back as it was before :func:`apply_chunks` (idempotent)."""
    if intent.chunks == 0:
        return
    control, links, owners = memory.control, memory.links, memory.owners
    if intent.stack_taken:
        links[intent.last_stack] = intent.last_link
        if hook is not None:
            hook(f"{step}:after-undo-chunk-link")
        capacity = memory.geometry.chunk_capacity
        chunk = intent.free_chunk
        for _ in range(intent.stack_taken):
            if chunk >= capacity:
                raise CorruptTable(f"the intent's chunk chain leaves the table at {chunk}")
            owners[chunk] = 0
            chunk = links[chunk]
        if hook is not None:
            hook(f"{step}:after-undo-chunk-owners")
    control[CTL_FREE_CHUNK] = intent.free_chunk
    control[CTL_CHUNK_HWM] = intent.chunk_hwm
    control[CTL_CHUNKS_USED] = intent.chunks_used
    if hook is not None:
        hook(f"{step}:after-undo-chunk-words")


def free_chain(
    memory: TableMemory,
    first: int,
    count: int,
    free_head: int,
    run: bool | None,
    hook: Hook,
    step: str,
) -> None:
    """Push the chain of ``count`` chunks at ``first`` onto the free stack whose head is
    ``free_head`` (idempotent: the links inside the chain are kept, only the last is set).

    ``run`` is what :meth:`TableMemory.chain_span` said of the chain in this lock hold (None
    when not known, as in recovery: then it is checked here).
    """
    if count == 0:
        return
    owners, links = memory.owners, memory.links
    capacity = memory.geometry.chunk_capacity
    if run is None:
        run = count > 1 and memory.links_run(first, count)
    if hook is None and run:
        _fill(owners, first, first + count, 0)  # a run (the usual chain): one copy
        _push(memory, first + count - 1, first, free_head, hook, step)
        return
    chunk = last = first
    for position in range(count):
        if chunk >= capacity:
            raise CorruptTable(f"a chain being freed leaves the table at chunk {chunk}")
        owners[chunk] = 0
        if hook is not None:
            hook(f"{step}:after-free-owner")
        last = chunk
        if position + 1 < count:
            chunk = links[chunk]
    _push(memory, last, first, free_head, hook, step)


def _push(
    memory: TableMemory, last: int, first: int, free_head: int, hook: Hook, step: str
) -> None:
    """Link a freed chain's ``last`` chunk to the stack, then make ``first`` its head."""
    memory.links[last] = free_head
    if hook is not None:
        hook(f"{step}:after-free-link")
    memory.control[CTL_FREE_CHUNK] = first
    if hook is not None:
        hook(f"{step}:after-free-head")
