"""Stories of the ledger staying small, with the real daemon on the real sandbox.

A deleted image's rows leave the ledger once its retention has passed (short retention
and prune interval in these tests), and a ledger at its size cap makes room by pruning
what is settled instead of holding every new notification.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from daemon import Daemon
from helpers import stores_of, upload_image, wait_for

RETENTION_S = 15.0


def to_slow(prefix: str) -> str:
    return f"""
version: 1
rules:
  - name: {prefix}-slow
    match: {{name: "{prefix}-*"}}
    stores: [slow]
"""


def imagesync(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                           str(d.conf_file), *args], capture_output=True, text=True, timeout=120)


def test_a_deleted_image_s_rows_leave_the_ledger_after_the_retention(
        admin_conn, daemon, prefix):
    d = daemon(to_slow(prefix), {"ledger": {
        "keep_deleted_images_days": RETENTION_S / 86400, "prune_interval": 1}}).start()
    image = upload_image(admin_conn, 4096, name=f"{prefix}-a")
    kept = upload_image(admin_conn, 4096, name=f"{prefix}-b")
    for i in (image, kept):
        wait_for(lambda i=i: d.copies(i.id) == {"slow": "done"}, timeout=60,
                 message="the copy to slow done in the ledger")

    admin_conn.image.delete_image(image)
    wait_for(lambda: (row := d.query("SELECT deleted FROM images WHERE id = ?", image.id))
             and row[0]["deleted"] == 1, timeout=60, message="the ledger to see the deletion")
    deleted_at = time.monotonic()
    assert imagesync(d, "status", image.id).returncode == 0   # still there, within retention

    wait_for(lambda: not d.query("SELECT id FROM images WHERE id = ?", image.id),
             timeout=RETENTION_S + 60, interval=0.5, message="the deleted image's rows pruned")
    waited = time.monotonic() - deleted_at
    assert waited >= RETENTION_S - 2, f"pruned after {waited:.0f} s, before its retention"
    assert d.copies(image.id) == {}
    gone = imagesync(d, "status", image.id)
    assert gone.returncode != 0 and "the ledger has no image" in gone.stderr
    # The live image and its copy are still tracked
    assert d.copies(kept.id) == {"slow": "done"}
    assert any(e.get("event") == "ledger pruned" and e.get("images", 0) >= 1
               for e in d.logs())
    admin_conn.image.delete_image(kept)


def _fill_with_settled_copies(path, until_mb: float) -> int:
    """Another connection writes old done copies (a year ago) until the file has grown to
    `until_mb`: what a ledger that never pruned looks like."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    old = time.time() - 365 * 86400
    n = 0
    try:
        while conn.execute("PRAGMA page_count").fetchone()[0] * 4096 < until_mb * (1 << 20):
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(200):
                image_id = f"old-{n:08}"
                conn.execute("INSERT INTO images (id, status, created_at, updated_at, seen_at) "
                             "VALUES (?, 'active', ?, ?, ?)", (image_id, old, time.time(), old))
                conn.execute("INSERT INTO copies (image_id, store, state, error_message, "
                             "created_at, updated_at, finished_at) VALUES (?, 'slow', 'done', "
                             "?, ?, ?, ?)", (image_id, "x" * 300, old, old, old))
                n += 1
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return n


def test_a_ledger_at_its_cap_prunes_what_is_settled_and_keeps_copying(
        admin_conn, daemon, prefix):
    # Given a daemon whose ledger is capped at 2 MiB and already holds 2 MiB of year-old
    # settled copies (a long retention: only the cap makes it prune them)
    d = daemon(to_slow(prefix), {"imagesync": {"ledger_max_size_mb": 2},
                                 "ledger": {"keep_settled_copies_days": 3650,
                                            "prune_interval": 3600}})
    d.start()
    d.stop()
    filled = _fill_with_settled_copies(d.ledger_path, 2)
    size = d.ledger_path.stat().st_size
    d.start()
    # When new images arrive
    images = [upload_image(admin_conn, 4096, name=f"{prefix}-{i}") for i in range(5)]
    # Then they are copied as ever: the ledger made room instead of holding them
    for image in images:
        wait_for(lambda i=image: stores_of(admin_conn, i.id) == {"fast", "slow"}, timeout=90,
                 message=f"{image.id} copied to slow")
    left = d.query("SELECT count(*) AS n FROM copies WHERE image_id LIKE 'old-%'")[0]["n"]
    assert left < filled, "nothing settled was pruned"
    assert not [e for e in d.logs() if e.get("event", "").startswith("cannot record")]
    assert any(e.get("event") == "ledger near its cap: pruning ahead of the retention"
               for e in d.logs())
    assert d.ledger_path.stat().st_size <= size, "the ledger grew past its cap"
    for image in images:
        admin_conn.image.delete_image(image)
