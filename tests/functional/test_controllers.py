"""Several controllers: three daemons on one sandbox, one active through a real tooz backend
(Redis, Redis through Sentinel, and etcd), the others standing by. Killed, paused and stopped
actives; every copy made once, counted at Glance's API nodes."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from daemon import Daemon, import_requests, role, the_active
from helpers import Images, import_settled, stores_of, wait_for

LEASE = 6


def policy(prefix: str) -> str:
    return f"""version: 1
rules:
  - name: ha-{prefix}
    match: {{name: "{prefix}-*"}}
    stores: [slow]
"""



def sent_imports(d: Daemon, since: int = 0) -> int:
    return sum(1 for e in d.logs()[since:] if e.get("event") == "copy-image sent")



def copied(conn, image_id: str) -> bool:
    return stores_of(conn, image_id) == {"fast", "slow"} and import_settled(conn, image_id)


@pytest.fixture(params=["redis", "sentinel", "etcd"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def controllers(backend, sandbox, tmp_path, prefix):
    """Three daemons sharing one pool queue and one backend, as on three controllers."""
    url = sandbox.coordination_url(backend)
    pool = f"imagesync-ha-{uuid.uuid4().hex[:6]}"
    made = [Daemon(sandbox, tmp_path / f"ctl{n}", policy(prefix),
                   {"coordination": {"backend_url": url, "member_id": f"ctl{n}",
                                     "lease": LEASE},
                    "notifications": {"pool": pool},
                    # A paused active daemon keeps the notifications prefetched for it until
                    # the broker drops its connection: the new one reconciles to find them.
                    "reconcile": {"interval": 10}}) for n in range(3)]
    for d in made:
        d.pool = pool
        d.start()
    yield made
    for d in made:
        if d.proc.poll() is None:
            d.stop()


def test_one_of_three_is_active_and_a_killed_active_is_replaced_within_its_lease(
        sandbox, admin_conn, controllers, prefix):
    images = Images()
    try:
        first = wait_for(lambda: the_active(controllers), timeout=30,
                         message="exactly one active daemon")
        wait_for(lambda: sum(role(d) == "standby" for d in controllers) == 2, timeout=30,
                 message="the two others standing by")
        image = images.upload(sandbox, admin_conn, 1 << 20, f"{prefix}-a")
        wait_for(lambda: copied(admin_conn, image.id), timeout=60, message="the first copy")
        assert import_requests(sandbox, image.id) == 1
        assert sent_imports(first) == 1
        assert all(sent_imports(d) == 0 for d in controllers if d is not first)

        # When the active daemon is SIGKILLed (no release: its claim must lapse)
        first.kill()
        killed = time.monotonic()
        second = wait_for(lambda: the_active(controllers), timeout=LEASE + 15,
                          message="a standby taking over")
        took = time.monotonic() - killed
        print(f"takeover after SIGKILL: {took:.1f} s (lease {LEASE} s)")
        assert took <= LEASE + 5
        image = images.upload(sandbox, admin_conn, 1 << 20, f"{prefix}-b")
        wait_for(lambda: copied(admin_conn, image.id), timeout=60, message="the copy after")
        assert import_requests(sandbox, image.id) == 1
        assert sent_imports(second) == 1
    finally:
        images.delete_all()


@pytest.mark.parametrize("backend", ["etcd"])   # on Redis: tests/reliability/test_controllers.py
def test_a_paused_active_daemon_steps_down_without_sending_an_import(
        sandbox, admin_conn, controllers, prefix):
    images = Images()
    try:
        first = wait_for(lambda: the_active(controllers), timeout=30,
                         message="exactly one active daemon")
        before = len(first.logs())
        # When the active daemon is paused for longer than its lease
        for pid in first.children() or [first.proc.pid]:
            signal_all(pid, signal.SIGSTOP)
        try:
            second = wait_for(lambda: next((d for d in controllers if d is not first
                                            and role(d) == "active"), None),
                              timeout=LEASE + 15, message="a standby taking over")
            image = images.upload(sandbox, admin_conn, 1 << 20, f"{prefix}-p")
            wait_for(lambda: copied(admin_conn, image.id), timeout=60,
                     message="the copy by the new active daemon")
        finally:
            for pid in first.children() or [first.proc.pid]:
                signal_all(pid, signal.SIGCONT)
        # Then, resumed, it steps down and sends nothing
        wait_for(lambda: role(first) == "standby", timeout=LEASE + 10,
                 message="the resumed daemon stepping down")
        time.sleep(2)   # a window in which a stale import would show; counted below
        assert sent_imports(first, before) == 0, "the paused daemon sent an import"
        assert import_requests(sandbox, image.id) == 1
        assert sent_imports(second) >= 1
    finally:
        images.delete_all()


def signal_all(pid: int, sig: int) -> None:
    import os

    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
