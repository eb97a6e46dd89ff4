#!/usr/bin/env python3
"""A real RabbitMQ + MariaDB + Glance 33 on loopback, for tests, demos and benchmarks.

    python3 tools/sandbox.py install          # apt packages + Glance's own virtualenv
    python3 tools/sandbox.py up [--dir D]     # start everything on free ports
    python3 tools/sandbox.py env|status|down [--dir D]

Standard library only (it runs before any virtualenv exists). Every service keeps
its state and log under the sandbox directory, listens on 127.0.0.1 only, and is
stopped by PID. Glance runs in its own virtualenv so its pins never meet ours.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
# systemd, dbus, python3-venv, util-linux, passwd: the real systemd the unit tests boot in
# namespaces (dbus for `systemd-analyze security`), and the unit's /opt/imagesync venv.
APT_PACKAGES = ("rabbitmq-server", "mariadb-server", "libmariadb-dev", "systemd", "dbus",
                "python3-venv", "util-linux", "passwd")
GLANCE_PIP = ("glance>=33,<34", "uwsgi>=2.0.28", "mysqlclient>=2.2")
CACHE = Path(os.environ.get("IMAGESYNC_SANDBOX_CACHE", Path.home() / ".cache/imagesync-sandbox"))
GLANCE_VENV = CACHE / "glance-venv"
DEFAULT_DIR = HERE.parent / ".sandbox"
STORES = ("fast", "slow", "edge")
ADMIN_PROJECT = "a0000000000000000000000000000adm"
MEMBER_PROJECT = "c0000000000000000000000000000c0c"
CLOUD = "sandbox"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


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


def stop_pid(pid: int | None, name: str, timeout: float = 20.0) -> None:
    """SIGTERM the process group led by pid, then SIGKILL what is left."""
    if not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in (lambda s=sig: os.killpg(pid, s), lambda s=sig: os.kill(pid, s)):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if not pid_alive(pid):
            return
        log(f"{name} (pid {pid}) ignored SIGTERM; killing")


# ---------------------------------------------------------------- install


def install() -> None:
    """Install what is missing; quick when everything is there."""
    missing = [p for p in APT_PACKAGES
               if run(["dpkg-query", "-W", "-f=${Status}", p], check=False,
                      capture_output=True, text=True).stdout.strip() != "install ok installed"]
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    marker = GLANCE_VENV / ".imagesync-sandbox"
    wanted = "\n".join(GLANCE_PIP)
    if not marker.exists() or marker.read_text() != wanted:
        log(f"building Glance's virtualenv in {GLANCE_VENV}")
        shutil.rmtree(GLANCE_VENV, ignore_errors=True)
        run([sys.executable, "-m", "venv", GLANCE_VENV])
        run([GLANCE_VENV / "bin/pip", "install", "-q", "--upgrade", "pip"])
        run([GLANCE_VENV / "bin/pip", "install", "-q", *GLANCE_PIP])
        marker.write_text(wanted)


# ---------------------------------------------------------------- services


class Sandbox:
    """One sandbox directory: its config, state file, services and logs."""

    def __init__(self, directory: Path | str = DEFAULT_DIR):
        self.dir = Path(directory).resolve()
        self.state_file = self.dir / "sandbox.json"
        self.state: dict = (json.loads(self.state_file.read_text())
                            if self.state_file.exists() else {})

    # -- public

    @property
    def glance_url(self) -> str:
        return f"http://127.0.0.1:{self.state['glance']['port']}"

    @property
    def transport_url(self) -> str:
        return f"rabbit://guest:guest@127.0.0.1:{self.state['rabbit']['port']}/"

    @property
    def clouds_yaml(self) -> Path:
        return self.dir / "clouds.yaml"

    def env(self) -> dict[str, str]:
        return {
            "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml),
            "OS_CLOUD": CLOUD,
            "IMAGESYNC_GLANCE_URL": self.glance_url,
            "IMAGESYNC_TRANSPORT_URL": self.transport_url,
            "IMAGESYNC_SANDBOX_DIR": str(self.dir),
        }

    def running(self) -> dict[str, bool]:
        return {name: pid_alive(self.state.get(name, {}).get("pid"))
                for name in ("rabbit", "mariadb", "glance")}

    def up(self, glance_options: dict[str, dict[str, str]] | None = None) -> Sandbox:
        if any(self.running().values()):
            raise SandboxError(f"sandbox in {self.dir} is already running; run 'down' first")
        install()
        for sub in ("log", "etc", "run", "rabbit", "mariadb", "glance/staging", "glance/tasks",
                    "glance/locks", *(f"glance/stores/{s}" for s in STORES)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # A restarted sandbox keeps its ports, passwords and database; only PIDs are new.
        self.state["glance_options"] = glance_options or self.state.get("glance_options", {})
        t0 = time.monotonic()
        try:
            self._start_rabbit()
            self._start_mariadb()
            self._start_glance()
        except BaseException:
            self.down()
            raise
        self._write_clouds_yaml()
        log(f"up in {time.monotonic() - t0:.1f}s: Glance {self.glance_url}, "
            f"RabbitMQ 127.0.0.1:{self.state['rabbit']['port']}")
        return self

    def down(self) -> None:
        rabbit = self.state.get("rabbit")
        if rabbit and pid_alive(rabbit.get("pid")):
            run([RABBIT_BIN / "rabbitmqctl", "stop"], env=self._rabbit_env(), check=False,
                capture_output=True, timeout=60)
        for name in ("glance", "mariadb", "rabbit"):
            stop_pid(self.state.get(name, {}).get("pid"), name)
        if rabbit:
            run(["epmd", "-port", rabbit["epmd_port"], "-kill"], check=False, capture_output=True,
                env=dict(os.environ, ERL_EPMD_ADDRESS="127.0.0.1"))
            stop_pid(self._epmd_pid(rabbit["epmd_port"]), "epmd", timeout=5)
        if self.state:
            self._save()

    def restart(self, name: str) -> None:
        """Stop and start one service, on the same ports (for outage tests)."""
        self.stop_service(name)
        self.start_service(name)

    def stop_service(self, name: str) -> None:
        if name == "rabbit":
            run([RABBIT_BIN / "rabbitmqctl", "stop"], env=self._rabbit_env(), check=False,
                capture_output=True, timeout=60)
        stop_pid(self.state[name]["pid"], name)

    def start_service(self, name: str) -> None:
        {"rabbit": self._start_rabbit, "mariadb": self._start_mariadb,
         "glance": self._start_glance}[name]()

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

    def _start_rabbit(self) -> None:
        base = self.dir / "rabbit"
        if "rabbit" not in self.state:
            port = free_port()
            self.state["rabbit"] = {"port": port, "dist_port": free_port(),
                                    "epmd_port": free_port(),
                                    "nodename": f"imagesync{port}@localhost"}
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            "loopback_users.guest = true\n"
            f"listeners.tcp.default = 127.0.0.1:{self.state['rabbit']['port']}\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.dir / "log" / "rabbit").mkdir(parents=True, exist_ok=True)
        env, logfile = self._rabbit_env(), self.dir / "log" / "rabbitmq.log"
        proc = subprocess.Popen([RABBIT_BIN / "rabbitmq-server"], env=env, start_new_session=True,
                                stdout=open(logfile, "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.state["rabbit"]["pid"] = proc.pid
        self._save()
        done = run([RABBIT_BIN / "rabbitmqctl", "wait", "--timeout", "120", base / "rabbit.pid"],
                   env=env, check=False, capture_output=True, timeout=150)
        if done.returncode != 0 or proc.poll() is not None:
            wait_for("RabbitMQ", lambda: False, 0, logfile, proc)
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

    # -- MariaDB

    def _start_mariadb(self) -> None:
        base = self.dir / "mariadb"
        if "mariadb" not in self.state:
            self.state["mariadb"] = {"port": free_port(), "password": secrets.token_hex(12)}
        m, cnf = self.state["mariadb"], base / "my.cnf"
        cnf.write_text(
            "[client]\n"
            f"socket = {base}/mysqld.sock\n"
            "[mysqld]\n"
            f"user = root\ndatadir = {base}/data\nsocket = {base}/mysqld.sock\n"
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
            sql = (f"CREATE DATABASE glance CHARACTER SET utf8;"
                   f"CREATE USER 'glance'@'127.0.0.1' IDENTIFIED BY '{m['password']}';"
                   f"GRANT ALL PRIVILEGES ON glance.* TO 'glance'@'127.0.0.1';")
            run(["mariadb", f"--defaults-file={cnf}", "-uroot", "-e", sql])

    def queues(self) -> dict[str, tuple[int, int]]:
        """RabbitMQ queues: name -> (messages ready, messages unacknowledged)."""
        out = run([RABBIT_BIN / "rabbitmqctl", "list_queues", "-q", "--no-table-headers",
                   "name", "messages_ready", "messages_unacknowledged"],
                  env=self._rabbit_env(), capture_output=True, text=True, timeout=60)
        queues = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                queues[parts[0]] = (int(parts[1]), int(parts[2]))
        return queues

    def consumers(self) -> dict[str, int]:
        """RabbitMQ queues: name -> consumers attached now."""
        out = run([RABBIT_BIN / "rabbitmqctl", "list_queues", "-q", "--no-table-headers",
                   "name", "consumers"],
                  env=self._rabbit_env(), capture_output=True, text=True, timeout=60)
        return {p[0]: int(p[1]) for p in (line.split() for line in out.stdout.splitlines())
                if len(p) == 2 and p[1].isdigit()}

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

    # -- Glance

    def _glance_conf(self) -> str:
        g, m, r = self.state["glance"], self.state["mariadb"], self.state["rabbit"]
        d = self.dir / "glance"
        sections: dict[str, dict[str, str]] = {
            "DEFAULT": {
                "enabled_backends": ", ".join(f"{s}:file" for s in STORES),
                "enabled_import_methods": "[glance-direct, web-download, copy-image]",
                "worker_self_reference_url": f"http://127.0.0.1:{g['port']}",
                "transport_url": f"rabbit://guest:guest@127.0.0.1:{r['port']}/",
                "log_file": str(self.dir / "log" / "glance-api.log"),
                "debug": "false",
            },
            "database": {"connection": f"mysql+mysqldb://glance:{m['password']}@127.0.0.1:"
                                       f"{m['port']}/glance?charset=utf8"},
            "glance_store": {"default_backend": STORES[0]},
            "os_glance_staging_store": {"filesystem_store_datadir": str(d / "staging")},
            "os_glance_tasks_store": {"filesystem_store_datadir": str(d / "tasks")},
            "oslo_concurrency": {"lock_path": str(d / "locks")},
            "oslo_messaging_notifications": {"driver": "messagingv2"},
            "paste_deploy": {"flavor": "sandbox",
                             "config_file": str(self.dir / "etc" / "glance-api-paste.ini")},
        }
        for s in STORES:
            sections[s] = {"filesystem_store_datadir": str(d / "stores" / s),
                           "store_description": f"{s} file store"}
        for section, opts in self.state.get("glance_options", {}).items():
            sections.setdefault(section, {}).update(opts)
        return "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) + "\n"
                       for name, opts in sections.items())

    def _start_glance(self) -> None:
        if "glance" not in self.state:
            self.state["glance"] = {"port": free_port()}
        etc, port = self.dir / "etc", self.state["glance"]["port"]
        paste = (GLANCE_VENV / "etc/glance/glance-api-paste.ini").read_text()
        paste = paste.replace(
            "keystone = cors",
            "sandbox = cors http_proxy_to_wsgi versionnegotiation osprofiler sandboxidentity "
            "context rootapp\nkeystone = cors", 1)
        paste += ("\n[composite:glance-api-sandbox]\n"
                  "paste.composite_factory = glance.api:root_app_factory\n"
                  "/: api\n/healthcheck: healthcheck\n")
        paste += ("\n[filter:sandboxidentity]\n"
                  "paste.filter_factory = sandbox_identity:filter_factory\n")
        (etc / "glance-api-paste.ini").write_text(paste)
        (etc / "glance-api.conf").write_text(self._glance_conf())
        if not self.state["glance"].get("db_synced"):
            run([GLANCE_VENV / "bin/glance-manage", "--config-file", etc / "glance-api.conf",
                 "db_sync"], capture_output=True)
            self.state["glance"]["db_synced"] = True
        (etc / "uwsgi.ini").write_text(
            "[uwsgi]\n"
            f"http-socket = 127.0.0.1:{port}\n"
            "module = glance.wsgi.api:application\n"
            f"virtualenv = {GLANCE_VENV}\n"
            f"pythonpath = {HERE}\n"
            f"env = OS_GLANCE_CONFIG_DIR={etc}\n"
            "master = true\nprocesses = 2\nthreads = 4\nlazy-apps = true\ndie-on-term = true\n"
            "http-raw-body = true\nhttp-chunked-input = true\nhttp-auto-chunked = true\n"
            "buffer-size = 65535\nneed-app = true\n"
            # http-socket closes every connection after its response; say so, or
            # clients reuse pooled connections and get "connection reset".
            "add-header = Connection: close\n"
        )
        logfile = self.dir / "log" / "glance-uwsgi.log"
        proc = subprocess.Popen([GLANCE_VENV / "bin/uwsgi", "--ini", etc / "uwsgi.ini"],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=open(logfile, "ab"), stderr=subprocess.STDOUT)
        self.state["glance"]["pid"] = proc.pid
        self._save()

        def ready() -> bool:
            try:
                url = f"http://127.0.0.1:{port}/v2/info/stores"
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for("Glance", ready, 90, logfile, proc)

    # -- files

    def _write_clouds_yaml(self) -> None:
        """Cloud `sandbox` (admin, no auth) and `sandbox-member` (a plain member, whose
        token is a secret that must never appear in imagesync's output)."""
        url = self.glance_url
        if "member_token" not in self.state:
            self.state["member_token"] = (f"sandbox:{MEMBER_PROJECT}:member,reader:"
                                          f"{secrets.token_hex(16)}")
            self._save()
        self.clouds_yaml.write_text(
            "clouds:\n"
            f"  {CLOUD}:\n"
            "    auth_type: none\n"
            f"    auth:\n      endpoint: {url}\n"
            f"    image_endpoint_override: {url}\n"
            "    image_api_version: '2'\n"
            f"  {CLOUD}-member:\n"
            "    auth_type: admin_token\n"
            f"    auth:\n      endpoint: {url}\n      token: {self.state['member_token']}\n"
            f"    image_endpoint_override: {url}\n"
            "    image_api_version: '2'\n"
        )
        self.clouds_yaml.chmod(0o600)

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["install", "up", "down", "status", "env"])
    parser.add_argument("--dir", default=os.environ.get("IMAGESYNC_SANDBOX_DIR", DEFAULT_DIR),
                        help="sandbox directory (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "install":
        install()
        return 0
    box = Sandbox(args.dir)
    try:
        if args.command == "up":
            box.up()
            print("".join(f"export {k}={v}\n" for k, v in box.env().items()), end="")
        elif args.command == "down":
            box.down()
        elif args.command == "env":
            print("".join(f"export {k}={v}\n" for k, v in box.env().items()), end="")
        else:
            states = box.running()
            for name, alive in states.items():
                print(f"{name:8} {'running' if alive else 'stopped'}")
            return 0 if all(states.values()) else 3
    except SandboxError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
