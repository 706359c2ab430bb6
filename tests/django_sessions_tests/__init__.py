"""Django's own SessionTestsMixin, vendored per supported Django by
scripts/vendor_django_session_tests (Django's wheel does not ship its tests)."""

from __future__ import annotations

import importlib
from typing import Any

import django


def session_tests_mixin() -> Any:
    """The SessionTestsMixin of the running Django's minor version.

    :raises ImportError: this Django has no vendored copy: vendor it with the script.
    """
    major, minor = django.VERSION[:2]
    try:
        module = importlib.import_module(f"{__name__}.django{major}{minor}")
    except ModuleNotFoundError as err:
        raise ImportError(
            f"no vendored SessionTestsMixin for Django {major}.{minor}: run "
            f"`scripts/vendor_django_session_tests {django.get_version()}` and commit "
            f"tests/django_sessions_tests/django{major}{minor}.py"
        ) from err
    return module.SessionTestsMixin
