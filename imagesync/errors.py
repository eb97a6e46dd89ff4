"""Error kinds, and the one place where a failed copy-image request is classified.

Classification reads the image's state as Glance shows it right after the
failure, never Glance's (translated) message text. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable

from imagesync.model import Image


class Kind(str, enum.Enum):
    LOCKED = "locked"                  # another import holds the image's lock: wait
    NOT_ACTIVE = "not_active"          # image queued/deactivated: pause, no attempt used
    ALREADY_PRESENT = "already_present"  # 400: a target is already there; send the rest
    UNKNOWN_STORE = "unknown_store"    # 409: Glance does not know a target store
    GONE = "gone"                      # 404: image deleted
    QUOTA = "quota"                    # 413 or a store failed for quota
    OWNER_QUOTA = "owner_quota"        # the image owner's quota has no room: held, not sent
    FORBIDDEN = "forbidden"            # 403: the credentials may not copy
    UNAUTHORIZED = "unauthorized"      # 401: credentials expired or revoked; no attempt used
    TRANSIENT = "transient"            # 5xx, 429, connection error, timeout; no attempt used
    BAD_REQUEST = "bad_request"        # 400 that re-reading the image does not explain
    COPY_FAILED = "copy_failed"        # the import ran and the store did not get the image
    SKIPPED = "skipped"                # a useless target (non-raw to cinder/rbd, read-only)
    NOT_WANTED = "not_wanted"          # the policy no longer wants this store
    LOST_COPY = "lost_copy"            # our import ended with the image gone from a store it
    #                                    was in: copying it halted until an operator's retry


class Action(str, enum.Enum):
    RETRY = "retry"        # try again after a backoff delay; uses an attempt
    BACKOFF = "backoff"    # Glance gave no real answer: try again after the image's request
    #                        backoff (Outcome.delay); no attempt used
    WAIT = "wait"          # look again later; no attempt used
    PAUSE = "pause"        # wait for an event (image becomes active); no attempt used
    HOLD = "hold"          # not sent: held until it fits (owner quota), re-checked every
    #                        Settings.quota_recheck; no attempt used
    REPLAN = "replan"      # look again now; no attempt used
    CANCEL = "cancel"      # nothing left to do
    BLOCK = "block"        # will never work as configured: failed, no retry loop


FORBIDDEN_MESSAGE = "copy-image needs the admin role (Glance policy copy_image)"
UNAUTHORIZED_MESSAGE = ("Glance refused imagesync's credentials (401): token expired or "
                        "revoked, or the password changed")
_NO_ANSWER = {None: "no answer from Glance", 429: "Glance is rate limiting (429)"}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to a copy request and what to do about it, for every target store."""

    kind: Kind
    action: Action
    message: str
    status: int | None = None
    done: frozenset[str] = frozenset()   # targets found present (ALREADY_PRESENT)
    delay: float | None = None           # seconds before the next try (BACKOFF), set by the
    #                                      executor from the image's request backoff
    blamed: frozenset[str] | None = None  # the targets it is about; the others go back to
    #                                       pending at no cost (None: all of them)


def classify_import_error(status: int | None, message: str, image: Image | None,
                          targets: Iterable[str], live_stores: Iterable[str] | None) -> Outcome:
    """Classify a failed POST /v2/images/{id}/import.

    `status` is the HTTP status (None: no answer: connection error or timeout),
    `image` the image as re-read right after (None when Glance says it is gone),
    `live_stores` the store ids Glance lists now (None when unknown).
    No real answer (None, 5xx, 429, 401) says nothing about the copy itself: BACKOFF, no
    attempt used. Only the answers that do (400, 413, a store Glance lacks) use attempts.
    """
    targets = frozenset(targets)
    lines = (message or "").strip().splitlines()
    short = lines[0][:300] if lines else ""
    if status is None or status >= 500 or status == 429:
        return Outcome(Kind.TRANSIENT, Action.BACKOFF, short or _NO_ANSWER.get(status, ""),
                       status)
    if status == 401:
        return Outcome(Kind.UNAUTHORIZED, Action.BACKOFF, UNAUTHORIZED_MESSAGE, status)
    if status == 403:
        return Outcome(Kind.FORBIDDEN, Action.BLOCK, FORBIDDEN_MESSAGE, status)
    if status == 404 or (image is None and status in (400, 409)):
        return Outcome(Kind.GONE, Action.CANCEL, "image is gone", status)
    if status == 413:
        return Outcome(Kind.QUOTA, Action.RETRY, short or "over quota", status)
    if image is None:
        return Outcome(Kind.TRANSIENT, Action.BACKOFF, short or "the image could not be re-read",
                       status)
    if image.status != "active":
        return Outcome(Kind.NOT_ACTIVE, Action.PAUSE, f"image is {image.status}", status)
    present = targets & image.stores
    if status in (400, 409) and present:
        # 400: the whole request was rejected. 409: another import got there first.
        return Outcome(Kind.ALREADY_PRESENT, Action.REPLAN,
                       f"already in {', '.join(sorted(present))}", status, done=present)
    if image.import_task:
        return Outcome(Kind.LOCKED, Action.WAIT,
                       f"import lock held by task {image.import_task}", status)
    if status == 409:
        return _unknown_store(targets, live_stores, status, message)
    return Outcome(Kind.BAD_REQUEST, Action.RETRY, short or f"HTTP {status}", status)


def _unknown_store(targets: frozenset[str], live_stores: Iterable[str] | None,
                   status: int, message: str) -> Outcome:
    """A 409 for an active, unlocked image: Glance does not know a target store. When the
    store list names them all, one Glance API node lacks a store another one has."""
    unknown = targets - frozenset(live_stores) if live_stores is not None else frozenset()
    if unknown:
        return Outcome(Kind.UNKNOWN_STORE, Action.RETRY,
                       f"Glance has no store {', '.join(sorted(unknown))}", status,
                       blamed=unknown)
    # Which store a node lacks: store ids are never translated, so the message may name it.
    # It only narrows the blame; the kind never depends on the text.
    named = frozenset(t for t in targets
                      if re.search(rf"(?<![\w-]){re.escape(t)}(?![\w-])", message or ""))
    blamed = named if named and named != targets else None
    names = ", ".join(sorted(blamed or targets))
    return Outcome(Kind.UNKNOWN_STORE, Action.RETRY,
                   f"Glance answered 409 for this active, unlocked image although its store "
                   f"list names {names}: one of its API nodes may lack the store (their "
                   f"enabled_backends differ)", status, blamed=blamed)
