"""The support matrix is stated in four places that must agree: the classifiers, tox's env_list,
CI's tox subset and the README's support line (Django 6.1 is the current release)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CURRENT_DJANGO = "6.1"
#: Each supported Django and the Pythons it runs on (6.x needs 3.12+).
MATRIX = {
    "4.2": ("3.10", "3.11", "3.12"),
    "5.2": ("3.10", "3.11", "3.12", "3.13"),
    "6.0": ("3.12", "3.13"),
    "6.1": ("3.12", "3.13"),
}


def _tox_envs() -> set[str]:
    text = (REPO / "tox.ini").read_text()
    env_list = text.split("env_list =", 1)[1].split("\n[", 1)[0].split("#", 1)[0]
    envs = set()
    for line in env_list.split():
        match = re.fullmatch(r"py\{([\d,]+)\}-django(\d+)", line)
        if match:
            envs |= {f"py{py}-django{match[2]}" for py in match[1].split(",")}
        else:
            envs.add(line)
    return envs


def test_classifiers_name_every_supported_django() -> None:
    text = (REPO / "pyproject.toml").read_text()
    found = set(re.findall(r'"Framework :: Django :: (\d+\.\d+)"', text))
    assert found == set(MATRIX)


def test_tox_runs_every_supported_pair() -> None:
    wanted = {
        f"py{py.replace('.', '')}-django{dj.replace('.', '')}"
        for dj, pys in MATRIX.items()
        for py in pys
    }
    assert wanted <= _tox_envs()
    deps = (REPO / "tox.ini").read_text()
    assert "django61: Django>=6.1,<6.2" in deps


def test_ci_subset_runs_the_current_django_and_every_python() -> None:
    text = (REPO / ".ci" / "run").read_text()
    envs = re.search(r"CI_TOX_ENVS=\$\{CI_TOX_ENVS:-([^}]+)\}", text)
    assert envs
    chosen = envs[1].split(",")
    assert f"py313-django{CURRENT_DJANGO.replace('.', '')}" in chosen
    assert set(chosen) <= _tox_envs()
    # 3.11 and Django 5.2 run in CI's first step (scripts/test); the subset covers the rest.
    assert {env.split("-")[0] for env in chosen} == {"py310", "py312", "py313"}


def test_readme_support_line() -> None:
    readme = (REPO / "README.md").read_text()
    line = readme.split("\nSupported:", 1)[1].split("\n\n", 1)[0]
    for version in MATRIX:
        assert version in line
    assert "end of support" in line
