"""Helpers shared by every benchmark: the environment setup.sh wrote, statistics, machine facts.

Why one module: every result file must carry the same machine/version header and the same
statistics (median and p99 over per-operation timings), so that tables from different scripts
can be compared side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"
RESULTS = BENCH_DIR / "results"


def read_env() -> dict[str, str]:
    """Ports and paths written by setup.sh; empty if setup has not run (backends then 'missing')."""
    env: dict[str, str] = {}
    path = WORK / "env"
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                env[key.strip()] = value.strip()
    return env


@dataclass
class Stats:
    """Per-operation timings summarised; µs because session operations live in that range."""

    n: int
    median_us: float
    p99_us: float
    mean_us: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples_ns: Sequence[int]) -> Stats:
    """Median and p99 of per-call samples (nanoseconds in, microseconds out)."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    p99 = ordered[min(n - 1, int(n * 0.99))]
    return Stats(
        n=n,
        median_us=statistics.median(ordered) / 1000,
        p99_us=p99 / 1000,
        mean_us=statistics.fmean(ordered) / 1000,
    )


def time_calls(
    fn: Callable[[], object],
    *,
    max_runs: int,
    max_seconds: float,
    min_runs: int = 20,
    warmup: int = 20,
) -> Stats:
    """Time fn() call by call: up to max_runs calls or max_seconds, whichever comes first.

    A time budget as well as a count, so a 1.5 ms SQLite write and a 2 µs dict lookup both get
    enough samples for a p99 without the slow backends taking minutes.
    """
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    samples: list[int] = []
    deadline = clock() + int(max_seconds * 1e9)
    while len(samples) < max_runs:
        start = clock()
        fn()
        end = clock()
        samples.append(end - start)
        if end > deadline and len(samples) >= min_runs:
            break
    return summarize(samples)


def time_prepared(
    prepare: Callable[[], object],
    fn: Callable[[object], object],
    *,
    max_runs: int,
    max_seconds: float,
    min_runs: int = 20,
) -> Stats:
    """Like time_calls, but fn(prepare()) where only fn is timed (e.g. delete needs a new key)."""
    clock = time.perf_counter_ns
    samples: list[int] = []
    deadline = clock() + int(max_seconds * 1e9)
    while len(samples) < max_runs:
        arg = prepare()
        start = clock()
        fn(arg)
        end = clock()
        samples.append(end - start)
        if end > deadline and len(samples) >= min_runs:
            break
    return summarize(samples)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    for attr in ("__version__", "VERSION"):
        value = getattr(mod, attr, None)
        if value is not None:
            return ".".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()
    except OSError:
        return ""


def _git_head() -> str:
    """The commit measured, flagged when the package differs from it (the editable install
    measures the working tree, which teammates may be changing)."""
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "django_shmsession"):
        head += " + uncommitted changes in django_shmsession/"
    return head


def machine_info() -> dict[str, str]:
    """What the numbers were measured on: without this a committed result is meaningless."""
    load = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "loadavg_at_start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "kernel": platform.release(),
        "sched_autogroup": autogroup_state(),
        "python": platform.python_version() + f" ({platform.python_implementation()})",
        "django": _version("django"),
        "posix_ipc": _version("posix_ipc"),
        "django_shmsession": _version("django_shmsession"),
        "git_head": _git_head(),
    }


#: The kernel's autogroup switch: each session (setsid) is a scheduling group of its own.
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


def autogroup_state() -> str:
    """Return "on", "off" or "absent" (a kernel without autogroup scheduling)."""
    try:
        return "on" if AUTOGROUP.read_text().strip() == "1" else "off"
    except OSError:
        return "absent"


@contextlib.contextmanager
def autogroup_off(keep: bool = False) -> Iterator[str]:
    """Turn the kernel's autogroup scheduling off for the block (as root), then restore it.

    Why: every PostgreSQL backend calls setsid(), so with autogroup on each backend is a
    scheduling group of its own, and on this 2-core VM (kernel 6.18) under the benchmarks'
    load such a backend starved: in results/pg_sched*.md a connection pinging SELECT 1 every
    20 ms spent 50-74 % of its wall time waiting in the run queue (``/proc/<pid>/schedstat``)
    and its answers took up to 0.5-1.6 s, while Redis answered within 8.2 ms; with autogroup
    off the same pings took at most 6.8-10.6 ms. That is the kernel's doing, not the engines'.
    ``keep=True`` (``--keep-autogroup``) measures the host as it is. Yields what the run used:
    "off", "on" or "absent" ("on" when turning it off was not allowed: not root).

    SIGTERM and SIGHUP raise SystemExit while it is off, so a killed run restores it too;
    only SIGKILL leaves it off (``echo 1 > /proc/sys/kernel/sched_autogroup_enabled``).
    """
    before = autogroup_state()
    if keep or before != "on":
        yield before
        return
    try:
        AUTOGROUP.write_text("0")
    except OSError:
        yield before
        return
    handlers = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield "off"
    finally:
        AUTOGROUP.write_text("1")
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def add_autogroup_flag(parser: argparse.ArgumentParser) -> None:
    """``--keep-autogroup``, for the benchmarks that run :func:`autogroup_off` around them."""
    parser.add_argument(
        "--keep-autogroup",
        action="store_true",
        help="leave the kernel's autogroup scheduling as it is (default: off for the run)",
    )


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def machine_header(info: dict[str, str]) -> str:
    """The machine block every results/*.md file starts with."""
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    load = os.getloadavg()  # with loadavg_at_start: how busy the shared machine was meanwhile
    lines.append(f"| loadavg_at_end | {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} |")
    return "\n".join(lines)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are formatted by the caller."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_us(value: float | None) -> str:
    """Three significant figures, enough for noisy shared machines."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def write_results(stem: str, markdown: str, data: dict[str, Any]) -> Path:
    """Write results/<stem>.md and .json; returns the markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md_path = RESULTS / f"{stem}.md"
    md_path.write_text(markdown.rstrip() + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return md_path


def log(message: str) -> None:
    """Progress on stderr, so stdout stays clean for JSON between parent and child processes."""
    print(message, file=sys.stderr, flush=True)
