"""Fault injection points for crash tests: one hook, called at named points of every write.

Tests install a hook (``set_fault_hook``) that SIGKILLs the process, raises, or records at a
chosen point; production never installs one, so each point costs one global load and a compare
(``if faults.hook is not None``). Points are named ``"<step>:<before|after>-<store>"`` and listed
by the module that owns them (``lock.FAULT_POINTS``, ``table.FAULT_POINTS``), so a test can
iterate over every point of every step.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["hook", "set_fault_hook"]

#: The installed hook, or None (checked inline at every point: keep it a plain module global).
hook: Callable[[str], None] | None = None


def set_fault_hook(new_hook: Callable[[str], None] | None) -> None:
    """Install ``new_hook(point)`` to be called at every fault point (tests only)."""
    global hook
    hook = new_hook
