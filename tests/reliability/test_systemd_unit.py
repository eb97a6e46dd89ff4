"""The shipped unit under a real systemd 252: start, reload, watchdog, stop, hardening.

One systemd boots as PID 1 of its own namespaces (tests/systemd_ns.py) for this module.
imagesync is installed in it as the README says: a virtualenv at /opt/imagesync, the user
`imagesync`, /etc/imagesync with the README's modes, and systemd/imagesync.service unchanged
but for a drop-in pointing ExecStart at that virtualenv. The inner systemd shares the host's
network, so the daemon reaches the sandbox's RabbitMQ, Keystone and Glance (HAProxy, TLS
with the sandbox's CA installed in /etc/imagesync) on 127.0.0.1. Everything is checked as an
operator would: systemctl, the journal, `imagesync status` run as the daemon's user, and
Glance itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import systemd_ns
from helpers import stores_of, upload_image, wait_for

pytestmark = [pytest.mark.systemd]

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "imagesync.service"
SERVICE = "imagesync.service"
VENV = "/opt/imagesync"
EXEC_START = f"{VENV}/bin/imagesync-daemon --config-file /etc/imagesync/imagesync.conf"
CA_INSIDE = "/etc/imagesync/ca.pem"   # the sandbox's CA, for Keystone's and Glance's TLS
EXPOSURE_GOAL = 2.0
PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts", "Result", "StatusText")


def policy_text(prefix: str, store: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        rules:
          - name: {prefix}-to-{store}
            match: {{name: "{prefix}-*"}}
            stores: [{store}]
        """)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Host:
    """A controller as an operator set it up: the unit installed, the files in /etc."""

    def __init__(self, ns, sandbox, pool: str):
        self.ns, self.sandbox, self.pool = ns, sandbox, pool
        self.conf = {
            "DEFAULT": {"transport_url": sandbox.transport_url},
            "imagesync": {"cloud": "sandbox", "clouds_file": "/etc/imagesync/clouds.yaml",
                          "log_format": "json"},
            "notifications": {"pool": pool},
            "copy": {"poll_interval": 0.2, "backoff_base": 1, "backoff_cap": 4},
            "reconcile": {"interval": 0},
        }

    # -- files, as the README installs them

    def conf_text(self) -> str:
        return "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) + "\n"
                       for g, opts in self.conf.items())

    def write_conf(self, text: str | None = None) -> None:
        self.ns.write("/etc/imagesync/imagesync.conf", text or self.conf_text(), 0o640, "root",
                      "imagesync")

    def write_policy(self, text: str) -> None:
        self.ns.write("/etc/imagesync/policy.yaml", text, 0o640, "root", "imagesync")

    # -- what systemd says

    def state(self) -> dict[str, str]:
        return self.ns.show(SERVICE, *PROPS)

    def worker(self) -> int | None:
        m = re.search(r"worker (\d+) listening", self.state().get("StatusText", ""))
        return int(m.group(1)) if m else None

    def journal(self) -> str:
        return self.ns.journal(SERVICE)

    def logged(self, *parts: str) -> bool:
        """A journal line of the unit holds every one of `parts`."""
        return any(all(p in line for p in parts) for line in self.journal().splitlines())

    def wait_ready(self, timeout: float = 90, other_than: int | None = None) -> dict[str, str]:
        """Until the unit is active/running with a worker that said READY=1."""
        def ready():
            st = self.state()
            w = self.worker()
            return (st.get("ActiveState") == "active" and st.get("SubState") == "running"
                    and w is not None and w != other_than and st)
        return wait_for(ready, timeout=timeout,
                        message=f"{SERVICE} active with a ready worker:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.journal().splitlines()[-n:]) + f"\nstate: {self.state()}"

    # -- what the ledger says, through the CLI as the daemon's user

    cli_conf: tuple[str, ...] = ()   # extra CLI arguments, e.g. while imagesync.conf is broken

    def cli(self, *args: str):
        return self.ns.run("runuser", "-u", "imagesync", "--", f"{VENV}/bin/imagesync",
                           *self.cli_conf, *args)

    def imagesync(self, *args: str) -> str:
        out = self.cli(*args)
        assert out.returncode == 0, f"imagesync {' '.join(args)}: {out.stdout}{out.stderr}"
        return out.stdout

    def copies(self, image_id: str) -> dict[str, str]:
        out = self.cli("status", image_id, "-f", "json")
        if out.returncode != 0:
            assert "no image" in out.stderr, out.stderr  # not seen by the daemon yet
            return {}
        return {c["store"]: c["state"] for c in json.loads(out.stdout)["copies"]}


@pytest.fixture(scope="module")
def host(sandbox, tmp_path_factory):
    work = tmp_path_factory.mktemp("systemd")
    ns = systemd_ns.NsSystemd(work)
    try:
        ns.boot()
    except Exception as exc:  # the suite must fail loudly, never skip
        pytest.fail(f"systemd could not boot in its namespaces: {exc}", pytrace=False)
    try:
        systemd_ns.ensure_venv(ns, ROOT)
        systemd_ns.add_system_user(ns, "imagesync")
        h = Host(ns, sandbox, f"imagesync-unit-{uuid.uuid4().hex[:8]}")
        # The sandbox's clouds.yaml names its CA in the sandbox directory, which the unit
        # cannot see (ProtectHome=, PrivateTmp=, and it is not the service's user's to read):
        # install the CA beside clouds.yaml, as an operator installs a private CA.
        clouds = Path(sandbox.clouds_yaml).read_text().replace(str(sandbox.cacert), CA_INSIDE)
        systemd_ns.install_config(ns, h.conf_text(), policy_text("nothing", "edge"), clouds)
        ns.write(CA_INSIDE, Path(sandbox.cacert).read_text(), 0o640, "root", "imagesync")
        systemd_ns.install_unit(ns, UNIT, EXEC_START)
        yield h
    finally:
        ns.systemctl("stop", SERVICE)
        teardown = ns.shutdown()
        assert not teardown["leftover_pids"], teardown
        assert not teardown["cgroup_left"], teardown


@pytest.fixture
def started(host, prefix):
    """The service started on a policy copying this test's images to edge."""
    host.write_policy(policy_text(prefix, "edge"))
    host.ns.systemctl("reset-failed", SERVICE)
    host.ns.systemctl("start", "--no-block", SERVICE, check=True)
    host.wait_ready()
    yield host
    host.ns.systemctl("stop", SERVICE)


def synced(admin_conn, h: Host, image_id: str, store: str, timeout: float = 60) -> None:
    wait_for(lambda: h.copies(image_id).get(store) == "done", timeout=timeout,
             message=f"the copy of {image_id} to {store} done:\n{h.tail()}")
    assert store in stores_of(admin_conn, image_id)


# -- start


def test_start_is_activating_until_the_worker_consumes_then_active_with_its_status(
        host, sandbox, admin_conn, prefix, figures):
    host.write_policy(policy_text(prefix, "edge"))
    host.ns.systemctl("reset-failed", SERVICE)
    seen: list[tuple[float, str, str]] = []

    t0 = time.monotonic()
    host.ns.systemctl("start", "--no-block", SERVICE, check=True)

    def active():
        st = host.state()
        seen.append((time.monotonic() - t0, st.get("ActiveState"), st.get("SubState")))
        return st.get("ActiveState") == "active" and st
    st = wait_for(active, timeout=90, interval=0.05, message=f"{SERVICE} active:\n{host.tail()}")
    try:
        consumers = sandbox.consumers().get(host.pool, 0)
        assert consumers >= 1, "active only once the worker consumes its pool queue"
        states = [(a, s) for _, a, s in seen]
        assert ("activating", "start") in states, \
            f"systemd must wait for READY=1 from the worker: {seen}"
        assert st["SubState"] == "running" and st["NRestarts"] == "0"
        status = host.ns.systemctl("status", SERVICE).stdout
        assert "Active: active (running)" in status, status
        assert re.search(r'Status: "worker \d+ listening to Glance notifications; policy '
                         r'/etc/imagesync/policy.yaml sha256:\w{12} \(1 rules\)"', status), status
        journal = host.journal()
        assert "already exists but the mode is different" not in journal, journal
        assert "Address family not supported" not in journal, journal
        figures("systemd unit", "seconds from `systemctl start` to active (running)",
                f"{seen[-1][0]:.1f}",
                "tox -e systemd -- -k start_is_activating")

        image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-a")
        synced(admin_conn, host, image.id, "edge")
    finally:
        host.ns.systemctl("stop", SERVICE)


# -- reload


def reload_and_wait(h: Host, old_worker: int) -> tuple[float, dict[str, str]]:
    """`systemctl reload`; (seconds until a new worker is ready, the unit's state then)."""
    t0 = time.monotonic()
    h.ns.systemctl("reload", SERVICE, check=True)
    st = h.wait_ready(timeout=60, other_than=old_worker)
    return time.monotonic() - t0, st


def test_reload_with_a_changed_policy_keeps_the_service_up_and_puts_the_policy_in_force(
        started, admin_conn, prefix, figures):
    h = started
    before = h.state()
    old_worker = h.worker()
    new_policy = policy_text(prefix, "slow")
    h.write_policy(new_policy)

    seconds, after = reload_and_wait(h, old_worker)

    assert after["MainPID"] == before["MainPID"], "the main process stays across a reload"
    assert after["NRestarts"] == "0" and after["Result"] == "success", after
    assert f"sha256:{digest(new_policy)}" in after["StatusText"], after["StatusText"]
    assert "Stopping" not in h.journal().split("Reloading")[-1], h.tail()
    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-b")
    synced(admin_conn, h, image.id, "slow")
    assert "edge" not in h.copies(image.id), "the old policy's store is no longer wanted"
    command = "tox -e systemd -- -k changed_policy"
    figures("systemd reload, changed policy", "NRestarts / MainPID kept",
            f"{after['NRestarts']} / yes", command)
    figures("systemd reload, changed policy", "seconds from `systemctl reload` until the new "
            "policy is in force (new worker READY=1)", f"{seconds:.1f}", command)


def test_reload_with_a_broken_policy_stays_up_on_the_last_good_one(
        started, admin_conn, prefix, figures):
    h = started
    before = h.state()
    good = before["StatusText"]
    h.write_policy("version: 1\nrules:\n  - name: broken\n    match: {name: [unclosed\n")

    seconds, after = reload_and_wait(h, h.worker())

    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", after
    assert "(last good)" in after["StatusText"], after["StatusText"]
    assert good.split("sha256:")[1][:12] in after["StatusText"], (good, after["StatusText"])
    assert h.logged("invalid policy", "/etc/imagesync/policy.yaml:"), h.tail()
    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-c")
    synced(admin_conn, h, image.id, "edge")
    command = "tox -e systemd -- -k broken_policy"
    figures("systemd reload, broken policy", "NRestarts / MainPID kept / policy in force",
            f"{after['NRestarts']} / yes / the last good", command)
    figures("systemd reload, broken policy", "seconds from `systemctl reload` to a ready worker",
            f"{seconds:.1f}", command)


def test_reload_with_a_broken_config_stays_up_on_the_settings_in_force(
        started, admin_conn, prefix, figures):
    h = started
    before = h.state()
    try:
        h.write_conf("[copy]\nmax_imports = many\n[DEFAULT\ntransport_url = nowhere\n")
        seconds, after = reload_and_wait(h, h.worker())

        assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", after
        assert h.logged("invalid configuration: keeping the settings in force",
                        "/etc/imagesync/imagesync.conf"), h.tail()
        # The CLI reads imagesync.conf too, and refuses a broken one; read the ledger without.
        refused = h.cli("status")
        assert refused.returncode != 0 and "imagesync.conf:3" in refused.stderr, refused
        h.cli_conf = ("--config-file", "/dev/null")
        image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-d")
        synced(admin_conn, h, image.id, "edge")
        h.write_conf("[copy]\nmax_imports = many\n")  # parses, but a value is wrong
        seconds2, after = reload_and_wait(h, h.worker())
        assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == "0", after
        assert h.logged("invalid configuration", "[copy] max_imports"), h.tail()
        image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-e")
        synced(admin_conn, h, image.id, "edge")
    finally:
        h.write_conf()
        h.cli_conf = ()
    command = "tox -e systemd -- -k broken_config"
    figures("systemd reload, broken imagesync.conf", "NRestarts / MainPID kept / settings",
            f"{after['NRestarts']} / yes / those in force before", command)
    figures("systemd reload, broken imagesync.conf", "seconds from `systemctl reload` to a "
            "ready worker (unparsable file; bad value)", f"{seconds:.1f}; {seconds2:.1f}", command)


# -- watchdog


def test_a_hung_worker_is_killed_by_the_watchdog_and_the_service_syncs_again(
        started, admin_conn, prefix, figures):
    h = started
    before = h.state()
    hung = h.worker()
    watchdog = h.ns.show(SERVICE, "WatchdogUSec")["WatchdogUSec"]

    t0 = time.monotonic()
    h.ns.run("kill", "-STOP", str(hung), check=True)   # the worker stops pinging, as if wedged

    after = h.wait_ready(timeout=120, other_than=hung)
    seconds = time.monotonic() - t0
    assert after["NRestarts"] == "1", after
    assert after["MainPID"] != before["MainPID"], "systemd restarted the whole service"
    assert h.logged("Watchdog timeout"), h.ns.journal("init.scope")[-2000:]
    assert h.logged("Failed with result 'watchdog'"), h.tail()
    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-w")
    synced(admin_conn, h, image.id, "edge")
    command = "tox -e systemd -- -k watchdog"
    figures("systemd watchdog", "hung worker (SIGSTOP) killed, Result, NRestarts",
            f"yes, watchdog, {after['NRestarts']}", command)
    figures("systemd watchdog", "seconds from the hang to a ready worker again "
            f"(WatchdogSec {watchdog} + RestartSec 10 + start)", f"{seconds:.1f}", command)


# -- stop with imports in flight


def test_stop_with_imports_in_flight_loses_no_copy(host, admin_conn, prefix, figures):
    h = host
    h.write_policy(textwrap.dedent(f"""\
        version: 1
        rules:
          - name: {prefix}-everywhere
            match: {{name: "{prefix}-*"}}
            stores: [slow, edge]
        """))
    images = [upload_image(admin_conn, 16 << 20, name=f"{prefix}-{i}") for i in range(6)]
    h.ns.systemctl("reset-failed", SERVICE)
    h.ns.systemctl("start", "--no-block", SERVICE, check=True)
    h.wait_ready()
    try:
        in_flight = wait_for(
            lambda: [r for r in json.loads(h.imagesync("status", "--state", "in_flight",
                                                       "-f", "json")) if r], timeout=60,
            interval=0.05, message=f"imports in flight:\n{h.tail()}")

        t0 = time.monotonic()
        h.ns.systemctl("stop", SERVICE, check=True, timeout=120)
        stop_seconds = time.monotonic() - t0
        st = h.state()
        assert st["ActiveState"] in ("inactive", "failed") and st["Result"] == "success", st
        timeout_stop = h.ns.show(SERVICE, "TimeoutStopUSec")["TimeoutStopUSec"]

        h.ns.systemctl("start", "--no-block", SERVICE, check=True)
        h.wait_ready()
        for image in images:
            wait_for(lambda image=image: set(h.copies(image.id).values()) == {"done"}
                     and len(h.copies(image.id)) == 2, timeout=120,
                     message=f"{image.id} copied to slow and edge:\n{h.tail()}")
        lost = [(i.id, s) for i in images for s in ("slow", "edge")
                if s not in stores_of(admin_conn, i.id)]
        assert not lost, lost
    finally:
        h.ns.systemctl("stop", SERVICE)
    command = "tox -e systemd -- -k stop_with_imports"
    figures("systemd stop with imports in flight", "imports in flight at `systemctl stop`",
            len(in_flight), command)
    figures("systemd stop with imports in flight", f"seconds to stop (TimeoutStopSec "
            f"{timeout_stop}) / Result", f"{stop_seconds:.1f} / success", command)
    figures("systemd stop with imports in flight", "copies lost after `systemctl start` (goal 0)",
            f"{len(lost)} of {len(images) * 2}", command)


# -- hardening


def test_the_service_runs_as_its_user_writes_only_its_state_directory_and_is_exposed_2_or_less(
        started, figures):
    h = started
    worker = h.worker()
    status = h.ns.run("cat", f"/proc/{worker}/status").stdout
    uid = h.ns.run("id", "-u", "imagesync").stdout.strip()
    gid = h.ns.run("id", "-g", "imagesync").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^Seccomp:\s+2$",
                                                                        status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status

    def can_write(path: str) -> bool:
        # In the worker's own namespaces (its mounts, its user namespace), as its user.
        out = h.ns.run("nsenter", "-t", str(worker), "-m", "-U", "-S", uid, "-G", gid, "--",
                       "/bin/sh", "-c", f"echo x > {path}/.probe-{uuid.uuid4().hex[:6]}")
        return out.returncode == 0

    # /tmp and /var/tmp are the worker's own (PrivateTmp=yes), gone when it stops.
    writable = {p: can_write(p) for p in ("/var/lib/imagesync", "/etc/imagesync", VENV,
                                          "/var/lib", "/var/log", "/etc", "/usr", "/root",
                                          "/run", "/home")}
    assert writable.pop("/var/lib/imagesync") is True
    assert not any(writable.values()), writable

    out = h.ns.run("systemd-analyze", "security", "--no-pager", SERVICE, timeout=120)
    m = re.search(r"Overall exposure level for imagesync\.service: (\d+(?:\.\d+)?)", out.stdout)
    assert m, f"no exposure level in:\n{out.stdout}\n{out.stderr}"
    level = float(m.group(1))
    print(out.stdout)
    assert level <= EXPOSURE_GOAL, out.stdout
    command = "tox -e systemd -- -k exposed"
    figures("systemd hardening", "exposure (`systemd-analyze security`, under the real "
            "systemd 252)", level, command)
    figures("systemd hardening", "paths the worker can write, of 10 probed",
            "/var/lib/imagesync only", command)
