"""The reconciler: a periodic full pass over every image, because notifications get lost.

Pages through all images (visibility=all, then the hidden ones), asks the policy
what each wants, and lets the ledger mark the images whose copies disagree for a
visit. It sends no imports itself. Ticks missed while a pass ran are skipped.
"""

from __future__ import annotations

import threading
import time

import structlog

from imagesync import planner
from imagesync.glance import GlanceError

log = structlog.get_logger("imagesync.reconcile")


class Reconciler:
    def __init__(self, ledger, glance, policy, interval: float, page_size: int = 1000,
                 clock=time.time, on_change=None, metrics=None):
        self.ledger, self.glance, self.policy = ledger, glance, policy
        self.interval, self.page_size, self.clock = interval, page_size, clock
        self.on_change, self.metrics = on_change, metrics
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def run_pass(self) -> dict:
        """One full pass; returns figures (images, marked, pages, seconds)."""
        started = self.clock()
        t0 = time.monotonic()
        stores = self.glance.stores(refresh=True)
        policy = self.policy.policy
        images = marked = pages = 0
        for hidden in (False, True):
            for page in self.glance.list_pages(self.page_size, hidden=hidden):
                pages += 1
                items = []
                for image in page:
                    desired, skipped = planner.targets(policy, image, stores)
                    items.append((image, desired, skipped))
                images += len(items)
                marked += self.ledger.reconcile_page(items, self.clock())
                if marked and self.on_change:
                    self.on_change()
                if self.stopping.is_set():
                    return {"images": images, "marked": marked, "pages": pages, "aborted": True}
        seconds = time.monotonic() - t0
        gone = self.ledger.reconcile_finish(started, self.clock(), seconds)
        figures = {"images": images, "marked": marked + gone, "pages": pages,
                   "seconds": round(seconds, 3)}
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
            except GlanceError as exc:
                failures += 1
                delay = min(300.0, 10.0 * 2 ** (failures - 1))
                log.warning("reconcile pass failed; will try again", error=str(exc),
                            retry_in=delay)
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
