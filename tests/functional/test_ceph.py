"""Stories of the daemon with the sandbox's real Ceph RBD store, `ceph`.

An RBD store is where copies differ from a file store's: the bytes land in a Ceph pool (read
back here with `rbd export`), a qcow2 image there is useless for clones (store suitability
holds it back), and Ceph refuses a write Glance's cephx user may not make. The sandbox runs
Ceph by default; one started without it fails these tests, never skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import sandbox_ceph

from daemon import Daemon, import_requests
from helpers import import_settled, qcow2, stores_of, upload_image, wait_for

# Glance's cephx user's OSD caps in the sandbox, and the same user made read-only: what an
# operator's mistake (or a pool being migrated) looks like to Glance.
WRITABLE = "profile rbd pool=images"
READ_ONLY = "profile rbd-read-only pool=images"


def to_ceph(prefix: str) -> str:
    return f"""
version: 1
rules:
  - name: {prefix}-ceph
    match: {{name: "{prefix}-*"}}
    stores: [ceph]
"""


def imagesync(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                           str(d.conf_file), *args], capture_output=True, text=True, timeout=120)


def set_glance_osd_caps(state: dict, osd: str) -> None:
    sandbox_ceph.ceph(state, "auth", "caps", f"client.{sandbox_ceph.GLANCE_USER}",
                      "mon", "profile rbd", "osd", osd, "mgr", "profile rbd pool=images")


def test_a_raw_image_is_copied_to_ceph_and_rbd_holds_the_same_bytes(
        sandbox, ceph, admin_conn, daemon, prefix):
    d = daemon(to_ceph(prefix)).start()
    data = os.urandom(16 << 20)

    image = upload_image(admin_conn, len(data), name=f"{prefix}-raw", data=data)

    wait_for(lambda: d.copies(image.id) == {"ceph": "done"}, timeout=120,
             message="the copy to ceph done in the ledger")
    assert stores_of(admin_conn, image.id) == {"fast", "ceph"}
    assert image.id in sandbox_ceph.rbd_images(ceph)
    assert sandbox.rbd_checksum(image.id) == hashlib.md5(data).hexdigest()
    assert import_requests(sandbox, image.id) == 1


def test_a_qcow2_image_is_held_back_from_ceph_with_the_reason_shown(
        sandbox, ceph, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: {prefix}-everywhere
    match: {{name: "{prefix}-*"}}
    stores: [slow, ceph]
""").start()

    image = upload_image(admin_conn, 0, name=f"{prefix}-qcow2", disk_format="qcow2",
                         data=qcow2())

    # The slow copy is made; the ceph copy is skipped: Glance would copy qcow2 bytes into RBD,
    # where no volume could be cloned from them
    wait_for(lambda: d.copies(image.id) == {"slow": "done", "ceph": "cancelled"}, timeout=60,
             message="slow copied and ceph skipped")
    reason = "qcow2 image on rbd store ceph cannot be cloned there (copy-image does not convert)"
    row = d.copy(image.id, "ceph")
    assert (row["error_kind"], row["error_message"], row["attempts"]) == ("skipped", reason, 0)
    assert stores_of(admin_conn, image.id) == {"fast", "slow"}
    assert image.id not in sandbox_ceph.rbd_images(ceph)
    assert import_requests(sandbox, image.id) == 1     # the slow copy's, ceph not in it

    status = imagesync(d, "status", image.id, "-f", "json")
    assert status.returncode == 0, status.stderr
    shown = {c["store"]: c for c in json.loads(status.stdout)["copies"]}
    assert shown["ceph"]["error_kind"] == "skipped" and shown["ceph"]["error_message"] == reason
    plan = imagesync(d, "plan", image.id, "-f", "json")
    assert plan.returncode == 0, plan.stderr
    planned = {c["store"]: c for c in json.loads(plan.stdout)["copies"]}
    assert planned["ceph"]["action"] == "skip" and planned["ceph"]["reason"] == reason
    explain = imagesync(d, "explain", image.id)
    assert explain.returncode == 0, explain.stderr
    assert reason in explain.stdout


def test_a_copy_ceph_refuses_is_recorded_with_glances_reason_and_retried(
        sandbox, ceph, admin_conn, daemon, prefix):
    # Given Glance's cephx user may only read the pool
    set_glance_osd_caps(ceph, READ_ONLY)
    try:
        d = daemon(to_ceph(prefix), {"copy": {"backoff_base": 5, "backoff_cap": 5}}).start()
        data = os.urandom(4 << 20)
        image = upload_image(admin_conn, len(data), name=f"{prefix}-ro", data=data)

        # Then the copy fails inside the import, and waits its backoff with Glance's reason
        row = wait_for(lambda: (r := d.copy(image.id, "ceph")) is not None
                       and r["state"] == "retrying" and r, timeout=120,
                       message="the ceph copy failed and retrying")
        assert row["error_kind"] == "copy_failed", dict(row)
        # (Glance's reason, from its error notification: librbd's EPERM)
        assert "RBD permission error" in row["error_message"], dict(row)
        assert stores_of(admin_conn, image.id) == {"fast"}
        assert image.id not in sandbox_ceph.rbd_images(ceph)
    finally:
        set_glance_osd_caps(ceph, WRITABLE)

    # When the caps are given back, the retry after the backoff lands the same bytes
    wait_for(lambda: d.copies(image.id) == {"ceph": "done"}, timeout=120,
             message="the retried copy done")
    assert import_settled(admin_conn, image.id)
    assert stores_of(admin_conn, image.id) == {"fast", "ceph"}
    assert sandbox.rbd_checksum(image.id) == hashlib.md5(data).hexdigest()
    assert import_requests(sandbox, image.id) == 2
    assert d.copy(image.id, "ceph")["attempts"] == 2
