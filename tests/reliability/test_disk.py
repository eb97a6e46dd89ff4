"""The ledger fills up: it prunes what is settled to keep working, says so once (near its
cap, or full: then notifications are held, not acked, not spun on), nothing crashes, and
everything is synced once space returns."""

from __future__ import annotations

import sqlite3
import time
import uuid

from daemon import Daemon
from helpers import stores_of, upload_image, wait_for

CAP_MB = 1


def _fill(path, megabytes: int) -> sqlite3.Connection:
    """Another connection (no cap) grows the file past the daemon's cap and leaves no free page."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    conn.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
    conn.execute("INSERT INTO filler VALUES (zeroblob(?))", (megabytes << 20,))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return conn


def test_a_full_ledger_holds_notifications_and_recovers_when_space_returns(
        sandbox, admin_conn, tmp_path, figures):
    prefix = f"disk{uuid.uuid4().hex[:6]}"
    d = Daemon(sandbox, tmp_path / "d", f"""
version: 1
rules:
  - name: disk
    match: {{name: "{prefix}-*"}}
    stores: [slow]
""", {"imagesync": {"ledger_max_size_mb": CAP_MB}})
    d.start()
    filler = _fill(d.ledger_path, 2 * CAP_MB)

    images = [upload_image(admin_conn, 4096, name=f"{prefix}-{i:02}") for i in range(40)]
    full_at = time.monotonic()
    said = wait_for(lambda: [e["event"] for e in d.logs() if e.get("event", "").startswith(
        ("ledger full", "ledger near its cap", "cannot record notifications"))], timeout=60,
        message="the daemon to say its ledger is at or near its cap")
    held = sandbox.queues().get(d.pool)
    window = 20.0
    wait_for(lambda: time.monotonic() - full_at >= window, timeout=window + 5, interval=1,
             message="an observation window while the ledger is full")
    attempts = [e for e in d.logs() if e.get("event", "").startswith("cannot record")]
    synced_while_full = sum(1 for i in images if "slow" in stores_of(admin_conn, i.id))
    assert d.proc.poll() is None, "the daemon died when its ledger filled up"

    filler.execute("DELETE FROM filler")  # space returns (the pages go to the free list)
    freed_at = time.monotonic()
    for image in images:
        wait_for(lambda i=image: stores_of(admin_conn, i.id) == {"fast", "slow"}, timeout=120,
                 message=f"{image.id} synced once space returned")
    recovered = time.monotonic() - freed_at
    wait_for(lambda: sandbox.queues().get(d.pool) == (0, 0), timeout=60, interval=1,
             message="the held notifications consumed")
    starts = [e for e in d.logs() if e.get("event") == "imagesync started"]
    d.stop()
    filler.close()
    for image in images:
        admin_conn.image.delete_image(image, ignore_missing=True)

    command = "tox -e reliability -- -k full_ledger"
    figures("disk full", "ledger cap / filled to", f"{CAP_MB} MiB / {2 * CAP_MB + 1} MiB", command)
    figures("disk full", f"ledger write attempts logged in {window:.0f} s while full",
            len(attempts), command)
    figures("disk full", "what the daemon said (first), and the queue then (ready, unacked)",
            f"{said[0].split(':')[0]}; {held}", command)
    figures("disk full", "daemon crashes / restarts", len(starts) - 1, command)
    figures("disk full", "images synced while full / after space returned",
            f"{synced_while_full} / {len(images)}", command)
    figures("disk full", "time to sync everything once space returned", f"{recovered:.1f} s",
            command)
    assert len(starts) == 1
    assert len(attempts) <= 4 * 5, "the listener spun on the full ledger instead of backing off"
    assert sum(1 for e in said if e.startswith("ledger full")) <= 1, "said once, not per write"
