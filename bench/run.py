"""Run every benchmark and write BENCHMARKS.md from scratch: `tox -e bench`.

Each benchmark runs RUNS times (IMAGESYNC_BENCH_RUNS, default 3) on the benchmarks'
own sandbox (.sandbox-bench, kept between runs for its 10,000-image catalogue) and
reports min / median / max beside a baseline measured in the same run.
`python -m bench.run ingest reaction` runs some of them (and still rewrites the file).
IMAGESYNC_BENCH_QUICK=1 runs them at their smallest scale (a smoke run) and prints the
sections instead of writing BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import subprocess
import sys
import time

from bench.common import QUICK, ROOT, RUNS, get_sandbox

ORDER = ["ingest", "reaction", "convergence", "convergence_ceph", "long_copy",
         "imports_per_image", "reconcile", "status", "idle", "ledger_size"]


def main(argv: list[str]) -> int:
    names = argv or ORDER
    sections, started = [], time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        sections.append(importlib.import_module(f"bench.bench_{name}").run())
    if QUICK:
        print("\n".join(s.markdown() for s in sections))
        print(f"smoke run (IMAGESYNC_BENCH_QUICK) in {(time.monotonic() - started) / 60:.1f} "
              "min; BENCHMARKS.md left as it was")
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    header = (
        "# imagesync benchmarks\n\n"
        f"Written by `tox -e bench` (`python -m bench.run`) on {datetime.date.today()} at "
        f"commit {commit}: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, real RabbitMQ, MariaDB, Keystone 30 and two Glance "
        f"{get_sandbox().glance_release} API nodes behind HAProxy with TLS, on loopback. "
        f"Every figure is min / median / max over {RUNS} runs, beside a baseline measured "
        "in the same run; ratios compare medians. Took "
        f"{(time.monotonic() - started) / 60:.1f} min.\n\n")
    (ROOT / "BENCHMARKS.md").write_text(header + "\n".join(s.markdown() for s in sections))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
