"""The tiered engine with the db L2 on a real PostgreSQL: Django's Session model is the truth,
invalidations come by LISTEN/NOTIFY."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

import pytest
from django.contrib.sessions.backends.base import CreateError, UpdateError
from django.contrib.sessions.models import Session
from django.db import connections

from django_shmsession import store
from django_shmsession.tiered import codec, counters, db_l2, pg_functions, runtime
from django_shmsession.tiered.engine import SessionStore
from django_shmsession.tiered.l2 import REFRESH_LIMIT, L2Error, L2Unavailable

from .conftest import PG_ALIAS, ListenerThread, wait_for
from .l2servers import PostgresServer

pytestmark = pytest.mark.usefixtures("db_tiered")


def saved(**data: Any) -> SessionStore:
    s = SessionStore()
    s.update(data)
    s.save()
    return s


def row(key: str) -> Any:
    return Session.objects.using(PG_ALIAS).filter(session_key=key).first()


def execute(*statements: str) -> None:
    with connections[PG_ALIAS].cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def functions_present() -> bool:
    with connections[PG_ALIAS].cursor() as cursor:
        cursor.execute(pg_functions.PRESENT_QUERY)
        return bool(cursor.fetchone()[0])


MIGRATION = importlib.import_module("django_shmsession.migrations.0001_postgres_functions")


@pytest.fixture
def without_functions(db_tiered: str) -> Any:
    """The database as before ``migrate django_shmsession``: no functions (put back after)."""
    execute(*MIGRATION.DROP_V1)
    runtime.reset()  # a new L2 client, which asks again
    yield
    execute(MIGRATION.UPDATE_V1, MIGRATION.DELETE_V1)
    runtime.reset()


def other_l2() -> db_l2.DatabaseL2:
    """Another host's L2 client (its own answer to "are the functions there?")."""
    return db_l2.DatabaseL2(db_l2.L2Config(backend="db", database=PG_ALIAS, channel=_channel()))


def called(function: str, sql: str) -> bool:
    """Whether ``sql`` calls ``function`` (not merely names it, as the catalog query does)."""
    return f"SELECT {function}(" in sql


def l2_sql(action: Any) -> str:
    """All SQL sent on Django's connection while ``action()`` ran."""
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connections[PG_ALIAS]) as captured:
        action()
    return " ".join(query["sql"] for query in captured.captured_queries)


@pytest.fixture(params=["functions", "statements"])
def l2_path(request: Any, db_tiered: str) -> str:
    """Each test that asks for it runs with the PL/pgSQL functions and with plain SQL."""
    if request.param == "statements":
        request.getfixturevalue("without_functions")
    assert functions_present() == (request.param == "functions")
    return str(request.param)


def test_session_row_holds_version_and_payload() -> None:
    s = saved(a=1)
    stored = row(s.session_key or "")
    assert stored is not None
    decoded = db_l2.decode_data(stored.session_data)
    assert decoded is not None
    copy = codec.decode(store.get_table().get(s.session_key or "") or b"")
    assert copy is not None
    assert (copy.version, copy.payload) == (decoded[0], b'{"a":1}')


def test_data_codec_round_trips_binary() -> None:
    for payload in (b'{"a":1}', b"\x00\xff binary", "é".encode()):
        assert db_l2.decode_data(db_l2.encode_data(7, payload)) == (7, payload)
    assert db_l2.decode_data("a Django db-engine row") is None


def test_must_create_fails_on_the_primary_key() -> None:
    s = saved(a=1)
    store.get_table().clear()
    other = SessionStore(s.session_key)
    other["b"] = 2
    with pytest.raises(CreateError):
        other.save(must_create=True)
    assert SessionStore(s.session_key).load() == {"a": 1}


@pytest.mark.usefixtures("l2_path")
def test_update_after_delete_elsewhere_is_refused() -> None:
    s = saved(a=1)
    key = s.session_key or ""
    s2 = SessionStore(key)
    assert s2["a"] == 1
    Session.objects.using(PG_ALIAS).filter(session_key=key).delete()
    s2["a"] = 2
    with pytest.raises(UpdateError):
        s2.save()
    assert row(key) is None


def prepared_statements() -> list[str]:
    with connections[PG_ALIAS].cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [found[0] for found in cursor.fetchall()]


def saved_eight_times() -> SessionStore:
    s = saved(a=0)
    for i in range(8):
        s["a"] = i
        s.save()
    return s


def is_update(sql: str) -> bool:
    """Whether ``sql`` is the L2's update, as the function call or as the statement."""
    return called(pg_functions.UPDATE_FUNCTION, sql) or ("UPDATE" in sql and "pg_notify" in sql)


@pytest.mark.usefixtures("l2_path")
@pytest.mark.parametrize("threshold", [None, 5])
def test_statements_are_prepared_when_the_connection_allows(threshold: int | None) -> None:
    """Django turns psycopg's prepared statements off by default (poolers); with a
    ``prepare_threshold`` in OPTIONS, the L2's update is prepared on Django's connection
    after that many saves (planned once, not at every save), although Django's own cursor
    (client-side binding) never prepares."""
    connection = connections[PG_ALIAS]
    connection.ensure_connection()
    raw = connection.connection
    before = raw.prepare_threshold
    already = set(prepared_statements())  # another test may have prepared some
    raw.prepare_threshold = threshold
    try:
        s = saved_eight_times()
        statements = set(prepared_statements()) - already
    finally:
        raw.prepare_threshold = before
    updates = [sql for sql in statements if is_update(sql)]
    assert len(updates) == (0 if threshold is None else 1), statements
    assert SessionStore(s.session_key).load() == {"a": 7}


def test_captured_queries_see_the_l2_statements() -> None:
    """While Django logs queries (DEBUG, CaptureQueriesContext) the statements go through
    Django's cursor, so query-watching tools see them."""
    from django.test.utils import CaptureQueriesContext

    s = saved(a=0)
    with CaptureQueriesContext(connections[PG_ALIAS]) as captured:
        s["a"] = 1
        s.save()
        store.get_table().clear()
        assert SessionStore(s.session_key).load() == {"a": 1}  # a miss: read from L2
    sqls = [query["sql"] for query in captured.captured_queries]
    assert any(is_update(sql) for sql in sqls), sqls
    assert any(sql.startswith("SELECT session_data") for sql in sqls), sqls


@pytest.mark.usefixtures("l2_path")
def test_notify_invalidates_and_own_write_survives(listener: ListenerThread) -> None:
    s = saved(a=1)
    key = s.session_key or ""
    s["a"] = 2
    s.save()
    time.sleep(0.3)  # our own NOTIFY has arrived
    assert store.get_table().get(key) is not None
    # Another host's update: a new version, sent by NOTIFY at its commit, with its copy.
    other = db_l2.DatabaseL2(db_l2.L2Config(backend="db", database=PG_ALIAS, channel=_channel()))
    version = other.update(key, b'{"a":3}', time.time() + 60)
    assert version is not None
    wait_for(lambda: held_version(key) == version, "the NOTIFY to refresh the copy", 2)
    hits = counters.snapshot()["l1_hits"]
    assert SessionStore(key).load() == {"a": 3}
    assert counters.snapshot()["l1_hits"] == hits + 1


@pytest.mark.usefixtures("l2_path")
def test_notify_of_a_session_too_large_to_carry_drops_the_copy(listener: ListenerThread) -> None:
    s = saved(a=1)
    key = s.session_key or ""
    time.sleep(0.3)
    assert store.get_table().get(key) is not None
    other = db_l2.DatabaseL2(db_l2.L2Config(backend="db", database=PG_ALIAS, channel=_channel()))
    big = ('{"a":"' + "x" * REFRESH_LIMIT + '"}').encode()
    assert other.update(key, big, time.time() + 60) is not None
    wait_for(lambda: store.get_table().get(key) is None, "the NOTIFY to drop the copy", 2)
    assert SessionStore(key).load() == {"a": "x" * REFRESH_LIMIT}


def test_versions_grow_by_one_and_delete_notifies(listener: ListenerThread, l2_path: str) -> None:
    """Both paths number updates alike (the row's version + 1, a foreign row restarts at 1),
    a delete drops the other host's copy by its NOTIFY, and each path is the one that ran."""
    s = saved(a=1)
    key = s.session_key or ""
    first = db_l2.decode_data(row(key).session_data)[0]
    other = other_l2()
    results: list[Any] = []
    sql = l2_sql(lambda: results.append(other.update(key, b'{"a":2}', time.time() + 60)))
    assert (called(pg_functions.UPDATE_FUNCTION, sql)) == (l2_path == "functions"), sql
    assert ("WITH u AS" in sql) == (l2_path == "statements"), sql
    assert results == [first + 1]
    assert other.update(key, b'{"a":3}', time.time() + 60) == first + 2
    wait_for(lambda: held_version(key) == first + 2, "the NOTIFY of the update", 2)
    Session.objects.using(PG_ALIAS).filter(session_key=key).update(session_data="foreign")
    assert other.update(key, b'{"a":4}', time.time() + 60) == 1
    sql = l2_sql(lambda: results.append(other.delete(key)))
    assert (called(pg_functions.DELETE_FUNCTION, sql)) == (l2_path == "functions"), sql
    assert results[-1] is True
    assert other.delete(key) is False
    wait_for(lambda: store.get_table().get(key) is None, "the NOTIFY of the delete", 2)
    assert other.update(key, b'{"a":5}', time.time() + 60) is None  # never resurrected


@pytest.mark.usefixtures("l2_path")
def test_a_missed_row_sends_no_notify() -> None:
    """An update of a missing or expired row and a delete of a missing one change nothing and
    notify nobody (a NOTIFY is only sent when the statement hit a row)."""
    import psycopg

    s = saved(a=1)
    key = s.session_key or ""
    Session.objects.using(PG_ALIAS).filter(session_key=key).update(
        expire_date=db_l2._dt(time.time() - 5)
    )
    with psycopg.connect(**db_l2.listen_params(PG_ALIAS), autocommit=True) as conn:
        conn.execute(f'LISTEN "{_channel()}"')
        other = other_l2()
        assert other.update(key, b'{"a":2}', time.time() + 60) is None  # expired
        assert other.update("k" * 32, b'{"a":2}', time.time() + 60) is None  # missing
        assert other.delete("k" * 32) is False
        assert other.delete(key) is True  # the expired row: deleting it is a hit
        heard = [n.payload for n in conn.notifies(timeout=0.5, stop_after=2)]
    assert heard == [f"{db_l2.DELETED} {key}"]


def test_saves_call_the_functions_once_migrated() -> None:
    """``migrate django_shmsession`` (the fixture ran it) installs them; saves and deletes
    then call them instead of sending the statements."""
    from django.test.utils import CaptureQueriesContext

    assert functions_present()
    s = saved(a=0)
    with CaptureQueriesContext(connections[PG_ALIAS]) as captured:
        s["a"] = 1
        s.save()
        s.delete()
    sqls = " ".join(query["sql"] for query in captured.captured_queries)
    assert called(pg_functions.UPDATE_FUNCTION, sqls), sqls
    assert called(pg_functions.DELETE_FUNCTION, sqls), sqls
    assert "WITH u AS" not in sqls
    assert row(s.session_key or "") is None


def test_function_bodies_match_the_statements() -> None:
    """The frozen function (the migration's SQL, as installed) runs the very UPDATE the plain
    statement sends, so the two paths cannot drift apart unnoticed."""
    with connections[PG_ALIAS].cursor() as cursor:
        cursor.execute("SELECT prosrc FROM pg_proc WHERE proname = %s", ["shmsession_update_v1"])
        (body,) = cursor.fetchone()
    names = {"body": "p_body", "expire": "p_expire", "key": "p_key", "now": "p_now"}
    in_function = pg_functions._UPDATE.format(table='"django_session"', **names)
    assert " ".join(in_function.split()) in " ".join(body.split())
    as_sent = pg_functions._UPDATE.format(table='"django_session"', **dict.fromkeys(names, "%s"))
    assert as_sent in pg_functions.update_statement('"django_session"')


def test_sqlmigrate_shows_the_functions() -> None:
    from io import StringIO

    from django.core.management import call_command

    forwards, backwards = StringIO(), StringIO()
    call_command("sqlmigrate", "django_shmsession", "0001", database=PG_ALIAS, stdout=forwards)
    call_command(
        "sqlmigrate",
        "django_shmsession",
        "0001",
        backwards=True,
        database=PG_ALIAS,
        stdout=backwards,
    )
    assert "CREATE OR REPLACE FUNCTION shmsession_update_v1" in forwards.getvalue()
    assert "CREATE OR REPLACE FUNCTION shmsession_delete_v1" in forwards.getvalue()
    assert "DROP FUNCTION IF EXISTS shmsession_update_v1" in backwards.getvalue()


def test_dropped_functions_fall_back_at_once(caplog: Any) -> None:
    """An L2 that knew the functions, after ``migrate django_shmsession zero``: the save that
    finds them gone logs a warning and sends the statement instead (nothing lost); inside the
    caller's transaction (which the failed call aborted) it raises, and the next save sends
    the statement. Migrating forwards puts them back."""
    from django.core.management import call_command
    from django.db import transaction

    s = saved(a=1)
    s["a"] = 2
    s.save()  # this process's L2 has now seen the functions
    call_command("migrate", "django_shmsession", "zero", database=PG_ALIAS, verbosity=0)
    try:
        assert not functions_present()
        s["a"] = 3
        with caplog.at_level(logging.WARNING, logger="django_shmsession"):
            s.save()
        assert "can no longer call its PostgreSQL functions" in caplog.text
        store.get_table().clear()
        assert SessionStore(s.session_key).load() == {"a": 3}
        runtime.get_l2()._functions.record(True)  # type: ignore[attr-defined]  # as if asked
        s["a"] = 4
        with pytest.raises(L2Error, match="refused to save a session"):  # noqa: SIM117
            with transaction.atomic(using=PG_ALIAS):
                s.save()
        s.save()  # it knows now: the statement
        store.get_table().clear()
        assert SessionStore(s.session_key).load() == {"a": 4}
    finally:
        call_command("migrate", "django_shmsession", database=PG_ALIAS, verbosity=0)
    assert functions_present()


def test_revoked_execute_counts_as_missing() -> None:
    """A role that may not EXECUTE the functions (a database hardened by REVOKE ... FROM
    PUBLIC) is told they are not there, so its saves send the statements."""
    role = "shmsession_noexec"
    update = "shmsession_update_v1(text, text, timestamptz, timestamptz, text, text)"
    execute(
        f"DROP ROLE IF EXISTS {role}",
        f"CREATE ROLE {role}",
        f"REVOKE EXECUTE ON FUNCTION {update} FROM PUBLIC",
    )
    try:
        with connections[PG_ALIAS].cursor() as cursor:
            cursor.execute(f"SET ROLE {role}")
            try:
                cursor.execute(pg_functions.PRESENT_QUERY)
                assert cursor.fetchone()[0] is False
            finally:
                cursor.execute("RESET ROLE")
        assert functions_present()  # the owner still may
    finally:
        execute(f"GRANT EXECUTE ON FUNCTION {update} TO PUBLIC", f"DROP ROLE {role}")


def test_a_worker_started_before_migrate_picks_the_functions_up(without_functions: None) -> None:
    now = [1000.0]
    l2 = other_l2()
    l2._functions = pg_functions.Availability(clock=lambda: now[0])
    key = saved(a=1).session_key or ""
    assert "WITH u AS" in l2_sql(lambda: l2.update(key, b'{"a":2}', time.time() + 60))
    execute(MIGRATION.UPDATE_V1, MIGRATION.DELETE_V1)  # migrate ran meanwhile
    assert "WITH u AS" in l2_sql(lambda: l2.update(key, b'{"a":3}', time.time() + 60))
    now[0] += pg_functions.Availability.RECHECK
    sql = l2_sql(lambda: l2.update(key, b'{"a":4}', time.time() + 60))
    assert called(pg_functions.UPDATE_FUNCTION, sql), sql


def test_availability_is_remembered_and_asked_again() -> None:
    now = [100.0]
    known = pg_functions.Availability(clock=lambda: now[0])
    assert known.known() is None
    known.record(False)
    now[0] += pg_functions.Availability.RECHECK - 1
    assert known.known() is False  # not asked again within the minute
    now[0] += 1
    assert known.known() is None
    known.record(True)
    now[0] += 10 * pg_functions.Availability.RECHECK
    assert known.known() is True  # a yes holds
    known.record(False)  # a call found them gone
    assert known.known() is False


def held_version(key: str) -> int | None:
    return codec.version_of(store.get_table().get(key))


def _channel() -> str:
    from django.conf import settings

    return str(settings.SHMSESSION["L2"]["CHANNEL"])


def test_clear_expired_deletes_expired_rows() -> None:
    live, dead = saved(a=1), saved(b=1)
    Session.objects.using(PG_ALIAS).filter(session_key=dead.session_key).update(
        expire_date=db_l2._dt(time.time() - 5)
    )
    SessionStore.clear_expired()
    assert row(live.session_key or "") is not None
    assert row(dead.session_key or "") is None


@pytest.mark.slow
def test_postgres_restart_errors_during_correct_after(postgres_server: PostgresServer) -> None:
    """PostgreSQL down: saves raise naming the database; after the restart, the same process
    reconnects and every session saved before is there (it is the truth, on disk)."""
    s = saved(a=1)
    postgres_server.stop()
    try:
        s["a"] = 2
        with pytest.raises(L2Unavailable, match="the database 'l2pg'"):
            s.save()
        with pytest.raises(L2Unavailable):
            SessionStore().save()
    finally:
        postgres_server.start()
    connections[PG_ALIAS].close()
    store.get_table().clear()
    assert SessionStore(s.session_key).load() == {"a": 1}
    s2 = SessionStore(s.session_key)
    s2["a"] = 3
    s2.save()
    assert SessionStore(s.session_key).load() == {"a": 3}
