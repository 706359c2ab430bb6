"""Django app config: registers the system checks (``manage.py check``)."""

from __future__ import annotations

from django.apps import AppConfig


class ShmSessionConfig(AppConfig):
    """``INSTALLED_APPS += ["django_shmsession"]`` enables the checks and commands."""

    name = "django_shmsession"
    label = "django_shmsession"
    verbose_name = "Shared-memory sessions"

    def ready(self) -> None:
        # Imported for its side effect: the @register decorators add the checks.
        from django_shmsession import checks  # noqa: F401
        from django_shmsession.tiered import checks as tiered_checks  # noqa: F401
