"""django-shmsession: Django sessions in POSIX shared memory, shared by every worker process."""

from __future__ import annotations

__version__ = "0.1.0"
