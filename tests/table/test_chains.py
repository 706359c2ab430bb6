"""Multi-chunk values: the one-copy paths for chains that are runs, and the walk for the rest.

Reads, writes and frees take one slice copy when a chain is a run (consecutive chunks, each
linked to the next); a chain that is not (stitched from the free stack's pieces, once no run of
fresh chunks is left above the mark) is walked chunk by chunk. Both shapes must return exactly
the stored bytes, and a damaged owner or link inside a run must be detected, never copied as if
it were a run.
"""

from __future__ import annotations

import struct

import pytest

from django_shmsession import index
from django_shmsession.exceptions import TableFull
from django_shmsession.table import SessionTable

from .conftest import TableFactory
from .helpers import raw_mapping, value_for

FAR = 4e9
U32 = struct.Struct("<I")


def chain_of(table: SessionTable, key: str) -> list[int]:
    """The chunks of ``key``'s live value, in chain order."""
    memory = table._memory
    encoded = key.encode()
    found, fields = index.find(memory, encoded, memory.key_hash(encoded))
    _expires, length, first, _crc = index.descriptor_of(found, fields)
    return list(memory.chain(found, first, length))


def is_run(chunks: list[int]) -> bool:
    return chunks == list(range(chunks[0], chunks[0] + len(chunks)))


def test_a_value_that_grows_by_a_chunk_stays_a_run(table: SessionTable) -> None:
    """The chunks it freed are one short: it takes fresh ones above the mark, not those plus
    one (which would make every later update alternate between a run and a walked chain)."""
    size = table._memory.chunk_size
    table.set("grow", value_for("grow", 8 * size), FAR)
    for version in range(1, 7):
        value = value_for("grow", 9 * size - 7, version)
        table.replace("grow", value, FAR)
        chain = chain_of(table, "grow")
        assert len(chain) == 9, f"update {version} took {chain}"
        assert is_run(chain), f"update {version} took {chain}"
        assert table.get("grow") == value
    assert table.check().ok


def test_walked_chains_read_back_exactly_once_no_fresh_run_is_left(
    make_table: TableFactory,
) -> None:
    """With the mark at capacity a value is stitched from the free stack's pieces: walked."""
    table = make_table(max_value_size=9 * 512)
    size = table._memory.chunk_size
    assert size == 512
    pieces = 0
    while True:  # 2-chunk pieces until the table is full: the mark ends near capacity
        try:
            table.add(f"p{pieces}", value_for(f"p{pieces}", 2 * size), FAR, evict=False)
        except TableFull:
            break
        pieces += 1
    for number in range(0, pieces, 2):  # the stack now holds pieces two chunks long, apart
        assert table.delete(f"p{number}")
    shapes = []
    # The first takes the last fresh run; the second is stitched; the third takes the run the
    # first freed, and so on.
    for version in range(4):
        value = value_for("stitched", 9 * size - 7, version)
        table.set("stitched", value, FAR)
        shapes.append(is_run(chain_of(table, "stitched")))
        assert table.get("stitched") == value
    assert shapes == [True, False, True, False], shapes
    for number in range(1, pieces, 2):
        assert table.get(f"p{number}") == value_for(f"p{number}", 2 * size)
    assert table.check().ok


@pytest.mark.parametrize("chunks", [2, 3, 9, 40])
def test_every_length_round_trips_through_set_replace_delete(
    table: SessionTable, chunks: int
) -> None:
    size = table._memory.chunk_size
    for version, length in enumerate((chunks * size, chunks * size - 1, (chunks - 1) * size + 1)):
        key = f"k{chunks}-{version}"
        value = value_for(key, length)
        table.set(key, value, FAR)
        assert table.get(key) == value
        newer = value_for(key, length, 1)
        assert table.replace(key, newer, FAR)
        assert table.get(key) == newer
    for version in range(3):
        assert table.delete(f"k{chunks}-{version}")
    assert table.stats().chunks_used == 0
    assert table.check().ok


@pytest.mark.parametrize("what", ["owner", "link"])
@pytest.mark.parametrize("position", [1, 4, 8])
def test_a_damaged_chunk_inside_a_run_is_never_read_as_the_value(
    table: SessionTable, shm_name: str, what: str, position: int
) -> None:
    size = table._memory.chunk_size
    value = value_for("victim", 9 * size - 3)
    table.set("victim", value, FAR)
    table.set("other", value_for("other", 3 * size), FAR)
    chunks = chain_of(table, "victim")
    assert is_run(chunks)
    geometry = table._memory.geometry
    table_of = geometry.chunk_owners_offset if what == "owner" else geometry.chunk_links_offset
    wrong = chain_of(table, "other")[0] if what == "link" else 1 + chunks[0] + 1000
    with raw_mapping(shm_name) as mapping:
        U32.pack_into(mapping, table_of + 4 * chunks[position - 1], wrong)
    before = table.stats().corruption_detected
    # The damaged chain must be detected, not copied as a run (bytes that happen to be right
    # today are in a chunk another entry may own tomorrow). The repair rebuilds owners from the
    # links, so a damaged owner loses nothing; a damaged link loses this entry only.
    got = table.get("victim")
    assert table.stats().corruption_detected == before + 1
    assert got == (value if what == "owner" else None)
    assert table.get("other") == value_for("other", 3 * size)
    table.check(repair=True)
    assert table.check().ok
