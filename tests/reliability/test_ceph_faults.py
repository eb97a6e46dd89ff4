"""Ceph faults under a running daemon: the OSD stopped in the middle of a copy to the `ceph`
store, and the pool full by its quota.

In both, librados holds Glance's writes until Ceph can take them again (a default Glance sets
no `rados_connect_timeout`), so the import stays open with its lock held. imagesync must
wait without a second import, without hammering Glance, and without recording a failure, then
find the copy done, with the same bytes in RBD, once Ceph is back. Requests are counted at
the Glance API nodes' access logs. The figures go to the RELIABILITY.md table.
"""

from __future__ import annotations

import hashlib
import os
import time

import sandbox_ceph

import sandbox as sandbox_mod
from daemon import import_requests
from helpers import import_settled, stores_of, upload_image, wait_for

# Seconds Ceph cannot write, the copy in the middle: 20 at full scale, 10 in CI.
OUTAGE = 20.0 if os.environ.get("IMAGESYNC_RELIABILITY") == "full" else 10.0
RATE = 8.0               # MiB/s the sandbox's Glance writes to `ceph` at in the OSD story
SIZE = 64 << 20          # so that its copy takes 8 s: the OSD stops in its middle
# GETs of the image allowed while Ceph holds the copy: the polls back off (double), so the
# count grows with the log of the window (6 in 10 s and in 20 s measured); a poll a second
# would be 10 or 20.
MAX_GETS = 8


def command(keyword: str) -> str:
    return f"tox -e reliability -- tests/reliability/test_ceph_faults.py -k {keyword}"


def image_gets(sandbox, image_id: str) -> int:
    return sum(1 for node in sandbox_mod.NODES
               for line in sandbox.node_log(node).read_text(errors="replace").splitlines()
               if f"GET /v2/images/{image_id} " in line)


def to_ceph(prefix: str) -> str:
    return (f"version: 1\nrules:\n  - name: {prefix}-ceph\n    match: {{name: \"{prefix}-*\"}}\n"
            f"    stores: [ceph]\n")


def held_by_ceph(sandbox, conn, d, image_id: str, scenario: str, keyword: str,
                 figures) -> None:
    """While Ceph holds the write for OUTAGE seconds: one import, the lock held, the copy in
    flight with no error, and few GETs."""
    gets_before, t0 = image_gets(sandbox, image_id), time.monotonic()
    while time.monotonic() - t0 < OUTAGE:
        row = d.copy(image_id, "ceph")
        assert row["state"] == "in_flight" and row["error_kind"] is None, dict(row)
        time.sleep(1)   # the observation window's sampling step, not a wait for an outcome
    gets = image_gets(sandbox, image_id) - gets_before     # the daemon's: the test sent none
    assert not import_settled(conn, image_id), "the import ended while Ceph held the write"
    assert "ceph" not in stores_of(conn, image_id)
    figures(scenario, f"GETs of the image while Ceph held the copy ({OUTAGE:.0f} s)", gets,
            command(keyword))
    assert gets <= MAX_GETS, f"{gets} GETs in {OUTAGE:.0f} s"
    assert import_requests(sandbox, image_id) == 1


def converged(sandbox, conn, d, image_id: str, data: bytes) -> None:
    wait_for(lambda: d.copies(image_id) == {"ceph": "done"}, timeout=120,
             message="the copy to ceph done once Ceph took writes again")
    assert stores_of(conn, image_id) == {"fast", "ceph"}
    assert sandbox.rbd_checksum(image_id) == hashlib.md5(data).hexdigest()
    assert import_requests(sandbox, image_id) == 1
    assert d.copy(image_id, "ceph")["attempts"] == 1


def test_the_osd_stopped_in_the_middle_of_a_copy_to_ceph_loses_nothing(
        sandbox, ceph, admin_conn, daemon, prefix, figures):
    data = os.urandom(SIZE)
    image = upload_image(admin_conn, SIZE, name=f"{prefix}-osd", data=data)
    sandbox.set_store_rate("ceph", RATE)
    try:
        d = daemon(to_ceph(prefix)).start()
        # When the OSD stops while Glance writes the copy (its lock held, a second in)
        wait_for(lambda: admin_conn.image.get_image(image.id).properties.get(
            "os_glance_import_task"), timeout=30, interval=0.05, message="the import started")
        time.sleep(1)   # into the copy's 8 s: the moment the fault strikes
        sandbox.stop_service("ceph-osd")
        try:
            # Then the daemon waits on the import: no second one, no failure, few GETs
            held_by_ceph(sandbox, admin_conn, d, image.id, "OSD stopped mid-copy", "osd",
                         figures)
        finally:
            restarted_at = time.monotonic()
            sandbox.start_service("ceph-osd")     # returns once every PG is active+clean
        clean = time.monotonic() - restarted_at
    finally:
        sandbox.set_store_rate("ceph", None)

    # And once the OSD is back the copy finishes: done in the ledger, the same bytes in RBD
    converged(sandbox, admin_conn, d, image.id, data)
    done = time.monotonic() - restarted_at
    figures("OSD stopped mid-copy", "seconds from the OSD's start to every PG active+clean",
            f"{clean:.1f}", command("osd"))
    figures("OSD stopped mid-copy", "seconds from the OSD's start to the copy done in the "
            "ledger", f"{done:.1f}", command("osd"))


def test_a_copy_to_a_pool_full_by_its_quota_waits_and_lands_once_the_quota_is_lifted(
        sandbox, ceph, admin_conn, daemon, prefix, figures):
    data = os.urandom(8 << 20)
    image = upload_image(admin_conn, len(data), name=f"{prefix}-full", data=data)
    # Given the pool is full by its quota (one object: the pool's own directory objects
    # already exceed it)
    sandbox.set_pool_quota(max_objects=1)
    try:
        sandbox_ceph.wait_pool_full(ceph)
        # When the daemon copies the image to ceph, Ceph holds the write
        d = daemon(to_ceph(prefix)).start()
        wait_for(lambda: d.copy(image.id, "ceph") is not None
                 and d.copy(image.id, "ceph")["state"] == "in_flight", timeout=30,
                 message="the copy to ceph sent")
        sent_at = time.monotonic()
        held_by_ceph(sandbox, admin_conn, d, image.id, "pool full (quota)", "pool", figures)
    finally:
        sandbox.clear_pool_quota()
    sandbox_ceph.wait_pool_full(ceph, full=False)

    # Then, with the quota lifted, the same import finishes: no failure, no retry
    converged(sandbox, admin_conn, d, image.id, data)
    figures("pool full (quota)", "seconds from the copy's start to done (quota lifted after "
            f"{OUTAGE:.0f} s)", f"{time.monotonic() - sent_at:.1f}", command("pool"))
