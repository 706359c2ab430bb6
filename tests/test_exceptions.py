from __future__ import annotations

import pytest

from django_shmsession import exceptions


@pytest.mark.parametrize(
    "cls",
    [
        exceptions.ValueTooLarge,
        exceptions.TableFull,
        exceptions.CorruptTable,
        exceptions.LayoutMismatch,
        exceptions.SegmentTooLarge,
        exceptions.SegmentNotFound,
        exceptions.ForeignSegment,
        exceptions.LockTimeout,
        exceptions.UnsupportedPlatform,
        exceptions.SnapshotError,
        exceptions.ForeignSnapshot,
        exceptions.CorruptSnapshot,
    ],
)
def test_every_error_derives_from_the_base(cls: type[Exception]) -> None:
    assert issubclass(cls, exceptions.ShmSessionError)


def test_value_too_large_names_both_sizes() -> None:
    err = exceptions.ValueTooLarge(70000, 65536, "raise SHMSESSION['MAX_SESSION_SIZE']")
    assert "70000" in str(err)
    assert "65536" in str(err)
    assert "MAX_SESSION_SIZE" in str(err)
    assert err.size == 70000
    assert err.max_size == 65536
