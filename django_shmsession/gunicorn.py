"""Gunicorn server hooks. In ``gunicorn.conf.py``::

    import os
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django_shmsession.gunicorn import child_exit, on_exit, on_starting  # noqa: F401

``on_starting`` opens (creating if needed) the table in the master before any worker exists, so
workers never race to create it and a bad SIZE or a full /dev/shm stops the server at start
instead of failing requests; it then closes it again. ``child_exit`` runs in the master after a
worker died: if it died holding the table lock (SIGKILL by ``--timeout``, the OOM killer), the
lock is recovered at once instead of after the waiting workers notice.

The master keeps no mapping between hooks: a mapping it held would pin the old segment's pages
in /dev/shm after every unlink (a /dev/shm with room for one table could then never get a new
one), and workers inherit nothing they must then re-check. Workers open their own table lazily
after the fork.

With ``SESSION_ENGINE = "django_shmsession.tiered"``, ``on_starting`` also starts the host's
invalidation listener as a child of the master and restarts it whenever it dies; ``on_exit``
stops it.

Nothing here unlinks the segment: a restart or a USR2 binary upgrade keeps every session. If you
already have these hooks, call ours from yours.

With ``SHMSESSION["SNAPSHOT"]`` (warm restart, :mod:`.snapshot_hooks`): ``on_starting`` restores
the snapshot into a segment it had to create and starts the periodic dumps, and ``on_exit``
dumps once more after the workers stopped.
"""

from __future__ import annotations

from typing import Any

from django_shmsession.exceptions import SegmentNotFound


def on_starting(server: Any) -> None:
    """Master, before the first fork: open or create the table, report it, close it."""
    from django_shmsession import conf, snapshot_hooks, store

    config = conf.get_config()
    table = store.open_table(config, create=True)
    try:
        server.log.info("django-shmsession: table %s ready (%d bytes)", table.name, table.size)
        snapshot_hooks.restore_at_start(server, config, table)
    finally:
        table.close()
    snapshot_hooks.start_periodic(server, config)
    _start_listener(server)


def _start_listener(server: Any) -> None:
    """The tiered engine's host listener, supervised by this master (see tiered.supervisor)."""
    from django.conf import settings

    from django_shmsession import conf

    if getattr(settings, "SESSION_ENGINE", "") == conf.TIERED_ENGINE:
        from django_shmsession.tiered import supervisor

        supervisor.start(server.log)


def on_exit(server: Any) -> None:
    """Master, after the workers stopped: with SNAPSHOT, dump the table once more; stop the
    tiered engine's listener (if one was started)."""
    from django_shmsession import conf, snapshot_hooks
    from django_shmsession.tiered import supervisor

    supervisor.stop()
    snapshot_hooks.dump_at_exit(server, conf.get_config())


def child_exit(server: Any, worker: Any) -> None:
    """Master, after a worker exited: take over the table lock if the worker died holding it.

    Never raises: gunicorn runs hooks in its main loop, and an exception escaping from here
    ends the master ("Unhandled exception in main loop") with every worker. The waiting workers
    remain as the fallback that recovers the lock.
    """
    try:
        recovered = _recover_lock()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # anything else, even a BaseException from a C extension
        server.log.error(
            "django-shmsession: lock recovery after worker %s failed: %s: %s",
            worker.pid,
            type(err).__name__,
            err,
        )
        return
    if recovered:
        # What the recovery did (a write rolled back or finished, or nothing to undo) is the
        # table's to say: it logs that on the django_shmsession logger. Claim nothing here.
        server.log.warning(
            "django-shmsession: worker %s died holding the session lock; the master took the "
            "lock over and released it (what its recovery did is logged on the "
            "django_shmsession logger)",
            worker.pid,
        )


def _recover_lock() -> bool:
    """Open the existing table (never create one: nothing to recover then), recover, close."""
    from django_shmsession import conf, store

    try:
        table = store.open_table(conf.get_config(), create=False)
    except SegmentNotFound:
        return False  # no table (yet, or being replaced): no lock a dead worker could hold
    try:
        return table.recover_dead_holder()
    finally:
        table.close()
