"""The harness's report: markdown tables (ours, each peer, ratio ours / peer), the targets of
issue 12 with a verdict, and PNG plots (matplotlib, when installed)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.beat import PEERS

try:  # optional (the bench extra): without it, no plots
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
except ImportError:
    plt = None
from bench.common import machine_lines, markdown

Cell = tuple[str, float | None]  # text, and the number a ratio is taken of


def fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "-"
    return f"{ours / peer:.2f}x"


# -- beat --------------------------------------------------------------------------------------


def _dispatch(result: dict[str, Any], k: int, first: bool = True) -> dict[str, Any] | None:
    found = [d for d in result.get("dispatch", []) if d["due"] == k]
    return (found[0] if first else found[-1]) if found else None


def _cap_text(d: dict[str, Any]) -> str:
    return f"> {d['total_s']:.0f} s ({d['done']:,} sent)"


BeatMetric = tuple[str, Callable[[dict[str, Any]], Cell]]


def _startup(r: dict[str, Any]) -> Cell:
    return fmt_s(r["startup_s"]), r["startup_s"]


def _idle(key: str) -> Callable[[dict[str, Any]], Cell]:
    def cell(r: dict[str, Any]) -> Cell:
        value = r["idle"][key]
        return f"{value:.2f} ms ({r['idle']['count']})", value

    return cell


def _dispatch_time(k: int) -> Callable[[dict[str, Any]], Cell]:
    def cell(r: dict[str, Any]) -> Cell:
        d = _dispatch(r, k)
        if d is None:
            return "-", None
        if "skipped" in d:
            return "not run (smaller K capped)", None
        if d["capped"]:
            return _cap_text(d), None
        return fmt_s(d["total_s"]), d["total_s"]

    return cell


def _rate(k: int) -> Callable[[dict[str, Any]], Cell]:
    def cell(r: dict[str, Any]) -> Cell:
        d = _dispatch(r, k)
        if d is None or "skipped" in d:
            return "-", None
        rate = d["done"] / d["total_s"] if d["total_s"] else 0.0
        text = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        # A capped rate is an upper bound of the peer's (it was still sending).
        return (f"< {text} (capped)", rate) if d["capped"] else (text, rate)

    return cell


def _repeat(r: dict[str, Any]) -> Cell:
    value = r.get("repeat_median_s")
    return (fmt_s(value), value) if value is not None else ("-", None)


def _pickup(r: dict[str, Any]) -> Cell:
    p = r.get("pickup")
    if p is None:
        return "no live edit", None
    if p["capped"]:
        return f"> {p['total_s']:.0f} s", None
    ticks = "tick" if p["ticks"] == 1 else "ticks"
    return f"{p['ticks']} {ticks}, {fmt_s(p['total_s'])}", p["total_s"]


def _pickup_tick(r: dict[str, Any]) -> Cell:
    p = r.get("pickup")
    if p is None or p["capped"]:
        return "-", None
    return fmt_s(p["last_tick_s"]), p["last_tick_s"]


def _rss(r: dict[str, Any]) -> Cell:
    return f"{r['peak_rss_mb']:.1f} MiB", r["peak_rss_mb"]


def beat_metrics(dues: list[int]) -> list[BeatMetric]:
    metrics: list[BeatMetric] = [
        ("start-up: app + scheduler + tick 1", _startup),
        ("idle tick median (ticks)", _idle("median_ms")),
        ("idle tick p99", _idle("p99_ms")),
    ]
    for i, k in enumerate(dues):
        metrics.append(
            (f"dispatch {k:,} due{', fresh process' if i == 0 else ''}", _dispatch_time(k))
        )
        metrics.append((f"  slots/s, {k:,} due", _rate(k)))
        if i == 0:
            metrics.append((f"  dispatch {k:,} due, median of repeats", _repeat))
    metrics += [
        ("pick-up of one edit (ticks, time)", _pickup),
        ("  the tick that had it", _pickup_tick),
        ("peak RSS (VmHWM)", _rss),
    ]
    return metrics


def beat_table(beat: dict[str, Any]) -> str:
    results = beat["results"]
    names = [n for n in ("ours", *PEERS) if any(r["scheduler"] == n for r in results)]
    peers = [n for n in names if n != "ours"]
    header = ["metric", "N", "ours"]
    for peer in peers:
        header += [peer, "ratio"]
    rows: list[list[str]] = []
    sizes = sorted({r["n"] for r in results})
    by = {(r["scheduler"], r["n"]): r for r in results}
    for label, cell in beat_metrics(list(beat["options"]["dues"])):
        for n in sizes:
            ours = by.get(("ours", n))
            if ours is None or "timeout_s" in ours:
                continue
            ours_text, ours_value = cell(ours)
            row = [label, f"{n:,}", ours_text]
            for peer in peers:
                r = by.get((peer, n))
                if r is None:
                    row += ["-", "-"]
                elif "timeout_s" in r:
                    row += [f"> {r['timeout_s']:.0f} s (whole run)", "-"]
                else:
                    text, value = cell(r)
                    shown = ratio(ours_value, value)
                    if text.startswith("<") and shown != "-":
                        shown = f"> {shown}"  # ours / an upper bound of the peer's rate
                    row += [text, shown]
            if any(cell != "-" for cell in row[2::2]):  # a row nobody measured is left out
                rows.append(row)
    return markdown(header, rows)


def ours_detail(beat: dict[str, Any]) -> str:
    header = ["ours, detail", "N", "value"]
    rows: list[list[str]] = []
    for r in beat["results"]:
        if r["scheduler"] != "ours" or "extra" not in r:
            continue
        n, extra = f"{r['n']:,}", r["extra"]
        for kind in ("plain", "sweep"):
            s = extra[f"idle_{kind}"]
            rows.append(
                [
                    f"idle {kind} ticks ({s['count']}): median / p99",
                    n,
                    f"{s['median_ms']:.2f} / {s['p99_ms']:.2f} ms",
                ]
            )
        for d, detail in zip(r["dispatch"], extra["dispatch_detail"], strict=False):
            rows.append(
                [
                    f"dispatch {d['due']:,}: total / claim_due (SQL + planning) / planning / CPU",
                    n,
                    f"{fmt_s(d['total_s'])} / {fmt_s(detail['claim_s'])} / "
                    f"{fmt_s(detail['plan_s'])} / {fmt_s(d['cpu_s'])}",
                ]
            )
            rows.append(
                [
                    f"  messages in Redis / run rows (of {d['due']:,})",
                    n,
                    f"{detail['queued']:,} / {detail['run_rows']:,}",
                ]
            )
        uses = any(
            "ix_scheduled_actions_due" in line for line in extra["plans"].get("due_query", [])
        )
        rows.append(["due query uses ix_scheduled_actions_due", n, "yes" if uses else "NO"])
    return markdown(header, rows) if rows else ""


# -- targets -----------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("holds" if ok else "MISSED")


def beat_targets(beat: dict[str, Any]) -> list[list[str]]:
    by = {(r["scheduler"], r["n"]): r for r in beat["results"] if "timeout_s" not in r}
    sizes = sorted({n for _, n in by})
    rows: list[list[str]] = []
    k = beat["options"]["dues"][0]
    for n in sizes:
        ours, red = by.get(("ours", n)), by.get(("RedBeat", n))
        if not ours or not red:
            continue
        o, p = _rate(k)(ours)[1], _rate(k)(red)[1]
        if o is not None and p:
            rows.append(
                [
                    f"dispatch {k:,} due, fresh process, N={n:,}: >= 3x RedBeat's slots/s",
                    f"{o:,.0f} vs {p:,.0f} slots/s = {o / p:.2f}x",
                    verdict(o >= 3 * p),
                ]
            )
    largest = max(sizes) if sizes else None
    big = by.get(("ours", 100_000))
    d = _dispatch(big, 10_000) if big else None
    rows.append(
        [
            "10,000 due at N=100k in <= 2 s",
            _cap_text(d) if d and d["capped"] else (fmt_s(d["total_s"]) if d else "not measured"),
            verdict(None if d is None else (not d["capped"] and d["total_s"] <= 2.0)),
        ]
    )
    if largest is not None and ("ours", largest) in by and ("RedBeat", largest) in by:
        o, p = by[("ours", largest)], by[("RedBeat", largest)]
        om, pm = o["idle"]["median_ms"], p["idle"]["median_ms"]
        rows.append(
            [
                f"idle tick median at N={largest:,} <= 1.5x RedBeat's",
                f"{om:.2f} vs {pm:.2f} ms = {om / pm:.2f}x",
                verdict(om <= 1.5 * pm),
            ]
        )
        pairs = [
            (n, by[("ours", n)]["peak_rss_mb"], by[("RedBeat", n)]["peak_rss_mb"])
            for n in sizes
            if ("ours", n) in by and ("RedBeat", n) in by
        ]
        n_worst, o_worst, p_worst = max(pairs, key=lambda t: t[1] / t[2])
        rows.append(
            [
                "beat peak RSS <= 1.5x RedBeat's (the worst N)",
                f"N={n_worst:,}: {o_worst:.1f} vs {p_worst:.1f} MiB = {o_worst / p_worst:.2f}x",
                verdict(o_worst <= 1.5 * p_worst),
            ]
        )
        orss = [o for _, o, _ in pairs]
        spread = max(orss) - min(orss)
        rows.append(
            [
                "beat peak RSS flat in N (max - min <= 10 MiB)",
                f"{spread:.1f} MiB",
                verdict(spread <= 10),
            ]
        )
    for n in sizes:
        p = by.get(("ours", n), {}).get("pickup")
        if p:
            rows.append(
                [
                    f"pick-up of an edit at N={n:,}: one tick, the tick <= 5 ms",
                    f"{p['ticks']} tick(s), that tick {fmt_s(p['last_tick_s'])}",
                    verdict(p["ticks"] == 1 and p["last_tick_s"] <= 0.005),
                ]
            )
    return rows


def targets_table(results: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    if "beat" in results:
        rows += beat_targets(results["beat"])
    for section in ("workers", "lateness", "pipelines"):
        rows += results.get(section, {}).get("targets", [])
    return markdown(["target (issue 12)", "measured", "verdict"], rows) if rows else ""


# -- the whole report --------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    out = ["```text", *machine_lines(results["machine"])]
    end = " ".join(f"{x:.2f}" for x in results.get("load_at_end", []))
    out += [
        f"load at end: {end}",
        f"total run time: {results.get('total_s', 0):.0f} s",
        f"mode: {'quick' if results.get('quick') else 'full'}",
        "```",
        "",
    ]
    if "beat" in results:
        beat = results["beat"]
        out += [
            "## Beat",
            "",
            "ratio = ours / peer (below 1: ours takes less time or memory; "
            "above 1 on slots/s: ours is faster)",
            "",
            beat_table(beat),
            "",
        ]
        for name, why in beat["skipped"].items():
            out.append(f"* {name} skipped: {why}")
        sql_sizes = beat["options"].get("sql_sizes")
        if sql_sizes:
            shown = ", ".join(f"{n:,}" for n in sql_sizes)
            out.append(f"* quick mode: the SQL peers run at N = {shown} only (full mode: all N)")
        opts = beat["options"]
        out.append(
            f'* cap {opts["cap_s"]:g} s per dispatch or pick-up ("> cap": what was sent by '
            f"then); idle ticks: up to {opts['ticks']} in {opts['idle_budget_s']:g} s, at least "
            f"20; the first K repeated {opts['reps']} times"
        )
        detail = ours_detail(beat)
        out += ["", detail, ""] if detail else []
    for section in ("workers", "lateness", "pipelines"):
        if section in results:
            out += [f"## {section.capitalize()}", "", *results[section]["tables"], ""]
    targets = targets_table(results)
    if targets:
        out += ["## Targets", "", targets, ""]
    return "\n".join(out).rstrip() + "\n"


# -- plots -------------------------------------------------------------------------------------


def plots(results: dict[str, Any], directory: Path) -> list[str]:
    if plt is None:
        return ["plots skipped: matplotlib is not installed (make bench installs it)"]
    written: list[str] = []
    if "beat" in results:
        beat = results["beat"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in beat["options"]["dues"]:
            for name in ("ours", *PEERS):
                points = [
                    (r["n"], d)
                    for r in beat["results"]
                    if r["scheduler"] == name
                    and (d := _dispatch(r, k)) is not None
                    and "skipped" not in d
                ]
                if not points:
                    continue
                xs = [n for n, _ in points]
                ys = [d["total_s"] / max(1, d["done"]) * 1000 for _, d in points]
                style = "-o" if k == beat["options"]["dues"][0] else "--s"
                ax.plot(xs, ys, style, label=f"{name}, {k:,} due")
                for x, y, (_, d) in zip(xs, ys, points, strict=True):
                    if d["capped"]:
                        ax.annotate("capped: at least", (x, y), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N entries in the schedule")
        ax.set_ylabel("ms per dispatched slot (fresh process)")
        ax.set_title("Dispatch cost vs N (K due slots at one instant)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / "dispatch_vs_n.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(f"wrote {path}")
    workers = results.get("workers")
    if workers and workers.get("runs"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for side in ("guarded", "raw"):
            runs = sorted(
                (r for r in workers["runs"] if r["side"] == side), key=lambda r: r["concurrency"]
            )
            ax.plot(
                [r["concurrency"] for r in runs],
                [r["tasks_per_s"] for r in runs],
                "-o",
                label={"guarded": "ours (guarded run_task)", "raw": "raw Celery no-op"}[side],
            )
        ax.set_xlabel("worker processes (--concurrency)")
        ax.set_ylabel("tasks/s")
        ax.set_yscale("log")
        ax.set_title("Worker throughput vs processes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = directory / "workers_vs_processes.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(f"wrote {path}")
    return written


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
