"""Ledger size after a simulated year of a busy cloud's churn, pruned with the default
retention, beside the same year never pruned (the behaviour before pruning).

No services: the churn goes through the daemon's own ledger operations (Ops) on a real
file. The rates are in `Churn` (tests/unit/test_ledger_prune.py): 200 uploads a day, each
copied to two more stores (three in all), 80% deleted after 7 to 60 days, 10% of copies
failing once, 5 CLI requests a day, a reconcile pass a day.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Section, scale
from imagesync.ledger import Retention

from unit.test_ledger_prune import Churn, simulate_churn  # tests/ is on sys.path (common)

DAYS = scale(365, 30)


def run() -> Section:
    churn = Churn()
    work = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    section = Section(
        "Ledger size", f"A simulated year ({DAYS} days) of a busy cloud written through the "
        f"ledger's own operations: {churn.uploads} uploads a day copied to two more stores, "
        f"{1 - churn.kept_share:.0%} deleted after {churn.life_days[0]}-{churn.life_days[1]} "
        f"days, {churn.retry_share:.0%} of copies failing once, {churn.requests} CLI requests "
        "and a reconcile pass a day. Pruned daily with the default retention (30 days for "
        "deleted images, settled copies and requests) versus never pruned "
        "(`python -m bench.bench_ledger_size`).")
    figures = {}
    for label, retention in (("pruned", Retention()), ("never pruned", None)):
        started = time.perf_counter()
        figures[label] = simulate_churn(work / f"{label.replace(' ', '-')}.db", DAYS, retention,
                                        churn, every=91, report=lambda day, f, label=label:
                                        print(f"  {label}, day {day}: {_text(f)}", flush=True))
        figures[label]["seconds"] = time.perf_counter() - started
    pruned, kept = figures["pruned"], figures["never pruned"]
    section.row("ledger file after a year (MiB)", f"{pruned['file_mb']:.1f}",
                f"{kept['file_mb']:.1f}", f"{pruned['file_mb'] / kept['file_mb']:.2f}x",
                "well under 100 MiB")
    section.row("rows after a year: images / copies / requests",
                f"{pruned['images']} / {pruned['copies']} / {pruned['requests']}",
                f"{kept['images']} / {kept['copies']} / {kept['requests']}")
    section.note(f"{pruned['uploads']} uploads in the year; the simulation took "
                 f"{pruned['seconds']:.0f} s pruned, {kept['seconds']:.0f} s never pruned")
    return section


def _text(figures: dict) -> str:
    return (f"{figures['file_mb']:.1f} MiB file, {figures['in_use_mb']:.1f} MiB in use, "
            f"{figures['images']} images, {figures['copies']} copies")


if __name__ == "__main__":
    print(run().markdown())
