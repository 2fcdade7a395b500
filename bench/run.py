"""The benchmark harness: gathering-tasks next to its peers, every figure beside theirs.

    .venv/bin/python bench/run.py [--quick] [--only beat,workers,lateness,pipelines]
                                  [--json PATH] [--out DIR]

Starts one throwaway PostgreSQL and Redis on loopback ports (``tests/servers.py``) and runs, in
one go, four sections:

1. beat (``bench/beat.py``): ours, RedBeat, sqlalchemy-celery-beat, django-celery-beat and
   Celery's PersistentScheduler at N entries, each in a fresh subprocess;
2. workers (``bench/workers.py``): guarded ``run_task`` runs against a raw Celery no-op task,
   real ``celery worker`` processes, 1, 2 and 4 pool processes, with per-process CPU;
3. lateness (``bench/lateness.py``): start minus slot through real beat and workers, and
   across a leader failover (two beats, the leader SIGKILLed);
4. pipelines (``bench/pipelines.py``): a 100-node chain and a 100-wide fan-out/fan-in against
   Celery ``chain`` and ``chord``.

Prints markdown tables (every figure, the peer's, and the ratio ours / peer), the targets of
issue 12 with a verdict, writes ``--json PATH``, and PNG plots. The full mode writes
everything under ``bench/results/<YYYY-MM-DD>/`` (table.md, results.json, *.png). A peer whose
package is missing is skipped, and the report says so. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Run as a script, the repo root (gathering_tasks, tests, bench) is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lateness, pipelines, report, workers
from bench.beat import BeatOptions, measure_beat
from bench.common import ROOT, machine, make_log, start_servers, stop_on_sigterm

SECTIONS = ("beat", "workers", "lateness", "pipelines")
FULL_BEAT = BeatOptions(
    sizes=(1_000, 10_000, 100_000),
    dues=(1_000, 10_000),
    cap_s=15.0,
    reps=3,
    ticks=500,
    idle_budget_s=5.0,
    child_timeout_s=420.0,
)
QUICK_BEAT = BeatOptions(
    sizes=(1_000, 10_000),
    dues=(1_000,),
    cap_s=3.0,
    reps=1,
    ticks=200,
    idle_budget_s=1.0,
    child_timeout_s=60.0,
    # Loading and starting the SQL peers at 10k alone takes ~20 s each: full mode only.
    sql_sizes=(1_000,),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gathering-tasks next to its peers.")
    parser.add_argument("--quick", action="store_true", help="smoke run, under 2 minutes")
    parser.add_argument(
        "--only",
        type=lambda text: tuple(part for part in text.split(",") if part),
        default=SECTIONS,
        help=f"comma-separated sections (default: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="beat: comma-separated N (default 1000,10000,100000; quick 1000,10000)",
    )
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument(
        "--render",
        type=Path,
        help="measure nothing: print the report of a results.json written before",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for table.md, results.json and the plots "
        "(full mode default: bench/results/<date>/; quick: none)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def beat_options(args: argparse.Namespace) -> BeatOptions:
    opts = QUICK_BEAT if args.quick else FULL_BEAT
    if args.sizes:
        opts = BeatOptions(**{**opts.__dict__, "sizes": args.sizes})
    return opts


def measure(args: argparse.Namespace, stack: ExitStack, log: Any) -> dict[str, Any]:
    log("starting PostgreSQL and Redis")
    servers = start_servers(stack)
    results: dict[str, Any] = {"machine": machine(servers), "quick": args.quick}
    if "beat" in args.only:
        results["beat"] = measure_beat(servers, beat_options(args), log)
    if "workers" in args.only:
        results["workers"] = workers.measure(servers, quick=args.quick, log=log)
    if "lateness" in args.only:
        results["lateness"] = lateness.measure(servers, quick=args.quick, log=log)
    if "pipelines" in args.only:
        results["pipelines"] = pipelines.measure_for_harness(servers, stack, args.quick, log)
    results["load_at_end"] = list(os.getloadavg())
    return results


def output_dir(args: argparse.Namespace) -> Path | None:
    if args.out:
        return args.out
    if args.quick or set(args.only) != set(SECTIONS):
        return None
    return ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y-%m-%d}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(report.render(json.loads(args.render.read_text())))
        return 0
    # Our beat engine and API run in this process too (queueing the workers' runs): their
    # warnings (skipped catch-up slots, leadership) would drown the progress lines.
    logging.getLogger("gathering_tasks").setLevel(logging.ERROR)
    stop_on_sigterm()
    log = make_log()
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            results = measure(args, stack, log)
    except KeyboardInterrupt:
        log("interrupted; everything started here is stopped")
        return 130
    results["total_s"] = time.monotonic() - started
    text = report.render(results)
    print(text)
    out = output_dir(args)
    paths = [args.json] if args.json else []
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        paths.append(out / "results.json")
    for path in paths:
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot_dir = out or (args.json.parent if args.json else None)
    if plot_dir:
        for line in report.plots(results, plot_dir):
            log(line)
    log(f"done in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
