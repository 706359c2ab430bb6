"""L2 on the Django database: Django's own ``Session`` model (``django.contrib.sessions``).

A row holds ``session_data = "<version>:<payload>"`` (the serializer's bytes as text; a payload
that is not plain ASCII text is stored as ``"<version>b<base64>"``) and Django's
``expire_date``. A create draws a random 62-bit version; on PostgreSQL an update makes it the
row's version + 1, computed in the ``UPDATE`` itself (under the row lock), so the versions of
one session grow in commit order, the order in which its invalidations arrive: a listener can
tell an invalidation older than the copy it holds (its host's workers already stored a later
write) and keep that copy. Other databases draw a random version at every write (nothing
listens there, so only equality matters).

- create: an ORM insert that fails on the primary key (two hosts can never both create a key);
- update: an ``UPDATE`` that must hit a live row (never resurrects a deleted session);
- delete: a ``DELETE``.

On PostgreSQL each operation is one raw statement (the ORM's query building cost more Python
time per request than the round trip; a create is an ``INSERT ... ON CONFLICT DO NOTHING``),
sent with psycopg 3's server-side binding on Django's own connection. Django turns psycopg's
prepared statements off by default (for connection poolers); a site that sets
``"OPTIONS": {"prepare_threshold": 5}`` on its database (fine unless it runs behind PgBouncer
older than 1.21 in transaction pooling mode) gets these statements prepared after 5 uses,
although Django's own client-side-binding cursor never prepares: measured on one connection
(psycopg directly, the update statement), the server's CPU per update fell from ~200 µs to
~100 µs (no parsing and planning at every save) and the round trip from ~315 µs to ~205 µs.
Django's cursor is used instead when queries are being logged (``DEBUG``,
``CaptureQueriesContext``) or execute wrappers are installed, so tools that watch Django's
queries still see these statements, and with psycopg2.

Update and delete each also send the invalidation with ``pg_notify``: it is delivered at
commit, only if the row changed, and never on rollback. Once ``migrate django_shmsession`` has
installed its PL/pgSQL functions, each is one function call whose statements PostgreSQL plans
once per connection (server CPU per update ~280 -> ~175 µs measured, no setting, safe behind
any pooler); before that, one statement (``WITH u AS (UPDATE ... RETURNING ...) SELECT
pg_notify(...) FROM u``). See :mod:`.pg_functions`. The listener ``LISTEN``s
on CHANNEL with psycopg 3. Other databases work without invalidations (no listener can run, so
every read older than MAX_STALENESS is revalidated); ``manage.py check`` says so.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import os
import select
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    connections,
    transaction,
)
from django.db.models.functions import Left

try:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3
except ImportError:  # neither psycopg nor psycopg2 installed: no PostgreSQL to talk to
    is_psycopg3 = False
if is_psycopg3:
    from psycopg import Cursor as psycopg_Cursor

from . import pg_functions
from .config import L2Config
from .l2 import (
    DELETED,
    L2,
    Invalidation,
    L2Error,
    L2Record,
    Subscription,
    read_refresh,
    refresh_fields,
)

logger = logging.getLogger("django_shmsession")

_DOWN = (OperationalError, InterfaceError)
#: Enough characters of session_data to hold any version and its separator.
_HEAD = 21


def _model() -> Any:
    from django.contrib.sessions.models import Session

    return Session


def new_version() -> int:
    """A random version below 2**62: room for 2**62 updates of one session, never 0 (DELETED)."""
    return (int.from_bytes(os.urandom(8), "big") >> 2) | 1


def encode_data(version: int, payload: bytes) -> str:
    return f"{version}{encode_body(payload)}"


def encode_body(payload: bytes) -> str:
    """What follows the version in session_data: ``":<text>"`` or ``"b<base64>"``."""
    if payload.isascii() and b"\x00" not in payload:
        return f":{payload.decode('ascii')}"
    return f"b{base64.b64encode(payload).decode('ascii')}"


def decode_data(text: str) -> tuple[int, bytes] | None:
    """(version, payload) from a row written by us; None for one written otherwise."""
    for i, char in enumerate(text[:_HEAD]):
        if char.isdigit():
            continue
        if i == 0:
            return None
        payload = decode_body(text[i:])
        return None if payload is None else (int(text[:i]), payload)
    return None


def decode_body(body: str) -> bytes | None:
    """The payload from what :func:`encode_body` wrote; None for anything else."""
    kind, text = body[:1], body[1:]
    try:
        if kind == ":":
            return text.encode("ascii")
        if kind == "b":
            return base64.b64decode(text, validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        pass
    return None


def _version_of(head: str) -> int | None:
    digits = len(head) - len(head.lstrip("0123456789"))
    return int(head[:digits]) if digits and head[digits : digits + 1] in (":", "b") else None


def _sqlstate(err: BaseException) -> str | None:
    """The SQLSTATE of the driver error under Django's wrapper (psycopg 3 or psycopg2)."""
    cause = err.__cause__
    return getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)


def _quoted_table() -> str:
    """The session table's name as PostgreSQL quotes it."""
    return f'"{_model()._meta.db_table}"'


def _dt(when: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(when, tz=datetime.timezone.utc)


def _one_row(alias: str, sql: str, params: list[Any]) -> Any:
    """Run one PostgreSQL statement on Django's connection ``alias``; its first row or None.

    Through a psycopg 3 server-binding cursor on the connection Django manages (same
    transaction, same errors: wrapped as Django's), so psycopg can prepare the statement;
    through Django's cursor whenever something watches Django's queries (see the module)."""
    connection = connections[alias]
    if connection.queries_logged or connection.execute_wrappers or not is_psycopg3:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()
    connection.validate_thread_sharing()
    connection.validate_no_broken_transaction()
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg_Cursor(connection.connection) as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


class DatabaseL2(L2):
    """Sessions in the database of ``DATABASE`` through Django's Session model."""

    def __init__(self, config: L2Config) -> None:
        super().__init__(config)
        self.alias = config.database
        self._functions = pg_functions.Availability()

    @property
    def _postgres(self) -> bool:
        return bool(connections[self.alias].vendor == "postgresql")

    def _objects(self) -> Any:
        return _model().objects.using(self.alias)

    def _call(self, action: str, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except _DOWN as err:
            self._drop_broken_connection()
            raise self.unavailable(action, err) from err
        except IntegrityError:
            raise
        except DatabaseError as err:
            raise L2Error(f"{self.describe()} refused to {action}: {err}") from err

    def _drop_broken_connection(self) -> None:
        """Close a connection the failure broke (outside a transaction), so the next call
        reconnects instead of failing on the dead socket until the request ends."""
        connection = connections[self.alias]
        if not connection.in_atomic_block:
            try:
                connection.close()
            except DatabaseError:
                logger.debug("django-shmsession: closing a broken connection", exc_info=True)

    def fetch(self, key: str) -> L2Record | None:
        found: L2Record | None = self._call("read a session", self._fetch, key)
        return found

    def _fetch(self, key: str) -> L2Record | None:
        if self._postgres:
            return _row_record(self._select_one("session_data, expire_date", key))
        row = (
            self._objects()
            .filter(session_key=key, expire_date__gt=_dt(time.time()))
            .values_list("session_data", "expire_date")
            .first()
        )
        return _row_record(row)

    def version(self, key: str) -> int | None:
        found: int | None = self._call("check a session's version", self._version, key)
        return found

    def _version(self, key: str) -> int | None:
        if self._postgres:
            found = self._select_one(f"left(session_data, {_HEAD})", key)
            return None if found is None else _version_of(found[0])
        head = (
            self._objects()
            .filter(session_key=key, expire_date__gt=_dt(time.time()))
            .annotate(head=Left("session_data", _HEAD))
            .values_list("head", flat=True)
            .first()
        )
        return None if head is None else _version_of(head)

    def _select_one(self, columns: str, key: str) -> Any:
        """PostgreSQL: one row of the live session, by a raw statement (a read on every
        miss and revalidation; building it through the ORM cost more Python time than the
        round trip)."""
        table = _model()._meta.db_table
        sql = f'SELECT {columns} FROM "{table}" WHERE session_key = %s AND expire_date > %s'
        return _one_row(self.alias, sql, [key, _dt(time.time())])

    def create(self, key: str, payload: bytes, expires_at: float) -> int | None:
        found: int | None = self._call("create a session", self._create, key, payload, expires_at)
        return found

    def _create(self, key: str, payload: bytes, expires_at: float) -> int | None:
        version = new_version()
        if self._postgres:
            table = _model()._meta.db_table
            sql = (
                f'INSERT INTO "{table}" (session_key, session_data, expire_date) '
                f"VALUES (%s, %s, %s) ON CONFLICT (session_key) DO NOTHING RETURNING 1"
            )
            params = [key, encode_data(version, payload), _dt(expires_at)]
            return version if _one_row(self.alias, sql, params) is not None else None
        try:
            with transaction.atomic(using=self.alias):
                self._objects().create(
                    session_key=key,
                    session_data=encode_data(version, payload),
                    expire_date=_dt(expires_at),
                )
        except IntegrityError:
            return None
        return version

    def update(self, key: str, payload: bytes, expires_at: float, priority: int = 0) -> int | None:
        found: int | None = self._call(
            "save a session", self._update, key, payload, expires_at, priority
        )
        return found

    def _update(self, key: str, payload: bytes, expires_at: float, priority: int) -> int | None:
        expire, now = _dt(expires_at), _dt(time.time())
        if self._postgres:
            body = encode_body(payload)
            fields = refresh_fields(payload, expires_at, priority)
            notice = key if fields is None else f"{key} {fields} {body}"
            return self._update_postgres(key, body, notice, expire, now)
        version = new_version()
        hit = bool(
            self._objects()
            .filter(session_key=key, expire_date__gt=now)
            .update(session_data=encode_data(version, payload), expire_date=expire)
        )
        return version if hit else None

    def _update_postgres(
        self, key: str, body: str, notice: str, expire: datetime.datetime, now: datetime.datetime
    ) -> int | None:
        """One call: the conditional UPDATE (new version = the row's + 1, read under the row
        lock, so concurrent updates of one session get increasing versions in commit order)
        and its NOTIFY, sent at commit only if the row changed; as the PL/pgSQL function when
        it is installed, else as one statement (see :mod:`.pg_functions`)."""
        channel = self.config.channel
        if self._functions_installed():
            call = [key, body, expire, now, channel, notice]
            found, version = self._call_function(pg_functions.UPDATE_CALL, call)
            if found:
                return None if version is None else int(version)
        sql = pg_functions.update_statement(_quoted_table())
        row = _one_row(self.alias, sql, [body, expire, key, now, channel, notice])
        return None if row is None else int(row[0])

    def delete(self, key: str) -> bool:
        return bool(self._call("delete a session", self._delete, key))

    def _delete(self, key: str) -> bool:
        if self._postgres:
            params = [key, self.config.channel, f"{DELETED} {key}"]
            if self._functions_installed():
                found, hit = self._call_function(pg_functions.DELETE_CALL, params)
                if found:
                    return bool(hit)
            sql = pg_functions.delete_statement(_quoted_table())
            return _one_row(self.alias, sql, params) is not None
        deleted, _ = self._objects().filter(session_key=key).delete()
        return bool(deleted)

    def _functions_installed(self) -> bool:
        """Whether this database has the functions (asked once; a no again after a minute)."""
        known = self._functions.known()
        if known is None:
            row = _one_row(self.alias, pg_functions.PRESENT_QUERY, [])
            known = self._functions.record(bool(row and row[0]))
        return known

    def _call_function(self, sql: str, params: list[Any]) -> tuple[bool, Any]:
        """(True, the value the call returned), or (False, None) when the function is gone or
        may no longer be called (dropped, EXECUTE revoked since the L2 asked): the caller
        then sends the plain statement, as do the saves of the next ``RECHECK`` seconds. Inside
        the caller's transaction the failed call has aborted it, so the error is raised."""
        try:
            row = _one_row(self.alias, sql, params)
        except ProgrammingError as err:
            if _sqlstate(err) not in pg_functions.MISSING_STATES:
                raise
            self._functions.record(False)
            if connections[self.alias].in_atomic_block:
                raise
            logger.warning(
                "django-shmsession: %s can no longer call its PostgreSQL functions (%s); "
                "sending plain statements. Run `manage.py migrate django_shmsession`.",
                self.describe(),
                err,
            )
            return False, None
        return True, None if row is None else row[0]

    def clear_expired(self) -> int:
        """Delete expired rows (what Django's db engine does for ``clearsessions``)."""

        def sweep() -> int:
            deleted, _ = self._objects().filter(expire_date__lt=_dt(time.time())).delete()
            return int(deleted)

        return int(self._call("clear expired sessions", sweep))

    def ping(self) -> None:
        def probe() -> None:
            with connections[self.alias].cursor() as cursor:
                cursor.execute("SELECT 1")

        self._call("reach the database", probe)

    def subscribe(self) -> Subscription:
        if not self._postgres:
            raise L2Error(
                f"{self.describe()} is {connections[self.alias].vendor}; invalidations need "
                f"PostgreSQL's LISTEN/NOTIFY. Without a listener the tiered engine revalidates "
                f"every copy older than MAX_STALENESS; do not run `shmsession listen`."
            )
        return PostgresSubscription(self)

    def close(self) -> None:
        try:
            connections[self.alias].close()
        except DatabaseError:
            logger.debug("django-shmsession: closing the database connection", exc_info=True)

    # -- async: Django's async ORM for the version check on other databases; the rest
    # through sync_to_async, as the async ORM does itself (Django has no async cursor) --

    async def afetch(self, key: str) -> L2Record | None:
        return await sync_to_async(self.fetch)(key)

    async def aversion(self, key: str) -> int | None:
        if self._postgres:
            return await sync_to_async(self.version)(key)
        try:
            head = await (
                self._objects()
                .filter(session_key=key, expire_date__gt=_dt(time.time()))
                .annotate(head=Left("session_data", _HEAD))
                .values_list("head", flat=True)
                .afirst()
            )
        except _DOWN as err:
            await sync_to_async(self._drop_broken_connection)()
            raise self.unavailable("check a session's version", err) from err
        return None if head is None else _version_of(head)

    async def acreate(self, key: str, payload: bytes, expires_at: float) -> int | None:
        return await sync_to_async(self.create)(key, payload, expires_at)

    async def aupdate(
        self, key: str, payload: bytes, expires_at: float, priority: int = 0
    ) -> int | None:
        return await sync_to_async(self.update)(key, payload, expires_at, priority)

    async def adelete(self, key: str) -> bool:
        return await sync_to_async(self.delete)(key)


def _row_record(row: tuple[str, datetime.datetime] | None) -> L2Record | None:
    if row is None:
        return None
    decoded = decode_data(row[0])
    if decoded is None:
        return None
    return L2Record(decoded[0], decoded[1], row[1].timestamp())


def listen_params(alias: str) -> dict[str, Any]:
    """psycopg 3 connection arguments for ``alias``, as Django would connect."""
    params = dict(connections[alias].get_connection_params())
    for key in ("cursor_factory", "context", "server_side_binding", "prepare_threshold"):
        params.pop(key, None)
    return params


class PostgresSubscription(Subscription):
    """The listener's own psycopg 3 connection, ``LISTEN``ing on CHANNEL (autocommit)."""

    def __init__(self, l2: DatabaseL2) -> None:
        import psycopg

        self.l2 = l2
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
        try:
            self.conn = psycopg.connect(**listen_params(l2.alias), autocommit=True)
            self.conn.execute(f"LISTEN {l2.config.channel}")
        except self._errors as err:
            raise l2.unavailable("listen for invalidations", err) from err
        self.last_contact = time.time()

    def poll(self, timeout: float) -> list[Invalidation]:
        """Wait in ``select`` for the socket, then take what arrived without waiting.

        Not ``conn.notifies(timeout=...)``: psycopg 3.3 spins in its wait loop until the
        deadline (measured: ``timeout=0.001`` burns 1.0 ms of CPU per call, a 50 ms wait
        ~0.9 ms), which made every invalidation cost the host ~0.8 ms of CPU on each host.
        ``notifies(timeout=0)`` returns what psycopg already holds (notifications that came
        in while the heartbeat's query ran, which no ``select`` would see) and reads the
        socket once (~4 µs); it raises on a closed connection.
        """
        try:
            found = self._take()
            if not found and select.select([self.conn.fileno()], [], [], timeout)[0]:
                found = self._take()
        except self._errors as err:
            raise self.l2.unavailable("receive invalidations", err) from err
        return found

    def _take(self) -> list[Invalidation]:
        found: list[Invalidation] = []
        for note in self.conn.notifies(timeout=0):
            found.extend(_parse(note.payload))
        return found

    def ping(self) -> None:
        try:
            self.conn.execute("SELECT 1")
        except self._errors as err:
            raise self.l2.unavailable("ping the LISTEN connection", err) from err
        self.last_contact = time.time()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            logger.debug("django-shmsession: closing the LISTEN connection", exc_info=True)


def _parse(payload: str) -> list[Invalidation]:
    """``"<version> <key>[ <expires_at ms> <class> <body>]"`` -> one invalidation (see
    :mod:`.l2`); anything else is logged and ignored."""
    fields = payload.split(" ", 4)
    try:
        version, key = int(fields[0]), fields[1]
    except (ValueError, IndexError):
        logger.warning("django-shmsession: ignored a malformed invalidation %r", payload[:100])
        return []
    return [Invalidation(key, version, read_refresh(fields[2:], decode_body))]
