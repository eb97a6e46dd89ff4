"""A daemon starting on a fresh ledger (a new controller, a failover to a node whose ledger
is empty) over images already where the policy wants them: its first reconcile pass records
them from the listing, with no GET of any of them, counted at Glance's API nodes."""

from __future__ import annotations

from access_log import AccessLog

from daemon import Daemon
from helpers import Images, import_settled, stores_of, wait_for


def test_a_first_pass_over_images_already_in_place_gets_none_of_them(
        sandbox, admin_conn, tmp_path, prefix):
    policy = f"version: 1\nrules:\n  - name: r\n    match: {{name: \"{prefix}-*\"}}\n" \
             "    stores: [slow]\n"
    images = Images()
    first = Daemon(sandbox, tmp_path / "first", policy).start()
    try:
        ids = [images.upload(sandbox, admin_conn, 4096, f"{prefix}-{n}").id for n in range(6)]
        for i in ids:
            wait_for(lambda i=i: stores_of(admin_conn, i) == {"fast", "slow"} and
                     import_settled(admin_conn, i), timeout=60, message=f"{i} copied")
        first.stop()
        # When a daemon with an empty ledger starts
        log = AccessLog(sandbox)
        fresh = Daemon(sandbox, tmp_path / "fresh", policy).start()
        passed = wait_for(lambda: next((e for e in fresh.logs()
                                        if e.get("event") == "reconcile pass done"), None),
                          timeout=60, message="the fresh daemon's first pass")
        # Then it recorded every one as done, and asked Glance about none of them one by one
        gets = [p for _m, p, _s in log.requests("GET") for i in ids if p == f"/v2/images/{i}"]
        posts = [p for _m, p, _s in log.requests("POST") for i in ids if i in p]
        print(f"first pass: {passed}; GETs of these images: {len(gets)}")
        assert all(fresh.copies(i) == {"slow": "done"} for i in ids), \
            {i: fresh.copies(i) for i in ids}
        assert passed["settled_from_listing"] >= len(ids)
        assert gets == [] and posts == []
        fresh.stop()
    finally:
        first.stop()
        images.delete_all()
