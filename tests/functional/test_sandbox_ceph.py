"""The sandbox's `ceph` store is real RBD: Glance's copy lands in the Ceph pool `images`, as
the same bytes, and Glance's own cephx user can do no more than a real Glance's.

The cluster is part of the default sandbox (tools/sandbox_ceph.py): a sandbox started without
it (IMAGESYNC_SANDBOX_CEPH=0, `up --no-ceph`) fails these tests, it never skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import sandbox_ceph

from helpers import import_settled, stores_of, wait_for


def test_glance_lists_ceph_as_an_rbd_store_on_the_sandbox_cluster(sandbox, ceph, admin_conn):
    stores = {s["id"]: s for s in admin_conn.image.get("/info/stores/detail").json()["stores"]}

    assert set(stores) == {"fast", "slow", "edge", "ceph"}
    assert stores["ceph"]["type"] == "rbd"
    assert stores["ceph"]["properties"]["pool"] == "images"
    assert stores["ceph"]["properties"]["fsid"] == sandbox.ceph_state["fsid"]


def test_an_image_copied_to_ceph_is_in_rbd_with_the_same_bytes(sandbox, ceph, admin_conn):
    data = os.urandom(8 << 20)
    md5 = hashlib.md5(data).hexdigest()
    image = admin_conn.image.create_image(name=f"test-rbd-{uuid.uuid4().hex[:8]}",
                                          disk_format="raw", container_format="bare")
    resp = admin_conn.image.put(f"/images/{image.id}/file", data=data,
                                headers={"Content-Type": "application/octet-stream",
                                         "X-Image-Meta-Store": "fast"})
    assert resp.status_code == 204, resp.text
    assert image.id not in sandbox_ceph.rbd_images(sandbox.ceph_state)

    resp = admin_conn.image.import_image(image, method="copy-image", stores=["ceph"])

    assert resp.status_code == 202, resp.text
    wait_for(lambda: import_settled(admin_conn, image.id)
             and stores_of(admin_conn, image.id) == {"fast", "ceph"},
             timeout=120, message="the copy to ceph")
    assert image.id in sandbox_ceph.rbd_images(sandbox.ceph_state)
    assert sandbox.rbd_checksum(image.id) == md5
    # Glance keeps a protected snapshot of each image it stores in RBD.
    snaps = sandbox_ceph.rbd(sandbox.ceph_state, "snap", "ls", f"images/{image.id}")
    assert "snap" in snaps.split()

    # With the file copy gone, Glance serves the image from RBD: the same bytes again.
    assert admin_conn.image.delete(f"/stores/fast/{image.id}").status_code == 204
    assert stores_of(admin_conn, image.id) == {"ceph"}
    served = admin_conn.image.get(f"/images/{image.id}/file")
    assert served.status_code == 200
    assert hashlib.md5(served.content).hexdigest() == md5

    admin_conn.image.delete_image(image.id)
    wait_for(lambda: image.id not in sandbox_ceph.rbd_images(sandbox.ceph_state), timeout=30,
             message="the RBD image removed with the Glance image")


def test_glances_cephx_user_has_rbd_caps_on_the_images_pool_only(sandbox, ceph):
    state = sandbox.ceph_state
    caps = sandbox_ceph.ceph(state, "auth", "get", "client.glance", "-f", "json")

    assert json.loads(caps)[0]["caps"] == {"mon": "profile rbd",
                                           "osd": "profile rbd pool=images",
                                           "mgr": "profile rbd pool=images"}
    for refused in (("auth", "ls"), ("osd", "pool", "create", "not-glances")):
        try:
            sandbox_ceph.ceph(state, *refused, user="glance", timeout=20)
        except sandbox_ceph.SandboxError as exc:
            assert "EACCES" in str(exc) or "access denied" in str(exc), exc
        else:
            raise AssertionError(f"client.glance was allowed `ceph {' '.join(refused)}`")
