"""ASGI entry point: `gunicorn -k uvicorn.workers.UvicornWorker testproject.asgi` or
`uvicorn testproject.asgi:application` (the async views, e.g. `/aget`, run on the event loop)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

application = get_asgi_application()
