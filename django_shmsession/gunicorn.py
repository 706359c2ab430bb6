"""Gunicorn server hooks. In ``gunicorn.conf.py``::

    import os
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django_shmsession.gunicorn import child_exit, on_starting  # noqa: F401

``on_starting`` opens (creating if needed) the table in the master before any worker exists, so
workers never race to create it and a bad SIZE or a full /dev/shm stops the server at start
instead of failing requests. ``child_exit`` runs in the master after a worker died: if it died
holding the table lock (SIGKILL by ``--timeout``, the OOM killer), the lock is recovered at once
instead of after every other worker waited ``LOCK_TIMEOUT``.

Nothing here unlinks the segment: a restart or a USR2 binary upgrade keeps every session. If you
already have these hooks, call ours from yours.
"""

from __future__ import annotations

from typing import Any

from django_shmsession.exceptions import ShmSessionError


def on_starting(server: Any) -> None:
    """Master, before the first fork: open or create the table and report it."""
    from django_shmsession import store

    table = store.get_table()
    server.log.info("django-shmsession: table %s ready (%d bytes)", table.name, table.size)


def child_exit(server: Any, worker: Any) -> None:
    """Master, after a worker exited: take over the table lock if the worker died holding it.

    Never raises: an exception in a gunicorn hook would take the master down with it, and the
    lock timeout remains as a fallback.
    """
    from django_shmsession import store

    try:
        recovered = store.get_table().recover_dead_holder()
    except ShmSessionError as err:
        server.log.error(
            "django-shmsession: lock recovery after worker %s failed: %s", worker.pid, err
        )
        return
    if recovered:
        server.log.warning(
            "django-shmsession: worker %s died holding the session lock; recovered and repaired",
            worker.pid,
        )
