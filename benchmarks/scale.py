"""Scale benchmark: how table cost grows with live sessions, and what a big sweep does to readers.

Usage: python -m benchmarks.scale [--quick]

1. One 1 GiB segment filled step by step to 1k, 100k and 1M live 300-byte sessions; at each step,
   µs per load (get of a random live key) and update (replace of a random live key), median/p99.
   Random keys on purpose: a hot key would sit in the CPU cache and hide the table's growth.
2. Half of the 1M entries are given a short expiry; the table's clock is then moved past it and
   clear_expired() sweeps them, while a second process reads live keys in a loop, timing every
   call. The reader's longest wait is the longest time the sweep kept it out (the lock hold plus
   scheduling), shown next to the same reader's longest wait with no sweep running (the noise
   floor of this 2-core machine).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
import uuid
from typing import Any

from benchmarks.common import (
    fmt_us,
    log,
    machine_header,
    machine_info,
    md_table,
    summarize,
    write_results,
)

VALUE_BYTES = 300
SOON = 100.0  # seconds: the entries the sweep will find expired
LATER = 1e6
SWEEP_BATCH = 256  # the table's default clear_expired(batch_size)


class Clock:
    """A settable clock for the table: lets the benchmark expire half the table at once."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def new_key() -> str:
    return os.urandom(16).hex()


def fill(table: Any, keys: list[str], target: int, clock: Clock) -> float:
    """Add sessions until `target` live ones; every other one expires SOON. Returns sets/s."""
    value = os.urandom(VALUE_BYTES)
    start = time.perf_counter()
    added = 0
    while len(keys) < target:
        key = new_key()
        table.set(key, value, clock.now + ttl_of(len(keys)))
        keys.append(key)
        added += 1
    elapsed = time.perf_counter() - start
    return added / elapsed if elapsed > 0 else 0.0


def time_random(op: Any, keys: list[str], samples: int) -> dict[str, float]:
    """Per-call µs of op(index) over random live keys' indexes (median/p99)."""
    rnd = random.Random(len(keys))
    picks = [rnd.randrange(len(keys)) for _ in range(samples)]
    clock = time.perf_counter_ns
    out = []
    for index in picks:
        start = clock()
        op(index)
        out.append(clock() - start)
    return summarize(out).as_dict()


def ttl_of(index: int) -> float:
    """Every other entry expires SOON, so the sweep later finds exactly half expired."""
    return SOON if index % 2 else LATER


def measure_step(table: Any, keys: list[str], samples: int, clock: Clock) -> dict[str, Any]:
    value = os.urandom(VALUE_BYTES)
    misses = sum(table.get(k) is None for k in keys[: min(len(keys), 1000)])
    return {
        "live": len(keys),
        "load": time_random(lambda i: table.get(keys[i]), keys, samples),
        "update": time_random(
            lambda i: table.replace(keys[i], value, clock.now + ttl_of(i)), keys, samples
        ),
        "misses_in_first_1000": misses,
    }


def _reader(name: str, keys: list[str], stop: Any, out: Any, ready: Any) -> None:
    """Concurrent reader process: get() live keys until told to stop, timing every call."""
    from django_shmsession.table import SessionTable

    table = SessionTable(name)
    clock = time.perf_counter_ns
    lat: list[int] = []
    ready.set()
    i = 0
    while i % 64 or not stop.value:
        start = clock()
        table.get(keys[i % len(keys)])
        lat.append(clock() - start)
        i += 1
    table.close()
    lat.sort()
    out.put(
        {
            "calls": len(lat),
            "median_us": lat[len(lat) // 2] / 1000,
            "p999_us": lat[min(len(lat) - 1, int(len(lat) * 0.999))] / 1000,
            "max_us": lat[-1] / 1000,
        }
    )


def reader_during(name: str, live_keys: list[str], action: Any) -> tuple[Any, Any]:
    """Run action() while a reader process times its gets; returns (action result, reader stats).

    The reader stops only when action() has returned, so the whole of it is observed.
    """
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    ready = ctx.Event()
    stop = ctx.RawValue("b", 0)
    proc = ctx.Process(target=_reader, args=(name, live_keys[:1000], stop, out, ready))
    proc.start()
    ready.wait(30)
    time.sleep(0.05)
    try:
        result = action()
    finally:
        stop.value = 1
    stats = out.get(timeout=120)
    proc.join()
    return result, stats


def sweep(table: Any, name: str, keys: list[str], clock: Clock) -> dict[str, Any]:
    """clear_expired() over a table with every other entry expired, with a reader beside it."""
    live = keys[0::2]  # even positions got LATER
    idle_seconds = 2.0
    _, idle = reader_during(name, live, lambda: time.sleep(idle_seconds))
    clock.now += SOON * 10
    expected = len(keys) // 2

    def run() -> tuple[int, float]:
        start = time.perf_counter()
        removed = table.clear_expired()
        return removed, time.perf_counter() - start

    (removed, elapsed), during = reader_during(name, live, run)
    return {
        "entries_before": len(keys),
        "expected_expired": expected,
        "removed": removed,
        "seconds": elapsed,
        "us_per_removed": elapsed * 1e6 / max(removed, 1),
        # clear_expired()'s default batch is 256 entries scanned per lock hold.
        "batches": -(-len(keys) // SWEEP_BATCH),
        "ms_per_batch": elapsed * 1e3 / max(1, -(-len(keys) // SWEEP_BATCH)),
        "reader_idle": idle,
        "reader_during_sweep": during,
    }


def run(quick: bool) -> dict[str, Any]:
    from django_shmsession.exceptions import ShmSessionError
    from django_shmsession.table import SessionTable

    size = (64 if quick else 1024) * 1024 * 1024
    steps = (1_000, 10_000, 50_000) if quick else (1_000, 100_000, 1_000_000)
    samples = 2_000 if quick else 20_000
    name = f"/shmbench-scale-{uuid.uuid4().hex[:10]}"
    clock = Clock()
    log(f"scale: creating {size >> 20} MiB segment {name}")
    table = SessionTable(name, size, full_policy="raise", clock=clock)
    out: dict[str, Any] = {"segment_bytes": size, "steps": [], "error": ""}
    keys: list[str] = []
    try:
        out["capacity"] = {
            k: v
            for k, v in table.stats().as_dict().items()
            if k in ("entry_capacity", "chunk_size", "chunk_capacity")
        }
        for step in steps:
            log(f"scale: filling to {step:,} ...")
            rate = fill(table, keys, step, clock)
            row = measure_step(table, keys, samples, clock)
            row["fill_sets_per_s"] = rate
            row["stats"] = table.stats().as_dict()
            out["steps"].append(row)
        log(f"scale: sweeping {len(keys):,} entries, half expired ...")
        out["sweep"] = sweep(table, name, keys, clock)
        out["check_after"] = table.check().as_dict()
    except ShmSessionError as err:
        out["error"] = f"{type(err).__name__} at {len(keys):,} entries: {err}"
        log(f"scale: {out['error']}")
    finally:
        table.close()
        SessionTable.unlink_name(name)
    return out


def render(data: dict[str, Any], info: dict[str, str], quick: bool) -> str:
    rows = []
    for step in data["steps"]:
        load, update = step["load"], step["update"]
        rows.append(
            [
                f"{step['live']:,}",
                f"{fmt_us(load['median_us'])} / {fmt_us(load['p99_us'])}",
                f"{fmt_us(update['median_us'])} / {fmt_us(update['p99_us'])}",
                f"{step['fill_sets_per_s']:,.0f}",
                f"{step['stats'].get('chunks_used', 0):,}",
            ]
        )
    parts = [
        "# Scale: table cost vs live sessions, and a 1M-entry sweep"
        + (" (--quick smoke run: smaller sizes)" if quick else ""),
        "",
        machine_header(info),
        "",
        f"Segment {data['segment_bytes'] >> 20} MiB, capacity {data.get('capacity', {})}. "
        f"Values {VALUE_BYTES} B; load = get, update = replace, on random live keys; µs per call.",
        "",
        md_table(
            [
                "live sessions",
                "load µs median / p99",
                "update µs median / p99",
                "fill sets/s",
                "chunks used",
            ],
            rows,
        ),
    ]
    if data.get("error"):
        parts += ["", f"**Stopped early:** {data['error']}"]
    sweep_data = data.get("sweep")
    if sweep_data:
        idle, during = sweep_data["reader_idle"], sweep_data["reader_during_sweep"]
        parts += [
            "",
            "## clear_expired() on a table with half its entries expired",
            "",
            md_table(
                [
                    "entries",
                    "removed",
                    "sweep time",
                    "µs per removed entry",
                    "mean ms per 256-entry batch (one lock hold)",
                ],
                [
                    [
                        f"{sweep_data['entries_before']:,}",
                        f"{sweep_data['removed']:,} (expected {sweep_data['expected_expired']:,})",
                        f"{sweep_data['seconds']:.2f} s",
                        f"{sweep_data['us_per_removed']:.2f}",
                        f"{sweep_data['ms_per_batch']:.2f}",
                    ]
                ],
            ),
            "",
            "A second process calls get() on live keys in a loop and times every call:",
            "",
            md_table(
                ["reader", "calls", "median µs", "p99.9 µs", "longest wait µs"],
                [
                    [
                        "no sweep (noise floor)",
                        f"{idle['calls']:,}",
                        fmt_us(idle["median_us"]),
                        fmt_us(idle["p999_us"]),
                        fmt_us(idle["max_us"]),
                    ],
                    [
                        "during clear_expired()",
                        f"{during['calls']:,}",
                        fmt_us(during["median_us"]),
                        fmt_us(during["p999_us"]),
                        fmt_us(during["max_us"]),
                    ],
                ],
            ),
            "",
            f"check() after the sweep: {data.get('check_after', {})}",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, up to 50k")
    args = parser.parse_args(argv)
    info = machine_info()
    data = run(args.quick)
    markdown = render(data, info, args.quick)
    path = write_results("scale", markdown, {"machine": info, "scale": data})
    print(markdown)
    log(f"scale: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
