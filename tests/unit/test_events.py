"""events.parse against 337 notifications captured from a real Glance 33, and against garbage."""

from __future__ import annotations

import collections
import copy
import datetime
import json
import os
import pathlib
import time
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imagesync.events import REASON_LIMIT, Event, EventKind, parse, reject_reason

# Captured by the sandbox run described in REAL-GLANCE.md; one JSON file per notification.
# Read from tests/fixtures/glance-notifications when the repository carries them.
_IN_REPO = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "glance-notifications"
NOTIFICATIONS = pathlib.Path(
    os.environ.get("IMAGESYNC_NOTIFICATIONS")
    or (_IN_REPO if _IN_REPO.is_dir() else "/work/shared/glance-notifications")
)
UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs 3.11)
IMAGE_A = "1d818d51-f1d8-4f02-a97d-aeedcba99c00"
IMAGE_B = "34c354ed-318f-4ae1-a7b3-be01d2c9b943"
IMAGE_C = "1963dd4d-fbaf-4e51-819d-d477200a7f6d"


def _load_all() -> dict[str, dict]:
    files = sorted(NOTIFICATIONS.glob("[0-9][0-9][0-9][0-9]-*.json"))
    if not files:  # fail the run loudly rather than pass on nothing
        raise FileNotFoundError(f"no captured notifications in {NOTIFICATIONS}")
    return {f.name[:4]: json.loads(f.read_text()) for f in files}


CAPTURED = _load_all()


def replay(number: str) -> Event | None:
    n = CAPTURED[number]
    return parse(n["event_type"], n["payload"], n["metadata"], n["priority"])


def is_canonical_uuid(value: object) -> bool:
    return isinstance(value, str) and str(uuid.UUID(value)) == value


# --- the real notifications -------------------------------------------------------------


def test_all_337_captured_notifications_parse_into_the_expected_kinds():
    assert len(CAPTURED) == 337
    kinds = collections.Counter(
        (replay(number).kind if replay(number) else None) for number in CAPTURED
    )
    # create 15 + update 131 + prepare 36 + upload 33 + activate 13 = 228 image changes;
    # 24 create + 24 processing + 21 success + 3 failure + 21 run = 93 task events.
    assert kinds == {
        EventKind.CHANGED: 228,
        EventKind.TASK: 93,
        EventKind.DELETED: 12,
        EventKind.UPLOAD_FAILED: 3,
        None: 1,  # the single image.send
    }


def test_every_image_event_except_downloads_names_the_image_from_its_payload():
    checked = 0
    for number, n in CAPTURED.items():
        if not n["event_type"].startswith("image.") or n["event_type"] == "image.send":
            continue
        if n["priority"] == "error":
            continue
        event = replay(number)
        assert event is not None, number
        assert event.image_id == n["payload"]["id"], number
        assert event.status == n["payload"]["status"], number
        assert event.event_type == n["event_type"]
        assert event.message_id == n["metadata"]["message_id"]
        checked += 1
    assert checked == 240


def test_task_events_carry_the_task_id_and_status_but_no_image():
    tasks = [number for number, n in CAPTURED.items() if n["event_type"].startswith("task.")]
    assert len(tasks) == 93
    for number in tasks:
        payload = CAPTURED[number]["payload"]
        event = replay(number)
        assert event.kind is EventKind.TASK
        assert event.image_id is None
        assert event.task_id == payload["id"]
        assert event.status == payload["status"]


def test_a_store_that_fails_during_a_copy_is_reported_as_a_failed_upload_of_that_image():
    event = replay("0070")
    assert event.kind is EventKind.UPLOAD_FAILED
    assert event.image_id == IMAGE_B
    assert event.reason.startswith(f"Failed to upload image data for image {IMAGE_B}")
    assert "[Errno 1] Operation not permitted" in event.reason
    assert event.quota is False
    assert event.timestamp == datetime.datetime(2026, 11, 25, 0, 56, 19, 740605, tzinfo=UTC)


def test_every_error_priority_notification_is_a_failed_upload_with_the_full_text():
    errors = [number for number, n in CAPTURED.items() if n["priority"] == "error"]
    assert errors == ["0070", "0080", "0088"]
    for number in errors:
        event = replay(number)
        assert event.kind is EventKind.UPLOAD_FAILED
        assert event.image_id == IMAGE_B
        assert event.reason == CAPTURED[number]["payload"]


def test_deleting_an_image_yields_a_delete_event_for_it():
    event = replay("0113")
    assert event.kind is EventKind.DELETED
    assert event.image_id == IMAGE_C
    assert event.status == "deleted"
    deletes = [n for n in CAPTURED if CAPTURED[n]["event_type"] == "image.delete"]
    assert all(replay(n).kind is EventKind.DELETED for n in deletes)


def test_every_timestamp_is_read_as_utc_down_to_the_microsecond():
    assert replay("0001").timestamp == datetime.datetime(2026, 11, 25, 0, 53, 50, 32674, tzinfo=UTC)
    for number in CAPTURED:
        event = replay(number)
        if event is not None:
            assert event.timestamp.utcoffset() == datetime.timedelta(0), number


def test_an_update_during_a_copy_carries_the_import_task_that_holds_the_lock():
    given_update = replay("0009")  # copy of image A to 'slow' has just started
    assert given_update.task_id == "e34cac94-b56e-40c0-9fee-6f52c8ea8985"
    assert given_update.status == "active"
    assert replay("0001").task_id is None  # a fresh image holds no lock


def test_the_lock_of_a_failed_task_is_still_shown_by_the_update_after_task_failure():
    # Ordering quirk: task.failure (0306) comes BEFORE the image.update (0307) that still
    # names the failed task as the lock holder; the lock is released without any event.
    assert replay("0306").kind is EventKind.TASK and replay("0306").status == "failure"
    after = replay("0307")
    assert after.task_id == "92197a04-f752-4eac-a1ce-c0b79fb56430"


def test_task_run_arrives_last_with_a_stale_pending_status():
    success, run = replay("0015"), replay("0016")
    assert success.task_id == run.task_id
    assert (success.status, run.status) == ("success", "pending")


def test_a_download_is_ignored_and_says_why():
    assert CAPTURED["0331"]["event_type"] == "image.send"
    assert replay("0331") is None
    assert reject_reason("image.send", CAPTURED["0331"]["payload"]) == (
        "image downloads change nothing"
    )


# --- events that were not captured, and odd inputs -------------------------------------


def test_a_membership_change_points_at_the_image_and_not_at_the_member_status():
    payload = {  # glance.notifier.format_image_member_notification
        "image_id": IMAGE_A,
        "member_id": "5f1e2c8a0b9d4e7f8a6b5c4d3e2f1a0b",
        "status": "pending",
        "deleted": False,
    }
    for event_type in ("image.member.create", "image.member.update", "image.member.delete"):
        event = parse(event_type, payload)
        assert event.kind is EventKind.CHANGED
        assert event.image_id == IMAGE_A
        assert event.status is None


@pytest.mark.parametrize(
    "event_type",
    [
        "image.frobnicate",
        "image.member.bogus",
        "image.update.end",
        "task.exploded",
        "metadef_tag.create",
        "compute.instance.create.end",
        "image",
        "",
        "IMAGE.UPDATE",
    ],
)
def test_unknown_event_types_are_ignored_even_with_a_valid_image(event_type):
    payload = {"id": IMAGE_A, "image_id": IMAGE_A, "status": "active"}
    assert parse(event_type, payload) is None
    assert reject_reason(event_type, payload) == "not an image or task event imagesync follows"


@pytest.mark.parametrize(
    "given_id, expected",
    [
        ("1D818D51-F1D8-4F02-A97D-AEEDCBA99C00", IMAGE_A),
        ("1d818d51f1d84f02a97daeedcba99c00", IMAGE_A),
        ("1D818D51F1D84F02A97DAEEDCBA99C00", IMAGE_A),
    ],
)
def test_image_ids_are_normalised_to_the_canonical_lowercase_form(given_id, expected):
    assert parse("image.update", {"id": given_id}).image_id == expected


@pytest.mark.parametrize(
    "garbage_id",
    [
        "invalid id",
        5,
        None,
        "",
        [IMAGE_A],
        "1d818d51-f1d8-4f02-a97d-aeedcba99c0g",
        "1d818d51f-1d8-4f02-a97d-aeedcba99c00",
        f"{{{IMAGE_A}}}",
        f"urn:uuid:{IMAGE_A}",
        "1d818d51-f1d8-4f02-a97d-aeedcba99c00-",
        "1d818d51-f1d8-4f02-a97d-aeedcba9-c00",
    ],
)
def test_a_notification_with_a_garbage_image_id_is_dropped(garbage_id):
    assert parse("image.update", {"id": garbage_id, "status": "active"}) is None
    assert reject_reason("image.update", {"id": garbage_id}) == "payload has no image id"


def test_a_payload_that_is_not_a_dict_is_dropped_with_a_reason():
    for payload in (None, 5, [IMAGE_A], IMAGE_A):
        assert parse("image.update", payload) is None
        assert reject_reason("image.update", payload) == "payload is not a dict"


def test_over_quota_text_from_glance_marks_the_failed_upload_as_a_quota_problem():
    # user_storage_quota: glance.quota raises StorageQuotaFull inside set_data, and the
    # notifier's catch-all wraps its text.
    text = (
        f"Failed to upload image data for image {IMAGE_B} due to internal error: "
        "The size of the data 52428800 will exceed the limit. 10485760 bytes remaining."
    )
    event = parse("image.upload", text, priority="error")
    assert event.kind is EventKind.UPLOAD_FAILED
    assert event.image_id == IMAGE_B
    assert event.quota is True
    assert replay("0070").quota is False  # a permission error is not a quota problem


def test_an_upper_case_image_id_in_a_failure_text_is_normalised():
    text = f"Cannot save data for image {IMAGE_B.upper()}: Data supplied was not valid."
    assert parse("image.upload", text, priority="error").image_id == IMAGE_B


def test_a_failure_that_names_no_image_in_glances_own_sentence_is_dropped():
    # Glance's StorageFull message has no image id; an id inside the underlying error
    # (here a Cinder volume) must not be taken for the image.
    for text in (
        "Image storage media is full: There is not enough disk space on the image storage media.",
        (
            "Insufficient permissions on image storage media: volume "
            "0f4a4c8e-6b7d-4c1e-9a7f-2b3c4d5e6f70 is read-only"
        ),
    ):
        assert parse("image.upload", text, priority="error") is None
        assert reject_reason("image.upload", text) == "upload failure names no image"


def test_a_huge_failure_text_is_kept_to_the_first_500_characters():
    text = f"Failed to upload image data for image {IMAGE_B} due to internal error: " + "x" * 10**7
    event = parse("image.upload", text, priority="error")
    assert len(event.reason) == REASON_LIMIT
    assert event.reason.startswith("Failed to upload")


@pytest.mark.parametrize(
    "stamp, expected",
    [
        ("2026-11-25 00:53:50", datetime.datetime(2026, 11, 25, 0, 53, 50, tzinfo=UTC)),
        ("2026-11-25T01:53:50+01:00", datetime.datetime(2026, 11, 25, 0, 53, 50, tzinfo=UTC)),
        ("yesterday", None),
        (1764032030, None),
        ("9" * 100, None),
        ("0001-01-01 00:00:00+05:00", None),  # valid, but before year 1 in UTC
    ],
)
def test_timestamps_are_read_leniently_and_never_stop_the_event(stamp, expected):
    event = parse("image.update", {"id": IMAGE_A}, {"timestamp": stamp, "message_id": "m-1"})
    assert event.image_id == IMAGE_A
    assert event.timestamp == expected
    assert event.message_id == "m-1"


def test_parsing_leaves_the_payload_untouched_and_keeps_no_reference_to_it():
    payload = CAPTURED["0011"]["payload"]
    before = copy.deepcopy(payload)
    event = replay("0011")
    assert payload == before
    assert all(getattr(event, f) is not payload for f in Event.__dataclass_fields__)


def test_parsing_is_cheap_enough_for_a_listener_draining_10000_messages_a_second():
    n = CAPTURED["0064"]
    big = dict(n["payload"], **{f"key{i}": "v" * 100 for i in range(10_000)})
    start = time.perf_counter()
    for _ in range(10_000):
        parse(n["event_type"], big, n["metadata"], "info")
    # 10,000 parses must take well under the second the listener has for them.
    assert time.perf_counter() - start < 0.5


# --- anything at all --------------------------------------------------------------------

KNOWN_TYPES = sorted(
    {n["event_type"] for n in CAPTURED.values()}
    | {"image.member.create", "image.member.update", "image.member.delete", "task.delete"}
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
id_like = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex.upper()),
    st.text(max_size=40),
    st.text(alphabet="0123456789abcdefABCDEF-", min_size=30, max_size=38),
    json_values,
)
image_like = st.fixed_dictionaries(
    {},
    optional={
        "id": id_like,
        "image_id": id_like,
        "status": json_values,
        "properties": st.one_of(
            json_values, st.fixed_dictionaries({}, optional={"os_glance_import_task": id_like})
        ),
    },
)
failure_text = st.builds(
    lambda before, image, after: f"{before}{image}{after}",
    st.text(max_size=40),
    st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper()),
    st.text(max_size=40),
)
zones = st.just(UTC) | st.builds(
    datetime.timezone,
    st.timedeltas(min_value=datetime.timedelta(hours=-23), max_value=datetime.timedelta(hours=23)),
)
metadata_like = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "timestamp": st.one_of(
                st.datetimes().map(str),
                st.datetimes(timezones=zones).map(str),
                st.datetimes(timezones=zones),
                json_values,
            ),
            "message_id": json_values,
        },
    ),
)


@settings(max_examples=200, deadline=None)
@example("image.update", {"id": 5}, {"timestamp": "0001-01-01 00:00:00+05:00"}, "info")
@example("image.upload", "for image 1D818D51-F1D8-4F02-A97D-AEEDCBA99C00: quota", None, None)
@given(
    event_type=st.one_of(st.sampled_from(KNOWN_TYPES), st.text(max_size=30), json_values),
    payload=st.one_of(image_like, failure_text, json_values),
    metadata=metadata_like,
    priority=st.one_of(st.sampled_from(["info", "error", "INFO", "warn"]), json_values),
)
def test_parse_never_raises_and_only_ever_reports_canonical_image_ids(
    event_type, payload, metadata, priority
):
    event = parse(event_type, payload, metadata, priority)
    assert (event is None) == (reject_reason(event_type, payload) is not None)
    if event is None:
        return
    assert isinstance(event.kind, EventKind)
    if event.kind is EventKind.TASK:
        assert event.image_id is None and is_canonical_uuid(event.task_id)
    else:
        assert is_canonical_uuid(event.image_id)
    assert event.task_id is None or is_canonical_uuid(event.task_id)
    assert event.timestamp is None or event.timestamp.utcoffset() == datetime.timedelta(0)
    assert event.reason is None or len(event.reason) <= REASON_LIMIT
