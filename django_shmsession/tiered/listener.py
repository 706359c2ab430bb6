"""The host's invalidation listener: one per host (L1 is shared), never one per worker.

It subscribes to L2's invalidations (Redis pub/sub, PostgreSQL LISTEN) and drops from L1 every
copy another host changed: an invalidation carries the key and the new version (0 for a
delete). A copy of exactly that version (this host's own write) is kept, and so is a copy of a
*later* version: L2 numbers the writes of one session in increasing order (a Redis counter; on
PostgreSQL the row's version + 1 inside the UPDATE), and invalidations arrive in commit order,
so an invalidation older than the copy is news the host already has (typically its own write,
reaching a listener that runs behind the workers). Dropping it would send the next request to
L2 for nothing. Before it even looks at the copy, the listener records the invalidation in the
key's guard stripe, so a worker's fill or save in flight cannot put an older copy back
(:mod:`.words`).

It records a heartbeat in the segment: the time L2 last answered a ping on the subscription,
every HEARTBEAT_INTERVAL. While the heartbeat is older than LISTENER_TIMEOUT, workers treat every
L1 copy as stale and revalidate it. After each (re)connect it flushes L1 (invalidations sent
while it was away are lost: Redis pub/sub and NOTIFY keep none for an absent listener), and it
does the same when the table it writes to was replaced (a new segment under NAME).

Only one listener runs per table: an OFD lock on a file in the temp directory; a second one
waits as a standby and takes over when the first dies. Run it with the gunicorn hooks
(:mod:`django_shmsession.gunicorn`), ``manage.py shmsession listen``, or
``python -m django_shmsession.tiered.listener`` (with DJANGO_SETTINGS_MODULE set).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from django_shmsession import conf, keys, store
from django_shmsession.exceptions import TableFull, ValueTooLarge
from django_shmsession.segment import PairIdentity
from django_shmsession.table import SessionTable

from . import codec, counters, hoststats, words
from .config import get_tiered_config
from .l2 import DELETED, Invalidation, L2Error, Subscription
from .runtime import make_l2

logger = logging.getLogger("django_shmsession")

#: Seconds between reconnection attempts while L2 is unreachable.
RECONNECT_DELAY = 0.2
RECONNECT_DELAY_MAX = 2.0
#: Seconds the listener pauses after applying a batch, so that under a stream of writes it
#: wakes at most ~1/BATCH_PAUSE times a second and takes what came meanwhile in one batch: a
#: lone invalidation is still applied the moment it arrives, a stream waits at most this long.
BATCH_PAUSE = 0.002


def lock_path(name: str) -> Path:
    """The file whose OFD lock makes a listener the only one for table ``name``."""
    return Path(tempfile.gettempdir()) / f"django-shmsession{name.replace('/', '-')}.listener"


class Listener:
    """Keeps the host's L1 coherent with L2 until ``stop`` is set."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self.l2 = make_l2(get_tiered_config().l2)
        self._table: SessionTable | None = None
        self._pair: PairIdentity | None = None
        self._lock_fd: int | None = None
        self._parent = os.getppid()

    def run(self) -> None:
        """Serve until stopped (or the parent that started it is gone); never raises for L2."""
        try:
            if not self._take_lock():
                return
            delay = RECONNECT_DELAY
            while not self._should_stop():
                try:
                    self._serve(self.l2.subscribe())
                    delay = RECONNECT_DELAY
                except L2Error as err:
                    self._mark_down()
                    logger.warning("django-shmsession: listener cut off from L2: %s", err)
                    self.stop.wait(delay)
                    delay = min(delay * 2, RECONNECT_DELAY_MAX)
        finally:
            self._mark_down()
            self.l2.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def _should_stop(self) -> bool:
        return self.stop.is_set() or os.getppid() != self._parent

    def _take_lock(self) -> bool:
        """Wait until no other listener serves this table; False if stopped meanwhile."""
        path = lock_path(conf.get_config().name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        waiting_logged = False
        while not self._should_stop():
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _lock_struct(fcntl.F_WRLCK))
                self._lock_fd = fd
                return True
            except OSError:
                if not waiting_logged:
                    logger.info("django-shmsession: another listener serves this host; standing by")
                    waiting_logged = True
                self.stop.wait(0.2)
        os.close(fd)
        return False

    def _serve(self, sub: Subscription) -> None:
        """Flush, then heartbeat and apply invalidations until the connection fails."""
        try:
            table = self._current_table()
            self._flush(table, "subscribed to L2")
            logger.info(
                "django-shmsession: listener up for %s (%s)", table.name, self.l2.describe()
            )
            next_ping = 0.0
            while not self._should_stop():
                now = time.monotonic()
                if now >= next_ping:
                    sub.ping()
                    next_ping = now + words.HEARTBEAT_INTERVAL
                batch = sub.poll(min(0.05, max(0.0, next_ping - now)))
                for invalidation in batch:
                    self._apply(self._table or table, invalidation)
                if batch:
                    time.sleep(BATCH_PAUSE)
                table = self._current_table()
                self._beat(table, sub)
                hoststats.maybe_publish(table)
        finally:
            sub.close()

    def _current_table(self) -> SessionTable:
        """The host's table; a replaced one (new segment under NAME) is flushed once."""
        table = store.get_table()
        if self._table is not None and table.pair != self._pair:
            self._flush(table, "the table was replaced")
        self._table, self._pair = table, table.pair
        return table

    def _beat(self, table: SessionTable, sub: Subscription) -> None:
        """Heartbeat = when L2 last answered; a silent connection ends this subscription."""
        if time.time() - sub.last_contact >= words.LISTENER_TIMEOUT:
            raise self.l2.unavailable(
                "keep the subscription alive", TimeoutError("no answer to the heartbeat ping")
            )
        table.write_app_word(words.HEARTBEAT, int(sub.last_contact * 1_000_000))

    def _flush(self, table: SessionTable, why: str) -> None:
        words.bump_all_guards(table)
        dropped = table.clear()
        words.increment(table, words.FLUSHES)
        table.write_app_word(words.LISTENER_PID, os.getpid())
        logger.info(
            "django-shmsession: listener flushed L1 %s (%s; %d copies)", table.name, why, dropped
        )

    def _apply(self, table: SessionTable, invalidation: Invalidation) -> None:
        key, version, _refresh = invalidation
        words.increment(table, words.INVALIDATIONS)
        if not keys.is_valid_key(key):
            return
        # Record it in the stripe first, always, and only then look at the copy: a save or
        # fill in flight on this stripe must see every invalidation applied after its L2 call
        # and before it stored its copy (words.copy_survives), including one whose copy is
        # kept here. Bumping after the look, or not at all for a kept copy, would let a slow
        # worker put an older version over the copy looked at, with nothing left to drop it.
        words.bump_guard(table, key, version)
        value = table.get(key)
        held = codec.version_of(value)
        if version != DELETED and held is not None and held >= version:
            if held > version:
                # A later write of this session is already here (a listener behind its own
                # host's workers): dropping it would only send the next request to L2.
                counters.count(counters.KEPT_NEWER)
            return  # held == version: this host's own write, that very version
        if value is not None and held is not None and self._refresh(table, invalidation, value):
            return
        table.delete(key)

    @staticmethod
    def _refresh(table: SessionTable, invalidation: Invalidation, held: bytes) -> bool:
        """Replace an older copy with the one the invalidation carries; False if it carries
        none or the copy changed since it was read (a compare-and-set: a save on this host
        may have stored a newer one, which must not be overwritten). Never adds a copy: a host
        keeps only sessions its own requests used."""
        key, version, refresh = invalidation
        if refresh is None or version == DELETED:
            return False
        value = codec.encode(version, time.time(), refresh.expires_at, refresh.payload)
        try:
            done = table.replace_if(key, held, value, refresh.expires_at, refresh.priority)
        except (TableFull, ValueTooLarge):
            return False
        if done:
            counters.count(counters.REFRESHED)
        return done

    def _mark_down(self) -> None:
        table = self._table
        if table is not None:
            try:
                table.write_app_word(words.HEARTBEAT, 0)
            except Exception:  # a closed or replaced table: nothing to mark
                logger.debug("django-shmsession: could not clear the heartbeat", exc_info=True)


def _lock_struct(kind: int) -> bytes:
    """A whole-file ``struct flock`` for F_OFD_SETLK (l_pid must be 0)."""
    import struct

    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def run_forever() -> None:
    """Run a listener in this process until SIGTERM or SIGINT."""
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    Listener(stop).run()


if __name__ == "__main__":  # python -m django_shmsession.tiered.listener
    import django

    django.setup()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    run_forever()
