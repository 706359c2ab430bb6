"""End-to-end benchmark: the test project under gunicorn, loaded by wrk, ours against the peers.

Usage: python -m benchmarks.e2e [--quick] [--backends shm,cache-redis] [--workers 2,4]

For each backend and worker count: start gunicorn (sync workers) with testproject's
gunicorn.conf.py and benchmarks.e2e_settings, check that sessions survive crossing workers
(lost sessions), then run wrk on 127.0.0.1 against `/` (load), `/incr` (load + save) and `/ping`
(no session: the baseline of the same server). Reports req/s and each path as % of /ping.

Lost sessions: a value set through one request and not read back by the next request on a new
connection (which the kernel hands to any worker). It must be zero for a shared store; LocMem
shows what a per-process store does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import backends as bk
from benchmarks.common import (
    ROOT,
    WORK,
    fmt_ratio,
    log,
    machine_header,
    machine_info,
    md_table,
    read_env,
    write_results,
)

PATHS = ("/", "/incr", "/ping")
COOKIE = "sessionid"
CONNECTIONS = 8
WRK_THREADS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(key: str, shm_name: str, workdir: Path) -> dict[str, str]:
    """Environment for gunicorn and the prepare step: which backend, where its files live."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "testproject")]),
        DJANGO_SETTINGS_MODULE="benchmarks.e2e_settings",
        BENCH_BACKEND=key,
        BENCH_SHM_NAME=shm_name,
        BENCH_WORKDIR=str(workdir),
    )
    return env


def prepare(env: dict[str, str]) -> None:
    """Migrate / empty the backend's store in a process of its own, before gunicorn starts."""
    code = (
        "import django, os; django.setup(); from benchmarks.backends import prepare_store; "
        "prepare_store(os.environ['BENCH_BACKEND'])"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)


def request(port: int, path: str, cookie: str | None = None) -> tuple[int, dict[str, Any], str]:
    """One GET on a new connection: (status, JSON body, session cookie value or '')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        new_cookie = ""
        for header in response.headers.get_all("Set-Cookie") or []:
            match = re.match(rf"{COOKIE}=([^;]*)", header)
            if match:
                new_cookie = match.group(1)
        data = json.loads(body) if response.status == 200 else {}
        return response.status, data, new_cookie
    finally:
        conn.close()


@contextmanager
def gunicorn(env: dict[str, str], workers: int, log_path: Path) -> Iterator[int]:
    """Run gunicorn for the duration of the block; yields its port. Stops only its own master."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(ROOT / "testproject" / "gunicorn.conf.py"),
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "testproject.wsgi",
    ]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log_file, stderr=log_file)
    try:
        _wait_ready(proc, port, log_path)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-500:]
            raise RuntimeError(f"gunicorn exited with {proc.returncode}: {tail}")
        try:
            if request(port, "/ping")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn not ready on port {port} after 30 s; see {log_path}")


def lost_sessions(port: int, workers: int, rounds: int) -> dict[str, int]:
    """Set a value through one worker, read it back through every worker; count misses.

    Consecutive requests tend to land on the same idle worker, which would hide a per-process
    store, so the read-back uses benchmarks.e2e_urls' held views: `workers` concurrent requests
    that each hold their worker 20 ms land on `workers` different workers. Each /incr is sent
    while the other workers are held, so it lands wherever a worker is free. A shared store ends
    with zero lost reads and an /incr count of exactly `rounds`.
    """
    lost = reads = crossed = errors = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(rounds):
            value = uuid.uuid4().hex
            status, body, cookie = request(port, f"/set?foo={value}")
            if status != 200 or not cookie:
                errors += 1
                continue
            answers = pool.map(
                request, [port] * workers, ["/bench/read"] * workers, [cookie] * workers
            )
            for status, got, _ in answers:
                if status != 200:
                    errors += 1
                    continue
                reads += 1
                crossed += got.get("pid") != body.get("pid")
                lost += got.get("foo") != value
        count, pids, cookie = 0, set(), ""
        for _ in range(rounds):
            holds = [pool.submit(request, port, "/bench/hold") for _ in range(workers - 1)]
            time.sleep(0.002)  # let the holds reach their workers first
            status, body, new_cookie = request(port, "/incr", cookie or None)
            for held in holds:
                held.result()
            cookie = new_cookie or cookie  # signed_cookies sends a new cookie on every change
            if status == 200:
                count = int(body["count"])
                pids.add(body["pid"])
    return {
        "reads": reads,
        "lost": lost,
        "crossed_workers": crossed,
        "errors": errors,
        "incr_expected": rounds,
        "incr_final": count,
        "incr_workers_seen": len(pids),
    }


def run_wrk(wrk: str, port: int, path: str, cookie: str, seconds: int) -> dict[str, Any]:
    """wrk on one path with the session cookie; req/s and the count of non-2xx answers."""
    cmd = [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "-H",
        f"Cookie: {COOKIE}={cookie}",
        f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    latency = re.search(r"Latency\s+([\d.]+\w+)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": errors.group(0) if errors else "",
        "latency_avg": latency.group(1) if latency else "",
    }


def wrk_rounds(wrk: str, port: int, cookie: str, seconds: int, repeats: int) -> dict[str, Any]:
    """Every path `repeats` times, interleaved; req/s is the median of the repeats.

    Interleaving and the median are there because this machine is shared: a neighbour's burst
    then hurts one repeat of every path instead of all repeats of one path.
    """
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path in PATHS:
            runs[path].append(run_wrk(wrk, port, path, cookie, seconds))
    out: dict[str, Any] = {}
    pings = [r["rps"] for r in runs["/ping"]]
    for path, results in runs.items():
        out[path] = {
            "rps": statistics.median(r["rps"] for r in results),
            "rps_all": [r["rps"] for r in results],
            # Each repeat's share of the /ping run right next to it, then the median: a burst of
            # load from a neighbour then moves both numbers of a pair instead of one.
            "pct_of_ping": statistics.median(
                100 * r["rps"] / ping if ping else 0.0
                for r, ping in zip(results, pings, strict=True)
            ),
            "non_2xx": sum(r["non_2xx"] for r in results),
            "socket_errors": [r["socket_errors"] for r in results if r["socket_errors"]],
        }
    return out


def run_backend(
    key: str, workers: int, wrk: str, timing: tuple[int, int], rounds: int
) -> dict[str, Any]:
    """One backend at one worker count: prepare, start gunicorn, lost-session check, wrk."""
    shm_name = f"/shmbench-e2e-{uuid.uuid4().hex[:10]}"
    workdir = WORK / "e2e" / key
    env = server_env(key, shm_name, workdir)
    log_path = WORK / "e2e" / f"gunicorn-{key}-{workers}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        prepare(env)
        with gunicorn(env, workers, log_path) as port:
            check = lost_sessions(port, workers, rounds)
            status, _, cookie = request(port, "/set")
            if status != 200 or not cookie:
                raise RuntimeError(f"/set answered {status} without a session cookie")
            paths = wrk_rounds(wrk, port, cookie, *timing)
        out: dict[str, Any] = {"status": "ok", "sessions": check, "wrk": paths}
        if key == bk.OURS:
            out["table_stats"] = _table_stats(shm_name)
        return out
    except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
        return {"status": "error", "reason": str(err)[:300]}
    finally:
        _unlink_shm(shm_name)


def _table_stats(name: str) -> dict[str, Any]:
    """Our table's counters after the run (lock waits above all), for the JSON results."""
    from django_shmsession.table import SessionTable

    table = SessionTable(name)
    try:
        return dict(table.stats().as_dict())
    finally:
        table.close()


def _unlink_shm(name: str) -> None:
    """The test project's hooks open a table for every backend; remove ours afterwards."""
    try:
        from django_shmsession.table import SessionTable

        SessionTable.unlink_name(name)
    except Exception as err:  # the report must still be written
        log(f"e2e: could not unlink {name}: {err}")


def render(
    results: dict[str, Any],
    info: dict[str, str],
    workers: list[int],
    timing: tuple[int, int],
    quick: bool,
) -> str:
    seconds, repeats = timing
    parts = [
        "# End-to-end: test project under gunicorn, wrk on 127.0.0.1"
        + (" (--quick smoke run)" if quick else ""),
        "",
        machine_header(info),
        "",
        f"gunicorn sync workers, wrk -t{WRK_THREADS} -c{CONNECTIONS} with one session cookie, "
        f"{repeats} interleaved run(s) of {seconds} s per path, median req/s; % of ping = "
        "median over the runs of each run's ratio to the /ping run beside it. "
        "`/` reads the session, `/incr` reads and saves it, `/ping` never touches it (baseline "
        "of the same server run). wrk shares the machine's cores with the workers.",
    ]
    for count in workers:
        rows = []
        for backend in bk.BACKENDS:
            entry = results.get(f"{backend.key}@{count}")
            if entry is None:
                continue
            if entry["status"] != "ok":
                rows.append([backend.label, f"**{entry['status']}**: {entry['reason']}"])
                continue
            rps = {path: entry["wrk"][path]["rps"] for path in PATHS}
            s = entry["sessions"]
            bad = sum(int(entry["wrk"][p]["non_2xx"]) for p in PATHS)
            rows.append(
                [
                    backend.label,
                    f"{rps['/']:,.0f}",
                    f"{rps['/incr']:,.0f}",
                    f"{rps['/ping']:,.0f}",
                    f"{entry['wrk']['/']['pct_of_ping']:.0f} %",
                    f"{entry['wrk']['/incr']['pct_of_ping']:.0f} %",
                    f"{s['lost']} / {s['reads']} ({s['crossed_workers']} crossed)",
                    f"{s['incr_final']} / {s['incr_expected']} ({s['incr_workers_seen']} workers)",
                    str(bad),
                ]
            )
        parts += [
            "",
            f"## {count} workers: req/s",
            "",
            md_table(
                [
                    "backend",
                    "/",
                    "/incr",
                    "/ping",
                    "/ % of ping",
                    "/incr % of ping",
                    "lost reads / reads (other worker)",
                    "incr count",
                    "non-2xx",
                ],
                rows,
            ),
        ]
        parts += _ratios(results, count)
    parts += _targets(results, workers)
    return "\n".join(parts)


def _rps(results: dict[str, Any], key: str, count: int, path: str) -> float | None:
    entry = results.get(f"{key}@{count}")
    if not entry or entry["status"] != "ok":
        return None
    return float(entry["wrk"][path]["rps"])


def _ratios(results: dict[str, Any], count: int) -> list[str]:
    rows = []
    for backend in bk.BACKENDS:
        if backend.key == bk.OURS or f"{backend.key}@{count}" not in results:
            continue
        cells = []
        for path in ("/", "/incr"):
            ours = _rps(results, bk.OURS, count, path)
            peer = _rps(results, backend.key, count, path)
            cells.append(fmt_ratio(ours / peer if ours and peer else None))
        rows.append([backend.label, *cells])
    return [
        "",
        f"Our req/s as a multiple of each peer's ({count} workers):",
        "",
        md_table(["vs backend", "/", "/incr"], rows),
    ]


def _ahead_of_locmem(results: dict[str, Any], count: int, path: str) -> list[str]:
    """Issue 15: our share of /ping above LocMem's in the same run (and req/s for /incr)."""
    ours = results.get(f"{bk.OURS}@{count}")
    peer = results.get(f"cache-locmem@{count}")
    name = f"{count} workers {path}: % of /ping ahead of LocMem's"
    if not ours or not peer or ours["status"] != "ok" or peer["status"] != "ok":
        return [name, "-", "n/a"]
    mine, theirs = (e["wrk"][path]["pct_of_ping"] for e in (ours, peer))
    verdict = "met" if mine > theirs else "**NOT met**"
    return [name, f"{mine:.0f} % vs {theirs:.0f} %", verdict]


def _targets(results: dict[str, Any], workers: list[int]) -> list[str]:
    rows = []
    for count in workers:
        entry = results.get(f"{bk.OURS}@{count}")
        ok = bool(entry) and entry["status"] == "ok"
        for path in ("/", "/incr"):
            share = entry["wrk"][path]["pct_of_ping"] if ok else None
            verdict = "n/a" if share is None else "met" if share >= 90 else "**NOT met**"
            shown = "-" if share is None else f"{share:.0f} %"
            rows.append([f"{count} workers {path} ≥ 90 % of /ping", shown, verdict])
            rows.append(_ahead_of_locmem(results, count, path))
        if ok:
            s = entry["sessions"]
            zero = s["lost"] == 0 and s["incr_final"] == s["incr_expected"]
            rows.append(
                [
                    f"{count} workers: zero lost sessions",
                    f"{s['lost']} lost, incr {s['incr_final']}/{s['incr_expected']}",
                    "met" if zero else "**NOT met**",
                ]
            )
    return [
        "",
        "## Targets (issues 6 and 15)",
        "",
        md_table(["target", "measured", "verdict"], rows),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per wrk run")
    parser.add_argument("--backends", default="", help="comma-separated keys (default: all)")
    parser.add_argument("--workers", default="2,4", help="worker counts (default 2,4)")
    parser.add_argument("--seconds", type=int, default=0, help="wrk duration per path and repeat")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats per path")
    parser.add_argument("--out", default="e2e", help="results/<out>.md and .json")
    args = parser.parse_args(argv)
    env = read_env()
    wrk = env.get("WRK", "")
    info = machine_info()
    workers = [int(w) for w in args.workers.split(",")]
    seconds = args.seconds or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    rounds = 20 if args.quick else 50
    chosen = [k for k in args.backends.split(",") if k] or [b.key for b in bk.BACKENDS]
    results: dict[str, Any] = {}
    for backend in bk.BACKENDS:
        if backend.key not in chosen:
            continue
        reason = bk.unavailable(backend, env) or ("" if wrk else "wrk not installed")
        for count in workers:
            slot = f"{backend.key}@{count}"
            if reason:
                results[slot] = {"status": "missing", "reason": reason}
            else:
                log(f"e2e: {backend.key} with {count} workers ...")
                results[slot] = run_backend(backend.key, count, wrk, (seconds, repeats), rounds)
            log(f"e2e: {slot}: {results[slot]['status']}")
    markdown = render(results, info, workers, (seconds, repeats), args.quick)
    path = write_results(args.out, markdown, {"machine": info, "results": results})
    print(markdown)
    log(f"e2e: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
