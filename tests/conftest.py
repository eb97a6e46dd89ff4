"""Session fixtures over the real sandbox (Keystone, two Glance API nodes behind HAProxy with
TLS, RabbitMQ, MariaDB on loopback; tools/sandbox.py).

A test that uses them FAILS when the sandbox cannot start: never a skip. Set
IMAGESYNC_SANDBOX_DIR to a running sandbox (tools/sandbox.py up) to reuse it
across runs while developing; otherwise each session starts and stops its own.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

import reliability_figures  # noqa: E402

import helpers  # noqa: E402
import sandbox as sandbox_mod  # noqa: E402


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    reuse = os.environ.get("IMAGESYNC_SANDBOX_DIR")
    if reuse:
        box = sandbox_mod.Sandbox(reuse)
        if not all(box.running().values()):
            pytest.fail(f"IMAGESYNC_SANDBOX_DIR={reuse} is not a running sandbox")
        yield box
        return
    box = sandbox_mod.Sandbox(tmp_path_factory.mktemp("sandbox"))
    try:
        box.up()
    except Exception as exc:  # the suite must fail loudly, not skip
        pytest.fail(f"the sandbox could not start: {exc}", pytrace=False)
    yield box
    ports = listening_ports(box)
    box.down()
    still = [p for p in ports if _listening(p)]
    assert not still, f"ports still listening after the sandbox stopped: {still}"
    assert not any(box.running().values()), f"processes left: {box.running()}"


def listening_ports(box) -> list[int]:
    """Every port a sandbox's services listen on."""
    return box.ports()


def _connect(box, cloud: str = sandbox_mod.CLOUD):
    return helpers.connect(box, cloud)


@pytest.fixture
def ceph(sandbox) -> dict:
    """The session sandbox's Ceph cluster (its state, for tools/sandbox_ceph.py): a sandbox
    started without Ceph fails the test, never skips it."""
    assert sandbox.ceph, (f"the sandbox in {sandbox.dir} runs without Ceph: start it without "
                          "--no-ceph / IMAGESYNC_SANDBOX_CEPH=0")
    return sandbox.ceph_state


@pytest.fixture(scope="session")
def admin_conn(sandbox):
    """openstacksdk as imagesync's Keystone user: admin of project `imagesync`."""
    return _connect(sandbox)


@pytest.fixture(scope="session")
def other_admin_conn(sandbox):
    """openstacksdk as `owner-a`, admin of project tenant-a (its images are tenant-a's)."""
    return _connect(sandbox, "sandbox-owner")


@pytest.fixture(scope="session")
def member_conn(sandbox):
    """openstacksdk as `member-a`, a plain member of tenant-a (no admin role)."""
    return _connect(sandbox, "sandbox-member")


@pytest.fixture(scope="session")
def other_project(sandbox) -> str:
    """The id of tenant-a, the project other_admin_conn and member_conn act in."""
    return sandbox.projects["tenant-a"]


@pytest.fixture(scope="session")
def transport_url(sandbox) -> str:
    return sandbox.transport_url


@pytest.fixture
def prefix() -> str:
    """A name prefix owned by one test, so its policy only ever matches its own images."""
    return f"t{uuid.uuid4().hex[:6]}"


@pytest.fixture
def daemon(sandbox, tmp_path):
    """daemon(policy, options) -> a Daemon in a directory of its own; stopped at the end."""
    from daemon import Daemon

    started: list[Daemon] = []

    def make(policy: str, options: dict | None = None, name: str | None = None) -> Daemon:
        d = Daemon(sandbox, tmp_path / (name or f"d{len(started)}"), policy, options)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.stop()


@pytest.fixture(autouse=True)
def _no_daemon_left_behind():
    """A test that fails before stopping its daemons must not leave them running."""
    yield
    from daemon import stop_leftovers

    stop_leftovers()


def pytest_collection_modifyitems(config, items):
    """Stories marked full_only run in `tox -e reliability` (IMAGESYNC_RELIABILITY=full) only:
    deselected, not skipped, from the default run, whose time CI bounds."""
    if os.environ.get("IMAGESYNC_RELIABILITY") == "full":
        return
    left = [i for i in items if i.get_closest_marker("full_only") is not None]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = [i for i in items if i.get_closest_marker("full_only") is None]


@pytest.fixture(scope="session")
def limits_sandbox(tmp_path_factory):
    """A sandbox of the session whose Glance enforces Keystone unified limits (started once:
    the sandbox's own proof and the owner-quota stories share it; each sets and deletes its
    own project limits)."""
    box = sandbox_mod.Sandbox(tmp_path_factory.mktemp("limits-sandbox"))
    try:
        box.up(unified_limits=True, ceph=False)
    except Exception as exc:  # the test must fail loudly, not skip
        pytest.fail(f"a sandbox with unified limits could not start: {exc}", pytrace=False)
    yield box
    box.down()


# ---------------------------------------------------------------- the reliability figures
# Recorded by the reliability stories (tests/reliability_figures.py). Under pytest-xdist each
# worker hands its figures to the controller, which prints them all once.

def pytest_sessionfinish(session):
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["imagesync_figures"] = json.dumps(reliability_figures.FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    rows = json.loads(getattr(node, "workeroutput", {}).get("imagesync_figures", "[]"))
    reliability_figures.FIGURES.extend(tuple(r) for r in rows)


def pytest_terminal_summary(terminalreporter):
    reliability_figures.summary(terminalreporter)
