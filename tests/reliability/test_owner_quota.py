"""Copies that respect tenants: Glance with Keystone unified limits, a tenant with an
image_size_total limit, imagesync copying its images. Glance checks imagesync's own quota
at import and counts every copy in the owner's usage; imagesync must check the owner's.

Every refusal is Glance's own answer to the owner's upload; copies are counted in Glance
(the image's stores) and in the daemon's own log."""

from __future__ import annotations

import uuid

import pytest
from access_log import AccessLog

from daemon import Daemon
from helpers import connect, delete_project_images, stores_of, upload_image, wait_for

MIB = 1 << 20
LIMIT = 20          # tenant-a's image_size_total, MiB (imagesync leaves 10 %: 18 MiB)
SIZE = 4 * MIB      # each image the tenant uploads; the policy wants 2 more copies of it


def command(k: str) -> str:
    return f"tox -e reliability -- tests/reliability/test_owner_quota.py -k '{k}'"


def policy(project: str, prefix: str) -> str:
    return f"""version: 1
rules:
  - name: tenant-images-everywhere
    match: {{projects: [{project}], name: "{prefix}-*"}}
    stores: [slow, edge]
"""


def daemon(box, tmp_path, prefix: str, check: bool) -> Daemon:
    return Daemon(box, tmp_path / f"d-{check}", policy(box.projects["tenant-a"], prefix),
                  {"quota": {"check_owner_quota": check, "limits_cache_ttl": 1,
                             "recheck_interval": 2}}).start()


def uploads_refused(box, conn, prefix: str, n: int) -> int:
    """The owner's own uploads of SIZE bytes (not matched by the policy) Glance refuses, read
    from its API nodes' logs (a 413 may reach the client as a dropped connection while it is
    still sending the data)."""
    log, made = AccessLog(box), []
    for i in range(n):
        image = conn.image.create_image(name=f"own-{prefix}-{i}", disk_format="raw",
                                        container_format="bare")
        made.append(image.id)
        try:
            conn.image.put(f"/images/{image.id}/file", data=b"o" * SIZE,
                           headers={"Content-Type": "application/octet-stream"})
        except Exception:  # noqa: BLE001, S110 - the answer is read at the server below
            pass
    answers = [status for _m, path, status in log.requests("PUT")
               for image_id in made if path == f"/v2/images/{image_id}/file"]
    assert len(answers) == n, answers
    return sum(1 for status in answers if status == 413)


def everything_done(d: Daemon, ids: list[str]) -> bool:
    return all(set(d.copies(i).values()) == {"done"} for i in ids)


@pytest.mark.parametrize("check", [pytest.param(False, marks=pytest.mark.full_only), True],
                         ids=["unchecked", "checked"])
def test_imagesync_never_spends_the_quota_an_owner_needs_for_its_own_uploads(
        limits_sandbox, tmp_path, figures, check):
    box, prefix = limits_sandbox, f"q{uuid.uuid4().hex[:6]}"
    owner, admin = connect(box, "sandbox-owner"), connect(box)
    tenant = box.projects["tenant-a"]
    delete_project_images(owner, tenant)   # a shared sandbox: usage starts from none
    box.set_limit("image_size_total", LIMIT, tenant)
    made: list = []
    d = daemon(box, tmp_path, prefix, check)
    try:
        # The tenant uploads two images the policy wants in slow and edge too: 3 x 4 MiB each
        for n in range(2):
            made.append(upload_image(owner, SIZE, name=f"{prefix}-{n}"))
        first = made[0].id
        wait_for(lambda: stores_of(admin, first) == {"fast", "slow", "edge"}, timeout=60,
                 message="the first image's copies (12 of the 18 MiB imagesync may use)")
        second = made[1].id
        if check:   # 16 MiB used by the tenant: no room for 8 more within 18
            wait_for(lambda: held_logged(d, second), timeout=60,
                     message="the second image's copies held")
        else:
            wait_for(lambda: stores_of(admin, second) == {"fast", "slow", "edge"}, timeout=60,
                     message="the second image's copies made (24 MiB used of 20)")
        held = held_logged(d, second)
        # Then the tenant uploads 1 image of its own, within its limit if imagesync held back
        refused = uploads_refused(box, owner, prefix, 1)
        usage = box_usage(owner)
        label = "checked (default)" if check else "check_owner_quota = false"
        scenario = f"owner quota ({label})"
        k = f"never_spends and {'not un' if check else 'un'}checked"
        figures(scenario, "tenant's image_size_total / usage after its uploads (MiB)",
                f"{LIMIT} / {usage}", command(k))
        figures(scenario, "owner uploads refused because of imagesync's copies (goal 0)",
                refused, command(k))
        if not check:
            assert refused == 1, "without the check, the copies should have eaten the quota"
            return
        assert refused == 0
        assert stores_of(admin, second) == {"fast"}, "a held copy was sent"
        # When the tenant's limit rises, Then the held copies go by themselves
        box.set_limit("image_size_total", 2 * LIMIT, tenant)
        wait_for(lambda: stores_of(admin, second) == {"fast", "slow", "edge"}, timeout=60,
                 message="the held copies released by a higher limit")
        # When the tenant uploads one more (32 of 40 MiB: room for one copy of two), Then one
        # copy goes and one is held; When the tenant deletes an image, Then it goes
        third = upload_image(owner, SIZE, name=f"{prefix}-2")
        made.append(third)
        wait_for(lambda: held_logged(d, third.id), timeout=60,
                 message="one of the third image's copies held")
        admin.image.delete_image(first)
        wait_for(lambda: stores_of(admin, third.id) == {"fast", "slow", "edge"}, timeout=60,
                 message="the held copy released by space freed")
        held_copies = {(e["image_id"], s) for e in d.logs()
                       if e.get("event") == "copy held: the owner's quota has no room"
                       for s in e["stores"]}
        released = {(i, s) for i, s in held_copies if s in stores_of(admin, i)}
        figures(scenario, "copies held / released later (limit raised; an image deleted)",
                f"{len(held_copies)} / {len(released)}", command(k))
        assert held and len(held_copies) == 3 and released == held_copies
    finally:
        d.stop()
        for image in made:
            admin.image.delete_image(image.id, ignore_missing=True)
        delete_project_images(owner, tenant)
        box.delete_limit("image_size_total", tenant)


def held_logged(d: Daemon, image_id: str | None = None) -> int:
    """How often the daemon held a copy (of `image_id`) for its owner's quota."""
    return sum(1 for e in d.logs() if e.get("event") == "copy held: the owner's quota has no "
               "room" and (image_id is None or e.get("image_id") == image_id))


def box_usage(conn) -> int:
    """The tenant's image_size_total usage in MiB, as Glance reports it to the tenant."""
    body = conn.image.get("/info/usage").json()
    return body["usage"]["image_size_total"]["usage"]
