"""URLs for the end-to-end benchmark: the test project's, plus two views for the lost-session check.

Why: consecutive requests usually land on the same idle gunicorn worker, so a check made of plain
requests may never cross workers and would not catch a per-process store. A view that holds its
worker for a moment makes N concurrent requests land on N different workers, for certain.
These views are only reached by e2e.py's check, never by the wrk runs.
"""

from __future__ import annotations

import os
import time

from django.http import HttpRequest, JsonResponse
from django.urls import path
from testproject.urls import urlpatterns as project_urlpatterns

HOLD_SECONDS = 0.02


def hold(request: HttpRequest) -> JsonResponse:
    """Keep this worker busy without touching the session."""
    time.sleep(HOLD_SECONDS)
    return JsonResponse({"pid": os.getpid()})


def held_read(request: HttpRequest) -> JsonResponse:
    """Keep this worker busy, then read "foo" from the session like the project's `/` does."""
    time.sleep(HOLD_SECONDS)
    return JsonResponse({"foo": request.session.get("foo"), "pid": os.getpid()})


urlpatterns = [
    *project_urlpatterns,
    path("bench/hold", hold),
    path("bench/read", held_read),
]
