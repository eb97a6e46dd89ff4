"""Stories of the metrics endpoint on the real daemon: off by default, loopback only, honest.

What the daemon listens on is read from the kernel (/proc/net/tcp*, matched to the sockets
its processes hold), not from its own logs.
"""

from __future__ import annotations

import signal
import socket
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest

from daemon import Daemon
from helpers import upload_image, wait_for
from sandbox import free_port  # below the ephemeral range: no race with clients

NO_RULES = "version: 1\nrules: []\n"


def listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on."""
    inodes = set()
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir() if fds.exists() else ():
            try:
                target = str(fd.readlink())
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                family = socket.AF_INET if width == 4 else socket.AF_INET6
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def scrape(port: int) -> dict[str, float]:
    samples = {}
    for line in exposition(port).splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.stop()


def test_without_a_metrics_section_the_daemon_listens_on_no_port(sandbox, tmp_path, daemons):
    d = Daemon(sandbox, tmp_path / "d", NO_RULES)
    daemons.append(d)

    d.start()

    assert listening(d.children()) == set()


def test_enabled_metrics_are_served_on_loopback_only_and_tell_what_the_daemon_did(
        sandbox, admin_conn, tmp_path, daemons):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    port = free_port()
    d = Daemon(sandbox, tmp_path / "d", textwrap.dedent(f"""\
        version: 1
        rules:
          - name: to-edge
            match: {{name: "{prefix}-*"}}
            stores: [edge]
        """), {"metrics": {"enabled": True, "port": port}})
    daemons.append(d)

    d.start()
    assert listening(d.children()) == {("127.0.0.1", port)}

    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-a")
    wait_for(lambda: d.copies(image.id) == {"edge": "done"}, timeout=60,
             message="the copy to edge done")

    m = scrape(port)
    copies = {k: v for k, v in m.items() if k.startswith("imagesync_copies{")}
    assert copies == {f'imagesync_copies{{state="{state}",store="edge"}}':
                      1 if state == "done" else 0
                      for state in ("pending", "in_flight", "done", "retrying", "failed",
                                    "cancelled")}
    assert m['imagesync_imports_started_total{store="edge"}'] == 1
    assert m['imagesync_imports_succeeded_total{store="edge"}'] == 1
    assert m['imagesync_copy_changes_total{state="done",store="edge"}'] == 1
    assert m["imagesync_notifications_total"] >= 1
    assert 0 <= m["imagesync_notification_lag_seconds"] < 60
    assert m["imagesync_reconcile_last_run_timestamp_seconds"] > 0  # the pass at start
    assert m['imagesync_imports_failed_total{kind="transient"}'] == 0


def test_after_a_reload_the_new_worker_serves_metrics_on_the_same_port(
        sandbox, tmp_path, daemons):
    port = free_port()
    d = Daemon(sandbox, tmp_path / "d", NO_RULES, {"metrics": {"enabled": True, "port": port}})
    daemons.append(d)
    d.start()
    first = next(e["pid"] for e in d.logs() if e.get("event") == "imagesync started")

    d.signal(signal.SIGHUP)

    wait_for(lambda: [e for e in d.logs() if e.get("event") == "imagesync started"
                      and e["pid"] != first], timeout=60, message="a new worker")
    assert not [e for e in d.logs() if e.get("event", "").startswith("metrics endpoint not")]
    # wired to the new worker's ledger: the family is served, without series (no copies)
    assert "# TYPE imagesync_copies gauge" in exposition(port)
    assert listening(d.children()) == {("127.0.0.1", port)}


def test_a_non_loopback_host_is_refused_and_the_daemon_runs_on_without_listening(
        sandbox, tmp_path, daemons):
    d = Daemon(sandbox, tmp_path / "d", NO_RULES,
               {"metrics": {"enabled": True, "host": "0.0.0.0", "port": free_port()}})
    daemons.append(d)

    d.start()

    refused = [e for e in d.logs() if e.get("event", "").startswith("metrics endpoint not")]
    assert refused and refused[0]["level"] == "error", d.tail()
    assert listening(d.children()) == set()
