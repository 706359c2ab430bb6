"""The tiered engine against the plain engine and Django's cache/cached_db, side by side.

Usage: python -m benchmarks.tiered [--quick]

Starts its own redis-server and PostgreSQL (tests/tiered/l2servers.py: 127.0.0.1, free ports,
temp dirs), then measures, in one run:

1. micro: µs per load of an existing session (a fresh SessionStore each time, as per request)
   and per update (load, change, save), in a subprocess per engine: plain, tiered on Redis and
   on PostgreSQL (listener up, so the load is an L1 hit), cache on Redis, cached_db on Redis +
   PostgreSQL. Target: tiered L1-hit load within 1.3x of the plain engine's load, as the
   median over 5 rounds of the ratio to a plain run made just before (see MICRO_ORDER).
2. e2e with wrk (sync gunicorn workers): `/`, `/incr` and `/ping`, every engine as two servers
   of 1 worker with one wrk each at once (-t1 -c4) and the req/s added up, all on one
   session: for tiered, two hosts (two tables, two listeners, one L2: each write invalidates
   the other host's copy), and again on one host ("1 host": one table, one listener); for the
   others one host (both servers on one table or store). All the servers are up at once and
   each round runs every engine in turn (median over the rounds; each engine on its own
   PostgreSQL database, see ``own_database``), so noise from the rest of
   the machine hits every engine of a round; each ratio is the median of the per-round
   ratios (see ``paired``), with the ratio of the medians beside it. Targets: tiered `/` >=
   90 % of the plain engine's; tiered `/incr` >= 1.5x cached_db's (same Redis and PostgreSQL).
3. invalidation latency: host B's listener in its own process (`manage.py shmsession listen`),
   B's table holding a copy; the session is deleted through host A's engine and B's table is
   polled until the copy is gone: time from A's delete returning to B dropping the copy
   (p50/p99/max over N logouts), per L2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    add_autogroup_flag,
    autogroup_off,
    fmt_ratio,
    log,
    machine_header,
    machine_info,
    md_table,
    write_results,
)
from benchmarks.e2e import gunicorn, request

PROJECT = ROOT / "testproject"

MICRO = r"""
import json, os, sys, time, threading
import django
django.setup()
from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.utils.module_loading import import_string
store_cls = import_string(settings.SESSION_ENGINE + ".SessionStore")
stop = None
if settings.SESSION_ENGINE == "django_shmsession.tiered":
    from django_shmsession import store
    from django_shmsession.tiered import words
    from django_shmsession.tiered.listener import Listener
    stop = threading.Event()
    threading.Thread(target=Listener(stop).run, daemon=True).start()
    while not words.listener_up(store.get_table()):
        time.sleep(0.01)
n = int(sys.argv[1])
s = store_cls(); s["_auth_user_id"] = "1"; s["data"] = "x" * 250; s.save()
key = s.session_key
def load():
    t = time.perf_counter_ns(); store_cls(key).load(); return time.perf_counter_ns() - t
def update():
    t = time.perf_counter_ns(); x = store_cls(key); x["n"] = x.get("n", 0) + 1; x.save()
    return time.perf_counter_ns() - t
out = {}
for name, op in (("load", load), ("update", update), ("load", load)):
    for _ in range(min(200, n)):
        op()
    samples = [op() for _ in range(n)]
    out[name] = sorted(samples)[len(samples) // 2] / 1000
store_cls(key).delete()
if stop is not None:
    stop.set()
print(json.dumps(out))
"""

LATENCY = r"""
import json, sys, time
import django
django.setup()
from django_shmsession.table import SessionTable
from django_shmsession.tiered import codec
from django_shmsession.tiered.engine import SessionStore
b_name, n = sys.argv[1], int(sys.argv[2])
b = SessionTable(b_name, None)
samples = []
for _ in range(n):
    s = SessionStore(); s["_auth_user_id"] = "1"; s.save()
    key = s.session_key
    # Host B holds a copy of this version (as its worker would after a read).
    from django_shmsession.tiered.runtime import get_l2
    record = get_l2().fetch(key)
    b.set(key, codec.encode(record.version, time.time(), record.expires_at, record.payload),
          record.expires_at)
    time.sleep(0.002)
    s.delete()  # the logout on host A: L2 first
    t0 = time.perf_counter()
    while b.get(key) is not None:
        if time.perf_counter() - t0 > 5:
            break
    samples.append((time.perf_counter() - t0) * 1000)
b.close()
print(json.dumps(samples))
"""


def engine_env(kind: str, redis_url: str, pg: dict[str, Any], name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(PROJECT)]),
        DJANGO_SETTINGS_MODULE="benchmarks.tiered_settings",
        SHMSESSION_NAME=name,
        SHMSESSION_SIZE="64M",
        TIERED_BENCH_CACHE=redis_url,
        TESTPROJECT_DATABASE=json.dumps(pg),
    )
    prefix = f"b{uuid.uuid4().hex[:8]}:"
    if kind == "plain":
        env["SESSION_ENGINE"] = "django_shmsession.backend"
    elif kind == "tiered-redis":
        env["SESSION_ENGINE"] = "django_shmsession.tiered"
        env["SHMSESSION_L2"] = json.dumps(
            {"BACKEND": "redis", "LOCATION": redis_url, "KEY_PREFIX": prefix}
        )
    elif kind == "tiered-pg":
        env["SESSION_ENGINE"] = "django_shmsession.tiered"
        env["SHMSESSION_L2"] = json.dumps({"BACKEND": "db", "CHANNEL": "b" + prefix[1:-1]})
    elif kind == "cache-redis":
        env["SESSION_ENGINE"] = "django.contrib.sessions.backends.cache"
    elif kind == "cached_db":
        env["SESSION_ENGINE"] = "django.contrib.sessions.backends.cached_db"
    return env


def python(env: dict[str, str], code: str, *args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1]


def migrate(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, str(PROJECT / "manage.py"), "migrate", "--verbosity", "0"],
        env=env,
        cwd=ROOT,
        check=True,
    )


def unlink(name: str) -> None:
    from django_shmsession.table import SessionTable

    SessionTable.unlink_name(name)


def _unlink_lock(name: str) -> None:
    from django_shmsession.tiered.listener import lock_path

    lock_path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def l2_servers() -> Iterator[tuple[Any, Any, list[str]]]:
    """A Redis and a PostgreSQL of their own, and a list for the segment names used on them.

    Yields (redis_server, pg_server, names). On the way out every segment in ``names`` and its
    listener lock are removed and both servers are stopped, Redis also when PostgreSQL fails
    to start.
    """
    from tests.tiered.l2servers import PostgresServer, RedisServer

    redis_server = RedisServer().start()
    names: list[str] = []
    try:
        pg_server = PostgresServer().start()
        try:
            yield redis_server, pg_server, names
        finally:
            for name in names:
                unlink(name)
                _unlink_lock(name)
            pg_server.cleanup()
    finally:
        redis_server.cleanup()


KINDS = ("plain", "tiered-redis", "tiered-pg", "cache-redis", "cached_db")
#: End to end only: the tiered engine with both servers on ONE host (one table, one listener;
#: the second server's listener stands by), as the other engines run: like for like.
ONE_HOST = ("tiered-redis 1 host", "tiered-pg 1 host")
#: End to end only, beside the targets (which are on default settings): both PostgreSQL engines
#: with prepared statements on (Django's server-side binding and psycopg's prepare_threshold,
#: which Django leaves off by default for connection poolers), so each is planned once.
PREPARED = ("tiered-pg prepared", "cached_db prepared")
PREPARED_OPTIONS = {"server_side_binding": True, "prepare_threshold": 5}


#: One micro round: the plain engine is measured right before each tiered engine, so each L1-hit
#: ratio compares two runs a second apart (a burst of load on the shared machine, which moved one
#: engine's median by 50 % between runs, then hits both sides of the ratio).
MICRO_ORDER = ("plain", "tiered-redis", "plain", "tiered-pg", "cache-redis", "cached_db")


def micro(redis_url: str, pg: dict[str, Any], n: int, rounds: int) -> dict[str, Any]:
    """Median µs per op, and per tiered engine the median over the rounds of its L1-hit load /
    the load of the plain run just before it (``l1_hit_ratio``)."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    ratios: dict[str, list[float]] = {"tiered-redis": [], "tiered-pg": []}
    for _ in range(rounds):
        before = 0.0
        for kind in MICRO_ORDER:
            result = _micro_run(kind, redis_url, pg, n)
            runs[kind].append(result)
            if kind in ratios:
                ratios[kind].append(result["load"] / before)
            before = result["load"]
    medians: dict[str, Any] = {
        kind: {op: statistics.median(r[op] for r in results) for op in ("load", "update")}
        for kind, results in runs.items()
    }
    for kind, found in ratios.items():
        medians[kind]["l1_hit_ratio"] = statistics.median(found)
        medians[kind]["l1_hit_ratios"] = found
    return medians


def _micro_run(kind: str, redis_url: str, pg: dict[str, Any], n: int) -> dict[str, float]:
    name = f"/shmbench-tiered-{uuid.uuid4().hex[:8]}"
    migrate(engine_env(kind, redis_url, pg, name))
    try:
        result: dict[str, float] = json.loads(
            python(engine_env(kind, redis_url, pg, name), MICRO, str(n))
        )
        return result
    finally:
        unlink(name)
        _unlink_lock(name)


def login(port: int, path: str = "/set?_auth_user_id=1&data=" + "x" * 200) -> str:
    status, _, cookie = request(port, path)
    if status != 200 or not cookie:
        raise RuntimeError(f"/set answered {status} without a session cookie")
    return cookie


def e2e(
    redis_url: str, pg: dict[str, Any], seconds: int, repeats: int, workdir: Path
) -> dict[str, Any]:
    """Median req/s per engine and path over ``repeats`` rounds.

    Every engine's servers are started first and stay up; each round then runs every engine
    in turn, path by path, so a burst of load from the rest of a shared machine hits all the
    engines of a round alike instead of one engine's whole slot (runs 4 and 5, which ran one
    engine after the other, disagreed on the PostgreSQL ``/incr`` ratio by 2x).
    """
    from django_shmsession.tiered.listener import lock_path

    labels = KINDS + ONE_HOST + PREPARED
    names: list[str] = []
    samples: dict[str, dict[str, list[float]]] = {
        label: {path: [] for path in E2E_PATHS} for label in labels
    }
    try:
        with contextlib.ExitStack() as stack:
            ports: dict[str, list[int]] = {}
            for label in labels:
                label_names, envs = _e2e_envs(label, redis_url, pg)
                names.extend(label_names)
                migrate(envs[0])
                ports[label] = stack.enter_context(
                    _servers(envs, 1, workdir, label.replace(" ", "-"))
                )
            time.sleep(1.0)  # listeners up
            cookies = {label: login(label_ports[0]) for label, label_ports in ports.items()}
            for label, label_ports in ports.items():
                for port in label_ports:
                    assert request(port, "/", cookies[label])[0] == 200
            for _ in range(repeats):
                for path in E2E_PATHS:
                    for label in labels:
                        run = _wrk_pair(ports[label], path, cookies[label], seconds)
                        samples[label][path].append(run)
    finally:
        for name in names:
            unlink(name)
            lock_path(name).unlink(missing_ok=True)
    return {
        label: {path: statistics.median(runs) for path, runs in paths.items()} | {"runs": paths}
        for label, paths in samples.items()
    }


E2E_PATHS = ("/", "/incr", "/ping")


def _e2e_envs(
    label: str, redis_url: str, pg: dict[str, Any]
) -> tuple[list[str], list[dict[str, str]]]:
    """The segment names and environments of one engine's two servers.

    Every engine runs as two servers of 1 worker, all on ONE session: two hosts (two tables,
    one L2) for tiered, one host (both servers on one table or one store) for the others, and
    tiered again on one host. On two hosts every write invalidates the other host's copy.
    """
    kind = label.split(" ")[0]
    two_hosts = kind.startswith("tiered") and label not in ONE_HOST
    pg = own_database(pg, label)
    names = [f"/shmbench-e2e-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    if not two_hosts:
        names[1] = names[0]
    if label in PREPARED:
        pg = dict(pg, OPTIONS=PREPARED_OPTIONS)
    envs = [engine_env(kind, redis_url, pg, name) for name in names]
    envs[1]["SHMSESSION_L2"] = envs[0].get("SHMSESSION_L2", "")  # one L2 for both hosts
    return sorted(set(names)), envs


def own_database(pg: dict[str, Any], label: str) -> dict[str, Any]:
    """``pg`` on a database of its own for engine ``label`` (created on first use).

    Each engine gets its own database, as each site has: PostgreSQL (15) wakes every backend
    that LISTENs in a database at each NOTIFY, whatever its channel, so engines sharing one
    database would wake each other's listeners. Measured on this server with two LISTENing
    backends of another channel: +30 µs in the notifying backend and +33 µs in the two woken
    ones per update. The e2e part keeps every engine's servers up at once: on one database,
    the tiered PostgreSQL rows paid for five listening backends where a site of two hosts has
    two.
    """
    import psycopg

    name = "bench_" + re.sub(r"\W", "_", label)
    conninfo = f"host={pg['HOST']} port={pg['PORT']} user={pg['USER']} dbname=postgres"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return dict(pg, NAME=name)


def _wrk_pair(ports: list[int], path: str, cookie: str, seconds: int) -> float:
    """Summed req/s of one wrk per server, run at once (4 connections each)."""
    procs = [_wrk_async(port, path, cookie, seconds, 8 // len(ports)) for port in ports]
    return sum(_wrk_result(p) for p in procs)


class _servers:
    def __init__(self, envs: list[dict[str, str]], workers: int, workdir: Path, kind: str) -> None:
        self.contexts = [
            gunicorn(env, workers, workdir / f"{kind}-{i}.log") for i, env in enumerate(envs)
        ]

    def __enter__(self) -> list[int]:
        return [ctx.__enter__() for ctx in self.contexts]

    def __exit__(self, *exc: Any) -> None:
        for ctx in self.contexts:
            ctx.__exit__(None, None, None)


def _wrk_async(
    port: int, path: str, cookie: str, seconds: int, connections: int
) -> subprocess.Popen[str]:
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "-H",
        f"Cookie: sessionid={cookie}",
        f"http://127.0.0.1:{port}{path}",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _wrk_result(proc: subprocess.Popen[str]) -> float:
    out = proc.communicate()[0]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise RuntimeError(f"wrk saw {bad.group(1)} failed responses:\n{out}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(found.group(1)) if found else 0.0


def latency(redis_url: str, pg: dict[str, Any], n: int) -> dict[str, Any]:
    from django_shmsession.tiered.listener import lock_path

    out: dict[str, Any] = {}
    for kind in ("tiered-redis", "tiered-pg"):
        a, b = (f"/shmbench-lat-{uuid.uuid4().hex[:8]}" for _ in range(2))
        env_a = engine_env(kind, redis_url, pg, a)
        env_b = dict(env_a, SHMSESSION_NAME=b)
        migrate(env_a)
        listener = subprocess.Popen(
            [sys.executable, str(PROJECT / "manage.py"), "shmsession", "listen"],
            env=env_b,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            python(
                env_b,
                "import django; django.setup()\n"
                "from django_shmsession import store; print(store.get_table().name)",
            )
            time.sleep(2.0)  # the listener is up and has flushed
            samples = json.loads(python(env_a, LATENCY, b, str(n)))
        finally:
            listener.terminate()
            listener.wait(20)
            for name in (a, b):
                unlink(name)
                lock_path(name).unlink(missing_ok=True)
        ordered = sorted(samples)
        out[kind] = {
            "n": len(ordered),
            "p50_ms": ordered[len(ordered) // 2],
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max_ms": ordered[-1],
        }
    return out


def render(info: dict[str, str], data: dict[str, Any]) -> str:
    m, e, lat = data["micro"], data["e2e"], data["latency"]
    lines = [
        "# Tiered engine: tiered (Redis, PostgreSQL) vs plain engine, cache (Redis), cached_db",
        "",
        machine_header(info),
        "",
        "## Per operation (µs, median of round medians; 300 B signed-in session)",
        "",
        md_table(
            ["engine", "load", "update (load+save)"],
            [[k, f"{m[k]['load']:.1f}", f"{m[k]['update']:.1f}"] for k in KINDS],
        ),
        "",
        "## End to end (req/s, wrk, two servers of 1 sync worker each, summed)",
        "",
        md_table(
            ["engine", "/", "/incr", "/ping"],
            [
                [k, f"{e[k]['/']:.0f}", f"{e[k]['/incr']:.0f}", f"{e[k]['/ping']:.0f}"]
                for k in KINDS + ONE_HOST + PREPARED
                if k in e
            ],
        ),
        "",
        "Every row loads one session from both servers. `tiered-*` rows: two hosts (two L1s, "
        "two listeners, one L2), so each write on one host invalidates the other host's copy; "
        "`tiered-* 1 host`: both servers on one host (one L1), like the other engines' rows. "
        "`* prepared`: the PostgreSQL engines with the database OPTIONS "
        f"{PREPARED_OPTIONS} (Django's default leaves both off, for connection poolers).",
        "",
        "## Invalidation latency (ms, A's delete returned -> B's L1 copy gone)",
        "",
        md_table(
            ["L2", "n", "p50", "p99", "max"],
            [
                [k, v["n"], f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}", f"{v['max_ms']:.2f}"]
                for k, v in lat.items()
            ],
        ),
        "",
        "## Targets",
        "",
    ]
    for kind in ("tiered-redis", "tiered-pg"):
        ratio, per_round = m[kind]["l1_hit_ratio"], m[kind]["l1_hit_ratios"]
        lines.append(
            f"- {kind} L1-hit load / plain load (median of {len(per_round)} paired rounds, "
            f"{', '.join(f'{r:.2f}' for r in per_round)}): {fmt_ratio(ratio)} (target <= 1.30x)"
        )
        share = paired(e, kind, "plain", "/")
        lines.append(f"- {kind} `/` (two hosts) vs plain (one host): {share} (target >= 0.90x)")
        incr = paired(e, kind, "cached_db", "/incr")
        lines.append(f"- {kind} `/incr` (two hosts) / cached_db `/incr`: {incr} (target >= 1.5x)")
        one = f"{kind} 1 host"
        if one in e:
            incr = paired(e, one, "cached_db", "/incr")
            lines.append(f"- {one} `/incr` / cached_db `/incr`: {incr} (target >= 1.5x)")
    if all(label in e for label in PREPARED):
        incr = paired(e, "tiered-pg prepared", "cached_db prepared", "/incr")
        lines.append(
            f"- (not a target: both with prepared statements) tiered-pg `/incr` / cached_db "
            f"`/incr`: {incr}"
        )
    for kind, v in lat.items():
        lines.append(f"- {kind} invalidation p99 {v['p99_ms']:.2f} ms (target <= 50 ms)")
    return "\n".join(lines) + "\n"


def paired(e: dict[str, Any], label: str, peer: str, path: str) -> str:
    """``label``'s req/s over ``peer``'s on ``path``: the median of the per-round ratios (both
    ran in the same round, seconds apart), then each round's, then the ratio of the medians.

    Why paired: the machine is shared, and its throughput moves between rounds (run 9:
    cached_db ``/incr`` 725 to 1,234 req/s across its rounds), so the medians of two engines
    may come from different rounds; a round's two runs saw the same machine."""
    ours, theirs = e[label]["runs"][path], e[peer]["runs"][path]
    rounds = [a / b for a, b in zip(ours, theirs, strict=True)]
    each = ", ".join(f"{r:.2f}" for r in rounds)
    unpaired = e[label][path] / e[peer][path]
    return (
        f"{fmt_ratio(statistics.median(rounds))} (per round {each}; ratio of medians "
        f"{fmt_ratio(unpaired)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    add_autogroup_flag(parser)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    n, rounds, seconds, repeats, lat_n = (300, 1, 2, 1, 50) if args.quick else (3000, 5, 4, 5, 500)
    info = machine_info()
    with autogroup_off(args.keep_autogroup) as used:
        info["sched_autogroup"] = f"{used} during the run (host: {info['sched_autogroup']})"
        data = measure_all(n, rounds, seconds, repeats, lat_n)
    path = write_results("tiered", render(info, data), {"machine": info, **data})
    log(f"results in {path}")
    return 0


def measure_all(n: int, rounds: int, seconds: int, repeats: int, lat_n: int) -> dict[str, Any]:
    """Every part of the benchmark, on servers of its own (see :func:`common.autogroup_off`
    for why the caller turns autogroup scheduling off around it)."""
    with l2_servers() as (redis_server, pg_server, _):
        pg = dict(pg_server.settings)
        log("micro")
        data: dict[str, Any] = {"micro": micro(redis_server.url, pg, n, rounds)}
        log("invalidation latency")
        data["latency"] = latency(redis_server.url, pg, lat_n)
        log("e2e")
        data["e2e"] = e2e(redis_server.url, pg, seconds, repeats, Path(redis_server.dir))
    return data


if __name__ == "__main__":
    raise SystemExit(main())
