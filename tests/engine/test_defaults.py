"""Defaults that must not trip a new user: the default SIZE in Docker's default /dev/shm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from django_shmsession import conf

REPO = Path(__file__).resolve().parents[2]
#: Docker's default /dev/shm for a container (when --shm-size is not given).
DOCKER_SHM = 64 * 1024 * 1024

# Run in a mount namespace with a private 64 MiB tmpfs on /dev/shm: the serving path
# (store.get_table, which creates) with SHMSESSION naming NAME only, so SIZE is the default.
_CHILD = """
import json, os, django
from django.conf import settings
settings.configure(
    SECRET_KEY="x", INSTALLED_APPS=["django_shmsession"],
    SESSION_ENGINE="django_shmsession.backend", SHMSESSION={"NAME": "/docker-default"},
)
django.setup()
from django_shmsession import store
table = store.get_table()
table.set("k", b"v", 2e9)
free = os.statvfs("/dev/shm")
print(json.dumps([table.size, sorted(os.listdir("/dev/shm")), free.f_bavail * free.f_frsize]))
"""


@pytest.mark.multiprocess
def test_default_size_fits_dockers_default_dev_shm() -> None:
    """The default table, its semaphore and its creation's temporary semaphore fit 64 MiB."""
    if os.geteuid() != 0:  # pragma: no cover - CI and the dev machines run as root
        pytest.fail("this test mounts a tmpfs in a mount namespace and needs root")
    mount = f"mount -t tmpfs -o size={DOCKER_SHM},mode=1777 tmpfs /dev/shm"
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} && exec "$@"']
    result = subprocess.run(
        [*prefix, "sh", sys.executable, "-c", _CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    size, files, free = json.loads(result.stdout)
    assert size == conf.DEFAULT_SIZE
    assert "docker-default" in files
    assert "sem.docker-default.lock" in files
    # Room is left for the other users of /dev/shm in the container.
    assert free >= 8 * 1024 * 1024
