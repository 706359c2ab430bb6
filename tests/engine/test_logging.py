"""The engine's log lines on the ``django_shmsession`` logger, captured with caplog: each event
an operator must be able to act on logs one line, at the level the README documents."""

from __future__ import annotations

import logging

import pytest

from django_shmsession import store
from django_shmsession.backend import SessionStore
from django_shmsession.table import SessionTable

LOGGER = "django_shmsession"


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_creating_the_table_logs_info(shm_name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        SessionStore().create()
        SessionStore().create()  # the second use finds it open: no more lines
    assert records(caplog) == [
        (logging.INFO, f"django-shmsession: created the session table {shm_name} (1048576 bytes)")
    ]


def test_opening_an_existing_table_logs_nothing(
    shm_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    SessionTable(shm_name, 1024 * 1024).close()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        SessionStore().create()
    assert records(caplog) == []


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_segment_replaced_under_a_running_worker_logs_a_warning(
    shm_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Users are logged out: WARNING, naming the table and what happened to it."""
    SessionStore().create()
    SessionTable.unlink_name(shm_name)
    if how == "replaced":
        SessionTable(shm_name, 1024 * 1024).close()  # another process made a new one
    monkeypatch.setattr(store, "_next_check", 0.0)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        SessionStore().create()
    lines = records(caplog)
    assert lines[0][0] == logging.WARNING
    assert shm_name in lines[0][1]
    assert f"was {how}" in lines[0][1]
    assert "sessions in the old one are gone" in lines[0][1]
