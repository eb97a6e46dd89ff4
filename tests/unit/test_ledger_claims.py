"""Claims: one copy-image import per image, and no store at its cap holding back the others.

On a real ledger file with an injected clock (`now`), with many rows: a rollout's backlog
to one busy store, and a burst of images that each need two stores under the default
caps (4 imports, 2 per store), followed import by import until every copy is done.
"""

from __future__ import annotations

import collections
import random

import pytest

from imagesync.ledger import SPLIT_AFTER, Ledger
from imagesync.model import Image
from imagesync.planner import Settings

T0 = 1_800_000_000.0
SETTINGS = Settings(max_attempts=4, backoff=lambda attempt: 100.0 * attempt, poll_interval=2.0)
DEFAULT_CAPS = (4, 2)   # [copy] max_imports, max_imports_per_store


def image_id(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-000000000000"


def image(n: int, stores=("fast",), size=100) -> Image:
    return Image(image_id(n), name=f"image-{n}", status="active", stores=frozenset(stores),
                 size=size, disk_format="raw")


@pytest.fixture
def ledger(tmp_path):
    handle = Ledger(tmp_path / "ledger.db")
    yield handle
    handle.close()


def plan(ledger, img: Image, *wanted: str, now: float):
    return ledger.record_visit(img.id, img, {s: ("rule",) for s in wanted}, {}, now, SETTINGS)


def claim(ledger, now, caps=DEFAULT_CAPS, limit=8, split_after=SPLIT_AFTER):
    return ledger.claim(now, caps[0], caps[1], 0, 0, limit, (), 1.0, split_after)


def test_a_backlog_to_a_store_at_its_cap_does_not_hold_back_copies_to_an_idle_store(ledger):
    # Given a rollout onto `new`: two imports in flight there (its cap), 300 older copies
    # waiting for it, and one image that only needs the idle store `edge`
    for n in range(300):
        plan(ledger, image(n), "new", now=T0 + n)
    assert len(claim(ledger, T0 + 400)) == 2
    plan(ledger, image(1000), "edge", now=T0 + 500)
    # When the executor claims
    claims = claim(ledger, T0 + 501)
    # Then the idle store's copy goes at once, and nothing more goes to `new`
    assert claims == [(image_id(1000), ["edge"], 100)]


def test_images_that_need_a_busy_store_and_an_idle_one_go_to_the_idle_one_after_the_bound(
        ledger):
    # Given `new` is at its cap, and 300 images need both `new` and `edge`
    for n in range(2):
        plan(ledger, image(n), "new", now=T0)
    claim(ledger, T0 + 1)
    for n in range(10, 310):
        plan(ledger, image(n), "new", "edge", now=T0 + 2)
    # While they have waited less than split_imports_after, they wait for `new` too
    assert claim(ledger, T0 + 2 + SPLIT_AFTER - 1) == []
    # Then the two oldest go to `edge` (its cap), and the rest wait for room there
    claims = claim(ledger, T0 + 2 + SPLIT_AFTER)
    assert claims == [(image_id(10), ["edge"], 100), (image_id(11), ["edge"], 100)]


def test_copies_of_one_image_whose_retries_come_due_apart_go_in_one_import(ledger):
    # Given an import to slow and edge failed, and jitter spread their retries 15 s apart
    plan(ledger, image(1), "slow", "edge", now=T0)
    ledger.submit(lambda ops: ops.x(
        "UPDATE copies SET state = 'retrying', attempts = 1, next_attempt_at = CASE store "
        "WHEN 'slow' THEN ? ELSE ? END", (T0 + 30, T0 + 45))).result(5)
    # When only slow's retry is due, nothing goes; when both are due, both go at once
    assert claim(ledger, T0 + 31) == []
    assert claim(ledger, T0 + 45) == [(image_id(1), ["edge", "slow"], 100)]


def test_a_copy_whose_sibling_retries_much_later_goes_alone_after_the_bound(ledger):
    plan(ledger, image(1), "slow", "edge", now=T0)
    ledger.submit(lambda ops: ops.x(
        "UPDATE copies SET state = 'retrying', attempts = 3, next_attempt_at = ? "
        "WHERE store = 'slow'", (T0 + 3600,))).result(5)
    assert claim(ledger, T0 + SPLIT_AFTER - 1) == []
    assert claim(ledger, T0 + SPLIT_AFTER) == [(image_id(1), ["edge"], 100)]


def test_a_claim_handed_back_keeps_its_place_in_the_queue(ledger):
    # Given image 1 waits longer than image 2, and its claim is handed back unsent
    plan(ledger, image(1), "slow", now=T0)
    plan(ledger, image(2), "slow", now=T0 + 10)
    assert claim(ledger, T0 + 20, caps=(1, 2)) == [(image_id(1), ["slow"], 100)]
    ledger.release_claim(image_id(1), ["slow"], T0 + 30)
    plan(ledger, image(1), "slow", now=T0 + 35)   # re-read, as after any hand-back
    # Then image 1 is still the first to go
    assert claim(ledger, T0 + 40, caps=(1, 2)) == [(image_id(1), ["slow"], 100)]


def burst(ledger, split_after: float, seed: int = 7) -> dict[str, list[list[str]]]:
    """16 images needing slow and edge, behind 4 that need only slow (so that per-store
    counts are uneven), under the default caps; each import takes 2-20 s. Every import
    is followed until all copies are done. Returns the imports sent, per image."""
    rng = random.Random(seed)
    for n in range(100, 104):
        plan(ledger, image(n), "slow", now=T0)
    for n in range(16):
        plan(ledger, image(n), "slow", "edge", now=T0 + 1)
    wanted = {image_id(n): ("slow",) for n in range(100, 104)}
    wanted.update({image_id(n): ("slow", "edge") for n in range(16)})
    stores = {i: {"fast"} for i in wanted}
    imports: dict[str, list[list[str]]] = collections.defaultdict(list)
    finishing: dict[str, tuple[float, list[str]]] = {}
    now = T0 + 2
    for _step in range(500):
        for image_id_, sent, _size in claim(ledger, now, limit=8 - len(finishing),
                                            split_after=split_after):
            imports[image_id_].append(sent)
            finishing[image_id_] = (now + rng.uniform(2, 20), sent)
        if not finishing:
            break
        now = min(t for t, _ in finishing.values())
        for done in [i for i, (t, _) in finishing.items() if t <= now]:
            stores[done] |= set(finishing.pop(done)[1])
            n = int(done[:8], 16)
            plan(ledger, image(n, stores=stores[done]), *wanted[done], now=now)
        now += 0.5   # the executor's next tick
    assert all(stores[i] == {"fast", *wanted[i]} for i in wanted), "not every copy was made"
    return {i: imports[i] for i in wanted if len(wanted[i]) == 2}


def test_a_burst_of_images_needing_two_stores_gets_one_import_per_image_at_default_caps(
        ledger):
    imports = burst(ledger, SPLIT_AFTER)
    assert {i: sent for i, sent in imports.items()} == {
        i: [["edge", "slow"]] for i in imports}
    assert sum(len(sent) for sent in imports.values()) / len(imports) == 1.0


def test_without_waiting_for_all_stores_the_same_burst_splits_images(tmp_path):
    # The behaviour before: send to the stores with room at once (split_imports_after = 0)
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        imports = burst(ledger, 0.0)
    finally:
        ledger.close()
    assert sum(len(sent) for sent in imports.values()) > len(imports)
