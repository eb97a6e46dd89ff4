"""Error kinds, and the one place where a failed copy-image request is classified.

Classification reads the image's state as Glance shows it right after the
failure, never Glance's (translated) message text. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from imagesync.model import Image


class Kind(str, enum.Enum):
    LOCKED = "locked"                  # another import holds the image's lock: wait
    NOT_ACTIVE = "not_active"          # image queued/deactivated: pause, no attempt used
    ALREADY_PRESENT = "already_present"  # 400: a target is already there; send the rest
    UNKNOWN_STORE = "unknown_store"    # 409: Glance does not know a target store
    GONE = "gone"                      # 404: image deleted
    QUOTA = "quota"                    # 413 or a store failed for quota
    FORBIDDEN = "forbidden"            # 403: the credentials may not copy
    TRANSIENT = "transient"            # 5xx, connection error, timeout, lost race
    BAD_REQUEST = "bad_request"        # 400 that re-reading the image does not explain
    COPY_FAILED = "copy_failed"        # the import ran and the store did not get the image
    SKIPPED = "skipped"                # a useless target (non-raw to cinder/rbd, read-only)
    NOT_WANTED = "not_wanted"          # the policy no longer wants this store


class Action(str, enum.Enum):
    RETRY = "retry"        # try again after a backoff delay; uses an attempt
    WAIT = "wait"          # look again later; no attempt used
    PAUSE = "pause"        # wait for an event (image becomes active); no attempt used
    REPLAN = "replan"      # look again now; no attempt used
    CANCEL = "cancel"      # nothing left to do
    BLOCK = "block"        # will never work as configured: failed, no retry loop


FORBIDDEN_MESSAGE = "copy-image needs the admin role (Glance policy copy_image)"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to a copy request and what to do about it, for every target store."""

    kind: Kind
    action: Action
    message: str
    status: int | None = None
    done: frozenset[str] = frozenset()   # targets found present (ALREADY_PRESENT)


def classify_import_error(status: int | None, message: str, image: Image | None,
                          targets: Iterable[str], live_stores: Iterable[str] | None) -> Outcome:
    """Classify a failed POST /v2/images/{id}/import.

    `status` is the HTTP status (None: no answer: connection error or timeout),
    `image` the image as re-read right after (None when Glance says it is gone),
    `live_stores` the store ids Glance lists now (None when unknown).
    """
    targets = frozenset(targets)
    lines = (message or "").strip().splitlines()
    short = lines[0][:300] if lines else ""
    if status is None or status >= 500:
        return Outcome(Kind.TRANSIENT, Action.RETRY, short or "no answer from Glance", status)
    if status == 403:
        return Outcome(Kind.FORBIDDEN, Action.BLOCK, FORBIDDEN_MESSAGE, status)
    if status == 404 or (image is None and status in (400, 409)):
        return Outcome(Kind.GONE, Action.CANCEL, "image is gone", status)
    if status == 413:
        return Outcome(Kind.QUOTA, Action.RETRY, short or "over quota", status)
    if image is None:
        return Outcome(Kind.TRANSIENT, Action.RETRY, short, status)
    if image.status != "active":
        return Outcome(Kind.NOT_ACTIVE, Action.PAUSE, f"image is {image.status}", status)
    present = targets & image.stores
    if status == 400 and present:
        return Outcome(Kind.ALREADY_PRESENT, Action.REPLAN,
                       f"already in {', '.join(sorted(present))}", status, done=present)
    if image.import_task:
        return Outcome(Kind.LOCKED, Action.WAIT,
                       f"import lock held by task {image.import_task}", status)
    if status == 409:
        unknown = targets - frozenset(live_stores) if live_stores is not None else frozenset()
        if unknown:
            return Outcome(Kind.UNKNOWN_STORE, Action.RETRY,
                           f"Glance has no store {', '.join(sorted(unknown))}", status)
        # Active, unlocked, stores known: we lost a race for the lock. Try again soon.
        return Outcome(Kind.LOCKED, Action.WAIT, short or "lost the import lock race", status)
    return Outcome(Kind.BAD_REQUEST, Action.RETRY, short or f"HTTP {status}", status)
