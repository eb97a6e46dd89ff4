"""Demo on the sandbox: the imagesync daemon syncs freshly uploaded images by policy.

Run by tools/demo after the sandbox is up. The sandbox has the shape operators run:
Keystone, two Glance API nodes behind HAProxy with TLS, RabbitMQ, MariaDB. The demo
writes a config and an example policy under .sandbox/demo, starts imagesync-daemon as
its Keystone user (clouds.yaml cloud `sandbox`: admin of project `imagesync`), uploads
images as two projects (`imagesync`, and `tenant-a` as its admin `owner-a`), and prints
each image's stores until they match the policy. Exits non-zero if they do not within
two minutes. `--keep` leaves the daemon running.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import openstack.config  # noqa: E402
import openstack.connection  # noqa: E402

import sandbox  # noqa: E402

TENANT = "tenant-a"       # the second project; its admin may make images public
TENANT_CLOUD = "sandbox-owner"
REQUEST = re.compile(r"\] (GET|POST|PUT|PATCH|DELETE|HEAD) \S+ => ")


def policy(tenant_id: str) -> str:
    return f"""\
version: 1
rules:
  - name: public-everywhere-but-edge
    match:
      visibility: public
    stores: all
    exclude_stores: [edge]
  - name: {TENANT}-at-the-edge
    match:
      projects: [{tenant_id}]   # {TENANT}
    stores: [edge]
  - name: golden-on-slow
    match:
      tags: [golden]
    stores: [slow]
"""


def connect(box, cloud: str = sandbox.CLOUD):
    """openstacksdk as a clouds.yaml cloud: Keystone, then Glance from its catalogue."""
    region = openstack.config.OpenStackConfig(config_files=[str(box.clouds_yaml)],
                                              load_envvars=False).get_one(cloud)
    return openstack.connection.Connection(config=region)


def upload(conn, name, visibility="shared", tags=()):
    image = conn.image.create_image(name=name, disk_format="raw", container_format="bare",
                                    visibility=visibility, tags=list(tags))
    conn.image.put(f"/images/{image.id}/file", data=os.urandom(4 << 20),
                   headers={"Content-Type": "application/octet-stream",
                            "X-Image-Meta-Store": "fast"})
    return image


def log_ends(box) -> dict[str, int]:
    return {n: box.node_log(n).stat().st_size for n in sandbox.NODES}


def requests_since(box, since: dict[str, int]) -> dict[str, int]:
    """Requests each Glance API node logged after `since` (its uWSGI access log)."""
    counts = {}
    for node, offset in since.items():
        with open(box.node_log(node), "rb") as f:
            f.seek(offset)
            counts[node] = len(REQUEST.findall(f.read().decode(errors="replace")))
    return counts


def show_shape(box, admin) -> None:
    """Where things are: Keystone, the catalogue's Glance endpoint (HAProxy), its nodes."""
    endpoint = admin.session.get_endpoint(service_type="image", interface="internal",
                                          region_name=sandbox.REGION)
    print("the sandbox:")
    print(f"  Keystone           {box.keystone_url} (TLS, CA {box.cacert})")
    print(f"  Glance (catalogue) {endpoint}: HAProxy, TLS, round robin over")
    for node in sandbox.NODES:
        print(f"    {node:16} {box.node_url(node)}  (access log {box.node_log(node)})")
    print(f"  RabbitMQ           127.0.0.1:{box.state['rabbit']['port']}/{sandbox.VHOST} "
          "(imagesync reads Glance's notifications as its own user)")
    print(f"  projects           imagesync {box.projects['imagesync']}, "
          f"{TENANT} {box.projects[TENANT]}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the daemon running")
    args = parser.parse_args()
    box = sandbox.Sandbox(os.environ.get("IMAGESYNC_SANDBOX_DIR", sandbox.DEFAULT_DIR))
    admin, tenant = connect(box), connect(box, TENANT_CLOUD)
    show_shape(box, admin)
    work = box.dir / "demo"
    work.mkdir(exist_ok=True)
    text = policy(box.projects[TENANT])
    (work / "policy.yaml").write_text(text)
    (work / "imagesync.conf").write_text(
        f"[DEFAULT]\ntransport_url = {box.transport_url}\n"
        f"[imagesync]\npolicy_file = {work}/policy.yaml\nledger_path = {work}/ledger.sqlite\n"
        f"cloud = {sandbox.CLOUD}\nclouds_file = {box.clouds_yaml}\nlog_format = json\n"
        "[copy]\npoll_interval = 0.5\n[reconcile]\ninterval = 300\n")
    (work / "imagesync.conf").chmod(0o600)  # the RabbitMQ password is in it
    print(f"policy ({work / 'policy.yaml'}):\n{text}")
    since = log_ends(box)
    log = open(work / "daemon.log", "ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "imagesync.cmd", "--config-file", str(work / "imagesync.conf")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (work / "daemon.pid").write_text(str(daemon.pid))
    print(f"imagesync-daemon started (pid {daemon.pid}, log {work / 'daemon.log'}), "
          f"as Keystone user imagesync (cloud {sandbox.CLOUD!r})")

    tag = uuid.uuid4().hex[:4]
    wanted = {}
    for conn, who, name, vis, tags, stores in [
        (admin, "imagesync", f"ubuntu-public-{tag}", "public", (), {"fast", "slow"}),
        (tenant, TENANT, f"edge-app-{tag}", "private", (), {"fast", "edge"}),
        (tenant, TENANT, f"golden-public-{tag}", "public", ("golden",), {"fast", "slow", "edge"}),
        (admin, "imagesync", f"scratch-{tag}", "private", (), {"fast"}),
    ]:
        image = upload(conn, name, vis, tags)
        wanted[image.id] = (name, stores)
        print(f"uploaded {name:24} {vis:8} as {who:9} to fast; "
              f"the policy wants {','.join(sorted(stores))}")

    deadline, last, ok = time.monotonic() + 120, None, False
    while time.monotonic() < deadline:
        images = {i: admin.image.get_image(i) for i in wanted}
        now = {i: set((image.properties.get("stores") or "").split(","))
               for i, image in images.items()}
        if now != last:
            print("  " + "  ".join(f"{wanted[i][0]}: {','.join(sorted(s))}"
                                   for i, s in now.items()))
            last = now
        ok = all(now[i] == stores for i, (_, stores) in wanted.items())
        if ok and not any(i.properties.get("os_glance_import_task") for i in images.values()):
            break
        if daemon.poll() is not None:
            print(f"the daemon exited with {daemon.returncode}; see {work / 'daemon.log'}")
            return 1
        time.sleep(0.5)
    print("every image is where the policy wants it" if ok else "NOT synced within 2 minutes")
    spread = requests_since(box, since)
    print("Glance requests (the daemon's and this demo's), as HAProxy spread them: " +
          ", ".join(f"{node} {n}" for node, n in spread.items()))
    subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                    str(work / "imagesync.conf"), "status"], check=False)
    if args.keep:
        print(f"daemon left running: kill {daemon.pid}")
    else:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(60)
        print("daemon stopped; the sandbox is still up (python3 tools/sandbox.py down)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
