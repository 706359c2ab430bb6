"""The per-process table handle: opened lazily on first use, cached, dropped when settings change.

Opening maps the segment and opens the semaphore (tens of microseconds); doing that per request
would cost more than the session work itself, so every ``SessionStore`` in a process shares one
handle, opened lazily in the process that uses it (the gunicorn master keeps none: see
:mod:`django_shmsession.gunicorn`).

Once a second (one ``time.monotonic()`` comparison per request otherwise) the process checks, by
``stat`` alone, that NAME still names the *pair* it mapped: the same segment file with the size
its header gives, and the same semaphore. If either was removed (``manage.py shmsession
unlink``, systemd-logind's ``RemoveIPC``, an operator cleaning /dev/shm), replaced, or the segment
was truncated (touching the lost pages would SIGBUS), the process switches to the current pair,
which the first process to look creates; every process, including those started afterwards,
ends on that one pair. A silent split of the site into two tables, or two locks on one table, is
the worst failure this package could have.

The replaced handle is dropped, not closed under a thread that may be mid-call on it: it closes
itself (unmapped, fd and semaphore closed) when the last thread lets go of it, so /dev/shm holds
one segment however often the table is replaced.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from django_shmsession import conf
from django_shmsession.exceptions import SettingsMismatch, WouldBlock
from django_shmsession.segment import PairIdentity, current_pair
from django_shmsession.table import SessionTable

#: The table's eviction classes: when the table is full, anonymous sessions go first, so a flood
#: of new anonymous sessions (a crawler, a bot) never pushes signed-in users out.
ANONYMOUS, SIGNED_IN = 0, 1
CLASS_NAMES = ("anonymous", "signed-in", "class 2", "class 3")

logger = logging.getLogger("django_shmsession")

#: Seconds between checks that the mapped pair is still the one named NAME.
RECHECK_INTERVAL = 1.0

_table: SessionTable | None = None
_pair: PairIdentity | None = None  # the pair _table maps, as recorded when it was opened
_next_check = 0.0
_serializer: type[Any] | None = None
_open_lock = threading.Lock()


def _new_open_lock_after_fork() -> None:
    """A fork child gets ``_open_lock`` in the state the forking moment left it: if another
    thread held it, nobody would ever release it in the child."""
    global _open_lock
    _open_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_open_lock_after_fork)
#: Replaced handles some thread may still use; each closes itself when the last one lets go.
_retired: list[weakref.ref[SessionTable]] = []

# Settings whose change must drop the cached handle and config (tests override them).
WATCHED_SETTINGS = frozenset({conf.SETTING, "SECRET_KEY", "SESSION_SERIALIZER"})


def get_table(*, create: bool = True) -> SessionTable:
    """The process's table, opened on first call: created if absent when ``create`` (serving
    processes), else SegmentNotFound (``clearsessions`` and other housekeeping must never make
    a table: with a NAME that differs from the server's, it would be a new, empty one)."""
    table = _table
    if table is not None and time.monotonic() < _next_check:
        return table
    # No reference of ours may outlive the switch: a replaced handle must be free to close
    # before the new segment is created (a /dev/shm with room for one table needs its pages).
    del table
    return _refresh(create)


def get_table_inline() -> SessionTable:
    """The process's table if getting it cannot block: for the async methods on the event loop.

    Raises WouldBlock when the table is not open yet (opening may create the segment, whose
    ``posix_fallocate`` of the whole size takes long), when another thread is opening or
    switching it, or when the once-a-second check finds the pair replaced (the switch opens,
    maybe creates): the caller then runs the whole operation in a thread, which does that work.
    The check itself is two ``stat`` calls and runs inline.
    """
    table = _table
    if table is not None and time.monotonic() < _next_check:
        return table
    del table
    if not _open_lock.acquire(blocking=False):
        raise WouldBlock("another thread is opening the session table")
    try:
        if _table is None or current_pair(conf.get_config().name) != _pair:
            raise WouldBlock("the session table must be opened (or switched) first")
        _set_next_check()
        return _table
    finally:
        _open_lock.release()


def _set_next_check() -> None:
    global _next_check
    _next_check = time.monotonic() + RECHECK_INTERVAL


def get_serializer() -> type[Any]:
    """The ``SESSION_SERIALIZER`` class, imported once per process (``import_string`` on every
    ``SessionStore()``, as ``SessionBase.__init__`` does, costs ~0.7 µs per request)."""
    global _serializer
    serializer = _serializer
    if serializer is None:
        serializer = _serializer = import_string(settings.SESSION_SERIALIZER)
    return serializer


def retired_handles() -> int:
    """How many replaced handles are still alive (used by a thread); 0 once all closed."""
    return sum(1 for ref in _retired if ref() is not None)


def _refresh(create: bool = True) -> SessionTable:
    """Keep the open table if NAME still names its pair, else switch to the current pair; under
    a lock so two threads of one process never map the segment twice."""
    global _table, _pair
    with _open_lock:
        config = conf.get_config()
        if _table is not None:
            now = current_pair(config.name)
            if now != _pair:
                logger.warning(
                    "django-shmsession: %s %s; switching to the current table (sessions in the "
                    "old one are gone)",
                    config.name,
                    _what_changed(_pair, now),
                )
                _retire(_table)
                _table = _pair = None
        _release_retired()
        if _table is None:
            # Raises (SegmentTooLarge, ...) with _table None: the next call tries again.
            table = open_table(config, create=create)
            _table, _pair = table, pair_of(table)
            if table.created:
                logger.info(
                    "django-shmsession: created the session table %s (%d bytes)",
                    table.name,
                    table.size,
                )
        _set_next_check()
        return _table


def pair_of(table: SessionTable) -> PairIdentity:
    """The pair a handle maps, as its segment verified it when opening (never by a later stat,
    which could name a newer pair than the one the handle holds)."""
    return table.pair


def _what_changed(old: PairIdentity | None, new: PairIdentity | None) -> str:
    if old is None:  # pragma: no cover - a cached table always has its pair
        return "was opened"
    if new is None:
        return "was removed (its segment or its semaphore is gone)"
    if new.segment != old.segment:
        return "was replaced by another segment"
    if new.size != old.size:
        return f"was truncated or resized ({old.size} -> {new.size} bytes)"
    return "has another semaphore than the one its segment was created with"


def _retire(table: SessionTable) -> None:
    """Drop the store's reference: the handle closes when the last thread using it lets go."""
    _retired.append(weakref.ref(table))


def _release_retired() -> None:
    """Forget closed handles; collect cycles if one lingers, so its pages are not pinned until
    the next full garbage collection (a handle in use by a thread stays, and is looked at
    again at the next check)."""
    global _retired
    _retired = [ref for ref in _retired if ref() is not None]
    if _retired:
        gc.collect()
        _retired = [ref for ref in _retired if ref() is not None]


#: The table's names of the settings it records, and the SHMSESSION keys that set them.
RECORDED_SETTINGS = {"max_value_size": "MAX_SESSION_SIZE", "full_policy": "FULL_POLICY"}


def open_table(config: conf.ShmSessionConfig, *, create: bool, adopt: bool = False) -> SessionTable:
    """Open the table described by ``config``; create it only when ``create`` is true.

    ``MAX_SESSION_SIZE`` and ``FULL_POLICY`` must agree with what the table's creator recorded
    (SettingsMismatch, naming the SHMSESSION key and both values, otherwise); ``adopt`` takes the
    recorded values instead, for commands that inspect a table whatever its settings (``--name``
    may name another site's). The table's other errors (LayoutMismatch for a segment created
    with another SIZE, ForeignSegment, SegmentTooLarge) already name the setting or command that
    fixes them, so they pass through.
    """
    try:
        table = SessionTable(
            config.name,
            config.size if create else None,
            max_value_size=None if adopt else config.max_session_size,
            full_policy=None if adopt else config.full_policy,
            lock_timeout=config.lock_timeout,
        )
    except SettingsMismatch as err:
        raise _in_settings_terms(config.name, err) from err
    table.class_names = CLASS_NAMES
    table.resize_hint = f"raise SHMSESSION['SIZE'] (now {config.size} bytes)"
    return table


def _in_settings_terms(name: str, err: SettingsMismatch) -> SettingsMismatch:
    """The table's SettingsMismatch, restated with the SHMSESSION key a user writes."""
    key = RECORDED_SETTINGS.get(err.setting)
    if key is None:  # pragma: no cover - a setting the table records but we do not set
        return err
    return SettingsMismatch(name, f"{conf.SETTING}['{key}']", err.recorded, err.requested)


def reset() -> None:
    """Close the cached handle and forget the settings; the next use reopens.

    Closing only unmaps this process's view: the segment and its sessions stay.
    """
    global _table, _pair, _serializer
    with _open_lock:
        table, _table, _pair = _table, None, None
        _serializer = None
        conf.reset()
    if table is not None:
        table.close()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="django_shmsession.store.reset")
