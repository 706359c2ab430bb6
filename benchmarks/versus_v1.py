"""What lock and table version 2 cost over version 1 on the raw table (issue 10), in one run.

Usage: python -m benchmarks.versus_v1 [--quick] [--v1-ref REF] [--v2-ref REF]

Version 1 (``--v1-ref``, default 65ac26b, the last commit before the rewrite) is checked out into
a temporary ``git worktree`` (removed at the end); version 2 is this checkout's working tree (or
``--v2-ref``, checked out the same way). Each measurement round runs in a fresh subprocess whose
``PYTHONPATH`` points at one of the two trees, and checks that ``django_shmsession`` really came
from there. Rounds alternate v1, v2, v2, v1, v1, v2, ... (ABBA, so a machine that slowly gets
busier or quieter weighs on both alike).

A round is table_micro.py's method at 300 B on a private 64 MiB segment: get (hit, miss), exists,
set (overwrite), add (new key), replace and delete, each timed call by call with
``perf_counter_ns`` (up to 20,000 calls or 1 s), median per operation. Per version, the median of
the round medians; the ratio is v2 / v1 (> 1: version 2 is slower). Also the median of the
per-pair ratios (round i of v2 against the v1 round next to it). Target: get and set under 10 %
(ratio < 1.10).

The worktree and subprocess helpers here are shared with recovery.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    fmt_us,
    log,
    machine_header,
    machine_info,
    md_table,
    time_calls,
    time_prepared,
    write_results,
)

#: The last commit of lock/table version 1 (before issue 10's rewrite).
V1_REF = "65ac26b"
VALUE_BYTES = 300
SEGMENT_BYTES = 64 * 1024 * 1024
EXPIRES_IN = 3600.0
#: The issue's target: version 2 may add at most 10 % to get and set.
TARGET_RATIO = 1.10
TARGET_OPS = ("get (hit)", "set (overwrite)")


# -- two implementations side by side --------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One version of django_shmsession to measure: the tree its package is imported from."""

    label: str  # "v1" or "v2"
    root: str  # directory holding the django_shmsession/ package measured
    commit: str  # full commit id of that tree
    describe: str  # what was measured, for the results ("65ac26b (temporary worktree)", ...)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _add_worktree(ref: str, where: Path) -> str:
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    _git("worktree", "add", "--detach", str(where), commit)
    return commit


def _remove_worktree(where: Path) -> None:
    try:
        _git("worktree", "remove", "--force", str(where))
    except subprocess.CalledProcessError as err:
        log(f"versus_v1: could not remove worktree {where}: {err.stderr.strip()}")


def _working_tree_impl() -> Impl:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--", "django_shmsession")
    describe = f"{commit[:7]} (working tree" + (
        ", with uncommitted changes in django_shmsession/)" if dirty else ", clean)"
    )
    return Impl("v2", str(ROOT), commit, describe)


@dataclass(frozen=True)
class Versions:
    """Both versions, and the shim directory workers run in (see :func:`implementations`)."""

    v1: Impl
    v2: Impl
    shim: Path

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {"v1": self.v1.as_dict(), "v2": self.v2.as_dict()}


@contextmanager
def implementations(v1_ref: str = V1_REF, v2_ref: str | None = None) -> Iterator[Versions]:
    """v1 in a temporary worktree, v2 the working tree (or ``v2_ref`` in another one).

    Worktrees and the scratch directory are removed on exit, whatever happened.
    """
    scratch = Path(tempfile.mkdtemp(prefix="shmbench-versions-"))
    worktrees: list[Path] = []
    try:
        shim = scratch / "shim"
        shim.mkdir()
        # Workers run with the shim as their current directory (first on sys.path under -m): it
        # holds only `benchmarks`, so this checkout's benchmark code is imported while
        # django_shmsession comes from PYTHONPATH (a worktree has a benchmarks/ of its own).
        (shim / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)
        v1_dir = scratch / "v1"
        log(f"versus_v1: git worktree add --detach {v1_dir} {v1_ref}")
        worktrees.append(v1_dir)
        v1_commit = _add_worktree(v1_ref, v1_dir)
        v1 = Impl("v1", str(v1_dir), v1_commit, f"{v1_commit[:7]} (temporary worktree)")
        if v2_ref is None:
            v2 = _working_tree_impl()
        else:
            v2_dir = scratch / "v2"
            log(f"versus_v1: git worktree add --detach {v2_dir} {v2_ref}")
            worktrees.append(v2_dir)
            v2_commit = _add_worktree(v2_ref, v2_dir)
            v2 = Impl("v2", str(v2_dir), v2_commit, f"{v2_commit[:7]} (temporary worktree)")
        yield Versions(v1, v2, shim)
    finally:
        for where in worktrees:
            if where.exists():
                _remove_worktree(where)
        shutil.rmtree(scratch, ignore_errors=True)


def run_worker(
    module: str, impl: Impl, shim: Path, payload: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> --worker <payload>`` against ``impl``; its JSON out.

    The worker's stderr (progress) goes to ours; its stdout is one JSON document.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = impl.root
    env.pop("PYTHONSAFEPATH", None)  # -P would drop the shim from sys.path
    payload = {**payload, "root": impl.root, "label": impl.label}
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--worker", json.dumps(payload)],
        cwd=shim,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} worker for {impl.label} exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def check_worker_import(root: str) -> str:
    """In a worker: fail unless django_shmsession was imported from ``root``; returns its path."""
    import django_shmsession

    path = Path(django_shmsession.__file__).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise SystemExit(f"worker imported django_shmsession from {path}, expected under {root}")
    return str(path.parent)


def has_module(root: str, module: str) -> bool:
    """True when the tree at ``root`` has ``django_shmsession/<module>.py``.

    Ask this instead of trying the import: a module missing from the v1 tree would be found by
    the editable install's finder (which maps django_shmsession.* to this checkout) and come
    from version 2.
    """
    return (Path(root) / "django_shmsession" / f"{module}.py").exists()


def check_loaded_modules(root: str) -> None:
    """In a worker, at the end: every django_shmsession module loaded came from ``root``."""
    base = Path(root).resolve()
    strays = [
        f"{name} ({module.__file__})"
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] == "django_shmsession"
        and getattr(module, "__file__", None)
        and not Path(module.__file__ or "").resolve().is_relative_to(base)
    ]
    if strays:
        raise SystemExit(f"modules loaded from outside {root}: {', '.join(strays)}")


# -- the overhead micro benchmark ------------------------------------------------------------------


def _keys() -> Iterator[str]:
    while True:
        yield uuid.uuid4().hex


def measure_ops(runs: int, seconds: float) -> dict[str, dict[str, float]]:
    """In a worker: table_micro's operations at 300 B, µs stats per operation."""
    from django_shmsession.table import SessionTable

    name = f"/shmbench-vs-{uuid.uuid4().hex[:12]}"
    table = SessionTable(name, SEGMENT_BYTES)
    keys = _keys()
    try:
        value = os.urandom(VALUE_BYTES)
        expires = time.time() + EXPIRES_IN
        hot = next(keys)
        table.set(hot, value, expires)
        missing = next(keys)

        def fresh_set() -> str:
            key = next(keys)
            table.set(key, value, expires)
            return key

        def timed(fn: Any) -> dict[str, float]:
            return time_calls(fn, max_runs=runs, max_seconds=seconds).as_dict()

        def prepared(prep: Any, fn: Any) -> dict[str, float]:
            return time_prepared(prep, fn, max_runs=runs, max_seconds=seconds).as_dict()

        return {
            "get (hit)": timed(lambda: table.get(hot)),
            "get (miss)": timed(lambda: table.get(missing)),
            "exists": timed(lambda: table.exists(hot)),
            "set (overwrite)": timed(lambda: table.set(hot, value, expires)),
            "add (new key)": prepared(lambda: next(keys), lambda k: table.add(k, value, expires)),
            "replace": timed(lambda: table.replace(hot, value, expires)),
            "delete": prepared(fresh_set, table.delete),
        }
    finally:
        table.close()
        SessionTable.unlink_name(name)


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    package = check_worker_import(payload["root"])
    ops = measure_ops(payload["runs"], payload["seconds"])
    check_loaded_modules(payload["root"])
    return {"package": package, "ops": ops, "loadavg": os.getloadavg()[0]}


def run(quick: bool, v1_ref: str, v2_ref: str | None) -> dict[str, Any]:
    pairs = 2 if quick else 8
    runs, seconds = (2000, 0.2) if quick else (20000, 1.0)
    rounds: list[dict[str, Any]] = []
    with implementations(v1_ref, v2_ref) as found:
        for pair in range(pairs):
            order = (found.v1, found.v2) if pair % 2 == 0 else (found.v2, found.v1)
            for impl in order:
                log(f"versus_v1: round {len(rounds) + 1}/{2 * pairs}: {impl.label}")
                out = run_worker(
                    "versus_v1", impl, found.shim, {"runs": runs, "seconds": seconds}, timeout=600
                )
                rounds.append({"pair": pair, "version": impl.label, **out})
        versions = found.as_dict()
    return {
        "versions": versions,
        "value_bytes": VALUE_BYTES,
        "segment_bytes": SEGMENT_BYTES,
        "calls_per_op": runs,
        "seconds_per_op": seconds,
        "rounds": rounds,
        "summary": summarize_rounds(rounds),
    }


def summarize_rounds(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per operation: each version's round medians, their median, and the v2/v1 ratios."""
    ops = list(rounds[0]["ops"])
    summary: dict[str, dict[str, Any]] = {}
    for op in ops:
        per: dict[str, list[float]] = {"v1": [], "v2": []}
        paired: dict[int, dict[str, float]] = {}
        for rnd in rounds:
            median = rnd["ops"][op]["median_us"]
            per[rnd["version"]].append(median)
            paired.setdefault(rnd["pair"], {})[rnd["version"]] = median
        pair_ratios = [p["v2"] / p["v1"] for p in paired.values() if "v1" in p and "v2" in p]
        v1_med, v2_med = statistics.median(per["v1"]), statistics.median(per["v2"])
        summary[op] = {
            "v1_round_medians_us": per["v1"],
            "v2_round_medians_us": per["v2"],
            "v1_median_us": v1_med,
            "v2_median_us": v2_med,
            "ratio": v2_med / v1_med,
            "pair_ratios": pair_ratios,
            "pair_ratio_median": statistics.median(pair_ratios),
        }
    return summary


def render(data: dict[str, Any], info: dict[str, str], quick: bool) -> str:
    summary = data["summary"]
    versions = data["versions"]
    rows = []
    for op, s in summary.items():
        pr = s["pair_ratios"]
        verdict = ""
        if op in TARGET_OPS:
            verdict = "met" if s["ratio"] < TARGET_RATIO else "**NOT met**"
        rows.append(
            [
                op,
                f"{fmt_us(s['v1_median_us'])} ({fmt_us(min(s['v1_round_medians_us']))}-"
                f"{fmt_us(max(s['v1_round_medians_us']))})",
                f"{fmt_us(s['v2_median_us'])} ({fmt_us(min(s['v2_round_medians_us']))}-"
                f"{fmt_us(max(s['v2_round_medians_us']))})",
                f"{s['ratio']:.3f}",
                f"{s['pair_ratio_median']:.3f} ({min(pr):.3f}-{max(pr):.3f})",
                verdict,
            ]
        )
    load = [r["loadavg"] for r in data["rounds"]]
    n_pairs = len(data["rounds"]) // 2
    return "\n".join(
        [
            "# Overhead of lock/table version 2 over version 1 (raw table, 300 B)"
            + (" (--quick smoke run: few samples, do not commit)" if quick else ""),
            "",
            machine_header(info),
            f"| v1 measured | {versions['v1']['describe']} |",
            f"| v2 measured | {versions['v2']['describe']} |",
            "",
            f"Method: {2 * n_pairs} rounds, each in a fresh subprocess importing one version "
            "(PYTHONPATH at its tree), in ABBA order (v1 v2 v2 v1 ...). A round times each "
            f"operation call by call (up to {data['calls_per_op']:,} calls or "
            f"{data['seconds_per_op']:g} s) on a private 64 MiB segment with "
            f"{data['value_bytes']} B values and 32-character keys, and keeps the median. "
            "Below: per version the median of its round medians (range over rounds), µs; "
            "ratio = v2 / v1 of those; pair ratio = median (range) of v2/v1 within each ABBA "
            f"pair. Target (issue 10): get and set add under 10 % (ratio < {TARGET_RATIO:.2f}). "
            f"1-min load average seen by the rounds: {min(load):.2f}-{max(load):.2f}.",
            "",
            md_table(
                [
                    "operation",
                    "v1 µs median (range)",
                    "v2 µs median (range)",
                    "ratio v2/v1",
                    "pair ratio median (range)",
                    "target",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, few samples")
    parser.add_argument("--v1-ref", default=V1_REF, help=f"version 1 commit (default {V1_REF})")
    parser.add_argument(
        "--v2-ref", default=None, help="version 2 commit (default: this working tree)"
    )
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    info = machine_info()
    data = run(args.quick, args.v1_ref, args.v2_ref)
    markdown = render(data, info, args.quick)
    path = write_results("overhead", markdown, {"machine": info, "overhead": data})
    print(markdown)
    log(f"versus_v1: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
