"""The tiered engine: ``SESSION_ENGINE = "django_shmsession.tiered"``.

The host's shared-memory table is a host-wide L1 in front of Redis or the Django database (L2,
the truth for every host). See :mod:`.engine` for the consistency rules, :mod:`.listener` for the
per-host invalidation listener and :mod:`.config` for the settings.
"""

from __future__ import annotations

from .engine import SessionStore

__all__ = ["SessionStore"]
