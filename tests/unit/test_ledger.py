"""Stories about the SQLite ledger, on a real file: events in, copies claimed, results recorded.

Every test gets its own ledger under tmp_path and closes it. Time is passed in (`now`); the
ledger never reads a clock. Rows are checked through a separate connection, as `imagesync
status` would see them, so "written" always means "committed".
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import re
import sqlite3
import stat
import threading
import time

import pytest

from imagesync.errors import FORBIDDEN_MESSAGE, Action, Kind, Outcome
from imagesync.events import Event, EventKind, parse
from imagesync.ledger import (
    RETRY,
    RETRY_NOW,
    SCHEMA,
    SPLIT_AFTER,
    Ledger,
    LedgerError,
    Ops,
    open_readonly,
)
from imagesync.model import IMPORT_TASK, Image
from imagesync.planner import MIN_POLL, Settings

T0 = 1_800_000_000.0
SETTINGS = Settings(max_attempts=4, backoff=lambda attempt: 100.0 * attempt, poll_interval=2.0,
                    lock_poll=60.0, lock_expiry=3600.0)
RULE = ("everywhere",)
UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs 3.11)
_IN_REPO = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "glance-notifications"
NOTIFICATIONS = _IN_REPO if _IN_REPO.is_dir() else pathlib.Path("/work/shared/glance-notifications")


def image_id(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-000000000000"


def image(n: int = 1, stores=("fast",), status="active", size=100, lock=None) -> Image:
    return Image(image_id(n), name=f"image-{n}", status=status, stores=frozenset(stores),
                 size=size, disk_format="raw",
                 properties={IMPORT_TASK: lock} if lock else {})


def event(n: int, ts: float, status: str | None = "active",
          kind: EventKind = EventKind.CHANGED) -> Event:
    return Event(kind, image_id(n), "image.update",
                 datetime.datetime.fromtimestamp(ts, UTC), None, status=status)


def captured(name: str) -> Event:
    body = json.loads((NOTIFICATIONS / name).read_text())
    return parse(body["event_type"], body["payload"], body["metadata"], body["priority"])


@pytest.fixture
def path(tmp_path) -> pathlib.Path:
    return tmp_path / "state" / "ledger.db"


@pytest.fixture
def ledger(path):
    handle = Ledger(path)
    yield handle
    handle.close()


def query(path, sql: str, *args) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def image_row(path, n: int = 1) -> dict:
    rows = query(path, "SELECT * FROM images WHERE id = ?", image_id(n))
    return rows[0] if rows else {}


def copies(path, n: int = 1) -> dict[str, dict]:
    return {r["store"]: r for r in query(path, "SELECT * FROM copies WHERE image_id = ?",
                                         image_id(n))}


def plan(ledger, img: Image, *wanted: str, now: float = T0):
    return ledger.record_visit(img.id, img, {s: RULE for s in wanted}, {}, now, SETTINGS)


def claim(ledger, now=T0 + 10, max_imports=10, per_store=10, max_bytes_in_flight=0,
          max_bytes_per_hour=0, limit=10):
    return ledger.claim(now, max_imports, per_store, max_bytes_in_flight, max_bytes_per_hour,
                        limit)


# -- the file -------------------------------------------------------------------------------


def test_the_ledger_file_and_its_write_ahead_log_are_private(ledger, path):
    ledger.save_policy("/etc/imagesync/policy.yaml", "version: 1\nrules: []\n", T0)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    wal = path.with_name(path.name + "-wal")
    assert wal.exists()
    assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600


def test_the_ledger_runs_in_wal_mode(ledger, path):
    assert query(path, "PRAGMA journal_mode")[0]["journal_mode"] == "wal"


# -- notifications --------------------------------------------------------------------------


def test_many_events_for_one_image_become_one_row_to_look_at_now(ledger, path):
    # Given a burst of 300 image.update notifications for one image
    burst = [event(1, T0 - 300 + i) for i in range(300)]
    # When they are noted in one batch
    assert ledger.note_events(burst, T0) == 1
    # Then one image row is due now, and every event was counted
    assert query(path, "SELECT id, look_at FROM images") == [{"id": image_id(1), "look_at": T0}]
    assert query(path, "SELECT events_total FROM daemon")[0]["events_total"] == 300


@pytest.mark.parametrize("batches", ["one batch", "two batches"])
def test_the_newest_notification_decides_the_status_even_when_it_arrives_first(
        ledger, path, batches):
    newer, older = event(1, T0 - 10, "active"), event(1, T0 - 20, "deactivated")
    if batches == "one batch":
        ledger.note_events([newer, older], T0)
    else:
        ledger.note_events([newer], T0)
        ledger.note_events([older], T0 + 1)
    assert image_row(path)["status"] == "active"
    assert image_row(path)["last_event_at"] == T0 - 10


def test_events_do_not_move_the_look_at_of_an_image_with_a_copy_in_flight(ledger, path):
    # Given our import of image 1 is in flight and polled at T0 + 12
    plan(ledger, image(1), "fast", "slow")
    claim(ledger, now=T0 + 10)
    ledger.record_started(image_id(1), T0 + 12, T0 + 10)
    # When the import's own image.update events arrive
    ledger.note_events([event(1, T0 + 11)], T0 + 11)
    # Then the poll time is kept: the events do not start a re-plan of their own
    assert image_row(path)["look_at"] == T0 + 12


@pytest.mark.parametrize("during", [True, False])
def test_a_notification_noted_while_a_visit_s_get_was_out_is_not_lost(ledger, path, during):
    # Given an image looked at: its GET sent at T0 + 1 answers "saving" (upload not done)
    ledger.note_events([event(1, T0, status="saving")], T0)
    # When Glance's activate notification is noted while that GET is out (or before it)
    noted = T0 + 2 if during else T0 + 0.5
    ledger.note_events([event(1, noted, status="active")], noted)
    ledger.record_visit(image_id(1), image(1, status="saving"), {"slow": RULE}, {}, T0 + 3,
                        SETTINGS, T0 + 1)
    # Then the image is looked at again (at once, or in a moment: Glance notifies before
    # its commit, so a GET right after image.activate can still say saving), not left
    # waiting for a notification that came already
    assert image_row(path)["look_at"] == (noted if during else T0 + 3 + MIN_POLL)
    # and a GET that says saving long after the notification is believed
    ledger.record_visit(image_id(1), image(1, status="saving"), {"slow": RULE}, {}, T0 + 30,
                        SETTINGS, T0 + 29)
    assert image_row(path)["look_at"] is None


def test_events_during_a_poll_s_get_do_not_bring_the_next_poll_at_once(ledger, path):
    # Given our import of image 1 in flight, its poll due at T0 + 11 and sent then
    plan(ledger, image(1), "fast", "slow")
    claim(ledger, now=T0 + 10)
    ledger.record_started(image_id(1), T0 + 11, T0 + 10)
    # When the import's own image.update events are noted while that GET is out
    ledger.note_events([event(1, T0 + 11.1)], T0 + 11.1)
    ledger.record_visit(image_id(1), image(1, lock="t"), {"slow": RULE}, {}, T0 + 11.2,
                        SETTINGS, T0 + 11)
    # Then the next poll is the planner's (poll_interval after the start, 2 s), not the
    # due look that brought this one (which would bring a poll after every event)
    assert image_row(path)["look_at"] == T0 + 11.2 + SETTINGS.poll_interval


def test_a_deleted_image_is_looked_at_only_when_a_copy_of_ours_is_open_or_failed(ledger, path):
    # Given image 1 with a copy pending, image 2 with every copy done, image 3 never seen
    plan(ledger, image(1), "fast", "slow")
    plan(ledger, image(2, ("fast", "slow")), "fast", "slow")
    # When Glance says all three were deleted
    ledger.note_events([event(n, T0 + 5, None, EventKind.DELETED) for n in (1, 2, 3)], T0 + 5)
    # Then only image 1 is looked at (its copy must be cancelled); the others are recorded
    # deleted with no look: no GET only to hear 404, nothing ahead of a new upload's look
    rows = {r["id"]: (r["look_at"], r["deleted"], r["status"])
            for r in query(path, "SELECT id, look_at, deleted, status FROM images")}
    assert rows == {image_id(1): (T0 + 5, 0, "deleted"), image_id(2): (None, 1, "deleted"),
                    image_id(3): (None, 1, "deleted")}


def test_the_lock_named_by_a_notification_lets_the_task_s_end_finish_our_import(ledger, path):
    # Given our import of image 1 in flight, polled only in two seconds, and no poll has seen
    # its lock: Glance's image.update names it (os_glance_import_task)
    locked = captured("0010-image.update.json")
    img = image(1)
    plan(ledger, dataclasses.replace(img, id=locked.image_id), "fast", "slow")
    claim(ledger, now=T0 + 10)
    ledger.record_started(locked.image_id, T0 + 12, T0 + 10)
    ledger.note_events([locked], T0 + 10.1)
    # When the task's success arrives (before Glance drops the lock)
    ledger.note_events([captured("0015-task.success.json")], T0 + 10.5)
    # Then the image is looked at now, and the ledger knows that task ended well
    row = query(path, "SELECT look_at, lock_task, lock_task_status FROM images WHERE id = ?",
                locked.image_id)[0]
    assert row == {"look_at": T0 + 10.5, "lock_task": locked.task_id,
                   "lock_task_status": "success"}
    # and a late task.run (stale "pending") changes nothing of that, nor brings a look of
    # its own once the look for task.success is planned (Glance 33 sends it last)
    still_locked = dataclasses.replace(image(1, lock=locked.task_id), id=locked.image_id)
    ledger.record_visit(locked.image_id, still_locked, {"slow": RULE}, {}, T0 + 10.55,
                        SETTINGS, T0 + 10.5)
    look = image_row_of(path, locked.image_id)["look_at"]
    ledger.note_events([captured("0016-task.run.json")], T0 + 10.6)
    assert image_row_of(path, locked.image_id)["lock_task_status"] == "success"
    assert image_row_of(path, locked.image_id)["look_at"] == look


def image_row_of(path, image_id: str) -> dict:
    return query(path, "SELECT * FROM images WHERE id = ?", image_id)[0]


def test_a_finished_import_task_wakes_the_image_whose_lock_it_holds(ledger, path):
    # Given two images held by other imports (the lock ids come from captured notifications)
    locked = captured("0010-image.update.json")
    plan(ledger, image(1, lock=locked.task_id), "fast", "slow")
    plan(ledger, image(2, lock="4271dcf7-d1f2-49b4-923b-226246b6b94b"), "fast", "slow")
    # When Glance says the first one's task is still processing, nothing changes
    ledger.note_events([captured("0008-task.processing.json")], T0 + 3)
    assert image_row(path, 1)["look_at"] == T0 + SETTINGS.lock_poll
    # When that task succeeds, Then only its image is looked at now
    ledger.note_events([captured("0015-task.success.json")], T0 + 5)
    assert image_row(path, 1)["look_at"] == T0 + 5
    assert image_row(path, 2)["look_at"] == T0 + SETTINGS.lock_poll


# -- claiming copies ------------------------------------------------------------------------


def test_claim_marks_copies_in_flight_and_counts_the_attempt_before_returning(ledger, path):
    plan(ledger, image(1), "fast", "slow", "edge")
    claims = claim(ledger, now=T0 + 10)
    assert claims == [(image_id(1), ["edge", "slow"], 100)]
    # Read through another connection: already committed when claim returned
    rows = copies(path)
    assert {s: (r["state"], r["attempts"]) for s, r in rows.items()} == {
        "fast": ("done", 0), "slow": ("in_flight", 1), "edge": ("in_flight", 1)}
    assert rows["slow"]["started_at"] == T0 + 10
    assert image_row(path)["import_started_at"] == T0 + 10
    # A look is already scheduled: if the POST's outcome cannot be recorded, it is still polled
    assert image_row(path)["look_at"] == T0 + 10 + 1.0


def test_an_import_that_takes_the_image_out_of_a_store_it_was_in_halts_the_image(ledger, path):
    # Given the image was in fast when our import to slow and edge was claimed
    plan(ledger, image(1), "fast", "slow", "edge")
    claim(ledger, now=T0 + 10)
    # When the import ends with the image in edge only (fast deleted by Glance)
    gone = dataclasses.replace(image(1), stores=frozenset({"edge"}))
    plan(ledger, gone, "fast", "slow", "edge", now=T0 + 20)
    # Then nothing is left to copy: fast and slow are failed, lost_copy, and nothing is claimed
    rows = copies(path)
    assert {s: (r["state"], r["error_kind"]) for s, r in rows.items()} == {
        "fast": ("failed", "lost_copy"), "slow": ("failed", "lost_copy"), "edge": ("done", None)}
    assert claim(ledger, now=T0 + 30) == []


def test_claim_keeps_to_max_imports_counted_in_images(ledger):
    for n in (1, 2, 3):
        plan(ledger, image(n), "slow", "edge", now=T0 + n)
    assert [c[0] for c in claim(ledger, max_imports=2)] == [image_id(1), image_id(2)]
    assert claim(ledger, max_imports=2) == []
    # Two images (four copies) are in flight: a cap of three leaves room for one more image
    assert [c[0] for c in claim(ledger, max_imports=3)] == [image_id(3)]


def test_claim_waits_for_room_in_all_an_image_s_stores_then_splits_after_the_bound(ledger):
    # Given slow can take one import and image 1 takes it; image 2 needs slow and edge
    plan(ledger, image(1), "slow", now=T0 + 1)
    plan(ledger, image(2), "slow", "edge", now=T0 + 2)
    assert claim(ledger, per_store=1) == [(image_id(1), ["slow"], 100)]
    # Then image 2 waits for slow rather than reading its data into staging twice
    assert claim(ledger, now=T0 + 2 + SPLIT_AFTER - 1, per_store=1) == []
    # Once it has waited split_imports_after, it goes to the store with room
    assert claim(ledger, now=T0 + 2 + SPLIT_AFTER, per_store=1) == [(image_id(2), ["edge"], 100)]


def test_claim_keeps_to_max_bytes_in_flight(ledger):
    plan(ledger, image(1, size=100), "slow", now=T0 + 1)
    plan(ledger, image(2, size=100), "slow", now=T0 + 2)
    assert [c[0] for c in claim(ledger, max_bytes_in_flight=150)] == [image_id(1)]
    assert claim(ledger, max_bytes_in_flight=150) == []


def test_claim_lets_one_image_larger_than_the_byte_cap_through_whole_when_nothing_is_in_flight(
        ledger):
    plan(ledger, image(1, size=10_000), "slow", "edge")
    assert claim(ledger, max_bytes_in_flight=150) == [(image_id(1), ["edge", "slow"], 10_000)]


def test_claim_keeps_to_max_bytes_per_hour_and_frees_up_after_an_hour(ledger):
    plan(ledger, image(1, size=100), "slow", now=T0 + 1)
    plan(ledger, image(2, size=100), "slow", now=T0 + 2)
    assert [c[0] for c in claim(ledger, now=T0 + 10, max_bytes_per_hour=150)] == [image_id(1)]
    assert claim(ledger, now=T0 + 20, max_bytes_per_hour=150) == []
    assert [c[0] for c in claim(ledger, now=T0 + 3611, max_bytes_per_hour=150)] == [image_id(2)]


def test_claim_skips_an_image_held_by_a_lock_that_is_not_stale(ledger, path):
    plan(ledger, image(1, lock="7a0c9f2e-55b1-4f0e-9d65-3c1a2b3c4d5e"), "fast", "slow")
    assert claim(ledger) == []
    assert copies(path)["slow"]["state"] == "pending"


def test_claim_sends_an_image_whose_lock_is_stale_so_that_glance_breaks_it(ledger):
    task = "7a0c9f2e-55b1-4f0e-9d65-3c1a2b3c4d5e"
    held = image(1, lock=task)
    plan(ledger, held, "fast", "slow")
    ledger.record_lock_task(held.id, task, "processing", T0 - 4000)
    plan(ledger, held, "fast", "slow", now=T0 + 1)
    assert claim(ledger, now=T0 + 2) == [(held.id, ["slow"], 100)]


def test_claim_skips_an_image_that_is_not_active(ledger):
    plan(ledger, image(1, status="deactivated"), "fast", "slow")
    assert claim(ledger) == []


def test_claim_skips_an_image_due_for_a_visit_until_it_has_been_re_read(ledger):
    plan(ledger, image(1), "fast", "slow")
    ledger.note_events([event(1, T0 + 5)], T0 + 5)   # something changed: re-read first
    assert claim(ledger, now=T0 + 10) == []
    plan(ledger, image(1), "fast", "slow", now=T0 + 11)
    assert [c[0] for c in claim(ledger, now=T0 + 12)] == [image_id(1)]


# -- one copy from start to end -------------------------------------------------------------


def test_a_copy_is_planned_claimed_started_and_done_when_the_store_shows(ledger, path):
    # Given image 1 is in fast and the policy wants slow too
    plan(ledger, image(1, stores=("fast",)), "fast", "slow", now=T0)
    # When it is claimed, the POST is accepted, and the next poll shows slow without a lock
    claim(ledger, now=T0 + 1)
    ledger.record_started(image_id(1), T0 + 3, T0 + 1)
    visit, before = plan(ledger, image(1, stores=("fast", "slow")), "fast", "slow", now=T0 + 3)
    # Then the copy is done after one attempt, and the import is over
    assert before["slow"].state == "in_flight"
    slow = copies(path)["slow"]
    assert (slow["state"], slow["attempts"], slow["finished_at"]) == ("done", 1, T0 + 3)
    assert visit.import_over
    assert image_row(path)["import_started_at"] is None
    assert ledger.counts() == {"done": 2}


def test_a_restart_marks_images_with_copies_in_flight_recovering_and_due(ledger, path):
    plan(ledger, image(1), "fast", "slow", now=T0 + 1)
    plan(ledger, image(2), "fast", "slow", now=T0 + 2)
    claim(ledger, now=T0 + 3, max_imports=1)
    assert ledger.recover(T0 + 100) == 1
    assert (image_row(path, 1)["recovering"], image_row(path, 1)["look_at"]) == (1, T0 + 100)
    assert (image_row(path, 2)["recovering"], image_row(path, 2)["look_at"]) == (0, None)


def test_a_retry_request_re_queues_failed_copies_with_fresh_attempts(ledger, path):
    # Given slow failed for good (copy-image is forbidden)
    plan(ledger, image(1), "fast", "slow")
    claim(ledger, now=T0 + 1)
    forbidden = Outcome(Kind.FORBIDDEN, Action.BLOCK, FORBIDDEN_MESSAGE, 403)
    ledger.record_outcome(image_id(1), ["slow"], forbidden, T0 + 2, SETTINGS)
    assert copies(path)["slow"]["state"] == "failed"
    # When an operator runs `imagesync retry` and the daemon picks the request up
    ledger.add_request("retry", image_id(1), T0 + 50)
    assert ledger.process_requests(T0 + 60) == [("retry", image_id(1), 1)]
    # Then the copy is pending with its attempts reset, and the image is looked at now
    slow = copies(path)["slow"]
    assert (slow["state"], slow["attempts"], slow["next_attempt_at"]) == ("pending", 0, None)
    assert image_row(path)["look_at"] == T0 + 60
    assert ledger.process_requests(T0 + 61) == []   # a request is taken once


def test_retry_now_also_brings_forward_retrying_copies_keeping_their_history(ledger, path):
    # Given edge failed for good, and slow failed twice and waits an hour for its next try
    plan(ledger, image(1), "fast", "slow", "edge")
    claim(ledger, now=T0 + 1)
    forbidden = Outcome(Kind.FORBIDDEN, Action.BLOCK, FORBIDDEN_MESSAGE, 403)
    ledger.record_outcome(image_id(1), ["edge"], forbidden, T0 + 2, SETTINGS)
    ledger.submit(lambda ops: ops.x(
        "UPDATE copies SET state = 'retrying', attempts = 2, next_attempt_at = ?, "
        "error_kind = 'copy_failed', error_message = 'store full' WHERE store = 'slow'",
        (T0 + 3600,))).result(5)
    # When a plain retry is taken, only the failed copy is re-queued
    ledger.add_request(RETRY, image_id(1), T0 + 10)
    assert ledger.process_requests(T0 + 10) == [(RETRY, image_id(1), 1)]
    assert copies(path)["slow"]["next_attempt_at"] == T0 + 3600
    # When `retry --now` is taken, the retrying copy is due now, its attempts and error kept
    ledger.add_request(RETRY_NOW, image_id(1), T0 + 20)
    assert ledger.process_requests(T0 + 20) == [(RETRY_NOW, image_id(1), 1)]
    slow = copies(path)["slow"]
    assert (slow["state"], slow["next_attempt_at"], slow["attempts"], slow["error_message"]) \
        == ("retrying", None, 2, "store full")
    assert image_row(path)["look_at"] == T0 + 20
    request = query(path, "SELECT result FROM requests ORDER BY id DESC LIMIT 1")[0]
    assert request["result"] == "0 copies re-queued, 1 retrying copies due now"
    # Then, once the image is re-read, both stores go in one import
    plan(ledger, image(1), "fast", "slow", "edge", now=T0 + 21)
    assert claim(ledger, now=T0 + 22) == [(image_id(1), ["edge", "slow"], 100)]


def test_retry_now_for_every_image_brings_forward_all_retrying_copies(ledger, path):
    for n in (1, 2):
        plan(ledger, image(n), "fast", "slow", now=T0 + n)
    ledger.submit(lambda ops: ops.x("UPDATE copies SET state = 'retrying', attempts = 1, "
                                    "next_attempt_at = ? WHERE store = 'slow'",
                                    (T0 + 3600,))).result(5)
    ledger.add_request(RETRY_NOW, None, T0 + 10)
    assert ledger.process_requests(T0 + 10) == [(RETRY_NOW, None, 2)]
    assert query(path, "SELECT count(*) AS n FROM copies WHERE next_attempt_at IS NULL "
                       "AND state = 'retrying'")[0]["n"] == 2


def test_the_last_good_policy_survives_in_the_ledger(ledger):
    assert ledger.last_policy() is None
    ledger.save_policy("/etc/imagesync/policy.yaml", "version: 1\nrules: []\n", T0)
    ledger.save_policy("/etc/imagesync/policy.yaml", "version: 1\nrules: [] # v2\n", T0 + 1)
    assert ledger.last_policy() == ("/etc/imagesync/policy.yaml", "version: 1\nrules: [] # v2\n")


# -- readers --------------------------------------------------------------------------------


def test_reading_a_missing_ledger_fails_with_a_clear_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "ledger.db"
    with pytest.raises(LedgerError, match=re.escape(str(missing))):
        open_readonly(missing)
    assert not missing.exists()


def test_a_reader_sees_what_the_running_daemon_committed(ledger, path):
    plan(ledger, image(1), "fast", "slow")
    reader = open_readonly(path)
    try:
        states = dict(reader.execute("SELECT store, state FROM copies").fetchall())
    finally:
        reader.close()
    assert states == {"fast": "done", "slow": "pending"}


def test_a_read_in_progress_does_not_block_the_writer(ledger, path):
    plan(ledger, image(1), "fast", "slow")
    reader = open_readonly(path)
    try:
        reader.execute("BEGIN")
        before = reader.execute("SELECT count(*) FROM images").fetchone()[0]
        # When the daemon writes while the reader's transaction is open
        ledger.submit(Ops.record_visit, image_id(2), image(2), {"fast": RULE}, {}, T0,
                      SETTINGS).result(timeout=5)
        # Then the write committed, and the reader keeps its consistent snapshot
        assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == before == 1
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 2
    finally:
        reader.close()


def test_a_reader_refuses_a_ledger_written_by_a_newer_imagesync(path):
    Ledger(path).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                     "VALUES ('imagesync', 'm999_from_the_future', '2030-01-01')")
    conn.close()
    with pytest.raises(LedgerError, match="m999_from_the_future"):
        open_readonly(path)

def test_the_readers_list_of_migrations_is_the_writers():
    from imagesync.ledger.migrate import migrations

    assert SCHEMA == [m.name for m in migrations._migrations]


# -- group commit ---------------------------------------------------------------------------


def _raises_python_error(ops: Ops):
    ops.add_request("sync", "doomed", T0)
    raise ValueError("bad operation")


def _raises_sqlite_error(ops: Ops):
    ops.add_request("sync", "doomed", T0)
    ops.x("INSERT INTO copies (image_id, store, state, created_at, updated_at) "
          "VALUES ('x', 'y', 'no-such-state', 0, 0)")


@pytest.mark.parametrize(("bad", "error"), [(_raises_python_error, ValueError),
                                            (_raises_sqlite_error, sqlite3.IntegrityError)])
def test_one_failing_operation_gets_its_error_while_the_rest_of_its_group_commits(
        ledger, path, bad, error):
    # Given the writer is busy, so that everything submitted meanwhile forms one group
    gate = threading.Event()
    busy = ledger.submit(lambda ops: gate.wait(5))
    futures: dict[str, object] = {}

    def submit(name, fn, *args):
        futures[name] = ledger.submit(fn, *args)

    threads = [threading.Thread(target=submit, args=(f"sync-{i}", Ops.add_request, "sync",
                                                      f"image-{i}", T0)) for i in range(4)]
    threads.append(threading.Thread(target=submit, args=("bad", bad)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    gate.set()
    assert busy.result(5) is True
    # Then the failing operation's caller gets its exception, and nothing it wrote is kept
    with pytest.raises(error):
        futures["bad"].result(5)
    assert all(isinstance(futures[f"sync-{i}"].result(5), int) for i in range(4))
    requested = {r["image_id"] for r in query(path, "SELECT image_id FROM requests")}
    assert requested == {f"image-{i}" for i in range(4)}


# -- throughput (reported, not asserted) ----------------------------------------------------


def test_note_events_throughput_is_reported(ledger, path, capsys):
    images, total, batch = 5_000, 50_000, 200
    events = [event(i % images, T0 + i / 1000) for i in range(total)]
    started = time.perf_counter()
    for first in range(0, total, batch):
        ledger.note_events(events[first:first + batch], T0 + 60)
    seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nnote_events: {total} events over {images} images in batches of {batch}: "
              f"{total / seconds:,.0f} events/s ({seconds:.2f} s)")
    assert query(path, "SELECT count(*) AS n FROM images")[0]["n"] == images


# -- the first pass over images already in place ---------------------------------------------


def test_a_first_pass_trusts_the_listing_for_images_already_where_the_policy_wants_them(
        ledger, path):
    # Given a fresh ledger, and the listing of four images
    placed = image(1, stores=("fast", "slow"))                       # in every wanted store
    missing = image(2, stores=("fast",))                             # needs a copy
    locked = image(3, stores=("fast", "slow"), lock="task-3")        # an import is on it
    qcow = dataclasses.replace(image(4, stores=("fast",)), disk_format="qcow2")   # skipped
    items = [(placed, {"fast": RULE, "slow": RULE}, {}),
             (missing, {"fast": RULE, "slow": RULE}, {}),
             (locked, {"fast": RULE, "slow": RULE}, {}),
             (qcow, {"fast": RULE}, {"ceph": (RULE, "qcow2 image on rbd store ceph")})]
    # When the reconciler records them
    done = ledger.reconcile_page(items, T0)
    # Then the ones the listing settles get their rows with no look; the others are looked at
    assert (done.marked, done.trusted) == (2, 2)
    assert {s: c["state"] for s, c in copies(path, 1).items()} == {"fast": "done", "slow": "done"}
    assert {s: (c["state"], c["error_kind"]) for s, c in copies(path, 4).items()} == \
        {"fast": ("done", None), "ceph": ("cancelled", "skipped")}
    looked = {r["id"]: r["look_at"] for r in query(path, "SELECT id, look_at FROM images")}
    assert looked == {image_id(1): None, image_id(2): T0, image_id(3): T0, image_id(4): None}
    assert image_row(path, 1)["seen_at"] == T0 and image_row(path, 2)["seen_at"] is None
    # and the next pass has nothing more to say about them
    assert ledger.reconcile_page(items[:1] + items[3:], T0 + 600) == (0, 0)
