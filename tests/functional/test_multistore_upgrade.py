"""Clouds that grew into multi-store, and listings whose marker image is purged meanwhile.

Images uploaded before multi-store have locations without a store id: Glance lists them
with no `stores` until a GET of the image fills the id in (glance/location.py). The
sandbox makes such images (`Sandbox.make_legacy`). A reconcile pass pages with `marker`
= the last image of the previous page; once that image is deleted and purged (as
`glance-manage db purge` does), Glance answers 400 for it. Requests are counted in
Glance's own access log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from access_log import AccessLog

from imagesync.executor import PolicyHolder
from imagesync.glance import Glance
from imagesync.ledger import Ledger
from imagesync.policy import parse_policy
from imagesync.reconcile import Reconciler

from helpers import upload_image, wait_for


def policy(prefix: str, stores: str) -> str:
    return f"""
version: 1
rules:
  - name: {prefix}-rule
    match: {{name: "{prefix}-*"}}
    stores: {stores}
"""


def listed_stores(admin_conn, image_id: str) -> str | None:
    """The `stores` Glance's listing shows for one image (None: the key is absent)."""
    body = admin_conn.image.get(f"/images?id=in:{image_id}&visibility=all").json()
    return next(i.get("stores") for i in body["images"] if i["id"] == image_id)


def legacy_image(sandbox, admin_conn, name: str):
    """An image in `fast` whose location has no store id, as an upgraded cloud has them."""
    image = upload_image(admin_conn, 4096, name=name)
    assert sandbox.make_legacy(image.id) == 1
    assert listed_stores(admin_conn, image.id) is None  # what the reconciler lists
    return image


def purge(sandbox, admin_conn, image_id: str) -> None:
    """Delete an image and its rows, as `glance-manage db purge` does once it is old enough:
    an admin's listing then finds the marker no more."""
    admin_conn.image.delete_image(image_id)
    for table in ("image_properties", "image_tags", "image_members", "image_locations"):
        sandbox.sql(f"DELETE FROM {table} WHERE image_id = '{image_id}'")
    sandbox.sql(f"DELETE FROM images WHERE id = '{image_id}'")


def test_plan_reads_a_pre_multistore_image_once_and_does_not_plan_a_copy_to_its_store(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(policy(prefix, "[fast, slow]"))  # never started: plan asks Glance
    image = legacy_image(sandbox, admin_conn, f"{prefix}-old")
    log = AccessLog(sandbox)

    result = subprocess.run([sys.executable, "-m", "imagesync.cli", "--config-file",
                             str(d.conf_file), "plan", "-f", "json"],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    mine = [(r["store"], r["action"]) for r in json.loads(result.stdout)["copies"]
            if r["image_id"] == image.id]
    assert mine == [("slow", "copy")]  # not ("fast", "copy"): it is in fast
    gets = [r for r in log.requests("GET", f"/v2/images/{image.id}") if r[1].endswith(image.id)]
    assert gets == [("GET", f"/v2/images/{image.id}", 200)]
    assert listed_stores(admin_conn, image.id) == "fast"  # Glance saved what the GET filled in


def test_the_daemon_copies_a_pre_multistore_image_only_to_the_stores_it_lacks(
        sandbox, admin_conn, daemon, prefix):
    lacking = legacy_image(sandbox, admin_conn, f"{prefix}-lacking")
    settled = legacy_image(sandbox, admin_conn, f"{prefix}-settled")
    admin_conn.image.update_image(settled.id, name=f"{prefix}-settled-fast-only")
    d = daemon(f"""
version: 1
rules:
  - name: both
    match: {{name: "{prefix}-lacking"}}
    stores: [fast, slow]
  - name: fast-only
    match: {{name: "{prefix}-settled-*"}}
    stores: [fast]
""")
    log = AccessLog(sandbox)

    d.start()  # its first reconcile pass finds both: no notification told it of them
    wait_for(lambda: d.copies(lacking.id) == {"fast": "done", "slow": "done"}, timeout=90,
             message="the legacy image copied to slow")
    wait_for(lambda: d.copies(settled.id) == {"fast": "done"}, timeout=30,
             message="the settled legacy image recorded done in fast")

    imports = [r for r in log.requests("POST") if r[1].endswith("/import")]
    assert [(p, s) for _, p, s in imports if lacking.id in p] == [
        (f"/v2/images/{lacking.id}/import", 202)]  # one import, no 400 "already present"
    assert not [r for r in imports if settled.id in r[1]]
    assert d.query("SELECT stores FROM images WHERE id = ?", settled.id)[0]["stores"] == "fast"
    assert d.copy(lacking.id, "fast")["attempts"] == 0


def test_a_reconcile_pass_survives_its_marker_image_purged_between_pages(
        sandbox, admin_conn, prefix, tmp_path):
    ours = [upload_image(admin_conn, 1024, name=f"{prefix}-{n}").id for n in range(7)]
    glance = Glance.connect("sandbox", str(sandbox.clouds_yaml), rate=200)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    purged: list[str] = []

    def purge_our_marker(page):
        if not purged and page[-1].id in ours:
            purge(sandbox, admin_conn, page[-1].id)
            purged.append(page[-1].id)

    reconciler = Reconciler(ledger, glance, PolicyHolder(parse_policy(policy(prefix, "[fast]"))),
                            interval=0, page_size=3, between_pages=purge_our_marker)
    log = AccessLog(sandbox)
    figures: dict = {}
    worker = threading.Thread(target=lambda: figures.update(reconciler.run_pass()))
    try:
        worker.start()
        worker.join(300)
        assert not worker.is_alive(), "the reconcile pass did not finish"
    finally:
        reconciler.stop()
        ledger.close()

    assert purged, "no page ended with one of this test's images"
    assert "aborted" not in figures and figures["images"] >= len(ours) - 1, figures
    lists = [(p, s) for _, p, s in log.requests("GET", "/v2/images?")]
    assert (f"/v2/images?limit=3&visibility=all&marker={purged[0]}", 400) in lists
    assert lists.count(("/v2/images?limit=3&visibility=all", 200)) == 1  # never from the top
    recorded = {r["id"] for r in _rows(tmp_path / "ledger.sqlite", "SELECT id FROM images")}
    assert set(ours) - set(purged) <= recorded  # every image still there was reconciled


def _rows(path, sql: str) -> list[dict]:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()
