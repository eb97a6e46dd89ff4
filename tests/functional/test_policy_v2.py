"""Policy version 2 on the real sandbox: deny rules, globs on names and property values,
size, age and hidden matchers, decided by the daemon from Glance's own images and counted
at Glance's API nodes (imports sent, or none)."""

from __future__ import annotations

from daemon import Daemon, import_requests
from helpers import Images, connect, import_settled, stores_of, upload_image, wait_for

POLICY = """version: 2
rules:
  - name: named-to-slow
    match: {{name: "{p}-*"}}
    stores: [slow]
  - name: big-to-edge
    match: {{name: "{p}-*", size: {{min: 64KiB}}}}
    stores: [edge]
  - name: ubuntu-family-to-edge
    match: {{name: "{p}-*", properties: {{os_distro: "ubu*"}}}}
    stores: [edge]
  - name: old-to-edge
    match: {{name: "{p}-*", age: {{min: 30d}}}}
    stores: [edge]
deny:
  - name: hidden-nowhere
    match: {{hidden: true}}
    stores: all
  - name: tenant-a-not-on-slow
    match: {{projects: [{tenant}]}}
    stores: [slow]
"""


def upload_hidden(conn, size: int, name: str):
    """An image hidden (os_hidden) from its creation, then uploaded (the SDK's create sends
    is_hidden as a string, which Glance refuses)."""
    resp = conn.image.post("/images", json={"name": name, "disk_format": "raw",
                                            "container_format": "bare", "os_hidden": True})
    assert resp.status_code == 201, resp.text
    image_id = resp.json()["id"]
    resp = conn.image.put(f"/images/{image_id}/file", data=b"h" * size,
                          headers={"Content-Type": "application/octet-stream",
                                   "X-Image-Meta-Store": "fast"})
    assert resp.status_code == 204, resp.text
    return conn.image.get_image(image_id)


def test_deny_globs_size_age_and_hidden_decide_where_images_go(sandbox, admin_conn, tmp_path,
                                                                 prefix):
    d = Daemon(sandbox, tmp_path / "d", POLICY.format(p=prefix,
                                                      tenant=sandbox.projects["tenant-a"]))
    d.start()
    images = Images()
    owner = connect(sandbox, "sandbox-owner")
    try:
        up = {
            "small": images.upload(sandbox, admin_conn, 4096, f"{prefix}-small"),
            "big": images.upload(sandbox, admin_conn, 128 << 10, f"{prefix}-big"),
            "ubuntu": upload_image(admin_conn, 4096, name=f"{prefix}-ubuntu",
                                   os_distro="ubuntu"),
            "debian": upload_image(admin_conn, 4096, name=f"{prefix}-debian",
                                   os_distro="debian"),
            "hidden": upload_hidden(admin_conn, 4096, f"{prefix}-hidden"),
            "tenant": upload_image(owner, 4096, name=f"{prefix}-tenant", visibility="public"),
        }
        images.made += [(sandbox, admin_conn, up[k].id) for k in
                        ("ubuntu", "debian", "hidden", "tenant")]
        want = {"small": {"fast", "slow"}, "big": {"fast", "slow", "edge"},
                "ubuntu": {"fast", "slow", "edge"}, "debian": {"fast", "slow"},
                "hidden": {"fast"}, "tenant": {"fast"}}
        for key, stores in want.items():
            image_id = up[key].id
            wait_for(lambda i=image_id: d.query("SELECT 1 FROM images WHERE id = ? AND "
                                                "seen_at IS NOT NULL", i),
                     timeout=60, message=f"the daemon to look at {key}")
            wait_for(lambda i=image_id, s=stores: stores_of(admin_conn, i) == s and
                     import_settled(admin_conn, i), timeout=60,
                     message=f"{key} in {sorted(stores)}")
        # (the daemon writes its plan with its look: nothing open for the images kept put)
        planned = {key: set(d.copies(up[key].id).values()) for key in ("hidden", "tenant")}
        assert not planned["hidden"] and not planned["tenant"] & {"pending", "in_flight"}, \
            planned
        got = {key: stores_of(admin_conn, up[key].id) for key in want}
        sent = {key: import_requests(sandbox, up[key].id) for key in want}
        print(f"stores: {got}; imports at the API nodes: {sent}")
        assert got == want
        # one import each for those the policy sends somewhere, none for the others
        assert sent == {"small": 1, "big": 1, "ubuntu": 1, "debian": 1, "hidden": 0,
                        "tenant": 0}
        # and explain names the deny rule that decided
        out = d.cli("explain", up["tenant"].id)
        assert "tenant-a-not-on-slow" in out.stdout and "desired: none" in out.stdout, out.stdout
    finally:
        d.stop()
        images.delete_all()
