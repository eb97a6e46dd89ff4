"""Glance's bad answers, told by a fault-injecting proxy between the real daemon and Glance.

Each story runs imagesync-daemon on the real sandbox with its Glance endpoint pointing at
tests/faultproxy.py (the daemon still authenticates with the real Keystone; the proxy
forwards to the load balancer over TLS, with both Glance API nodes behind it), which
answers some requests the way misbehaving deployments do (429 with and without
Retry-After, 503, 401, 403, dropped and stalled connections, one API node's 409 "store not
found") and counts every request per image. The figures (requests per image per minute,
global peak rate, imports per image, time to converge, failed copies after a real outage)
go to the RELIABILITY.md table. Every image made here is deleted at the end.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from imagesync.glance import STORE_READS

from daemon import Daemon
from faultproxy import (
    FaultProxy,
    drop_after,
    drop_before,
    error,
    stall,
    store_not_found,
    too_many_requests,
    unauthorized,
    unavailable,
)
from helpers import Images, connect, import_settled, stores_of, wait_for

MIB = 1 << 20
TROUBLE = "image in trouble: not asked about again for a while"
BUDGET = 20.0            # [copy] glance_requests_per_second (the default)
SHARE = 0.1              # [copy] image_request_share (the default)
MAX_PER_MINUTE = 12      # requests about one image in trouble, in any minute (was ~1200)
BADLY = "Glance answers badly (seven faults at once)"


def command(keyword: str) -> str:
    return f"tox -e reliability -- -k {keyword}"


def policy_for(prefix: str, stores) -> str:
    return (f"version: 1\nrules:\n  - name: {prefix}-rule\n"
            f"    match: {{name: \"{prefix}-*\"}}\n    stores: [{', '.join(sorted(stores))}]\n")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def images():
    made = Images()
    yield made
    made.delete_all()


def fault_proxy(box) -> FaultProxy:
    """A fault proxy in front of `box`'s load balancer (TLS verified with its CA)."""
    return FaultProxy(box.glance_url, cafile=box.cacert, keystone_url=box.keystone_url)


@pytest.fixture
def proxy(sandbox):
    """A fault proxy in front of the shared sandbox's Glance; it must end without errors."""
    with fault_proxy(sandbox) as p:
        yield p
    assert not p.errors, p.errors


def through(proxy, box, tmp_path, **copy) -> dict:
    """Daemon options that send every Glance request through `proxy` (each cloud of `box`'s
    clouds.yaml gets the proxy as its image endpoint; Keystone stays the real one)."""
    clouds = proxy.write_clouds_yaml(tmp_path / f"clouds-{uuid.uuid4().hex[:6]}.yaml",
                                     box.clouds_yaml)
    return {"imagesync": {"clouds_file": clouds}, "copy": copy}


def converged(conn, d, image_id: str, wanted) -> bool:
    """In every wanted store with no import running, and every copy done in the ledger."""
    copies = d.copies(image_id)
    return (set(wanted) <= stores_of(conn, image_id) and import_settled(conn, image_id)
            and all(copies.get(s) == "done" for s in wanted))


def wait_converged(conn, d, ids, wanted, timeout: float) -> dict[str, float]:
    """Wait until every image converged; return the seconds each one took from now."""
    start, took = time.monotonic(), {}

    def all_done():
        for image_id in ids:
            if image_id not in took and converged(conn, d, image_id, wanted):
                took[image_id] = time.monotonic() - start
        return len(took) == len(ids)

    try:
        wait_for(all_done, timeout=timeout, interval=0.25,
                 message=f"{len(ids)} image(s) copied to {sorted(wanted)}")
    except AssertionError as exc:
        left = {i: d.copies(i) for i in ids if i not in took}
        raise AssertionError(f"{exc}\nnot converged (ledger): {left}\n{d.tail(20)}") from None
    return took


def events(d, name: str, image_id: str | None = None) -> list[dict]:
    return [e for e in d.logs() if e.get("event") == name
            and (image_id is None or e.get("image_id") == image_id)]


def tracebacks(d) -> list[dict]:
    return [e for e in d.logs() if e.get("exception") or e.get("exc_info")]


# ---------------------------------------------------------------- 1. request discipline

# One image per fault kind; each rule answers every request about that image, any method.
GET_FAULTS = {
    "429 with Retry-After: 5": lambda i: too_many_requests(retry_after=5, image_id=i),
    "429 without Retry-After": lambda i: too_many_requests(image_id=i),
    "503": lambda i: unavailable(image_id=i),
    "401": lambda i: unauthorized(image_id=i),
    "403": lambda i: error(403, image_id=i),
    "connection dropped": lambda i: drop_before(image_id=i),
    "answer stalled 3 s, then dropped": lambda i: stall(3.0, then="drop", image_id=i),
}


def test_an_image_glance_answers_badly_is_asked_about_on_a_backoff_and_converges_after(
        sandbox, admin_conn, proxy, images, daemon, prefix, tmp_path, scale, figures):
    # Given one image per kind of bad answer, and one calm image, all to be copied to slow
    calm = images.upload(sandbox, admin_conn, MIB, f"{prefix}-calm")
    troubled = {kind: images.upload(sandbox, admin_conn, MIB, f"{prefix}-{n}")
                for n, kind in enumerate(GET_FAULTS)}
    rules = [proxy.add(make(troubled[kind].id)) for kind, make in GET_FAULTS.items()]

    # When the daemon runs through the proxy for a while
    d = daemon(policy_for(prefix, {"slow"}), through(proxy, sandbox, tmp_path))
    d.start()
    wait_converged(admin_conn, d, [calm.id], {"slow"}, timeout=90)
    window = 60.0 if scale["full"] else 20.0
    time.sleep(window)   # the observation window: what the daemon sends is counted in it

    # Then each troubled image was asked about on a backoff, not at once and forever
    for kind, image in troubled.items():
        rate = proxy.image_rate(image.id, window=60.0)
        figures(BADLY, f"requests about one image per minute (max): {kind}",
                rate, command("answers_badly"))
        assert rate <= MAX_PER_MINUTE, f"{kind}: {rate} requests about {image.id} in a minute"
        # and the log says once that it is in trouble, with no traceback per request
        assert len(events(d, TROUBLE, image.id)) == 1, (kind, events(d, TROUBLE, image.id))
    assert not tracebacks(d), tracebacks(d)[:3]
    peak, peak10 = proxy.peak_rate(window=1.0), proxy.peak_rate(window=10.0)
    figures(BADLY, "global peak request rate: in any 1 s / in any 10 s",
            f"{peak} / {peak10}", command("answers_badly"))
    # glance_requests_per_second holds: a full token bucket (one second's worth), then its rate
    assert peak10 <= BUDGET * 11 + 5, peak10
    # and an expired credential is told apart from an unreachable Glance
    said = {kind: events(d, TROUBLE, image.id)[0]["answer"] for kind, image in troubled.items()}
    assert "refused imagesync's token" in said["401"], said["401"]
    assert said["connection dropped"].startswith("Glance unreachable"), said

    # When Glance answers properly again
    for rule in rules:
        proxy.remove(rule)
    took = wait_converged(admin_conn, d, [i.id for i in troubled.values()], {"slow"},
                          timeout=window + 120)

    # Then every image is copied, with one import each, and leaves trouble with one line
    for kind, image in troubled.items():
        figures(BADLY, f"seconds to converge once the fault ends: {kind}",
                f"{took[image.id]:.1f}", command("answers_badly"))
        assert len(events(d, "image out of trouble", image.id)) == 1, kind
    imports = proxy.imports_per_image()
    figures(BADLY, "imports per image", max(imports.values()),
            command("answers_badly"))
    every = [calm.id, *(i.id for i in troubled.values())]
    assert {i: imports.get(i) for i in every} == dict.fromkeys(every, 1)
    assert d.query("SELECT count(*) AS n FROM copies WHERE state = 'failed'")[0]["n"] == 0


def test_an_image_updated_ten_times_a_second_gets_no_more_than_its_share_of_requests(
        sandbox, admin_conn, proxy, images, daemon, prefix, tmp_path, scale, figures):
    # Given a daemon through the proxy, and an image it has copied
    hot = images.upload(sandbox, admin_conn, MIB, f"{prefix}-hot")
    d = daemon(policy_for(prefix, {"slow"}), through(proxy, sandbox, tmp_path)).start()
    wait_converged(admin_conn, d, [hot.id], {"slow"}, timeout=90)
    since = proxy.now()

    # When a client updates it ten times a second (each update is a notification)
    seconds = 60.0 if scale["full"] else 30.0
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:   # the load itself: its length is the scenario
        admin_conn.image.update_image(hot.id, **{f"{prefix}_counter": str(n)})
        n += 1
        time.sleep(0.1)

    # Then the daemon looked at it no more than its share of the request budget allows: a
    # burst of 10 s worth, then its share per second (a few requests of slack for the last
    # look of the copy before the load began)
    rate = proxy.image_rate(hot.id, window=60.0, since=since)
    busiest = proxy.image_rate(hot.id, window=seconds, since=since)
    share = BUDGET * SHARE * (10 + seconds)
    figures("one image updated 10 times a second", "requests about it per minute (max)",
            f"{rate} for {n} updates in {seconds:.0f} s (its share: {share:.0f})",
            command("share_of_requests"))
    assert busiest <= share + 2, f"{busiest} requests about one image in {seconds:.0f} s"
    assert busiest < n, "every update was followed by a look: no share was enforced"
    assert busiest >= 10, "the image was not looked at any more"


# ---------------------------------------------------------------- 2. answers to an import

IMPORT_FAULTS = {
    "answer dropped after Glance took the import": lambda i: drop_after(
        method="POST", path="/import$", image_id=i, times=1),
    "connection dropped before the import reached Glance": lambda i: drop_before(
        method="POST", path="/import$", image_id=i, times=1),
    "answer stalled 5 s": lambda i: stall(5.0, method="POST", path="/import$", image_id=i,
                                          times=1),
    "three 503s": lambda i: unavailable(method="POST", path="/import$", image_id=i, times=3),
    "two 429s with Retry-After: 3": lambda i: too_many_requests(
        retry_after=3, method="POST", path="/import$", image_id=i, times=2),
    "401": lambda i: unauthorized(method="POST", path="/import$", image_id=i, times=1),
}


def test_a_lost_or_refused_answer_to_an_import_never_leads_to_a_second_import_or_an_attempt(
        sandbox, admin_conn, proxy, images, daemon, prefix, tmp_path, figures):
    # Given one image per kind of bad answer to its import; max_attempts 2
    made = {kind: images.upload(sandbox, admin_conn, MIB, f"{prefix}-{n}")
            for n, kind in enumerate(IMPORT_FAULTS)}
    rules = {kind: proxy.add(make(made[kind].id)) for kind, make in IMPORT_FAULTS.items()}

    # When the daemon copies them through the proxy
    d = daemon(policy_for(prefix, {"slow"}),
               through(proxy, sandbox, tmp_path, max_attempts=2)).start()
    took = wait_converged(admin_conn, d, [i.id for i in made.values()], {"slow"}, timeout=180)

    # Then each got exactly one import Glance accepted, and used one attempt
    imports = proxy.imports_per_image()
    for kind, image in made.items():
        assert rules[kind].hits >= 1, f"{kind}: the fault never happened"
        figures("bad answers to an import", f"imports per image: {kind}",
                imports.get(image.id), command("answer_to_an_import"))
        figures("bad answers to an import", f"seconds to converge: {kind}",
                f"{took[image.id]:.1f}", command("answer_to_an_import"))
        assert imports.get(image.id) == 1, (kind, imports.get(image.id))
        row = d.copy(image.id, "slow")
        assert row["attempts"] == 1, (kind, dict(row))
    # and the answer lost after Glance took it was followed by a look, not a second POST
    taken = made["answer dropped after Glance took the import"]
    lost = events(d, "copy-image answer lost", taken.id)
    assert lost and lost[0]["glance_took_it"] is True, lost
    assert proxy.count("POST", "/import$", image_id=taken.id) == 1
    dropped = made["connection dropped before the import reached Glance"]
    assert proxy.count("POST", "/import$", image_id=dropped.id) == 2
    assert not tracebacks(d), tracebacks(d)[:3]


# ---------------------------------------------------------------- 2b. failed copies end

def reload_with(d, policy: str) -> None:
    """Write a new policy and SIGHUP: a new worker starts, and reconciles every image."""
    starts, passes = len(events(d, "imagesync started")), len(events(d, "reconcile pass done"))
    d.policy_file.write_text(policy)
    d.signal(signal.SIGHUP)
    wait_for(lambda: len(events(d, "imagesync started")) > starts and
             len(events(d, "reconcile pass done")) > passes, timeout=90,
             message="a new worker after SIGHUP, and its reconcile pass")


def failed_copies(d) -> int:
    return d.query("SELECT count(*) AS n FROM copies WHERE state = 'failed'")[0]["n"]


def test_failed_copies_of_deleted_images_and_unwanted_stores_end_and_a_copy_wanted_again_resumes(
        sandbox, admin_conn, proxy, images, daemon, prefix, tmp_path, figures):
    # Given two copies to edge that failed for good: Glance refused each import twice with a
    # 400 that re-reading the image does not explain (max_attempts 2)
    gone = images.upload(sandbox, admin_conn, MIB, f"{prefix}-gone")
    kept = images.upload(sandbox, admin_conn, MIB, f"{prefix}-kept")
    for image in (gone, kept):
        proxy.add(error(400, method="POST", path="/import$", image_id=image.id, times=2))
    d = daemon(policy_for(prefix, {"edge"}),
               through(proxy, sandbox, tmp_path, max_attempts=2)).start()
    wait_for(lambda: failed_copies(d) == 2, timeout=90, message="both copies failed")

    # When one image is deleted
    admin_conn.image.delete_image(gone.id)
    # Then its failed copy ends: cancelled, with the reason
    wait_for(lambda: d.copies(gone.id) == {"edge": "cancelled"}, timeout=60,
             message="the deleted image's failed copy cancelled")
    assert d.copy(gone.id, "edge")["error_kind"] == "gone"

    # When no rule wants edge any more (the policy is reloaded)
    reload_with(d, policy_for(prefix, {"fast"}))
    # Then the other failed copy ends too, and no copy is failed: an alert on them clears
    wait_for(lambda: d.copies(kept.id).get("edge") == "cancelled", timeout=60,
             message="the unwanted store's failed copy cancelled")
    assert d.copy(kept.id, "edge")["error_kind"] == "not_wanted"
    figures("failed copies end", "failed copies left after their image was deleted and "
            "their store unwanted", failed_copies(d), command("failed_copies_of_deleted"))
    assert failed_copies(d) == 0

    # When edge is wanted again
    reload_with(d, policy_for(prefix, {"edge"}))
    # Then the copy resumes its history: one more try (the 400s are over), counted after the
    # two it had used, not from 0
    wait_converged(admin_conn, d, [kept.id], {"edge"}, timeout=90)
    attempts = d.copy(kept.id, "edge")["attempts"]
    figures("failed copies end", "attempts of a failed copy wanted again, once done "
            "(max_attempts 2)", attempts, command("failed_copies_of_deleted"))
    assert attempts == 2


# ---------------------------------------------------------------- 3. a node lacking a store

STORES_TTL = 20.0   # [reconcile] stores_cache_ttl in this story


def test_a_store_one_glance_node_lacks_is_tried_a_few_times_then_blocked_until_the_store_list_refresh(  # noqa: E501
        sandbox, admin_conn, proxy, images, daemon, prefix, tmp_path, figures):
    # Given an image wanted in slow and edge, and a Glance API node that lacks edge answering
    # every import that names edge
    image = images.upload(sandbox, admin_conn, MIB, f"{prefix}-edge")
    node = proxy.add(store_not_found("edge", image_id=image.id))
    options = through(proxy, sandbox, tmp_path, unknown_store_tries=3)
    options["reconcile"] = {"stores_cache_ttl": STORES_TTL}
    d = daemon(policy_for(prefix, {"slow", "edge"}), options).start()

    # Then slow is copied at once (the 409 named edge), and edge is blocked with the reason
    def blocked():
        row = d.copy(image.id, "edge")
        return row if row is not None and row["state"] == "failed" else None

    row = wait_for(blocked, timeout=90, interval=0.2, message="the copy to edge blocked")
    blocked_at = time.monotonic()
    assert row["error_kind"] == "unknown_store"
    assert "edge" in row["error_message"] and "blocked" in row["error_message"]
    wait_for(lambda: "slow" in stores_of(admin_conn, image.id), timeout=60,
             message="the copy to slow despite edge")
    tries = proxy.count("POST", "/import$", image_id=image.id)
    edge_tries = node.hits
    figures("a Glance node lacking a store", "imports naming the store before it was blocked "
            f"(3 tries, each sent again at once {STORE_READS} times for other API nodes)",
            edge_tries, command("node_lacks"))
    assert edge_tries == 3 * (1 + STORE_READS), edge_tries

    # And nothing is sent for it while blocked; when the node has the store again, the next
    # store-list refresh brings one more try, which works
    proxy.remove(node)
    wait_converged(admin_conn, d, [image.id], {"slow", "edge"}, timeout=STORES_TTL + 60)
    waited = time.monotonic() - blocked_at
    figures("a Glance node lacking a store", "seconds blocked before the next try "
            f"(stores_cache_ttl {STORES_TTL:.0f} s)", f"{waited:.1f}", command("node_lacks"))
    assert waited >= STORES_TTL - 2
    assert proxy.count("POST", "/import$", image_id=image.id) == tries + 1


# ---------------------------------------------------------------- 4. a real Glance outage

OUTAGE = 45.0            # seconds glance-api stays stopped
LADDER = {"image_backoff_base": 0.5, "image_backoff_cap": 4.0,    # whole ladder: ~ 8 s
          "backoff_base": 1.0, "backoff_cap": 4.0}
LOCK_POLL = 2.0          # [copy] lock_poll_interval: how soon a cut-off import's task is read


def ladder_seconds() -> float:
    base, cap, total, step = LADDER["image_backoff_base"], LADDER["image_backoff_cap"], 0.0, 0
    while base * 2 ** step < cap:
        total += base * 2 ** step
        step += 1
    return total + cap


@pytest.fixture(scope="module")
def outage_box(private_sandbox):
    return private_sandbox()


def age_orphaned_tasks(box, ids) -> list[str]:
    """Imports cut off by the stop keep their lock for 60 minutes: age them as time would."""
    mine = ", ".join(f"'{i}'" for i in ids)
    tasks = box.sql(f"SELECT id FROM tasks WHERE status IN ('pending', 'processing') "
                    f"AND image_id IN ({mine})").split()
    for task in tasks:
        box.sql(f"UPDATE tasks SET updated_at = UTC_TIMESTAMP() - INTERVAL 2 HOUR "
                f"WHERE id = '{task}'")
    return tasks


def remove_partial_copies(box, ids) -> int:
    """Store files no location points at (a copy cut off by the stop): Glance refuses to copy
    over them, and an operator removes them. Returns how many there were."""
    mine = ", ".join(f"'{i}'" for i in ids)
    kept = set(box.sql(f"SELECT value FROM image_locations WHERE deleted = 0 "
                       f"AND image_id IN ({mine})").split())
    removed = 0
    for store in (Path(box.dir) / "glance" / "stores").iterdir():
        for image_id in ids:
            path = store / image_id
            if path.exists() and f"file://{path}" not in kept:
                path.unlink()
                removed += 1
    return removed


def copying_in_glance(box, ids) -> bool:
    """Glance is running an import of one of these images right now (its task is live)."""
    mine = ", ".join(f"'{i}'" for i in ids)
    return bool(box.sql(f"SELECT id FROM tasks WHERE status IN ('pending', 'processing') "
                        f"AND image_id IN ({mine})").strip())


@pytest.mark.full_only   # CI: the unit story test_an_outage_longer_than_every_backoff_fails_no_copy
def test_a_glance_outage_longer_than_the_whole_backoff_ladder_fails_no_copy(
        outage_box, images, prefix, tmp_path, figures):
    box = outage_box
    conn = connect(box)
    assert OUTAGE > 3 * ladder_seconds()
    # Given a daemon (through a proxy in front of HAProxy) copying images to slow and edge,
    # with short backoffs and max_attempts 1: a single attempt charged by the outage (an
    # import cut off, or refused while Glance was away) would fail a copy for good
    wanted = {"slow", "edge"}
    made = [images.upload(box, conn, 16 * MIB, f"{prefix}-{n}") for n in range(6)]
    ids = [i.id for i in made]
    with fault_proxy(box) as proxy:
        # the private sandbox's own RabbitMQ too: its Glance's notifications, not the shared one's
        d = Daemon(box, tmp_path / "outage", policy_for(prefix, wanted),
                   through(proxy, box, tmp_path, max_imports=4, max_imports_per_store=4,
                           max_attempts=1, lock_poll_interval=LOCK_POLL, **LADDER))
        d.start()
        wait_for(lambda: copying_in_glance(box, ids) and
                 d.query("SELECT 1 FROM copies WHERE state IN ('pending', 'retrying')"),
                 timeout=90, interval=0.02, message="an import running in Glance, copies to do")

        # When every Glance API node is stopped mid-copy for longer than the whole backoff
        # ladder (HAProxy stays: it answers 503 for them)
        box.stop_service("glance")
        down = proxy.now()
        time.sleep(OUTAGE)  # the outage itself: its length is the scenario
        during = proxy.requests(since=down)
        debris = remove_partial_copies(box, ids)
        orphans = age_orphaned_tasks(box, ids)
        box.start_service("glance")
        back = time.monotonic()
        assert d.proc.poll() is None, f"the daemon died during the outage:\n{d.tail()}"

        # Then every copy converges, none failed, and each used exactly one attempt
        took = wait_converged(conn, d, ids, wanted, timeout=180)
        failed = d.query("SELECT count(*) AS n FROM copies WHERE state = 'failed'")[0]["n"]
        converge = time.monotonic() - back
        rate = len(during) / OUTAGE
        per_image = max(Counter(r.image_id for r in during if r.image_id).values(), default=0)
        posts = sum(1 for r in during if r.method == "POST")
        figures("Glance outage through a proxy", f"failed copies after a {OUTAGE:.0f} s outage "
                f"(whole backoff ladder {ladder_seconds():.1f} s, max_attempts 1)", failed,
                command("outage_longer"))
        figures("Glance outage through a proxy", "imports cut off by the stop / imports "
                "refused while Glance was away", f"{len(orphans)} / {posts}",
                command("outage_longer"))
        figures("Glance outage through a proxy", "requests to the dead Glance per second",
                f"{rate:.2f}", command("outage_longer"))
        cap = LADDER["image_backoff_cap"]
        figures("Glance outage through a proxy", f"requests about one image during the "
                f"{OUTAGE:.0f} s outage (max; image_backoff_cap {cap:.0f} s)",
                per_image, command("outage_longer"))
        figures("Glance outage through a proxy", "seconds to converge after Glance returns",
                f"{converge:.1f} (slowest image {max(took.values()):.1f})",
                command("outage_longer"))
        figures("Glance outage through a proxy", "partial files the stop left, removed",
                debris, command("outage_longer"))
        assert failed == 0
        assert {r["attempts"] for r in d.query("SELECT attempts FROM copies")} == {1}
        # each image at most once per image_backoff_cap, and all work paused in between
        assert rate <= len(ids) / cap + 0.5, f"{len(during)} requests in {OUTAGE:.0f} s"
        assert per_image <= OUTAGE / cap + 3, per_image
        d.stop()   # before the proxy goes
    assert not proxy.errors, proxy.errors
