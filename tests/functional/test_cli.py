"""Stories of the operator CLI on the real sandbox, next to a real daemon.

The CLI always runs as its own process (`python -m imagesync.cli --config-file ...`), as
an operator runs it. Each test owns a name prefix and a pool queue, so its policy only
ever matches its own images. `doctor`'s copy check runs here with a member's Keystone
credentials (cloud `sandbox-member` of the sandbox's clouds.yaml), and in test_doctor.py with
an admin and a service role; tests/unit fakes its other branches.
"""

from __future__ import annotations

import json
import subprocess
import sys

from daemon import Daemon
from helpers import stores_of, upload_image, wait_for


def imagesync(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                           str(d.conf_file), *args], capture_output=True, text=True, timeout=120)


def to_slow_and_edge(prefix: str) -> str:
    return f"""
version: 1
rules:
  - name: {prefix}-slow-and-edge
    match: {{name: "{prefix}-*"}}
    stores: [slow, edge]
"""


def test_status_while_the_daemon_runs_shows_a_synced_images_stores_as_done(
        admin_conn, daemon, prefix):
    d = daemon(to_slow_and_edge(prefix)).start()
    image = upload_image(admin_conn, 4096, name=f"{prefix}-a")
    wait_for(lambda: d.copies(image.id) == {"slow": "done", "edge": "done"}, timeout=60,
             message="both copies done in the ledger")

    one = imagesync(d, "status", image.id, "-f", "json")
    overview = imagesync(d, "status")

    assert one.returncode == 0, one.stderr
    body = json.loads(one.stdout)
    assert body["image"]["stores"] == ["edge", "fast", "slow"]
    assert {(c["store"], c["state"], c["attempts"]) for c in body["copies"]} == {
        ("slow", "done", 1), ("edge", "done", 1)}
    assert all(c["rules"] == [f"{prefix}-slow-and-edge"] for c in body["copies"])
    assert overview.returncode == 0, overview.stderr
    assert f"daemon: running (pid {d.query('SELECT pid FROM daemon')[0]['pid']}" \
        in overview.stdout
    assert "last notification" in overview.stdout

    # The ledger stays readable with the daemon down.
    d.stop()
    after = imagesync(d, "status", "-f", "value", "-c", "store", "-c", "done")
    assert after.returncode == 0, after.stderr
    assert sorted(after.stdout.split("\n")[:-1]) == ["edge 1", "slow 1"]
    assert "not running" in imagesync(d, "status").stdout


def test_retry_after_a_failing_store_is_repaired_makes_the_daemon_copy_it_again(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: to-edge
    match: {{name: "{prefix}-*"}}
    stores: [edge]
""", {"copy": {"max_attempts": 1, "backoff_base": 0.5, "backoff_cap": 1}}).start()
    edge_dir = sandbox.dir / "glance" / "stores" / "edge"
    subprocess.run(["chattr", "+i", str(edge_dir)], check=True)
    try:
        image = upload_image(admin_conn, 4096, name=f"{prefix}-r")
        wait_for(lambda: d.copies(image.id) == {"edge": "failed"}, timeout=60,
                 message="the edge copy to fail")
    finally:
        subprocess.run(["chattr", "-i", str(edge_dir)], check=True)
    failed = imagesync(d, "status", "--failed", "-f", "value", "-c", "image_id", "-c", "store",
                       "-c", "error_kind")
    assert f"{image.id} edge copy_failed" in failed.stdout.splitlines()

    retried = imagesync(d, "retry", image.id, "--wait")

    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.splitlines() == [
        f"queued a retry of 1 failed copy of {image.id} (edge); the daemon picks it up "
        "within a second",
        "the daemon took it: 1 copies re-queued"]
    wait_for(lambda: "edge" in stores_of(admin_conn, image.id), timeout=60,
             message="the image copied to edge after the retry")
    wait_for(lambda: d.copies(image.id) == {"edge": "done"}, timeout=30,
             message="the ledger to record the retried copy done")


def test_plan_lists_an_images_missing_stores_with_their_bytes(admin_conn, daemon, prefix):
    d = daemon(to_slow_and_edge(prefix))  # never started: plan asks Glance, not the daemon
    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-p")

    result = imagesync(d, "plan", image.id, "-f", "json")

    assert result.returncode == 0, result.stderr
    assert "no ledger at" in result.stderr
    body = json.loads(result.stdout)
    assert [(r["store"], r["action"], r["bytes"], r["rules"]) for r in body["copies"]] == [
        ("edge", "copy", 1 << 20, [f"{prefix}-slow-and-edge"]),
        ("slow", "copy", 1 << 20, [f"{prefix}-slow-and-edge"])]
    assert body["totals"]["bytes"] == 2 << 20
    whole = imagesync(d, "plan", "-c", "name", "-c", "store", "-c", "bytes")
    assert whole.returncode == 0, whole.stderr
    mine = [line for line in whole.stdout.splitlines() if f"{prefix}-p " in line]
    assert [line.split("|")[2].strip() for line in mine] == ["edge", "slow"]
    assert all("1.0 MiB" in line for line in mine)
    assert "would copy" in whole.stdout.splitlines()[-1]


def test_explain_names_the_matcher_that_failed_and_what_the_ledger_says(
        admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: golden-on-edge
    match: {{name: "{prefix}-*", tags: [golden]}}
    stores: [edge]
  - name: all-on-slow
    match: {{name: "{prefix}-*"}}
    stores: [slow]
""").start()
    image = upload_image(admin_conn, 4096, name=f"{prefix}-e")
    wait_for(lambda: d.copies(image.id) == {"slow": "done"}, timeout=60,
             message="the slow copy done")

    result = imagesync(d, "explain", image.id)

    assert result.returncode == 0, result.stderr
    golden = next(line for line in result.stdout.splitlines() if "golden-on-edge" in line)
    assert "| no " in golden
    assert "image lacks tag golden, rule wants all of golden" in golden
    assert "desired: slow (all-on-slow)" in result.stdout
    assert "missing: none" in result.stdout
    assert "ledger:  slow done" in result.stdout
    rules = json.loads(imagesync(d, "explain", image.id, "-f", "json").stdout)["rules"]
    assert [(r["rule"], r["matched"]) for r in rules] == [("golden-on-edge", False),
                                                         ("all-on-slow", True)]


def test_policy_check_with_glance_knows_the_live_stores(sandbox, daemon, prefix, tmp_path):
    d = daemon(to_slow_and_edge(prefix))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(to_slow_and_edge(prefix).replace("[slow, edge]", "[slow, nowhere]"))

    good = imagesync(d, "policy", "check", "--glance")
    bad = imagesync(d, "policy", "check", "--glance", str(wrong))

    assert good.returncode == 0, good.stderr
    live = ", ".join(sorted(sandbox.stores))    # ceph too, unless the sandbox runs without it
    assert f"stores checked against Glance ({live})" in good.stdout
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"{wrong}:6:")
    assert "nowhere" in bad.stderr


def test_doctor_on_the_sandbox_with_the_daemon_running_reports_every_check_ok(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(to_slow_and_edge(prefix)).start()
    upload_image(admin_conn, 4096, name=f"{prefix}-d")
    wait_for(lambda: d.query("SELECT events_total FROM daemon")[0]["events_total"] > 0,
             timeout=30, message="a notification recorded")

    result = imagesync(d, "doctor")

    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert [line.split(":")[0] for line in checks] == [
        "OK    configuration", "OK    coordination", "OK    Glance reachable", "OK    multi-store",
        "OK    copy-image enabled", "OK    credentials may copy",
        "OK    notification queue", "OK    notifications arriving", "OK    policy valid",
        "OK    ledger writable"]
    queue = next(line for line in checks if "notification queue" in line)
    assert f"queue '{d.pool}'" in queue and "1 consumer(s)" in queue
    assert "guest:guest@" not in result.stdout


def test_doctor_says_copy_image_needs_the_admin_role_for_member_credentials(
        sandbox, admin_conn, daemon, prefix):
    # member-a is a plain member of tenant-a in Keystone (cloud sandbox-member). doctor asks
    # Glance to copy an image the member can see: a public one.
    upload_image(admin_conn, 1024, name=f"{prefix}-public", visibility="public")
    d = daemon(to_slow_and_edge(prefix), {"imagesync": {"cloud": "sandbox-member"}})

    result = imagesync(d, "doctor")

    assert result.returncode == 1
    assert "OK    Glance reachable" in result.stdout
    assert "FAIL  credentials may copy: copy-image needs the admin role" in result.stdout
    assert "hint: give the user of cloud sandbox-member the admin role" in result.stdout
    assert sandbox.password("member-a") not in result.stdout + result.stderr


def test_doctor_fails_when_the_pool_queue_does_not_exist_yet(daemon, prefix):
    d = daemon(to_slow_and_edge(prefix))  # never started: nobody declared its pool queue

    result = imagesync(d, "doctor")

    assert result.returncode == 1
    assert f"FAIL  notification queue: no queue '{d.pool}'" in result.stdout
    assert "hint: start the daemon once" in result.stdout
    assert "WARN  ledger writable: no ledger yet" in result.stdout
