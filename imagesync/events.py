"""Turn one Glance notification into an Event: which image (or import task) to look at again.

The listener hands every notification here; ``parse`` answers with an Event or None (nothing
for imagesync). It is pure and cheap: no I/O, no logging, no copies of the payload, no regex on
dict payloads, and it never raises, whatever the input. It must not decide anything about
copies: payloads carry no ``stores``, so an Event only says what to re-read, never what changed.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
from typing import Any

from imagesync.model import IMPORT_TASK

# Glance events that mean "this image may have changed: read it again". Their payload's "id"
# is the image id. image.upload is here too; its failure form is a plain string (see below).
_IMAGE_EVENTS = frozenset(
    {"image.create", "image.update", "image.prepare", "image.upload", "image.activate"}
)
# Membership events: the payload's "image_id" names the image (member_id is a project).
_MEMBER_EVENTS = frozenset({"image.member.create", "image.member.update", "image.member.delete"})
# Import task events: the payload's "id" is the TASK id; no image id anywhere (Glance leaves
# out the task input on purpose). Glance 33 defines task.delete but never sends it.
_TASK_EVENTS = frozenset(
    {"task.create", "task.processing", "task.success", "task.failure", "task.run", "task.delete"}
)

REASON_LIMIT = 500  # characters of a failed upload's text kept in Event.reason
_SCAN_LIMIT = 2000  # only this much of a plain-string payload is ever looked at
_UUID_IN_TEXT = re.compile(
    r"(?<![0-9A-Fa-f-])[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    r"(?![0-9A-Fa-f-])"
)
# Lower-case phrases that mean an upload ran out of allowed space. "exceed the limit" is
# Glance's StorageQuotaFull (user_storage_quota), which reaches the notification as
# "... due to internal error: The size of the data N will exceed the limit. M bytes remaining."
_QUOTA_PHRASES = ("quota", "exceed the limit", "no space left on device")
_HEX_DIGITS = "0123456789abcdef"
_UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs 3.11; setup.cfg allows 3.10)


class EventKind(enum.Enum):
    CHANGED = "changed"  # an image event: re-read the image and re-plan
    DELETED = "deleted"  # image.delete: cancel what is pending for the image
    UPLOAD_FAILED = "upload_failed"  # error image.upload: a store failed; advisory only
    TASK = "task"  # task.*: an import task moved; the payload does not say for which image


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One notification, reduced to what imagesync acts on."""

    kind: EventKind
    image_id: str | None  # canonical lower-case dashed UUID; None only for TASK
    event_type: str
    timestamp: datetime.datetime | None  # UTC-aware, when Glance sent it; None if unreadable
    message_id: str | None
    # Image status from the payload, or the task status for TASK. Not set for image.member.*
    # (their "status" is the membership's). task.run arrives last with a stale "pending".
    status: str | None = None
    # TASK: the task id. Image events: the os_glance_import_task property (the import lock).
    task_id: str | None = None
    reason: str | None = None  # UPLOAD_FAILED: Glance's text, at most REASON_LIMIT characters
    quota: bool = False  # UPLOAD_FAILED and the text says it ran out of allowed space


def parse(
    event_type: Any, payload: Any, metadata: Any = None, priority: Any = "info"
) -> Event | None:
    """The Event for one notification, or None when imagesync has nothing to do with it.

    ``priority`` is accepted so an endpoint can pass on all it got, but nothing depends on it:
    Glance's failed upload is recognised by its plain-string payload (sent at priority error).
    """
    result = _parse(event_type, payload, metadata)
    return result if isinstance(result, Event) else None


def reject_reason(event_type: Any, payload: Any) -> str | None:
    """Why ``parse`` returns None for this notification (short text for a log), else None."""
    result = _parse(event_type, payload, None)
    return result if isinstance(result, str) else None


def _parse(event_type: Any, payload: Any, metadata: Any) -> Event | str:
    if not isinstance(event_type, str):
        return "event type is not a string"
    if event_type in _IMAGE_EVENTS or event_type == "image.delete":
        if isinstance(payload, str) and event_type == "image.upload":
            return _upload_failure(payload, metadata)
        if not isinstance(payload, dict):
            return "payload is not a dict"
        image_id = _canonical_uuid(payload.get("id"))
        if image_id is None:
            return "payload has no image id"
        properties = payload.get("properties")
        return Event(
            kind=EventKind.DELETED if event_type == "image.delete" else EventKind.CHANGED,
            image_id=image_id,
            event_type=event_type,
            timestamp=_timestamp(metadata),
            message_id=_message_id(metadata),
            status=_text(payload.get("status")),
            task_id=_canonical_uuid(properties.get(IMPORT_TASK))
            if isinstance(properties, dict)
            else None,
        )
    if event_type in _MEMBER_EVENTS:
        if not isinstance(payload, dict):
            return "payload is not a dict"
        image_id = _canonical_uuid(payload.get("image_id"))
        if image_id is None:
            return "payload has no image id"
        return Event(
            kind=EventKind.CHANGED,
            image_id=image_id,
            event_type=event_type,
            timestamp=_timestamp(metadata),
            message_id=_message_id(metadata),
        )
    if event_type in _TASK_EVENTS:
        if not isinstance(payload, dict):
            return "payload is not a dict"
        task_id = _canonical_uuid(payload.get("id"))
        if task_id is None:
            return "payload has no task id"
        return Event(
            kind=EventKind.TASK,
            image_id=None,
            event_type=event_type,
            timestamp=_timestamp(metadata),
            message_id=_message_id(metadata),
            status=_text(payload.get("status")),
            task_id=task_id,
        )
    if event_type == "image.send":
        return "image downloads change nothing"
    return "not an image or task event imagesync follows"


def _upload_failure(text: str, metadata: Any) -> Event | str:
    """A failed upload: Glance names the image in its own sentence, before ": <error>".

    Only that sentence is searched, so an id inside the underlying error (a volume, a path)
    is never taken for the image. Messages without one ("Image storage media is full: ...")
    cannot be tied to an image and are dropped.
    """
    head = text[:_SCAN_LIMIT]
    found = _UUID_IN_TEXT.search(head.split(": ", 1)[0])
    if found is None:
        return "upload failure names no image"
    lowered = head.lower()
    return Event(
        kind=EventKind.UPLOAD_FAILED,
        image_id=found.group().lower(),
        event_type="image.upload",
        timestamp=_timestamp(metadata),
        message_id=_message_id(metadata),
        reason=_text(head.strip()[:REASON_LIMIT]),
        quota=any(phrase in lowered for phrase in _QUOTA_PHRASES),
    )


def _canonical_uuid(value: Any) -> str | None:
    """'1D818D51F1D8...' or '1d818d51-f1d8-...' as '1d818d51-f1d8-...'; anything else None."""
    if not isinstance(value, str):
        return None
    if len(value) == 36:
        if value[8] != "-" or value[13] != "-" or value[18] != "-" or value[23] != "-":
            return None
        digits = value.replace("-", "").lower()
    elif len(value) == 32:
        digits = value.lower()
    else:
        return None
    if len(digits) != 32 or digits.strip(_HEX_DIGITS):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _timestamp(metadata: Any) -> datetime.datetime | None:
    """oslo.messaging's str(utcnow()): '2026-11-25 00:53:50.032674' (no fraction at .000000)."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get("timestamp")
    if isinstance(value, str):
        if len(value) > 64:
            return None
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    try:
        return value.astimezone(_UTC)
    except (OverflowError, ValueError):
        return None


def _message_id(metadata: Any) -> str | None:
    return _text(metadata.get("message_id")) if isinstance(metadata, dict) else None


def _text(value: Any) -> str | None:
    """A string that SQLite and JSON can hold: lone surrogates become U+FFFD."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value
