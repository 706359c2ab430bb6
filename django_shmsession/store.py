"""The per-process table handle: opened lazily on first use, cached, dropped when settings change.

Opening maps the segment and opens the semaphore (tens of microseconds); doing that per request
would cost more than the session work itself, so every ``SessionStore`` in a process shares one
handle. The table handle is fork-safe, so a handle opened in the gunicorn master (see
:mod:`django_shmsession.gunicorn`) is inherited by every worker.

Once a second (one ``time.monotonic()`` comparison per request otherwise) the process checks
that NAME still refers to the segment it mapped. If the segment was removed (``manage.py
shmsession unlink``, systemd-logind's ``RemoveIPC``) or replaced, the process maps the current
one instead of carrying on alone with an orphan that no new process can see: a silent split of
the site into two session tables is the worst failure this package could have.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from django_shmsession import conf
from django_shmsession.segment import segment_path
from django_shmsession.table import SessionTable

logger = logging.getLogger("django_shmsession")

#: Seconds between checks that the mapped segment is still the one named NAME.
RECHECK_INTERVAL = 1.0

_table: SessionTable | None = None
_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the segment _table maps
_next_check = 0.0
_serializer: type[Any] | None = None
_open_lock = threading.Lock()

# Settings whose change must drop the cached handle and config (tests override them).
WATCHED_SETTINGS = frozenset({conf.SETTING, "BASE_DIR", "SESSION_SERIALIZER"})


def get_table() -> SessionTable:
    """The process's table, opened (and created if absent) on first call."""
    table = _table
    if table is None or time.monotonic() >= _next_check:
        table = _refresh()
    return table


def get_serializer() -> type[Any]:
    """The ``SESSION_SERIALIZER`` class, imported once per process (``import_string`` on every
    ``SessionStore()``, as ``SessionBase.__init__`` does, costs ~0.7 µs per request)."""
    global _serializer
    serializer = _serializer
    if serializer is None:
        serializer = _serializer = import_string(settings.SESSION_SERIALIZER)
    return serializer


def _refresh() -> SessionTable:
    """Open the table, or keep the open one if NAME still names it; under a lock so two threads
    of one process never map the segment twice."""
    global _table, _identity, _next_check
    with _open_lock:
        config = conf.get_config()
        if _table is None or _identity != _stat_identity(config.name):
            if _table is not None:
                logger.warning(
                    "django-shmsession: the segment %s was removed or replaced; switching to the "
                    "current one (sessions in the old segment are gone)",
                    config.name,
                )
            # A replaced handle is dropped, not closed: another thread may be mid-call on it.
            _table = open_table(config, create=True)
            _identity = _table.identity
        _next_check = time.monotonic() + RECHECK_INTERVAL
        return _table


def _stat_identity(name: str) -> tuple[int, int] | None:
    try:
        info = os.stat(segment_path(name))
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def open_table(config: conf.ShmSessionConfig, *, create: bool) -> SessionTable:
    """Open the table described by ``config``; create it only when ``create`` is true.

    The table's own errors (LayoutMismatch for a segment created with another SIZE, ForeignSegment,
    SegmentTooLarge) already name the setting or command that fixes them, so they pass through.
    """
    return SessionTable(
        config.name,
        config.size if create else None,
        max_value_size=config.max_session_size,
        full_policy=config.full_policy,
        lock_timeout=config.lock_timeout,
    )


def reset() -> None:
    """Close the cached handle and forget the settings; the next use reopens.

    Closing only unmaps this process's view: the segment and its sessions stay.
    """
    global _table, _identity, _serializer
    with _open_lock:
        table, _table, _identity = _table, None, None
        _serializer = None
        conf.reset()
    if table is not None:
        table.close()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="django_shmsession.store.reset")
