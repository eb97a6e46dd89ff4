"""Demo on the sandbox: the imagesync daemon syncs freshly uploaded images by policy.

Run by tools/demo after the sandbox is up. Writes a config and an example policy
under .sandbox/demo, starts imagesync-daemon, uploads images as two projects,
and prints each image's stores until they match the policy. Exits non-zero if
they do not within two minutes. `--keep` leaves the daemon running.
"""

from __future__ import annotations

import argparse
import os
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

OTHER_PROJECT = "b0000000000000000000000000000b0b"
POLICY = f"""\
version: 1
rules:
  - name: public-everywhere-but-edge
    match:
      visibility: public
    stores: all
    exclude_stores: [edge]
  - name: project-b-at-the-edge
    match:
      projects: [{OTHER_PROJECT}]
    stores: [edge]
  - name: golden-on-slow
    match:
      tags: [golden]
    stores: [slow]
"""


def connect(box, headers=None):
    region = openstack.config.OpenStackConfig(config_files=[str(box.clouds_yaml)],
                                              load_envvars=False).get_one(sandbox.CLOUD)
    conn = openstack.connection.Connection(config=region)
    if headers:
        conn.session.additional_headers.update(headers)
    return conn


def upload(conn, name, visibility="shared", tags=()):
    image = conn.image.create_image(name=name, disk_format="raw", container_format="bare",
                                    visibility=visibility, tags=list(tags))
    conn.image.put(f"/images/{image.id}/file", data=os.urandom(4 << 20),
                   headers={"Content-Type": "application/octet-stream",
                            "X-Image-Meta-Store": "fast"})
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the daemon running")
    args = parser.parse_args()
    box = sandbox.Sandbox(sandbox.DEFAULT_DIR)
    work = box.dir / "demo"
    work.mkdir(exist_ok=True)
    (work / "policy.yaml").write_text(POLICY)
    (work / "imagesync.conf").write_text(
        f"[DEFAULT]\ntransport_url = {box.transport_url}\n"
        f"[imagesync]\npolicy_file = {work}/policy.yaml\nledger_path = {work}/ledger.sqlite\n"
        f"cloud = {sandbox.CLOUD}\nclouds_file = {box.clouds_yaml}\nlog_format = json\n"
        "[copy]\npoll_interval = 0.5\n[reconcile]\ninterval = 300\n")
    print(f"policy ({work / 'policy.yaml'}):\n{POLICY}")
    log = open(work / "daemon.log", "ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "imagesync.cmd", "--config-file", str(work / "imagesync.conf")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (work / "daemon.pid").write_text(str(daemon.pid))
    print(f"imagesync-daemon started (pid {daemon.pid}, log {work / 'daemon.log'})")

    admin, project_b = connect(box), connect(box, {"X-Project-Id": OTHER_PROJECT,
                                                   "X-Roles": "admin,member,reader"})
    tag = uuid.uuid4().hex[:4]
    wanted = {}
    for conn, name, vis, tags, stores in [
        (admin, f"ubuntu-public-{tag}", "public", (), {"fast", "slow"}),
        (project_b, f"edge-app-{tag}", "private", (), {"fast", "edge"}),
        (project_b, f"golden-public-{tag}", "public", ("golden",), {"fast", "slow", "edge"}),
        (admin, f"scratch-{tag}", "private", (), {"fast"}),
    ]:
        image = upload(conn, name, vis, tags)
        wanted[image.id] = (name, stores)
        print(f"uploaded {name:24} {vis:8} to fast; the policy wants {','.join(sorted(stores))}")

    deadline, last = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        now = {i: set((admin.image.get_image(i).properties.get("stores") or "").split(","))
               for i in wanted}
        if now != last:
            print("  " + "  ".join(f"{wanted[i][0]}: {','.join(sorted(s))}"
                                   for i, s in now.items()))
            last = now
        if all(now[i] == stores for i, (_, stores) in wanted.items()) and \
                not any(admin.image.get_image(i).properties.get("os_glance_import_task")
                        for i in wanted):
            break
        if daemon.poll() is not None:
            print(f"the daemon exited with {daemon.returncode}; see {work / 'daemon.log'}")
            return 1
        time.sleep(0.5)
    ok = all(now[i] == stores for i, (_, stores) in wanted.items())
    print("every image is where the policy wants it" if ok else "NOT synced within 2 minutes")
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
