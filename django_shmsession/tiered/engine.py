"""The tiered session engine: the host's shared-memory table (L1) in front of Redis or the
database (L2), which is the truth for every host.

Writes go to L2 first and conditionally (:mod:`.l2`), then to L1; a save that did not reach L2
raises, so no success ever rests on L1 alone. Reads are served from L1 while its copy is younger
than ``MAX_STALENESS`` since L2 last confirmed it *and* the host's listener is up (it drops copies
that other hosts changed); an older copy is revalidated by comparing versions, a miss reads L2
and fills L1. While the listener is down every copy counts as stale (each read asks L2 for the
version), so a change on another host is never honoured later than ``MAX_STALENESS``. While L2
is down, a copy confirmed within ``MAX_STALENESS`` is still served; anything else raises
:class:`~.l2.L2Unavailable`, naming the backend and location.

Filling L1 races with the listener (a copy read from L2 just before another host's write, stored
just after the listener dropped the old one): the listener bumps the key's guard stripe before
dropping, and a worker that sees its stripe move while it filled drops the copy it stored
(:mod:`.words`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from asgiref.sync import sync_to_async
from django.contrib.sessions.backends.base import CreateError, UpdateError
from django.core.signing import JSONSerializer

from django_shmsession import backend, keys, serializers
from django_shmsession.backend import AUTH_USER_KEY
from django_shmsession.exceptions import TableFull, ValueTooLarge, WouldBlock
from django_shmsession.store import ANONYMOUS, SIGNED_IN, get_table, get_table_inline

from . import codec, counters, hoststats, words
from .config import get_tiered_config
from .l2 import L2Record, L2Unavailable
from .runtime import get_l2

logger = logging.getLogger("django_shmsession")
_TIMEOUT_US = words.LISTENER_TIMEOUT * 1_000_000
_T = TypeVar("_T")


class L1(Protocol):
    """The table operations the engine uses: a ``SessionTable``, or its inline view."""

    @property
    def name(self) -> str: ...

    @property
    def max_value_size(self) -> int: ...

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> None: ...

    def add(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool: ...

    def replace(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool: ...

    def replace_if(
        self, key: str, expected: bytes, value: bytes, expires_at: float, priority: int = 0
    ) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def read_app_word(self, index: int) -> int: ...


class SessionStore(backend.SessionStore):
    """Sessions in L2 for every host, with the host's shared-memory table as a shared L1."""

    # -- reads ----------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """The session, or ``{}`` (and no key) when it is missing, expired or undecodable.

        :raises L2Unavailable: L2 is down and L1 holds no copy confirmed within MAX_STALENESS.
        """
        key = self.session_key
        data = None if key is None else self._load_tiered(key)
        if data is None:
            self._session_key = None
            return {}
        return data

    def _load_tiered(self, key: str) -> dict[str, Any] | None:
        table = get_table()
        hoststats.maybe_publish(table)
        now = time.time()
        value = table.get(key)
        if value is None:
            counters.count(counters.MISSES)
            return self._fill(table, key, now, absent=True)
        # The hot path (an L1 hit), inline: confirmed within MAX_STALENESS, listener beating.
        payload = codec.payload_if_confirmed_after(value, now - get_tiered_config().max_staleness)
        if (
            payload is not None
            and now * 1_000_000 - table.read_app_word(words.HEARTBEAT) < _TIMEOUT_US
        ):
            counters.count(counters.HITS)
            return self._decode(payload)
        copy = codec.decode(value)
        if copy is None:
            counters.count(counters.MISSES)
            return self._fill(table, key, now)
        counters.count(counters.REVALIDATIONS)
        try:
            version = get_l2().version(key)
        except L2Unavailable as err:
            return self._served_during_outage(copy, now, err)
        return self._after_revalidation(table, key, copy, version, now)

    def _after_revalidation(
        self, table: L1, key: str, copy: codec.L1Copy, version: int | None, now: float
    ) -> dict[str, Any] | None:
        if version is None:
            table.delete(key)
            return None
        if version != copy.version:
            counters.count(counters.REFETCHES)
            return self._fill(table, key, now)
        # Only over the very copy revalidated (a compare-and-set): one the listener dropped or
        # refreshed meanwhile, or a newer one a save on this host stored during the round
        # trip, is left alone.
        data = self._decode(copy.payload)
        held = codec.encode(*copy)
        refreshed = codec.encode(version, now, copy.expires_at, copy.payload)

        def over_the_copy_revalidated(k: str, value: bytes, expires_at: float, p: int) -> bool:
            return table.replace_if(k, held, value, expires_at, p)

        _write_l1(
            table, over_the_copy_revalidated, key, refreshed, copy.expires_at, _priority(data)
        )
        return data

    def _served_during_outage(
        self, copy: codec.L1Copy, now: float, err: L2Unavailable
    ) -> dict[str, Any] | None:
        """L2 is down: a copy L2 confirmed within MAX_STALENESS may still be served."""
        counters.count(counters.L2_ERRORS)
        if now - copy.confirmed_at < get_tiered_config().max_staleness:
            counters.count(counters.SERVED_DURING_OUTAGE)
            return self._decode(copy.payload)
        raise err

    def _fill(self, table: L1, key: str, now: float, absent: bool = False) -> dict[str, Any] | None:
        before = words.guard(table, key)
        try:
            record = get_l2().fetch(key)
        except L2Unavailable:
            counters.count(counters.L2_ERRORS)
            raise
        return self._filled(table, key, record, now, before, absent=absent)

    def _filled(
        self,
        table: L1,
        key: str,
        record: L2Record | None,
        now: float,
        before: int,
        recheck: bool = True,
        absent: bool = False,
    ) -> dict[str, Any] | None:
        """Store what L2 returned. After a miss (``absent``) only if L1 still has no copy: one
        stored meanwhile came from a save on this host, at least as new as this read, and the
        listener may already have let it stand, so overwriting it could bring back an older
        version that no invalidation would ever remove."""
        if record is None:
            table.delete(key)
            return None
        data = self._decode(record.payload)
        if data is not None:
            value = codec.encode(record.version, now, record.expires_at, record.payload)
            self._store_copy(
                table, key, value, record.expires_at, before, _priority(data), recheck, absent
            )
        return data

    def _decode(self, payload: bytes) -> dict[str, Any] | None:
        serializer = self.serializer
        try:
            data = (
                serializers.loads(payload)
                if serializer is JSONSerializer
                else serializer().loads(payload)
            )
        except Exception:  # any undecodable payload is an absent session, as in Django
            return None
        return data if isinstance(data, dict) else None

    def exists(self, session_key: str | None) -> bool:
        """True if L2 holds a live session under the key (a trusted L1 copy answers alone).

        :raises L2Unavailable: L2 cannot be reached and L1 holds no trusted copy.
        """
        if not keys.is_valid_key(session_key):
            return False
        table = get_table()
        copy = _l1_copy(table, session_key)
        if copy is not None and _trusted(table, copy, time.time()):
            return True
        return get_l2().version(session_key) is not None

    # -- writes ---------------------------------------------------------------------------------

    def create(self) -> None:
        """Save an empty session under a new key in L2; a key collision there is a retry.

        Overridden (not inherited from the plain engine, whose create writes the table only):
        every store operation of this engine goes through L2 first.

        :raises L2Unavailable: L2 cannot be reached; nothing was saved.
        """
        while True:
            self._session_key = self._get_new_session_key()
            try:
                self.save(must_create=True)
            except CreateError:
                continue
            self.modified = True
            return

    def save(self, must_create: bool = False) -> None:
        """Create (``must_create``: CreateError if L2 has the key) or update (UpdateError if L2
        lost it: never resurrected) in L2, then store the copy in L1.

        :raises L2Unavailable: L2 cannot be reached; nothing was saved anywhere.
        :raises ValueTooLarge: the session exceeds MAX_SESSION_SIZE (checked before L2).
        """
        if self.session_key is None:
            return self.create()
        payload, expires_at, key = self._prepare(must_create)
        table = get_table()
        hoststats.maybe_publish(table)
        before = words.guard(table, key)
        now = time.time()
        l2 = get_l2()
        try:
            version = (
                l2.create(key, payload, expires_at)
                if must_create
                else l2.update(key, payload, expires_at, _priority(self._get_session(no_load=True)))
            )
        except L2Unavailable:
            counters.count(counters.L2_ERRORS)
            raise
        if version is not None:
            counters.count(counters.L2_WRITES)
        self._saved(table, key, version, must_create, payload, expires_at, now, before)

    def _prepare(
        self, must_create: bool, max_value_size: int | None = None
    ) -> tuple[bytes, float, str]:
        """Serialize the session (loading it first if needed) and check its size; the async
        path passes the table's ``max_value_size``, read in an inline L1 step."""
        data = self._get_session(no_load=must_create)
        serializer = self.serializer
        payload = (
            serializers.dumps(data) if serializer is JSONSerializer else serializer().dumps(data)
        )
        expires_at = time.time() + self._expiry_age(data)
        key = self.session_key
        if key is None:  # loading found it gone: an update must not resurrect it
            raise UpdateError
        if max_value_size is None:
            max_value_size = get_table().max_value_size
        limit = max_value_size - codec.HEADER_SIZE
        if len(payload) > limit:
            raise backend._too_large(ValueTooLarge(len(payload), limit))
        return payload, expires_at, key

    def _saved(
        self,
        table: L1,
        key: str,
        version: int | None,
        must_create: bool,
        payload: bytes,
        expires_at: float,
        now: float,
        before: int,
        recheck: bool = True,
    ) -> None:
        if version is None:
            if must_create:
                raise CreateError
            table.delete(key)  # gone in L2: so must any copy here be
            raise UpdateError
        value = codec.encode(version, now, expires_at, payload)
        priority = _priority(self._get_session(no_load=True))
        self._store_copy(table, key, value, expires_at, before, priority, recheck)

    def _store_copy(
        self,
        table: L1,
        key: str,
        value: bytes,
        expires_at: float,
        before: int,
        priority: int,
        recheck: bool = True,
        absent: bool = False,
    ) -> None:
        """Store an L1 copy (``absent``: only if there is none). If the listener invalidated
        its stripe meanwhile, the guard word may answer alone: the copy is kept when that one
        invalidation was no newer than the copy (usually this very write's own) or another
        key's, and dropped when it was this key's at a later version. Otherwise the copy is
        kept only if L2 still has that version (asked when ``recheck``, else it is dropped)."""
        write = table.add if absent else table.set
        if not _write_l1(table, write, key, value, expires_at, priority) and (
            not absent or table.get(key) != value
        ):
            # Nothing stored. A failed ``add`` that finds this very value is this step's own
            # earlier run (an async step that hit WouldBlock after its add runs again whole in
            # a thread): that copy still needs the guard check below.
            return
        version = codec.version_of(value)
        after = words.guard(table, key)
        if version is not None:
            if words.copy_survives(before, after, key, version):
                return
            if words.copy_is_stale(before, after, key, version):
                counters.count(counters.GUARD_DROPS)
                table.delete(key)
                return
        try:
            current = get_l2().version(key) if recheck else None
        except L2Unavailable:
            current = None
        if current is None or current != version:
            counters.count(counters.GUARD_DROPS)
            table.delete(key)

    def delete(self, session_key: str | None = None) -> None:
        """Delete in L2 first (every host's listener then drops its copy), then in L1.

        :raises L2Unavailable: L2 cannot be reached; the session was NOT deleted.
        """
        session_key = self._key_to_delete(session_key)
        if session_key is None:
            return
        try:
            get_l2().delete(session_key)
        except L2Unavailable:
            counters.count(counters.L2_ERRORS)
            raise
        get_table().delete(session_key)

    def _key_to_delete(self, session_key: str | None) -> str | None:
        """The key a delete concerns (this session's when None), or None when there is none
        or it is not a valid key (nothing could be stored under it)."""
        key = self.session_key if session_key is None else session_key
        return key if key is not None and keys.is_valid_key(key) else None

    @classmethod
    def clear_expired(cls) -> None:
        """Remove expired sessions from L2 (the db; Redis expires them itself) and from L1.

        :raises L2Unavailable: L2 cannot be reached.
        """
        get_l2().clear_expired()
        get_table().clear_expired()

    # -- async (Django 5.1+): L1 work runs inline on the loop when it needs no wait, L2 calls
    # are awaited. Each L1 step below is a function of the table that `_l1` runs on the
    # table's inline view (SessionTable.inline: WouldBlock, before anything was done, where the
    # lock would have to be waited for or the table opened), or, when that raises, runs again
    # whole in a thread on the table itself. A step does no L2 call and is safe to run twice
    # (its writes store the same values; at worst a counter counts twice).

    async def aload(self) -> dict[str, Any]:
        key = self.session_key
        data = None if key is None else await self._aload_tiered(key)
        if data is None:
            self._session_key = None
            return {}
        return data

    async def _aload_tiered(self, key: str) -> dict[str, Any] | None:
        now = time.time()
        value, trusted, before = await _l1(_look, key, now)
        copy = None if value is None else codec.decode(value)
        l2 = get_l2()
        if copy is None:
            counters.count(counters.MISSES)
        elif trusted:
            counters.count(counters.HITS)
            return self._decode(copy.payload)
        else:
            counters.count(counters.REVALIDATIONS)
            try:
                version = await l2.aversion(key)
            except L2Unavailable as err:
                return self._served_during_outage(copy, now, err)
            if version is None or version == copy.version:
                return await _l1(self._after_revalidation, key, copy, version, now)
            counters.count(counters.REFETCHES)
        try:
            record = await l2.afetch(key)
        except L2Unavailable:
            counters.count(counters.L2_ERRORS)
            raise
        # No second L2 call on the loop: a copy whose stripe moved is simply dropped.
        return await _l1(self._filled, key, record, now, before, False, value is None)

    async def aexists(self, session_key: str | None) -> bool:
        if not keys.is_valid_key(session_key):
            return False
        _, trusted, _ = await _l1(_look, session_key, time.time())
        if trusted:
            return True
        return await get_l2().aversion(session_key) is not None

    async def acreate(self) -> None:
        while True:
            self._session_key = self._get_new_session_key()
            try:
                await self.asave(must_create=True)
            except CreateError:
                continue
            self.modified = True
            return

    async def asave(self, must_create: bool = False) -> None:
        if self.session_key is None:
            return await self.acreate()
        if not must_create and "_session_cache" not in self.__dict__:
            self._session_cache = await self.aload()  # load off the loop, not in _prepare
        key = self.session_key
        limit, before = await _l1(_begin_save, "" if key is None else key)
        payload, expires_at, key = self._prepare(must_create, limit)
        now = time.time()
        l2 = get_l2()
        try:
            version = await (
                l2.acreate(key, payload, expires_at)
                if must_create
                else l2.aupdate(
                    key, payload, expires_at, _priority(self._get_session(no_load=True))
                )
            )
        except L2Unavailable:
            counters.count(counters.L2_ERRORS)
            raise
        if version is not None:
            counters.count(counters.L2_WRITES)
        await _l1(self._saved, key, version, must_create, payload, expires_at, now, before, False)

    async def adelete(self, session_key: str | None = None) -> None:
        session_key = self._key_to_delete(session_key)
        if session_key is None:
            return
        try:
            await get_l2().adelete(session_key)
        except L2Unavailable:
            counters.count(counters.L2_ERRORS)
            raise
        await _l1(_delete, session_key)

    @classmethod
    async def aclear_expired(cls) -> None:
        await sync_to_async(cls.clear_expired, thread_sensitive=False)()


class _Inline:
    """A table whose operations never wait: each raises WouldBlock instead, before doing
    anything (``SessionTable.inline``). The application words are lock-free loads."""

    def __init__(self, table: Any) -> None:
        self._table = table

    @property
    def name(self) -> str:
        return str(self._table.name)

    @property
    def max_value_size(self) -> int:
        return int(self._table.max_value_size)

    def get(self, key: str) -> bytes | None:
        table = self._table
        found: bytes | None = table.inline(table.get, key)
        return found

    def set(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> None:
        table = self._table
        table.inline(table.set, key, value, expires_at, priority)

    def add(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool:
        table = self._table
        return bool(table.inline(table.add, key, value, expires_at, priority))

    def replace(self, key: str, value: bytes, expires_at: float, priority: int = 0) -> bool:
        table = self._table
        return bool(table.inline(table.replace, key, value, expires_at, priority))

    def replace_if(
        self, key: str, expected: bytes, value: bytes, expires_at: float, priority: int = 0
    ) -> bool:
        table = self._table
        return bool(table.inline(table.replace_if, key, expected, value, expires_at, priority))

    def delete(self, key: str) -> bool:
        table = self._table
        return bool(table.inline(table.delete, key))

    def read_app_word(self, index: int) -> int:
        return int(self._table.read_app_word(index))


async def _l1(step: Callable[..., _T], *args: Any) -> _T:
    """Run ``step(table, *args)`` inline on the loop if no table call in it must wait, else
    again whole in a thread (the one place an async method may wait for the table)."""
    try:
        return step(_Inline(get_table_inline()), *args)
    except WouldBlock:
        return await sync_to_async(_on_table, thread_sensitive=False)(step, *args)


def _on_table(step: Callable[..., _T], *args: Any) -> _T:
    return step(get_table(), *args)


def _look(table: L1, key: str, now: float) -> tuple[bytes | None, bool, int]:
    """The raw L1 value, whether its copy may be served without asking L2, and the key's guard
    (read before any L2 call that may fill L1)."""
    hoststats.maybe_publish(table)
    value = table.get(key)
    copy = None if value is None else codec.decode(value)
    trusted = copy is not None and _trusted(table, copy, now)
    return value, trusted, words.guard(table, key)


def _begin_save(table: L1, key: str) -> tuple[int, int]:
    """The table's value limit and the key's guard, before the L2 write (no counters are
    published here: the async path publishes on loads only, as before)."""
    return table.max_value_size, words.guard(table, key)


def _delete(table: L1, key: str) -> bool:
    return table.delete(key)


def _priority(data: dict[str, Any] | None) -> int:
    """The table's eviction class, as the plain engine gives it: signed-in sessions last."""
    return SIGNED_IN if data and AUTH_USER_KEY in data else ANONYMOUS


def _write_l1(
    table: L1,
    write: Callable[[str, bytes, float, int], bool | None],
    key: str,
    value: bytes,
    expires_at: float,
    priority: int,
) -> bool:
    """Store a copy with ``table.set`` or ``table.replace``; False if nothing was stored.

    L1 is a cache: a full table (FULL_POLICY 'raise') loses the copy, never the session.
    """
    try:
        return write(key, value, expires_at, priority) is not False
    except TableFull:
        logger.warning(
            "django-shmsession: the L1 table %s is full; a session is served from L2 only",
            table.name,
        )
        table.delete(key)
        return False


def _l1_copy(table: L1, key: str) -> codec.L1Copy | None:
    value = table.get(key)
    return None if value is None else codec.decode(value)


def _trusted(table: L1, copy: codec.L1Copy, now: float) -> bool:
    """Served without asking L2: confirmed within MAX_STALENESS, and the listener is up."""
    return now - copy.confirmed_at < get_tiered_config().max_staleness and words.listener_up(
        table, now
    )
