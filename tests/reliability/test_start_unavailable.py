"""Start never crash-loops: the worker starts, says READY and answers `status` while Glance,
its credentials file or the ledger is unavailable, retries, and syncs once it is back.
"Glance unavailable" is both API nodes down behind a running HAProxy (which answers 503).

A worker that cannot start is respawned by oslo.service over and over, never says READY,
and under systemd sits in `activating` until TimeoutStartSec: each story counts the
workers that started (goal 1) and the READY=1 they sent.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon import Daemon
from helpers import connect, stores_of, upload_image, wait_for
from notifysock import NotifySocket

MIB = 1 << 20


def command(keyword: str) -> str:
    return f"tox -e reliability -- -k {keyword}"


def policy(prefix: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        rules:
          - name: to-edge
            match: {{name: "{prefix}-*"}}
            stores: [edge]
        """)


@pytest.fixture
def notify():
    with tempfile.TemporaryDirectory(prefix="imagesync-notify-") as d:
        sock = NotifySocket(Path(d) / "notify")
        yield sock
        sock.close()


def workers(d: Daemon) -> list[int]:
    return [e["pid"] for e in d.logs() if e.get("event") == "imagesync started"]


def status(d: Daemon) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                           str(d.conf_file), "status"], capture_output=True, text=True,
                          timeout=60)


def glance_answers(box) -> int:
    """The status HAProxy gives for Glance's /healthcheck (503: no API node is up)."""
    try:
        with urllib.request.urlopen(box.glance_url + "/healthcheck", timeout=30,
                                    context=box.tls_context()) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code


def start_and_wait_ready(d: Daemon, notify: NotifySocket) -> int:
    d.start(env={"NOTIFY_SOCKET": str(notify.path)})
    wait_for(lambda: notify.sent("READY=1"), timeout=60, message=f"READY=1:\n{d.tail()}")
    return notify.sent("READY=1")[0][1]


def test_started_while_glance_is_down_the_worker_is_ready_and_syncs_once_glance_is_back(
        private_sandbox, tmp_path, prefix, notify, figures):
    box = private_sandbox()
    conn = connect(box)
    image = upload_image(conn, MIB, name=f"{prefix}-a")
    box.stop_service("glance")   # both API nodes: HAProxy and Keystone stay up
    # 503 once HAProxy finds no node; a request that met a node as it died may get a 502 first.
    wait_for(lambda: glance_answers(box) == 503, timeout=15,
             message="HAProxy answering 503 for Glance with both API nodes stopped")
    d = Daemon(box, tmp_path / "d", policy(prefix), {"copy": {"backoff_cap": 4}})
    try:
        worker = start_and_wait_ready(d, notify)
        assert status(d).returncode == 0, status(d).stderr
        wait_for(lambda: any("Glance" in str(e.get("event")) and e.get("level") in
                             ("warning", "error") for e in d.logs()), timeout=30,
                 message=f"the daemon saying Glance is unreachable:\n{d.tail()}")
    finally:
        box.start_service("glance")
    wait_for(lambda: "edge" in stores_of(conn, image.id), timeout=120,
             message=f"the copy once Glance is back:\n{d.tail()}")
    assert workers(d) == [worker], f"workers started: {workers(d)}"
    figures("start without Glance", "worker restarts (goal 0)", len(workers(d)) - 1,
            command("started_while_glance"))
    d.stop()


def test_started_on_an_unwritable_ledger_the_worker_is_ready_and_syncs_once_it_can_write(
        sandbox, admin_conn, tmp_path, prefix, notify, figures):
    d = Daemon(sandbox, tmp_path / "d", policy(prefix), {"copy": {"backoff_cap": 4}})
    blocker = d.dir / "state"
    blocker.write_text("a file where the ledger's directory should be\n")
    d.ledger_path = blocker / "ledger.sqlite"
    d.conf_file.write_text(d.conf_file.read_text().replace(
        str(d.dir / "ledger.sqlite"), str(d.ledger_path)))

    worker = start_and_wait_ready(d, notify)
    wait_for(lambda: any("ledger" in str(e.get("event")) and e.get("level") == "error"
                         for e in d.logs()), timeout=30,
             message=f"the daemon saying it cannot open the ledger:\n{d.tail()}")
    image = upload_image(admin_conn, MIB, name=f"{prefix}-a")
    blocker.unlink()

    wait_for(lambda: d.copies(image.id) == {"edge": "done"}, timeout=120,
             message=f"the copy once the ledger opens:\n{d.tail()}")
    assert "edge" in stores_of(admin_conn, image.id)
    assert workers(d) == [worker], f"workers started: {workers(d)}"
    figures("start on an unwritable ledger", "worker restarts (goal 0)", len(workers(d)) - 1,
            command("unwritable_ledger"))
    d.stop()


def test_started_with_a_clouds_yaml_lacking_the_cloud_the_worker_waits_and_a_reload_fixes_it(
        sandbox, admin_conn, tmp_path, prefix, notify, figures):
    import signal

    d = Daemon(sandbox, tmp_path / "d", policy(prefix), {"copy": {"backoff_cap": 4}})
    good = d.conf_file.read_text()
    d.conf_file.write_text(good.replace("cloud = sandbox", "cloud = nosuchcloud"))

    worker = start_and_wait_ready(d, notify)
    wait_for(lambda: any("nosuchcloud" in str(e) and e.get("level") == "error"
                         for e in d.logs()), timeout=30,
             message=f"an error naming the missing cloud:\n{d.tail()}")
    image = upload_image(admin_conn, MIB, name=f"{prefix}-a")
    d.conf_file.write_text(good)
    d.signal(signal.SIGHUP)

    wait_for(lambda: d.copies(image.id) == {"edge": "done"}, timeout=120,
             message=f"the copy after the reload:\n{d.tail()}")
    assert len(workers(d)) == 2 and workers(d)[0] == worker, workers(d)
    figures("start with a broken clouds.yaml", "worker restarts besides the reload (goal 0)",
            len(workers(d)) - 2, command("clouds_yaml_lacking"))
    d.stop()
