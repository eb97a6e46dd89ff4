"""The executor: one loop decides which image to look at and which copies to send, and when;
a pool runs the operations (imagesync.operations), one per image, within each image's request
discipline, and all work pauses while Glance, Keystone or the ledger is unusable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import structlog

from imagesync.backoff import compute_backoff
from imagesync.discipline import IMPORT, LOOK, Discipline
from imagesync.glance import (
    CredentialsRejected,
    Glance,
    GlanceError,
    GlanceUnavailable,
    KeystoneUnavailable,
)
from imagesync.health import Heartbeat
from imagesync.ledger import RETRY_CAP, LedgerError
from imagesync.operations import ImageOperations, describe
from imagesync.planner import Settings

log = structlog.get_logger("imagesync.executor")

PAUSE_BASE, PAUSE_CAP = 1.0, 60.0   # seconds: all work pauses while Glance or Keystone is down


@dataclasses.dataclass(frozen=True)
class Caps:
    max_imports: int = 4
    per_store: int = 2
    max_bytes_in_flight: int = 0
    max_bytes_per_hour: int = 0


class PolicyHolder:
    """The policy in force; swapped whole, read without locks."""

    def __init__(self, policy):
        self.policy = policy


class Executor(ImageOperations):
    def __init__(self, ledger, glance: Glance, policy: PolicyHolder, settings: Settings,
                 caps: Caps, dry_run: bool = False, workers: int = 8, clock=time.time,
                 metrics=None, discipline: Discipline | None = None, may_import=None,
                 owner_quota=None):
        self.ledger, self.glance, self.policy = ledger, glance, policy
        self.owner_quota = owner_quota   # imagesync.limits.OwnerQuota: checked before a POST
        # Fencing: with several controllers, no import unless this daemon's claim holds.
        self.may_import = may_import or (lambda: True)
        self.fenced = 0   # imports held back because the claim may have lapsed
        self.resent = 0   # imports sent again at once: an API node lacked a store
        ttl = getattr(glance, "stores_ttl", None)   # blocked copies wait for its next refresh
        if ttl is not None:
            settings = dataclasses.replace(settings, store_list_ttl=ttl)
        self.settings, self.caps, self.dry_run, self.clock = settings, caps, dry_run, clock
        self.metrics = metrics
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "imagesync-worker")
        self.workers = workers
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.glance_failures = 0     # answers about Glance as a whole since its last real one
        self.failing_images: set[str] = set()   # ... and the images they were about
        self.ledger_failures = 0
        self.visits = self.polls = 0   # Glance GETs to plan, and to track our imports
        self.locks_seen: dict[tuple[str, str], tuple[float, float | None]] = {}
        self.paused_until = 0.0      # Glance or the ledger unusable: no work until then
        self.dispatch_paused_until = 0.0   # 403: no imports until then
        self.thread: threading.Thread | None = None
        self.heartbeat = Heartbeat("executor")  # beaten every loop, and while it waits
        rate = getattr(getattr(glance, "limiter", None), "rate", 20.0)
        self.discipline = discipline or Discipline(
            rate, settings.image_request_share, settings.image_backoff_base,
            settings.image_backoff_cap)
        self.pause_cap = min(PAUSE_CAP, max(settings.image_backoff_cap, PAUSE_BASE))

    # -- lifecycle

    def start(self) -> None:
        try:
            self.ledger.recover(self.clock())
        except LedgerError as exc:  # copies in flight are re-checked at the next start
            log.error("cannot mark copies in flight for re-checking", error=str(exc))
        self.thread = threading.Thread(target=self.run, name="imagesync-executor", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.thread:
            self.thread.join(30)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def poke(self) -> None:
        """Something changed in the ledger (events, requests): look now."""
        self.wake.set()

    # -- the loop

    def run(self) -> None:
        while not self.stopping.is_set():
            self.heartbeat.beat()
            self.wake.clear()  # before the tick: a poke during the tick must not be lost
            try:
                self._tick()
            except LedgerError as exc:
                self._ledger_down(exc)
            except Exception:  # the loop must survive anything; the ledger keeps the work
                log.exception("executor tick failed; retrying in 5 s")
                self.heartbeat.wait(self.stopping, 5)
            self.heartbeat.wait(self.wake, self._sleep_time())  # a pause is alive: it beats

    def _sleep_time(self) -> float:
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        nxt = self.ledger.next_wakeup()
        return 1.0 if nxt is None else min(1.0, max(0.01, nxt - now))

    def _free(self) -> int:
        with self.busy_lock:
            return self.workers - len(self.busy)

    def _busy(self) -> set[str]:
        with self.busy_lock:
            return set(self.busy)

    def _tick(self) -> None:
        now = self.clock()
        for action, image_id, n in self.ledger.process_requests(now):
            log.info("request taken", action=action, image_id=image_id, copies=n)
        if now < self.paused_until:
            return
        if not self.dry_run and now >= self.dispatch_paused_until and self._free() > 0:
            held = self._busy() | self.discipline.held(now)   # no import for those
            claims = self.ledger.claim(now, self.caps.max_imports, self.caps.per_store,
                                       self.caps.max_bytes_in_flight,
                                       self.caps.max_bytes_per_hour, self._free(), held,
                                       self.settings.poll_interval)
            for image_id, stores, size in claims:
                if not self._submit(image_id, IMPORT, self._import, stores, size):
                    self.ledger.release_claim(image_id, stores, self.clock())
        free = self._free()
        if free > 0:
            for image_id in self.ledger.due_images(now, free, self._busy()):
                wait = self.discipline.wait(image_id, now)
                if wait > 0:   # in trouble, or over its share of requests: look later
                    self.ledger.record_visit_error(image_id, now + wait, now)
                else:
                    self._submit(image_id, LOOK, self._visit)

    def _submit(self, image_id: str, kind: str, fn, *args) -> bool:
        with self.busy_lock:
            if image_id in self.busy:
                return False
            self.busy.add(image_id)

        def done(_future) -> None:
            with self.busy_lock:
                self.busy.discard(image_id)
            self.wake.set()

        self.pool.submit(self._guard, kind, fn, image_id, *args).add_done_callback(done)
        return True

    def _guard(self, kind: str, fn, image_id: str, *args) -> None:
        """Run one operation on one image; whatever goes wrong, the image backs off."""
        before = self.glance.requests_here()
        try:
            fn(image_id, *args)
            self.ledger_failures = 0  # every operation ends with a ledger write
        except LedgerError as exc:
            self._ledger_down(exc)
        except Exception as exc:  # GlanceError, or a bug (its traceback logged once)
            try:
                delay = self._note_trouble(image_id, exc, kind)
                self.ledger.record_visit_error(image_id, self.clock() + delay, self.clock())
            except LedgerError as ledger_exc:
                self._ledger_down(ledger_exc)
        finally:
            self.discipline.spent(image_id, self.clock(), self.glance.requests_here() - before)

    def _note_trouble(self, image_id: str, exc: Exception, kind: str) -> float:
        """No real answer about this image: the seconds to leave it alone. Logs once when the
        image enters trouble (and once when it leaves, in _answered), not per request; pauses
        all work when the answer would be the same for every image."""
        what = describe(exc)
        # An answer about Glance as a whole (down, refusing our credentials) pauses all work;
        # the image's own wait stays within that pause's cap, so it is back soon after Glance.
        whole = exc if isinstance(exc, (GlanceUnavailable, CredentialsRejected)) else None
        delay, entered = self.discipline.failed(image_id, self.clock(), what,
                                                getattr(exc, "retry_after", None), kind,
                                                cap=self.pause_cap if whole else None)
        fields = dict(image_id=image_id, request=kind, answer=what, retry_in=round(delay, 1))
        if not isinstance(exc, GlanceError):
            fields["exc_info"] = exc   # a bug: its traceback, once
        if entered:
            log.warning("image in trouble: not asked about again for a while", **fields)
        else:
            log.debug("image still in trouble", **fields)
        if whole is not None:
            self._pause(whole, image_id)
        return delay

    def _answered(self, image_id: str, kind: str) -> None:
        """A real answer about this image (a success, a 404, a refusal that says something)."""
        left = self.discipline.succeeded(image_id, kind)
        if left is not None:
            log.info("image out of trouble", image_id=image_id, request=kind,
                     failures=left.failures, seconds=round(self.clock() - left.since, 1),
                     last_answer=left.last)
        if self.glance_failures:
            if len(self.failing_images) > 1:
                log.info("Glance answers again", failures=self.glance_failures)
            self.glance_failures, self.failing_images = 0, set()

    def _ledger_down(self, exc: LedgerError) -> None:
        """The ledger cannot be written (disk full, read-only): stop working, back off."""
        self.ledger_failures += 1
        delay = compute_backoff(self.ledger_failures, base=1.0, cap=RETRY_CAP)
        self.paused_until = max(self.paused_until, self.clock() + delay)
        log.error("cannot write the ledger; pausing copies", error=str(exc),
                  retry_in=round(delay, 1))

    def _pause(self, exc: GlanceError, image_id: str) -> None:
        """Glance or Keystone is down, or refuses our credentials: every image would get the
        same answer, so no work at all for a growing pause. Said of Glance only once two
        images got such an answer in a row: one image alone (a 503 for its URL only) has its
        own backoff, and must not stop the work on the others.

        An answer that comes while the work is paused is to a request sent before the pause
        (none are sent during one): it says nothing new, and must not climb the ladder. Five
        requests out when a pause ends, all refused at once, are one failure, not five (seen:
        a 20 s outage paused the work for 67 s after Glance was back)."""
        self.failing_images.add(image_id)
        if self.clock() < self.paused_until:
            return
        self.glance_failures += 1
        keystone = isinstance(exc, KeystoneUnavailable) or \
            (isinstance(exc, CredentialsRejected) and exc.status is None)
        if len(self.failing_images) < 2 and not keystone:
            return
        delay = compute_backoff(self.glance_failures, base=PAUSE_BASE, cap=self.pause_cap)
        self.paused_until = max(self.paused_until, self.clock() + delay)
        event = ("Keystone unavailable; pausing" if isinstance(exc, KeystoneUnavailable) else
                 "credentials rejected; pausing" if isinstance(exc, CredentialsRejected) else
                 "Glance unavailable; pausing")
        log.warning(event, error=str(exc), retry_in=round(delay, 1))
