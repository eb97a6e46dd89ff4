"""The daemon on the production shape: Keystone tokens that die, an application credential,
Keystone down for a while (a minute at full scale), one Glance API node lost mid-burst, and
TLS with the sandbox's CA.

Everything counts at the server: Glance's API nodes' access logs, HAProxy's log (Keystone's
token requests pass through it), Glance's database.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import sandbox as sandbox_mod
from daemon import Daemon, import_requests
from helpers import Images, connect, import_settled, stores_of, wait_for

EVERY_STORE = {"fast", "slow", "edge"}


def policy(prefix: str) -> str:
    return f"""version: 1
rules:
  - name: shape-{prefix}
    match: {{name: "{prefix}-*"}}
    stores: [slow, edge]
"""


def converged(conn, d: Daemon, image_id: str) -> bool:
    return (stores_of(conn, image_id) == EVERY_STORE and import_settled(conn, image_id)
            and d.copies(image_id) == {"slow": "done", "edge": "done"})


def token_requests(box) -> int:
    """POST /v3/auth/tokens Keystone answered with 201, from HAProxy's log (every client,
    Glance's keystonemiddleware included, reaches Keystone through it)."""
    text = (Path(box.dir) / "log" / "haproxy.log").read_text(errors="replace")
    return len(re.findall(r"keystone_nodes/keystone \S+ 201 .*\"POST /v3/auth/tokens ", text))


def node_statuses(box, node: str, since: int, path_part: str = "/v2/") -> list[int]:
    with open(box.node_log(node), "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [int(s) for p, s in re.findall(r"\] [A-Z]+ (\S+) => .*\(HTTP/1\.[01] (\d{3})\)", text)
            if path_part in p]


def log_sizes(box) -> dict[str, int]:
    return {n: box.node_log(n).stat().st_size for n in sandbox_mod.NODES}


def keystone_admin(box):
    import openstack

    return openstack.connect(auth_url=box.keystone_url, username="admin",
                             password=box.password("admin"), project_name="admin",
                             user_domain_name="Default", project_domain_name="Default",
                             region_name=sandbox_mod.REGION, cacert=str(box.cacert),
                             identity_api_version="3")


def revoke_tokens_of(box, user: str) -> None:
    """Keystone revokes every token of a user whose password is set (even to the same one):
    what an operator's password rotation does to a running service."""
    token = box.keystone_admin_token()
    users = keystone_admin(box).identity
    uid = users.find_user(user, ignore_missing=False).id
    req = urllib.request.Request(
        f"{box.keystone_url}/users/{uid}", method="PATCH",
        data=json.dumps({"user": {"password": box.password(user)}}).encode(),
        headers={"X-Auth-Token": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30, context=box.tls_context()) as resp:
        assert resp.status == 200


@pytest.fixture
def images():
    made = Images()
    yield made
    made.delete_all()


# ---------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def strict_box(tmp_path_factory):
    """A sandbox of this module's own whose Glance nodes validate every token at Keystone
    (keystonemiddleware's cache off): a revoked token is refused at once, on every node."""
    box = sandbox_mod.Sandbox(tmp_path_factory.mktemp("strict-sandbox"))
    try:
        box.up(glance_options={"keystone_authtoken": {"token_cache_time": "-1"}}, ceph=False)
    except Exception as exc:
        pytest.fail(f"the sandbox could not start: {exc}", pytrace=False)
    yield box
    box.down()


def test_the_daemon_reauthenticates_when_keystone_revokes_its_tokens_and_loses_no_copy(
        strict_box, images, prefix, tmp_path):
    # The images are tenant-a's: only imagesync's own tokens are revoked.
    box, conn = strict_box, connect(strict_box, "sandbox-owner")
    d = Daemon(box, tmp_path / "d", policy(prefix)).start()
    first = images.upload(box, conn, 1 << 20, f"{prefix}-before")
    wait_for(lambda: converged(conn, d, first.id), timeout=60, message="the first copy")

    copies_at_revocation, refusals = [], []
    for n in range(3):
        # A copy is started, and while Glance runs it, the token that asked is revoked.
        image = images.upload(box, conn, 16 << 20, f"{prefix}-{n}")
        wait_for(lambda i=image: import_requests(box, i.id) >= 1, timeout=30, interval=0.05,
                 message="the import POST")
        sizes, tokens = log_sizes(box), token_requests(box)
        revoke_tokens_of(box, "imagesync")
        copies_at_revocation.append(image)
        # Then the next thing the daemon asks Glance is refused (401) at a node, and the
        # daemon gets a new token from Keystone and goes on.
        refused = wait_for(lambda s=sizes: sum(node_statuses(box, n, s[n]).count(401)
                                               for n in sandbox_mod.NODES), timeout=30,
                           message="Glance refusing the revoked token")
        wait_for(lambda t=tokens: token_requests(box) > t, timeout=30,
                 message="the daemon asking Keystone for a new token")
        refusals.append(refused)

    for image in copies_at_revocation:
        wait_for(lambda i=image: converged(conn, d, i.id), timeout=90,
                 message=f"the copy of {image.id}, started with a token revoked mid-copy")
        assert import_requests(box, image.id) == 1, "a revoked token cost a second import"
    print(f"revocations: 3; 401s at the nodes after each: {refusals}")
    failed = d.query("SELECT image_id, store, error_message FROM copies WHERE attempts > 1 "
                     "OR state IN ('failed', 'retrying')")
    assert not failed, [dict(r) for r in failed]
    assert d.proc.poll() is None
    # Nothing secret in what the daemon said.
    assert box.password("imagesync") not in d.log_path.read_text(errors="replace")


def test_the_daemon_keeps_working_across_token_expiries(tmp_path_factory, prefix):
    """Keystone tokens that live 130 s: keystoneauth renews a token with less than 120 s
    left, so the daemon takes a new one every ~10 s of work, and Glance keeps answering."""
    box = sandbox_mod.Sandbox(tmp_path_factory.mktemp("short-tokens"))
    try:
        box.up(token_expiration=130, ceph=False)
    except Exception as exc:
        pytest.fail(f"the sandbox could not start: {exc}", pytrace=False)
    images = Images()   # not deleted: the whole sandbox goes at the end
    try:
        conn = connect(box)
        d = Daemon(box, tmp_path_factory.mktemp("d"), policy(prefix)).start()
        tokens, sizes = token_requests(box), log_sizes(box)
        started = time.monotonic()
        made = []
        while time.monotonic() - started < 35:   # images spread over more than 3 renewals
            made.append(images.upload(box, conn, 1 << 20, f"{prefix}-{len(made)}"))
            wait_for(lambda i=made[-1]: converged(conn, d, i.id), timeout=60,
                     message="the copy")
            time.sleep(4)   # the spacing of the uploads, not a wait for a result
        renewed = token_requests(box) - tokens
        print(f"{renewed} tokens issued in {time.monotonic() - started:.0f} s, "
              f"{len(made)} images copied")
        # The test's own connection takes a token or two too; the daemon takes the rest.
        assert renewed >= 3, f"only {renewed} tokens issued in {time.monotonic() - started:.0f} s"
        refused = sum(node_statuses(box, n, sizes[n]).count(401) for n in sandbox_mod.NODES)
        assert refused == 0, f"Glance refused {refused} requests with an expired token"
        failed = d.query("SELECT * FROM copies WHERE state != 'done'")
        assert not failed, [dict(r) for r in failed]
        for image in made:
            assert import_requests(box, image.id) == 1
        d.stop()
    finally:
        box.down()


# ---------------------------------------------------------------- credentials and TLS


def test_an_application_credential_is_enough_to_sync(sandbox, admin_conn, images, daemon,
                                                     prefix):
    d = daemon(policy(prefix), {"imagesync": {"cloud": "sandbox-appcred"}}).start()
    image = images.upload(sandbox, admin_conn, 1 << 20, f"{prefix}-ac")
    wait_for(lambda: converged(admin_conn, d, image.id), timeout=60,
             message="the copy made with the application credential")
    # HAProxy closes a client connection idle for 2 s without a word: the daemon's pooled
    # connections go stale between these two images, and nothing may fail for it.
    time.sleep(5)   # the idle gap itself, not a wait for a result
    second = images.upload(sandbox, admin_conn, 1 << 20, f"{prefix}-ac2")
    wait_for(lambda: converged(admin_conn, d, second.id), timeout=60,
             message="the copy after an idle gap")
    said = [e for e in d.logs() if "unreachable" in json.dumps(e)]
    assert not said, said[:3]
    secret = yaml.safe_load(sandbox.clouds_yaml.read_text())["clouds"]["sandbox-appcred"][
        "auth"]["application_credential_secret"]
    assert secret not in d.log_path.read_text(errors="replace")


def _clouds_with(box, tmp_path: Path, **changes) -> Path:
    clouds = yaml.safe_load(box.clouds_yaml.read_text())
    clouds["clouds"]["sandbox"].update(changes)
    path = tmp_path / "clouds.yaml"
    path.write_text(yaml.safe_dump(clouds))
    path.chmod(0o600)
    return path


def test_a_wrong_cacert_is_named_as_such_and_nothing_is_sent(sandbox, admin_conn, images,
                                                             daemon, prefix, tmp_path):
    # The system CA bundle: a real file that does not hold the sandbox's CA.
    clouds = _clouds_with(sandbox, tmp_path, cacert="/etc/ssl/certs/ca-certificates.crt")
    d = daemon(policy(prefix), {"imagesync": {"clouds_file": clouds}}).start()
    image = images.upload(sandbox, admin_conn, 4096, f"{prefix}-tls")

    said = wait_for(lambda: [e for e in d.logs() if "TLS certificate" in json.dumps(e)],
                    timeout=30, message="the daemon naming the TLS problem")
    text = json.dumps(said[0])
    assert "check `cacert` in clouds.yaml" in text and "unreachable" not in text, said[0]
    assert import_requests(sandbox, image.id) == 0
    assert not d.query("SELECT * FROM copies WHERE state = 'failed'")
    assert d.proc.poll() is None

    # And the CLI says the same, at once.
    out = subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                          str(d.conf_file), "doctor"], capture_output=True, text=True,
                         timeout=120)
    assert "cacert" in out.stdout + out.stderr, out.stdout + out.stderr


# ---------------------------------------------------------------- outages


def test_keystone_down_for_a_while_pauses_the_daemon_and_nothing_fails(
        sandbox, admin_conn, images, daemon, prefix):
    box = sandbox
    down_for = 60 if os.environ.get("IMAGESYNC_RELIABILITY") == "full" else 30
    made = [images.upload(box, admin_conn, 1 << 20, f"{prefix}-{n}") for n in range(3)]
    d = daemon(policy(prefix))
    box.stop_service("keystone")
    try:
        d.start()   # a fresh process: it has no token and cannot get one
        outage = time.monotonic()
        wait_for(lambda: any("Keystone" in json.dumps(e) for e in d.logs()), timeout=60,
                 message="the daemon saying Keystone is unavailable")
        while time.monotonic() - outage < down_for:
            assert d.proc.poll() is None, d.tail()
            time.sleep(1)   # the outage's length; the daemon is checked every second
        assert not d.query("SELECT * FROM copies WHERE state = 'failed'")
        said = " ".join(json.dumps(e) for e in d.logs())
        assert "Glance unreachable" not in said, "a Keystone outage blamed on Glance"
    finally:
        box.start_service("keystone")
    back = time.monotonic()
    for image in made:
        wait_for(lambda i=image: converged(admin_conn, d, i.id), timeout=120,
                 message="the copies after Keystone returned")
        assert import_requests(box, image.id) == 1
    print(f"converged {time.monotonic() - back:.1f} s after Keystone returned")
    assert not d.query("SELECT * FROM copies WHERE attempts > 1")


def test_one_glance_node_lost_mid_burst_the_other_serves_and_everything_converges(
        sandbox, admin_conn, images, daemon, prefix):
    box = sandbox
    d = daemon(policy(prefix), {"copy": {"lock_poll_interval": 2}}).start()
    sizes = log_sizes(box)
    burst: list = []

    def glance2_imports() -> int:
        return node_statuses(box, "glance2", sizes["glance2"], "/import").count(202)

    # The burst runs until glance2 has taken an import (an extra GET of the test's own
    # shifts HAProxy's round robin when the daemon's imports keep landing on glance1).
    while not glance2_imports() and len(burst) < 8:
        burst.append(images.upload(box, admin_conn, 64 << 20, f"{prefix}-{len(burst)}"))
        wait_for(lambda i=burst[-1]: import_requests(box, i.id), timeout=60, interval=0.05,
                 message="the import of the image just uploaded")
        if not glance2_imports():
            admin_conn.image.get_image(burst[-1].id)
    assert glance2_imports(), "no import reached glance2: the story did not happen"
    # When glance2 dies while copies run on it
    box.stop_service("glance2")
    try:
        after = box.node_log("glance1").stat().st_size
        # and the burst goes on: these can only be copied through glance1
        burst += [images.upload(box, admin_conn, 64 << 20, f"{prefix}-late{n}")
                  for n in range(2)]
        aged: set[str] = set()

        def age_dead_locks() -> None:
            """Imports cut off on the dead node keep their lock for Glance's 60 minutes:
            age a lock whose task stopped moving, as time would."""
            for image in burst:
                task = admin_conn.image.get_image(image.id).properties.get(
                    "os_glance_import_task")
                if task and task not in aged and box.sql(
                        f"SELECT status FROM tasks WHERE id = '{task}' AND updated_at < "
                        "UTC_TIMESTAMP() - INTERVAL 20 SECOND").strip() in ("pending",
                                                                           "processing"):
                    aged.add(task)
                    box.sql("UPDATE tasks SET updated_at = UTC_TIMESTAMP() - INTERVAL 2 HOUR "
                            f"WHERE id = '{task}'")

        def finished() -> bool:
            age_dead_locks()
            states = [set(d.copies(i.id).values()) for i in burst]
            return all(s and s <= {"done", "failed"} for s in states)

        wait_for(finished, timeout=240, interval=1, message="every copy of the burst finished")
        served = node_statuses(box, "glance1", after)
        assert node_statuses(box, "glance1", after, "/import").count(202) >= 2, \
            "glance1 did not take over the imports"
        # A copy cut off mid-write leaves a partial file in the file store, and Glance then
        # refuses every new copy there ("already exists"): the daemon gives up after its
        # attempts and says why, never silently.
        failed = d.query("SELECT image_id, store, error_message FROM copies "
                         "WHERE state = 'failed'")
        for row in failed:
            assert "already exists" in row["error_message"], dict(row)
        debris = [Path(box.dir) / "glance" / "stores" / r["store"] / r["image_id"]
                  for r in failed]
        print(f"dead locks aged: {len(aged)}; copies left failed by debris: {len(failed)}; "
              f"requests glance1 served after the loss: {len(served)}")
    finally:
        box.start_service("glance2")
    # When the operator removes the debris and asks for a retry, everything converges.
    for path in debris:
        path.unlink(missing_ok=True)
    for image_id in {r["image_id"] for r in failed}:
        out = subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                              str(d.conf_file), "retry", image_id], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    # (An import killed after its last write keeps its lock on an image already complete:
    # Glance's business, not a copy to make.)
    for image in burst:
        wait_for(lambda i=image: stores_of(admin_conn, i.id) == EVERY_STORE and
                 d.copies(i.id) == {"slow": "done", "edge": "done"}, timeout=120,
                 message=f"{image.id} in every store")
    assert d.proc.poll() is None


# ---------------------------------------------------------------- nodes that differ


def test_a_store_enabled_on_one_api_node_only_is_reached_through_the_other_node(
        tmp_path_factory, prefix):
    """Edge deployments: `edge` is enabled on glance1 only. A copy-image POST that lands on
    glance2 gets Glance's 409; the daemon sends it again at once, back to back (round robin
    sends it to glance1, whatever the parity of the requests between two visits), and the copy
    is made at its first try."""
    box = sandbox_mod.Sandbox(tmp_path_factory.mktemp("lonely-edge"))
    try:
        box.up(lonely_store="edge", ceph=False)
    except Exception as exc:
        pytest.fail(f"the sandbox could not start: {exc}", pytrace=False)
    try:
        conn = connect(box)
        d = Daemon(box, tmp_path_factory.mktemp("d"), policy(prefix),
                   {"copy": {"unknown_store_tries": 5}}).start()
        sizes = log_sizes(box)
        made: list = []

        def refused_by_glance2() -> int:
            return node_statuses(box, "glance2", sizes["glance2"], "/import").count(409)

        # Which node a POST lands on depends on every request HAProxy balanced before it;
        # an extra GET of the test's own shifts the round robin until one lands on glance2.
        while not refused_by_glance2() and len(made) < 12:
            made.append(Images().upload(box, conn, 4096, f"{prefix}-{len(made)}"))
            wait_for(lambda i=made[-1]: converged(conn, d, i.id), timeout=90,
                     message=f"{made[-1].id} copied to edge through glance1")
            conn.image.get_image(made[-1].id)
        refused = refused_by_glance2()
        accepted = node_statuses(box, "glance1", sizes["glance1"], "/import").count(202)
        print(f"images: {len(made)}; imports refused by glance2 (no edge): {refused}; "
              f"accepted by glance1: {accepted}")
        assert refused >= 1, "no import ever reached glance2: the story did not happen"
        assert accepted == len(made), "one import per image, each accepted by glance1"
        resent = [e for e in d.logs() if e.get("event", "").startswith("copy-image sent again")]
        assert len(resent) == refused, "each refusal answered by a POST sent again at once"
        assert not d.query("SELECT * FROM copies WHERE state != 'done' OR attempts != 1")
        d.stop()
    finally:
        box.down()
