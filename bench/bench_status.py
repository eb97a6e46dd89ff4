"""Benchmark 5: `imagesync status` on a ledger of 100,000 copies, as a whole process.

Builds a ledger (20,000 images x 5 stores, mixed states) in a temp dir with the
ledger's own connect() and sqlite-utils inserts, then times the CLI in fresh
subprocesses beside the bare interpreter start and the SQL alone. No sandbox.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RUNS, Section, scale, spread

IMAGES = scale(20_000, 2_000)
STORES = ("fast", "slow", "edge", "cold", "remote")
# state -> share of copies; a settled cloud: most copies done, a few of everything else.
STATE_MIX = (("done", 0.80), ("pending", 0.08), ("in_flight", 0.01), ("retrying", 0.03),
             ("failed", 0.03), ("cancelled", 0.05))
STATUS_RUNS = max(RUNS, scale(5, 2))
GOAL = 0.5


def build_ledger(path: Path, seed: int = 5) -> dict[str, int]:
    """20,000 images x 5 stores = 100,000 copies in the documented schema; counts per state."""
    from imagesync import ledger

    rng = random.Random(seed)
    db = ledger.connect(path)
    now = time.time()
    states = [s for s, _ in STATE_MIX]
    weights = [w for _, w in STATE_MIX]
    images, copies, counts = [], [], dict.fromkeys(states, 0)
    for n in range(IMAGES):
        image_id = str(uuid.UUID(int=rng.getrandbits(128)))
        images.append({
            "id": image_id, "name": f"bench-status-{n:05d}", "owner": f"project-{n % 50:02d}",
            "visibility": "shared", "status": "active", "disk_format": "raw",
            "size": 1 << 30, "stores": "fast", "hidden": 0, "reconciled_at": now,
            "created_at": now - 86400, "updated_at": now})
        for store in STORES:
            state = rng.choices(states, weights)[0]
            counts[state] += 1
            failed = state in ("failed", "retrying")
            copies.append({
                "image_id": image_id, "store": store, "state": state,
                "attempts": 6 if state == "failed" else (2 if failed else 1),
                "next_attempt_at": now + 600 if state == "retrying" else None,
                "rules": "everything,gold",
                "error_kind": "temporary" if failed else None,
                "error_status": 503 if failed else None,
                "error_message": "HTTP 503: Service Unavailable" if failed else None,
                "bytes": 1 << 30, "created_at": now - 86400,
                "updated_at": now - rng.uniform(0, 86400),
                "started_at": now - 3600, "finished_at": now - 3000 if state == "done" else None})
    with db.conn:
        db["images"].insert_all(images, batch_size=2000)
        db["copies"].insert_all(copies, batch_size=2000)
        db.execute("INSERT INTO daemon (id, pid, started_at, last_event_at, events_total, "
                   "last_reconcile_at, reconcile_seconds) VALUES (1, 1, ?, ?, 1000, ?, 12.5)",
                   (now - 7200, now - 5, now - 300))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return counts


def timed(cmd: list[str], runs: int) -> tuple[list[float], str]:
    """Wall seconds of `cmd` in fresh processes (one warm-up run first), and its last output."""
    subprocess.run(cmd, capture_output=True, check=True)
    times, out = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")
        out = done.stdout
    return times, out


def sql_seconds(path: Path, runs: int) -> tuple[list[float], list[float]]:
    """The ledger read side alone, in this process: store counts, and the failed list."""
    from imagesync import ledger

    counts, failed = [], []
    for _ in range(runs):
        conn = ledger.open_readonly(path)
        t0 = time.perf_counter()
        ledger.read_store_counts(conn)
        ledger.read_daemon(conn)
        counts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ledger.read_copies(conn, states=["failed"])
        failed.append(time.perf_counter() - t0)
        conn.close()
    return counts, failed


def import_top(config: Path, n: int = 5) -> list[tuple[str, float]]:
    """The modules whose import costs most (cumulative, -X importtime) in `status`."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "imagesync.cli",
                           "--config-file", str(config), "status"],
                          check=False, capture_output=True, text=True)
    tops = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|", 2)
        # Only modules imported at the top level (no indent), so a package and its own
        # submodules are not counted twice.
        if not name[1:].startswith(" "):
            tops.append((name.strip(), int(cumulative) / 1e6))
    return sorted(tops, key=lambda r: -r[1])[:n]


def run() -> Section:
    section = Section(
        f"Status: `imagesync status` on {IMAGES * len(STORES):,} copies",
        f"A ledger of {IMAGES:,} images x {len(STORES)} stores = {IMAGES * len(STORES):,} "
        f"copies (80 % done, the rest pending, in flight, retrying, failed, cancelled), built "
        f"with `ledger.connect` and sqlite-utils. Each figure is the wall time of a whole "
        f"process (`{Path(sys.executable).name} -m imagesync.cli --config-file C status`), "
        f"{STATUS_RUNS} runs after one warm-up, beside the bare interpreter start "
        f"(`python -c pass`) in the same run.")
    print(f"== {section.title}", flush=True)
    with tempfile.TemporaryDirectory(prefix="imagesync-bench-status-") as tmp:
        path = Path(tmp) / "ledger.sqlite"
        t0 = time.perf_counter()
        counts = build_ledger(path)
        print(f"  built the ledger in {time.perf_counter() - t0:.1f} s: {counts}", flush=True)
        config = Path(tmp) / "imagesync.conf"
        config.write_text(f"[imagesync]\nledger_path = {path}\n")
        cli = [sys.executable, "-m", "imagesync.cli", "--config-file", str(config), "status"]

        bare, _ = timed([sys.executable, "-c", "pass"], STATUS_RUNS)
        status, out = timed(cli, STATUS_RUNS)
        failed, failed_out = timed(cli + ["--failed", "-f", "value"], STATUS_RUNS)
        sql_counts, sql_failed = sql_seconds(path, STATUS_RUNS)
        lines = len(failed_out.splitlines())
        if lines != counts["failed"]:
            section.note(f"`status --failed -f value` printed {lines} lines, "
                         f"the ledger holds {counts['failed']} failed copies")
        med_bare = statistics.median(bare)

        def ratio(values):
            return f"{statistics.median(values) / med_bare:.1f}x"

        def goal(values):
            met = statistics.median(values) <= GOAL and max(values) <= GOAL
            return f"≤ {GOAL} s: {'met' if met else 'NOT met'}"

        section.row("`status` (s)", spread(status), f"{spread(bare)} (`python -c pass`)",
                    ratio(status), goal(status))
        section.row(f"`status --failed -f value` (s, {counts['failed']:,} rows)", spread(failed),
                    f"{spread(bare)} (`python -c pass`)", ratio(failed), goal(failed))
        section.row("SQL alone: store counts + daemon row (s)", spread(sql_counts))
        section.row("SQL alone: failed copies with names (s)", spread(sql_failed))
        section.note("`status` table:\n\n```\n" + out.rstrip() + "\n```")
        top = import_top(config)
        section.note("slowest top-level imports in `status` (-X importtime, cumulative): " +
                     ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in top))
    return section


if __name__ == "__main__":
    print(run().markdown())
