"""Where the CPU of one request goes, by process kind, for the tiered benchmark's e2e setup.

Usage: python -m benchmarks.cpu_split [--path /incr] [--seconds 4] [--rounds 2] [LABEL ...]

Starts its own redis-server and PostgreSQL like ``benchmarks.tiered``, starts the named engines
(labels of ``benchmarks.tiered``: default tiered-pg on two hosts and on one host, and
cached_db) as two gunicorn servers of one sync worker each, runs wrk on both, and reads every
process's user + system CPU time from ``/proc`` before and after. Prints µs of CPU per request
per kind of process (gunicorn workers, PostgreSQL backends, listeners, Redis; wrk is not
counted: it has exited when the second reading is taken) and how many cores were busy.

Why: on 2 cores every process of the run shares the CPU, so req/s alone cannot say whether a
gap is our workers' Python or the database's work; this does (README, "Speed").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

from benchmarks import tiered
from benchmarks.common import ROOT, add_autogroup_flag, autogroup_off

HZ = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """Per live pid: its kind (see :func:`kind`) and user + system clock ticks so far."""
    found: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry)] = (kind(comm, cmdline), int(fields[11]) + int(fields[12]))
    return found


def kind(comm: str, cmdline: str) -> str:
    if "tiered.listener" in cmdline:
        return "listener"
    if "gunicorn" in cmdline:
        return "gunicorn"
    if comm == "postgres" or cmdline.startswith("postgres"):
        return "postgresql"
    if comm.startswith("redis"):
        return "redis"
    return "other"


def measure(label: str, ports: list[int], cookie: str, path: str, seconds: int) -> str:
    """One wrk run on both servers; its req/s and CPU per request per kind, as text."""
    before, t0 = cpu_ticks(), time.monotonic()
    procs = [tiered._wrk_async(port, path, cookie, seconds, 4) for port in ports]
    outputs = [proc.communicate()[0] for proc in procs]
    elapsed, after = time.monotonic() - t0, cpu_ticks()
    requests = sum(int(re.search(r"(\d+) requests in", out)[1]) for out in outputs)  # type: ignore[index]
    per_kind: dict[str, int] = {}
    for pid, (what, ticks) in after.items():
        used = ticks - before.get(pid, (what, 0))[1]
        per_kind[what] = per_kind.get(what, 0) + used
    total = sum(per_kind.values())
    lines = [
        f"{label} {path}: {requests / elapsed:.0f} req/s, {total / HZ * 1e6 / requests:.0f} µs "
        f"CPU per request, {total / HZ / elapsed:.2f} cores busy"
    ]
    for what, ticks in sorted(per_kind.items(), key=lambda item: -item[1]):
        lines.append(f"    {what:12s} {ticks / HZ * 1e6 / requests:6.0f} µs/request")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="*", default=["tiered-pg", "tiered-pg 1 host", "cached_db"])
    parser.add_argument("--path", default="/incr", choices=tiered.E2E_PATHS)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    add_autogroup_flag(parser)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with autogroup_off(args.keep_autogroup) as used:
        print(f"kernel autogroup scheduling: {used} during the run")
        run(args.labels, args.path, args.seconds, args.rounds)
    return 0


def run(labels: list[str], path: str, seconds: int, rounds: int) -> None:
    """Start every engine's servers, then measure each in turn, ``rounds`` times."""
    with tiered.l2_servers() as (redis_server, pg_server, names), contextlib.ExitStack() as stack:
        ports: dict[str, list[int]] = {}
        for label in labels:
            label_names, envs = tiered._e2e_envs(label, redis_server.url, pg_server.settings)
            names.extend(label_names)
            tiered.migrate(envs[0])
            workdir = Path(redis_server.dir)
            servers = tiered._servers(envs, 1, workdir, label.replace(" ", "-"))
            ports[label] = stack.enter_context(servers)
        time.sleep(1.5)  # listeners up
        cookies = {label: tiered.login(label_ports[0]) for label, label_ports in ports.items()}
        for _ in range(rounds):
            for label in labels:
                print(measure(label, ports[label], cookies[label], path, seconds))


if __name__ == "__main__":
    raise SystemExit(main())
