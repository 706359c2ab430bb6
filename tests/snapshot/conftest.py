"""Fixtures for the snapshot tests: unique table names (unlinked afterwards), table handles that
are closed at teardown, and a settable clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from uuid import uuid4

import pytest

from django_shmsession import store
from django_shmsession.table import SessionTable

from ..table.helpers import FakeClock

TEST_SIZE = "1M"

TableFactory = Callable[..., SessionTable]


def unique_name() -> str:
    return f"/shmtest-{uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def shm_name(settings: Any) -> Iterator[str]:
    """Point SHMSESSION at a fresh, unique table; remove the segment when the test ends."""
    name = unique_name()
    settings.SHMSESSION = {"NAME": name, "SIZE": TEST_SIZE}
    yield name
    store.reset()
    SessionTable.unlink_name(name)


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
