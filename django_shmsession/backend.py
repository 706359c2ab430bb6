"""The session engine: ``SESSION_ENGINE = "django_shmsession.backend"``.

Semantics follow Django's ``db`` backend exactly (``must_create`` -> ``CreateError`` on an
existing key, an update of a session deleted or expired meanwhile -> ``UpdateError``, a missing,
expired or undecodable session loads as ``{}`` and drops its key), built on the table's atomic
``add`` and ``replace`` so two workers can never race each other into a wrong answer.

What is stored is the serializer's bytes, not ``SessionBase.encode()``: signing costs ~20 µs per
call and protects nothing in memory only this machine's processes can read. Serialization happens
before the table is called, so the table lock is held only for the table's own work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from django.contrib.sessions.backends.base import CreateError, SessionBase, UpdateError
from django.core.signing import JSONSerializer

from django_shmsession import conf, keys, serializers
from django_shmsession.exceptions import SegmentNotFound, TableFull, ValueTooLarge, WouldBlock
from django_shmsession.store import (
    ANONYMOUS,
    SIGNED_IN,
    get_serializer,
    get_table,
    get_table_inline,
)
from django_shmsession.table import SessionTable

#: The session key under which django.contrib.auth keeps the signed-in user's id
#: (``django.contrib.auth.SESSION_KEY``, not imported: the engine works without auth).
AUTH_USER_KEY = "_auth_user_id"

_T = TypeVar("_T")


class TableOps(Protocol):
    """The table operations a session needs: a SessionTable, or :class:`_Inline` over one."""

    def get(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def add(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool: ...
    def replace(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool: ...
    def delete(self, key: str) -> bool: ...


#: How an operation gets its table: ``get_table`` (sync), or an inline-only one (async).
Tables = Callable[[], TableOps]


class SessionStore(SessionBase):
    """Sessions in the shared-memory table, seen by every process of the site on this machine."""

    def __init__(self, session_key: str | None = None) -> None:
        """``SessionBase.__init__`` minus its per-instance ``import_string`` of the serializer
        (a new store is made per request). tests/engine/test_contract.py checks that it sets the
        same attributes as Django's, so a Django upgrade that adds one fails loudly."""
        self._session_key = session_key
        self.accessed = False
        self.modified = False
        self.serializer = get_serializer()

    # Cookie values are untrusted: only keys we could have generated reach the table. Bound as
    # a staticmethod (not a wrapper method) because SessionBase calls it on every key assignment.
    _validate_session_key = staticmethod(keys.is_valid_key)

    def _get_new_session_key(self) -> str:
        """A fresh key (~1 µs instead of Django's ~45 µs); collisions are retried by ``add``."""
        return keys.new_session_key()

    async def _aget_new_session_key(self) -> str:
        return keys.new_session_key()

    def _get_session(self, no_load: bool = False) -> dict[str, Any]:
        """``SessionBase._get_session`` without the ``AttributeError`` it raises and catches on
        the first access of every request (~0.6 µs); same flags, same laziness."""
        self.accessed = True
        cache: dict[str, Any] | None = self.__dict__.get("_session_cache")
        if cache is None:
            cache = {} if no_load or self.session_key is None else self.load()
            self._session_cache = cache
        return cache

    # SessionBase binds its own _get_session in this property; rebind it to ours.
    _session = property(_get_session)

    def get_expiry_age(self, **kwargs: Any) -> int:
        """``SessionBase.get_expiry_age`` minus its ``timezone.now()`` when there is no custom
        expiry (the middleware asks on every save): the answer is then the cookie age."""
        if not kwargs and not self._session.get("_session_expiry"):
            return self.get_session_cookie_age()
        return super().get_expiry_age(**kwargs)

    # Each operation is written once, as ``_<op>(tables, ...)``: the sync method passes
    # ``get_table``, the async one a table that refuses to wait (see ``_run_async``).

    def load(self) -> dict[str, Any]:
        """The stored dict, or ``{}`` (and no key) if it is missing, expired or undecodable, so
        the next save creates a fresh key instead of reviving one a client chose.

        Django's default ``JSONSerializer`` is replaced by :mod:`django_shmsession.serializers`
        (the same results and errors, in C); any other ``SESSION_SERIALIZER`` is used as is."""
        return self._load(get_table)

    def _load(self, tables: Tables) -> dict[str, Any]:
        key = self.session_key
        blob = tables().get(key) if key is not None else None
        if blob is not None:
            data = _decode(self.serializer, blob)
            if data is not None:
                return data
        self._session_key = None
        return {}

    def exists(self, session_key: str | None) -> bool:
        return self._exists(get_table, session_key)

    def _exists(self, tables: Tables, session_key: str | None) -> bool:
        return keys.is_valid_key(session_key) and tables().exists(session_key)

    def create(self) -> None:
        """Save an empty session under a new key; ``add`` makes a key collision a retry."""
        self._create(get_table)

    def _create(self, tables: Tables) -> None:
        while True:
            self._session_key = self._get_new_session_key()
            try:
                self._save(tables, must_create=True)
            except CreateError:
                continue
            self.modified = True
            return

    def save(self, must_create: bool = False) -> None:
        """``add`` for a new session (CreateError if the key is taken), ``replace`` otherwise
        (UpdateError if it was deleted or expired meanwhile: never resurrected). Expiry is on
        ``time.time()``, the table's clock."""
        self._save(get_table, must_create)

    def _save(self, tables: Tables, must_create: bool = False) -> None:
        if self.session_key is None:
            return self._create(tables)
        data = self._get_session(no_load=must_create)
        serializer = self.serializer
        blob = serializers.dumps(data) if serializer is JSONSerializer else serializer().dumps(data)
        expires_at = time.time() + self._expiry_age(data)
        key = self.session_key
        if key is None:
            # Loading found the session gone (deleted, expired) and dropped its key: an update
            # must not resurrect it, exactly as when ``replace`` finds it missing.
            raise UpdateError
        table = tables()
        priority = SIGNED_IN if AUTH_USER_KEY in data else ANONYMOUS
        try:
            if must_create:
                if not table.add(key, blob, expires_at, priority):
                    raise CreateError
            elif not table.replace(key, blob, expires_at, priority):
                raise UpdateError
        except ValueTooLarge as err:
            raise _too_large(err) from err
        except TableFull as err:
            raise _full(err) from err

    def _expiry_age(self, data: dict[str, Any]) -> float:
        """``get_expiry_age()`` without its datetime work in the common no-custom-expiry case."""
        if not data.get("_session_expiry"):
            return self.get_session_cookie_age()
        return self.get_expiry_age()

    def delete(self, session_key: str | None = None) -> None:
        self._delete(get_table, session_key)

    def _delete(self, tables: Tables, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
        if keys.is_valid_key(session_key):
            tables().delete(session_key)

    @classmethod
    def clear_expired(cls) -> None:
        """Remove expired sessions (``manage.py clearsessions``), in batches that release the
        lock in between so requests keep flowing during a large sweep.

        Never creates the table: a process whose NAME differs from the server's (or that runs
        before the site ever served) must say so, not make a new, empty table and report
        success."""
        try:
            table = get_table(create=False)
        except SegmentNotFound as err:
            name = conf.get_config().name
            raise SegmentNotFound(
                f"no session table named {name!r} exists, so there are no expired sessions to "
                f"clear; clearsessions never creates one. If the site is serving, this process's "
                f"{conf.SETTING}['NAME'] differs from the server's: set it explicitly in the "
                f"settings both use (`manage.py shmsession list` shows the tables there are). "
                f"({err})"
            ) from err
        table.clear_expired()

    # Django 5.1+ calls these from async views and middleware. The uncontended path (the lock
    # free at once, nothing to recover, the table open) runs inline on the event loop, as it
    # takes microseconds; anything that would wait (the lock held by another process, a
    # recovery, the first open that creates the segment) raises WouldBlock before doing
    # anything, and the same operation then runs in a thread, so the loop keeps serving.

    async def aload(self) -> dict[str, Any]:
        return await _run_async(self, self._load)

    async def aexists(self, session_key: str | None) -> bool:
        return await _run_async(self, self._exists, session_key)

    async def acreate(self) -> None:
        await _run_async(self, self._create)

    async def asave(self, must_create: bool = False) -> None:
        await _run_async(self, self._save, must_create)

    async def adelete(self, session_key: str | None = None) -> None:
        await _run_async(self, self._delete, session_key)

    @classmethod
    async def aclear_expired(cls) -> None:
        """Always in a thread: a sweep of a large table takes seconds."""
        await asyncio.to_thread(cls.clear_expired)


class _Inline:
    """A table whose operations never wait: each raises WouldBlock instead (the table's
    ``inline``), before it has done anything, so running it again in a thread is safe."""

    __slots__ = ("_table",)

    def __init__(self, table: SessionTable) -> None:
        self._table = table

    def get(self, key: str) -> bytes | None:
        table = self._table
        return table.inline(table.get, key)

    def exists(self, key: str) -> bool:
        table = self._table
        return table.inline(table.exists, key)

    def add(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool:
        table = self._table
        return table.inline(table.add, key, value, expires_at, priority)

    def replace(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool:
        table = self._table
        return table.inline(table.replace, key, value, expires_at, priority)

    def delete(self, key: str) -> bool:
        table = self._table
        return table.inline(table.delete, key)


def _inline_tables() -> TableOps:
    return _Inline(get_table_inline())


async def _run_async(session: SessionStore, operation: Callable[..., _T], *args: Any) -> _T:
    """Run ``operation(tables, *args)`` inline if it needs no wait, else in a thread.

    WouldBlock comes before the table call that raised it changed anything, and every earlier
    table call of the operation changed nothing either (only a ``create`` makes more than one,
    retrying a key that was taken), so the thread's rerun does exactly what the inline run
    would have done, once the session key a ``create`` drew inline is put back.
    """
    key = session._session_key
    try:
        return operation(_inline_tables, *args)
    except WouldBlock:
        session._session_key = key
    return await asyncio.to_thread(operation, get_table, *args)


def _decode(serializer: type[Any], blob: bytes) -> dict[str, Any] | None:
    """The session dict in ``blob``, or None if it does not decode to a dict."""
    try:
        data = serializers.loads(blob) if serializer is JSONSerializer else serializer().loads(blob)
    except Exception:  # any undecodable blob is an absent session
        return None
    return data if isinstance(data, dict) else None


def decode_session(blob: bytes) -> dict[str, Any] | None:
    """A stored session's dict with the site's serializer (for ``shmsession sessions``)."""
    return _decode(get_serializer(), blob)


def _too_large(err: ValueTooLarge) -> ValueTooLarge:
    return ValueTooLarge(
        err.size,
        err.max_size,
        f"store less in the session or raise {conf.SETTING}['MAX_SESSION_SIZE'] "
        f"(at most a quarter of {conf.SETTING}['SIZE'])",
    )


def _full(err: TableFull) -> TableFull:
    return TableFull(
        f"{err} -- the session table is full and {conf.SETTING}['FULL_POLICY'] is 'raise'. "
        f"Raise {conf.SETTING}['SIZE'] (then `python manage.py shmsession unlink` and restart), "
        f"run `python manage.py clearsessions` regularly, or set FULL_POLICY to 'evict'."
    )
