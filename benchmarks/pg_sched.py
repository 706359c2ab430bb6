"""Is PostgreSQL starved on this host under the benchmarks' load? With and without autogroup.

Usage: python -m benchmarks.pg_sched [--seconds 6] [--quick]

Why: on this 2-core VM the tiered engine over PostgreSQL served ``/`` (an L1 hit) at 0.88-0.93x
the plain engine's req/s in tiered runs 7-12, where over Redis the same code reached 0.91-1.06x.
Looking for the cause we found workers revalidating because the PostgreSQL listener's heartbeat
was stale. Every PostgreSQL backend calls setsid(), and with the kernel's autogroup scheduling
on, each session is a scheduling group of its own; under full load such a backend waited in the
run queue for 50-74 % of its wall time, the heartbeat went stale past LISTENER_TIMEOUT, and
workers saw the listener as down and revalidated reads against the (starved) database: correct,
but slower. (The likely cause of runs 7-12's gap, not a proven one: see the README, "Speed".)

For each setting (the host's, then autogroup off when root may switch it), this starts its own
Redis and PostgreSQL, the tiered PostgreSQL engine on two "hosts" (two gunicorn servers, one
sync worker and one listener each), loads ``/`` on both with wrk, and meanwhile measures:

- ``SELECT 1`` round trips on a connection of our own (every 20 ms) and the run-queue wait of
  its backend (``/proc/<pid>/schedstat``), beside Redis ``PING`` round trips;
- the listeners' heartbeat age in each segment (every 2 ms) and how often it was older than
  LISTENER_TIMEOUT;
- the workers' revalidations per 1,000 reads (``shmsession stats`` counts) and req/s.

Writes results/pg_sched.md (+ .json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import tiered
from benchmarks.common import (
    ROOT,
    autogroup_off,
    autogroup_state,
    log,
    machine_header,
    machine_info,
    md_table,
    write_results,
)

PING_EVERY = 0.02
HEARTBEAT_EVERY = 0.002


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max in milliseconds."""
    ordered = sorted(samples)
    return {
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "n": len(ordered),
    }


def ping_postgres(conninfo: str, seconds: float, out: dict[str, Any]) -> None:
    """SELECT 1 every PING_EVERY for ``seconds``; its backend's run-queue wait from /proc."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        schedstat = Path(f"/proc/{row[0]}/schedstat")
        ran0, waited0, _ = (int(x) for x in schedstat.read_text().split())
        samples: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            t0 = time.perf_counter()
            conn.execute("SELECT 1")
            samples.append(time.perf_counter() - t0)
            time.sleep(PING_EVERY)
        elapsed = time.monotonic() - started
        ran1, waited1, _ = (int(x) for x in schedstat.read_text().split())
    out["postgres_ping"] = percentiles(samples)
    out["backend_run_ms"] = (ran1 - ran0) / 1e6
    out["backend_runqueue_wait_ms"] = (waited1 - waited0) / 1e6
    out["backend_wall_ms"] = elapsed * 1000


def ping_redis(url: str, seconds: float, out: dict[str, Any]) -> None:
    import redis

    client = redis.Redis.from_url(url)
    samples: list[float] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            t0 = time.perf_counter()
            client.ping()
            samples.append(time.perf_counter() - t0)
            time.sleep(PING_EVERY)
    finally:
        client.close()
    out["redis_ping"] = percentiles(samples)


def heartbeat_ages(names: list[str], seconds: float) -> dict[str, Any]:
    """Each listener's heartbeat age, sampled every HEARTBEAT_EVERY, over both hosts."""
    from django_shmsession.table import SessionTable
    from django_shmsession.tiered import words

    tables = [SessionTable(name, None) for name in names]
    ages: list[float] = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            for table in tables:
                age = words.heartbeat_age(table)  # None: the listener stopped (or reconnects)
                ages.append(float("inf") if age is None else age)
            time.sleep(HEARTBEAT_EVERY)
    finally:
        for table in tables:
            table.close()
    found = percentiles(ages)
    found["over_timeout_pct"] = 100 * sum(age > words.LISTENER_TIMEOUT for age in ages) / len(ages)
    return found


def read_counts(names: list[str]) -> tuple[int, int]:
    """(reads, revalidations) summed over both hosts, as ``shmsession stats`` counts them."""
    from django_shmsession.table import SessionTable
    from django_shmsession.tiered import hoststats

    reads = revalidations = 0
    for name in names:
        table = SessionTable(name, None)
        try:
            totals = hoststats.collect(table)
        finally:
            table.close()
        hits, misses = totals["tiered_l1_hits"], totals["tiered_l1_misses"]
        revalidations += totals["tiered_revalidations"]
        reads += hits + misses + totals["tiered_revalidations"]
    return reads, revalidations


def one_setting(seconds: int) -> dict[str, Any]:
    """Servers of its own; one wrk load of ``/`` on both hosts with every probe running."""
    with tiered.l2_servers() as (redis_server, pg_server, names), contextlib.ExitStack() as stack:
        label_names, envs = tiered._e2e_envs("tiered-pg", redis_server.url, pg_server.settings)
        names.extend(label_names)
        tiered.migrate(envs[0])
        servers = tiered._servers(envs, 1, Path(redis_server.dir), "tiered-pg")
        ports = stack.enter_context(servers)
        time.sleep(1.5)  # listeners up
        cookie = tiered.login(ports[0])
        for port in ports:
            assert tiered.request(port, "/", cookie)[0] == 200
        time.sleep(tiered_publish_wait())
        reads0, revalidations0 = read_counts(names)
        return measure(
            names, ports, cookie, seconds, redis_server.url, pg_server, reads0, revalidations0
        )


def tiered_publish_wait() -> float:
    """Long enough for every worker to have published its counts once more."""
    from django_shmsession.tiered import hoststats

    return hoststats.PUBLISH_INTERVAL + 0.2


def measure(
    names: list[str],
    ports: list[int],
    cookie: str,
    seconds: int,
    redis_url: str,
    pg_server: Any,
    reads0: int,
    revalidations0: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    probe_seconds = seconds - 1.0
    procs = [tiered._wrk_async(port, "/", cookie, seconds, 4) for port in ports]
    time.sleep(0.5)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        probes = [
            pool.submit(ping_postgres, pg_server.conninfo("postgres"), probe_seconds, out),
            pool.submit(ping_redis, redis_url, probe_seconds, out),
        ]
        out["heartbeat_age"] = heartbeat_ages(names, probe_seconds)
        for probe in probes:
            probe.result(timeout=seconds + 30)  # a probe's exception is raised here
    out["req_per_s"] = sum(tiered._wrk_result(proc) for proc in procs)
    time.sleep(tiered_publish_wait())
    reads, revalidations = read_counts(names)
    reads, revalidations = reads - reads0, revalidations - revalidations0
    out["revalidations_per_1000_reads"] = 1000 * revalidations / max(1, reads)
    return out


def render(info: dict[str, str], data: dict[str, Any]) -> str:
    rows = []
    for setting, found in data["settings"].items():
        pg, rd, beat = found["postgres_ping"], found["redis_ping"], found["heartbeat_age"]
        wait = found["backend_runqueue_wait_ms"] / found["backend_wall_ms"] * 100
        rows.append(
            [
                setting,
                f"{found['req_per_s']:.0f}",
                f"{pg['p50_ms']:.2f} / {pg['p99_ms']:.1f} / {pg['max_ms']:.1f} ({pg['n']})",
                f"{wait:.0f} %",
                f"{rd['p50_ms']:.2f} / {rd['p99_ms']:.1f} / {rd['max_ms']:.1f}",
                f"{beat['p50_ms']:.0f} / {beat['p99_ms']:.0f} / {beat['max_ms']:.0f}",
                f"{beat['over_timeout_pct']:.1f} %",
                f"{found['revalidations_per_1000_reads']:.1f}",
            ]
        )
    table = md_table(
        [
            "autogroup",
            "`/` req/s (2 hosts)",
            "PostgreSQL SELECT 1 ms p50 / p99 / max (pings)",
            "probe's backend in the run queue (% of wall time)",
            "Redis PING ms p50 / p99 / max",
            "heartbeat age ms p50 / p99 / max",
            "heartbeat older than LISTENER_TIMEOUT",
            "revalidations per 1,000 reads",
        ],
        rows,
    )
    return "\n\n".join(
        [
            "# PostgreSQL scheduling under the benchmarks' load",
            machine_header(info),
            "The tiered engine over PostgreSQL on two hosts, `/` loaded by wrk on both "
            f"({data['seconds']} s per setting); see benchmarks/pg_sched.py for what each "
            "column measures. MAX_STALENESS is 2 s, so a listener that stays up costs about one "
            "revalidation per session per 2 s per host.",
            table,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 s per setting")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 3
    if args.seconds < 2:
        parser.error("--seconds must be at least 2 (the probes run for seconds - 1)")
    sys.path.insert(0, str(ROOT))
    info = machine_info()
    settings: dict[str, Any] = {}
    host = autogroup_state()
    log(f"autogroup {host} (the host's setting)")
    settings[host] = one_setting(args.seconds)
    with autogroup_off() as used:
        if used != host:
            log(f"autogroup {used}")
            settings[used] = one_setting(args.seconds)
    data = {"seconds": args.seconds, "settings": settings}
    path = write_results("pg_sched", render(info, data), {"machine": info, **data})
    log(f"results in {path}")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
