"""Planning: what each copy of one image should become, given Glance's view and the ledger's.

Pure functions over plain data (no I/O, no clock: `now` is passed in). The ledger
applies what they return inside one transaction; the executor does the HTTP.
The rule: desired (policy) - current (`stores`) - being imported
(`os_glance_importing_to_stores`) - in flight in the ledger = what to copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from imagesync.errors import Action, Kind, Outcome
from imagesync.model import STORE_TYPES, Image

PENDING, IN_FLIGHT, DONE, RETRYING, FAILED, CANCELLED = (
    "pending", "in_flight", "done", "retrying", "failed", "cancelled")
STATES = (PENDING, IN_FLIGHT, DONE, RETRYING, FAILED, CANCELLED)
OPEN = frozenset({PENDING, RETRYING})            # waiting to be sent
MIN_POLL = 0.2  # seconds: a look again soon (Glance notified image.activate before its commit)
LONG_IMPORT = 60.0  # seconds after which an import of ours is polled every Settings.long_poll
# A lock whose task has ended is dropped by Glance a moment later (ms on Glance 33; on 2025.1
# a visit right after task.success can still see it): looked at every poll_interval for
# this long after the task's end, then every lock_poll (glance-api died holding it).
ENDED_GRACE = 60.0
GONE_STATUSES = frozenset({"deleted", "pending_delete", "killed"})
CUT_OFF = "the import was cut off: its task died with its glance-api (no attempt used)"
BLOCKED = "blocked; tried again after the next store-list refresh"
MIN_BLOCKED = 10.0  # seconds a blocked copy waits at least (a store list cached for 0 s)


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    id: str
    type: str | None = None
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class Copy:
    """One (image, store) copy as the ledger records it."""

    image_id: str
    store: str
    state: str = PENDING
    attempts: int = 0
    next_attempt_at: float | None = None
    rules: tuple[str, ...] = ()
    error_kind: str | None = None
    error_status: int | None = None
    error_message: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Image-level facts the ledger keeps about our import and Glance's lock."""

    import_started_at: float | None = None
    saw_lock: bool = False
    recovering: bool = False          # in flight when the daemon last stopped
    upload_error: str | None = None   # last error-priority image.upload text
    upload_error_at: float | None = None
    upload_error_quota: bool = False
    lock_task: str | None = None
    lock_task_status: str | None = None
    lock_task_updated_at: float | None = None
    import_stores: frozenset[str] | None = None   # the image's stores when our import was sent


@dataclasses.dataclass(frozen=True)
class Settings:
    max_attempts: int = 6
    backoff: Callable[[int], float] = lambda attempt: 30.0 * 2 ** (attempt - 1)
    quota_retry_delay: float = 3600.0
    quota_recheck: float = 60.0    # how often a copy held for its owner's quota is re-checked
    unknown_store_tries: int = 3
    poll_interval: float = 2.0
    long_poll: float = 30.0      # an import older than LONG_IMPORT: polled this often at most
    #                              (its task's end comes as a notification)
    settle_grace: float = 10.0   # how long an import may show no lock before we judge it
    lock_poll: float = 60.0      # how often to re-check an image locked by another import
    lock_expiry: float = 3600.0  # Glance preempts a lock whose task is older than this
    store_list_ttl: float = 300.0  # a copy blocked on a store Glance lacks waits this long
    #                                (the executor sets it to its Glance's store cache TTL)
    # Request discipline per image (imagesync.discipline), read by the executor:
    image_backoff_base: float = 2.0    # first wait after an answer that is not a real one
    image_backoff_cap: float = 300.0   # longest such wait (a Retry-After is capped to it)
    image_request_share: float = 0.1   # of glance_requests_per_second, for any one image


@dataclasses.dataclass(frozen=True)
class Visit:
    changes: dict[str, Copy]
    look_at: float | None = None
    waiting: str | None = None
    import_over: bool = False
    deleted: bool = False
    lock_stale: bool = False
    foreign_lock: str | None = None   # task id of an import that is not ours


def targets(policy, image: Image, stores: Mapping[str, StoreInfo] | None,
            now: float | None = None):
    """(desired: store -> rules, skipped: store -> (rules, reason)) for one image.

    A store is skipped when it is read-only, or when every rule wanting it has a suitability
    (imagesync.policy) that makes the copy useless there: the image's disk format is not
    among those listed for the store's type (e.g. a qcow2 image on rbd: copy-image does not
    convert, and such a copy could never be cloned). `stores` None: Glance's store list could
    not be read. A version 1 policy checks only the stores whose type is known; from version 2
    on, a copy that some listed type would refuse is skipped while the store's type is not
    known, and says why. `now` (epoch seconds) is for rules matching on age.
    """
    live = [s.id for s in stores.values() if not s.read_only] if stores is not None else []
    desired = policy.desired(image, live, now)
    skipped: dict[str, tuple[tuple[str, ...], str]] = {}
    for store, rules in desired.items():
        info = stores.get(store) if stores is not None else None
        if info is not None and info.read_only:
            skipped[store] = (rules, f"store {store} is read-only")
            continue
        unknown = _unknown_type(store, info, stores is None)
        if unknown and policy.version < 2:
            continue
        reasons = [_unsuitable(image.disk_format, store, info, unknown,
                               dict(policy.suitability_of(rule))) for rule in rules]
        if all(reasons):
            skipped[store] = (rules, str(reasons[0]))
    return {s: r for s, r in desired.items() if s not in skipped}, skipped


def _unknown_type(store: str, info: StoreInfo | None, unread: bool) -> str | None:
    """Why the store's type is not known, or None when it is."""
    if unread:
        return "Glance's store list could not be read"
    if info is None:
        return f"Glance does not list store {store}"
    if info.type is None:
        return f"Glance did not say the type of store {store}"
    if info.type not in STORE_TYPES:
        return f"store {store} has type {info.type!r}, which imagesync does not know"
    return None


def _unsuitable(disk_format: str | None, store: str, info: StoreInfo | None,
                unknown: str | None, suitability: dict[str, tuple[str, ...]]) -> str | None:
    """Why a copy is useless under one rule's suitability, or None when it may be useful."""
    if unknown is None and info is not None and info.type in suitability:
        if disk_format in suitability[info.type]:
            return None
        return (f"{disk_format} image on {info.type} store {store} cannot be cloned there "
                "(copy-image does not convert)")
    refusing = sorted(kind for kind, formats in suitability.items() if disk_format not in formats)
    if unknown is None or not refusing:
        return None
    return (f"the store types could not be read ({unknown}), so suitability could not be "
            f"checked: a {disk_format} image is useless on {' or '.join(refusing)} stores")


def _set(copy: Copy, **fields) -> Copy:
    return dataclasses.replace(copy, **fields)


def _done(copy: Copy, now: float) -> Copy:
    return _set(copy, state=DONE, next_attempt_at=None, error_kind=None, error_status=None,
                error_message=None, finished_at=now)


def _failure(copy: Copy, kind: Kind, message: str, status: int | None, now: float,
             s: Settings, delay: float | None = None) -> Copy:
    """A used attempt: retrying after a delay, or failed once attempts run out."""
    if copy.attempts >= s.max_attempts:
        return _set(copy, state=FAILED, next_attempt_at=None, error_kind=kind.value,
                    error_status=status, error_message=message, finished_at=now)
    wait = s.backoff(copy.attempts) if delay is None else delay
    return _set(copy, state=RETRYING, next_attempt_at=now + wait, error_kind=kind.value,
                error_status=status, error_message=message)


def _resolve_import(image: Image, copies: dict[str, Copy], track: Tracking, now: float,
                    s: Settings, cut_off: bool = False) -> dict[str, Copy]:
    """The import is over: each in-flight copy is done or failed, by `stores`. `cut_off`: its
    task died with its glance-api (lock stale): that says nothing about the copy itself."""
    out = {}
    recent_error = track.upload_error_at is not None and track.import_started_at is not None \
        and track.upload_error_at >= track.import_started_at - 1
    for store, copy in copies.items():
        if copy.state != IN_FLIGHT:
            continue
        if store in image.stores:
            out[store] = _done(copy, now)
        elif track.recovering and store not in image.failed_import:
            # The daemon stopped between recording and finishing: maybe never sent.
            out[store] = _set(copy, state=PENDING, attempts=max(copy.attempts - 1, 0),
                              next_attempt_at=None)
        elif cut_off and store not in image.failed_import:
            out[store] = _set(copy, state=PENDING, attempts=max(copy.attempts - 1, 0),
                              next_attempt_at=None, error_kind=Kind.TRANSIENT.value,
                              error_status=None, error_message=CUT_OFF)
        elif recent_error and track.upload_error_quota:
            out[store] = _failure(copy, Kind.QUOTA, track.upload_error or "over quota", None,
                                  now, s, delay=s.quota_retry_delay)
        else:
            reason = "Glance reported the copy failed" if store in image.failed_import \
                else "the import ended without the image in this store"
            if recent_error and track.upload_error:
                reason += f": {track.upload_error}"
            out[store] = _failure(copy, Kind.COPY_FAILED, reason, None, now, s)
    return out


def _halt(image: Image, copies: Mapping[str, Copy], lost: frozenset[str],
          targets: set[str], now: float) -> dict[str, Copy]:
    """Our import ended with the image gone from stores it was in: the import destroyed
    copies. Glance 2025.1 and older do this when a copy-image goes over user_storage_quota:
    the store's write fails the quota check made after it, and Glance then deletes the
    image's first location, which is not the copy it just wrote. Every copy not in Glance is
    failed for good (a lost one too, which would otherwise be copied again at once): each
    further copy could destroy the next. An operator's `imagesync retry` lifts it."""
    reason = (f"Glance removed the image from {', '.join(sorted(lost))} during imagesync's "
              f"copy to {', '.join(sorted(targets))}; imagesync stopped copying it (Glance "
              f"2025.1 and older delete an image's first copy when a copy-image goes over "
              f"user_storage_quota). Check the image, then `imagesync retry {image.id}`")
    return {store: _set(copy, state=FAILED, next_attempt_at=None,
                        error_kind=Kind.LOST_COPY.value, error_status=None,
                        error_message=reason, finished_at=now)
            for store, copy in copies.items()
            if store not in image.stores and copy.state != CANCELLED}


def plan_visit(image: Image | None, copies: Mapping[str, Copy], desired, skipped,
               track: Tracking, now: float, s: Settings) -> Visit:
    """Compare a fresh GET of the image with the ledger's copies; say what changes."""
    copies = dict(copies)
    if image is None or image.status in GONE_STATUSES:   # failed copies too: alerts clear
        return Visit({st: _set(c, state=CANCELLED, next_attempt_at=None,
                               error_kind=Kind.GONE.value, error_message="image is gone",
                               finished_at=now)
                      for st, c in copies.items() if c.state not in (DONE, CANCELLED)},
                     deleted=True, import_over=True)

    changes: dict[str, Copy] = {}
    in_flight = {st for st, c in copies.items() if c.state == IN_FLIGHT}
    import_over = False
    look_at: float | None = None
    watch, own_waiting = None, None
    if in_flight:
        settled = all(st in image.stores for st in in_flight)
        young = track.import_started_at is not None and \
            now - track.import_started_at < s.settle_grace
        # Our import's task can die with its glance-api (kill, restart) and keep the lock:
        # once the task is older than Glance's expiry, the import is over, and the next
        # import request will preempt the lock.
        dead = bool(image.import_task) and _describe_lock(image, track, now, s)[1]
        # A finished task can keep its lock (glance-api stopped before releasing it; Glance
        # then holds it until it expires): our import is over all the same.
        finished = _ended(image, track)
        cut_off = dead and not finished
        dead = dead or (bool(image.import_task) and finished)
        if (image.import_task and not dead) or (
                not settled and not track.saw_lock and young and not track.recovering):
            look_at = now + _poll_delay(track, now, s)   # still importing (or not started yet)
            if image.import_task and track.import_started_at is not None and \
                    now - track.import_started_at >= s.lock_poll:
                watch = image.import_task      # a long import: learn its task's age
                own_waiting = _describe_lock(image, track, now, s)[0]
        else:
            changes.update(_resolve_import(image, copies, track, now, s, cut_off))
            import_over = True
            copies.update(changes)
            lost = (track.import_stores or frozenset()) - image.stores
            if lost:
                changes.update(_halt(image, copies, lost, in_flight, now))
                copies.update(changes)
            in_flight = set()

    # Another import is copying there right now (only while its lock is held: a crashed
    # task can leave os_glance_importing_to_stores behind).
    elsewhere = image.importing_to if image.import_task else frozenset()
    for store, rules in desired.items():
        copy = copies.get(store) or Copy(image.id, store)
        if store in elsewhere and store not in image.stores and \
                (store not in copies or copy.state in (DONE, CANCELLED)):
            continue
        new = _set(copy, rules=tuple(rules))
        if store in image.stores:
            if copy.state != DONE and copy.state != IN_FLIGHT:
                new = _done(new, now)
        elif copy.state == DONE:
            # Removed from the store since it was copied: a new copy, from 0 attempts.
            new = _set(new, state=PENDING, attempts=0, next_attempt_at=None, error_kind=None,
                       error_status=None, error_message=None, finished_at=None)
        elif copy.state == CANCELLED:
            new = _wanted_again(new, s)
        elif _blocked(copy) and (copy.next_attempt_at or 0) <= now:
            new = _set(new, state=RETRYING, next_attempt_at=None)   # one more try
        if new != copies.get(store):
            changes[store] = new
    for store, (rules, reason) in skipped.items():
        copy = copies.get(store) or Copy(image.id, store)
        if store not in image.stores and copy.state != IN_FLIGHT:
            new = _set(copy, rules=tuple(rules), state=CANCELLED, next_attempt_at=None,
                       error_kind=Kind.SKIPPED.value, error_message=reason)
            if new != copies.get(store):
                changes[store] = new
    for store, copy in copies.items():
        if store not in desired and store not in skipped and (copy.state in OPEN or
                                                              copy.state == FAILED):
            changes[store] = _set(copy, state=CANCELLED, next_attempt_at=None,
                                  error_kind=Kind.NOT_WANTED.value,
                                  error_message="no rule wants this store any more")
    copies.update(changes)

    waiting, lock_stale, foreign = own_waiting, False, watch
    open_copies = [c for st, c in copies.items() if c.state in OPEN and st not in image.stores]
    if image.status != "active":
        waiting = f"image is {image.status}"
    elif image.import_task and not in_flight and (open_copies or not _ended(image, track)):
        ended = _ended(image, track)
        foreign = None if ended else image.import_task   # an ended task needs no reading
        waiting, lock_stale = _describe_lock(image, track, now, s)
        if open_copies and not lock_stale:
            soon = ended and now - (track.lock_task_updated_at or 0) < ENDED_GRACE
            look_at = _earliest(look_at, now + (s.poll_interval if soon else s.lock_poll))
    if waiting is None and open_copies:
        due = [c.next_attempt_at for c in open_copies if c.next_attempt_at is not None]
        if len(due) == len(open_copies) and all(t > now for t in due):
            look_at = _earliest(look_at, min(due))   # re-read the image before the retry
    blocked = [c.next_attempt_at or 0 for st, c in copies.items()
               if _blocked(c) and st in desired and (c.next_attempt_at or 0) > now]
    if blocked:
        look_at = _earliest(look_at, min(blocked))
    return Visit(changes, look_at, waiting, import_over, lock_stale=lock_stale,
                 foreign_lock=foreign)


def _blocked(copy: Copy) -> bool:
    """Failed because Glance (or one of its API nodes) lacks the store: tried again later."""
    return copy.state == FAILED and copy.error_kind == Kind.UNKNOWN_STORE.value and \
        copy.next_attempt_at is not None


def _wanted_again(copy: Copy, s: Settings) -> Copy:
    """A cancelled copy wanted again resumes its history: the attempts it used still count
    (so a policy that drops and re-adds a store cannot retry a failing copy forever), but it
    gets at least one more try. The cancellation's reason is cleared."""
    return _set(copy, state=PENDING, attempts=min(copy.attempts, s.max_attempts - 1),
                next_attempt_at=None, error_kind=None, error_status=None, error_message=None,
                finished_at=None)


def _ended(image: Image, track: Tracking) -> bool:
    """The task holding the image's lock has ended (its notification, or the tasks API, said
    so): Glance drops that lock a moment later, and nothing of ours waits on it."""
    return track.lock_task == image.import_task and \
        track.lock_task_status in ("success", "failure")


def _describe_lock(image: Image, track: Tracking, now: float, s: Settings):
    """Text for an image held by an import that is not ours, and whether the lock is stale."""
    text = f"import lock held by task {image.import_task}"
    if track.lock_task == image.import_task and track.lock_task_status == "missing":
        return text + " (Glance has no such task); stale: Glance will preempt it on the " \
                      "next import", True
    if track.lock_task == image.import_task and track.lock_task_updated_at:
        age = now - track.lock_task_updated_at
        expiry = s.lock_expiry * (2 if track.lock_task_status == "pending" else 1)
        text += f" ({track.lock_task_status or 'unknown'}, last updated {age / 60:.0f} min ago)"
        if age >= expiry:
            return text + "; stale: Glance will preempt it on the next import", True
    return text, False


def _poll_delay(track: Tracking, now: float, s: Settings) -> float:
    """Wait as long again as the import has taken (at least poll_interval), up to long_poll.

    The end of an import comes as a notification (task.success / task.failure), and the
    look it brings is what notices most copies; polls are the safety net for a lost one,
    so they double: a 10-minute import is polled 23 times at the defaults (2, 4, ... 32 s,
    then every 30 s, which also keeps the stale-lock check going)."""
    if track.import_started_at is None:
        return s.poll_interval
    age = now - track.import_started_at
    if age >= LONG_IMPORT:
        return max(s.poll_interval, s.long_poll)
    return max(s.poll_interval, min(age, s.long_poll))


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def apply_outcome(copies: Mapping[str, Copy], targets_: frozenset[str], outcome: Outcome,
                  now: float, s: Settings) -> tuple[dict[str, Copy], float | None]:
    """New rows for the targets of a failed import request, and when to look again."""
    changes: dict[str, Copy] = {}
    look_at: float | None = None
    fields = dict(error_kind=outcome.kind.value, error_status=outcome.status,
                  error_message=outcome.message)
    for store in targets_:
        copy = copies[store]
        refund = _set(copy, state=PENDING, attempts=max(copy.attempts - 1, 0),
                      next_attempt_at=None, **fields)
        if store in outcome.done:
            changes[store] = _done(copy, now)
        elif outcome.blamed is not None and store not in outcome.blamed:
            changes[store] = _set(copy, state=PENDING, attempts=max(copy.attempts - 1, 0),
                                  next_attempt_at=None)   # not its fault: sent again next
        elif outcome.action == Action.BACKOFF:
            changes[store] = _set(refund, state=RETRYING,
                                  next_attempt_at=now + _backoff_delay(outcome, s))
        elif outcome.action == Action.HOLD:
            changes[store] = _set(refund, state=RETRYING, next_attempt_at=now + s.quota_recheck)
        elif outcome.action in (Action.REPLAN, Action.PAUSE):
            changes[store] = refund
        elif outcome.action == Action.WAIT:
            changes[store] = _set(refund, next_attempt_at=now + s.poll_interval * 5)
        elif outcome.action == Action.CANCEL:
            changes[store] = _set(copy, state=CANCELLED, next_attempt_at=None, finished_at=now,
                                  **fields)
        elif outcome.action == Action.BLOCK:
            changes[store] = _set(copy, state=FAILED, next_attempt_at=None, finished_at=now,
                                  **fields)
        elif outcome.kind == Kind.UNKNOWN_STORE:
            changes[store] = _unknown_store(copy, outcome, now, s)
        elif outcome.kind == Kind.QUOTA:
            changes[store] = _failure(copy, outcome.kind, outcome.message, outcome.status, now,
                                      s, delay=s.quota_retry_delay)
        else:
            changes[store] = _failure(copy, outcome.kind, outcome.message, outcome.status,
                                      now, s)
    if outcome.action == Action.REPLAN:
        look_at = now
    elif outcome.action == Action.WAIT:
        look_at = now + s.poll_interval * 5
    elif outcome.action == Action.BACKOFF:
        look_at = now + _backoff_delay(outcome, s)   # re-read the image before the next try
    for copy in changes.values():
        if _blocked(copy):   # the look that gives it one more try
            look_at = _earliest(look_at, copy.next_attempt_at)
    return changes, look_at


def _backoff_delay(outcome: Outcome, s: Settings) -> float:
    return outcome.delay if outcome.delay is not None else s.image_backoff_base


def _unknown_store(copy: Copy, outcome: Outcome, now: float, s: Settings) -> Copy:
    """A few tries with backoff; then blocked (failed, with the reason) until the store list
    is next refreshed, when plan_visit gives it one more try."""
    if copy.attempts < min(s.unknown_store_tries, s.max_attempts):
        return _set(copy, state=RETRYING, next_attempt_at=now + s.backoff(copy.attempts),
                    error_kind=outcome.kind.value, error_status=outcome.status,
                    error_message=outcome.message)
    wait = max(s.store_list_ttl, MIN_BLOCKED)
    return _set(copy, state=FAILED, next_attempt_at=now + wait, finished_at=now,
                error_kind=outcome.kind.value, error_status=outcome.status,
                error_message=f"{outcome.message}; {BLOCKED}")
