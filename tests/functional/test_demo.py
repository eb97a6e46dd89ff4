"""The README's first command, `tools/demo`, run as a user runs it, on a sandbox of its own.

The demo is the product's main job on a fresh machine: it starts the production-shaped sandbox
(Ceph included), three daemons, and a failover. Nothing else runs it, and it once expected the
stores of a sandbox without Ceph: it waited for `fast,slow` where the policy's `stores: all`
also meant `ceph`. Its own sandbox, because its policy matches every public image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import sandbox as sandbox_mod
from helpers import connect, stores_of

ROOT = Path(__file__).resolve().parents[2]


def test_tools_demo_syncs_by_policy_onto_ceph_and_survives_a_failover(tmp_path):
    # A long directory, as a deep checkout has: HAProxy takes socket paths of 97 characters at
    # most (a pytest-xdist worker's tmp_path once made it 98, and `up` failed).
    where = tmp_path / "a-sandbox-in-a-directory-whose-path-is-long"
    assert len(str(where / "haproxy" / "admin.sock")) > 97
    env = {**os.environ, "IMAGESYNC_SANDBOX_DIR": str(where),
           "IMAGESYNC_DEMO_VENV": sys.prefix}   # this venv has imagesync installed
    env.pop("IMAGESYNC_SANDBOX_CEPH", None)     # the demo's default: Ceph in
    try:
        done = subprocess.run([ROOT / "tools" / "demo"], env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        box = sandbox_mod.Sandbox(where)   # its state, as tools/demo's `up` left it
        assert box.ceph, "tools/demo started the sandbox without Ceph"
        assert {k: v for k, v in box.haproxy_servers().items() if k.startswith("glance")} == {
            f"glance_api_nodes/{n}": "UP" for n in sandbox_mod.NODES}   # its admin socket
        assert "every image is where the policy wants it" in out
        assert re.search(r"ctl\d took over [\d.]+ s after the kill", out), out[-4000:]

        # At the server: Glance's stores for each image the demo uploaded, and the bytes in RBD.
        tag = re.search(r"uploaded ubuntu-public-(\w+)", out).group(1)
        conn = connect(box)
        images = {i.name: i for i in conn.image.images() if i.name.endswith(f"-{tag}")}
        everywhere_but_edge = {"fast", "slow", "ceph"}
        assert {name: stores_of(conn, image.id) for name, image in images.items()} == {
            f"ubuntu-public-{tag}": everywhere_but_edge,
            f"edge-app-{tag}": {"fast", "edge"},
            f"golden-public-{tag}": everywhere_but_edge | {"edge"},
            f"scratch-{tag}": {"fast"},
            f"after-failover-{tag}": everywhere_but_edge,
        }
        for name in (f"ubuntu-public-{tag}", f"after-failover-{tag}"):
            image = conn.image.get_image(images[name].id)
            assert box.rbd_checksum(image.id) == image.checksum, name
    finally:
        sandbox_mod.Sandbox(where).down()
