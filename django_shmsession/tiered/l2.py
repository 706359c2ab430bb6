"""The contract every L2 (the store that is the truth for every host) fulfils, and its errors.

An L2 stores, per session key, the serializer's bytes, an absolute expiry and a *version*: a
number L2 assigns at every create and update, never reused for one key, which the L1 copy keeps
so that a copy can be revalidated by comparing one number and an invalidation can tell whether
it concerns the copy a host holds. Creates and updates are conditional in L2 itself (a create
fails on an existing key, an update on a missing one), so two hosts can never both create one
key and no host resurrects a session another one deleted. Updates and deletes publish an
invalidation (key, version; version 0 for a delete) that the hosts' listeners receive.

An update's invalidation also carries the new copy (payload, expiry, eviction class) when the
payload is at most REFRESH_LIMIT bytes, so a host holding an older copy replaces it instead of
dropping it: its next request is an L1 hit rather than a read of L2. On the wire (both L2s)::

    <version> <key>                                        a delete, or a large session
    <version> <key> <expires_at ms> <class> <payload>      an update that carries its copy

(on PostgreSQL the payload is written as in the session row: ``:<text>`` or ``b<base64>``).
Nothing in a received invalidation is trusted: :func:`read_refresh` checks every field.

Errors are translated at this boundary: a server that cannot be reached raises
:class:`L2Unavailable`, whose message names the backend and its location.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

from django_shmsession.exceptions import ShmSessionError
from django_shmsession.layout import PRIORITY_CLASSES

from .config import L2Config

logger = logging.getLogger("django_shmsession")
_Field = TypeVar("_Field", str, bytes)

#: The version an invalidation carries for a deleted session.
DELETED = 0


class L2Error(ShmSessionError):
    """L2 refused or failed an operation; the message names the backend and location."""


class L2Unavailable(L2Error, ConnectionError):
    """L2 could not be reached (down, refused, timed out): nothing was written to it."""


class L2Record(NamedTuple):
    version: int
    payload: bytes
    expires_at: float


#: The largest payload an update's invalidation carries (PostgreSQL's NOTIFY payload limit is
#: 8000 bytes; base64 makes 5000 bytes 6668 characters).
REFRESH_LIMIT = 5000


class Refresh(NamedTuple):
    """The new copy an update's invalidation carries."""

    payload: bytes
    expires_at: float
    priority: int  # the table's eviction class


class Invalidation(NamedTuple):
    key: str
    version: int  # DELETED for a delete
    refresh: Refresh | None = None


def refresh_fields(payload: bytes, expires_at: float, priority: int) -> str | None:
    """``"<expires_at ms> <class>"`` for an update's invalidation, or None when the payload is
    too large to travel with it."""
    if len(payload) > REFRESH_LIMIT:
        return None
    return f"{int(expires_at * 1000)} {priority}"


def read_refresh(
    fields: Sequence[_Field], decode: Callable[[_Field], bytes | None]
) -> Refresh | None:
    """The copy an invalidation's fields after the key carry (expiry in ms, class, payload as
    ``decode`` reads it), checked field by field; None when there are none. A malformed copy
    is logged and left out: the invalidation still drops the copy it concerns."""
    if not fields:
        return None
    try:
        expires_ms, priority, body = fields
        payload = decode(body)
        expires_at, klass = int(expires_ms) / 1000, int(priority)
        if (
            payload is None
            or len(payload) > REFRESH_LIMIT
            or not 0 < expires_at < 2**40
            or not 0 <= klass < PRIORITY_CLASSES
        ):
            raise ValueError
    except ValueError:
        logger.warning("django-shmsession: an invalidation carried a malformed copy; ignored it")
        return None
    return Refresh(payload, expires_at, klass)


class Subscription(ABC):
    """A listener's connection to L2's invalidations (one per host)."""

    #: time.time() when L2 last answered on this connection (a heartbeat's round trip).
    last_contact: float = 0.0

    @abstractmethod
    def poll(self, timeout: float) -> list[Invalidation]:
        """Invalidations received within ``timeout`` seconds (maybe none).

        :raises L2Unavailable: the connection was lost; subscribe again.
        """

    @abstractmethod
    def ping(self) -> None:
        """Ask L2 for an answer on this connection; ``last_contact`` moves when it arrives.

        :raises L2Unavailable: the connection was lost.
        """

    @abstractmethod
    def close(self) -> None:
        """Drop the connection (never raises)."""


class L2(ABC):
    """One process's client of the L2 store (opened lazily, reopened after a fork)."""

    def __init__(self, config: L2Config) -> None:
        self.config = config

    def describe(self) -> str:
        return self.config.describe()

    @abstractmethod
    def fetch(self, key: str) -> L2Record | None:
        """The live session stored under ``key``, or None.

        :raises L2Unavailable: L2 cannot be reached.
        """

    @abstractmethod
    def version(self, key: str) -> int | None:
        """Only the version of the live session under ``key`` (a revalidation), or None.

        :raises L2Unavailable: L2 cannot be reached.
        """

    @abstractmethod
    def create(self, key: str, payload: bytes, expires_at: float) -> int | None:
        """Store a new session atomically; its version, or None if ``key`` is taken.

        :raises L2Unavailable: L2 cannot be reached (nothing was stored).
        """

    @abstractmethod
    def update(self, key: str, payload: bytes, expires_at: float, priority: int = 0) -> int | None:
        """Overwrite a live session; its new version, or None if it is gone (never recreated).
        ``priority`` (the copy's eviction class in L1) travels with the invalidation.

        :raises L2Unavailable: L2 cannot be reached (nothing was stored).
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if a session was removed.

        :raises L2Unavailable: L2 cannot be reached (nothing was removed).
        """

    @abstractmethod
    def clear_expired(self) -> int:
        """Remove expired sessions L2 does not expire by itself; how many were removed.

        :raises L2Unavailable: L2 cannot be reached.
        """

    @abstractmethod
    def ping(self) -> None:
        """Check that L2 answers (system checks).

        :raises L2Unavailable: it does not.
        """

    @abstractmethod
    def subscribe(self) -> Subscription:
        """A new subscription to every invalidation of this site's sessions.

        :raises L2Unavailable: L2 cannot be reached.
        """

    @abstractmethod
    async def afetch(self, key: str) -> L2Record | None:
        """:meth:`fetch` without blocking the event loop."""

    @abstractmethod
    async def aversion(self, key: str) -> int | None:
        """:meth:`version` without blocking the event loop."""

    @abstractmethod
    async def acreate(self, key: str, payload: bytes, expires_at: float) -> int | None:
        """:meth:`create` without blocking the event loop."""

    @abstractmethod
    async def aupdate(
        self, key: str, payload: bytes, expires_at: float, priority: int = 0
    ) -> int | None:
        """:meth:`update` without blocking the event loop."""

    @abstractmethod
    async def adelete(self, key: str) -> bool:
        """:meth:`delete` without blocking the event loop."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to close
        """Release connections (never raises)."""

    def unavailable(self, action: str, err: BaseException) -> L2Unavailable:
        """The error for a failed ``action``, naming the backend and location."""
        return L2Unavailable(
            f"could not {action}: the session store L2 ({self.describe()}) is unreachable "
            f"({type(err).__name__}: {err}). Nothing was written; the request should fail "
            f"rather than lose the session. Check that the server is up and "
            f"SHMSESSION['L2'] points at it."
        )
