"""SIGKILL the daemon again and again in the middle of copies: nothing is lost."""

from __future__ import annotations

import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from daemon import Daemon, import_requests
from helpers import stores_of, upload_image, wait_for


def test_sigkill_at_random_moments_during_a_sync_of_100_copies_loses_no_copy(
        sandbox, admin_conn, tmp_path, scale, figures):
    prefix = f"crash{uuid.uuid4().hex[:6]}"
    size = (50 if scale["full"] else 16) << 20
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda i: upload_image(admin_conn, size, name=f"{prefix}-{i:02}"),
                               range(50)))
    d = Daemon(sandbox, tmp_path / "d", f"""
version: 1
rules:
  - name: crash-test
    match: {{name: "{prefix}-*"}}
    stores: [slow, edge]
""", {"copy": {"max_imports": 4}})
    rng = random.Random(20261125)
    t0 = time.monotonic()
    kills = 0
    try:
        d.start()
        for _ in range(scale["kills"]):
            # A random moment while the ledger shows a copy in flight.
            wait_for(lambda: d.query("SELECT 1 FROM copies WHERE state = 'in_flight'"),
                     timeout=60, interval=0.01, message="a copy in flight")
            time.sleep(rng.uniform(0, 0.3))  # the random moment, not a wait for an outcome
            d.kill()
            kills += 1
            wait_for(lambda: not d.children(), timeout=10, message="the killed processes gone")
            d.start()
        for image in images:
            wait_for(lambda i=image: stores_of(admin_conn, i.id) == {"fast", "slow", "edge"}
                     and not admin_conn.image.get_image(i.id).properties.get(
                         "os_glance_import_task"),
                     timeout=300, message=f"{image.id} in every store")
        wait_for(lambda: d.query("SELECT count(*) AS n FROM copies WHERE state = 'done' "
                                 "AND image_id IN (SELECT id FROM images WHERE name LIKE ?)",
                                 f"{prefix}-%")[0]["n"] == 100,
                 timeout=60, message="the ledger to show all 100 copies done")
        converged = time.monotonic() - t0
        d.stop()
    finally:
        if d.proc and d.proc.poll() is None:
            d.kill()
        for image in images:
            admin_conn.image.delete_image(image, ignore_missing=True)
    imports = sum(import_requests(sandbox, i.id) for i in images)
    lost = 100 - sum(1 for r in d.query(
        "SELECT state FROM copies WHERE state = 'done' AND image_id IN "
        "(SELECT id FROM images WHERE name LIKE ?)", f"{prefix}-%"))
    command = "tox -e reliability -- -k sigkill_at_random"
    figures("crash", "SIGKILLs during a sync of 100 copies", kills, command)
    figures("crash", "image size", f"{size >> 20} MiB", command)
    figures("crash", "copies lost", lost, command)
    figures("crash", "imports issued / minimum needed", f"{imports} / {len(images)}", command)
    figures("crash", "time to converge (all kills included)", f"{converged:.1f} s", command)
    assert lost == 0
    assert imports <= len(images) + 4 * kills  # at most one extra per import in flight per kill
