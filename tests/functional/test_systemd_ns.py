"""The launcher of a real systemd in private namespaces (tests/systemd_ns.py), tested itself.

It boots Debian's systemd 252 as PID 1, starts units in it, installs imagesync the way the
README tells an operator to, and must leave nothing behind on the host: no process, no
cgroup, no socket, no user, no /run/systemd/system. No sandbox needed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import wait_for
from sandbox import free_port  # below the ephemeral range: no race with clients
from systemd_ns import (
    NsSystemd,
    add_system_user,
    ensure_venv,
    install_config,
    install_unit,
)

pytestmark = pytest.mark.systemd

ROOT = Path(__file__).resolve().parent.parent.parent
HOST_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
HOST_ABSENT = ("/run/systemd/system", "/dev/log", "/var/lib/nsboot-selftest", "/opt/imagesync",
               "/etc/imagesync", "/etc/nsboot-selftest")

# Type=notify: listens on the host's loopback (shared netns), writes its StateDirectory=,
# then says READY=1 and waits.
NOTIFY_DAEMON = textwrap.dedent("""\
    import os, socket, sys, time
    srv = socket.socket()
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen()
    with open(os.path.join(os.environ["STATE_DIRECTORY"], "alive"), "w") as f:
        f.write("yes")
    print("selftest daemon listening on", sys.argv[1], flush=True)
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.sendto(b"READY=1\\nSTATUS=listening", os.environ["NOTIFY_SOCKET"])
    while True:
        time.sleep(60)
""")


def host_snapshot() -> dict:
    return {
        "hashes": {f: hashlib.sha256(Path(f).read_bytes()).hexdigest()
                   for f in HOST_FILES if Path(f).exists()},
        "present": {p: os.path.lexists(p) for p in HOST_ABSENT},
    }


def socket_inodes(pids: list[int]) -> set[str]:
    """Inodes of the sockets the given processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    return inodes


def host_socket_inodes() -> set[str]:
    """Inodes of every TCP/UDP/unix socket in the host's network namespace."""
    inodes = set()
    for name, col in (("tcp", 9), ("tcp6", 9), ("udp", 9), ("udp6", 9), ("unix", 6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) > col:
                inodes.add(parts[col])
    return inodes


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def assert_clean_teardown(ns: NsSystemd, before: dict, ns_sockets: set[str]) -> None:
    res = ns.teardown
    assert res is not None
    assert res["leftover_pids"] == [], res
    assert res["cgroup_left"] is False, res
    assert not (ns_sockets & host_socket_inodes()), "sockets of the namespace outlived it"
    after = host_snapshot()
    assert after["hashes"] == before["hashes"], "host /etc/passwd, group or shadow changed"
    assert after["present"] == before["present"], f"host paths appeared: {after['present']}"


def test_systemd_boots_starts_a_notify_unit_and_leaves_nothing_behind(tmp_path, record_property):
    before = host_snapshot()
    marker = Path("/tmp") / f"nsboot-marker-{os.getpid()}"  # tmpfiles' "D /tmp" must not empty it
    marker.write_text("x")
    port = free_port()
    ns = NsSystemd(tmp_path / "ns", venv=False)
    ns_sockets: set[str] = set()
    try:
        with ns:
            assert ns.boot_seconds < 30
            state = ns.systemctl("is-system-running", "--wait", timeout=30).stdout.strip()
            assert state == "running", ns.systemctl("list-units", "--failed").stdout
            assert ns.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
            assert ns.run("test", "-d", "/run/systemd/system").returncode == 0
            assert ns.run("test", "-e", str(marker)).returncode != 0, "/tmp is not private"

            # /etc is an overlay: useradd and files inside, host unchanged
            add_system_user(ns, "nsboot-selftest")
            ns.mkdir("/etc/nsboot-selftest", 0o750, "root", "nsboot-selftest")
            ns.write("/etc/nsboot-selftest/secret", "s3cret\n", 0o600,
                     "nsboot-selftest", "nsboot-selftest")
            st = ns.run("stat", "-c", "%a %U %G", "/etc/nsboot-selftest",
                        "/etc/nsboot-selftest/secret", check=True).stdout.split("\n")
            assert st[:2] == ["750 root nsboot-selftest", "600 nsboot-selftest nsboot-selftest"]

            script = ns.workdir / "notify_daemon.py"  # the work dir is visible inside
            script.write_text(NOTIFY_DAEMON)
            ns.add_unit("nsboot-selftest.service", textwrap.dedent(f"""\
                [Service]
                Type=notify
                ExecStart=/usr/bin/python3 {script} {port}
                StateDirectory=nsboot-selftest
                TimeoutStartSec=20
                """))
            ns.systemctl("daemon-reload", check=True)
            t0 = time.monotonic()
            ns.systemctl("start", "nsboot-selftest.service", check=True, timeout=40)
            start_seconds = time.monotonic() - t0
            props = ns.show("nsboot-selftest.service", "ActiveState", "SubState", "StatusText")
            assert props == {"ActiveState": "active", "SubState": "running",
                             "StatusText": "listening"}, props
            assert listening(port), "the unit's listener is not on the host's loopback"
            assert ns.run("cat", "/var/lib/nsboot-selftest/alive").stdout == "yes"
            wait_for(lambda: f"listening on {port}" in ns.journal("nsboot-selftest.service"),
                     timeout=5, message="the unit's line in the journal (journald may lag)")
            ns_sockets = socket_inodes(ns.pids())
            assert ns_sockets, "found no socket of the namespace to follow"
        res = ns.teardown
    finally:
        if ns.teardown is None:
            ns.shutdown()
        assert marker.exists(), "the host's /tmp was emptied"
        marker.unlink()
    print(f"boot {ns.boot_seconds} s, start {start_seconds:.2f} s, teardown {res}",
          file=sys.stderr)
    record_property("boot_seconds", ns.boot_seconds)
    record_property("teardown_seconds", res["seconds"])
    assert not listening(port)
    assert_clean_teardown(ns, before, ns_sockets)


def test_imagesync_installs_in_it_as_the_readme_says(tmp_path, record_property):
    before = host_snapshot()
    ns = NsSystemd(tmp_path / "ns")
    try:
        with ns:
            timings = ensure_venv(ns, ROOT)
            add_system_user(ns)
            install_config(ns, *((ROOT / "etc/imagesync" / f"{n}.sample").read_text()
                                 for n in ("imagesync.conf", "policy.yaml", "clouds.yaml")))
            exec_start = "/opt/imagesync/bin/imagesync-daemon --config-file " \
                         "/etc/imagesync/imagesync.conf"
            install_unit(ns, ROOT / "systemd/imagesync.service", exec_start)

            assert (ns.unit_dir / "imagesync.service").read_bytes() == \
                (ROOT / "systemd/imagesync.service").read_bytes()
            props = ns.show("imagesync.service", "LoadState", "ExecStart", "User", "DropInPaths")
            assert props["LoadState"] == "loaded", props
            assert "path=/opt/imagesync/bin/imagesync-daemon" in props["ExecStart"], props
            assert props["DropInPaths"].endswith("imagesync.service.d/10-test.conf"), props
            modes = ns.run("stat", "-c", "%n %a %U %G", "/etc/imagesync",
                           "/etc/imagesync/imagesync.conf", "/etc/imagesync/policy.yaml",
                           "/etc/imagesync/clouds.yaml", check=True).stdout.splitlines()
            assert modes == ["/etc/imagesync 750 root imagesync",
                             "/etc/imagesync/imagesync.conf 640 root imagesync",
                             "/etc/imagesync/policy.yaml 640 root imagesync",
                             "/etc/imagesync/clouds.yaml 600 imagesync imagesync"]
            # a copy (not editable) in a venv of Debian's python, usable by the daemon's user
            where = ns.run("runuser", "-u", "imagesync", "--", "/opt/imagesync/bin/python", "-c",
                           "import imagesync, sys; print(imagesync.__file__, sys.base_prefix)",
                           check=True).stdout.split()
            assert where[0].startswith("/opt/imagesync/lib/python3"), where
            assert where[1] == "/usr", where
            ns.run("runuser", "-u", "imagesync", "--", "/opt/imagesync/bin/imagesync", "--help",
                   check=True)
            # dbus is up: systemd-analyze security works inside
            sec = ns.run("systemd-analyze", "security", "--no-pager", "imagesync.service")
            assert sec.returncode == 0, sec.stderr
            overall = [ln for ln in sec.stdout.splitlines() if "Overall exposure" in ln]
            assert overall, sec.stdout[-500:]
    finally:
        if ns.teardown is None:
            ns.shutdown()
    print(f"boot {ns.boot_seconds} s, venv {timings}, {overall[0].strip()}, "
          f"teardown {ns.teardown}", file=sys.stderr)
    for k, v in {**timings, "boot_seconds": ns.boot_seconds,
                 "teardown_seconds": ns.teardown["seconds"]}.items():
        record_property(k, v)
    assert_clean_teardown(ns, before, set())
