"""events.parse over real notifications of every Glance release the sandbox runs.

tests/fixtures/glance-notifications/ holds 337 notifications of Glance 33 (REAL-GLANCE.md's
runs); glance-notifications-2025.1/ (Glance 30.2.0) and glance-notifications-2024.1/ (Glance
28.2.0) hold one story each, captured by tools/capture_notifications.py on the sandbox
(`up --glance-release ...`): an 8 MiB upload; a copy-image to slow and edge with edge
unwritable and all_stores_must_succeed=false (the task succeeds); a copy-image to edge, still
unwritable, must succeed (the task fails); a copy-image to edge once writable; a delete.

On both older releases that story sends exactly what Glance 33 sends for the same steps:
the same events in the same order, at the same priorities, with the same payload keys, the
import lock on the same image.update events, task.run after a success only. The tests below
pin that against Glance 33's own notifications for the same steps, so a capture that differs
fails here, and say what imagesync reads from each notification on every release.
"""

from __future__ import annotations

import collections
import json
import pathlib

import pytest

from imagesync.events import Event, EventKind, parse

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
RELEASES = {
    "33": FIXTURES / "glance-notifications",
    "2025.1": FIXTURES / "glance-notifications-2025.1",
    "2024.1": FIXTURES / "glance-notifications-2024.1",
}
OLDER = ("2025.1", "2024.1")
# Glance 33's notifications for the steps of the older releases' story (INDEX.txt there):
UPLOAD_33 = ("0001", "0006")  # image A uploaded to fast
FAILING_STORE_33 = "cd122b61-e006-4d48-aa9a-5583885a70df"  # slow+edge, edge fails, success
MUST_SUCCEED_33 = "f5484831-06f9-489e-9522-a656553da245"  # edge fails, must succeed: failure
ONE_STORE_33 = "29d10dec-2704-4072-b6a9-8dada3110ece"  # a copy to edge that works
TASK_ENDS = ("task.success", "task.failure")


def _load(release: str) -> list[dict]:
    files = sorted(RELEASES[release].glob("[0-9][0-9][0-9][0-9]-*.json"))
    if not files:  # fail loudly rather than pass on nothing
        raise FileNotFoundError(f"no captured notifications in {RELEASES[release]}")
    out = []
    for f in files:
        n = json.loads(f.read_text())
        assert f.name == f"{f.name[:4]}-{n['event_type']}.json", f.name
        out.append({**n, "number": f.name[:4]})
    return out


CAPTURED = {release: _load(release) for release in RELEASES}


def replay(n: dict) -> Event | None:
    return parse(n["event_type"], n["payload"], n["metadata"], n["priority"])


def _props(n: dict) -> dict:
    payload = n["payload"]
    props = payload.get("properties") if isinstance(payload, dict) else None
    return props if isinstance(props, dict) else {}


def _task_id(n: dict) -> str | None:
    """The task a task.* notification is about."""
    if n["event_type"].startswith("task.") and isinstance(n["payload"], dict):
        return n["payload"]["id"]
    return None


def _tasks(notifications: list[dict]) -> list[str]:
    """Import tasks in the order Glance created them."""
    return [_task_id(n) for n in notifications if n["event_type"] == "task.create"]


def _task_story(notifications: list[dict], task: str) -> list[dict]:
    """From the task's task.create to the last notification about it (its end, its task.run
    or an image event holding its lock)."""
    about = [i for i, n in enumerate(notifications)
             if _task_id(n) == task or _props(n).get("os_glance_import_task") == task]
    start = next(i for i, n in enumerate(notifications)
                 if n["event_type"] == "task.create" and _task_id(n) == task)
    return notifications[start:max(about) + 1]


def _shape(n: dict, task: str | None = None) -> tuple:
    """What imagesync reads from one notification, without ids and times."""
    event = replay(n)
    props = _props(n)
    return (n["event_type"], n["priority"], event.kind if event else None,
            event.status if event else None, props.get("os_glance_importing_to_stores"),
            props.get("os_glance_failed_import"),
            event is not None and event.task_id is not None and event.task_id == task)


def _numbered(release: str, first: str, last: str) -> list[dict]:
    return [n for n in CAPTURED[release] if first <= n["number"] <= last]


# --- every notification of every release ------------------------------------------------


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_image_notification_names_its_image_and_status(release):
    checked = 0
    for n in CAPTURED[release]:
        payload, event = n["payload"], replay(n)
        if not n["event_type"].startswith("image.") or n["event_type"] == "image.send":
            continue
        assert event is not None, n["number"]
        assert event.event_type == n["event_type"]
        assert event.message_id == n["metadata"]["message_id"]
        assert event.timestamp is not None, n["number"]
        if n["priority"] == "error":  # a store failed: Glance's sentence names the image
            assert event.kind is EventKind.UPLOAD_FAILED, n["number"]
            assert event.image_id in payload and event.reason == payload
            continue
        kind = EventKind.DELETED if n["event_type"] == "image.delete" else EventKind.CHANGED
        assert (event.kind, event.image_id, event.status) == (kind, payload["id"],
                                                              payload["status"]), n["number"]
        assert event.task_id == _props(n).get("os_glance_import_task"), n["number"]
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_task_notification_carries_its_task_id_status_and_the_import_type(release):
    tasks = [n for n in CAPTURED[release] if n["event_type"].startswith("task.")]
    assert tasks
    for n in tasks:
        event = replay(n)
        assert event.kind is EventKind.TASK, n["number"]
        assert event.image_id is None  # Glance leaves the task's input out: no image id
        assert (event.task_id, event.status) == (n["payload"]["id"], n["payload"]["status"])
        assert n["payload"]["type"] == "api_image_import", n["number"]


@pytest.mark.parametrize("release", list(RELEASES))
def test_task_run_comes_after_a_success_with_a_stale_pending_and_never_after_a_failure(
        release):
    notifications = CAPTURED[release]
    for task in _tasks(notifications):
        events = [(i, n["event_type"], n["payload"]["status"]) for i, n in
                  enumerate(notifications) if _task_id(n) == task]
        ends = [e for e in events if e[1] in TASK_ENDS]
        runs = [e for e in events if e[1] == "task.run"]
        if not ends:  # a 33 capture may end mid-import
            continue
        assert len(ends) == 1, (release, task, events)
        if ends[0][1] == "task.success":
            assert [status for _, _, status in runs] == ["pending"], (release, task)
            assert runs[0][0] > ends[0][0], (release, task)
        else:
            assert runs == [], (release, task)


# --- the older releases' story, against Glance 33 -------------------------------------------


@pytest.mark.parametrize("release", OLDER)
def test_the_story_parses_into_these_events(release):
    notifications = CAPTURED[release]
    assert collections.Counter(n["event_type"] for n in notifications) == {
        "image.create": 1, "image.update": 14, "image.prepare": 5, "image.upload": 5,
        "image.activate": 1, "image.delete": 1,
        "task.create": 3, "task.processing": 3, "task.success": 2, "task.failure": 1,
        "task.run": 2}
    assert collections.Counter(replay(n).kind for n in notifications) == {
        EventKind.CHANGED: 24, EventKind.TASK: 11, EventKind.UPLOAD_FAILED: 2,
        EventKind.DELETED: 1}
    images = {replay(n).image_id for n in notifications if not _task_id(n)}
    assert len(images) == 1
    ends = [n["event_type"] for n in notifications if n["event_type"] in TASK_ENDS]
    assert ends == ["task.success", "task.failure", "task.success"]


@pytest.mark.parametrize("release", OLDER)
def test_an_upload_sends_what_glance_33_sends(release):
    notifications = CAPTURED[release]
    first_task = next(i for i, n in enumerate(notifications) if n["event_type"] == "task.create")
    upload = notifications[:first_task]
    assert [_shape(n) for n in upload] == [_shape(n) for n in _numbered("33", *UPLOAD_33)]
    assert [(n["event_type"], replay(n).status, n["payload"].get("backend")) for n in upload] == [
        ("image.create", "queued", None), ("image.update", "saving", None),
        ("image.prepare", "saving", "fast"), ("image.upload", "active", None),
        ("image.activate", "active", None), ("image.update", "active", None)]


@pytest.mark.parametrize("release", OLDER)
@pytest.mark.parametrize(("step", "task_33"), [(0, FAILING_STORE_33), (1, MUST_SUCCEED_33),
                                               (2, ONE_STORE_33)])
def test_each_copy_image_sends_what_glance_33_sends(release, step, task_33):
    """Step 0: slow and edge, edge fails, the task succeeds; 1: edge must succeed and fails;
    2: edge works. Same events, order, priorities, statuses, importing/failed properties, and
    the lock on the same image.update events as Glance 33's import of the same stores."""
    notifications = CAPTURED[release]
    task = _tasks(notifications)[step]
    ours = [_shape(n, task) for n in _task_story(notifications, task)]
    theirs = [_shape(n, task_33) for n in _task_story(CAPTURED["33"], task_33)]
    assert ours == theirs


@pytest.mark.parametrize("release", OLDER)
def test_image_updates_after_the_import_post_carry_its_task_and_nothing_else_does(release):
    notifications = CAPTURED[release]
    holder = None  # the task whose lock the image holds, as the notifications show it
    locked = []
    for n in notifications:
        event = replay(n)
        if n["event_type"] == "task.create":
            holder = event.task_id
        elif event.kind is EventKind.CHANGED and n["event_type"] != "image.create" and \
                holder is not None:
            assert event.task_id == holder, n["number"]
            locked.append(n["event_type"])
        elif event.kind in (EventKind.CHANGED, EventKind.DELETED):
            assert event.task_id is None, n["number"]  # the upload, and the delete after
        if n["event_type"] in TASK_ENDS:
            holder = None
    # after each POST: update (importing set), update (lock taken), prepare, upload, ...
    assert locked[:4] == ["image.update", "image.update", "image.prepare", "image.upload"]
    assert len(locked) == 8 + 4 + 6


@pytest.mark.parametrize("release", OLDER)
def test_a_store_that_cannot_be_written_is_a_failed_upload_of_the_image(release):
    failed = [n for n in CAPTURED[release] if n["priority"] == "error"]
    assert [n["event_type"] for n in failed] == ["image.upload", "image.upload"]
    for n in failed:
        event = replay(n)
        assert event.kind is EventKind.UPLOAD_FAILED
        assert event.reason.startswith(f"Failed to upload image data for image {event.image_id}"
                                       " due to internal error: [Errno 1] Operation not "
                                       "permitted: ")
        assert "/glance/stores/edge/" in event.reason
        assert event.quota is False
        # then the image says which store failed
        after = CAPTURED[release][CAPTURED[release].index(n) + 1]
        assert _props(after)["os_glance_failed_import"] == "edge"


@pytest.mark.parametrize("release", OLDER)
def test_the_notifications_carry_no_identity(release):
    for n in CAPTURED[release]:
        assert n["ctxt"] == {"client_timeout": None}, n["number"]
        assert n["publisher_id"] == "image.localhost"
        assert "token" not in json.dumps(n).lower(), n["number"]
