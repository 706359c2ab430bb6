"""An anonymous flood against signed-in users (issue 14), through the engine, in one process.

Usage: python -m benchmarks.flood [--quick] [--size 16M] [--users 500] [--flood 200000]
                                  [--value-bytes 100,3900]

For each value size: a fresh table of ``--size`` (default 16M, the issue's figure); ``--users``
signed-in sessions (holding Django's ``_auth_user_id``) created first; then ``--flood`` new
anonymous sessions (``SessionStore().create()`` with a value of that many bytes), as fast as one
process can make them. Reported: how many signed-in sessions still load afterwards (the target
is all of them), evictions per class, the flood's rate, and when the first signed-in session
would have been lost (never, when the target is met). Also: the cost of the access-time store
on a load (issue 14: "a few percent at most"), as the median ``table.get`` of a key read twice
in the same second (no store) against one whose access second changed (one store), measured in
the same run.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from typing import Any

from benchmarks.common import log, machine_header, machine_info, md_table, write_results


def configure_django(size: str, name: str) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="benchmark-not-secret",
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.sessions", "django_shmsession"],
        SESSION_ENGINE="django_shmsession.backend",
        SHMSESSION={"NAME": name, "SIZE": size},
    )
    django.setup()


def flood_once(users: int, flood: int, value_bytes: int) -> dict[str, Any]:
    from django_shmsession import store
    from django_shmsession.backend import SessionStore

    table = store.get_table()
    table.clear()
    before = table.stats().class_evictions  # counters are cumulative: report this run's
    signed_in = []
    for user_id in range(users):
        session = SessionStore()
        session.update({"_auth_user_id": str(user_id), "_auth_user_backend": "b", "cart": [1]})
        session.create()
        signed_in.append(session.session_key)
    payload = "x" * value_bytes
    started = time.perf_counter()
    for i in range(flood):
        session = SessionStore()
        session["data"] = payload
        session["n"] = i
        session.create()
    elapsed = time.perf_counter() - started
    stats = table.stats()
    loaded = sum(1 for key in signed_in if SessionStore(key).load().get("_auth_user_id"))
    return {
        "value_bytes": value_bytes,
        "users": users,
        "flood": flood,
        "signed_in_loaded": loaded,
        "evictions_anonymous": stats.class_evictions[0] - before[0],
        "evictions_signed_in": stats.class_evictions[1] - before[1],
        "entries_at_end": stats.entries,
        "entry_capacity": stats.entry_capacity,
        "flood_per_second": flood / elapsed,
        "flood_seconds": elapsed,
    }


def access_store_cost(rounds: int) -> dict[str, float]:
    """Median ns of a 300 B get without and with the access-second store, same table."""
    from django_shmsession import store

    table = store.get_table()
    table.clear()
    value = secrets.token_bytes(300)
    keys = [f"k{i}" for i in range(1000)]
    for key in keys:
        table.set(key, value, time.time() + 3600)
    same, changed = [], []
    access = table._memory.access  # the benchmark forces stale seconds to measure the store
    for _ in range(rounds):
        for index, key in enumerate(keys[:200]):
            t0 = time.perf_counter_ns()
            table.get(key)
            same.append(time.perf_counter_ns() - t0)  # its second was just stored: no store
            access[index] = 0  # an old second: the next get stores the new one
            t0 = time.perf_counter_ns()
            table.get(key)
            changed.append(time.perf_counter_ns() - t0)
    no_store, with_store = statistics.median(same), statistics.median(changed)
    return {"get_ns_no_store": no_store, "get_ns_with_store": with_store}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="20,000 sessions, one size")
    parser.add_argument("--size", default="16M")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--flood", type=int, default=200_000)
    parser.add_argument("--value-bytes", default="100,3900")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.value_bytes.split(",")]
    flood = 20_000 if args.quick else args.flood
    if args.quick:
        sizes = sizes[:1]
    name = f"/shmsession-flood-{secrets.token_hex(4)}"
    configure_django(args.size, name)
    from django_shmsession.table import SessionTable

    try:
        runs = []
        for value_bytes in sizes:
            log(f"flood: {flood} anonymous sessions of ~{value_bytes} B after {args.users} users")
            runs.append(flood_once(args.users, flood, value_bytes))
        cost = access_store_cost(20 if args.quick else 100)
    finally:
        SessionTable.unlink_name(name)
    info = machine_info()
    rows = [
        (
            run["value_bytes"],
            f"{run['signed_in_loaded']} / {run['users']}",
            run["evictions_anonymous"],
            run["evictions_signed_in"],
            f"{run['entries_at_end']} / {run['entry_capacity']}",
            f"{run['flood_per_second']:,.0f}",
        )
        for run in runs
    ]
    ratio = cost["get_ns_with_store"] / cost["get_ns_no_store"]
    markdown = "\n\n".join(
        [
            "# Anonymous flood against signed-in sessions (issue 14)",
            machine_header(info),
            f"Table {args.size}; {args.users} signed-in sessions, then {flood:,} anonymous "
            "sessions created by one process as fast as it can (`SessionStore().create()`).",
            md_table(
                [
                    "anonymous value B",
                    "signed-in still loading",
                    "evicted anonymous",
                    "evicted signed-in",
                    "entries / capacity",
                    "creations/s",
                ],
                rows,
            ),
            f"Access-second store on a 300 B get: median {cost['get_ns_no_store']:.0f} ns "
            f"without, {cost['get_ns_with_store']:.0f} ns with the store ({ratio:.3f}x); a "
            "store happens at most once per entry per second.",
        ]
    )
    path = write_results("flood", markdown, {"runs": runs, "access": cost, "machine": info})
    print(markdown)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
