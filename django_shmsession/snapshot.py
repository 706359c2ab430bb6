"""The snapshot file format: a versioned, checksummed image of the live sessions of a table.

The format is documented byte by byte in docs/snapshot.md; this module is its only definition
(every struct is declared once, below). It knows nothing of the table or of Django: the writer
takes records, the reader yields verified records, and :mod:`.snapshot_ops` connects them to a
table. Because the format stores only (key, value, expiry, priority), any version of the table,
at any size, can load it: nothing of the segment's layout is in the file.

Integrity is layered so that damage costs as little as possible:

- the header, every block header and every record carry a CRC-32 of their own bytes, so a
  flipped bit loses one record (or, in a block header, one block), never the file;
- blocks start with a marker, so the reader finds the next block after damaged bytes;
- the trailer holds the counts and a SHA-256 of everything before it: a file cut short, or with
  a block missing, is noticed even when every record left in it verifies.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from .exceptions import CorruptSnapshot, ForeignSnapshot

__all__ = [
    "MAGIC",
    "VERSION",
    "Damage",
    "RecordRef",
    "SnapshotHeader",
    "SnapshotReader",
    "SnapshotRecord",
    "SnapshotTrailer",
    "SnapshotWriter",
]

#: First bytes of every snapshot. 0x89 catches 7-bit transfers, CR LF and LF catch newline
#: translation, 0x1a stops ``type`` on DOS (the PNG trick).
MAGIC = b"\x89SHMSNAP\r\n\x1a\n"
#: The format version this code writes, and the newest it reads.
VERSION = 1
#: The header's JSON is at most this long: a reader refuses a bigger length as damage.
MAX_META = 64 * 1024
BLOCK_MAGIC = b"\x89SNB"
TRAILER_MAGIC = b"\x89SNE"
#: Records per block at most: one batch of the table's scan.
BLOCK_RECORDS = 128
#: Record flag: an earlier record of the file may have the same key (written during the dump);
#: the reader keeps, of all the records with that key, the one that expires last.
F_SUPERSEDES = 0x0001

# magic, version, flags, length of the JSON metadata; then the JSON and a CRC-32.
_HEADER = struct.Struct("<12sHHI")
# magic, sequence number, record count, body length, CRC-32 of the previous 16 bytes.
_BLOCK = struct.Struct("<4sIIII")
# key length, priority, flags, value length, expiry; then key, value, CRC-32 of it all.
_RECORD = struct.Struct("<BBHId")
# magic, blocks, records, bytes before the trailer, dump duration, finish time, SHA-256, CRC-32.
_TRAILER = struct.Struct("<4sIQQdd32sI")
_CRC = struct.Struct("<I")
_unpack_record = _RECORD.unpack_from
_pack_record = _RECORD.pack
_pack_crc = _CRC.pack
_unpack_crc = _CRC.unpack_from

HEADER_MIN = _HEADER.size + _CRC.size
TRAILER_SIZE = _TRAILER.size


class SnapshotRecord(NamedTuple):
    """One session as stored: key, value bytes, absolute expiry (epoch seconds), priority.

    A named tuple, not a dataclass: a restore makes one per session, and a tuple is built
    several times faster."""

    key: str
    value: bytes
    expires_at: float
    priority: int = 0
    flags: int = 0


@dataclass(frozen=True)
class SnapshotHeader:
    """What the header says: format version and the metadata the writer recorded."""

    version: int
    meta: dict[str, Any]
    size: int

    @property
    def created_at(self) -> float | None:
        value = self.meta.get("created_at")
        return float(value) if isinstance(value, (int, float)) else None


@dataclass(frozen=True)
class SnapshotTrailer:
    """The verified trailer: counts of the complete file and its whole-file digest."""

    blocks: int
    records: int
    payload_bytes: int
    duration: float
    finished_at: float
    digest: bytes


class RecordRef(NamedTuple):
    """Where a verified record lies in the buffer, with what sorting and dedup need."""

    offset: int
    expires_at: float
    flags: int


@dataclass
class Damage:
    """What the reader found wrong; empty (``ok``) for an intact file."""

    bad_records: int = 0
    bad_blocks: int = 0
    missing_blocks: int = 0
    skipped_bytes: int = 0
    truncated: bool = False
    trailer_ok: bool = False
    digest_ok: bool = False
    #: Records the trailer promises, when the trailer verified.
    expected_records: int | None = None
    #: Records the verified block headers promise (a lower bound when the trailer is lost).
    promised_records: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.trailer_ok and self.digest_ok and not self.problems

    def note(self, problem: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(problem)

    def summary(self, verified: int) -> str:
        """One sentence for an operator: what is wrong and how much it cost."""
        if self.ok:
            return "intact"
        if self.expected_records is not None:
            lost = f"{max(self.expected_records - verified, 0)} of {self.expected_records}"
        else:
            lost = f"at least {max(self.promised_records - verified, 0)}"
        parts = [f"{lost} record(s) could not be read"]
        if self.truncated:
            parts.append("the file is truncated (its end is missing)")
        if self.bad_records:
            parts.append(f"{self.bad_records} record(s) failed their checksum")
        if self.bad_blocks or self.missing_blocks:
            parts.append(f"{self.bad_blocks + self.missing_blocks} block(s) damaged or missing")
        if self.skipped_bytes:
            parts.append(f"{self.skipped_bytes} damaged byte(s) skipped")
        if self.trailer_ok and not self.digest_ok:
            parts.append("the whole-file SHA-256 does not match")
        return "; ".join(parts)


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


#: What a writer takes per record: (key, value, expires_at, priority, flags), as SnapshotRecord.
RecordFields = tuple[str, bytes, float, int, int]


def encode_record(record: SnapshotRecord) -> bytes:
    """The bytes of one record, CRC included.

    :raises ValueError: for a key or priority the format cannot hold, or a non-finite expiry.
    """
    return b"".join(_encode(*record))


def _encode(
    key_text: str, value: bytes, expires_at: float, priority: int, flags: int
) -> tuple[bytes, bytes, bytes, bytes]:
    """A record as its four parts (head, key, value, CRC), so a block joins them once."""
    key = key_text.encode()
    if not 0 < len(key) <= 255:
        raise ValueError(f"snapshot keys are 1 to 255 bytes of UTF-8, got {key_text[:80]!r}")
    if not 0 <= priority <= 255:
        raise ValueError(f"priority must be 0..255, not {priority}")
    if not math.isfinite(expires_at):
        raise ValueError(f"expires_at must be finite, not {expires_at!r}")
    head = _pack_record(len(key), priority, flags, len(value), expires_at)
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(head)))
    return head, key, value, _pack_crc(crc)


class SnapshotWriter:
    """Write a snapshot to a binary stream: header now, blocks as they come, trailer at the end.

    The stream is written strictly forward (no seek), so it can be a pipe (``dump -``); the
    atomic replacement of a file is :mod:`.snapshot_files`' job.
    """

    def __init__(self, stream: BinaryIO, meta: dict[str, Any]) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self._blocks = 0
        self._records = 0
        self._bytes = 0
        raw = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        if len(raw) > MAX_META:
            raise ValueError(f"snapshot metadata is {len(raw)} bytes; at most {MAX_META}")
        head = _HEADER.pack(MAGIC, VERSION, 0, len(raw)) + raw
        self._emit(head + _CRC.pack(_crc(head)))

    @property
    def records(self) -> int:
        return self._records

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def write_block(self, records: Iterable[RecordFields]) -> int:
        """Write one block holding ``records`` (none: nothing is written); returns its bytes.

        :raises ValueError: as :func:`encode_record`.
        """
        parts: list[bytes] = []
        count = 0
        for record in records:
            parts += _encode(*record)
            count += 1
        if not count:
            return 0
        body = b"".join(parts)
        head = _BLOCK.pack(BLOCK_MAGIC, self._blocks, count, len(body), 0)[:16]
        self._emit(head + _CRC.pack(_crc(head)) + body)
        self._blocks += 1
        self._records += count
        return len(head) + _CRC.size + len(body)

    def finish(self, duration: float, finished_at: float) -> int:
        """Write the trailer (counts, SHA-256 of all that precedes it); returns the file size."""
        head = _TRAILER.pack(
            TRAILER_MAGIC,
            self._blocks,
            self._records,
            self._bytes,
            duration,
            finished_at,
            self._digest.digest(),
            0,
        )[: -_CRC.size]
        self._emit(head + _CRC.pack(_crc(head)), digest=False)
        return self._bytes

    def _emit(self, data: bytes, digest: bool = True) -> None:
        if digest:
            self._digest.update(data)
        self._stream.write(data)
        self._bytes += len(data)


class SnapshotReader:
    """Verify a snapshot held in a buffer (bytes or an mmap) and hand out its records.

    The constructor checks the header and raises for a file that is not a snapshot at all;
    :meth:`refs` then walks every block, verifying each record, and fills :attr:`damage` with
    what it skipped. Records are referenced by offset, so the buffer is never copied.

    :raises ForeignSnapshot: the file is not a snapshot, or of a newer format version.
    :raises CorruptSnapshot: the file is empty, cut inside its header, or its header is damaged.
    """

    def __init__(self, buf: bytes | mmap.mmap, source: str = "snapshot") -> None:
        self._buf = buf
        self._source = source
        self.size = len(buf)
        self.damage = Damage()
        self.trailer: SnapshotTrailer | None = None
        self.header = self._read_header()

    def _read_header(self) -> SnapshotHeader:
        buf, size, source = self._buf, self.size, self._source
        prefix = bytes(buf[: len(MAGIC)])
        if size == 0:
            raise CorruptSnapshot(f"{source} is empty (0 bytes): it is not a complete snapshot")
        if prefix != MAGIC[: len(prefix)]:
            raise ForeignSnapshot(
                f"{source} is not a django-shmsession snapshot (its first bytes are "
                f"{prefix[:8]!r}); give the path of a file written by `shmsession dump`"
            )
        if size < HEADER_MIN:
            raise CorruptSnapshot(
                f"{source} is truncated: {size} bytes, shorter than a snapshot header; "
                "nothing can be restored from it"
            )
        _magic, version, _flags, meta_len = _HEADER.unpack_from(buf, 0)
        if version > VERSION or version == 0:
            raise ForeignSnapshot(
                f"{source} is a snapshot of format version {version}; this django-shmsession "
                f"reads versions 1 to {VERSION}. Restore it with the version that wrote it "
                "(or a newer one)"
            )
        end = _HEADER.size + meta_len
        if meta_len > MAX_META or end + _CRC.size > size:
            if meta_len <= MAX_META:
                raise CorruptSnapshot(
                    f"{source} is truncated inside its header ({size} bytes); "
                    "nothing can be restored from it"
                )
            raise CorruptSnapshot(f"{source}: the header is damaged (metadata length {meta_len})")
        (crc,) = _CRC.unpack_from(buf, end)
        if _crc(memoryview(buf)[:end]) != crc:
            raise CorruptSnapshot(
                f"{source}: the header failed its checksum, so the file is damaged; nothing "
                "was restored. Use an older snapshot"
            )
        try:
            meta = json.loads(bytes(buf[_HEADER.size : end]))
        except ValueError as err:
            raise CorruptSnapshot(f"{source}: the header's metadata is not JSON") from err
        if not isinstance(meta, dict):
            raise CorruptSnapshot(f"{source}: the header's metadata is not a JSON object")
        return SnapshotHeader(version=version, meta=meta, size=end + _CRC.size)

    def refs(self) -> Iterator[RecordRef]:
        """Every record that verifies, in file order; :attr:`damage` says what did not."""
        buf, size, damage = self._buf, self.size, self.damage
        pos = self.header.size
        expected_seq = 0
        while pos < size:
            magic = bytes(buf[pos : pos + 4])
            if magic == TRAILER_MAGIC and self._read_trailer(pos, expected_seq):
                return
            block = self._block_header(pos) if magic == BLOCK_MAGIC else None
            if block is None:
                pos = self._resync(pos)
                continue
            seq, count, body_len = block
            if seq != expected_seq:
                if seq > expected_seq:
                    damage.missing_blocks += seq - expected_seq
                    damage.note(f"block(s) {expected_seq}..{seq - 1} missing before byte {pos}")
                else:
                    damage.note(f"block {seq} at byte {pos} is out of order")
            expected_seq = max(expected_seq, seq + 1)
            start = pos + _BLOCK.size
            end = start + body_len
            if end > size:
                damage.truncated = True
                damage.note(f"block {seq} at byte {pos} is cut short by the end of the file")
            yield from self._block_records(start, min(end, size), count, seq)
            pos = end
        damage.truncated = True
        damage.note(f"no valid trailer before the end of the file (byte {size}): truncated")

    def _block_header(self, pos: int) -> tuple[int, int, int] | None:
        if pos + _BLOCK.size > self.size:
            return None
        _magic, seq, count, body_len, crc = _BLOCK.unpack_from(self._buf, pos)
        if _crc(memoryview(self._buf)[pos : pos + 16]) != crc:
            return None
        return seq, count, body_len

    def _resync(self, pos: int) -> int:
        """Skip damaged bytes: the next position where a block or the trailer may start."""
        buf = self._buf
        found = [
            i for i in (buf.find(BLOCK_MAGIC, pos + 1), buf.find(TRAILER_MAGIC, pos + 1)) if i >= 0
        ]
        nxt = min(found) if found else self.size
        if pos + _BLOCK.size > self.size and not found:
            self.damage.truncated = True
        else:
            self.damage.bad_blocks += 1
        self.damage.skipped_bytes += nxt - pos
        self.damage.note(f"bytes {pos}..{nxt - 1} are not a valid block; skipped")
        return nxt

    def _block_records(self, start: int, end: int, count: int, seq: int) -> Iterator[RecordRef]:
        """The block's records that verify. A bad record is stepped over by its own lengths;
        records after it still verify (or not) by their own CRC, so misparsing loses nothing
        that a CRC would let through."""
        damage = self.damage
        damage.promised_records += count
        good = 0
        pos = start
        buf = self._buf
        crc32 = zlib.crc32
        # Slices, not a memoryview: a view held across the yield would keep the caller from
        # closing its mmap if it stopped iterating early.
        while pos + _RECORD.size + _CRC.size <= end:
            key_len, _prio, flags, value_len, expires_at = _unpack_record(buf, pos)
            stop = pos + _RECORD.size + key_len + value_len
            if stop + _CRC.size > end:
                break
            if key_len > 0 and crc32(buf[pos:stop]) == _unpack_crc(buf, stop)[0]:
                good += 1
                yield RecordRef(pos, expires_at, flags)
            else:
                damage.bad_records += 1
                damage.note(f"record at byte {pos} (block {seq}) failed its checksum")
            pos = stop + _CRC.size
        if good < count:
            damage.note(f"block {seq}: {count - good} of {count} record(s) unreadable")

    def _crc_ok(self, pos: int, stop: int) -> bool:
        (crc,) = _CRC.unpack_from(self._buf, stop)
        return bool(_crc(memoryview(self._buf)[pos:stop]) == crc)

    def _read_trailer(self, pos: int, seq: int) -> bool:
        if pos + TRAILER_SIZE > self.size:
            return False
        fields = _TRAILER.unpack_from(self._buf, pos)
        if _crc(memoryview(self._buf)[pos : pos + TRAILER_SIZE - _CRC.size]) != fields[-1]:
            return False
        _m, blocks, records, payload, duration, finished_at, digest, _c = fields
        trailer = SnapshotTrailer(blocks, records, payload, duration, finished_at, digest)
        damage = self.damage
        self.trailer = trailer
        damage.trailer_ok = True
        damage.expected_records = records
        if blocks > seq:
            damage.missing_blocks += blocks - seq
            damage.note(f"block(s) {seq}..{blocks - 1} missing before the trailer")
        if pos + TRAILER_SIZE != self.size:
            damage.note(f"{self.size - pos - TRAILER_SIZE} unexpected byte(s) after the trailer")
        if payload != pos:
            damage.note(f"the trailer says it starts at byte {payload}, it is at {pos}")
        damage.digest_ok = (
            payload == pos and hashlib.sha256(memoryview(self._buf)[:pos]).digest() == digest
        )
        if not damage.digest_ok and payload == pos:
            damage.note("the whole-file SHA-256 does not match the trailer")
        return True

    def record(self, ref: RecordRef) -> SnapshotRecord | None:
        """The record ``ref`` points at, verified again (None if the buffer changed under us)."""
        return self.record_at(ref[0])

    def record_at(self, offset: int) -> SnapshotRecord | None:
        """The record at byte ``offset`` (a :attr:`RecordRef.offset`), verified again."""
        buf = self._buf
        key_len, priority, flags, value_len, expires_at = _unpack_record(buf, offset)
        key_end = _RECORD.size + key_len
        stop = offset + key_end + value_len
        if stop + _CRC.size > self.size:
            return None
        raw = buf[offset:stop]  # one copy; a slice of bytes or of an mmap is bytes
        if zlib.crc32(raw) != _unpack_crc(buf, stop)[0]:
            return None
        try:
            key = raw[_RECORD.size : key_end].decode()
        except UnicodeDecodeError:
            return None
        return SnapshotRecord(key, raw[key_end:], expires_at, priority, flags)

    def key_of(self, ref: RecordRef) -> bytes:
        """The raw key bytes of ``ref`` (for grouping duplicates without copying values)."""
        key_len = self._buf[ref.offset]
        start = ref.offset + _RECORD.size
        return bytes(self._buf[start : start + key_len])
