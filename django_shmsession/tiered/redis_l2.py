"""L2 on Redis (redis-py): one hash per session, changed only by Lua scripts.

Each session is a hash ``KEY_PREFIX + key`` with fields ``v`` (version), ``d`` (payload) and
``e`` (expiry, ms since the epoch), expiring in Redis at ``e`` (``PEXPIREAT``). Versions come
from one counter ``KEY_PREFIX + "_version"`` (INCR), so a version is never reused, even by a
session recreated under the same key. ``_`` is not in Django's key alphabet, so neither the
counter nor the channel can collide with a session.

The scripts make each write one atomic step in Redis: a create is ``EXISTS`` + ``HSET`` (fails on
an existing key: Redis's ``SET NX`` for a hash), an update fails on a missing or expired key, and
update and delete ``PUBLISH`` their invalidation (``"<version> <key>"``, an update's with its
copy: :mod:`.l2`) on the channel ``KEY_PREFIX + "_invalidate"`` in the same step: an
invalidation is sent if and only if the write happened. Listeners get invalidations by pub/sub
rather than ``CLIENT TRACKING``: a tracking message names only the key, so a host's own write
would evict the copy it had just stored; ours carries the version (the listener keeps a copy of
exactly that version) and the new copy (a host with an older one refreshes it).

Needs one Redis primary (the scripts touch two keys, which Redis Cluster allows only in one slot).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import DEFAULT_REDIS_TIMEOUT, L2Config
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

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return v
"""

UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
if ARGV[5] == '' then
  redis.call('PUBLISH', ARGV[3], v .. ' ' .. ARGV[4])
else
  redis.call('PUBLISH', ARGV[3], v .. ' ' .. ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. ARGV[1])
end
return v
"""

DELETE = """
local n = redis.call('DEL', KEYS[1])
if n == 1 then redis.call('PUBLISH', ARGV[1], '0 ' .. ARGV[2]) end
return n
"""


def _client_options(config: L2Config) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": DEFAULT_REDIS_TIMEOUT,
        "socket_connect_timeout": DEFAULT_REDIS_TIMEOUT,
    }
    options.update(config.options)
    options["decode_responses"] = False  # payloads are bytes
    return options


class RedisL2(L2):
    """Sessions in Redis, for any number of hosts."""

    def __init__(self, config: L2Config) -> None:
        super().__init__(config)
        self.prefix = config.key_prefix
        self.counter = f"{self.prefix}_version"
        self.channel = f"{self.prefix}_invalidate"
        self.client: redis.Redis = redis.Redis.from_url(config.location, **_client_options(config))
        self._create = self.client.register_script(CREATE)
        self._update = self.client.register_script(UPDATE)
        self._delete = self.client.register_script(DELETE)
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncRedis] = (
            weakref.WeakKeyDictionary()
        )

    def _call(self, action: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _DOWN as err:
            raise self.unavailable(action, err) from err
        except RedisError as err:
            raise L2Error(f"{self.describe()} refused to {action}: {err}") from err

    def fetch(self, key: str) -> L2Record | None:
        found = self._call("read a session", self.client.hmget, self.prefix + key, "v", "d", "e")
        return _record(found)

    def version(self, key: str) -> int | None:
        found = self._call("check a session's version", self.client.hget, self.prefix + key, "v")
        return None if found is None else int(found)

    def create(self, key: str, payload: bytes, expires_at: float) -> int | None:
        keys = [self.prefix + key, self.counter]
        version = self._call("create a session", self._create, keys, [payload, _ms(expires_at)])
        return int(version) or None

    def update(self, key: str, payload: bytes, expires_at: float, priority: int = 0) -> int | None:
        keys = [self.prefix + key, self.counter]
        args = self._update_args(key, payload, expires_at, priority)
        version = self._call("save a session", self._update, keys, args)
        return int(version) or None

    def _update_args(
        self, key: str, payload: bytes, expires_at: float, priority: int
    ) -> list[bytes | str | int]:
        """The UPDATE script's arguments; the last one is the refresh's fields ("" when the
        payload is too large to travel with the invalidation)."""
        fields = refresh_fields(payload, expires_at, priority)
        return [payload, _ms(expires_at), self.channel, key, fields or ""]

    def delete(self, key: str) -> bool:
        removed = self._call(
            "delete a session", self._delete, [self.prefix + key], [self.channel, key]
        )
        return bool(removed)

    def clear_expired(self) -> int:
        """Redis expires sessions by itself (PEXPIREAT): nothing to sweep."""
        return 0

    def ping(self) -> None:
        self._call("reach the server", self.client.ping)

    def subscribe(self) -> Subscription:
        return RedisSubscription(self)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a broken client must not raise
            logger.debug("django-shmsession: closing the Redis client failed", exc_info=True)

    # -- asyncio: redis-py's asyncio client, one per event loop (its connections belong to one) --

    async def _aclient(self) -> _AsyncRedis:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = _AsyncRedis(self)
            await client.bind_to_loop()
        return client

    async def _acall(self, action: str, coro: Any) -> Any:
        try:
            return await coro
        except _DOWN as err:
            raise self.unavailable(action, err) from err
        except RedisError as err:
            raise L2Error(f"{self.describe()} refused to {action}: {err}") from err

    async def afetch(self, key: str) -> L2Record | None:
        client = (await self._aclient()).client
        found = await self._acall("read a session", client.hmget(self.prefix + key, "v", "d", "e"))
        return _record(found)

    async def aversion(self, key: str) -> int | None:
        client = (await self._aclient()).client
        found = await self._acall("check a session's version", client.hget(self.prefix + key, "v"))
        return None if found is None else int(found)

    async def acreate(self, key: str, payload: bytes, expires_at: float) -> int | None:
        script = (await self._aclient()).create
        keys = [self.prefix + key, self.counter]
        version = await self._acall(
            "create a session", script(keys=keys, args=[payload, _ms(expires_at)])
        )
        return int(version) or None

    async def aupdate(
        self, key: str, payload: bytes, expires_at: float, priority: int = 0
    ) -> int | None:
        script = (await self._aclient()).update
        keys = [self.prefix + key, self.counter]
        args = self._update_args(key, payload, expires_at, priority)
        version = await self._acall("save a session", script(keys=keys, args=args))
        return int(version) or None

    async def adelete(self, key: str) -> bool:
        script = (await self._aclient()).delete
        removed = await self._acall(
            "delete a session", script(keys=[self.prefix + key], args=[self.channel, key])
        )
        return bool(removed)


class _AsyncRedis:
    """redis-py's asyncio client and scripts for one event loop."""

    def __init__(self, l2: RedisL2) -> None:
        self.client = redis.asyncio.Redis.from_url(l2.config.location, **_client_options(l2.config))
        self.create = self.client.register_script(CREATE)
        self.update = self.client.register_script(UPDATE)
        self.delete = self.client.register_script(DELETE)
        self._lifetime: AsyncGenerator[None, None] | None = None

    async def bind_to_loop(self) -> None:
        """Close the client when its loop shuts down: ``asyncio.run`` (and uvicorn) finalize
        every live async generator before closing the loop, so this one's ``finally`` runs
        while the loop can still close the sockets."""
        self._lifetime = self._live()
        await self._lifetime.__anext__()

    async def _live(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await self.client.aclose()


def _ms(expires_at: float) -> int:
    return int(expires_at * 1000)


def _record(found: list[bytes | None]) -> L2Record | None:
    version, payload, expires_ms = found
    if version is None or payload is None or expires_ms is None:
        return None
    return L2Record(int(version), payload, int(expires_ms) / 1000)


class RedisSubscription(Subscription):
    """The listener's pub/sub connection to the invalidation channel."""

    def __init__(self, l2: RedisL2) -> None:
        self.l2 = l2
        # No socket timeout on reads: get_message waits with its own timeout; a dead server is
        # noticed by the heartbeat's PING going unanswered (and by the TCP keepalive).
        # Through a typed name: redis-py 8.2 annotates pubsub() and older releases do not, so
        # a "type: ignore" on the call fails mypy under one or the other.
        make_pubsub: Callable[[], Any] = l2.client.pubsub
        self.pubsub = make_pubsub()
        try:
            self.pubsub.subscribe(l2.channel)
            self._wait_subscribed()
        except _DOWN as err:
            self.close()
            raise l2.unavailable("subscribe to invalidations", err) from err

    def _wait_subscribed(self) -> None:
        deadline = time.monotonic() + DEFAULT_REDIS_TIMEOUT * 5
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "subscribe":
                self.last_contact = time.time()
                return
        raise RedisTimeoutError("no subscribe confirmation")

    def poll(self, timeout: float) -> list[Invalidation]:
        found: list[Invalidation] = []
        wait = timeout
        try:
            while True:
                message = self.pubsub.get_message(timeout=wait)
                if message is None:
                    return found
                wait = 0.0  # drain what is already here, then return
                kind = message["type"]
                if kind == "message":
                    found.extend(_parse(message["data"]))
                elif kind == "pong":
                    self.last_contact = time.time()
        except _DOWN as err:
            raise self.l2.unavailable("receive invalidations", err) from err

    def ping(self) -> None:
        try:
            self.pubsub.ping()
        except _DOWN as err:
            raise self.l2.unavailable("ping the invalidation connection", err) from err

    def close(self) -> None:
        try:
            self.pubsub.close()
        except Exception:
            logger.debug("django-shmsession: closing the pub/sub connection failed", exc_info=True)


def _parse(data: bytes) -> list[Invalidation]:
    """``b"<version> <key>[ <expires_at ms> <class> <payload>]"`` -> one invalidation (see
    :mod:`.l2`); anything else is logged and ignored."""
    fields = data.split(b" ", 4)
    try:
        version, key = int(fields[0]), fields[1].decode("ascii")
    except (UnicodeDecodeError, ValueError, IndexError):
        logger.warning("django-shmsession: ignored a malformed invalidation %r", data[:100])
        return []
    return [Invalidation(key, version, read_refresh(fields[2:], bytes))]


__all__ = ["DELETED", "RedisL2", "RedisSubscription"]
