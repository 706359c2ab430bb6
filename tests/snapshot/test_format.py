"""The snapshot file format against plain records: round trips, and every kind of damage.

Damage is made by hand on the bytes the writer produced (bit flips everywhere, truncation at
every kind of boundary, foreign files), and the reader must never raise anything but our own
errors, must verify every record it hands out, and must say what it skipped.
"""

from __future__ import annotations

import io
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_shmsession import snapshot
from django_shmsession.exceptions import CorruptSnapshot, ForeignSnapshot, SnapshotError
from django_shmsession.snapshot import SnapshotReader, SnapshotRecord, SnapshotWriter

NOW = 1_800_000_000.0


def make_records(n: int, size: int = 100, seed: int = 0) -> list[SnapshotRecord]:
    rng = random.Random(seed)
    return [
        SnapshotRecord(
            key=f"k{i:031d}",
            value=rng.randbytes(size),
            expires_at=NOW + rng.uniform(1, 1e6),
            priority=i % 4,
        )
        for i in range(n)
    ]


def write(records: list[SnapshotRecord], block: int = snapshot.BLOCK_RECORDS) -> bytes:
    out = io.BytesIO()
    writer = SnapshotWriter(out, {"created_at": NOW, "table": "/t"})
    for start in range(0, len(records), block):
        writer.write_block(records[start : start + block])
    writer.finish(0.5, NOW + 1)
    return out.getvalue()


def read(data: bytes) -> tuple[list[SnapshotRecord], SnapshotReader]:
    reader = SnapshotReader(data, "test.snap")
    found = []
    for ref in reader.refs():
        record = reader.record(ref)
        assert record is not None
        found.append(record)
    return found, reader


@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 257, 1000])
def test_round_trip(n: int) -> None:
    records = make_records(n)
    found, reader = read(write(records))
    assert found == records
    assert reader.damage.ok
    assert reader.trailer is not None
    assert reader.trailer.records == n
    assert reader.trailer.duration == 0.5
    assert reader.header.created_at == NOW
    assert reader.header.meta["table"] == "/t"


@pytest.mark.parametrize("size", [0, 1, 50, 511, 512, 513, 65536, 1 << 20])
def test_value_sizes(size: int) -> None:
    records = make_records(3, size)
    found, reader = read(write(records))
    assert found == records
    assert reader.damage.ok


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.builds(
            SnapshotRecord,
            key=st.text(min_size=1, max_size=20).filter(lambda k: len(k.encode()) <= 255),
            value=st.binary(max_size=600),
            expires_at=st.floats(allow_nan=False, allow_infinity=False),
            priority=st.integers(0, 255),
            flags=st.sampled_from([0, snapshot.F_SUPERSEDES]),
        ),
        max_size=40,
    ),
    st.integers(1, 7),
)
def test_any_records_round_trip(records: list[SnapshotRecord], block: int) -> None:
    found, reader = read(write(records, block))
    assert found == records
    assert reader.damage.ok


def test_encode_refuses_what_the_format_cannot_hold() -> None:
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        snapshot.encode_record(SnapshotRecord("", b"", NOW))
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        snapshot.encode_record(SnapshotRecord("x" * 256, b"", NOW))
    with pytest.raises(ValueError, match="priority"):
        snapshot.encode_record(SnapshotRecord("k", b"", NOW, priority=256))
    with pytest.raises(ValueError, match="finite"):
        snapshot.encode_record(SnapshotRecord("k", b"", float("inf")))


def test_empty_block_writes_nothing() -> None:
    out = io.BytesIO()
    writer = SnapshotWriter(out, {})
    before = len(out.getvalue())
    assert writer.write_block([]) == 0
    assert len(out.getvalue()) == before


# -- foreign and unreadable files ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"hello, world\n" * 10,
        b"\x7fELF" + bytes(100),
        b"PK\x03\x04" + bytes(100),
        b'{"sessions": []}',
        snapshot.MAGIC[:4] + b"XXXX" + bytes(50),
    ],
    ids=["text", "elf", "zip", "json", "near-magic"],
)
def test_foreign_file_is_refused(data: bytes) -> None:
    with pytest.raises(ForeignSnapshot, match="not a django-shmsession snapshot"):
        SnapshotReader(data, "x.snap")


def test_newer_version_is_refused_with_advice() -> None:
    data = bytearray(write(make_records(2)))
    struct.pack_into("<H", data, len(snapshot.MAGIC), snapshot.VERSION + 1)
    with pytest.raises(ForeignSnapshot, match=f"format version {snapshot.VERSION + 1}"):
        SnapshotReader(bytes(data), "x.snap")


def test_empty_file() -> None:
    with pytest.raises(CorruptSnapshot, match="is empty"):
        SnapshotReader(b"", "x.snap")


@pytest.mark.parametrize("cut", [1, 5, len(snapshot.MAGIC), snapshot.HEADER_MIN - 1, 30])
def test_cut_inside_the_header(cut: int) -> None:
    data = write(make_records(3))
    with pytest.raises(CorruptSnapshot, match="truncated"):
        SnapshotReader(data[:cut], "x.snap")


def test_damaged_header_is_refused() -> None:
    data = bytearray(write(make_records(3)))
    data[snapshot.HEADER_MIN + 2] ^= 0x01  # inside the JSON metadata
    with pytest.raises(CorruptSnapshot, match="header failed its checksum"):
        SnapshotReader(bytes(data), "x.snap")


def test_errors_share_the_base_class() -> None:
    assert issubclass(ForeignSnapshot, SnapshotError)
    assert issubclass(CorruptSnapshot, SnapshotError)


# -- truncation and bit flips: partial reads, counted ----------------------------------------------


def test_truncation_at_every_block_boundary_keeps_the_blocks_before() -> None:
    records = make_records(1000, 50)
    data = write(records, block=100)
    reader = SnapshotReader(data, "x")
    header_end = reader.header.size
    block_bytes = (len(data) - header_end - snapshot.TRAILER_SIZE) // 10
    for blocks in range(10):
        cut = header_end + blocks * block_bytes
        found, partial = read(data[:cut])
        assert found == records[: blocks * 100]
        assert partial.damage.truncated
        assert not partial.damage.ok
        assert "truncated" in partial.damage.summary(len(found))


def test_truncation_inside_a_block_keeps_its_complete_records() -> None:
    records = make_records(300, 50)
    data = write(records, block=300)
    record_bytes = len(snapshot.encode_record(records[0]))
    header = SnapshotReader(data, "x").header.size
    cut = header + 20 + 120 * record_bytes + 7  # 120 whole records and a bit
    found, reader = read(data[:cut])
    assert found == records[:120]
    assert reader.damage.truncated
    assert reader.damage.promised_records == 300
    assert "at least 180 record(s) could not be read" in reader.damage.summary(len(found))


def test_cut_trailer_is_truncation() -> None:
    records = make_records(10)
    data = write(records)
    found, reader = read(data[:-5])
    assert found == records  # every record still verifies
    assert reader.damage.truncated
    assert not reader.damage.ok


def test_flip_in_a_value_loses_one_record() -> None:
    records = make_records(50, 200)
    data = bytearray(write(records, block=50))
    header = SnapshotReader(bytes(data), "x").header.size
    record_bytes = len(snapshot.encode_record(records[0]))
    data[header + 20 + 10 * record_bytes + 100] ^= 0x10  # the 11th record's value
    found, reader = read(bytes(data))
    assert found == records[:10] + records[11:]
    assert reader.damage.bad_records == 1
    assert reader.damage.trailer_ok
    assert not reader.damage.digest_ok
    assert "1 of 50 record(s) could not be read" in reader.damage.summary(len(found))


def test_flip_in_a_block_header_loses_that_block_only() -> None:
    records = make_records(300, 40)
    data = bytearray(write(records, block=100))
    header = SnapshotReader(bytes(data), "x").header.size
    data[header + 8] ^= 0x04  # block 0's record count
    found, reader = read(bytes(data))
    assert found == records[100:]
    assert reader.damage.bad_blocks == 1
    assert "100 of 300 record(s)" in reader.damage.summary(len(found))


def test_a_removed_block_is_noticed() -> None:
    records = make_records(300, 40)
    data = write(records, block=100)
    header = SnapshotReader(data, "x").header.size
    block = (len(data) - header - snapshot.TRAILER_SIZE) // 3
    spliced = data[: header + block] + data[header + 2 * block :]
    found, reader = read(spliced)
    assert found == records[:100] + records[200:]
    assert reader.damage.missing_blocks == 1
    assert not reader.damage.ok


def test_random_bit_flips_never_crash_and_only_hand_out_true_records() -> None:
    """Thousands of single and multiple flips anywhere: the reader raises only our errors, and
    every record it returns is one that was written."""
    rng = random.Random(12)
    records = make_records(200, 80, seed=3)
    written = set(records)
    data = write(records, block=64)
    outcomes = {"refused": 0, "partial": 0}
    for trial in range(1500):
        damaged = bytearray(data)
        for _ in range(1 + trial % 3):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        try:
            found, reader = read(bytes(damaged))
        except (CorruptSnapshot, ForeignSnapshot):
            outcomes["refused"] += 1
            continue
        assert set(found) <= written
        assert not reader.damage.ok or found == records
        outcomes["partial"] += 1
    assert outcomes["partial"] > 1000  # most flips hit records, not the header


def test_random_truncation_never_crashes() -> None:
    records = make_records(100, 300, seed=5)
    data = write(records, block=32)
    header = SnapshotReader(data, "x").header.size
    for cut in random.Random(7).sample(range(len(data)), 300):
        if cut < header:
            with pytest.raises(CorruptSnapshot, match=r"truncated|empty"):
                read(data[:cut])
            continue
        found, reader = read(data[:cut])
        assert found == records[: len(found)]
        assert reader.damage.truncated
