"""Demo on the sandbox: three imagesync daemons, one active, sync fresh images by policy.

Run by tools/demo after the sandbox is up. The sandbox has the shape operators run:
Keystone, two Glance API nodes behind HAProxy with TLS, RabbitMQ, MariaDB, Redis. The demo
writes an example policy under .sandbox/demo and starts three imagesync-daemons, as on
three controllers ctl1, ctl2, ctl3: each with its own directory .sandbox/demo/<member>/
(imagesync.conf, ledger, daemon.log, daemon.pid), all with the same policy, the same
notification pool and the same Redis as [coordination] backend_url, so that one is active
and the others stand by. They run as Keystone user imagesync (clouds.yaml cloud `sandbox`:
admin of project `imagesync`).

It prints each node's role as `imagesync status` on that node says, uploads images as two
projects (`imagesync`, and `tenant-a` as its admin `owner-a`) and prints each image's
stores until they match the policy. Then a failover: it SIGKILLs the active daemon, prints
how long until a survivor is active, uploads one more image and shows the new active
daemon sync it. Exits non-zero if no daemon becomes active within 60 s, no survivor takes
over within 30 s, or images are not synced within two minutes. `--keep` leaves the
surviving daemons running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import openstack.config  # noqa: E402
import openstack.connection  # noqa: E402

import sandbox  # noqa: E402

TENANT = "tenant-a"       # the second project; its admin may make images public
TENANT_CLOUD = "sandbox-owner"
REQUEST = re.compile(r"\] (GET|POST|PUT|PATCH|DELETE|HEAD) \S+ => ")
MEMBERS = ("ctl1", "ctl2", "ctl3")
POOL = "imagesync"        # one notification queue, read by whichever daemon is active
LEASE = 6                 # seconds: a standby takes over within about this long


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
    print(f"  Redis              127.0.0.1:{box.state['redis']['port']} "
          "(the daemons' coordination backend)")
    if box.ceph:
        print(f"  Ceph               store {sandbox.CEPH_STORE!r}: an RBD pool on a one-node "
              "cluster (mon, mgr, OSD)")
    print(f"  Glance stores      {', '.join(box.stores)}")
    print(f"  projects           imagesync {box.projects['imagesync']}, "
          f"{TENANT} {box.projects[TENANT]}")
    print()


# -- the daemons ------------------------------------------------------------------------


@dataclass
class Member:
    """One controller's imagesync-daemon: its name, directory and process."""
    name: str
    dir: Path
    proc: subprocess.Popen

    @property
    def conf(self) -> Path:
        return self.dir / "imagesync.conf"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`imagesync ARGS` on this node (its config file)."""
        return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                               str(self.conf), *args], capture_output=True, text=True,
                              check=False)

    def signal(self, sig: int) -> None:
        """Signal the daemon's process group: oslo.service's parent and its worker."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def stop_leftover(pid_file: Path) -> None:
    """Stop a daemon an earlier `--keep` left running from this directory: two daemons with
    one member id would blur which one is active."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if str(pid_file.parent / "imagesync.conf") in cmdline:   # its --config-file
        print(f"stopping the daemon an earlier run left running (pid {pid})")
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def start(box, work: Path, name: str) -> Member:
    """Start one controller's daemon: own config (0600), ledger and log; shared policy,
    notification pool and coordination backend."""
    home = work / name
    home.mkdir(exist_ok=True)
    conf = home / "imagesync.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)  # the RabbitMQ and Redis passwords are in it
    conf.write_text(
        f"[DEFAULT]\ntransport_url = {box.transport_url}\n"
        f"[imagesync]\npolicy_file = {work}/policy.yaml\nledger_path = {home}/ledger.sqlite\n"
        f"cloud = {sandbox.CLOUD}\nclouds_file = {box.clouds_yaml}\nlog_format = json\n"
        f"[notifications]\npool = {POOL}\n"
        f"[coordination]\nbackend_url = {box.coordination_url('redis')}\n"
        f"member_id = {name}\nlease = {LEASE}\n"
        "[copy]\npoll_interval = 0.5\n[reconcile]\ninterval = 300\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagesync.cmd", "--config-file", str(conf)],
        stdout=open(home / "daemon.log", "ab"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    (home / "daemon.pid").write_text(str(proc.pid))
    print(f"  {name}: imagesync-daemon pid {proc.pid}, {home}/ (imagesync.conf, daemon.log)")
    return Member(name, home, proc)


def coordination(m: Member) -> dict:
    """What `imagesync status -f json` on this node says of the coordination: its "role"
    and the "active_member" it names ({} when status fails there, e.g. no ledger yet)."""
    try:
        return json.loads(m.cli("status", "-f", "json").stdout).get("coordination") or {}
    except ValueError:
        return {}


def roles(members: list[Member]) -> dict[str, dict]:
    """coordination() of each node, asked at once."""
    with ThreadPoolExecutor(len(members)) as pool:
        return dict(zip([m.name for m in members], pool.map(coordination, members),
                        strict=True))


def became_active_at(m: Member) -> float | None:
    """When the daemon last logged "coordination: active" (epoch seconds), if it did."""
    found = None
    for line in (m.dir / "daemon.log").read_text(errors="replace").splitlines():
        if '"event":"coordination: active"' in line:
            stamp = json.loads(line[line.index("{"):])["timestamp"]
            found = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return found


def agreed_active(seen: dict[str, dict]) -> str | None:
    """The member every node names as active, provided it says so itself; else None."""
    named = {c.get("active_member") for c in seen.values()}
    if len(named) != 1:
        return None
    active = named.pop()
    return active if active in seen and seen[active].get("role") == "active" else None


def wait_active(members: list[Member], timeout: float) -> tuple[str | None, dict[str, dict]]:
    """Poll `imagesync status` on each running node until all agree on one active member
    and every other one says standby."""
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        alive = [m for m in members if m.alive()]
        if not alive:
            break
        seen = roles(alive)
        active = agreed_active(seen)
        if active and all(c.get("role") == "standby" for n, c in seen.items() if n != active):
            return active, seen
        time.sleep(0.5)
    return None, seen


def show_roles(members: list[Member], seen: dict[str, dict]) -> None:
    print("  `imagesync status` on each node:")
    for m in members:
        c = seen.get(m.name)
        if c is None:
            print(f"    {m.name}  (not running: exit {m.proc.returncode})")
            continue
        print(f"    {m.name}  role {c.get('role') or '?':8} names active: "
              f"{c.get('active_member') or '-'} (since {c.get('active_since') or '-'})")


# -- the images -------------------------------------------------------------------------


def wait_synced(admin, wanted: dict[str, tuple[str, set[str]]], members: list[Member],
                timeout: float = 120) -> bool:
    """Print each image's stores whenever they change, until every image is in the stores
    the policy wants and no import is under way; False after `timeout` or if a running
    daemon exits."""
    running = [m for m in members if m.alive()]
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        images = {i: admin.image.get_image(i) for i in wanted}
        now = {i: set((image.properties.get("stores") or "").split(","))
               for i, image in images.items()}
        if now != last:
            print("  " + "  ".join(f"{wanted[i][0]}: {','.join(sorted(s))}"
                                   for i, s in now.items()))
            last = now
        if (all(now[i] == stores for i, (_, stores) in wanted.items()) and
                not any(i.properties.get("os_glance_import_task") for i in images.values())):
            return True
        for m in running:
            if not m.alive():
                print(f"{m.name}'s daemon exited with {m.proc.returncode}; "
                      f"see {m.dir / 'daemon.log'}")
                return False
        time.sleep(0.5)
    print("NOT synced within 2 minutes")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the daemons running")
    args = parser.parse_args()
    box = sandbox.Sandbox(os.environ.get("IMAGESYNC_SANDBOX_DIR", sandbox.DEFAULT_DIR))
    admin, tenant = connect(box), connect(box, TENANT_CLOUD)
    show_shape(box, admin)
    work = box.dir / "demo"
    work.mkdir(exist_ok=True)
    for pid_file in (work / "daemon.pid", *(work / n / "daemon.pid" for n in MEMBERS)):
        stop_leftover(pid_file)   # the old demo's single daemon had work/daemon.pid
    text = policy(box.projects[TENANT])
    (work / "policy.yaml").write_text(text)
    print(f"policy ({work / 'policy.yaml'}):\n{text}")
    since = log_ends(box)
    print(f"three imagesync-daemons, as Keystone user imagesync (cloud {sandbox.CLOUD!r}), "
          f"pool {POOL!r}, coordination on Redis, lease {LEASE} s:")
    members = [start(box, work, name) for name in MEMBERS]
    try:
        return demo(box, admin, tenant, members, since)
    finally:
        alive = [m for m in members if m.alive()]
        if args.keep:
            print("daemons left running: " +
                  ", ".join(f"{m.name} pid {m.proc.pid}" for m in alive) +
                  f"; stop them with kill {' '.join(str(m.proc.pid) for m in alive)}")
        else:
            for m in alive:
                m.signal(signal.SIGTERM)
            for m in alive:
                m.proc.wait(60)
            print("daemons stopped; the sandbox is still up (python3 tools/sandbox.py down)")


def demo(box, admin, tenant, members: list[Member], since: dict[str, int]) -> int:
    active, seen = wait_active(members, 60)
    print()
    show_roles(members, seen)
    if active is None:
        print("NO daemon became active within 60 s: see each daemon.log")
        return 1
    print(f"  {active} is active: it alone reads the notifications and imports\n")

    tag = uuid.uuid4().hex[:4]
    public = set(box.stores) - {"edge"}   # `stores: all` less `exclude_stores: [edge]`
    wanted = {}
    for conn, who, name, vis, tags, stores in [
        (admin, "imagesync", f"ubuntu-public-{tag}", "public", (), public),
        (tenant, TENANT, f"edge-app-{tag}", "private", (), {"fast", "edge"}),
        (tenant, TENANT, f"golden-public-{tag}", "public", ("golden",), public | {"edge"}),
        (admin, "imagesync", f"scratch-{tag}", "private", (), {"fast"}),
    ]:
        image = upload(conn, name, vis, tags)
        wanted[image.id] = (name, stores)
        print(f"uploaded {name:24} {vis:8} as {who:9} to fast; "
              f"the policy wants {','.join(sorted(stores))}")
    if not wait_synced(admin, wanted, members):
        return 1
    print("every image is where the policy wants it")
    spread = requests_since(box, since)
    print("Glance requests (the daemons' and this demo's), as HAProxy spread them: " +
          ", ".join(f"{node} {n}" for node, n in spread.items()))
    first = next(m for m in members if m.name == active)
    print(f"\n`imagesync status` on {active}:")
    print(first.cli("status").stdout, end="")

    print(f"\nfailover: SIGKILL {active}'s daemon (pid {first.proc.pid} and its worker)")
    first.signal(signal.SIGKILL)
    killed = time.time()
    first.proc.wait(30)
    survivors = [m for m in members if m.alive()]
    new, seen = wait_active(survivors, 30)
    seen_after = time.time() - killed
    show_roles(members, seen)
    if new is None:
        print(f"NO survivor took over within 30 s (lease {LEASE} s): see each daemon.log")
        return 1
    node = next(m for m in survivors if m.name == new)
    took = (became_active_at(node) or time.time()) - killed
    print(f"  {new} took over {took:.1f} s after the kill, by its log (lease {LEASE} s); "
          f"`imagesync status` on every survivor said so {seen_after:.1f} s after the kill\n")

    name = f"after-failover-{tag}"
    image = upload(admin, name, "public")
    print(f"uploaded {name:24} public   as imagesync to fast; "
          f"the policy wants {','.join(sorted(public))}")
    if not wait_synced(admin, {image.id: (name, public)}, survivors):
        return 1
    done = node.cli("status", image.id, "-f", "json")
    copies = json.loads(done.stdout).get("copies", []) if done.returncode == 0 else []
    print(f"`imagesync status {name}` on {new}: " +
          (", ".join(f"{c['store']} {c['state']}" for c in copies) or
           f"not in its ledger ({done.stderr.strip()})"))
    missing = public - {"fast"} - {c["store"] for c in copies if c["state"] == "done"}
    if missing:
        print(f"{new}'s ledger does not show the copies to {','.join(sorted(missing))} done")
        return 1
    print(f"{new}, the new active daemon, synced it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
