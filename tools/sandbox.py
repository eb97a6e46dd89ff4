#!/usr/bin/env python3
"""A production-shaped OpenStack image service on loopback, for tests, demos and benchmarks.

    python3 tools/sandbox.py install          # apt packages + Glance's and Keystone's virtualenvs
    python3 tools/sandbox.py up [--dir D]     # start everything on free ports
    python3 tools/sandbox.py up --unified-limits  # Glance enforces Keystone unified limits
    python3 tools/sandbox.py up --glance-release 2024.1   # or 2025.1; default 33
    python3 tools/sandbox.py up --no-ceph     # without Ceph and the `ceph` store: a faster run
    python3 tools/sandbox.py env|status|down [--dir D]

The shape operators run: Keystone 30 (fernet tokens, uWSGI) and two Glance API nodes
(uWSGI, keystonemiddleware, the stock API policy) behind one HAProxy that terminates TLS with
a certificate from the sandbox's own CA; RabbitMQ with a vhost and a user per service (no
guest); MariaDB holding Keystone's and Glance's databases. imagesync reaches Glance through
Keystone's catalog, as in production. For several imagesync controllers, the coordination
backends tooz drives: Redis (password), a Redis Sentinel watching it, and etcd
(`coordination_url(backend)`). Glance is 33 unless `--glance-release` (or
$IMAGESYNC_GLANCE_RELEASE) picks 2025.1 (Glance 30) or 2024.1 (Glance 28): GLANCE_RELEASES
says how each is installed (its own virtualenv, under the release's upper-constraints carried
in tools/glance-releases/) and served. Glance's stores: fast, slow and edge (file stores) and
`ceph`, an `rbd` store on a real one-node Ceph cluster (tools/sandbox_ceph.py), unless `up` is
told to leave Ceph out (`--no-ceph`, `up(ceph=False)`, $IMAGESYNC_SANDBOX_CEPH=0).

Standard library only (it runs before any virtualenv exists). Every service keeps
its state and log under the sandbox directory, listens on 127.0.0.1 only, and is
stopped by PID. Glance and Keystone run in virtualenvs of their own.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# tools/sandbox_ceph.py imports this module as `sandbox`: run as a script, it is that module
# too (one SandboxError, one set of given ports).
sys.modules.setdefault("sandbox", sys.modules[__name__])

HERE = Path(__file__).resolve().parent
# systemd, dbus, python3-venv, util-linux, passwd: the real systemd the unit tests boot in
# namespaces (dbus for `systemd-analyze security`), and the unit's /opt/imagesync venv.
# redis-server, redis-sentinel, etcd-server: run by hand from the binaries, like the rest; what
# Debian's units would start (on 6379/2379, from /etc) is never read nor reached.
APT_PACKAGES = ("rabbitmq-server", "mariadb-server", "libmariadb-dev", "haproxy", "openssl",
                "redis-server", "redis-sentinel", "etcd-server",
                "systemd", "dbus", "python3-venv", "util-linux", "passwd")
KEYSTONE_PIP = ("keystone>=30,<31", "uwsgi>=2.0.28", "mysqlclient>=2.2")
CACHE = Path(os.environ.get("IMAGESYNC_SANDBOX_CACHE", Path.home() / ".cache/imagesync-sandbox"))
KEYSTONE_VENV = CACHE / "keystone-venv"
DEFAULT_DIR = HERE.parent / ".sandbox"
STORES = ("fast", "slow", "edge")   # the file stores
CEPH_STORE = "ceph"                 # the rbd store, on the sandbox's Ceph (unless left out)
CEPH_ENV = "IMAGESYNC_SANDBOX_CEPH"  # "0": `up` leaves Ceph out unless told
CEPH_SERVICES = ("ceph-mon", "ceph-mgr", "ceph-osd")
NODES = ("glance1", "glance2")      # two Glance API nodes behind HAProxy
REGION = "RegionOne"
CLOUD = "sandbox"                   # imagesync's own cloud: admin on project `imagesync`
# Keystone users: name -> (project, role). Passwords are random per sandbox.
USERS = {
    "glance": ("service", "admin"),        # keystonemiddleware's service user
    "imagesync": ("imagesync", "admin"),   # copy-image needs the admin role
    "owner-a": ("tenant-a", "admin"),      # an image owner allowed to make images public
    "member-a": ("tenant-a", "member"),
    "member-b": ("tenant-b", "member"),
}
# clouds.yaml entries other than CLOUD: cloud name -> Keystone user.
CLOUDS = {"sandbox-owner": "owner-a", "sandbox-member": "member-a",
          "sandbox-member-b": "member-b"}
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
VHOST = "openstack"
COORDINATION = ("redis", "sentinel", "etcd")   # tooz backends: coordination_url(backend)
SENTINEL_MASTER = "imagesync"                  # the master name the Sentinel watches
ETCD_BIN = Path("/usr/bin/etcd")
# Keystone unified limits (`up --unified-limits`): the registered (default) limit of each of
# Glance's four resources. oslo.limit counts a resource without one as limit 0, which would
# refuse every upload; sizes are in MiB.
GLANCE_LIMITS = {"image_size_total": 100000, "image_stage_total": 100000,
                 "image_count_total": 10000, "image_count_uploading": 10000}


@dataclasses.dataclass(frozen=True)
class GlanceRelease:
    """One Glance release the sandbox can run: what its virtualenv holds and how uWSGI loads it.
    Everything that differs by release lives here."""

    name: str
    pip: tuple[str, ...]
    venv: Path
    # OpenStack's upper-constraints of the release (PIP_CONSTRAINT), carried in
    # tools/glance-releases/; None: the newest of everything, as PyPI has it.
    constraints: Path | None = None
    # The uWSGI option that loads the API. Glance 28 has no glance.wsgi.api module: its
    # pbr-made bin/glance-wsgi-api script is served as a file, as devstack does.
    wsgi: str = "module = glance.wsgi.api:application"

    @property
    def uwsgi_app(self) -> str:
        return self.wsgi.format(venv=self.venv)


_RELEASES_DIR = HERE / "glance-releases"
GLANCE_RELEASES = {
    "33": GlanceRelease("33", ("glance>=33,<34", "uwsgi>=2.0.28", "mysqlclient>=2.2"),
                        CACHE / "glance-venv"),
    "2025.1": GlanceRelease("2025.1", ("glance==30.2.0", "uwsgi>=2.0.28", "mysqlclient>=2.2"),
                            CACHE / "glance-venv-2025.1",
                            _RELEASES_DIR / "upper-constraints-2025.1.txt"),
    "2024.1": GlanceRelease("2024.1", ("glance==28.2.0", "uwsgi>=2.0.28", "mysqlclient>=2.2"),
                            CACHE / "glance-venv-2024.1",
                            _RELEASES_DIR / "upper-constraints-2024.1.txt",
                            wsgi="wsgi-file = {venv}/bin/glance-wsgi-api"),
}
DEFAULT_GLANCE_RELEASE = "33"
GLANCE_RELEASE_ENV = "IMAGESYNC_GLANCE_RELEASE"   # the release `up` starts unless told


def pick_glance_release(name: str | None = None) -> GlanceRelease:
    """The release called `name`; None: $IMAGESYNC_GLANCE_RELEASE, else the default."""
    name = name or os.environ.get(GLANCE_RELEASE_ENV) or DEFAULT_GLANCE_RELEASE
    if name not in GLANCE_RELEASES:
        raise SandboxError(f"no Glance release {name!r}; known: {', '.join(GLANCE_RELEASES)}")
    return GLANCE_RELEASES[name]


class SandboxError(RuntimeError):
    """A service could not be installed, started or stopped; the message says which."""


def log(msg: str) -> None:
    print(f"[sandbox] {msg}", file=sys.stderr, flush=True)


def run(cmd, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """subprocess.run; a failure becomes a SandboxError that shows the command's output."""
    done = subprocess.run([str(c) for c in cmd], check=False, **kw)
    if check and done.returncode != 0:
        out = done.stdout or b""
        out = (out.decode(errors="replace") if isinstance(out, bytes) else out)
        err = done.stderr or b""
        err = (err.decode(errors="replace") if isinstance(err, bytes) else err)
        tail = "\n".join((out + err).splitlines()[-30:])
        raise SandboxError(f"{' '.join(str(c) for c in cmd)} exited {done.returncode}:\n{tail}")
    return done


_GIVEN: set[int] = set()
# Ports chosen but maybe not yet bound, shared by every process that starts sandboxes here
# (pytest-xdist workers, the release envs side by side): "port pid time" lines.
_CLAIMS = Path(os.environ.get("TMPDIR") or "/tmp") / "imagesync-sandbox-ports"
_CLAIM_TTL = 900.0   # by then the service bound its port, or its start failed


def _claim(port: int) -> bool:
    """Claim a port for this process, unless another live process claimed it recently."""
    now, fresh, taken = time.time(), [], False
    try:
        f = open(_CLAIMS, "a+")
    except OSError:
        return True   # another user's claims file: its sandboxes' ports fail bind() instead
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        for line in f.read().splitlines():
            try:
                p, pid, at = (int(x) for x in line.split()[:3])
            except ValueError:
                continue
            if now - at < _CLAIM_TTL and pid_alive(pid):
                fresh.append(line)
                taken = taken or p == port
        if not taken:
            fresh.append(f"{port} {os.getpid()} {int(now)}")
        f.seek(0)
        f.truncate()
        f.write("".join(line + "\n" for line in fresh))
    return not taken


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port from bind(0) lies in
    that range, and any outgoing connection may take it as its source port between our
    choosing it and the service binding it (seen: HAProxy's "Address already in use" while
    the sandbox's other services talked to each other). Claimed across processes, so two
    sandboxes starting at once never choose the same port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = secrets.SystemRandom()
    for _ in range(500):
        port = rng.randrange(max(1024, low - 16000), low)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _GIVEN.add(port)
        return port
    raise SandboxError("no free loopback port below the ephemeral range")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _resp(*args: str) -> bytes:
    """One command in RESP, the Redis protocol."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    return out


def _read_resp(f):
    """One RESP reply: str, int, None or a list; an error reply raises SandboxError."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise SandboxError(f"Redis answered: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_read_resp(f) for _ in range(int(rest))]
    raise OSError(f"not a RESP reply: {line!r}")


def redis_command(port: int, *args: str, password: str | None = None, timeout: float = 5.0):
    """Send one command to the Redis or Sentinel on 127.0.0.1:port (AUTH first when a password
    is given) and return its reply. Raises OSError or SandboxError (an error reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        commands = ([("AUTH", password)] if password else []) + [args]
        s.sendall(b"".join(_resp(*c) for c in commands))
        with s.makefile("rb") as f:
            replies = [_read_resp(f) for _ in commands]
    return replies[-1]


def wait_for(what: str, check, timeout: float, logfile: Path | None = None, proc=None) -> None:
    """Poll `check` until true; on timeout or early death, show the log's end and fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = ""
    if logfile and logfile.exists():
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-40:])
    exited = proc is not None and proc.poll() is not None
    state = "exited" if exited else f"not ready after {timeout:.0f}s"
    raise SandboxError(f"{what} {state}; end of {logfile}:\n{tail}")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:   # state, ppid, pgrp
            alive.append(int(stat.parent.name))
    return alive


def stop_pid(pid: int | None, name: str, timeout: float = 20.0) -> None:
    """SIGTERM the process group led by pid, then SIGKILL what is left; return once no
    process of the group is left (a uWSGI worker outliving its master still holds the
    listening socket, and HAProxy answers 502 through it)."""
    if not pid or not (pid_alive(pid) or group_alive(pid)):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in (lambda s=sig: os.killpg(pid, s), lambda s=sig: os.kill(pid, s)):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while (left := pid_alive(pid) or group_alive(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            return
        if sig == signal.SIGTERM:
            log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f} s; killing")
    log(f"{name} (pid {pid}): processes {group_alive(pid) or [pid]} outlived SIGKILL by "
        f"{timeout:.0f} s")


# ---------------------------------------------------------------- install


def _venv(path: Path, packages: tuple[str, ...], constraints: Path | None = None) -> None:
    """A virtualenv holding `packages` (under `constraints`, pip's PIP_CONSTRAINT); rebuilt
    when either changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder per virtualenv: tools/test builds the older releases' in the background
    # while the tests start sandboxes (which install what they run).
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_venv(path, packages, constraints)


def _build_venv(path: Path, packages: tuple[str, ...], constraints: Path | None) -> None:
    marker = path / ".imagesync-sandbox"
    wanted = "\n".join(packages)
    env = dict(os.environ)
    if constraints is not None:
        digest = hashlib.sha256(constraints.read_bytes()).hexdigest()
        wanted += f"\nconstraints {constraints.name} sha256:{digest}"
        env["PIP_CONSTRAINT"] = str(constraints)
    if marker.exists() and marker.read_text() == wanted:
        return
    log(f"building a virtualenv in {path}")
    t0 = time.monotonic()
    shutil.rmtree(path, ignore_errors=True)
    run([sys.executable, "-m", "venv", path])
    run([path / "bin/pip", "install", "-q", "--upgrade", "pip"], capture_output=True)
    run([path / "bin/pip", "install", "-q", *packages], capture_output=True, env=env)
    marker.write_text(wanted)
    log(f"built {path} in {time.monotonic() - t0:.0f}s")


def _ceph():
    """tools/sandbox_ceph.py, the sandbox's Ceph (imported when needed: it imports this)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import sandbox_ceph

    return sandbox_ceph


def install(release: str | None = None, ceph: bool = True) -> None:
    """Install what is missing for Glance `release` (pick_glance_release) and Keystone (and
    Ceph's packages unless `ceph` is false); quick when everything is there."""
    glance = pick_glance_release(release)
    missing = [p for p in (*APT_PACKAGES, *(_ceph().APT_PACKAGES if ceph else ()))
               if run(["dpkg-query", "-W", "-f=${Status}", p], check=False,
                      capture_output=True, text=True).stdout.strip() != "install ok installed"]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    errors: list[BaseException] = []

    def build(path: Path, packages: tuple[str, ...], constraints: Path | None = None) -> None:
        try:
            _venv(path, packages, constraints)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=a)
               for a in ((glance.venv, glance.pip, glance.constraints),
                         (KEYSTONE_VENV, KEYSTONE_PIP))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _rabbit_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _ini(sections: dict[str, dict[str, str]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) + "\n"
                   for name, opts in sections.items())


# ---------------------------------------------------------------- services


class Sandbox:
    """One sandbox directory: its config, state file, services and logs."""

    SERVICES = ("rabbit", "mariadb", "keystone", *NODES, "haproxy", *COORDINATION)

    def __init__(self, directory: Path | str = DEFAULT_DIR):
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / "sandbox.json"
        self.state: dict = (json.loads(self.state_file.read_text())
                            if self.state_file.exists() else {})
        self._lock = threading.Lock()   # services start in threads; each saves the state

    # -- public

    @property
    def glance_release(self) -> str:
        """The Glance release this sandbox runs ("33", "2025.1", "2024.1"): chosen by the first
        `up`, kept by every restart."""
        return self.state.get("glance_release") or DEFAULT_GLANCE_RELEASE

    @property
    def _glance(self) -> GlanceRelease:
        return GLANCE_RELEASES[self.glance_release]

    @property
    def glance_url(self) -> str:
        """Glance as clients reach it: HAProxy's TLS frontend (the catalog's endpoint)."""
        return f"https://127.0.0.1:{self.state['haproxy']['glance_port']}"

    @property
    def keystone_url(self) -> str:
        return f"https://127.0.0.1:{self.state['haproxy']['keystone_port']}/v3"

    def node_url(self, node: str) -> str:
        """One Glance API node, directly (plain HTTP, no load balancer)."""
        return f"http://127.0.0.1:{self.state[node]['port']}"

    @property
    def cacert(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    @property
    def projects(self) -> dict[str, str]:
        """Keystone project name -> id."""
        return dict(self.state["keystone"]["projects"])

    def password(self, user: str) -> str:
        return self.state["keystone"]["passwords"][user]

    def rabbit_url(self, user: str = "imagesync") -> str:
        r = self.state["rabbit"]
        return f"rabbit://{user}:{r['passwords'][user]}@127.0.0.1:{r['port']}/{VHOST}"

    @property
    def transport_url(self) -> str:
        """imagesync's own RabbitMQ user: reads Glance's exchange, owns queues imagesync*."""
        return self.rabbit_url("imagesync")

    @property
    def glance_transport_url(self) -> str:
        """Glance's RabbitMQ user: what tests use to publish as Glance does."""
        return self.rabbit_url("glance")

    @property
    def clouds_yaml(self) -> Path:
        return self.dir / "clouds.yaml"

    def coordination_url(self, backend: str = "redis") -> str:
        """A tooz backend URL: "redis" (the Redis itself, with its password), "sentinel" (the
        Sentinel, which names the current master; the master's password in the URL's userinfo,
        the Sentinel's own in `sentinel_password`), "etcd" (etcd 3.4's gRPC gateway, /v3/)."""
        if backend == "redis":
            r = self.state["redis"]
            return f"redis://:{r['password']}@127.0.0.1:{r['port']}"
        if backend == "sentinel":
            pw = self.state["redis"]["password"]
            return (f"redis://:{pw}@127.0.0.1:{self.state['sentinel']['port']}"
                    f"?sentinel={SENTINEL_MASTER}&sentinel_password={pw}")
        if backend == "etcd":
            return f"etcd3+http://127.0.0.1:{self.state['etcd']['port']}?api_version=v3"
        raise SandboxError(f"no coordination backend {backend!r}; known: "
                           f"{', '.join(COORDINATION)}")

    @property
    def etcd_url(self) -> str:
        """etcd's client URL (plain HTTP; GET /health, the /v3/ JSON gateway)."""
        return f"http://127.0.0.1:{self.state['etcd']['port']}"

    def ports(self) -> list[int]:
        """Every port the sandbox's services listen on."""
        st = self.state
        return [st["rabbit"]["port"], st["rabbit"]["dist_port"], st["rabbit"]["epmd_port"],
                st["mariadb"]["port"], st["keystone"]["port"], st["haproxy"]["glance_port"],
                st["haproxy"]["keystone_port"], *(st[n]["port"] for n in NODES),
                st["redis"]["port"], st["sentinel"]["port"], st["etcd"]["port"],
                st["etcd"]["peer_port"],
                *((st["ceph"]["mon_port"], st["ceph"]["mon_v1_port"]) if self.ceph else ())]

    def env(self) -> dict[str, str]:
        coordination = ({"IMAGESYNC_COORDINATION_URL": self.coordination_url("redis")}
                        if "redis" in self.state else {})   # none in a sandbox made before it
        return {
            "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml),
            "OS_CLOUD": CLOUD,
            "IMAGESYNC_GLANCE_URL": self.glance_url,
            "IMAGESYNC_KEYSTONE_URL": self.keystone_url,
            "IMAGESYNC_CACERT": str(self.cacert),
            "IMAGESYNC_TRANSPORT_URL": self.transport_url,
            **coordination,
            "IMAGESYNC_SANDBOX_DIR": str(self.dir),
        }

    def running(self) -> dict[str, bool]:
        """Service -> alive; with Ceph, its daemons too (CEPH_SERVICES)."""
        alive = {name: pid_alive(self.state.get(name, {}).get("pid")) for name in self.SERVICES}
        if self.ceph:
            alive.update(_ceph().running(self.state.get("ceph", {})))
        return alive

    @property
    def ceph(self) -> bool:
        """Whether this sandbox runs Ceph and Glance's `ceph` store (chosen by `up`)."""
        return bool(self.state.get("with_ceph"))

    @property
    def stores(self) -> tuple[str, ...]:
        """Glance's stores: the file stores, and `ceph` when the sandbox runs Ceph."""
        return (*STORES, CEPH_STORE) if self.ceph else STORES

    @property
    def ceph_state(self) -> dict:
        """The Ceph cluster's state, for tools/sandbox_ceph.py's functions."""
        if not self.ceph:
            raise SandboxError(f"the sandbox in {self.dir} runs without Ceph")
        return self.state["ceph"]

    def rbd_read(self, image_id: str) -> bytes:
        """The bytes Glance stored in RBD for image `image_id` (`rbd export` as the admin)."""
        return _ceph().rbd_read(self.ceph_state, image_id)

    def rbd_checksum(self, image_id: str, algorithm: str = "md5") -> str:
        """The hex digest of what Glance stored in RBD for image `image_id`, streamed."""
        return _ceph().rbd_checksum(self.ceph_state, image_id, algorithm)

    def set_pool_quota(self, max_bytes: int | None = None,
                       max_objects: int | None = None) -> None:
        """A quota on the `images` pool (sandbox_ceph.set_pool_quota); 0 lifts one."""
        _ceph().set_pool_quota(self.ceph_state, max_bytes, max_objects)

    def clear_pool_quota(self) -> None:
        _ceph().clear_pool_quota(self.ceph_state)

    def _choose_ceph(self, wanted: bool | None) -> bool:
        """`up(ceph=...)`, else $IMAGESYNC_SANDBOX_CEPH, else what the sandbox was started
        with, else on."""
        if wanted is not None:
            return wanted
        env = os.environ.get(CEPH_ENV, "").strip().lower()
        if env:
            return env not in ("0", "false", "no", "off")
        return bool(self.state.get("with_ceph", True))

    def up(self, glance_options: dict[str, dict[str, str]] | None = None,
           token_expiration: int | None = None, lonely_store: str | None = None,
           unified_limits: bool = False, glance_release: str | None = None,
           ceph: bool | None = None) -> Sandbox:
        """Start everything. `glance_options` add to both nodes' glance-api.conf;
        `glance_release` is the Glance to run (GLANCE_RELEASES; default
        $IMAGESYNC_GLANCE_RELEASE, else 33): a sandbox keeps the release it was made with;
        `token_expiration` is Keystone's token lifetime in seconds (default 3600);
        `lonely_store` is enabled on glance1 only, as an edge site's store is;
        `unified_limits`: both Glance nodes enforce Keystone unified limits (registered
        limits GLANCE_LIMITS for the image service; set_limit() changes them). A sandbox
        restarted without it keeps what it was made with. `ceph`: run Ceph and Glance's
        `ceph` store (default: $IMAGESYNC_SANDBOX_CEPH, else as the sandbox was last
        started, else on); false leaves both out, for a faster run."""
        if any(self.running().values()):
            raise SandboxError(f"sandbox in {self.dir} is already running; run 'down' first")
        release = self._choose_release(glance_release)
        with_ceph = self._choose_ceph(ceph)
        install(release, ceph=with_ceph)
        for sub in ("log", "etc", "rabbit", "mariadb", "keystone", "tls", "haproxy", "redis",
                    *(f"glance/{n}/{d}" for n in NODES for d in ("staging", "tasks", "locks")),
                    *(f"glance/stores/{s}" for s in STORES)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # A restarted sandbox keeps its ports, passwords, keys and databases; only PIDs are new.
        self.state["glance_release"] = release
        self.state["glance_options"] = glance_options or self.state.get("glance_options", {})
        self.state.setdefault("token_expiration", token_expiration or 3600)
        if token_expiration:
            self.state["token_expiration"] = token_expiration
        self.state.setdefault("lonely_store", lonely_store)
        self.state["unified_limits"] = bool(unified_limits or self.state.get("unified_limits"))
        self.state["with_ceph"] = with_ceph
        if with_ceph:
            self.state.setdefault("ceph", {})["dir"] = str(self.dir / "ceph")
        self._allocate()
        t0 = time.monotonic()
        ceph_job = None
        try:
            if with_ceph:   # the longest start: first
                ceph_job = self._in_thread(self._start_ceph)
            rabbit = self._in_thread(self._start_rabbit)
            coordination = [self._in_thread(self._start_redis_and_sentinel),
                            self._in_thread(self._start_etcd)]
            self._make_tls()
            self._start_mariadb()
            self._prepare_keystone_and_glance()
            self._start_keystone()
            self._start_haproxy()
            nodes = [self._in_thread(self._start_glance, n) for n in NODES]
            self._wait_keystone()
            # The seed goes through HAProxy, whose health checks may not count Keystone up
            # yet (a 503 to the seed on a loaded machine: seen in CI).
            self._wait_haproxy(("keystone",))
            self._seed()
            if self.unified_limits:
                self._seed_limits()
            for t in (*nodes, rabbit, *coordination, *([ceph_job] if ceph_job else [])):
                t.result()
            if self.unified_limits and self._name_image_endpoint():
                self.restart("glance")    # the first start: now with endpoint_id
            self._wait_haproxy()
        except BaseException:
            if ceph_job:
                ceph_job.join()   # bounded (sandbox_ceph.START_TIMEOUT): its PIDs are saved
            self.down()
            raise
        self._write_clouds_yaml()
        log(f"up in {time.monotonic() - t0:.1f}s: Glance {self.glance_release} "
            f"{self.glance_url} (nodes "
            f"{', '.join(self.node_url(n) for n in NODES)}), Keystone {self.keystone_url}, "
            f"RabbitMQ 127.0.0.1:{self.state['rabbit']['port']}/{VHOST}, Redis "
            f"127.0.0.1:{self.state['redis']['port']} (Sentinel :{self.state['sentinel']['port']}"
            f"), etcd {self.etcd_url}"
            + (f", Ceph mon 127.0.0.1:{self.state['ceph']['mon_port']} (store {CEPH_STORE})"
               if self.ceph else "")
            + ("; Glance enforces Keystone unified limits" if self.unified_limits else ""))
        return self

    def _choose_release(self, wanted: str | None) -> str:
        """The release to start: `wanted` (else $IMAGESYNC_GLANCE_RELEASE), or the one this
        sandbox's Glance database was made with. Glance cannot go back a schema, and going
        forward is an upgrade the sandbox does not do: asking for another release fails."""
        made = self.state.get("glance_release") or (
            DEFAULT_GLANCE_RELEASE if self.state.get("keystone", {}).get("bootstrapped") else None)
        wanted = wanted or os.environ.get(GLANCE_RELEASE_ENV)
        if made and wanted and wanted != made:
            raise SandboxError(f"sandbox in {self.dir} runs Glance {made}, not {wanted}; "
                               "remove it or choose another directory")
        return pick_glance_release(wanted or made).name

    def down(self) -> None:
        rabbit = self.state.get("rabbit")
        if rabbit and pid_alive(rabbit.get("pid")):
            run([RABBIT_BIN / "rabbitmqctl", "stop"], env=self._rabbit_env(), check=False,
                capture_output=True, timeout=60)
        for name in NODES:
            stop_pid(self.state.get(name, {}).get("pid"), name)
        # Ceph after Glance (no client left), beside the rest: its daemons take seconds.
        ceph = self.state.get("ceph")
        ceph_job = self._in_thread(_ceph().stop, ceph) if ceph and ceph.get("pids") else None
        for name in ("haproxy", "keystone", "mariadb", "rabbit", "sentinel", "redis", "etcd"):
            stop_pid(self.state.get(name, {}).get("pid"), name)
        if ceph_job:
            ceph_job.result()
        if rabbit and rabbit.get("epmd_port"):
            run(["epmd", "-port", rabbit["epmd_port"], "-kill"], check=False, capture_output=True,
                env=dict(os.environ, ERL_EPMD_ADDRESS="127.0.0.1"))
            stop_pid(self._epmd_pid(rabbit["epmd_port"]), "epmd", timeout=5)
        if self.state:
            self._save()
        link = self._short_link()
        if link.is_symlink() and os.readlink(link) == str(self.dir):
            link.unlink()

    def restart(self, name: str) -> None:
        """Stop and start one service, on the same ports (for outage tests)."""
        self.stop_service(name)
        self.start_service(name)

    def _names(self, name: str) -> tuple[str, ...]:
        """"glance" is every Glance API node (a Glance outage); a node name is one node.
        "ceph" is the whole Ceph cluster; "ceph-osd" (-mon, -mgr) one of its daemons."""
        names = NODES if name == "glance" else (name,)
        known = (*self.SERVICES, *((CEPH_STORE, *CEPH_SERVICES) if self.ceph else ()))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SandboxError(f"no service {unknown[0]!r}; known: glance, {', '.join(known)}")
        return names

    def stop_service(self, name: str) -> None:
        for n in self._names(name):
            if n == CEPH_STORE:
                _ceph().stop(self.ceph_state)
                self._save()
                continue
            if n in CEPH_SERVICES:
                _ceph().stop_daemon(self.ceph_state, n.removeprefix("ceph-"), self._save)
                continue
            if n == "rabbit":
                run([RABBIT_BIN / "rabbitmqctl", "stop"], env=self._rabbit_env(), check=False,
                    capture_output=True, timeout=60)
            stop_pid(self.state[n]["pid"], n)

    def start_service(self, name: str) -> None:
        names = self._names(name)
        starts = {"rabbit": self._start_rabbit, "mariadb": self._start_mariadb,
                  "haproxy": self._start_haproxy, "redis": self._start_redis,
                  "sentinel": self._start_sentinel, "etcd": self._start_etcd}
        if "keystone" in names:
            self._start_keystone()
            self._wait_keystone()
        for t in [self._in_thread(self._start_glance, n) for n in names if n in NODES]:
            t.result()
        for n in names:
            if n in starts:
                starts[n]()
        if "redis" in names and self.running()["sentinel"]:
            # Until the Sentinel counts its master up again: redis-py refuses a master
            # flagged s_down or o_down.
            port = self.state["sentinel"]["port"]
            wait_for("Redis Sentinel counting Redis up", lambda: self._sentinel_ready(port), 30,
                     self.dir / "log" / "sentinel.log")
        if CEPH_STORE in names:
            _ceph().start(self.ceph_state["dir"], self.ceph_state, self._save)
        for n in names:
            if n in CEPH_SERVICES:
                _ceph().start_daemon(self.ceph_state, n.removeprefix("ceph-"), self._save)
        behind = tuple(n for n in names if n in ("keystone", *NODES))
        if "haproxy" in names:
            self._wait_haproxy()
        elif behind and self.running().get("haproxy"):
            self._wait_haproxy(behind)

    def set_store_rate(self, store: str, mib_per_s: float | None) -> None:
        """Glance writes to `store` at `mib_per_s` MiB/s from now on (None: full speed), as
        to a slow array (tools/sandbox_slow_store.py); both API nodes, no restart."""
        path = self.dir / "etc" / "store-rates.json"
        rates = json.loads(path.read_text()) if path.exists() else {}
        if mib_per_s:
            rates[store] = mib_per_s
        else:
            rates.pop(store, None)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rates))
        tmp.replace(path)

    def node_log(self, node: str) -> Path:
        """uWSGI's request log of one Glance API node (one line per request)."""
        return self.dir / "log" / f"{node}-uwsgi.log"

    # -- plumbing

    class _Job(threading.Thread):
        def __init__(self, fn, *args):
            super().__init__(daemon=True)
            self.fn, self.args, self.error = fn, args, None

        def run(self):
            try:
                self.fn(*self.args)
            except BaseException as exc:  # noqa: BLE001 - raised by result()
                self.error = exc

        def result(self):
            self.join()
            if self.error is not None:
                raise self.error

    def _in_thread(self, fn, *args) -> Sandbox._Job:
        job = self._Job(fn, *args)
        job.start()
        return job

    def _allocate(self) -> None:
        """Ports and secrets, chosen once per sandbox directory."""
        st = self.state
        if "rabbit" not in st:
            port = free_port()
            st["rabbit"] = {"port": port, "dist_port": free_port(), "epmd_port": free_port(),
                            "nodename": f"imagesync{port}@localhost",
                            "passwords": {u: secrets.token_hex(12)
                                          for u in ("admin", "glance", "imagesync")}}
        st.setdefault("mariadb", {"port": free_port(), "passwords": {
            "glance": secrets.token_hex(12), "keystone": secrets.token_hex(12)}})
        st.setdefault("keystone", {"port": free_port(), "passwords": {
            u: secrets.token_hex(12) for u in ("admin", *USERS)}})
        for n in NODES:
            st.setdefault(n, {"port": free_port()})
        st.setdefault("haproxy", {"glance_port": free_port(), "keystone_port": free_port()})
        st.setdefault("redis", {"port": free_port(), "password": secrets.token_hex(16)})
        st.setdefault("sentinel", {"port": free_port()})
        st.setdefault("etcd", {"port": free_port(), "peer_port": free_port()})
        self._save()

    # -- Ceph

    def _start_ceph(self) -> None:
        """The Ceph cluster (tools/sandbox_ceph.py), after checking that Glance's virtualenv
        imports Debian's rados and rbd from the folder its uWSGI puts on sys.path. The
        cluster's state is the thread's own until saved (other threads save the sandbox's)."""
        cluster = json.loads(json.dumps(self.state["ceph"]))
        _ceph().link_bindings(cluster, self._glance.venv / "bin/python")

        def save() -> None:
            with self._lock:
                self.state["ceph"] = json.loads(json.dumps(cluster))
            self._save()

        _ceph().start(cluster["dir"], cluster, save)
        save()

    # -- TLS

    def _make_tls(self) -> None:
        """A CA of the sandbox's own and a server certificate for 127.0.0.1/localhost, signed
        by it; HAProxy serves the certificate, clients trust the CA (clouds.yaml `cacert`)."""
        tls = self.dir / "tls"
        if (tls / "haproxy.pem").exists():
            return
        days = "3650"
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", days,
             "-subj", "/CN=imagesync sandbox CA", "-keyout", tls / "ca.key",
             "-out", tls / "ca.pem"], capture_output=True)
        (tls / "server.ext").write_text(
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
            "extendedKeyUsage = serverAuth\nkeyUsage = digitalSignature, keyEncipherment\n")
        run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", tls / "server.key", "-out", tls / "server.csr"], capture_output=True)
        run(["openssl", "x509", "-req", "-in", tls / "server.csr", "-CA", tls / "ca.pem",
             "-CAkey", tls / "ca.key", "-CAcreateserial", "-days", days,
             "-extfile", tls / "server.ext", "-out", tls / "server.pem"], capture_output=True)
        pem = (tls / "server.pem").read_text() + (tls / "server.key").read_text()
        (tls / "haproxy.pem").write_text(pem)
        for key in ("ca.key", "server.key", "haproxy.pem"):
            (tls / key).chmod(0o600)

    # -- RabbitMQ

    def _rabbit_env(self) -> dict[str, str]:
        r, base = self.state["rabbit"], self.dir / "rabbit"
        return dict(
            os.environ,
            HOME=str(base),
            RABBITMQ_NODENAME=r["nodename"],
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(r["port"]),
            RABBITMQ_DIST_PORT=str(r["dist_port"]),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(r["epmd_port"]),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log" / "rabbit"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_LOGS="-",
        )

    def _rabbit_definitions(self) -> dict:
        """Users, the vhost and permissions, loaded at boot (no guest, no rabbitmqctl calls).
        imagesync may declare and read Glance's exchange and only its own queues."""
        pw = self.state["rabbit"]["passwords"]
        users = [{"name": u, "password_hash": _rabbit_hash(pw[u]),
                  "hashing_algorithm": "rabbit_password_hashing_sha256",
                  "tags": ["administrator"] if u == "admin" else []} for u in pw]
        perms = {"admin": (".*", ".*", ".*"), "glance": (".*", ".*", ".*"),
                 "imagesync": ("^(glance|imagesync.*)$", "^imagesync.*$",
                               "^(glance|imagesync.*)$")}
        return {"users": users, "vhosts": [{"name": VHOST}],
                "permissions": [{"user": u, "vhost": VHOST, "configure": c, "write": w,
                                 "read": r} for u, (c, w, r) in perms.items()]}

    def _start_rabbit(self) -> None:
        base = self.dir / "rabbit"
        (base / "enabled_plugins").write_text("[].\n")
        (base / "definitions.json").write_text(json.dumps(self._rabbit_definitions()))
        (base / "definitions.json").chmod(0o600)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.state['rabbit']['port']}\n"
            f"load_definitions = {base / 'definitions.json'}\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.dir / "log" / "rabbit").mkdir(parents=True, exist_ok=True)
        # The Erlang cookie, written before the server or rabbitmqctl runs, so neither
        # creates it while the other reads it.
        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        env, logfile = self._rabbit_env(), self.dir / "log" / "rabbitmq.log"
        proc = subprocess.Popen([RABBIT_BIN / "rabbitmq-server"], env=env, start_new_session=True,
                                stdout=open(logfile, "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.state["rabbit"]["pid"] = proc.pid
        self._save()
        # `rabbitmqctl wait` failed twice in CI under load with the server up; a second,
        # bounded `await_startup` tells a slow CLI from a node that did not start.
        said = []
        for cmd in (["wait", "--timeout", "120", base / "rabbit.pid"],
                    ["await_startup", "--timeout", "60"]):
            done = run([RABBIT_BIN / "rabbitmqctl", *cmd], env=env, check=False,
                       capture_output=True, text=True, timeout=150)
            if done.returncode == 0 or proc.poll() is not None:
                break
            out = (done.stderr or done.stdout or "").strip().replace("\n", " ")[-300:]
            said.append(f"rabbitmqctl {cmd[0]} exited {done.returncode}: {out}")
            log(said[-1])
        if done.returncode != 0 or proc.poll() is not None:
            wait_for(f"RabbitMQ ({'; '.join(said) or 'the server exited'})", lambda: False, 0,
                     logfile, proc)
        wait_for("RabbitMQ port", lambda: port_open(self.state["rabbit"]["port"]), 30, logfile,
                 proc)

    def _epmd_pid(self, epmd_port: int) -> int | None:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            wanted = f"ERL_EPMD_PORT={epmd_port}".encode()
            if cmd and cmd[0].endswith(b"epmd") and wanted in environ:
                return int(proc.name)
        return None

    def rabbitmqctl(self, *args: str) -> str:
        return run([RABBIT_BIN / "rabbitmqctl", *args], env=self._rabbit_env(),
                   capture_output=True, text=True, timeout=60).stdout

    def queues(self) -> dict[str, tuple[int, int]]:
        """RabbitMQ queues: name -> (messages ready, messages unacknowledged)."""
        out = self.rabbitmqctl("list_queues", "-p", VHOST, "-q", "--no-table-headers", "name",
                               "messages_ready", "messages_unacknowledged")
        queues = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                queues[parts[0]] = (int(parts[1]), int(parts[2]))
        return queues

    def consumers(self) -> dict[str, int]:
        """RabbitMQ queues: name -> consumers attached now."""
        out = self.rabbitmqctl("list_queues", "-p", VHOST, "-q", "--no-table-headers", "name",
                               "consumers")
        return {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines())
                if len(p) == 2 and p[1].isdigit()}

    # -- MariaDB

    def _start_mariadb(self) -> None:
        base = self.dir / "mariadb"
        m, cnf = self.state["mariadb"], base / "my.cnf"
        sock = self._socket("mariadb", "mysqld.sock")
        cnf.write_text(
            "[client]\n"
            f"socket = {sock}\n"
            "[mysqld]\n"
            f"user = root\ndatadir = {base}/data\nsocket = {sock}\n"
            f"pid-file = {base}/mysqld.pid\nlog-error = {self.dir}/log/mariadb.log\n"
            f"bind-address = 127.0.0.1\nport = {m['port']}\nskip-name-resolve\n"
            "character-set-server = utf8mb4\ncollation-server = utf8mb4_general_ci\n"
            "innodb_buffer_pool_size = 64M\ninnodb_log_file_size = 32M\n"
            "innodb_flush_log_at_trx_commit = 2\nmax_connections = 300\n"
        )
        fresh = not (base / "data" / "mysql").exists()
        if fresh:
            run(["mariadb-install-db", f"--defaults-file={cnf}", "--user=root",
                 f"--datadir={base}/data", "--skip-test-db",
                 "--auth-root-authentication-method=socket"],
                capture_output=True)
        logfile = self.dir / "log" / "mariadb.log"
        proc = subprocess.Popen(["/usr/sbin/mariadbd", f"--defaults-file={cnf}"],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=open(self.dir / "log" / "mariadb.out", "ab"),
                                stderr=subprocess.STDOUT)
        m["pid"] = proc.pid
        self._save()
        wait_for("MariaDB", lambda: port_open(m["port"]), 60, logfile, proc)
        if fresh:
            sql = "".join(
                f"CREATE DATABASE {db} CHARACTER SET {cs};"
                f"CREATE USER '{db}'@'127.0.0.1' IDENTIFIED BY '{m['passwords'][db]}';"
                f"GRANT ALL PRIVILEGES ON {db}.* TO '{db}'@'127.0.0.1';"
                for db, cs in (("glance", "utf8"), ("keystone", "utf8mb4")))
            run(["mariadb", f"--defaults-file={cnf}", "-uroot", "-e", sql])

    def _db_url(self, db: str) -> str:
        m = self.state["mariadb"]
        charset = "utf8" if db == "glance" else "utf8mb4"
        return (f"mysql+mysqldb://{db}:{m['passwords'][db]}@127.0.0.1:{m['port']}/{db}"
                f"?charset={charset}")

    def sql(self, statement: str) -> str:
        """Run SQL in Glance's database as root (tests age locks this way)."""
        out = run(["mariadb", f"--defaults-file={self.dir}/mariadb/my.cnf", "-uroot", "-N",
                   "-B", "glance", "-e", statement], capture_output=True, text=True)
        return out.stdout

    def make_legacy(self, image_id: str) -> int:
        """Make an image look uploaded before multi-store, as upgraded clouds have them: its
        locations lose their store id (image_locations.meta_data '{}'), so listings show no
        `stores` until a GET of the image fills the id in again. Returns the locations changed."""
        import uuid

        image_id = str(uuid.UUID(image_id))  # only an image id ever reaches the SQL
        out = self.sql(f"UPDATE image_locations SET meta_data = '{{}}' WHERE image_id = "
                       f"'{image_id}' AND deleted = 0; SELECT ROW_COUNT();")
        return int(out.split()[-1])

    # -- coordination: Redis, its Sentinel, etcd

    def _popen(self, cmd: list, logfile: Path, env: dict[str, str] | None = None):
        return subprocess.Popen([str(c) for c in cmd], start_new_session=True, env=env,
                                stdin=subprocess.DEVNULL, stdout=open(logfile, "ab"),
                                stderr=subprocess.STDOUT)

    def _redis_ready(self, port: int) -> bool:
        try:
            return redis_command(port, "PING", password=self.state["redis"]["password"]) == "PONG"
        except (OSError, SandboxError):
            return False

    def _start_redis_and_sentinel(self) -> None:
        self._start_redis()
        self._start_sentinel()

    def _start_redis(self) -> None:
        """Redis with a password, on loopback, without persistence (tooz's locks and group
        members live as long as their TTLs; a restarted Redis starts empty)."""
        r, base = self.state["redis"], self.dir / "redis"
        base.chmod(0o700)   # Sentinel rewrites its config (with the password) world-readable
        conf = base / "redis.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {r['port']}\nprotected-mode yes\n"
            f"requirepass {r['password']}\n"
            f"daemonize no\nsupervised no\npidfile {base / 'redis.pid'}\n"
            f'logfile ""\ndir {base}\nsave ""\nappendonly no\n')
        conf.chmod(0o600)
        logfile = self.dir / "log" / "redis.log"
        proc = self._popen(["redis-server", conf], logfile)
        r["pid"] = proc.pid
        self._save()
        wait_for("Redis", lambda: self._redis_ready(r["port"]), 30, logfile, proc)

    def _start_sentinel(self) -> None:
        """One Sentinel watching the Redis as master `imagesync`, with the same password.
        Sentinel rewrites its config file (ids, known replicas): it is written fresh each
        start."""
        s, r, base = self.state["sentinel"], self.state["redis"], self.dir / "redis"
        conf = base / "sentinel.conf"
        conf.write_text(
            f"bind 127.0.0.1\nport {s['port']}\nprotected-mode yes\n"
            f"requirepass {r['password']}\n"
            f"daemonize no\npidfile {base / 'sentinel.pid'}\nlogfile \"\"\ndir {base}\n"
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {r['port']} 1\n"
            f"sentinel auth-pass {SENTINEL_MASTER} {r['password']}\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} 2000\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n")
        conf.chmod(0o600)
        logfile = self.dir / "log" / "sentinel.log"
        proc = self._popen(["redis-sentinel", conf], logfile)
        s["pid"] = proc.pid
        self._save()
        wait_for("Redis Sentinel", lambda: self._sentinel_ready(s["port"]), 30, logfile, proc)

    def _sentinel_ready(self, port: int) -> bool:
        """The Sentinel names the sandbox's Redis as master and holds it up: redis-py refuses
        a master the Sentinel flags s_down or o_down."""
        try:
            reply = redis_command(port, "SENTINEL", "MASTER", SENTINEL_MASTER,
                                  password=self.state["redis"]["password"])
        except (OSError, SandboxError):
            return False
        master = dict(zip(reply[::2], reply[1::2], strict=False))
        return (master.get("flags") == "master" and master.get("ip") == "127.0.0.1"
                and master.get("port") == str(self.state["redis"]["port"]))

    def _start_etcd(self) -> None:
        """A one-member etcd 3.4; a restarted etcd keeps its data directory."""
        e, data = self.state["etcd"], self.dir / "etcd"
        data.mkdir(mode=0o700, exist_ok=True)
        data.chmod(0o700)
        client, peer = self.etcd_url, f"http://127.0.0.1:{e['peer_port']}"
        # etcd also reads its flags from ETCD_* variables: none of the caller's may count.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        logfile = self.dir / "log" / "etcd.log"
        proc = self._popen([ETCD_BIN, "--name", "sandbox", "--data-dir", data,
                            "--listen-client-urls", client, "--advertise-client-urls", client,
                            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                            "--initial-cluster", f"sandbox={peer}",
                            "--initial-cluster-state", "new",
                            "--initial-cluster-token", "imagesync-sandbox",
                            "--logger", "zap", "--log-outputs", "stderr"], logfile, env)
        e["pid"] = proc.pid
        self._save()
        wait_for("etcd", self._etcd_healthy, 60, logfile, proc)

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=5) as resp:
                return json.loads(resp.read()) == {"health": "true"}
        except (OSError, ValueError):
            return False

    # -- Keystone

    def _keystone_conf(self) -> str:
        k = self.dir / "keystone"
        return _ini({
            "DEFAULT": {"log_file": str(self.dir / "log" / "keystone.log")},
            "database": {"connection": self._db_url("keystone")},
            "token": {"provider": "fernet", "expiration": str(self.state["token_expiration"])},
            "fernet_tokens": {"key_repository": f"{k}/fernet-keys/"},
            "fernet_receipts": {"key_repository": f"{k}/fernet-keys/"},
            "credential": {"key_repository": f"{k}/credential-keys/"},
            # bcrypt's minimum cost: hashing at the default cost takes 0.3 s a token here.
            "identity": {"password_hash_rounds": "4"},
            # Without a cache every authenticated request costs ~200 SQL queries (0.5 s);
            # the in-process cache is consistent because Keystone runs one process.
            "cache": {"enabled": "true", "backend": "oslo_cache.dict",
                      "expiration_time": "600"},
            "oslo_middleware": {"enable_proxy_headers_parsing": "true"},
        })

    def _keystone_manage(self, *args: str) -> None:
        run([KEYSTONE_VENV / "bin/keystone-manage", "--config-file",
             self.dir / "etc" / "keystone" / "keystone.conf", *args], capture_output=True)

    def _prepare_keystone_and_glance(self) -> None:
        """Write every config file; on a fresh sandbox also create the schemas, keys and
        Keystone's bootstrap objects (in parallel: each keystone-manage costs ~3.5 s)."""
        (self.dir / "etc" / "keystone").mkdir(parents=True, exist_ok=True)
        (self.dir / "etc" / "keystone" / "keystone.conf").write_text(self._keystone_conf())
        for n in NODES:
            self._write_glance_conf(n)
        k = self.state["keystone"]
        if k.get("bootstrapped"):
            return
        jobs = [self._in_thread(self._keystone_manage, "db_sync"),
                self._in_thread(self._keystone_manage, "fernet_setup", "--keystone-user",
                                "root", "--keystone-group", "root"),
                self._in_thread(self._keystone_manage, "credential_setup", "--keystone-user",
                                "root", "--keystone-group", "root"),
                self._in_thread(lambda: run([self._glance.venv / "bin/glance-manage",
                                             "--config-file",
                                             self.dir / "etc" / NODES[0] / "glance-api.conf",
                                             "db_sync"], capture_output=True))]
        for job in jobs:
            job.result()
        url = self.keystone_url + "/"
        self._keystone_manage(
            "bootstrap", "--bootstrap-password", k["passwords"]["admin"],
            "--bootstrap-username", "admin", "--bootstrap-project-name", "admin",
            "--bootstrap-role-name", "admin", "--bootstrap-service-name", "keystone",
            "--bootstrap-region-id", REGION, "--bootstrap-admin-url", url,
            "--bootstrap-internal-url", url, "--bootstrap-public-url", url)
        k["bootstrapped"] = True
        self._save()

    def _start_keystone(self) -> None:
        k, etc = self.state["keystone"], self.dir / "etc" / "keystone"
        (etc / "uwsgi.ini").write_text(
            "[uwsgi]\n"
            f"http-socket = 127.0.0.1:{k['port']}\n"
            "module = keystone.wsgi.api:application\n"
            f"virtualenv = {KEYSTONE_VENV}\n"
            f"env = OS_KEYSTONE_CONFIG_DIR={etc}\n"
            # One process: the in-process cache must stay consistent (see _keystone_conf).
            "master = true\nprocesses = 1\nthreads = 4\nenable-threads = true\n"
            "lazy-apps = true\ndie-on-term = true\nbuffer-size = 65535\nneed-app = true\n"
            "add-header = Connection: close\n"
        )
        logfile = self.dir / "log" / "keystone-uwsgi.log"
        proc = subprocess.Popen([KEYSTONE_VENV / "bin/uwsgi", "--ini", etc / "uwsgi.ini"],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=open(logfile, "ab"), stderr=subprocess.STDOUT)
        k["pid"] = proc.pid
        self._keystone_proc = proc
        self._save()

    def _wait_keystone(self) -> None:
        port = self.state["keystone"]["port"]
        wait_for("Keystone", lambda: self._http_ok(f"http://127.0.0.1:{port}/v3"), 120,
                 self.dir / "log" / "keystone-uwsgi.log", getattr(self, "_keystone_proc", None))

    def _seed(self) -> None:
        k = self.state["keystone"]
        if k.get("projects"):
            return
        request = {"auth_url": self.keystone_url, "cacert": str(self.cacert), "region": REGION,
                   "admin_password": k["passwords"]["admin"], "glance_url": self.glance_url,
                   "users": {u: [k["passwords"][u], p, r] for u, (p, r) in USERS.items()}}
        done = run([self._glance.venv / "bin/python", HERE / "sandbox_seed.py"],
                   input=json.dumps(request), capture_output=True, text=True, timeout=180)
        seeded = json.loads(done.stdout)
        k["projects"], k["app_credential"] = seeded["projects"], seeded["app_credential"]
        self._save()

    def keystone_admin_token(self) -> str:
        """A token of Keystone's bootstrap admin (tests revoke and inspect with it)."""
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"id": "default"},
            "password": self.password("admin")}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}}
        req = urllib.request.Request(self.keystone_url + "/auth/tokens",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30, context=self.tls_context()) as resp:
            return resp.headers["X-Subject-Token"]

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cacert))

    # -- Keystone unified limits

    @property
    def unified_limits(self) -> bool:
        """Whether Glance enforces Keystone unified limits (`up(unified_limits=True)`)."""
        return bool(self.state.get("unified_limits"))

    def _keystone_api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call to Keystone's API as its bootstrap admin; Keystone's refusal becomes a
        SandboxError that quotes its answer. The admin token is reused while Keystone takes it."""
        for attempt in (1, 2):
            token = getattr(self, "_admin_token", None)
            if token is None or attempt == 2:
                try:
                    token = self._admin_token = self.keystone_admin_token()
                except OSError as exc:   # urllib's HTTPError and URLError too
                    raise SandboxError(f"no token of Keystone's admin: {exc}") from None
            req = urllib.request.Request(
                self.keystone_url + path, method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={"X-Auth-Token": token, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30, context=self.tls_context()) as r:
                    text = r.read().decode()
                    return json.loads(text) if text else {}
            except urllib.error.HTTPError as err:
                with err:
                    answer = err.read().decode(errors="replace")
                if err.code == 401 and attempt == 1:
                    continue   # the cached token expired or was revoked: take a new one
                raise SandboxError(f"Keystone refused {method} {path}: HTTP {err.code} "
                                   f"{answer}") from None
            except OSError as exc:
                raise SandboxError(f"Keystone did not answer {method} {path}: {exc}") from None
        raise AssertionError("unreachable")

    def _image_service_id(self) -> str:
        services = self._keystone_api("GET", "/services?type=image")["services"]
        if len(services) != 1:
            raise SandboxError(f"Keystone has {len(services)} image services, not 1")
        return services[0]["id"]

    def _seed_limits(self) -> None:
        """What Glance's unified limits need in Keystone, once per sandbox: the `reader` role
        on the system for Glance's service user (oslo.limit lists services, endpoints and
        limits with it), and a registered limit for each of GLANCE_LIMITS still missing."""
        k = self.state["keystone"]
        if k.get("limits_seeded"):
            return
        users = self._keystone_api("GET", "/users?name=glance&domain_id=default")["users"]
        roles = self._keystone_api("GET", "/roles?name=reader")["roles"]
        if len(users) != 1 or len(roles) != 1:
            raise SandboxError(f"Keystone has {len(users)} users glance, {len(roles)} roles "
                               "reader; expected one of each")
        self._keystone_api("PUT", f"/system/users/{users[0]['id']}/roles/{roles[0]['id']}")
        service = self._image_service_id()
        have = {r["resource_name"] for r in self._keystone_api(
            "GET", f"/registered_limits?service_id={service}&region_id={REGION}"
        )["registered_limits"]}
        missing = [{"service_id": service, "region_id": REGION, "resource_name": name,
                    "default_limit": value, "description": f"Glance {name} (sandbox default)"}
                   for name, value in GLANCE_LIMITS.items() if name not in have]
        if missing:
            self._keystone_api("POST", "/registered_limits", {"registered_limits": missing})
        k["limits_seeded"] = True
        self._save()

    def _name_image_endpoint(self) -> bool:
        """Save the image service's internal endpoint id and write it into both nodes'
        [oslo_limit] (see _write_glance_conf). True when it was not saved before: the nodes
        must restart to read it."""
        k = self.state["keystone"]
        if k.get("image_endpoint_id"):
            return False
        found = self._keystone_api("GET", f"/endpoints?service_id={self._image_service_id()}"
                                   f"&interface=internal&region_id={REGION}")["endpoints"]
        if len(found) != 1:
            raise SandboxError(f"Keystone has {len(found)} internal image endpoints in "
                               f"{REGION}; expected one")
        k["image_endpoint_id"] = found[0]["id"]
        self._save()
        for n in NODES:
            self._write_glance_conf(n)
        return True

    def _find_limit(self, kind: str, service: str, resource: str,
                    project_id: str | None = None) -> dict | None:
        query = f"/{kind}?service_id={service}&region_id={REGION}&resource_name={resource}"
        if project_id:
            query += f"&project_id={project_id}"
        found = self._keystone_api("GET", query)[kind]
        return found[0] if found else None

    def set_limit(self, resource: str, value: int, project_id: str | None = None) -> None:
        """Set one of Glance's unified limits in Keystone (sizes in MiB): the registered
        (default) limit when `project_id` is None, else that project's own limit (created or
        updated). Glance reads limits at each check: the next request sees the new value."""
        if not self.unified_limits:
            raise SandboxError("this sandbox's Glance does not enforce unified limits; "
                               "start it with up(unified_limits=True)")
        service = self._image_service_id()
        if project_id is None:
            found = self._find_limit("registered_limits", service, resource)
            if found:
                self._keystone_api("PATCH", f"/registered_limits/{found['id']}",
                                   {"registered_limit": {"default_limit": value}})
            else:
                self._keystone_api("POST", "/registered_limits", {"registered_limits": [{
                    "service_id": service, "region_id": REGION, "resource_name": resource,
                    "default_limit": value}]})
            return
        found = self._find_limit("limits", service, resource, project_id)
        if found:
            self._keystone_api("PATCH", f"/limits/{found['id']}",
                               {"limit": {"resource_limit": value}})
        else:
            self._keystone_api("POST", "/limits", {"limits": [{
                "service_id": service, "region_id": REGION, "project_id": project_id,
                "resource_name": resource, "resource_limit": value}]})

    def delete_limit(self, resource: str, project_id: str) -> None:
        """Remove a project's own limit: the registered (default) limit applies again.
        Nothing to remove is no error."""
        found = self._find_limit("limits", self._image_service_id(), resource, project_id)
        if found:
            self._keystone_api("DELETE", f"/limits/{found['id']}")

    def limits(self) -> dict[str, dict]:
        """The image service's limits as Keystone holds them: {"registered": {resource:
        default}, "projects": {project_id: {resource: limit}}}."""
        service = self._image_service_id()
        where = f"service_id={service}&region_id={REGION}"
        registered = self._keystone_api("GET", f"/registered_limits?{where}")
        projects: dict[str, dict[str, int]] = {}
        for lim in self._keystone_api("GET", f"/limits?{where}")["limits"]:
            projects.setdefault(lim["project_id"], {})[lim["resource_name"]] = \
                lim["resource_limit"]
        return {"registered": {r["resource_name"]: r["default_limit"]
                               for r in registered["registered_limits"]},
                "projects": projects}

    # -- Glance

    def _write_glance_conf(self, node: str) -> None:
        r = self.state["rabbit"]
        d, etc = self.dir / "glance", self.dir / "etc" / node
        etc.mkdir(parents=True, exist_ok=True)
        stores = [s for s in STORES if node == NODES[0] or s != self.state.get("lonely_store")]
        ceph = [CEPH_STORE] if self.ceph else []
        k = self.state["keystone"]
        sections: dict[str, dict[str, str]] = {
            "DEFAULT": {
                "enabled_backends": ", ".join([*(f"{s}:file" for s in stores),
                                               *(f"{s}:rbd" for s in ceph)]),
                "enabled_import_methods": "[glance-direct, web-download, copy-image]",
                "worker_self_reference_url": self.node_url(node),
                "transport_url": f"rabbit://glance:{r['passwords']['glance']}@127.0.0.1:"
                                 f"{r['port']}/{VHOST}",
                "log_file": str(self.dir / "log" / f"{node}-api.log"),
                "debug": "false",
            },
            "database": {"connection": self._db_url("glance")},
            "glance_store": {"default_backend": STORES[0]},
            "os_glance_staging_store": {"filesystem_store_datadir": str(d / node / "staging")},
            "os_glance_tasks_store": {"filesystem_store_datadir": str(d / node / "tasks")},
            "oslo_concurrency": {"lock_path": str(d / node / "locks")},
            "oslo_messaging_notifications": {"driver": "messagingv2"},
            "oslo_middleware": {"enable_proxy_headers_parsing": "true"},
            "paste_deploy": {"flavor": "keystone",
                             "config_file": str(etc / "glance-api-paste.ini")},
            "keystone_authtoken": {
                "www_authenticate_uri": self.keystone_url,
                "auth_url": self.keystone_url,
                "cafile": str(self.cacert),
                "auth_type": "password",
                "user_domain_name": "Default", "project_domain_name": "Default",
                "project_name": USERS["glance"][0], "username": "glance",
                "password": k["passwords"]["glance"],
                "region_name": REGION, "interface": "internal",
            },
        }
        for s in stores:
            sections[s] = {"filesystem_store_datadir": str(d / "stores" / s),
                           "store_description": f"{s} file store"}
        for s in ceph:
            # As a real Glance node has it: its own cephx user and a ceph.conf naming the
            # monitor and that user's keyring. rados_connect_timeout stays unset (librados
            # waits for a cluster that does not answer), as in a default deployment.
            cluster = _ceph()
            sections[s] = {"rbd_store_pool": cluster.POOL, "rbd_store_user": cluster.GLANCE_USER,
                           "rbd_store_ceph_conf": str(cluster.glance_conf(self.state["ceph"])),
                           "rbd_store_chunk_size": "8",
                           "store_description": f"{s} rbd store"}
        if self.unified_limits:
            sections["DEFAULT"]["use_keystone_limits"] = "true"
            # oslo.limit reads the limits as Glance's own service user with a system-scoped
            # reader token (the role _seed_limits grants), for the image service's endpoint:
            # by its id, as deployments configure it (_seed_limits saves it). The lookup by
            # type + region + interface is broken in 2025.1's oslo.limit 2.6.1 (len() of a
            # generator: every upload answered 400) and absent from 2024.1's; it serves only
            # the first start of a sandbox on 33, before the id is known.
            endpoint = k.get("image_endpoint_id")
            sections["oslo_limit"] = {
                "auth_type": "password", "auth_url": self.keystone_url,
                "cafile": str(self.cacert),
                "username": "glance", "password": k["passwords"]["glance"],
                "user_domain_name": "Default", "system_scope": "all",
                "region_name": REGION, "valid_interfaces": "internal",
                **({"endpoint_id": endpoint} if endpoint else {
                    "endpoint_service_type": "image", "endpoint_region_name": REGION,
                    "endpoint_interface": "internal"}),
            }
        for section, opts in self.state.get("glance_options", {}).items():
            sections.setdefault(section, {}).update(opts)
        (etc / "glance-api.conf").write_text(_ini(sections))
        (etc / "glance-api.conf").chmod(0o600)
        paste = (self._glance.venv / "etc/glance/glance-api-paste.ini").read_text()
        (etc / "glance-api-paste.ini").write_text(paste.replace(
            "/etc/glance/healthcheck_disable", str(etc / "healthcheck_disable")))

    def _start_glance(self, node: str) -> None:
        etc, port, glance = self.dir / "etc" / node, self.state[node]["port"], self._glance
        ceph_lib = f"pythonpath = {_ceph().pylib(self.state['ceph'])}\n" if self.ceph else ""
        (etc / "uwsgi.ini").write_text(
            "[uwsgi]\n"
            f"http-socket = 127.0.0.1:{port}\n"
            f"{glance.uwsgi_app}\n"
            f"virtualenv = {glance.venv}\n"
            f"env = OS_GLANCE_CONFIG_DIR={etc}\n"
            # set_store_rate(): a store written at a set rate (inert until asked for)
            f"pythonpath = {HERE}\nimport = sandbox_slow_store\n"
            # Debian's rados and rbd modules (the rbd store's), linked by sandbox_ceph
            f"{ceph_lib}"
            f"env = IMAGESYNC_SANDBOX_STORE_RATES={self.dir / 'etc' / 'store-rates.json'}\n"
            "master = true\nprocesses = 2\nthreads = 4\nlazy-apps = true\ndie-on-term = true\n"
            "http-raw-body = true\nhttp-chunked-input = true\nhttp-auto-chunked = true\n"
            "buffer-size = 65535\nneed-app = true\n"
            # http-socket closes every connection after its response; say so, or
            # clients reuse pooled connections and get "connection reset".
            "add-header = Connection: close\n"
        )
        logfile = self.node_log(node)
        proc = subprocess.Popen([glance.venv / "bin/uwsgi", "--ini", etc / "uwsgi.ini"],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=open(logfile, "ab"), stderr=subprocess.STDOUT)
        self.state[node]["pid"] = proc.pid
        self._save()
        # /healthcheck needs no token: ready means the app loaded and answers.
        wait_for(f"Glance API node {node}",
                 lambda: self._http_ok(f"http://127.0.0.1:{port}/healthcheck"), 120, logfile,
                 proc)

    # -- HAProxy

    def _haproxy_cfg(self) -> str:
        h, tls = self.state["haproxy"], self.dir / "tls" / "haproxy.pem"
        glance = "".join(f"  server {n} 127.0.0.1:{self.state[n]['port']} check inter 1s "
                         f"fall 2 rise 1\n" for n in NODES)
        return (
            "global\n"
            "  log stdout format raw local0 info\n"
            "  maxconn 2000\n"
            f"  pidfile {self.dir / 'haproxy' / 'haproxy.pid'}\n"
            f"  stats socket {self._socket('haproxy', 'admin.sock')} mode 600 level admin\n"
            "defaults\n"
            "  mode http\n  log global\n  option httplog\n"
            "  option redispatch\n  retries 2\n"
            "  timeout connect 5s\n  timeout client 120s\n  timeout server 300s\n"
            # Idle client connections are closed after 2 s, without a word to the client,
            # as load balancers do: clients must survive a pooled connection gone stale.
            "  timeout http-keep-alive 2s\n  timeout http-request 30s\n"
            "frontend glance_api\n"
            f"  bind 127.0.0.1:{h['glance_port']} ssl crt {tls}\n"
            "  http-request set-header X-Forwarded-Proto https\n"
            "  default_backend glance_api_nodes\n"
            "backend glance_api_nodes\n"
            "  balance roundrobin\n"
            "  option httpchk GET /healthcheck\n"
            f"{glance}"
            "frontend keystone_api\n"
            f"  bind 127.0.0.1:{h['keystone_port']} ssl crt {tls}\n"
            "  http-request set-header X-Forwarded-Proto https\n"
            "  default_backend keystone_nodes\n"
            "backend keystone_nodes\n"
            "  option httpchk GET /v3\n"
            f"  server keystone 127.0.0.1:{self.state['keystone']['port']} check inter 1s "
            "fall 2 rise 1\n"
        )

    def _start_haproxy(self) -> None:
        cfg = self.dir / "haproxy" / "haproxy.cfg"
        cfg.write_text(self._haproxy_cfg())
        logfile = self.dir / "log" / "haproxy.log"
        run(["haproxy", "-c", "-f", cfg], capture_output=True)   # not -q: it hides the ALERTs
        proc = subprocess.Popen(["haproxy", "-db", "-f", cfg], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=open(logfile, "ab"),
                                stderr=subprocess.STDOUT)
        self.state["haproxy"]["pid"] = proc.pid
        self._haproxy_proc = proc
        self._save()
        wait_for("HAProxy", lambda: port_open(self.state["haproxy"]["glance_port"]), 30,
                 logfile, proc)

    def _socket(self, *parts: str) -> Path:
        """A Unix socket's path in the sandbox directory, reached through a short symlink to
        that directory when the path is longer than a server takes (HAProxy 97 characters,
        MariaDB 107: a pytest-xdist worker's tmp_path was one too many for HAProxy)."""
        sock = self.dir.joinpath(*parts)
        if len(str(sock)) <= 97:
            return sock
        link = self._short_link()
        if not (link.is_symlink() and os.readlink(link) == str(self.dir)):
            tmp = link.with_name(f"{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.dir)
            os.replace(tmp, link)
        return link.joinpath(*parts)

    def _short_link(self) -> Path:
        digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
        return Path(os.environ.get("TMPDIR") or "/tmp") / f"imagesync-sandbox-{digest}"

    def haproxy_servers(self) -> dict[str, str]:
        """HAProxy's view of its servers, from its admin socket: "backend/server" -> status
        (UP, DOWN, MAINT, ...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self._socket("haproxy", "admin.sock")))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines()
                if line and not line.startswith("#")]
        return {f"{r[0]}/{r[1]}": r[17].split()[0] for r in rows
                if len(r) > 17 and r[1] not in ("FRONTEND", "BACKEND")}

    def _wait_haproxy(self, servers: tuple[str, ...] = ("keystone", *NODES)) -> None:
        """Until HAProxy itself counts `servers` UP: a node HAProxy still holds DOWN gets
        no request, and a client would see one node only."""
        def up() -> bool:
            try:
                view = self.haproxy_servers()
            except OSError:
                return False
            return all(any(k.endswith(f"/{name}") and v == "UP" for k, v in view.items())
                       for name in servers)

        wait_for(f"HAProxy counting {', '.join(servers)} up", up, 60,
                 self.dir / "log" / "haproxy.log", getattr(self, "_haproxy_proc", None))

    def _http_ok(self, url: str, tls: bool = False) -> bool:
        try:
            ctx = self.tls_context() if tls else None
            with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
                return r.status < 400
        except OSError:
            return False

    # -- files

    def _write_clouds_yaml(self) -> None:
        """imagesync's cloud (password and application credential) and the tenants' users.
        No endpoint override: Glance is found through Keystone's catalog."""
        k = self.state["keystone"]

        def cloud(name: str, auth: str, auth_type: str = "password") -> str:
            return (f"  {name}:\n    auth_type: {auth_type}\n    auth:\n"
                    f"      auth_url: {self.keystone_url}\n{auth}"
                    f"    region_name: {REGION}\n    interface: internal\n"
                    f"    cacert: {self.cacert}\n    image_api_version: '2'\n")

        def password(user: str) -> str:
            project = USERS[user][0]
            return (f"      username: {user}\n      password: {k['passwords'][user]}\n"
                    f"      project_name: {project}\n      user_domain_name: Default\n"
                    f"      project_domain_name: Default\n")

        ac = k["app_credential"]
        text = "clouds:\n" + cloud(CLOUD, password("imagesync"))
        text += cloud(f"{CLOUD}-appcred",
                      f"      application_credential_id: {ac['id']}\n"
                      f"      application_credential_secret: {ac['secret']}\n",
                      "v3applicationcredential")
        for name, user in CLOUDS.items():
            text += cloud(name, password(user))
        self.clouds_yaml.write_text(text)
        self.clouds_yaml.chmod(0o600)

    def _save(self) -> None:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=1))
            tmp.chmod(0o600)
            tmp.replace(self.state_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["install", "up", "down", "status", "env"])
    parser.add_argument("--dir", default=os.environ.get("IMAGESYNC_SANDBOX_DIR", DEFAULT_DIR),
                        help="sandbox directory (default: %(default)s)")
    parser.add_argument("--token-expiration", type=int, metavar="SECONDS",
                        help="up: Keystone's token lifetime (default 3600; keep it >= 300, "
                             "clients renew tokens with less than 120 s left)")
    parser.add_argument("--lonely-store", choices=STORES,
                        help="up: enable this store on the first Glance API node only")
    parser.add_argument("--unified-limits", action="store_true",
                        help="up: Glance enforces Keystone unified limits (registered limits "
                             "for its four resources; kept when the sandbox restarts)")
    parser.add_argument("--no-ceph", dest="ceph", action="store_false", default=None,
                        help=f"install, up: leave Ceph and Glance's `{CEPH_STORE}` store out "
                             f"(default: ${CEPH_ENV}, else as the sandbox last ran, else in)")
    parser.add_argument("--glance-release", choices=list(GLANCE_RELEASES),
                        help=f"install, up: the Glance release (default ${GLANCE_RELEASE_ENV}, "
                             f"else {DEFAULT_GLANCE_RELEASE}; a restarted sandbox keeps its own)")
    args = parser.parse_args(argv)
    if args.command == "install":
        try:
            install(args.glance_release, ceph=Sandbox(args.dir)._choose_ceph(args.ceph))
        except SandboxError as exc:
            print(f"sandbox: {exc}", file=sys.stderr)
            return 1
        return 0
    box = Sandbox(args.dir)
    try:
        if args.command == "up":
            box.up(token_expiration=args.token_expiration, lonely_store=args.lonely_store,
                   unified_limits=args.unified_limits, glance_release=args.glance_release,
                   ceph=args.ceph)
            print("".join(f"export {k}={v}\n" for k, v in box.env().items()), end="")
        elif args.command == "down":
            box.down()
        elif args.command == "env":
            print("".join(f"export {k}={v}\n" for k, v in box.env().items()), end="")
        else:
            states = box.running()
            where = {"rabbit": lambda: f"127.0.0.1:{box.state['rabbit']['port']}/{VHOST}",
                     "mariadb": lambda: f"127.0.0.1:{box.state['mariadb']['port']}",
                     "keystone": lambda: box.keystone_url,
                     "haproxy": lambda: box.glance_url,
                     "redis": lambda: f"127.0.0.1:{box.state['redis']['port']}",
                     "sentinel": lambda: f"127.0.0.1:{box.state['sentinel']['port']} "
                                         f"(master {SENTINEL_MASTER})",
                     "etcd": lambda: box.etcd_url,
                     "ceph-mon": lambda: f"127.0.0.1:{box.state['ceph']['mon_port']}",
                     "ceph-mgr": lambda: "",
                     "ceph-osd": lambda: f"pool {_ceph().POOL} (Glance store {CEPH_STORE})",
                     **{n: (lambda n=n: box.node_url(n)) for n in NODES}}
            for name, alive in states.items():
                at = where[name]() if name.split("-")[0] in box.state else ""
                print(f"{name:9} {'running' if alive else 'stopped':8} {at}")
            print(f"{'glance':9} {'release':8} {box.glance_release} "
                  f"({GLANCE_RELEASES[box.glance_release].pip[0]})")
            if box.unified_limits:
                print(f"{'limits':9} {'unified':8} Glance enforces Keystone unified limits "
                      "(use_keystone_limits, [oslo_limit])")
            return 0 if all(states.values()) else 3
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
