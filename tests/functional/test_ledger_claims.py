"""Story: a burst of images that each need two more stores, mixed with images that need one
(so the per-store counts are uneven), at the default caps (4 imports, 2 per store), gets
ONE copy-image import per image, counted in Glance's own access log. Each import reads the
whole image into staging: a split would read it twice."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from daemon import import_requests
from helpers import import_settled, stores_of, upload_image, wait_for

TWO_STORES, ONE_STORE = 16, 5


def test_a_burst_of_images_needing_two_stores_gets_one_import_per_image(
        sandbox, admin_conn, daemon, prefix):
    d = daemon(f"""
version: 1
rules:
  - name: two-stores
    match: {{name: "{prefix}-two-*", tags: [go]}}
    stores: [slow, edge]
  - name: slow-only
    match: {{name: "{prefix}-one-*", tags: [go]}}
    stores: [slow]
""", {"copy": {"max_imports": 4, "max_imports_per_store": 2}})
    names = [f"{prefix}-one-{i}" for i in range(ONE_STORE)] + \
        [f"{prefix}-two-{i:02}" for i in range(TWO_STORES)]
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda name: upload_image(admin_conn, 1 << 20, name=name),
                               names))
    d.start()
    wait_for(lambda: any(e.get("event") == "reconcile pass done" for e in d.logs()),
             timeout=120, message="the start-up reconcile pass")
    with ThreadPoolExecutor(8) as pool:   # every image wanted at once
        list(pool.map(lambda i: admin_conn.image.add_tag(i, "go"), images))

    two = images[ONE_STORE:]
    for image in images:
        wanted = {"fast", "slow", "edge"} if image in two else {"fast", "slow"}
        wait_for(lambda i=image, w=wanted: stores_of(admin_conn, i.id) == w
                 and import_settled(admin_conn, i.id), timeout=240,
                 message=f"{image.id} in {sorted(wanted)}")
    wait_for(lambda: d.query("SELECT count(*) AS n FROM copies WHERE state = 'done'")[0]["n"]
             == 2 * TWO_STORES + ONE_STORE, timeout=30, message="every copy done in the ledger")
    imports = {image.id: import_requests(sandbox, image.id) for image in two}
    assert imports == {image.id: 1 for image in two}, "some images were imported twice"
    assert {r["attempts"] for r in d.query("SELECT attempts FROM copies")} == {1}
    for image in images:
        admin_conn.image.delete_image(image)
