"""Stories of imagesync under systemd: readiness, watchdog, the unit file and its hardening.

systemd itself does not run here, so the daemon talks to a fake notify socket: an AF_UNIX
datagram socket that, like systemd's, reads each sender's pid from SCM_CREDENTIALS. The unit
file is checked with systemd-analyze (verify, and security --offline); when systemd-analyze
is missing the tests install Debian's systemd package, and fail, never skip, if they cannot.
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from daemon import Daemon
from helpers import stores_of, upload_image, wait_for
from notifysock import NotifySocket

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "systemd" / "imagesync.service"
NO_RULES = "version: 1\nrules: []\n"
EXPOSURE_GOAL = 2.0


@pytest.fixture
def notify_path():
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="imagesync-notify-") as d:
        yield Path(d) / "notify"


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.stop()


def started_events(d: Daemon) -> list[dict]:
    return [e for e in d.logs() if e.get("event") == "imagesync started"]


# -- readiness and watchdog


def test_ready_comes_from_the_worker_only_once_it_consumes_then_the_watchdog_pings(
        sandbox, tmp_path, notify_path, daemons):
    d = Daemon(sandbox, tmp_path / "d", NO_RULES)
    daemons.append(d)
    logged_before_ready: list[bool] = []

    def on_message(pid, text):
        if "READY=1" in text.splitlines():  # what the daemon had logged when READY arrived
            logged_before_ready.append(bool(started_events(d)))

    notify = NotifySocket(notify_path, on_message)
    try:
        assert d.pool not in sandbox.queues()

        d.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
        worker = started_events(d)[0]["pid"]
        wait_for(lambda: notify.sent("READY=1"), timeout=30, message="READY=1")

        ready = notify.sent("READY=1")
        assert [pid for _, pid in ready] == [worker], \
            f"READY=1 must come once, from the worker {worker}, not the parent {d.proc.pid}"
        assert logged_before_ready == [True], "READY=1 arrived before 'imagesync started'"
        assert d.pool in sandbox.queues(), "the pool queue must exist once READY=1 is sent"

        pings = wait_for(lambda: len(notify.sent("WATCHDOG=1", worker)) >= 3 and
                         notify.sent("WATCHDOG=1", worker), timeout=10,
                         message="three WATCHDOG=1 pings (every WATCHDOG_USEC/2 = 0.5 s)")
        assert pings[0][0] > ready[0][0]
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
        assert all(0.3 < gap < 2.0 for gap in gaps), gaps
        assert all(pid == worker for _, pid, _ in notify.messages), notify.messages

        assert d.stop() == 0
        # systemd knows it is stopping the service; a worker's STOPPING=1 would also be sent
        # when a reload replaces it, and systemd would take that for a stop of the service.
        assert not notify.sent("STOPPING=1"), notify.messages
    finally:
        notify.close()


def test_after_a_reload_the_new_worker_says_ready_and_keeps_the_watchdog_fed(
        sandbox, tmp_path, notify_path, daemons):
    notify = NotifySocket(notify_path)
    try:
        d = Daemon(sandbox, tmp_path / "d", NO_RULES)
        daemons.append(d)
        d.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
        first = started_events(d)[0]["pid"]
        wait_for(lambda: notify.sent("WATCHDOG=1", first), timeout=10, message="a first ping")

        d.signal(signal.SIGHUP)

        second = wait_for(lambda: [e["pid"] for e in started_events(d) if e["pid"] != first],
                          timeout=60, message="a new worker after SIGHUP")[0]
        wait_for(lambda: notify.sent("READY=1", second), timeout=30,
                 message="READY=1 from the new worker")
        wait_for(lambda: len(notify.sent("WATCHDOG=1", second)) >= 2, timeout=10,
                 message="pings from the new worker")
        assert {pid for _, pid in notify.sent("READY=1")} == {first, second}
        reloading = notify.sent("RELOADING=1")
        assert [pid for _, pid in reloading] == [d.proc.pid], \
            "RELOADING=1 comes once, from the main process, which systemd knows as MainPID"
        assert reloading[0][0] < notify.sent("READY=1", second)[0][0]
        assert not notify.sent("STOPPING=1"), "a reload is not a stop"
        assert d.proc.pid not in {pid for _, pid in notify.sent("READY=1")}
    finally:
        notify.close()


# -- the hardening, exercised: MemoryDenyWriteExecute, ProtectSystem=strict, ProcSubset=pid

SANDBOX_SITECUSTOMIZE = '''
"""Written by tests/functional/test_systemd.py: part of imagesync.service's sandbox.

Before anything else is imported: PR_SET_MDWE (what MemoryDenyWriteExecute=yes enforces),
a private mount namespace with / read-only except the daemon's work directory
(ProtectSystem=strict + StateDirectory=) and /proc showing only processes
(ProcSubset=pid, ProtectProc=invisible). Inherited by the worker oslo.service forks.
"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), what)
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
work = os.environ["IMAGESYNC_TEST_WRITABLE"].encode()
check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
check(libc.mount(work, work, None, MS_BIND, None), "bind the work directory")
check(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), "/ read-only")
check(libc.mount(b"proc", b"/proc", b"proc", 0, b"subset=pid,hidepid=invisible"), "/proc")
check(libc.prctl(65, 1, 0, 0, 0), "prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)")
'''


def test_the_daemon_copies_an_image_under_the_units_memory_and_filesystem_restrictions(
        sandbox, admin_conn, tmp_path, daemons):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SANDBOX_SITECUSTOMIZE)
    d = Daemon(sandbox, tmp_path / "d", textwrap.dedent(f"""\
        version: 1
        rules:
          - name: to-edge
            match: {{name: "{prefix}-*"}}
            stores: [edge]
        """))
    daemons.append(d)

    d.start(env={"PYTHONPATH": str(site), "IMAGESYNC_TEST_WRITABLE": str(d.dir)})
    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-a")

    wait_for(lambda: d.copies(image.id) == {"edge": "done"}, timeout=60,
             message=f"the copy to edge done:\n{d.tail()}")
    assert "edge" in stores_of(admin_conn, image.id)
    worker = started_events(d)[0]["pid"]
    status = Path(f"/proc/{worker}/status").read_text()
    assert re.search(r"^NoNewPrivs|^Seccomp", status, re.MULTILINE)  # readable: the worker is alive
    assert Path(f"/proc/{worker}/ns/mnt").resolve() != Path("/proc/self/ns/mnt").resolve()
    assert d.stop() == 0


# -- the unit file


def ensure_tools() -> str:
    """systemd-analyze (and /bin/kill, which ExecReload names), installed when missing."""
    missing = [pkg for tool, pkg in (("systemd-analyze", "systemd"), ("/bin/kill", "procps"))
               if not shutil.which(tool)]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get")
        steps = [["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", *missing]]
        for step in steps:
            out = subprocess.run(step, check=False, capture_output=True, text=True, timeout=900,
                                 env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:"
                                      "/usr/bin:/sbin:/bin"})
            if out.returncode != 0:
                pytest.fail(f"cannot install {missing} ({' '.join(step)} exited "
                            f"{out.returncode}):\n{out.stderr[-2000:]}", pytrace=False)
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.fail("systemd-analyze is still missing after installing systemd", pytrace=False)
    return analyze


def installed_daemon() -> str:
    """The imagesync-daemon script of the Python running the tests."""
    script = Path(sys.executable).parent / "imagesync-daemon"
    found = str(script) if script.exists() else shutil.which("imagesync-daemon")
    assert found, "imagesync-daemon is not installed (pip install -e .)"
    return str(Path(found).resolve())


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            found.setdefault(m.group(1), []).append(m.group(2).strip())
    return found


def test_the_unit_file_verifies_with_the_installed_daemon(tmp_path):
    """`systemd-analyze verify` on a copy whose ExecStart names the installed script.

    The user is not created: a test should not add system users to the machine. systemd 252
    does not check User= when verifying; should a later one complain that the user imagesync
    does not exist, that complaint alone is tolerated.
    """
    analyze = ensure_tools()
    unit = tmp_path / "imagesync.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/imagesync-daemon " in text
    unit.write_text(text.replace("ExecStart=/usr/bin/imagesync-daemon ",
                                 f"ExecStart={installed_daemon()} "))

    out = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True,
                         text=True, timeout=120)

    complaints = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    other = [line for line in complaints
             if not re.search(r"user.*imagesync|imagesync.*user", line, re.IGNORECASE)]
    assert not other, f"systemd-analyze verify exited {out.returncode}:\n" + "\n".join(other)


def test_the_unit_is_hardened_to_an_exposure_of_2_or_lower(record_property):
    analyze = ensure_tools()

    out = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                         check=False, capture_output=True, text=True, timeout=120)

    m = re.search(r"Overall exposure level for imagesync\.service: (\d+(?:\.\d+)?)", out.stdout)
    assert m, f"no exposure level in:\n{out.stdout}\n{out.stderr}"
    level = float(m.group(1))
    print(f"systemd-analyze security: exposure {level} (goal <= {EXPOSURE_GOAL})")
    record_property("systemd_exposure", level)
    assert level <= EXPOSURE_GOAL, out.stdout


def test_the_unit_says_notify_from_the_worker_restarts_on_failure_and_reaches_any_address():
    found = directives(UNIT.read_text())

    assert found["Type"] == ["notify"] and found["NotifyAccess"] == ["all"]
    assert int(found["WatchdogSec"][0]) >= 30
    assert found["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert found["Restart"] == ["on-failure"]
    assert found["ExecStart"][0].endswith("--config-file /etc/imagesync/imagesync.conf")
    assert found["User"] == ["imagesync"] and found["Group"] == ["imagesync"]
    assert found["StateDirectory"] == ["imagesync"] and found["StateDirectoryMode"] == ["0700"]
    assert found["UMask"] == ["0077"] and found["CapabilityBoundingSet"] == [""]
    assert found["MemoryDenyWriteExecute"] == ["yes"]
    # RabbitMQ, Glance and Keystone may be anywhere: no IP address allow list.
    assert "IPAddressDeny" not in found and "IPAddressAllow" not in found
    assert found["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


def test_a_wedged_ledger_writer_stops_the_pings_and_the_log_names_it(
        sandbox, tmp_path, notify_path, daemons):
    import sqlite3

    notify = NotifySocket(notify_path)
    try:
        d = Daemon(sandbox, tmp_path / "d", NO_RULES)
        daemons.append(d)
        d.start(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"})
        worker = started_events(d)[0]["pid"]
        wait_for(lambda: len(notify.sent("WATCHDOG=1", worker)) >= 2, timeout=20,
                 message="pings every second")

        # Another process holds the ledger's write lock (a forgotten sqlite3 shell):
        # the writer thread waits on it and stops answering.
        holder = sqlite3.connect(d.ledger_path, timeout=1, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            wedged = time.monotonic()
            failing = wait_for(lambda: [e for e in d.logs() if e.get("part") == "ledger writer"
                                        and e.get("level") == "error"], timeout=40,
                               message=f"the watchdog naming the ledger writer:\n{d.tail()}")
            pings_before = len(notify.sent("WATCHDOG=1", worker))
            wait_for(lambda: time.monotonic() - wedged > 14, timeout=20, interval=0.5)
            assert len(notify.sent("WATCHDOG=1", worker)) == pings_before, \
                "no WATCHDOG=1 while the ledger writer is wedged"
            assert "did not answer" in failing[0]["reason"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        wait_for(lambda: any(e.get("part") == "ledger writer" and e.get("level") == "info"
                             for e in d.logs()), timeout=40, message="healthy again")
        resumed = len(notify.sent("WATCHDOG=1", worker))
        wait_for(lambda: len(notify.sent("WATCHDOG=1", worker)) > resumed, timeout=10,
                 message="pings again")
    finally:
        notify.close()
