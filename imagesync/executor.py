"""The executor: visits images that need a look, sends copy-image imports, tracks them.

One loop thread decides; a small pool does the HTTP, one operation per image at
a time. Every decision is made by the planner inside the ledger's transaction;
this module only sequences Glance calls and ledger calls, and logs the outcome.
It never decides from a notification payload: it always re-reads the image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import structlog

from imagesync import planner
from imagesync.backoff import compute_backoff
from imagesync.errors import Action, Kind, classify_import_error
from imagesync.glance import Glance, GlanceError, GlanceUnavailable
from imagesync.ledger import LedgerError
from imagesync.planner import DONE, Settings

log = structlog.get_logger("imagesync.executor")


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


class Executor:
    def __init__(self, ledger, glance: Glance, policy: PolicyHolder, settings: Settings,
                 caps: Caps, dry_run: bool = False, workers: int = 8, clock=time.time,
                 metrics=None):
        self.ledger, self.glance, self.policy = ledger, glance, policy
        self.settings, self.caps, self.dry_run, self.clock = settings, caps, dry_run, clock
        self.metrics = metrics
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "imagesync-worker")
        self.workers = workers
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.glance_failures = 0
        self.ledger_failures = 0
        self.visits = self.polls = 0   # Glance GETs to plan, and to track our imports
        self.locks_seen: dict[tuple[str, str], tuple[float, float | None]] = {}
        self.paused_until = 0.0      # Glance or the ledger unusable: no work until then
        self.dispatch_paused_until = 0.0   # 403: no imports until then
        self.thread: threading.Thread | None = None

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
            self.wake.clear()  # before the tick: a poke during the tick must not be lost
            try:
                self._tick()
            except LedgerError as exc:
                self._ledger_down(exc)
            except Exception:  # the loop must survive anything; the ledger keeps the work
                log.exception("executor tick failed; retrying in 5 s")
                self.stopping.wait(5)
            self.wake.wait(self._sleep_time())

    def _sleep_time(self) -> float:
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        nxt = self.ledger.next_wakeup()
        return 1.0 if nxt is None else min(1.0, max(0.01, nxt - now))

    def _free(self) -> int:
        with self.busy_lock:
            return self.workers - len(self.busy)

    def _tick(self) -> None:
        now = self.clock()
        for action, image_id, n in self.ledger.process_requests(now):
            log.info("request taken", action=action, image_id=image_id, copies=n)
        if now < self.paused_until:
            return
        if not self.dry_run and now >= self.dispatch_paused_until and self._free() > 0:
            with self.busy_lock:
                busy = set(self.busy)
            claims = self.ledger.claim(now, self.caps.max_imports, self.caps.per_store,
                                       self.caps.max_bytes_in_flight,
                                       self.caps.max_bytes_per_hour, self._free(), busy,
                                       self.settings.poll_interval)
            for image_id, stores, size in claims:
                if not self._submit(image_id, self._import, image_id, stores, size):
                    self.ledger.release_claim(image_id, stores, self.clock())
        free = self._free()
        if free > 0:
            with self.busy_lock:
                busy = set(self.busy)
            for image_id in self.ledger.due_images(now, free, busy):
                self._submit(image_id, self._visit, image_id)

    def _submit(self, image_id: str, fn, *args) -> bool:
        with self.busy_lock:
            if image_id in self.busy:
                return False
            self.busy.add(image_id)

        def done(_future) -> None:
            with self.busy_lock:
                self.busy.discard(image_id)
            self.wake.set()

        self.pool.submit(self._guard, fn, *args).add_done_callback(done)
        return True

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
            self.ledger_failures = 0  # every operation ends with a ledger write
        except GlanceUnavailable as exc:
            try:
                self._glance_down(exc, args[0])
            except LedgerError as ledger_exc:
                self._ledger_down(ledger_exc)
        except LedgerError as exc:
            self._ledger_down(exc)
        except Exception:
            log.exception("operation failed", image_id=args[0], operation=fn.__name__)

    def _ledger_down(self, exc: LedgerError) -> None:
        """The ledger cannot be written (disk full, read-only): stop working, back off."""
        self.ledger_failures += 1
        delay = compute_backoff(self.ledger_failures, base=1.0, cap=60.0)
        self.paused_until = max(self.paused_until, self.clock() + delay)
        log.error("cannot write the ledger; pausing copies", error=str(exc),
                  retry_in=round(delay, 1))

    def _glance_down(self, exc: GlanceError, image_id: str) -> None:
        self.glance_failures += 1
        delay = compute_backoff(self.glance_failures, base=1.0, cap=60.0)
        now = self.clock()
        self.paused_until = max(self.paused_until, now + delay)
        self.ledger.record_visit_error(image_id, now + delay, now)
        log.warning("Glance unavailable; pausing", image_id=image_id, error=str(exc),
                    retry_in=round(delay, 1))

    # -- one image

    def _visit(self, image_id: str) -> None:
        image = self.glance.get_image(image_id)
        self.glance_failures = 0
        stores = self.glance.stores()
        desired, skipped = ({}, {}) if image is None else \
            planner.targets(self.policy.policy, image, stores)
        visit, before = self.ledger.record_visit(image_id, image, desired, skipped,
                                                 self.clock(), self.settings)
        if any(c.state == planner.IN_FLIGHT for c in before.values()):
            self.polls += 1   # tracking an import of ours, counted apart from planning
        else:
            self.visits += 1
        for store, copy in visit.changes.items():
            old = before.get(store)
            if old is None or old.state != copy.state:
                self._log_change(image_id, store, copy, old)
        if visit.foreign_lock:
            self._read_lock_task(image_id, visit.foreign_lock)

    def _read_lock_task(self, image_id: str, task_id: str | None) -> None:
        """Learn the status and age of the task holding an image's lock, once per lock_poll."""
        if not task_id:
            return
        now = self.clock()
        first_seen, last_read = self.locks_seen.get((image_id, task_id), (now, None))
        if last_read is not None and now - last_read < self.settings.lock_poll:
            return
        if len(self.locks_seen) > 10_000:  # forget locks long gone (bounded memory)
            self.locks_seen = {k: v for k, v in self.locks_seen.items()
                               if now - v[0] < 4 * self.settings.lock_expiry}
        self.locks_seen[(image_id, task_id)] = (first_seen, now)
        for task in self.glance.image_tasks(image_id):
            if task["id"] == task_id:
                self.ledger.record_lock_task(image_id, task_id, task["status"],
                                             task["updated_at"])
                log.info("image held by another import", image_id=image_id, task=task_id,
                         task_status=task["status"])
                return
        # Glance has no such task: its API died between taking the lock and saving the task.
        # Glance breaks such a lock on the next import request, whatever its age. But it takes
        # the lock a moment before it saves the task: only a lock seen for a while is orphaned.
        if now - first_seen < self.settings.settle_grace:
            self.locks_seen[(image_id, task_id)] = (first_seen, None)  # read again next visit
            return
        self.ledger.record_lock_task(image_id, task_id, "missing", None)
        log.warning("image locked by a task Glance does not have", image_id=image_id,
                    task=task_id)

    def _import(self, image_id: str, stores: list[str], size: int) -> None:
        log.info("copy-image sent", image_id=image_id, stores=stores, bytes=size)
        status, message = self.glance.copy_image(image_id, stores)
        now = self.clock()
        if status == 202:
            self.glance_failures = 0
            self.ledger.record_started(image_id, now + self.settings.poll_interval, now)
            if self.metrics:
                self.metrics.import_started(stores)
            return
        image = None
        if status in (400, 409):
            image = self.glance.get_image(image_id)
        live = None
        if status == 409:
            live = set(self.glance.stores(refresh=True))
        outcome = classify_import_error(status, message, image, stores, live)
        changes = self.ledger.record_outcome(image_id, stores, outcome, now, self.settings)
        if self.metrics:
            self.metrics.import_failed(outcome.kind.value)
        level = "error" if outcome.action == Action.BLOCK else "warning"
        getattr(log, level)("copy-image refused", image_id=image_id, stores=stores,
                            status=status, kind=outcome.kind.value, reason=outcome.message)
        if outcome.kind == Kind.FORBIDDEN:
            self.dispatch_paused_until = now + 300
        if status is None or (status and status >= 500):
            self._glance_down(GlanceUnavailable(status, message), image_id)
        for store, copy in changes.items():
            self._log_change(image_id, store, copy, None)

    def _log_change(self, image_id: str, store: str, copy, old) -> None:
        fields = dict(image_id=image_id, store=store, rule=",".join(copy.rules) or None,
                      state=copy.state)
        if copy.state == DONE:
            if old is not None and old.state == planner.IN_FLIGHT:
                log.info("copy done", attempts=copy.attempts, **fields)
            else:
                log.debug("already in store", **fields)
        elif copy.state in (planner.RETRYING, planner.FAILED):
            retry_in = round(copy.next_attempt_at - self.clock()) if copy.next_attempt_at else None
            getattr(log, "error" if copy.state == planner.FAILED else "warning")(
                "copy failed", attempts=copy.attempts, kind=copy.error_kind,
                reason=copy.error_message, retry_in=retry_in, **fields)
        elif copy.state == planner.CANCELLED:
            log.info("copy cancelled", reason=copy.error_message, **fields)
        elif copy.state == planner.PENDING and (old is None or old.state != planner.PENDING):
            log.info("copy planned", **fields)
        if self.metrics:
            self.metrics.copy_state(store, copy.state, old.state if old else None)
