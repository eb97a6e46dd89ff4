"""The sandbox's coordination backends are real, driven through tooz as several imagesync
controllers would drive them: Redis (with a password), a Redis Sentinel that names that Redis
as master `imagesync`, and etcd 3.4 through its gRPC gateway (/v3/). On each, a lock one
member holds is refused to another until released or until its holder is dead for the lock
timeout; group members are seen by every member; the services refuse strangers and survive
being stopped and started again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import tooz
from tooz import coordination

import sandbox as sandbox_mod
from helpers import wait_for

BACKENDS = sandbox_mod.COORDINATION   # ("redis", "sentinel", "etcd")


@contextlib.contextmanager
def coordinator(url: str, member: bytes):
    coord = coordination.get_coordinator(url, member)
    coord.start()
    try:
        yield coord
    finally:
        with contextlib.suppress(tooz.ToozError):
            coord.stop()


def with_options(url: str, **options) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return url + ("&" if "?" in url else "?") + query


def unique(what: str) -> bytes:
    return f"imagesync-test-{what}-{uuid.uuid4().hex[:10]}".encode()


def redis(sandbox, *command: str):
    """A command to the sandbox's Redis itself, with its password."""
    return sandbox_mod.redis_command(sandbox.state["redis"]["port"], *command,
                                     password=sandbox.state["redis"]["password"])


def etcd(sandbox, path: str, body: dict) -> dict:
    """etcd's JSON gateway, directly (keys and values are base64, as the API wants)."""
    req = urllib.request.Request(f"{sandbox.etcd_url}/v3/{path}", method="POST",
                                 data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def lock_at_server(sandbox, backend: str, name: bytes) -> bool:
    """Whether the lock's key exists in the server itself (the Sentinel's master is the
    sandbox's Redis)."""
    if backend == "etcd":
        return bool(etcd(sandbox, "kv/range", {"key": b64(b"/tooz/locks" + name)}).get("kvs"))
    return redis(sandbox, "EXISTS", f"_tooz_{name.decode()}_lock") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lock_one_member_holds_is_refused_to_another_until_released(sandbox, backend):
    url, name = sandbox.coordination_url(backend), unique("lock")
    with coordinator(url, b"controller-1") as one, coordinator(url, b"controller-2") as two:
        held, wanted = one.get_lock(name), two.get_lock(name)

        assert held.acquire(blocking=False)
        assert lock_at_server(sandbox, backend, name)
        assert not wanted.acquire(blocking=False)

        assert held.release()
        assert not lock_at_server(sandbox, backend, name)
        assert wanted.acquire(blocking=False)
        assert not held.acquire(blocking=False)
        assert wanted.release()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_member_sees_the_group_members_and_a_leaver_goes(sandbox, backend):
    url, group = sandbox.coordination_url(backend), unique("group")
    with coordinator(url, b"controller-1") as one, coordinator(url, b"controller-2") as two:
        one.create_group(group).get()
        one.join_group(group).get()
        two.join_group(group).get()

        assert one.get_members(group).get() == {b"controller-1", b"controller-2"}
        assert two.get_members(group).get() == {b"controller-1", b"controller-2"}
        assert group in two.get_groups().get()

        two.leave_group(group).get()
        assert one.get_members(group).get() == {b"controller-1"}
        one.leave_group(group).get()
        one.delete_group(group).get()


def test_redis_and_its_sentinel_refuse_a_client_without_the_password(sandbox):
    """At the server: tooz itself needs ~40 s to give up on a refused password (it retries
    15 times, redis-py 10 times each, with backoff), so it is not the probe here."""
    for service in ("redis", "sentinel"):
        port = sandbox.state[service]["port"]
        with pytest.raises(sandbox_mod.SandboxError, match="NOAUTH"):
            sandbox_mod.redis_command(port, "PING")
        with pytest.raises(sandbox_mod.SandboxError, match="WRONGPASS"):
            sandbox_mod.redis_command(port, "PING", password="not-the-password")
        assert sandbox_mod.redis_command(
            port, "PING", password=sandbox.state["redis"]["password"]) == "PONG"


def test_the_sentinel_names_the_sandbox_redis_as_master_imagesync(sandbox):
    answer = sandbox_mod.redis_command(
        sandbox.state["sentinel"]["port"], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "imagesync",
        password=sandbox.state["redis"]["password"])

    assert answer == ["127.0.0.1", str(sandbox.state["redis"]["port"])]
    assert sandbox.coordination_url("sentinel").startswith(
        f"redis://:{sandbox.state['redis']['password']}@127.0.0.1:"
        f"{sandbox.state['sentinel']['port']}?sentinel=imagesync")


def test_etcd_answers_health_and_is_version_3_4(sandbox):
    with urllib.request.urlopen(sandbox.etcd_url + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"health": "true"}
    with urllib.request.urlopen(sandbox.etcd_url + "/version", timeout=10) as resp:
        assert json.loads(resp.read())["etcdserver"].startswith("3.4.")
    assert sandbox.coordination_url("etcd").endswith("?api_version=v3")


HOLDER = """
import sys
from tooz import coordination
coord = coordination.get_coordinator(sys.argv[1], b"doomed")
coord.start()
assert coord.get_lock(sys.argv[2].encode()).acquire(blocking=False)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_holders_lock_goes_to_another_member_after_the_lock_timeout(sandbox, backend):
    lock_timeout = 3   # etcd's shortest lease is 2 s
    url, name = with_options(sandbox.coordination_url(backend), lock_timeout=lock_timeout), \
        unique("killed")
    holder = subprocess.Popen([sys.executable, "-W", "ignore", "-c", HOLDER, url, name.decode()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with coordinator(url, b"survivor") as survivor:
            lock = survivor.get_lock(name)
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            assert not lock.acquire(blocking=False)

            wait_for(lambda: lock.acquire(blocking=False), timeout=lock_timeout + 5,
                     interval=0.2, message=f"the dead holder's lock on {backend}")
            waited = time.monotonic() - killed
            assert lock_timeout - 1.5 <= waited <= lock_timeout + 2, waited
            lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_etcd_stopped_then_started_keeps_its_data_and_serves_locks_again(sandbox):
    url, group = sandbox.coordination_url("etcd"), unique("kept")
    with coordinator(url, b"controller-1") as coord:
        coord.create_group(group).get()
        pid = sandbox.state["etcd"]["pid"]
        sandbox.stop_service("etcd")
        try:
            assert not sandbox_mod.port_open(sandbox.state["etcd"]["port"])
            with pytest.raises(coordination.ToozConnectionError):
                coord.get_lock(unique("down")).acquire(blocking=False)
        finally:
            sandbox.start_service("etcd")

        assert sandbox.state["etcd"]["pid"] != pid and sandbox.running()["etcd"]
        assert group in coord.get_groups().get()
        lock = coord.get_lock(unique("after"))
        assert lock.acquire(blocking=False)
        assert lock.release()
        coord.delete_group(group).get()


@pytest.mark.full_only   # a minute of tooz's retries; the daemons' side: test_controllers
def test_redis_stopped_makes_heartbeats_raise_tooz_connection_error_until_it_is_back(sandbox):
    """tooz retries a refused connection 15 times and redis-py 10 times each, with backoff:
    the heartbeat raises only after about a minute."""
    with coordinator(sandbox.coordination_url("redis"), b"controller-1") as coord:
        assert coord.heartbeat() > 0
        sandbox.stop_service("redis")
        try:
            assert not sandbox_mod.port_open(sandbox.state["redis"]["port"])
            started = time.monotonic()
            with pytest.raises(coordination.ToozConnectionError):
                coord.heartbeat()
            assert time.monotonic() - started < 150
        finally:
            sandbox.start_service("redis")

        assert coord.heartbeat() > 0
    # The Sentinel counts its master up again (start_service waits for it): Sentinel
    # clients get a master as before.
    with coordinator(sandbox.coordination_url("sentinel"), b"controller-2") as coord:
        lock = coord.get_lock(unique("back"))
        assert lock.acquire(blocking=False)
        assert lock.release()


def test_the_sentinel_stopped_then_started_names_its_master_again(sandbox):
    sandbox.stop_service("sentinel")
    try:
        assert not sandbox_mod.port_open(sandbox.state["sentinel"]["port"])
    finally:
        sandbox.start_service("sentinel")

    name = unique("sentinel-back")
    with coordinator(sandbox.coordination_url("sentinel"), b"controller-1") as coord:
        lock = coord.get_lock(name)
        assert lock.acquire(blocking=False)
        assert lock_at_server(sandbox, "sentinel", name)
        assert lock.release()
