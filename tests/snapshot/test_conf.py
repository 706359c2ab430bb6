"""SHMSESSION["SNAPSHOT"]: parsed with the rest of the settings, lazily; one test per bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_shmsession import conf
from django_shmsession.conf import SnapshotConfig, load_config


def test_absent_means_off() -> None:
    assert load_config({"NAME": "/x"}).snapshot is None
    assert load_config({"NAME": "/x", "SNAPSHOT": None}).snapshot is None


def test_path_and_default_interval() -> None:
    config = load_config({"NAME": "/x", "SNAPSHOT": {"PATH": "/var/lib/site/s.snap"}})
    assert config.snapshot == SnapshotConfig(path="/var/lib/site/s.snap", interval=60.0)


@pytest.mark.parametrize(
    ("interval", "expected"), [(0, 0.0), (1, 1.0), (2.5, 2.5), (86400, 86400.0)]
)
def test_interval(interval: float, expected: float) -> None:
    config = load_config({"NAME": "/x", "SNAPSHOT": {"PATH": "/s", "INTERVAL": interval}})
    assert config.snapshot is not None
    assert config.snapshot.interval == expected


def test_path_object_and_normalisation() -> None:
    config = load_config({"NAME": "/x", "SNAPSHOT": {"PATH": Path("/var/lib//site/./s.snap")}})
    assert config.snapshot is not None
    assert config.snapshot.path == "/var/lib/site/s.snap"


@pytest.mark.parametrize(
    ("snapshot", "message"),
    [
        ("/var/lib/s.snap", r"SNAPSHOT'\] must be a dict"),
        ({"PATH": "/s", "INTERVALL": 5}, r"Unknown SHMSESSION\['SNAPSHOT'\] key\(s\): INTERVALL"),
        ({}, r"'PATH'\] = None is not the absolute path"),
        ({"PATH": "relative.snap"}, r"is not the absolute path of a file"),
        ({"PATH": "/var/lib/"}, r"is not the absolute path of a file"),
        ({"PATH": 5}, r"is not the absolute path of a file"),
        ({"PATH": "/s", "INTERVAL": 0.5}, r"'INTERVAL'\] = 0.5 is not an interval"),
        ({"PATH": "/s", "INTERVAL": -1}, r"is not an interval"),
        ({"PATH": "/s", "INTERVAL": 86401}, r"is not an interval"),
        ({"PATH": "/s", "INTERVAL": "60"}, r"is not an interval"),
        ({"PATH": "/s", "INTERVAL": True}, r"is not an interval"),
    ],
)
def test_bad_snapshot(snapshot: object, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        load_config({"NAME": "/x", "SNAPSHOT": snapshot})


def test_read_lazily_with_the_rest(settings: Any) -> None:
    settings.SHMSESSION = {"NAME": "/x", "SNAPSHOT": {"PATH": "nope"}}  # no error yet
    with pytest.raises(ImproperlyConfigured, match="absolute path"):
        conf.get_config()
    settings.SHMSESSION = {"NAME": "/x", "SNAPSHOT": {"PATH": "/ok.snap", "INTERVAL": 5}}
    assert conf.get_config().snapshot == SnapshotConfig("/ok.snap", 5.0)
