"""Per-request CPU cost of the test project's views, in process, no network: where e2e time goes.

Usage: python -m benchmarks.request_cost [--quick] [--backends shm,cache-locmem,...]

Calls Django's WSGI handler directly (the same settings as e2e.py) for `/ping`, `/` and `/incr`
with a session cookie, interleaved, and reports µs per request and the extra µs a session adds
over `/ping`. Why: wrk on a shared 2-core machine is noisy, and the e2e target (`/` and `/incr`
at ≥ 90 % of `/ping`) depends as much on Django's SessionMiddleware work (Vary header, cookie
with an expiry date on every save) as on the engine. A backend with a free store shows that floor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from benchmarks import backends as bk
from benchmarks.common import (
    ROOT,
    WORK,
    fmt_us,
    log,
    machine_header,
    machine_info,
    md_table,
    read_env,
    summarize,
    write_results,
)

PATHS = ("/ping", "/", "/incr")
DEFAULT_BACKENDS = ("shm", "cache-locmem", "signed_cookies", "cache-redis", "db-sqlite-wal")


def _environ(path: str, cookie: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_COOKIE": f"sessionid={cookie}" if cookie else "",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def run_child(quick: bool) -> dict[str, Any]:
    """In a process whose environment selects the backend (as e2e.py's gunicorn does)."""
    import django

    django.setup()
    from django.core.handlers.wsgi import WSGIHandler

    bk.prepare_store(os.environ["BENCH_BACKEND"])
    handler = WSGIHandler()
    state: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        state["status"] = status
        for name, value in headers:
            cookie = value.strip()  # Django's WSGI handler emits " sessionid=...; ..."
            if name == "Set-Cookie" and cookie.startswith("sessionid="):
                state["cookie"] = cookie.split(";", 1)[0].split("=", 1)[1]

    def call(path: str) -> None:
        body = b"".join(handler(_environ(path, state.get("cookie", "")), start_response))
        if not state["status"].startswith("200"):
            raise RuntimeError(f"{path} answered {state['status']}: {body[:200]!r}")

    call("/set")
    if not state.get("cookie"):
        raise RuntimeError("/set did not set a session cookie")
    samples: dict[str, list[int]] = {path: [] for path in PATHS}
    rounds = 300 if quick else 3000
    clock = time.perf_counter_ns
    for _ in range(50):
        for path in PATHS:
            call(path)
    for _ in range(rounds):
        for path in PATHS:
            start = clock()
            call(path)
            samples[path].append(clock() - start)
    out = {path: summarize(values).as_dict() for path, values in samples.items()}
    out.update(_hot_and_cold_updates(call, rounds))
    return out


def _hot_and_cold_updates(call: Any, rounds: int) -> dict[str, Any]:
    """One session update (load, change, save) timed right after another ("hot": what the
    micro-benchmark measures) and right after two ``/ping`` requests ("cold": Django's request
    code has evicted the engine's code and data from the CPU caches, as in a served request)."""
    from importlib import import_module

    from django.conf import settings

    store = import_module(settings.SESSION_ENGINE).SessionStore
    session = store()
    session["count"] = 0
    session.save()
    key = session.session_key

    def update() -> None:
        current = store(key)
        current["count"] = current.get("count", 0) + 1
        current.save()

    clock = time.perf_counter_ns
    hot: list[int] = []
    cold: list[int] = []
    for _ in range(rounds):
        update()
        start = clock()
        update()
        hot.append(clock() - start)
        call("/ping")
        call("/ping")
        start = clock()
        update()
        cold.append(clock() - start)
    return {"update_hot": summarize(hot).as_dict(), "update_cold": summarize(cold).as_dict()}


def run_backend(key: str, quick: bool) -> dict[str, Any]:
    from benchmarks.e2e import server_env

    shm_name = f"/shmbench-rc-{uuid.uuid4().hex[:10]}"
    env = server_env(key, shm_name, WORK / "request_cost" / key)
    cmd = [sys.executable, "-m", "benchmarks.request_cost", "--child"]
    if quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    finally:
        try:
            from django_shmsession.table import SessionTable

            SessionTable.unlink_name(shm_name)
        except Exception as err:  # the report must still be written
            log(f"request_cost: could not unlink {shm_name}: {err}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "reason": tail[:200]}
    return {"status": "ok", "paths": json.loads(proc.stdout)}


def render(results: dict[str, Any], info: dict[str, str], quick: bool) -> str:
    rows = []
    for key, entry in results.items():
        label = bk.BY_KEY[key].label
        if entry["status"] != "ok":
            rows.append([label, f"**{entry['status']}**: {entry['reason']}"])
            continue
        med = {path: entry["paths"][path]["median_us"] for path in PATHS}
        rows.append(
            [
                label,
                fmt_us(med["/ping"]),
                fmt_us(med["/"]),
                fmt_us(med["/incr"]),
                fmt_us(med["/"] - med["/ping"]),
                fmt_us(med["/incr"] - med["/ping"]),
                f"{100 * med['/ping'] / med['/']:.0f} %",
                f"{100 * med['/ping'] / med['/incr']:.0f} %",
                fmt_us(entry["paths"]["update_hot"]["median_us"]),
                fmt_us(entry["paths"]["update_cold"]["median_us"]),
            ]
        )
    return "\n".join(
        [
            "# Per-request cost through Django's WSGI handler (in process, no network)"
            + (" (--quick smoke run)" if quick else ""),
            "",
            machine_header(info),
            "",
            "Median µs per request, paths interleaved, with e2e.py's settings. The '% of ping' "
            "here is a lower bound of e2e's: gunicorn and the socket add the same cost to every "
            "path, which raises the ratio. The last two columns time one session update "
            "(load, change, save) in the same process: right after another (hot, as in "
            "micro.md) and right after two /ping requests (cold: Django's request code has "
            "pushed the engine's code and data out of the CPU caches, as in a served request).",
            "",
            md_table(
                [
                    "backend",
                    "/ping µs",
                    "/ µs",
                    "/incr µs",
                    "/ extra µs",
                    "/incr extra µs",
                    "/ as % of ping",
                    "/incr as % of ping",
                    "update hot µs",
                    "update cold µs",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="request_cost", help="results/<out>.md and .json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.quick)))
        return 0
    env = read_env()
    info = machine_info()
    results: dict[str, Any] = {}
    for key in args.backends.split(","):
        reason = bk.unavailable(bk.BY_KEY[key], env)
        if reason:
            results[key] = {"status": "missing", "reason": reason}
        else:
            log(f"request_cost: {key} ...")
            results[key] = run_backend(key, args.quick)
    markdown = render(results, info, args.quick)
    path = write_results(args.out, markdown, {"machine": info, "results": results})
    print(markdown)
    log(f"request_cost: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
