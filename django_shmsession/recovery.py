"""What the lock calls to keep the table consistent: the ``Recovery`` side of ``TableLock``.

* :meth:`TableRecovery.pending` is two loads: an armed intent, or a repair flag.
* :meth:`TableRecovery.recover` applies the armed intent (O(1): one entry, one bucket, the
  chains of one value) and runs the full rebuild only when ``CTL_REPAIR`` asks for it.
* :meth:`TableRecovery.corrupted` handles a CorruptTable raised by an operation: an entry that
  only failed its checksum is dropped by an ordinary delete; anything else is rebuilt.

Every step is ordered so that a recoverer killed anywhere leaves work the next one can redo:
the repair flag is raised before a damaged intent is disarmed, and an intent is disarmed only
after every store it implies.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import eviction, faults, integrity, writes
from .exceptions import CorruptTable
from .intent import IntentLog
from .layout import (
    CTL_CORRUPTION,
    CTL_ENTRIES_DROPPED,
    CTL_HINTS_STALE,
    CTL_REPAIR,
    CTL_ROLLBACKS,
    ENTRY_USED,
    INTENT_OP_NAMES,
    REPAIR_NEEDED,
    REPAIR_RUNNING,
)
from .memory import CorruptEntry, TableMemory

__all__ = ["RECOVERY_FAULT_POINTS", "TableRecovery"]

#: Recovery's own steps (the stores it replays are in ``writes.FAULT_POINTS``).
RECOVERY_FAULT_POINTS = (
    "recover:after-repair-needed",
    "recover:after-disarm",
    "repair:after-running",
    "repair:after-rebuild",
)


class TableRecovery:
    """Recovery for one mapped table; every method runs with the table lock held."""

    def __init__(
        self,
        memory: TableMemory,
        log: IntentLog,
        hints: eviction.Hints,
        events: list[tuple[int, str, tuple[Any, ...]]] | None = None,
    ) -> None:
        self._memory = memory
        self._hints = hints
        self._control = memory.control
        self._log = log
        #: Log records for the lock to emit once it is released (never logged under the lock).
        self.events: list[tuple[int, str, tuple[Any, ...]]] = [] if events is None else events
        #: Nonzero while an intent is armed: the lock tests it inline (see lock.Recovery).
        self.pending_word = log.armed_word

    def pending(self) -> bool:
        return self._log.armed or self._control[CTL_REPAIR] != 0

    def recover(self) -> None:
        if self._log.armed:
            self.apply_intent()
        if self._control[CTL_REPAIR]:
            self.rebuild()

    def apply_intent(self) -> None:
        """Roll the armed write back or forward, then disarm; a damaged record asks a rebuild."""
        hook = faults.hook
        started = time.perf_counter()
        intent = self._log.read()
        if intent is not None:
            try:
                forward = writes.recover(self._memory, intent, hook)
                self._control[CTL_ROLLBACKS] += 1
                self._control[CTL_HINTS_STALE] = 1  # the write's class count may be missing
            except CorruptTable:
                intent = None
            else:
                self._event(
                    logging.WARNING,
                    "django-shmsession: recovered an interrupted %s in the session table %s "
                    "(rolled %s, %.2f ms); only that one write was affected",
                    INTENT_OP_NAMES.get(intent.op, "write"),
                    self._memory.segment.name,
                    "forward" if forward else "back",
                    (time.perf_counter() - started) * 1000,
                )
        if intent is None:
            self._event(
                logging.ERROR,
                "django-shmsession: the intent record of the session table %s is damaged; "
                "rebuilding the table",
                self._memory.segment.name,
            )
            self._control[CTL_CORRUPTION] += 1
            self._control[CTL_REPAIR] = REPAIR_NEEDED
            if hook is not None:
                hook("recover:after-repair-needed")
        self._log.disarm()
        if hook is not None:
            hook("recover:after-disarm")

    def rebuild(self) -> integrity.RepairResult:
        """The full O(table) rebuild; REPAIR_RUNNING tells waiters a live repairer is at work."""
        hook = faults.hook
        control = self._control
        started = time.perf_counter()
        control[CTL_REPAIR] = REPAIR_RUNNING
        if hook is not None:
            hook("repair:after-running")
        result = integrity.rebuild(self._memory)
        self._hints.recount()
        self._log.disarm()  # the rebuilt table supersedes any recorded intent
        control[CTL_ENTRIES_DROPPED] += result.dropped
        if hook is not None:
            hook("repair:after-rebuild")
        control[CTL_REPAIR] = 0
        self._event(
            logging.WARNING if result.dropped else logging.INFO,
            "django-shmsession: rebuilt the session table %s in %.0f ms: kept %d sessions, "
            "dropped %d that failed their checks%s",
            self._memory.segment.name,
            (time.perf_counter() - started) * 1000,
            result.kept,
            result.dropped,
            f" ({'; '.join(result.problems[:3])})" if result.problems else "",
        )
        return result

    def _event(self, level: int, message: str, *args: Any) -> None:
        self.events.append((level, message, args))

    def corrupted(self, err: CorruptTable) -> None:
        """After an operation raised ``err``: count it and leave the table consistent."""
        control = self._control
        control[CTL_CORRUPTION] += 1
        self._event(
            logging.ERROR,
            "django-shmsession: corruption detected in the session table %s: %s",
            self._memory.segment.name,
            err,
        )
        if self._log.armed:
            self.apply_intent()
        if (
            isinstance(err, CorruptEntry)
            and not control[CTL_REPAIR]
            and self._memory.state(err.index) == ENTRY_USED
        ):
            try:
                writes.delete(self._memory, self._log, faults.hook, err.index, self._hints)
            except CorruptTable:
                if self._log.armed:
                    self.apply_intent()
            else:
                control[CTL_ENTRIES_DROPPED] += 1
                self._event(
                    logging.WARNING,
                    "django-shmsession: dropped one damaged session from the session table %s",
                    self._memory.segment.name,
                )
                return
        control[CTL_REPAIR] = REPAIR_NEEDED
        self.rebuild()
