"""The sandbox's Ceph: a one-monitor, one-manager, one-OSD Ceph 16.2 cluster on loopback.

tools/sandbox.py runs it for Glance's `ceph` store (the `rbd` driver). Everything lives under
DIR/ceph (DIR: the sandbox directory):

    cluster/ceph.conf, cluster/keyring.client.admin     the admin's view (this module, tests)
    cluster/{mon,mgr,osd}/...                          the daemons' data (the OSD: bluestore
                                                       on a sparse file, cluster/osd/.../block.img)
    cluster/log/ceph-{mon.a,mgr.x,osd.0}.log           the daemons' logs
    glance/ceph.conf, glance/ceph.client.glance.keyring  what the Glance nodes read: the
                                                       monitor's address and client.glance's key
    pylib/{rados,rbd}.cpython-311-*.so                 Debian's bindings, for Glance's venv

cephx everywhere; pool `images` (application rbd) and client.glance with the caps a real
deployment gives Glance: `mon 'profile rbd'`, `osd 'profile rbd pool=images'`,
`mgr 'profile rbd pool=images'`. The monitor listens on two free ports (v2, v1) chosen once per
sandbox; the manager and the OSD bind in a block of free ports (`ms_bind_port_min/max`).

The daemons run in the foreground (`-f`), each its own session, stopped by PID like every
other sandbox service. The OSD is bluestore on a sparse file: its data survives a stop and a
start (SIGTERM, or SIGKILL), where memstore keeps its objects in RAM and loses every PG unless
it shuts down cleanly (../shared/ceph-rbd/RECIPE.md, pitfall 3).

Readiness is never `ceph health` alone (it says HEALTH_OK before a manager or OSD exists): the
cluster is ready when `ceph status -f json` shows the manager available, every OSD up and in
and every PG active+clean, and a read of the pool answers. Every client call is bounded by a
timeout: a client of a cluster whose PGs are not active waits forever.

Standard library only, like tools/sandbox.py (whose helpers it uses).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sandbox
from sandbox import SandboxError, log, pid_alive, stop_pid

APT_PACKAGES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-common", "python3-rados",
                "python3-rbd")
POOL = "images"
GLANCE_USER = "glance"
MON, MGR = "a", "x"
DAEMONS = ("mon", "mgr", "osd")          # start order; stop goes the other way
OSD_BYTES = 8 << 30                      # the OSD's sparse block file (bluestore)
PORT_BLOCK = 24                          # mgr 2 + OSD 8 ports (v1+v2 x 4), with room to spare
CLIENT_TIMEOUT = 30.0                    # any one ceph/rbd command
START_TIMEOUT = 180.0
# Debian's bindings: CPython 3.11 extension modules (they link librados/librbd, not libpython).
BINDINGS = Path("/usr/lib/python3/dist-packages")
BINDING_FILES = ("rados.cpython-311-x86_64-linux-gnu.so", "rbd.cpython-311-x86_64-linux-gnu.so")

Save = Callable[[], None]


def _paths(state: dict) -> dict[str, Path]:
    base = Path(state["dir"])
    cluster = base / "cluster"
    return {"base": base, "cluster": cluster, "conf": cluster / "ceph.conf",
            "log": cluster / "log", "glance": base / "glance",
            "glance_conf": base / "glance" / "ceph.conf",
            "glance_keyring": base / "glance" / f"ceph.client.{GLANCE_USER}.keyring",
            "pylib": base / "pylib"}


def conf_path(state: dict) -> Path:
    """The admin's ceph.conf (its keyring is found through it)."""
    return _paths(state)["conf"]


def glance_conf(state: dict) -> Path:
    """The ceph.conf the Glance nodes read (rbd_store_ceph_conf): client.glance's keyring."""
    return _paths(state)["glance_conf"]


def pylib(state: dict) -> Path:
    """A folder holding Debian's rados and rbd modules (symlinks), for Glance's sys.path."""
    return _paths(state)["pylib"]


def daemon_name(state: dict, kind: str) -> str:
    """Ceph's name of the sandbox's daemon of `kind` (mon, mgr, osd): mon.a, mgr.x, osd.0."""
    return {"mon": f"mon.{MON}", "mgr": f"mgr.{MGR}", "osd": f"osd.{state.get('osd_id', 0)}"}[kind]


def daemon_log(state: dict, kind: str) -> Path:
    return _paths(state)["log"] / f"ceph-{daemon_name(state, kind)}.log"


# ---------------------------------------------------------------- ports and config


def _free_port_block(count: int) -> int:
    """The first port of `count` consecutive free loopback ports below the ephemeral range
    (sandbox.free_port's reasoning); all of them are marked given."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = secrets.SystemRandom()
    for _ in range(200):
        first = rng.randrange(max(1024, low - 16000), low - count)
        ports = range(first, first + count)
        if any(p in sandbox._GIVEN for p in ports):
            continue
        if all(_bindable(p) for p in ports):
            sandbox._GIVEN.update(ports)
            return first
    raise SandboxError(f"no {count} consecutive free loopback ports below the ephemeral range")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _mon_host(state: dict) -> str:
    return f"[v2:127.0.0.1:{state['mon_port']},v1:127.0.0.1:{state['mon_v1_port']}]"


def _write_conf(state: dict) -> None:
    """The cluster's ceph.conf (rewritten at each start: ports and paths come from the state)
    and the Glance nodes' own, which names only the monitor and client.glance's keyring."""
    p = _paths(state)
    c = p["cluster"]
    common = (
        f"fsid = {state['fsid']}\n"
        f"mon_host = {_mon_host(state)}\n"
        "auth_cluster_required = cephx\nauth_service_required = cephx\n"
        "auth_client_required = cephx\n"
        "ms_bind_ipv4 = true\nms_bind_ipv6 = false\n"
    )
    p["conf"].write_text(
        "[global]\n" + common +
        f"mon_initial_members = {MON}\n"
        "public_addr = 127.0.0.1\ncluster_addr = 127.0.0.1\npublic_network = 127.0.0.0/8\n"
        f"ms_bind_port_min = {state['port_min']}\n"
        f"ms_bind_port_max = {state['port_min'] + PORT_BLOCK - 1}\n"
        "auth_allow_insecure_global_id_reclaim = false\n"
        f"keyring = {c}/keyring.$name\n"
        f"run_dir = {c}/run\n"
        f"admin_socket = {c}/run/$cluster-$name.asok\n"
        f"log_file = {c}/log/$cluster-$name.log\n"
        f"mon_cluster_log_file = {c}/log/$cluster.log\n"
        f"crash_dir = {c}/crash\n"
        # One OSD: one replica, PGs on one host, no autoscaler (it would re-split the pool's
        # PGs minutes after the start, in the middle of a test).
        "osd_pool_default_size = 1\nosd_pool_default_min_size = 1\n"
        "osd_pool_default_pg_num = 8\nosd_pool_default_pgp_num = 8\n"
        "osd_pool_default_pg_autoscale_mode = off\n"
        "osd_crush_chooseleaf_type = 0\n"
        "mon_allow_pool_size_one = true\nmon_allow_pool_delete = true\n"
        "mon_warn_on_pool_no_redundancy = false\n"
        "mon_warn_on_insecure_global_id_reclaim = false\n"
        "mon_warn_on_insecure_global_id_reclaim_allowed = false\n"
        "mon_max_pg_per_osd = 500\n"
        # PG states reach the manager each second, not each 5 s: readiness shows sooner
        "mgr_stats_period = 1\n"
        "\n[mon]\n"
        f"mon_data = {c}/mon/$cluster-$id\n"
        "mon_data_avail_warn = 5\nmon_data_avail_crit = 2\n"
        f"keyring = {c}/mon/$cluster-$id/keyring\n"
        "\n[mgr]\n"
        f"mgr_data = {c}/mgr/$cluster-$id\n"
        f"keyring = {c}/mgr/$cluster-$id/keyring\n"
        # Modules that may be left out (never an always-on one: that is HEALTH_ERR).
        "mgr_disabled_modules = diskprediction_local,restful,nfs,iostat\n"
        "\n[osd]\n"
        f"osd_data = {c}/osd/$cluster-$id\n"
        f"keyring = {c}/osd/$cluster-$id/keyring\n"
        "osd_objectstore = bluestore\n"
        f"bluestore_block_path = {c}/osd/$cluster-$id/block.img\n"
        f"bluestore_block_create = true\nbluestore_block_size = {OSD_BYTES}\n"
        "bluestore_block_db_create = false\nbluestore_block_wal_create = false\n"
        "bluestore_fsck_on_mkfs = false\n"
        "osd_memory_target = 939524096\n"
        "bluestore_cache_autotune = false\nbluestore_cache_size = 134217728\n"
        "osd_crush_update_on_start = true\nosd_class_update_on_start = false\n"
    )
    p["glance"].mkdir(parents=True, exist_ok=True)
    p["glance_conf"].write_text(
        "[global]\n" + common +
        f"\n[client.{GLANCE_USER}]\nkeyring = {p['glance_keyring']}\n")


# ---------------------------------------------------------------- client calls


def ceph(state: dict, *args: str, timeout: float = CLIENT_TIMEOUT, user: str = "admin") -> str:
    """One `ceph` command as client.<user>, bounded by `timeout`; its stdout. A failure or a
    timeout raises SandboxError with the command's output."""
    return _client(state, "ceph", args, timeout, user)


def rbd(state: dict, *args: str, timeout: float = CLIENT_TIMEOUT, user: str = "admin") -> str:
    """One `rbd` command as client.<user> (admin: the cluster's conf), bounded by `timeout`."""
    return _client(state, "rbd", args, timeout, user)


def _client(state: dict, tool: str, args: tuple[str, ...], timeout: float, user: str) -> str:
    conf = conf_path(state) if user == "admin" else glance_conf(state)
    extra = ["--connect-timeout", str(int(timeout))] if tool == "ceph" else []
    cmd = [tool, "--conf", str(conf), "--id", user, *extra, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{' '.join(cmd)}: no answer in {timeout:.0f}s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise SandboxError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")
    return done.stdout


def status(state: dict, timeout: float = 10.0) -> dict:
    """`ceph status -f json`."""
    return json.loads(ceph(state, "status", "-f", "json", timeout=timeout))


def _ready(s: dict, min_pgs: int = 0) -> str | None:
    """None when the status shows the manager available, every OSD up and in and every PG
    active+clean (at least `min_pgs` of them: a manager just started reports none); else
    what is missing."""
    osdmap = s.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)   # nested before pacific
    pgs = s.get("pgmap", {}).get("pgs_by_state", [])
    if not s.get("mgrmap", {}).get("available"):
        return "no manager available"
    num, up, in_ = (osdmap.get(k, 0) for k in ("num_osds", "num_up_osds", "num_in_osds"))
    if not num or up != num or in_ != num:
        return f"OSDs: {num} in the map, {up} up, {in_} in"
    unclean = {p["state_name"]: p["count"] for p in pgs if p["state_name"] != "active+clean"}
    if unclean:
        return f"PGs not active+clean: {unclean}"
    if sum(p["count"] for p in pgs) < min_pgs:
        return f"the manager reports {sum(p['count'] for p in pgs)} PGs, not {min_pgs}"
    return None


def wait_ready(state: dict, timeout: float = START_TIMEOUT, kind: str = "osd") -> dict:
    """Until the cluster is ready (_ready) and a read of the pool answers when it exists, twice
    in a row (a restarted manager first reports the PGs it had, or none; the OSD's start moves
    the map on). On timeout, or when a daemon of this sandbox died, SandboxError with the end
    of the log of the daemon of `kind` (or of the dead one). Returns the last status."""
    deadline = time.monotonic() + timeout
    why, good = "no answer yet", 0
    # The pool's PGs (8), once it exists
    min_pgs = 8 if state.get("pool_ready") else 0
    while time.monotonic() < deadline:
        dead = [k for k in DAEMONS if not pid_alive(state.get("pids", {}).get(k))]
        if dead:
            _fail(state, dead[0], f"{daemon_name(state, dead[0])} exited")
        try:
            s = status(state)
            why = _ready(s, min_pgs) or ""
            if not why and state.get("pool_ready"):
                rbd(state, "ls", POOL, timeout=10)   # PGs peered and serving, not stale
        except (SandboxError, ValueError) as exc:
            why = str(exc).splitlines()[0]
        good = 0 if why else good + 1
        if good >= 2:
            return s
        time.sleep(1.0)
    _fail(state, kind, f"Ceph not ready after {timeout:.0f}s ({why})")
    raise AssertionError("unreachable")


def _fail(state: dict, kind: str, what: str) -> None:
    logfile = daemon_log(state, kind)
    out = _paths(state)["log"] / f"{daemon_name(state, kind)}.out"
    tail = ""
    # The log; and what the daemon wrote before it opened its log (its stderr, which repeats
    # the log's errors): its last lines.
    for f, count in ((logfile, 30), (out, 8)):
        lines = [line for line in (f.read_text(errors="replace").splitlines()
                                   if f.exists() else []) if line.strip()]
        if lines:
            tail += f"\n-- end of {f}:\n" + "\n".join(lines[-count:])
    raise SandboxError(f"{what}{tail}")


# ---------------------------------------------------------------- daemons


def _spawn(state: dict, kind: str, save: Save) -> None:
    """Start the daemon of `kind` in the foreground, in a session of its own; its PID in the
    state."""
    p = _paths(state)
    name = daemon_name(state, kind)
    ident = {"mon": MON, "mgr": MGR, "osd": str(state.get("osd_id", 0))}[kind]
    out = open(p["log"] / f"{name}.out", "ab")   # noqa: SIM115 - the daemon's, for its life
    try:
        proc = subprocess.Popen([f"ceph-{kind}", "-f", "--conf", str(p["conf"]), "-i", ident],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()
    state.setdefault("pids", {})[kind] = proc.pid
    save()


def _stop(state: dict, kind: str) -> None:
    stop_pid(state.get("pids", {}).get(kind), f"ceph {daemon_name(state, kind)}", timeout=30)


def _run(cmd: list[str], state: dict, kind: str, timeout: float = 120.0) -> None:
    """A setup command (ceph-authtool, monmaptool, mkfs); a failure shows its output."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        _fail(state, kind, f"{' '.join(cmd)}: not done in {timeout:.0f}s")
        return
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        _fail(state, kind, f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")


def _create_mon(state: dict) -> None:
    """Keys, monmap and the monitor's store, once per sandbox."""
    p = _paths(state)
    c, tmp = p["cluster"], p["cluster"] / "mon.keyring.tmp"
    admin = c / "keyring.client.admin"
    _run(["ceph-authtool", "--create-keyring", str(tmp), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"], state, "mon")
    _run(["ceph-authtool", "--create-keyring", str(admin), "--gen-key", "-n", "client.admin",
          "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mds", "allow *",
          "--cap", "mgr", "allow *"], state, "mon")
    admin.chmod(0o600)
    _run(["ceph-authtool", str(tmp), "--import-keyring", str(admin)], state, "mon")
    _run(["monmaptool", "--create", "--addv", MON, _mon_host(state), "--fsid", state["fsid"],
          str(c / "monmap")], state, "mon")
    _run(["ceph-mon", "--conf", str(p["conf"]), "--mkfs", "-i", MON,
          "--monmap", str(c / "monmap"), "--keyring", str(tmp)], state, "mon")
    tmp.unlink()


def _create_mgr_and_osd(state: dict) -> None:
    """The manager's key; the OSD's id, key and bluestore (on a sparse file), once."""
    p = _paths(state)
    mgr_dir = p["cluster"] / "mgr" / f"ceph-{MGR}"
    mgr_dir.mkdir(parents=True, exist_ok=True)
    ceph(state, "auth", "get-or-create", f"mgr.{MGR}", "mon", "allow profile mgr",
         "osd", "allow *", "mds", "allow *", "-o", str(mgr_dir / "keyring"))
    (mgr_dir / "keyring").chmod(0o600)
    osd_uuid = str(uuid.uuid4())
    state["osd_id"] = int(ceph(state, "osd", "new", osd_uuid).strip())
    osd_dir = p["cluster"] / "osd" / f"ceph-{state['osd_id']}"
    osd_dir.mkdir(parents=True, exist_ok=True)
    # --no-mon-config: the OSD has no key yet to fetch its config from the monitor with.
    _run(["ceph-osd", "--conf", str(p["conf"]), "-i", str(state["osd_id"]), "--mkfs",
          "--mkkey", "--osd-uuid", osd_uuid, "--no-mon-config"], state, "osd", timeout=300)
    ceph(state, "auth", "add", f"osd.{state['osd_id']}", "osd", "allow *",
         "mon", "allow profile osd", "mgr", "allow profile osd",
         "-i", str(osd_dir / "keyring"))


def _create_pool_and_user(state: dict) -> None:
    """Pool `images` for RBD and client.glance with the caps of a real Glance, once: the
    monitor's part (no OSD needed; `rbd pool init` follows once the PGs are active)."""
    p = _paths(state)
    ceph(state, "osd", "pool", "create", POOL, "8", "8")
    ceph(state, "osd", "pool", "application", "enable", POOL, "rbd")
    key = ceph(state, "auth", "get-or-create", f"client.{GLANCE_USER}", "mon", "profile rbd",
               "osd", f"profile rbd pool={POOL}", "mgr", f"profile rbd pool={POOL}")
    _write_private(p["glance_keyring"], key)
    state["pool_ready"] = True


def _write_private(path: Path, text: str) -> None:
    """A key file, readable by its owner only (the Glance processes run as the same user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def link_bindings(state: dict, python: Path) -> Path:
    """pylib(state): symlinks to Debian's rados and rbd modules, and proof that `python` (a
    Glance virtualenv's) imports them from there. Only a CPython 3.11 can."""
    folder = pylib(state)
    folder.mkdir(parents=True, exist_ok=True)
    for name in BINDING_FILES:
        src, link = BINDINGS / name, folder / name
        if not src.exists():
            raise SandboxError(f"{src} is missing: install {' '.join(APT_PACKAGES)}")
        if not link.is_symlink() or os.readlink(link) != str(src):
            link.unlink(missing_ok=True)
            link.symlink_to(src)
    try:
        done = subprocess.run([str(python), "-c", "import rados, rbd"], capture_output=True,
                              text=True, timeout=60, check=False,
                              env=dict(os.environ, PYTHONPATH=str(folder)))
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{python} -c 'import rados, rbd' hung") from None
    if done.returncode != 0:
        raise SandboxError(f"{python} cannot import Debian's rados/rbd (a CPython 3.11 is "
                           f"needed):\n{done.stderr[-2000:]}")
    return folder


# ---------------------------------------------------------------- the cluster


def start(directory: Path | str, state: dict | None = None, save: Save | None = None,
          timeout: float = START_TIMEOUT) -> dict:
    """Start the cluster whose state lives in `directory` (made on the first start) and wait
    until it is ready; returns the state (ports, fsid, PIDs). `state` is the one a previous
    start returned: the same ports again. `save` is called whenever the state changes (the
    sandbox writes sandbox.json), so that a failed start can still be stopped by PID. On
    failure what was started is stopped and SandboxError shows the end of the failing
    daemon's log."""
    state = state if state is not None else {}
    save = save or (lambda: None)
    state["dir"] = str(Path(directory).resolve())
    if any(pid_alive(pid) for pid in state.get("pids", {}).values()):
        raise SandboxError(f"Ceph in {state['dir']} is already running")
    if "mon_port" not in state:
        state["mon_port"], state["mon_v1_port"] = sandbox.free_port(), sandbox.free_port()
        state["port_min"] = _free_port_block(PORT_BLOCK)
    state["pids"] = {}
    p = _paths(state)
    fresh = not state.get("created")
    if fresh:   # the first start, or one that failed half-way: from nothing
        for folder in (p["cluster"], p["glance"]):
            shutil.rmtree(folder, ignore_errors=True)
        state.update(fsid=str(uuid.uuid4()), pool_ready=False, osd_id=0)
    for sub in ("run", "log", "crash", "mon", "mgr", "osd"):
        (p["cluster"] / sub).mkdir(parents=True, exist_ok=True)
    _write_conf(state)
    save()
    t0 = time.monotonic()
    try:
        if fresh:
            _create_mon(state)
        _spawn(state, "mon", save)
        _wait_mon(state, timeout)
        if fresh:
            _create_mgr_and_osd(state)
            _create_pool_and_user(state)
        _spawn(state, "mgr", save)
        _spawn(state, "osd", save)
        wait_ready(state, timeout)
        if fresh:
            rbd(state, "pool", "init", POOL, timeout=60)
            state["created"] = True
            save()
    except BaseException:
        stop(state)
        save()
        raise
    log(f"Ceph up in {time.monotonic() - t0:.1f}s: mon {_mon_host(state)}, pool {POOL}, "
        f"client.{GLANCE_USER}")
    return state


def _wait_mon(state: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(state["pids"].get("mon")):
            _fail(state, "mon", "ceph-mon exited")
        try:
            ceph(state, "mon", "stat", timeout=10)
            return
        except SandboxError:
            time.sleep(0.3)
    _fail(state, "mon", f"ceph-mon not answering after {timeout:.0f}s")


def stop(state: dict) -> None:
    """Stop the daemons by PID: the OSD first (it tells the monitor it goes), then the
    manager and the monitor together."""
    if not state:
        return
    _stop(state, "osd")
    jobs = [threading.Thread(target=_stop, args=(state, k)) for k in ("mgr", "mon")]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()


def running(state: dict) -> dict[str, bool]:
    """Daemon -> alive: {"ceph-mon": ..., "ceph-mgr": ..., "ceph-osd": ...}."""
    return {f"ceph-{k}": pid_alive(state.get("pids", {}).get(k)) for k in DAEMONS}


def stop_osd(state: dict, save: Save | None = None, timeout: float = 60.0) -> None:
    """Stop the OSD (SIGTERM by PID) and wait until the monitor counts it down: clients' I/O
    to the pool then waits for its return."""
    _stop(state, "osd")
    (save or (lambda: None))()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = status(state)
            osdmap = s.get("osdmap", {})
            if osdmap.get("osdmap", osdmap).get("num_up_osds", 1) == 0:
                return
            # A SIGTERMed OSD tells the monitor itself; a killed one would stay "up" for
            # mon_osd_report_timeout (no peer to report it): say it.
            ceph(state, "osd", "down", daemon_name(state, "osd"), timeout=10)
        except (SandboxError, ValueError):
            pass
        time.sleep(0.5)
    _fail(state, "mon", f"the monitor still counts {daemon_name(state, 'osd')} up")


def start_osd(state: dict, save: Save | None = None, timeout: float = START_TIMEOUT) -> None:
    """Start the OSD again and wait until the cluster is ready (its PGs active+clean)."""
    start_daemon(state, "osd", save, timeout)


def stop_daemon(state: dict, kind: str, save: Save | None = None) -> None:
    """Stop one daemon (mon, mgr, osd) by PID; the OSD as stop_osd does."""
    if kind == "osd":
        stop_osd(state, save)
        return
    _stop(state, kind)
    (save or (lambda: None))()


def start_daemon(state: dict, kind: str, save: Save | None = None,
                 timeout: float = START_TIMEOUT) -> None:
    """Start one daemon (mon, mgr, osd) again and wait until the cluster is ready."""
    if pid_alive(state.get("pids", {}).get(kind)):
        raise SandboxError(f"{daemon_name(state, kind)} is already running")
    _spawn(state, kind, save or (lambda: None))
    if kind == "mon":
        _wait_mon(state, timeout)
    wait_ready(state, timeout, kind)


def set_pool_quota(state: dict, max_bytes: int | None = None,
                   max_objects: int | None = None) -> None:
    """`ceph osd pool set-quota images`: at the quota the monitor flags the pool full (from
    the next usage report, seconds later: wait_pool_full) and librados holds every write to it
    until the flag goes. A Glance copy to the store then waits, unless the store sets
    `rados_connect_timeout` (glance_store turns it into librados' op timeouts too): then the
    import fails with "RBD operation timeout (error creating image)". 0 lifts a quota."""
    for field, value in (("max_bytes", max_bytes), ("max_objects", max_objects)):
        if value is not None:
            ceph(state, "osd", "pool", "set-quota", POOL, field, str(int(value)))


def clear_pool_quota(state: dict) -> None:
    """Lift both quotas of the pool; the full flag goes with the next usage report."""
    set_pool_quota(state, max_bytes=0, max_objects=0)


def pool_full(state: dict) -> bool:
    """Whether the monitor flags the pool full (quota reached)."""
    pools = json.loads(ceph(state, "osd", "pool", "ls", "detail", "-f", "json"))
    for pool in pools:
        if pool.get("pool_name") == POOL:
            flags = str(pool.get("flags_names", ""))
            return "full" in flags.split(",") or "full_quota" in flags.split(",")
    raise SandboxError(f"no pool {POOL}")


def wait_pool_full(state: dict, full: bool = True, timeout: float = 60.0) -> None:
    """Until the monitor flags the pool full (or no longer full): a quota counts from the
    next usage report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool_full(state) == full:
            return
        time.sleep(0.5)
    raise SandboxError(f"pool {POOL} {'not ' if full else ''}full after {timeout:.0f}s")


def rbd_images(state: dict) -> list[str]:
    """The RBD images in the pool (Glance names each after its image id)."""
    return json.loads(rbd(state, "ls", POOL, "--format", "json"))


def rbd_checksum(state: dict, image: str, algorithm: str = "md5",
                 timeout: float = 300.0) -> str:
    """The hex digest of RBD image `image` of the pool, read with `rbd export` as the admin,
    streamed (no copy in memory), bounded by `timeout`."""
    digest = hashlib.new(algorithm)
    _export(state, image, digest.update, timeout)
    return digest.hexdigest()


def rbd_read(state: dict, image: str, timeout: float = 300.0) -> bytes:
    """The bytes of RBD image `image` of the pool (`rbd export` as the admin)."""
    chunks: list[bytes] = []
    _export(state, image, chunks.append, timeout)
    return b"".join(chunks)


def _export(state: dict, image: str, sink: Callable[[bytes], object], timeout: float) -> None:
    cmd = ["rbd", "--conf", str(conf_path(state)), "--id", "admin", "--no-progress",
           "export", f"{POOL}/{image}", "-"]
    deadline = time.monotonic() + timeout
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as proc:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := proc.stdout.read(1 << 20):
                sink(chunk)
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
        finally:
            timer.cancel()
    if time.monotonic() >= deadline:
        raise SandboxError(f"{' '.join(cmd)}: not done in {timeout:.0f}s")
    if proc.returncode != 0:
        raise SandboxError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    """`sandbox_ceph.py start|stop|status DIR`: the cluster alone (state in DIR/ceph.json)."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] not in ("start", "stop", "status"):
        print(__doc__.split("\n\n")[0] + "\nusage: sandbox_ceph.py start|stop|status DIR",
              file=sys.stderr)
        return 2
    base = Path(args[1]).resolve()
    file = base / "ceph.json"
    state = json.loads(file.read_text()) if file.exists() else {}

    def save() -> None:
        file.write_text(json.dumps(state, indent=1))

    try:
        if args[0] == "start":
            start(base, state, save)
        elif args[0] == "stop":
            stop(state)
        else:
            print(json.dumps({**running(state), "ready": _ready(status(state), 8) or "yes"}))
    except SandboxError as exc:
        print(f"sandbox_ceph: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
