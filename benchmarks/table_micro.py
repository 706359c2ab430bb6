"""Raw SessionTable micro-benchmark (issue 3 "Fast"): µs per table call, no Django.

Usage: python -m benchmarks.table_micro [--quick]

Measures get (hit and miss), set (overwrite), add (new key), replace, delete and exists at 300 B
and 4 KB, median and p99, next to two floors that put them in scale: a bare POSIX semaphore
acquire+release (the lock every call pays) and a Python dict get/set of the same bytes (what a
per-process, unshared store costs). The engine's load/update in micro.py sit on top of these.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.common import (
    Stats,
    fmt_us,
    log,
    machine_header,
    machine_info,
    md_table,
    time_calls,
    time_prepared,
    write_results,
)

SIZES = {"300B": 300, "4KB": 4096}
SEGMENT_BYTES = 64 * 1024 * 1024
EXPIRES_IN = 3600.0


def key_stream() -> Iterator[str]:
    """Fresh 32-character keys, like Django's session keys (so hashing costs the same)."""
    while True:
        yield uuid.uuid4().hex


def bench_table(quick: bool) -> dict[str, dict[str, Stats]]:
    """Time every table call at each payload size on a private segment, unlinked afterwards."""
    from django_shmsession.table import SessionTable

    name = f"/shmbench-{uuid.uuid4().hex[:12]}"
    runs, seconds = (2000, 0.2) if quick else (20000, 1.0)
    table = SessionTable(name, SEGMENT_BYTES)
    keys = key_stream()
    out: dict[str, dict[str, Stats]] = {}
    try:
        for label, size in SIZES.items():
            value = os.urandom(size)
            expires = time.time() + EXPIRES_IN
            hot = next(keys)
            table.set(hot, value, expires)
            missing = next(keys)

            def fresh_set(value: bytes = value, expires: float = expires) -> str:
                key = next(keys)
                table.set(key, value, expires)
                return key

            def timed(fn: Callable[[], object]) -> Stats:
                return time_calls(fn, max_runs=runs, max_seconds=seconds)

            def prepared(prep: Callable[[], Any], fn: Callable[[Any], object]) -> Stats:
                return time_prepared(prep, fn, max_runs=runs, max_seconds=seconds)

            out[label] = {
                "get (hit)": timed(lambda hot=hot: table.get(hot)),
                "get (miss)": timed(lambda missing=missing: table.get(missing)),
                "exists": timed(lambda hot=hot: table.exists(hot)),
                "set (overwrite)": timed(
                    lambda hot=hot, value=value, expires=expires: table.set(hot, value, expires)
                ),
                "add (new key)": prepared(
                    lambda: next(keys),
                    lambda k, value=value, expires=expires: table.add(k, value, expires),
                ),
                "replace": timed(
                    lambda hot=hot, value=value, expires=expires: table.replace(hot, value, expires)
                ),
                "delete": prepared(fresh_set, table.delete),
            }
            table.clear()
        return out
    finally:
        table.close()
        SessionTable.unlink_name(name)


def bench_floors(quick: bool) -> dict[str, Stats]:
    """The floors: semaphore acquire+release and a dict, per payload size for the dict."""
    import posix_ipc

    runs, seconds = (2000, 0.2) if quick else (20000, 1.0)
    sem_name = f"/shmbench-sem-{uuid.uuid4().hex[:12]}"
    sem = posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, 0o600, 1)
    try:

        def acquire_release() -> None:
            sem.acquire()
            sem.release()

        floors = {
            "semaphore acquire+release": time_calls(
                acquire_release, max_runs=runs, max_seconds=seconds
            )
        }
    finally:
        sem.unlink()
        sem.close()
    for label, size in SIZES.items():
        store: dict[str, bytes] = {}
        value = os.urandom(size)
        key = uuid.uuid4().hex
        store[key] = value
        floors[f"dict get {label}"] = time_calls(
            lambda key=key, store=store: store.get(key), max_runs=runs, max_seconds=seconds
        )
        floors[f"dict set {label} (bytes copy)"] = time_calls(
            lambda key=key, value=value, store=store: store.__setitem__(
                key, bytes(bytearray(value))
            ),
            max_runs=runs,
            max_seconds=seconds,
        )
    floors["perf_counter_ns pair (timer overhead)"] = time_calls(
        lambda: None, max_runs=runs, max_seconds=seconds
    )
    return floors


def render(
    table: dict[str, dict[str, Stats]], floors: dict[str, Stats], info: dict[str, str]
) -> str:
    ops = list(table["300B"])
    rows = []
    for op in ops:
        cells = []
        for label in SIZES:
            s = table[label][op]
            cells.append(f"{fmt_us(s.median_us)} / {fmt_us(s.p99_us)}")
        rows.append([op, *cells])
    floor_rows = [
        [name, f"{fmt_us(s.median_us)} / {fmt_us(s.p99_us)}"] for name, s in floors.items()
    ]
    return "\n".join(
        [
            "# SessionTable micro-benchmark (one process, no Django)",
            "",
            machine_header(info),
            "",
            "µs per call, median / p99, measured call by call with perf_counter_ns "
            "(the timer's own cost is the last floor row). Segment: 64 MiB, 32-char keys.",
            "",
            md_table(["operation", *[f"{label} median / p99" for label in SIZES]], rows),
            "",
            "## Floors, for scale",
            "",
            md_table(["floor", "µs median / p99"], floor_rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples")
    args = parser.parse_args(argv)
    info = machine_info()
    log("table_micro: table ops ...")
    table = bench_table(args.quick)
    log("table_micro: floors ...")
    floors = bench_floors(args.quick)
    markdown = render(table, floors, info)
    data = {
        "machine": info,
        "table": {size: {op: s.as_dict() for op, s in ops.items()} for size, ops in table.items()},
        "floors": {name: s.as_dict() for name, s in floors.items()},
    }
    path = write_results("table_micro", markdown, data)
    print(markdown)
    log(f"table_micro: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
