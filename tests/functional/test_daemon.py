"""Stories of the daemon on the real sandbox: images land where the policy says, and stay."""

from __future__ import annotations

import signal
import subprocess
import threading

from daemon import import_requests
from helpers import import_settled, stores_of, upload_image, wait_for


def settled_in(conn, image_id: str, stores: set[str]) -> bool:
    return stores_of(conn, image_id) == stores and import_settled(conn, image_id)


def test_an_image_a_rule_sends_to_slow_and_edge_gets_there_with_one_import(
        sandbox, admin_conn, other_admin_conn, other_project, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: project-b
    match: {{projects: [{other_project}], name: "{prefix}-*"}}
    stores: [slow, edge]
""").start()

    image = upload_image(other_admin_conn, 1 << 20, name=f"{prefix}-a")

    wait_for(lambda: settled_in(admin_conn, image.id, {"fast", "slow", "edge"}), timeout=60,
             message="the image in fast, slow and edge")
    wait_for(lambda: d.copies(image.id) == {"slow": "done", "edge": "done"}, timeout=10,
             message="the ledger to record both copies done")
    assert import_requests(sandbox, image.id) == 1
    row = d.copy(image.id, "edge")
    assert row["rules"] == "project-b" and row["attempts"] == 1


def test_stores_all_with_exclude_skips_edge_unless_another_rule_wants_it(
        sandbox, admin_conn, other_admin_conn, other_project, daemon, prefix):
    daemon(f"""
version: 1
rules:
  - name: public-everywhere
    match: {{visibility: public, name: "{prefix}-*"}}
    stores: all
    exclude_stores: [edge]
  - name: project-b-on-edge
    match: {{projects: [{other_project}], name: "{prefix}-*"}}
    stores: [edge]
""").start()

    mine = upload_image(admin_conn, 4096, name=f"{prefix}-admin", visibility="public")
    theirs = upload_image(other_admin_conn, 4096, name=f"{prefix}-b", visibility="public")

    every = set(sandbox.stores)     # ceph too, unless the sandbox runs without it
    wait_for(lambda: settled_in(admin_conn, mine.id, every - {"edge"}), timeout=60,
             message="the admin project's public image in every store but edge")
    wait_for(lambda: settled_in(admin_conn, theirs.id, every), timeout=60,
             message="project b's public image in every store")
    assert "edge" not in stores_of(admin_conn, mine.id)


def test_an_image_no_rule_matches_is_never_copied(sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: golden-only
    match: {{name: "{prefix}-*", tags: [golden]}}
    stores: [slow]
""").start()

    plain = upload_image(admin_conn, 4096, name=f"{prefix}-plain")
    golden = upload_image(admin_conn, 4096, name=f"{prefix}-golden")
    admin_conn.image.add_tag(golden, "golden")

    wait_for(lambda: settled_in(admin_conn, golden.id, {"fast", "slow"}), timeout=60,
             message="the golden image copied (so the daemon has seen both)")
    wait_for(lambda: d.query("SELECT seen_at FROM images WHERE id = ? AND seen_at IS NOT NULL",
                             plain.id), timeout=10, message="the daemon to look at the plain image")
    assert stores_of(admin_conn, plain.id) == {"fast"}
    assert d.copies(plain.id) == {}
    assert import_requests(sandbox, plain.id) == 0


def test_making_a_private_image_public_triggers_its_copies(admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: public-to-edge
    match: {{visibility: public, name: "{prefix}-*"}}
    stores: [edge]
""").start()
    image = upload_image(admin_conn, 4096, name=f"{prefix}-p", visibility="private")
    wait_for(lambda: d.query("SELECT 1 FROM images WHERE id = ? AND seen_at IS NOT NULL",
                             image.id), timeout=20, message="the daemon to see the private image")
    assert stores_of(admin_conn, image.id) == {"fast"}

    admin_conn.image.update_image(image, visibility="public")

    wait_for(lambda: settled_in(admin_conn, image.id, {"fast", "edge"}), timeout=60,
             message="the now public image copied to edge")


def test_deleting_an_image_while_its_copy_is_pending_cancels_it(admin_conn, daemon, prefix):
    # One MiB per hour: the first image's copy uses the hour's budget; the second waits.
    d = daemon(f"""
version: 1
rules:
  - name: all-to-slow
    match: {{name: "{prefix}-*"}}
    stores: [slow]
""", {"copy": {"max_bytes_per_hour": 1 << 20}}).start()
    first = upload_image(admin_conn, 1 << 20, name=f"{prefix}-first")
    wait_for(lambda: settled_in(admin_conn, first.id, {"fast", "slow"}), timeout=60,
             message="the first copy")
    second = upload_image(admin_conn, 4096, name=f"{prefix}-second")
    wait_for(lambda: d.copies(second.id) == {"slow": "pending"}, timeout=20,
             message="the second copy pending behind the bytes-per-hour cap")

    admin_conn.image.delete_image(second)

    wait_for(lambda: d.copies(second.id) == {"slow": "cancelled"}, timeout=20,
             message="the pending copy cancelled")
    assert d.copy(second.id, "slow")["error_kind"] == "gone"
    assert not [e for e in d.logs() if e.get("level") in ("error", "critical")]


def test_a_failing_store_ends_failed_while_the_other_stores_are_kept(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: everywhere
    match: {{name: "{prefix}-*"}}
    stores: [slow, edge]
""", {"copy": {"max_attempts": 2, "backoff_base": 0.5, "backoff_cap": 1}})
    edge_dir = sandbox.dir / "glance" / "stores" / "edge"
    subprocess.run(["chattr", "+i", str(edge_dir)], check=True)
    try:
        d.start()
        image = upload_image(admin_conn, 4096, name=f"{prefix}-f")
        wait_for(lambda: d.copies(image.id).get("edge") in ("retrying", "failed"), timeout=60,
                 message="the edge copy to fail once")
        wait_for(lambda: d.copies(image.id) == {"slow": "done", "edge": "failed"}, timeout=60,
                 message="edge failed after its attempts, slow done")
    finally:
        subprocess.run(["chattr", "-i", str(edge_dir)], check=True)
    row = d.copy(image.id, "edge")
    assert row["attempts"] == 2 and row["error_kind"] == "copy_failed"
    assert stores_of(admin_conn, image.id) == {"fast", "slow"}
    assert import_requests(sandbox, image.id) == 2


def test_images_uploaded_while_the_daemon_is_stopped_are_synced_after_it_starts(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: to-edge
    match: {{name: "{prefix}-*"}}
    stores: [edge]
""").start()
    d.stop()
    images = [upload_image(admin_conn, 4096, name=f"{prefix}-{i}") for i in range(3)]
    before = d.query("SELECT events_total FROM daemon")[0]["events_total"]

    d.start()

    for image in images:
        wait_for(lambda i=image: settled_in(admin_conn, i.id, {"fast", "edge"}), timeout=60,
                 message=f"{image.id} synced after the restart")
    wait_for(lambda: d.query("SELECT events_total FROM daemon")[0]["events_total"] >= before + 15,
             timeout=30, message="the notifications queued while stopped to be consumed")


def test_the_daemons_own_copies_start_no_new_imports_and_a_removed_copy_comes_back(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: to-slow-edge
    match: {{name: "{prefix}-*"}}
    stores: [slow, edge]
""").start()
    image = upload_image(admin_conn, 1 << 20, name=f"{prefix}-e")
    wait_for(lambda: settled_in(admin_conn, image.id, {"fast", "slow", "edge"}), timeout=60,
             message="the first sync")
    # The echo of our own copy (image.update, prepare, upload, task.*) is all consumed...
    wait_for(lambda: sandbox.queues().get(d.pool) == (0, 0) and
             d.query("SELECT 1 FROM images WHERE id = ? AND look_at IS NULL", image.id),
             timeout=30, interval=0.5, message="the copy's own notifications to be handled")
    assert import_requests(sandbox, image.id) == 1

    resp = admin_conn.image.delete(f"/stores/edge/{image.id}")
    assert resp.status_code == 204

    wait_for(lambda: settled_in(admin_conn, image.id, {"fast", "slow", "edge"}), timeout=60,
             message="the removed edge copy made again")
    assert import_requests(sandbox, image.id) == 2


def test_dry_run_records_the_plan_and_imports_nothing(sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: to-edge
    match: {{name: "{prefix}-*"}}
    stores: [edge]
""").start("--dry-run")
    image = upload_image(admin_conn, 4096, name=f"{prefix}-dry")

    wait_for(lambda: d.copies(image.id) == {"edge": "pending"}, timeout=30,
             message="the planned copy in the ledger")
    assert any(e.get("event") == "imagesync started" and e.get("dry_run") for e in d.logs())
    d.stop()
    assert import_requests(sandbox, image.id) == 0
    assert stores_of(admin_conn, image.id) == {"fast"}


def test_a_first_start_over_thirty_images_never_exceeds_the_import_cap(
        sandbox, admin_conn, daemon, prefix):
    images = [upload_image(admin_conn, 256 * 1024, name=f"{prefix}-{i:02}") for i in range(30)]
    d = daemon(f"""
version: 1
rules:
  - name: all
    match: {{name: "{prefix}-*"}}
    stores: all
""", {"copy": {"max_imports": 3, "max_imports_per_store": 2}})
    peak = {"ledger": 0, "glance": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rows = d.query("SELECT count(DISTINCT image_id) AS n FROM copies "
                           "WHERE state = 'in_flight'")
            peak["ledger"] = max(peak["ledger"], rows[0]["n"] if rows else 0)
            locked = [i for i in admin_conn.image.images(name=None)
                      if i.name and i.name.startswith(prefix)
                      and i.properties.get("os_glance_import_task")]
            peak["glance"] = max(peak["glance"], len(locked))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    d.start()
    try:
        for image in images:
            wait_for(lambda i=image: settled_in(admin_conn, i.id, set(sandbox.stores)),
                     timeout=180, message=f"{image.id} in every store")
    finally:
        stop.set()
        sampler.join(10)
    assert 1 <= peak["ledger"] <= 3
    assert peak["glance"] <= 3


def test_sigkill_during_copies_loses_nothing(sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: all
    match: {{name: "{prefix}-*"}}
    stores: [slow, edge]
""", {"copy": {"max_imports": 2}})
    images = [upload_image(admin_conn, 20 << 20, name=f"{prefix}-{i}") for i in range(6)]
    d.start()
    wait_for(lambda: d.query("SELECT 1 FROM copies WHERE state = 'in_flight'"), timeout=30,
             interval=0.02, message="a copy in flight")

    d.kill()
    wait_for(lambda: not d.children(), timeout=10, message="the killed daemon's processes gone")
    d.start()

    for image in images:
        wait_for(lambda i=image: settled_in(admin_conn, i.id, {"fast", "slow", "edge"}),
                 timeout=180, message=f"{image.id} converged after the kill")
    wait_for(lambda: all(d.copies(i.id) == {"slow": "done", "edge": "done"} for i in images),
             timeout=30, message="the ledger to show every copy done")


def test_an_invalid_policy_at_first_start_exits_non_zero_naming_file_line_and_column(
        daemon, prefix):
    d = daemon("version: 1\nrules:\n  - name: x\n    match: {projects: 5}\n    stores: [slow]\n")
    d.start(wait=False)
    code = d.proc.wait(60)
    assert code == 1
    assert f"{d.policy_file}:4:" in d.tail()
    assert not d.ledger_path.exists() or not d.query("SELECT * FROM policy")


def test_an_invalid_policy_on_sighup_keeps_the_last_good_one_working(
        admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: to-slow
    match: {{name: "{prefix}-*"}}
    stores: [slow]
""").start()
    d.policy_file.write_text("version: 1\nrules:\n  - name: broken\n    stores: [nowhere\n")

    d.signal(signal.SIGHUP)

    wait_for(lambda: any(e.get("event") == "keeping the last good policy" for e in d.logs()),
             timeout=60, message="the restarted child to fall back to the last good policy")
    image = upload_image(admin_conn, 4096, name=f"{prefix}-after-hup")
    wait_for(lambda: settled_in(admin_conn, image.id, {"fast", "slow"}), timeout=60,
             message="copies by the last good policy")
    assert d.proc.poll() is None
    starts = [e for e in d.logs() if e.get("event") == "imagesync started"]
    assert len(starts) == 2, f"the child restarted {len(starts) - 1} times, expected once"


def test_a_sighup_rereads_the_config_file_too(daemon):
    d = daemon("version: 1\nrules: []\n").start()
    assert any(e.get("event") == "imagesync started" and e.get("dry_run") is False
               for e in d.logs())
    d.conf_file.write_text(d.conf_file.read_text().replace("[imagesync]\n",
                                                           "[imagesync]\ndry_run = true\n", 1))

    d.signal(signal.SIGHUP)

    wait_for(lambda: any(e.get("event") == "imagesync started" and e.get("dry_run") is True
                         for e in d.logs()), timeout=60,
             message="the new worker to start in dry-run mode")
