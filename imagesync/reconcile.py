"""The reconciler: a periodic full pass over every image, because notifications get lost.

Pages through all images (visibility=all, then the hidden ones), asks the policy
what each wants, and lets the ledger mark the images whose copies disagree for a
visit. It sends no imports itself. Ticks missed while a pass ran are skipped.
`every_image` and `fill_in_stores` are the listing `imagesync plan` uses too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import structlog

from imagesync import planner
from imagesync.backoff import compute_backoff
from imagesync.glance import GlanceError, with_members
from imagesync.ledger import LedgerError
from imagesync.model import Image

log = structlog.get_logger("imagesync.reconcile")
STEPS_BACK = 3       # markers tried backwards from a deleted one before listing from the top
MAX_RESUMES = 100    # deleted markers one listing survives (each costs a request or a page)
# A failed pass (Glance, Keystone or the ledger down) is tried again on a backoff capped at a
# minute: the first pass after an outage comes within a minute of its end. (It was 300 s: a
# daemon started during a Keystone outage made its first pass minutes after Keystone was back.)
RETRY_BASE, RETRY_CAP = 10.0, 60.0


def every_image(glance, page_size: int, hidden: bool = False,
                on_resume: Callable[[str, str | None, str], None] | None = None,
                ) -> Iterator[list[Image]]:
    """Every image once, a page at a time, even when a page's marker is deleted meanwhile.

    Glance pages with `marker` = the last image of the previous page, and answers 400 when
    it cannot find that image any more (purged, or hidden from these credentials). The
    listing then resumes after the image listed before it (up to STEPS_BACK of them), or
    else from the top, leaving out the images this listing already gave.
    `on_resume(gone marker, new marker or None, Glance's error)` is told each time.
    """
    served: list[str] = []  # ids in listing order; a deleted marker is dropped from it
    seen: set[str] = set()
    marker, resumes, back = None, 0, 0
    while True:
        try:
            page, more = glance.image_page(marker, page_size, hidden)
        except GlanceError as exc:
            if exc.status != 400 or marker is None or resumes >= MAX_RESUMES:
                raise
            resumes, back = resumes + 1, back + 1
            gone, marker = marker, _step_back(served, marker, back)
            if on_resume:
                on_resume(gone, marker, str(exc))
            continue
        back = 0
        fresh = [i for i in page if i.id not in seen]
        seen.update(i.id for i in fresh)
        served.extend(i.id for i in fresh)
        if fresh:
            yield fresh
        if not more or not page:
            return
        marker = page[-1].id


def _step_back(served: list[str], gone: str, back: int) -> str | None:
    """The marker to resume after once `gone` was refused: the image listed before it, or
    None (the top) after STEPS_BACK refusals in a row."""
    index = served.index(gone) if gone in served else len(served)
    if gone in served:
        served.remove(gone)
    if back > STEPS_BACK or index == 0:
        return None
    return served[index - 1]


def _log_resume(gone: str, marker: str | None, error: str) -> None:
    log.info("listing marker gone; resuming", marker=gone,
             resume_after=marker or "the first page", error=error)


def fill_in_stores(glance, page: list[Image], strict: bool = False) -> list[Image]:
    """The page with the stores of images whose locations predate multi-store filled in.

    Glance lists no `stores` for a location written before multi-store (no store id in
    its metadata); a GET of the image fills the id in (glance/location.py,
    update_store_in_locations) and saves it. So an active image listed in no store is
    read once more. Deleted meanwhile: left out. A failed GET raises when `strict`, else
    keeps the listed image (the ledger then asks for a visit, which reads it again).
    """
    out = []
    for image in page:
        if image.status == "active" and not image.stores:
            try:
                fresh = glance.get_image(image.id)
            except GlanceError as exc:
                if strict:
                    raise
                log.warning("cannot read an image listed in no store", image_id=image.id,
                            error=str(exc))
                fresh = image
            if fresh is None:
                continue
            image = fresh
        out.append(image)
    return out


class Reconciler:
    def __init__(self, ledger, glance, policy, interval: float, page_size: int = 1000,
                 clock=time.time, on_change=None, metrics=None,
                 between_pages: Callable[[list[Image]], None] | None = None):
        """`between_pages(page)`: called after each page is recorded, before the next is
        asked for (tests use it to change Glance mid-listing)."""
        self.ledger, self.glance, self.policy = ledger, glance, policy
        self.interval, self.page_size, self.clock = interval, page_size, clock
        self.on_change, self.metrics = on_change, metrics
        self.between_pages = between_pages
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def run_pass(self) -> dict:
        """One full pass; returns figures (images, marked, pages, seconds)."""
        started = self.clock()
        t0 = time.monotonic()
        stores = self.glance.stores(refresh=True)
        policy = self.policy.policy
        images = marked = trusted = pages = 0
        for hidden in (False, True):
            for listed in every_image(self.glance, self.page_size, hidden, _log_resume):
                pages += 1
                page = fill_in_stores(self.glance, listed)
                items = []
                for image in page:
                    image = with_members(self.glance, image, policy)
                    desired, skipped = planner.targets(policy, image, stores, now=started)
                    items.append((image, desired, skipped))
                images += len(items)
                done = self.ledger.reconcile_page(items, self.clock())
                marked += done.marked
                trusted += done.trusted
                if marked and self.on_change:
                    self.on_change()
                if self.stopping.is_set():
                    return {"images": images, "marked": marked, "pages": pages, "aborted": True}
                if self.between_pages:
                    self.between_pages(listed)
        seconds = time.monotonic() - t0
        gone = self.ledger.reconcile_finish(started, self.clock(), seconds)
        figures = {"images": images, "marked": marked + gone, "settled_from_listing": trusted,
                   "pages": pages, "seconds": round(seconds, 3)}
        if self.metrics:
            self.metrics.reconciled(seconds, self.clock())
        log.info("reconcile pass done", **figures)
        if (marked or gone) and self.on_change:
            self.on_change()
        return figures

    def run(self) -> None:
        """First pass now, then every `interval` seconds on a fixed grid; missed ticks skip."""
        first = time.monotonic()
        tick = 0
        failures = 0
        while not self.stopping.is_set():
            try:
                self.run_pass()
                failures = 0
            except (GlanceError, LedgerError) as exc:  # Glance or the ledger down: try again
                failures += 1
                delay = compute_backoff(failures, base=RETRY_BASE, cap=RETRY_CAP)
                log.warning("reconcile pass failed; will try again", error=str(exc),
                            retry_in=round(delay, 1))
                if self.stopping.wait(delay):
                    return
                continue
            except Exception:
                log.exception("reconcile pass crashed; will try at the next tick")
            if self.interval <= 0:
                return
            elapsed = time.monotonic() - first
            tick = max(tick + 1, int(elapsed // self.interval) + 1)
            self.stopping.wait(first + tick * self.interval - time.monotonic())

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="imagesync-reconcile", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread:
            self.thread.join(30)
