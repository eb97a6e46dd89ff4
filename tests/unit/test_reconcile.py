"""The reconciler's listing: pages that survive a deleted marker, and stores filled in.

Glance is faked by a pager that answers as Glance 33 does (glance/api/v2/images.py index:
400 "No image found with ID ..." for a marker it cannot find); tests/functional/
test_multistore_upgrade.py does the same on the real sandbox. Pure and fast.
"""

from __future__ import annotations

import dataclasses

import pytest

from imagesync import reconcile
from imagesync.glance import GlanceError, GlanceUnavailable
from imagesync.model import Image


def images(*names: str, status: str = "active") -> list[Image]:
    return [Image(f"{n}-id", name=n, status=status, stores=frozenset({"fast"})) for n in names]


class Pager:
    """Glance's image list, newest first, paged by marker; `asked` keeps every marker."""

    def __init__(self, listed: list[Image], fail_markers: bool = False):
        self.listed = list(listed)
        self.asked: list[str | None] = []
        self.fail_markers = fail_markers

    def purge(self, *ids: str) -> None:
        self.listed = [i for i in self.listed if i.id not in ids]

    def image_page(self, marker, page_size=1000, hidden=False):
        self.asked.append(marker)
        ids = [i.id for i in self.listed]
        if marker is not None and (self.fail_markers or marker not in ids):
            raise GlanceError(400, f"No image found with ID {marker}")
        start = ids.index(marker) + 1 if marker else 0
        return self.listed[start:start + page_size], start + page_size < len(self.listed)


def listing(pager: Pager, page_size: int, after_page=None, resumes=None) -> list[list[str]]:
    """Every page's image ids; `after_page(ids)` runs between pages, like the reconciler's
    between_pages hook."""
    pages = []
    told = resumes.append if resumes is not None else None
    for page in reconcile.every_image(pager, page_size, on_resume=lambda *a: told and told(a)):
        pages.append([i.id for i in page])
        if after_page:
            after_page(pages[-1])
    return pages


def test_a_marker_deleted_between_pages_resumes_after_the_image_listed_before_it():
    pager = Pager(images("a", "b", "c", "d", "e", "f"))
    resumes: list = []

    def purge_marker(ids):
        if ids == ["a-id", "b-id"]:
            pager.purge("b-id")

    pages = listing(pager, 2, purge_marker, resumes)

    assert pages == [["a-id", "b-id"], ["c-id", "d-id"], ["e-id", "f-id"]]
    assert pager.asked == [None, "b-id", "a-id", "d-id"]  # one refused request, no restart
    assert resumes == [("b-id", "a-id", "HTTP 400: No image found with ID b-id")]


def test_a_whole_page_deleted_resumes_from_the_top_without_giving_an_image_twice():
    pager = Pager(images("a", "b", "c", "d", "e"))

    def purge_page(ids):
        if ids == ["a-id", "b-id"]:
            pager.purge("a-id", "b-id")

    pages = listing(pager, 2, purge_page)

    assert pages == [["a-id", "b-id"], ["c-id", "d-id"], ["e-id"]]
    assert pager.asked == [None, "b-id", "a-id", None, "d-id"]


def test_every_image_is_given_once_when_markers_keep_vanishing():
    pager = Pager(images(*"abcdefghij"))
    seen: list[str] = []

    def purge_every_marker(ids):
        seen.extend(ids)
        pager.purge(ids[-1])

    listing(pager, 3, purge_every_marker)

    assert sorted(seen) == sorted(f"{n}-id" for n in "abcdefghij")
    assert len(seen) == len(set(seen))


def test_a_refused_first_page_and_other_errors_are_not_taken_for_a_deleted_marker():
    asked = []

    def bad_request(marker, size, hidden):
        asked.append(marker)
        raise GlanceError(400, "Invalid sort key")

    pager = Pager(images("a"))
    pager.image_page = bad_request
    with pytest.raises(GlanceError):
        listing(pager, 2)
    assert asked == [None]  # no marker to step back from: not retried

    pager = Pager(images("a", "b", "c"))
    real = pager.image_page

    def unavailable_after_the_first(marker, size, hidden):
        if marker:
            raise GlanceUnavailable(503, "unavailable")
        return real(marker, size, hidden)

    pager.image_page = unavailable_after_the_first
    with pytest.raises(GlanceUnavailable):
        listing(pager, 2)


def test_resuming_is_bounded_when_glance_refuses_every_marker():
    pager = Pager(images(*"abcdef"), fail_markers=True)

    with pytest.raises(GlanceError) as refused:
        listing(pager, 1)

    assert refused.value.status == 400
    assert len(pager.asked) <= 2 * reconcile.MAX_RESUMES + 2


class Reader:
    """get_image as Glance answers it: the image with its stores, None when gone."""

    def __init__(self, answers: dict):
        self.answers, self.gets = answers, []

    def get_image(self, image_id):
        self.gets.append(image_id)
        answer = self.answers.get(image_id)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_images_listed_in_no_store_are_read_once_and_others_never():
    settled, legacy, gone, queued = images("settled", "legacy", "gone") + images(
        "queued", status="queued")
    legacy_listed = dataclasses.replace(legacy, stores=frozenset())
    gone_listed = dataclasses.replace(gone, stores=frozenset())
    queued = dataclasses.replace(queued, stores=frozenset())
    reader = Reader({legacy.id: legacy, gone.id: None})

    page = reconcile.fill_in_stores(reader, [settled, legacy_listed, gone_listed, queued])

    assert page == [settled, legacy, queued]  # the deleted one left out
    assert reader.gets == [legacy.id, gone.id]


def test_a_failed_read_keeps_the_listed_image_for_the_reconciler_and_stops_plan():
    legacy = dataclasses.replace(images("legacy")[0], stores=frozenset())
    reader = Reader({legacy.id: GlanceError(429, "Too Many Requests")})

    assert reconcile.fill_in_stores(reader, [legacy]) == [legacy]
    with pytest.raises(GlanceError):
        reconcile.fill_in_stores(reader, [legacy], strict=True)


def test_a_pass_failing_while_glance_is_down_is_tried_again_within_a_minute():
    # Given a reconciler whose passes fail (Keystone or Glance down) eight times, then work
    r = reconcile.Reconciler(ledger=None, glance=None, policy=None, interval=0)
    results = [GlanceUnavailable(503, "Keystone failed: ServiceUnavailable")] * 8 + [None]
    waits: list[float] = []

    def run_pass():
        result = results.pop(0)
        if result is not None:
            raise result
        return {}

    r.run_pass = run_pass            # type: ignore[method-assign]
    r.stopping.wait = lambda delay: waits.append(delay) or False   # type: ignore[method-assign]
    r.run()
    # Then it waited on a growing backoff, never more than a minute (and its jitter) between
    # tries, so the first pass after an outage comes soon after its end
    assert len(waits) == 8 and not results
    assert waits[0] < waits[2] < waits[4]
    assert max(waits) <= reconcile.RETRY_CAP * 1.25
    assert min(waits[5:]) >= reconcile.RETRY_CAP * 0.75
