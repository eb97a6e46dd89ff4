"""One image at a time: a visit (GET, plan, record) and an import (POST, and what its answer
means, including no answer at all). Mixed into the Executor, which runs these operations in
its pool, one per image, within the image's request discipline; no scheduling here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import structlog

from imagesync import planner
from imagesync.discipline import IMPORT, LOOK, Discipline
from imagesync.errors import Action, Kind, Outcome, classify_import_error
from imagesync.glance import (
    STORE_READS,
    CredentialsRejected,
    Glance,
    GlanceError,
    GlanceUnavailable,
    with_members,
)
from imagesync.planner import DONE, Settings

log = structlog.get_logger("imagesync.executor")

NO_ANSWER_KINDS = frozenset({Kind.TRANSIENT.value, Kind.UNAUTHORIZED.value})


def describe(exc: BaseException) -> str:
    """What went wrong, in a few words, for the log and the ledger (never a secret)."""
    if isinstance(exc, GlanceError):
        return str(exc)[:300]
    return f"unexpected {type(exc).__name__}: {str(exc)[:200]}"


class ImageOperations:
    """The Executor's work on one image. Expects the attributes and methods declared here."""

    ledger: Any            # imagesync.ledger.Ledger (its operations run in its writer)
    glance: Glance
    policy: Any            # imagesync.executor.PolicyHolder
    settings: Settings
    metrics: Any
    clock: Callable[[], float]
    discipline: Discipline
    visits: int
    polls: int
    locks_seen: dict[tuple[str, str], tuple[float, float | None]]
    dispatch_paused_until: float
    may_import: Callable[[], bool]
    fenced: int
    resent: int
    owner_quota: Any       # imagesync.limits.OwnerQuota, or None: no owner-quota check

    def _answered(self, image_id: str, kind: str) -> None:
        raise NotImplementedError

    def _note_trouble(self, image_id: str, exc: Exception, kind: str) -> float:
        raise NotImplementedError

    def _visit(self, image_id: str) -> None:
        asked_at = self.clock()
        image = self.glance.get_image(image_id)
        if image is not None:
            image = with_members(self.glance, image, self.policy.policy)
        stores = self.glance.stores()
        self._answered(image_id, LOOK)
        desired, skipped = ({}, {}) if image is None else \
            planner.targets(self.policy.policy, image, stores, now=asked_at)
        visit, before = self.ledger.record_visit(image_id, image, desired, skipped,
                                                 self.clock(), self.settings, asked_at)
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
        if not self.may_import():
            # Another controller may be active by now: send nothing, use no attempt.
            self.fenced += 1
            log.warning("import held back: this daemon's claim to be active may have lapsed",
                        image_id=image_id, stores=stores)
            outcome = Outcome(Kind.TRANSIENT, Action.BACKOFF,
                              "not the active imagesync (coordination claim lapsed)")
            self._record(image_id, stores, outcome, self.clock())
            return
        if self.owner_quota is not None:
            stores = self._within_owner_quota(image_id, stores, size)
            if not stores:
                return
        log.info("copy-image sent", image_id=image_id, stores=stores, bytes=size)
        try:
            status, message = self.glance.copy_image(image_id, stores)
        except GlanceError as exc:
            self._unanswered(image_id, stores, exc)
            return
        now = self.clock()
        self._answered(image_id, IMPORT)
        if status == 202:
            self._started(image_id, stores, now + self.settings.poll_interval, now)
            return
        try:   # classified by the image's state, never by Glance's message text
            image = self.glance.get_image(image_id) if status in (400, 409) else None
            live = set(self.glance.stores(refresh=True)) if status == 409 else None
        except GlanceError as exc:
            why = f"Glance answered {status} and could not be asked why: {describe(exc)}"
            outcome = Outcome(Kind.TRANSIENT, Action.BACKOFF, why, status)
            self._record(image_id, stores, self._backed_off(image_id, exc, outcome), now)
            return
        outcome = classify_import_error(status, message, image, stores, live)
        if outcome.kind == Kind.UNKNOWN_STORE and live is not None and set(stores) <= live \
                and self._resent_to_another_node(image_id, stores):
            return
        self._record(image_id, stores, outcome, now)

    def _within_owner_quota(self, image_id: str, stores: list[str], size: int) -> list[str]:
        """The stores whose copies fit in the image owner's quota; the others are held (no
        attempt used, re-checked every quota_recheck). When the limit or the usage cannot
        be read, none: the copy waits, it is never sent unchecked."""
        owner, in_flight = self.ledger.owner_in_flight(image_id)
        try:
            decision = self.owner_quota.decide(owner, stores, size, in_flight)
        except GlanceError as exc:
            outcome = Outcome(Kind.TRANSIENT, Action.BACKOFF,
                              f"owner quota unknown: {describe(exc)}", exc.status)
            self._record(image_id, stores, self._backed_off(image_id, exc, outcome),
                         self.clock())
            return []
        if decision.held:
            log.warning("copy held: the owner's quota has no room", image_id=image_id,
                        owner=owner, stores=list(decision.held), reason=decision.reason)
            self._record(image_id, list(decision.held),
                         Outcome(Kind.OWNER_QUOTA, Action.HOLD, decision.reason or ""),
                         self.clock())
        return list(decision.go)

    def _resent_to_another_node(self, image_id: str, stores: list[str]) -> bool:
        """An active, unlocked image got 409 for stores the store list names: the API node
        that answered lacks one (their enabled_backends differ). That 409 means Glance did
        nothing, so the POST is sent again at once, back to back, up to STORE_READS times: a
        load balancer sends each to the next node, whatever the parity of the requests in
        between (strict round robin with no other traffic would otherwise send every retry
        to the same node). True when one was accepted (then tracked as started)."""
        for _ in range(STORE_READS):
            self.resent += 1
            log.info("copy-image sent again: an API node lacks a store", image_id=image_id,
                     stores=stores)
            try:
                status, _message = self.glance.copy_image(image_id, stores)
            except GlanceError:
                return False   # the 409 is recorded; the next visit looks at the image first
            if status != 409:
                break
        else:
            return False
        if status != 202:
            return False
        now = self.clock()
        self._started(image_id, stores, now + self.settings.poll_interval, now)
        return True

    def _unanswered(self, image_id: str, stores: list[str], exc: GlanceError) -> None:
        """No real answer to the POST. When it may have reached Glance (the connection dropped
        after it was sent, or timed out), look at the image before anything else: its lock
        says whether Glance took the import. Never a blind second import."""
        if isinstance(exc, GlanceUnavailable) and exc.maybe_sent and \
                self._glance_took_it(image_id, stores, exc):
            return
        status = 401 if isinstance(exc, CredentialsRejected) else exc.status
        outcome = classify_import_error(status, exc.message, None, stores, None)
        if outcome.kind == Kind.UNAUTHORIZED:
            outcome = dataclasses.replace(outcome, message=exc.message[:300])
        self._record(image_id, stores, self._backed_off(image_id, exc, outcome), self.clock())

    def _glance_took_it(self, image_id: str, stores: list[str], exc: GlanceError) -> bool:
        try:
            image = self.glance.get_image(image_id)
        except GlanceError:
            # Cannot tell. The copies back off; if Glance did take the import, the next look
            # shows its lock, and no import is sent while an image is locked.
            return False
        now = self.clock()
        if image is None:
            self._record(image_id, stores, classify_import_error(404, "", None, stores, None),
                         now)
            return True
        took = bool(image.import_task) or set(stores) <= image.stores
        log.warning("copy-image answer lost", image_id=image_id, stores=stores,
                    error=exc.message, glance_took_it=took, lock=image.import_task)
        if took:   # ours, in flight (or done already): track it from now on
            self._answered(image_id, IMPORT)
            self._started(image_id, stores, now, now)
        return took

    def _started(self, image_id: str, stores: list[str], look_at: float, now: float) -> None:
        """Glance took our import: track it (first poll at `look_at`) and count it."""
        self.ledger.record_started(image_id, look_at, now)
        if self.metrics:
            self.metrics.import_started(stores)

    def _backed_off(self, image_id: str, exc: Exception, outcome: Outcome) -> Outcome:
        """The outcome, waiting out the image's import backoff (and pausing all work when
        Glance or Keystone is down)."""
        if outcome.action != Action.BACKOFF:
            return outcome
        return dataclasses.replace(outcome, delay=self._note_trouble(image_id, exc, IMPORT))

    def _record(self, image_id: str, stores: list[str], outcome: Outcome, now: float) -> None:
        changes = self.ledger.record_outcome(image_id, stores, outcome, now, self.settings)
        if self.metrics:
            if outcome.action == Action.HOLD:
                self.metrics.copies_held(stores)
            else:
                self.metrics.import_failed(outcome.kind.value)
        if outcome.action != Action.BACKOFF:   # those are logged as the image's trouble
            level = "error" if outcome.action == Action.BLOCK else "warning"
            getattr(log, level)("copy-image refused", image_id=image_id, stores=stores,
                                status=outcome.status, kind=outcome.kind.value,
                                reason=outcome.message)
        if outcome.kind == Kind.FORBIDDEN:
            self.dispatch_paused_until = now + 300
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
            level = "error" if copy.state == planner.FAILED else \
                "debug" if copy.error_kind in NO_ANSWER_KINDS else "warning"
            getattr(log, level)("copy failed", attempts=copy.attempts, kind=copy.error_kind,
                                reason=copy.error_message, retry_in=retry_in, **fields)
        elif copy.state == planner.CANCELLED:
            log.info("copy cancelled", reason=copy.error_message, **fields)
        elif copy.state == planner.PENDING and (old is None or old.state != planner.PENDING):
            log.info("copy planned", **fields)
        if self.metrics:
            self.metrics.copy_state(store, copy.state, old.state if old else None)
