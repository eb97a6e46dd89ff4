"""A real systemd 252 (Debian's /lib/systemd/systemd) as PID 1 of private namespaces, for tests.

    ns = NsSystemd(tmp_path / "ns")                 # work dir: unit dir, console log, wheels
    with ns:                                        # boot(): waits for systemd's READY=1
        ensure_venv(ns, ROOT)                       # /opt/imagesync, as the README installs it
        add_system_user(ns)                         # useradd --system ... imagesync (inside only)
        install_config(ns, conf, policy, clouds)    # /etc/imagesync/* with the README's modes
        install_unit(ns, ROOT / "systemd/imagesync.service",
                     "/opt/imagesync/bin/imagesync-daemon --config-file /etc/imagesync/x.conf")
        ns.systemctl("start", "imagesync.service", check=True)
        ns.show("imagesync.service", "ActiveState", "MainPID")
    ns.teardown   # what shutdown() returned: {"seconds", "leftover_pids", "cgroup_left", ...}

Root only, standard library only. Shares the host's network namespace (the daemon reaches
the sandbox's RabbitMQ and Glance on 127.0.0.1); everything else systemd could write to is
private or a throw-away overlay (see systemd_ns_init.sh). Verified facts and pitfalls behind
each step: ../shared/systemd-in-a-namespace/RECIPE.md.

A boot failure raises RuntimeError with the tail of the console log: tests fail, never skip.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

HERE = Path(__file__).resolve().parent
NS_INIT = HERE / "systemd_ns_init.sh"
UNITS_TEMPLATE = HERE / "systemd_units"
VENV_INSIDE = "/opt/imagesync"
CACHE = Path(os.environ.get("IMAGESYNC_SANDBOX_CACHE", Path.home() / ".cache/imagesync-sandbox"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_PREFIX = "nsboot-"  # as the reference launcher's: each cleans the other's leftovers


def log(msg: str) -> None:
    print(f"[systemd-ns] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- host-side helpers

def _cgroup2_mount() -> Path:
    """Where the host's cgroup2 hierarchy is mounted (/sys/fs/cgroup/unified in hybrid mode)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[parts.index("-") + 1] == "cgroup2":
                return Path(parts[4])
    raise RuntimeError("no cgroup2 hierarchy is mounted on the host")


def _own_cgroup2() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _pids_in_pidns(ns_link: str) -> list[int]:
    """Host PIDs of every process whose PID namespace is ns_link ('pid:[4026...]')."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/ns/pid") == ns_link:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def _rmdir_tree(path: Path) -> bool:
    """rmdir a cgroup tree deepest first (cgroup dirs only go with rmdir); True if gone."""
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass
    return not path.exists()


def cleanup_stale_cgroups() -> list[str]:
    """Remove the empty cgroup trees of launchers that died (e.g. SIGKILLed pytest): the
    namespace dies with its launcher (PDEATHSIG chain), but nobody is left to rmdir them."""
    removed = []
    for path in _cgroup2_mount().glob(CGROUP_PREFIX + "*"):
        launcher = path.name.split("-")[1]
        if not path.is_dir() or (launcher.isdigit() and Path(f"/proc/{launcher}").exists()):
            continue  # a live launcher's (maybe booting right now)
        busy = any((Path(root) / "cgroup.procs").read_text().strip()
                   for root, _d, _f in os.walk(path) if (Path(root) / "cgroup.procs").exists())
        if not busy and _rmdir_tree(path):
            removed.append(path.name)
    return removed


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "(no console log)"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)  # status colours, cursor moves
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- the launcher

class NsSystemd:
    """One systemd instance. workdir (created, caller-owned) holds everything it writes on
    the host: units/ (its only unit directory), console.log, notify.sock, build dirs."""

    def __init__(self, workdir: Path, *, units: Path = UNITS_TEMPLATE, venv: Path | bool = True,
                 binds: tuple = (), overlay: tuple = ("/etc", "/var", "/opt"),
                 target: str = "default.target", log_level: str = "info"):
        self.workdir = Path(workdir).resolve()
        self.unit_dir = self.workdir / "units"
        self.console_log = self.workdir / "console.log"
        self.template = Path(units)
        # The host dir that is /opt/imagesync inside (read-write): the venv persists there.
        self.venv = venv_cache_dir() if venv is True else (Path(venv) if venv else None)
        self.binds = [(Path(s), d, ro) for s, d, ro in binds]  # (host src, dst inside, read-only)
        if self.venv:
            self.binds.append((self.venv, VENV_INSIDE, False))
        self.overlay, self.target, self.log_level = overlay, target, log_level
        self.id = f"{CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cgroup: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None
        self.pidns: str | None = None
        self.boot_seconds: float | None = None
        self.teardown: dict | None = None
        self.venv_timings: dict = {}
        self._master: int | None = None
        self._reader: threading.Thread | None = None
        self._notify: socket.socket | None = None

    # ------------------------------------------------------------ boot
    def boot(self, timeout: float = 60) -> float:
        """Boot; return the seconds until systemd said READY=1 (also in self.boot_seconds)."""
        if os.geteuid() != 0:
            raise RuntimeError("NsSystemd needs root (namespaces, mounts, cgroups)")
        # PR_SET_PDEATHSIG fires when the *thread* that forked the launcher ends: a worker
        # thread's exit would kill the namespace under the test.
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("NsSystemd.boot() must run in the main thread (PDEATHSIG chain)")
        cleanup_stale_cgroups()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.unit_dir.exists():
            shutil.rmtree(self.unit_dir)
        shutil.copytree(self.template, self.unit_dir, symlinks=True)
        empty = self.workdir / "empty"  # generator paths: no generators at all
        empty.mkdir(exist_ok=True)
        if self.venv:
            self.venv.mkdir(parents=True, exist_ok=True)
            self.venv.chmod(0o755)  # the service (PrivateUsers=yes: it sees "nobody") reads it

        # A fresh cgroup2 dir per instance: unshare --cgroup roots the namespace there, so the
        # inner systemd manages only its own subtree, and parallel instances never collide.
        cg2 = _cgroup2_mount()
        self._cg_home = cg2 / _own_cgroup2().lstrip("/")
        self.cgroup = cg2 / self.id
        self.cgroup.mkdir()

        # systemd (PID 1 in a container) reports READY=1 to $NOTIFY_SOCKET after booting.
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify = str(self.workdir / "notify.sock")
        if len(notify) > 100:  # sun_path limit; we share the host's netns, so abstract works
            notify = "@" + self.id
            self._notify.bind("\0" + self.id)
        else:
            Path(notify).unlink(missing_ok=True)
            self._notify.bind(notify)

        # The pty's slave side becomes /dev/console inside; a thread copies it to console.log.
        master, slave = os.openpty()
        tty.setraw(slave)
        self._master = master
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()

        env = {
            "PATH": PATH,
            "NSB_UNIT_PATH": str(self.unit_dir),
            "NSB_EMPTY": str(empty),
            "NSB_KEEP": str(self.workdir),
            "NSB_BINDS": " ".join(f"{s}:{d}:{'ro' if ro else 'rw'}" for s, d, ro in self.binds),
            "NSB_OVERLAY": " ".join(self.overlay),
            "NSB_NOTIFY": notify,
            "NSB_TARGET": self.target,
            "NSB_LOG_LEVEL": self.log_level,
        }
        # sh moves itself into the fresh cgroup BEFORE unshare --cgroup (the namespace root is
        # the cgroup at unshare time); setpriv: SIGKILL when our (main) thread dies; unshare
        # --kill-child: then SIGKILL the inner PID 1, and the kernel kills the whole namespace.
        # No --net: the daemon must reach RabbitMQ and Glance on the host's loopback.
        cmd = ["/bin/sh", "-c",
               'echo 0 > "$1" && shift && exec setpriv --pdeathsig KILL -- "$@"', "nsboot",
               str(self.cgroup / "cgroup.procs"),
               "unshare", "--fork", "--pid", "--mount-proc", "--mount", "--propagation", "private",
               "--uts", "--ipc", "--cgroup", "--kill-child=SIGKILL", "/bin/sh", str(NS_INIT)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        try:
            self._find_pid1(t0 + 10)
            self._wait_ready(t0 + timeout)
        except (RuntimeError, OSError) as exc:
            res = self.shutdown(graceful=False)
            raise RuntimeError(f"systemd did not boot: {exc} (teardown {res}); console log "
                               f"{self.console_log}:\n{_tail(self.console_log)}") from None
        self.boot_seconds = round(time.monotonic() - t0, 3)
        return self.boot_seconds

    def _find_pid1(self, deadline: float) -> None:
        """Host PID of the inner PID 1 = unshare's only child."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while not self.pid1:
            try:
                kids = children.read_text().split()
            except OSError:
                kids = []
            if kids:
                self.pid1 = int(kids[0])
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("unshare exited or hung before forking "
                                   f"(rc={self.proc.returncode})")
            else:
                time.sleep(0.002)
        self.pidns = os.readlink(f"/proc/{self.pid1}/ns/pid")
        # unshare itself stays on the host side: back to our own cgroup, out of systemd's tree.
        (self._cg_home / "cgroup.procs").write_text(str(self.proc.pid))

    def _wait_ready(self, deadline: float) -> None:
        buf = b""
        while b"READY=1" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("no READY=1 before the timeout")
            if self.proc.poll() is not None:
                raise RuntimeError(f"the namespace ended (unshare rc={self.proc.returncode})")
            if select.select([self._notify], [], [], min(left, 0.25))[0]:
                buf += self._notify.recv(4096) + b"\n"

    def _read_console(self) -> None:
        with open(self.console_log, "ab", buffering=0) as out:
            while True:
                try:
                    data = os.read(self._master, 65536)
                except OSError:  # EIO once every slave fd is closed: the namespace is gone
                    break
                if not data:
                    break
                out.write(data)

    def pids(self) -> list[int]:
        """Host PIDs of the processes in the namespace."""
        return _pids_in_pidns(self.pidns) if self.pidns else []

    def console_tail(self, lines: int = 40) -> str:
        return _tail(self.console_log, lines)

    # ------------------------------------------------------------ commands inside
    def run(self, *cmd, check: bool = False, timeout: float = 120, input: str | None = None,
            env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run cmd in every namespace of the inner systemd (as root, not under systemd)."""
        if not self.pid1:
            raise RuntimeError("not booted")
        full_env = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0",
                    "TERM": "dumb", **(env or {})}
        done = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", *map(str, cmd)],
                              env=full_env, capture_output=True, text=True, check=False,
                              timeout=timeout, input=input, **kw)
        if check and done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"inside the namespace, {' '.join(map(str, cmd))} exited "
                               f"{done.returncode}:\n{tail}")
        return done

    def systemctl(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args, **kw)

    def show(self, unit: str, *props: str) -> dict:
        out = self.systemctl("show", "-p", ",".join(props), unit, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-u", unit, "-o", "cat", *args).stdout

    def write(self, path: str, text: str, mode: int = 0o644, owner: str = "root",
              group: str = "root") -> None:
        """Write a file inside (install(1) resolves owner/group in the namespace's /etc)."""
        self.run("install", "-m", f"{mode:o}", "-o", owner, "-g", group, "/dev/stdin", path,
                 input=text, check=True)

    def mkdir(self, path: str, mode: int = 0o755, owner: str = "root",
              group: str = "root") -> None:
        self.run("install", "-d", "-m", f"{mode:o}", "-o", owner, "-g", group, path, check=True)

    def add_unit(self, name: str, text: str) -> Path:
        """Put a unit (or 'x.service.d/y.conf' drop-in) in the unit dir; daemon-reload is yours."""
        path = self.unit_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    # ------------------------------------------------------------ teardown
    def shutdown(self, graceful: bool = True, timeout: float = 15) -> dict:
        """End the namespace; return {"seconds", "leftover_pids", "cgroup_left", ...}."""
        res: dict = {"graceful": graceful, "sigkill": False}
        t0 = time.monotonic()
        if self.proc and self.proc.poll() is None and self.pid1:
            if graceful:
                # SIGRTMIN+14 = immediate poweroff: systemd-shutdown TERMs then KILLs what is
                # left and PID 1 exits. NEVER SIGTERM: PID 1 re-executes itself on SIGTERM.
                try:
                    os.kill(self.pid1, signal.SIGRTMIN + 14)
                    self.proc.wait(timeout)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                # SIGKILL of the namespace's PID 1: the kernel kills every process in it.
                res["sigkill"] = True
                try:
                    os.kill(self.pid1, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        res["unshare_rc"] = self.proc.returncode if self.proc else None
        left: list[int] = []
        if self.pidns:  # nothing of the namespace may remain (zombies are reaped shortly)
            deadline = time.monotonic() + 5
            while (left := _pids_in_pidns(self.pidns)) and time.monotonic() < deadline:
                time.sleep(0.05)
        res["leftover_pids"] = left
        if self.cgroup:
            deadline = time.monotonic() + 5
            while not _rmdir_tree(self.cgroup) and time.monotonic() < deadline:
                time.sleep(0.05)
        res["cgroup_left"] = bool(self.cgroup and self.cgroup.exists())
        res["seconds"] = round(time.monotonic() - t0, 3)
        if self._reader:
            self._reader.join(5)
        if self._master is not None:
            os.close(self._master)
            self._master = None
        if self._notify:
            self._notify.close()
            self._notify = None
        (self.workdir / "notify.sock").unlink(missing_ok=True)
        self.teardown = res
        return res

    def __enter__(self) -> Self:
        self.boot()
        return self

    def __exit__(self, *exc) -> bool:
        if self.teardown is None:  # not already shut down by hand
            self.shutdown()
        return False


# ------------------------------------------------- imagesync, as an operator installs it

def venv_cache_dir() -> Path:
    """Host dir of the persistent venv (bound at /opt/imagesync inside): deps install once."""
    return CACHE / "systemd-venv"


_REINSTALLED: set[Path] = set()  # venvs that got this session's imagesync already


def _requires_hash(checkout: Path) -> str:
    cfg = configparser.ConfigParser()
    cfg.read(checkout / "setup.cfg")
    reqs = sorted(r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip())
    python = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True,
                            check=True).stdout.strip()  # a new interpreter needs a new venv
    return hashlib.sha256("\n".join([python, *reqs]).encode()).hexdigest()


def _pip(ns: NsSystemd, *args: str, timeout: float = 1800) -> None:
    # As root inside: HOME=/root is the host's (not overlaid), so pip uses the host's
    # ~/.config/pip, ~/.cache/pip and, through the overlays, /etc/pip.conf and /opt/pypi.
    env = {"HOME": str(Path.home()),
           **{k: v for k, v in os.environ.items() if k.startswith(("PIP_", "XDG_"))}}
    ns.run(f"{VENV_INSIDE}/bin/python", "-m", "pip", *args, env=env, check=True, timeout=timeout,
           umask=0o022)  # world-readable files: the service's PrivateUsers=yes sees "nobody"


def _build_wheel(ns: NsSystemd, checkout: Path) -> str:
    """Build imagesync's wheel from a copy of the checkout, inside (path of the wheel inside).
    The copy lives in the work dir, which stays visible in the namespace even if the checkout
    is under /tmp, and keeps build/ and *.egg-info out of the checkout."""
    src, out = ns.workdir / "imagesync-src", ns.workdir / "wheel"
    for d in (src, out):
        shutil.rmtree(d, ignore_errors=True)
    src.mkdir()
    for f in checkout.iterdir():
        if f.is_file():
            shutil.copy2(f, src / f.name)
    shutil.copytree(checkout / "imagesync", src / "imagesync",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip(ns, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    wheels = list(out.glob("imagesync-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one imagesync wheel in {out}, found {wheels}")
    return str(wheels[0])


def ensure_venv(ns: NsSystemd, checkout: Path) -> dict:
    """Make /opt/imagesync a venv of Debian's /usr/bin/python3 holding imagesync from checkout.

    Rebuilt (deps included) when setup.cfg's install_requires or the interpreter change;
    otherwise only imagesync itself is reinstalled, once per session. Returns the timings."""
    if not ns.venv:
        raise RuntimeError("this NsSystemd has no venv bind (venv=False)")
    checkout = Path(checkout).resolve()
    want = _requires_hash(checkout)
    stamp = ns.venv / ".install-requires.sha256"
    timings: dict = {}
    with open(ns.venv.parent / (ns.venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same venv
        have = stamp.read_text().strip() if stamp.exists() else None
        if have != want:
            if any(ns.venv.iterdir()) and not (ns.venv / "pyvenv.cfg").exists():
                raise RuntimeError(f"{ns.venv} is not empty and not a venv: not wiping it")
            for p in ns.venv.iterdir():  # empty it; the dir itself is the bind mount's source
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            t0 = time.monotonic()
            ns.run("/usr/bin/python3", "-m", "venv", VENV_INSIDE, check=True, umask=0o022)
            _pip(ns, "install", "-q", "setuptools>=64", "wheel")  # to build the wheel below
            _pip(ns, "install", "-q", _build_wheel(ns, checkout))
            stamp.write_text(want + "\n")  # last: a half-built venv is rebuilt next time
            timings["build_seconds"] = round(time.monotonic() - t0, 1)
            log(f"venv {ns.venv} built (deps + imagesync) in {timings['build_seconds']} s")
        elif ns.venv not in _REINSTALLED:
            t0 = time.monotonic()
            _pip(ns, "install", "-q", "--no-deps", "--force-reinstall", _build_wheel(ns, checkout))
            timings["reinstall_seconds"] = round(time.monotonic() - t0, 1)
            log(f"imagesync reinstalled into {ns.venv} in {timings['reinstall_seconds']} s")
        _REINSTALLED.add(ns.venv)
    ns.venv_timings = timings
    return timings


def add_system_user(ns: NsSystemd, name: str = "imagesync") -> None:
    """The README's useradd, inside (the /etc overlay keeps the host's passwd unchanged)."""
    if ns.run("id", "-u", name).returncode != 0:
        ns.run("useradd", "--system", "--user-group", "--home-dir", f"/var/lib/{name}",
               "--shell", "/usr/sbin/nologin", name, check=True)


def install_config(ns: NsSystemd, conf: str, policy: str, clouds: str) -> None:
    """/etc/imagesync/{imagesync.conf,policy.yaml,clouds.yaml} with the README's owners/modes."""
    ns.mkdir("/etc/imagesync", 0o750, "root", "imagesync")
    ns.write("/etc/imagesync/imagesync.conf", conf, 0o640, "root", "imagesync")
    ns.write("/etc/imagesync/policy.yaml", policy, 0o640, "root", "imagesync")
    ns.write("/etc/imagesync/clouds.yaml", clouds, 0o600, "imagesync", "imagesync")


def install_unit(ns: NsSystemd, unit_file: Path, exec_start: str) -> None:
    """The shipped unit, unchanged, plus the README's `systemctl edit` drop-in for ExecStart."""
    unit_file = Path(unit_file)
    shutil.copyfile(unit_file, ns.unit_dir / unit_file.name)
    ns.add_unit(f"{unit_file.name}.d/10-test.conf",
                f"[Service]\nExecStart=\nExecStart={exec_start}\n")
    ns.systemctl("daemon-reload", check=True)
