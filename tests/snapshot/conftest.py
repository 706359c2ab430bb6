"""Fixtures for the snapshot tests: unique table names (unlinked afterwards), table handles that
are closed at teardown, and a settable clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_shmsession.table import SessionTable

# The engine tests' autouse ``shm_name`` (a unique SHMSESSION table per test, unlinked after it)
# serves these tests as it is.
from ..engine.conftest import TEST_SIZE, shm_name, unique_name
from ..table.helpers import FakeClock

__all__ = ["TEST_SIZE", "shm_name"]

TableFactory = Callable[..., SessionTable]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_table(clock: FakeClock) -> Iterator[TableFactory]:
    """``make_table(size, name=None, **kwargs)``: a new table (own unique name unless given),
    on the fake clock; every handle is closed and every name unlinked at teardown."""
    handles: list[SessionTable] = []
    names: list[str] = []

    def make(size: int | None = 1 << 20, name: str | None = None, **kwargs: Any) -> SessionTable:
        if name is None:
            name = unique_name()
            names.append(name)
        kwargs.setdefault("clock", clock)
        handle = SessionTable(name, size, **kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close()
    for name in names:
        SessionTable.unlink_name(name)
