"""The L1 copy format: what decode and the L1-hit shortcut accept, and what they refuse."""

from __future__ import annotations

import pytest

from django_shmsession.tiered import codec

PAYLOAD = b'{"_auth_user_id":"1"}'


def test_a_copy_round_trips_through_decode() -> None:
    value = codec.encode(7, 1000.5, 2000.25, PAYLOAD)
    assert codec.decode(value) == codec.L1Copy(7, 1000.5, 2000.25, PAYLOAD)
    assert codec.version_of(value) == 7


@pytest.mark.parametrize(
    ("since", "expected"),
    [(999.0, PAYLOAD), (1000.49, PAYLOAD), (1000.5, None), (1001.0, None)],
)
def test_the_hit_shortcut_gives_the_payload_only_when_confirmed_after_since(
    since: float, expected: bytes | None
) -> None:
    value = codec.encode(7, 1000.5, 2000.25, PAYLOAD)
    assert codec.payload_if_confirmed_after(value, since) == expected


@pytest.mark.parametrize(
    "value",
    [
        PAYLOAD,  # a plain engine's JSON under the same NAME
        b"",
        codec.MAGIC + b"\x00" * 3,  # the magic, then too short for a header
        b"TSv0" + codec.encode(7, 1000.5, 2000.25, PAYLOAD)[4:],
    ],
)
def test_what_is_not_a_copy_is_refused_by_both(value: bytes) -> None:
    assert codec.decode(value) is None
    assert codec.payload_if_confirmed_after(value, 0.0) is None
    assert codec.version_of(value) is None
