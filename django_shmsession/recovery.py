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

from . import faults, integrity, writes
from .exceptions import CorruptTable
from .intent import IntentLog
from .layout import (
    CTL_CORRUPTION,
    CTL_ENTRIES_DROPPED,
    CTL_REPAIR,
    CTL_ROLLBACKS,
    ENTRY_USED,
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

    def __init__(self, memory: TableMemory, log: IntentLog) -> None:
        self._memory = memory
        self._control = memory.control
        self._log = log
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
        intent = self._log.read()
        if intent is not None:
            try:
                writes.recover(self._memory, intent, hook)
                self._control[CTL_ROLLBACKS] += 1
            except CorruptTable:
                intent = None
        if intent is None:
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
        control[CTL_REPAIR] = REPAIR_RUNNING
        if hook is not None:
            hook("repair:after-running")
        result = integrity.rebuild(self._memory)
        self._log.disarm()  # the rebuilt table supersedes any recorded intent
        control[CTL_ENTRIES_DROPPED] += result.dropped
        if hook is not None:
            hook("repair:after-rebuild")
        control[CTL_REPAIR] = 0
        return result

    def corrupted(self, err: CorruptTable) -> None:
        """After an operation raised ``err``: count it and leave the table consistent."""
        control = self._control
        control[CTL_CORRUPTION] += 1
        if self._log.armed:
            self.apply_intent()
        if (
            isinstance(err, CorruptEntry)
            and not control[CTL_REPAIR]
            and self._memory.state(err.index) == ENTRY_USED
        ):
            try:
                writes.delete(self._memory, self._log, faults.hook, err.index)
            except CorruptTable:
                if self._log.armed:
                    self.apply_intent()
            else:
                control[CTL_ENTRIES_DROPPED] += 1
                return
        control[CTL_REPAIR] = REPAIR_NEEDED
        self.rebuild()
