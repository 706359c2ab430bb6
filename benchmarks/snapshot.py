"""Dump and restore of a full table: time, longest lock hold, what requests waited meanwhile.

Usage: python -m benchmarks.snapshot [--quick] [--sessions N] [--size 1G]

Issue 12's figure: "dump and restore of 1M sessions (1 GiB), time and longest lock hold". One
run:

1. creates a private segment of ``--size`` (default 1 GiB) and fills it with ``--sessions``
   (default 1,000,000) sessions whose values cycle through 50, 300 (5 times), 700 (3 times) and
   1500 bytes (mean 515 B, 1.5 chunks of 512 B each, so 1M fit a 1 GiB table), with
   expiries spread over a day (the fill is timed but is not a figure of the issue);
2. starts a *prober* subprocess that does ``get`` of random live keys without pause and records
   each call's latency (``perf_counter_ns``): what a request waits while the lock is held in
   batches by someone else;
3. dumps the table to a file on disk in a fresh subprocess (``--dump``; ``snapshot_ops.dump``,
   which fsyncs the file and its directory), which reports the result (time, bytes, longest
   scan batch) and its peak private memory (``RssAnon`` sampled every 20 ms: the heap it built,
   without the shared pages of the segment and the file it mapped);
4. restores the file into a second, new segment of the same size in a fresh subprocess
   (``--restore``; ``snapshot_ops.restore``, 64 ``add``s per ``table.batch``), with a prober on the
   target table, and checks that every session arrived;
5. writes results/snapshot.md and .json.

The longest lock hold is measured by the dumper/restorer around each batch (the scan call, or
the ``table.batch(...)`` call: an upper bound of the hold, since it includes the Python work
around the lock); the prober's maximum is the longest any request actually waited.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from benchmarks.common import log, machine_header, machine_info, md_table, write_results

VALUE_SIZES = (50, 300, 300, 300, 300, 300, 700, 700, 700, 1500)
DAY = 86400.0
MAX_SAMPLES = 4_000_000


def unique_name(tag: str) -> str:
    return f"/bench-snap-{tag}-{os.getpid()}"


def key_of(i: int) -> str:
    return f"{i:032x}"


def fill(name: str, size: int, sessions: int) -> float:
    from django_shmsession.table import SessionTable

    rng = random.Random(1)
    values = {n: rng.randbytes(n) for n in VALUE_SIZES}
    now = time.time()
    start = time.perf_counter()

    def add_range(table: SessionTable, start: int, stop: int) -> None:
        for i in range(start, stop):
            value = values[VALUE_SIZES[i % len(VALUE_SIZES)]]
            table.add(key_of(i), value, now + DAY * (0.1 + 0.9 * rng.random()), i % 4)

    with SessionTable(name, size) as table:
        for done in range(0, sessions, 256):
            table.batch(add_range, table, done, min(done + 256, sessions))
        stats = table.stats()
    if stats.entries != sessions:
        raise SystemExit(f"fill: {stats.entries} of {sessions} sessions fit; raise --size")
    return time.perf_counter() - start


# -- subprocesses ---------------------------------------------------------------------------------


def probe(name: str, sessions: int, stop_file: str) -> None:
    """Get random keys until ``stop_file`` exists; print the latency summary as JSON."""
    from django_shmsession.table import SessionTable

    samples = array("q")
    rng = random.Random(os.getpid())
    longest = count = over_1ms = over_10ms = 0
    clock = time.perf_counter_ns
    with SessionTable(name) as table:
        while True:
            for _ in range(2000):
                key = key_of(rng.randrange(sessions))
                before = clock()
                table.get(key)
                took = clock() - before
                count += 1
                longest = max(longest, took)
                over_1ms += took > 1_000_000
                over_10ms += took > 10_000_000
                if len(samples) < MAX_SAMPLES:
                    samples.append(took)
            if os.path.exists(stop_file):
                break
    ordered = sorted(samples)
    print(
        json.dumps(
            {
                "gets": count,
                "median_us": ordered[len(ordered) // 2] / 1000 if ordered else None,
                "p99_us": ordered[int(len(ordered) * 0.99)] / 1000 if ordered else None,
                "p999_us": ordered[int(len(ordered) * 0.999)] / 1000 if ordered else None,
                "max_ms": longest / 1e6,
                "over_1ms": over_1ms,
                "over_10ms": over_10ms,
            }
        )
    )


def dump_child(name: str, path: str) -> None:
    from django_shmsession import snapshot_ops
    from django_shmsession.table import SessionTable

    memory = PrivatePeak()
    with SessionTable(name) as table:
        result = snapshot_ops.dump(table, path)
    print(json.dumps({**result.as_dict(), "private_mib": memory.stop()}))


def restore_child(name: str, size: int, path: str) -> None:
    from django_shmsession import snapshot_ops
    from django_shmsession.table import SessionTable

    memory = PrivatePeak()
    with SessionTable(name) as table:  # created by the parent (the prober needs it first)
        assert table.size == size
        result = snapshot_ops.restore(table, path)
        entries = table.stats().entries
    data = result.as_dict()
    data.pop("damage")
    print(json.dumps({**data, "entries": entries, "private_mib": memory.stop()}))


class PrivatePeak:
    """The highest ``RssAnon`` (this process's own memory, without the shared pages of the
    mapped segment and snapshot file, which ``ru_maxrss`` would count) seen by a thread that
    samples it every 20 ms while the work runs."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now_mib() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now_mib())
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now_mib())


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.snapshot", *args]


def run_with_prober(name: str, sessions: int, work: list[str]) -> tuple[dict[str, Any], Any]:
    """Run ``work`` (a subprocess printing JSON) while a prober gets keys from ``name``."""
    with tempfile.TemporaryDirectory() as scratch:
        stop = os.path.join(scratch, "stop")
        prober = subprocess.Popen(
            _python("--probe", name, str(sessions), stop), stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.0)  # the prober's baseline before the work starts
        done = subprocess.run(work, stdout=subprocess.PIPE, text=True, check=True)
        time.sleep(0.5)
        Path(stop).touch()
        out, _ = prober.communicate(timeout=120)
    return json.loads(done.stdout), json.loads(out)


# -- report ---------------------------------------------------------------------------------------


def report(info: dict[str, str], data: dict[str, Any]) -> str:
    from django_shmsession.snapshot_ops import BATCH, RESTORE_BATCH

    dump, restore = data["dump"], data["restore"]
    rows = [
        (
            "dump",
            f"{dump['duration']:.2f}",
            f"{dump['bytes'] / 2**20:,.0f}",
            f"{1000 * dump['median_hold']:.2f}",
            f"{1000 * dump['longest_hold']:.2f}",
            f"{data['dump_probe']['max_ms']:.2f}",
            f"{data['dump_probe']['p99_us']:.1f}",
            f"{dump['private_mib']:,.0f}",
        ),
        (
            "restore",
            f"{restore['duration']:.2f}",
            f"{restore['bytes'] / 2**20:,.0f}",
            f"{1000 * restore['median_hold']:.2f}",
            f"{1000 * restore['longest_hold']:.2f}",
            f"{data['restore_probe']['max_ms']:.2f}",
            f"{data['restore_probe']['p99_us']:.1f}",
            f"{restore['private_mib']:,.0f}",
        ),
    ]
    table = md_table(
        (
            "",
            "time (s)",
            "file (MiB)",
            "median batch (ms)",
            "longest batch (ms)",
            "longest get meanwhile (ms)",
            "get p99 meanwhile (µs)",
            "private memory (MiB)",
        ),
        rows,
    )
    return f"""# Snapshot dump and restore

{machine_header(info)}

{data["sessions"]:,} sessions (values {", ".join(map(str, VALUE_SIZES))} B in turn, mean
{sum(VALUE_SIZES) / len(VALUE_SIZES):.0f} B) in a {data["size"] / 2**30:g} GiB segment, filled in
{data["fill_seconds"]:.1f} s. Dump to a file on disk (fsynced), then restore into a new segment of
the same size; {restore["restored"]:,} of {restore["records"]:,} sessions restored,
{restore["entries"]:,} in the table afterwards. A prober process did `get` of random keys
without pause during each phase (dump: on the source table, restore: on the target). One run;
method in the docstring of `benchmarks/snapshot.py`.

{table}

- *median / longest batch*: a scan call of {BATCH} entries (dump) or a `table.batch(...)` call of
  {RESTORE_BATCH} adds (restore), timed by the dumper/restorer: an upper bound of one lock hold
  (the longest includes the holder being descheduled on this shared 2-core machine).
- *private memory*: the peak `RssAnon` of the dumping / restoring process, sampled every 20 ms
  (the mapped segment and snapshot file are shared pages and not counted).
- *longest get meanwhile*: the slowest of the prober's {data["dump_probe"]["gets"]:,} (dump) /
  {data["restore_probe"]["gets"]:,} (restore) gets: what a request waited at worst.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k sessions in 128 MiB")
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--size", type=int, help="segment bytes")
    parser.add_argument("--probe", nargs=3, metavar=("NAME", "SESSIONS", "STOP"))
    parser.add_argument("--dump", nargs=2, metavar=("NAME", "PATH"))
    parser.add_argument("--restore", nargs=3, metavar=("NAME", "SIZE", "PATH"))
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe[0], int(args.probe[1]), args.probe[2])
    if args.dump:
        return dump_child(*args.dump)
    if args.restore:
        return restore_child(args.restore[0], int(args.restore[1]), args.restore[2])
    sessions = args.sessions or (100_000 if args.quick else 1_000_000)
    size = args.size or ((128 << 20) if args.quick else (1 << 30))
    run(sessions, size, "snapshot")


def run(sessions: int, size: int, stem: str) -> None:
    from django_shmsession.table import SessionTable

    info = machine_info()
    source, target = unique_name("src"), unique_name("dst")
    work = Path(__file__).resolve().parent / ".work"
    work.mkdir(exist_ok=True)
    path = str(work / f"bench-{os.getpid()}.snap")
    try:
        log(f"fill: {sessions:,} sessions into {size / 2**20:,.0f} MiB")
        fill_seconds = fill(source, size, sessions)
        log(f"dump ({fill_seconds:.1f} s fill)")
        dump, dump_probe = run_with_prober(source, sessions, _python("--dump", source, path))
        SessionTable.unlink_name(source)  # free its memory before the target is created
        SessionTable(target, size).close()
        log(f"restore ({dump['duration']:.1f} s dump)")
        restore, restore_probe = run_with_prober(
            target, sessions, _python("--restore", target, str(size), path)
        )
        if restore["entries"] != sessions:
            raise SystemExit(f"restore: {restore['entries']} of {sessions} sessions arrived")
    finally:
        SessionTable.unlink_name(source)
        SessionTable.unlink_name(target)
        for leftover in (path, path + ".state.json"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    data = {
        "sessions": sessions,
        "size": size,
        "fill_seconds": fill_seconds,
        "dump": dump,
        "dump_probe": dump_probe,
        "restore": restore,
        "restore_probe": restore_probe,
        "machine": info,
    }
    log(f"-> {write_results(stem, report(info, data), data)}")


if __name__ == "__main__":
    main()
