"""Stories about planning one image: what each (image, store) copy becomes after a fresh GET.

The planner is pure: the clock (`now`) and the retry policy (`Settings.backoff`) are handed in,
so every story below runs instantly and gives the same answer every time.
"""

from __future__ import annotations

import dataclasses

import pytest

from imagesync.errors import FORBIDDEN_MESSAGE, Action, Kind, Outcome
from imagesync.model import FAILED_IMPORT, IMPORT_TASK, IMPORTING_TO, Image
from imagesync.planner import (
    CANCELLED,
    DONE,
    FAILED,
    IN_FLIGHT,
    PENDING,
    RETRYING,
    Copy,
    Settings,
    StoreInfo,
    Tracking,
    apply_outcome,
    plan_visit,
    targets,
)
from imagesync.policy import parse_policy

IMAGE_ID = "1d818d51-f1d8-4f02-a97d-aeedcba99c00"
OUR_TASK = "e34cac94-b56e-40c0-9fee-6f52c8ea8985"
FOREIGN_TASK = "7a0c9f2e-55b1-4f0e-9d65-3c1a2b3c4d5e"
NOW = 1_800_000_000.0
# Deterministic retry policy: attempt n waits 100 * n seconds.
SETTINGS = Settings(max_attempts=4, backoff=lambda attempt: 100.0 * attempt,
                    quota_retry_delay=7200.0, unknown_store_tries=2, poll_interval=2.0,
                    settle_grace=20.0, lock_poll=60.0, lock_expiry=3600.0,
                    store_list_ttl=300.0, image_backoff_base=3.0)
RULE = ("everywhere",)


def image(stores=("fast",), status="active", lock=None, importing=(), failed=(),
          disk_format="raw") -> Image:
    properties = {}
    if lock:
        properties[IMPORT_TASK] = lock
    if importing:
        properties[IMPORTING_TO] = ",".join(importing)
    if failed:
        properties[FAILED_IMPORT] = ",".join(failed)
    return Image(IMAGE_ID, name="ubuntu", status=status, stores=frozenset(stores),
                 properties=properties, disk_format=disk_format, size=1024)


def want(*stores) -> dict[str, tuple[str, ...]]:
    return {store: RULE for store in stores}


def copy(store, state=PENDING, attempts=0, **fields) -> Copy:
    return Copy(IMAGE_ID, store, state=state, attempts=attempts, rules=RULE, **fields)


def rows(*copies: Copy) -> dict[str, Copy]:
    return {c.store: c for c in copies}


def visit(img, copies=(), desired=None, skipped=None, track=None, now=NOW,
          settings=SETTINGS):
    return plan_visit(img, rows(*copies), want("fast", "slow") if desired is None else desired,
                      skipped or {}, track or Tracking(), now, settings)


def importing(started=NOW - 5.0, **fields) -> Tracking:
    """Tracking of our own import, sent at `started`."""
    return Tracking(import_started_at=started, **fields)


# -- a new image ------------------------------------------------------------------------------


def test_a_new_image_gets_pending_copies_for_missing_stores_and_done_for_present_ones():
    # Given an image in fast only, and a policy that wants it in fast, slow and edge
    # When it is planned for the first time
    result = visit(image(stores=("fast",)), desired=want("fast", "slow", "edge"))
    # Then slow and edge are pending, fast is recorded as done, each with its rule
    assert {s: c.state for s, c in result.changes.items()} == \
        {"fast": DONE, "slow": PENDING, "edge": PENDING}
    assert all(c.rules == RULE and c.attempts == 0 for c in result.changes.values())
    assert result.waiting is None and not result.import_over


def test_a_store_glance_is_already_importing_to_is_not_planned_again():
    # Given someone else's import is copying the image to slow right now
    img = image(stores=("fast",), lock=FOREIGN_TASK, importing=("slow",))
    # When we plan an image whose policy wants fast, slow and edge
    result = visit(img, desired=want("fast", "slow", "edge"))
    # Then edge is queued, but slow (being imported) is not queued a second time
    assert result.changes["edge"].state == PENDING
    assert "slow" not in result.changes


def test_planning_the_same_image_twice_changes_nothing_the_second_time():
    first = visit(image(stores=("fast",)))
    again = visit(image(stores=("fast",)), copies=first.changes.values())
    assert first.changes and again.changes == {}


# -- our import in flight ---------------------------------------------------------------------


def test_an_import_that_still_holds_the_lock_keeps_being_polled_even_when_the_store_shows():
    # Given our copy to slow is in flight, slow already shows, but Glance still holds the lock
    img = image(stores=("fast", "slow"), lock=OUR_TASK, importing=())
    result = visit(img, [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   track=importing(saw_lock=True))
    # Then nothing is decided yet: we look again after the poll interval
    assert result.changes == {}
    assert result.look_at == NOW + 5.0  # as long again as the 5 s the import has taken
    assert not result.import_over


def test_our_import_whose_task_finished_is_over_even_while_glance_keeps_its_lock():
    # Given glance-api stopped after our task succeeded but before it released the lock
    img = image(stores=("fast", "slow"), lock=OUR_TASK)
    track = importing(saw_lock=True, lock_task=OUR_TASK, lock_task_status="success",
                      lock_task_updated_at=NOW - 120)
    result = visit(img, [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)], track=track)
    # Then the copy is done now, not when Glance's 60-minute expiry frees the lock
    assert result.import_over
    assert result.changes["slow"].state == DONE


@pytest.mark.parametrize("ended_ago, next_look", [(1.0, 2.0), (120.0, 60.0)])
def test_a_retry_waits_for_a_lock_whose_task_ended_seconds_not_a_lock_poll(ended_ago, next_look):
    # Given our import over (slow done, edge failed and retrying now), and Glance still
    # showing the lock of our task, whose task.success came `ended_ago` s ago (Glance 2025.1
    # drops the lock later after task.success than 33 does)
    img = image(stores=("fast", "slow"), lock=OUR_TASK)
    track = Tracking(lock_task=OUR_TASK, lock_task_status="success",
                     lock_task_updated_at=NOW - ended_ago)
    result = visit(img, [copy("fast", DONE), copy("slow", DONE), copy("edge", RETRYING, 1)],
                   desired=want("fast", "slow", "edge"), track=track)
    # Then the retry waits: the image is looked at again in poll_interval while the task's
    # end is recent (a lock_poll only when Glance has kept it for long), and the lock is
    # not a foreign one to read the tasks of
    assert result.waiting.startswith(f"import lock held by task {OUR_TASK}")
    assert result.look_at == NOW + next_look
    assert result.foreign_lock is None


def test_our_import_whose_task_is_still_processing_keeps_being_polled():
    img = image(stores=("fast",), lock=OUR_TASK)
    track = importing(saw_lock=True, lock_task=OUR_TASK, lock_task_status="processing",
                      lock_task_updated_at=NOW - 120)
    result = visit(img, [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)], track=track)
    assert not result.import_over and result.look_at == NOW + 5.0


@pytest.mark.parametrize("taken, next_poll", [(0.1, 2.0), (1.0, 2.0), (4.0, 4.0), (29.0, 29.0),
                                              (50.0, 30.0), (60.0, 30.0)])
def test_an_import_is_polled_after_as_long_again_as_it_has_taken_up_to_the_long_poll(
        taken, next_poll):
    img = image(stores=("fast",), lock=OUR_TASK)
    result = visit(img, [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   track=importing(started=NOW - taken, saw_lock=True))
    assert result.look_at == pytest.approx(NOW + next_poll)


def test_an_empty_first_poll_right_after_the_post_is_neither_success_nor_failure():
    # Given we POSTed 5 s ago; Glance shows no lock yet and slow is not in stores
    result = visit(image(stores=("fast",)), [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   track=importing(started=NOW - 5.0, saw_lock=False))
    # Then the copy stays in flight and is polled again
    assert result.changes == {}
    assert result.look_at == NOW + 5.0  # as long again as the 5 s the import has taken
    assert not result.import_over


def test_an_import_that_never_showed_a_lock_is_judged_once_the_settle_grace_is_over():
    late = NOW - SETTINGS.settle_grace - 1
    result = visit(image(stores=("fast",)), [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   track=importing(started=late, saw_lock=False))
    assert result.import_over
    assert result.changes["slow"].state == RETRYING


def test_once_the_lock_is_gone_the_copy_is_done_when_the_store_shows():
    result = visit(image(stores=("fast", "slow")),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, 1, started_at=NOW - 30)],
                   track=importing(saw_lock=True))
    slow = result.changes["slow"]
    assert (slow.state, slow.attempts, slow.finished_at) == (DONE, 1, NOW)
    assert result.import_over and result.look_at is None


def test_once_the_lock_is_gone_a_missing_store_is_retried_after_the_backoff_of_its_attempt():
    # Given our third try at slow ended (lock gone) and slow is not in stores
    result = visit(image(stores=("fast",)), [copy("fast", DONE), copy("slow", IN_FLIGHT, 3)],
                   track=importing(saw_lock=True))
    # Then slow is retrying after backoff(3) = 300 s, and the image is re-read then
    slow = result.changes["slow"]
    assert (slow.state, slow.error_kind) == (RETRYING, Kind.COPY_FAILED.value)
    assert slow.next_attempt_at == NOW + 300.0
    assert result.look_at == NOW + 300.0


def test_a_copy_that_fails_its_last_allowed_attempt_is_failed_for_good():
    attempts = SETTINGS.max_attempts
    result = visit(image(stores=("fast",), failed=("slow",)),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, attempts)],
                   track=importing(saw_lock=True))
    slow = result.changes["slow"]
    assert (slow.state, slow.next_attempt_at, slow.finished_at) == (FAILED, None, NOW)
    assert "Glance reported the copy failed" in slow.error_message


def test_a_copy_that_arrives_after_its_rule_was_removed_is_done_not_cancelled():
    # Given our copy to slow was in flight when the policy stopped wanting slow
    result = visit(image(stores=("fast", "slow")),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   desired=want("fast"), track=importing(saw_lock=True))
    # Then the copy that did arrive is recorded as done (images never leave a store)
    assert result.changes["slow"].state == DONE


def test_a_store_reported_failed_but_present_in_stores_counts_as_done():
    # Given Glance lists slow in os_glance_failed_import, yet slow is in stores
    result = visit(image(stores=("fast", "slow"), failed=("slow",)),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   track=importing(saw_lock=True))
    # Then the stores field decides: the copy is done
    assert result.changes["slow"].state == DONE


def test_a_quota_upload_error_after_the_import_started_retries_after_the_quota_delay():
    # Given an error-priority image.upload with a quota reason arrived after our POST
    track = importing(started=NOW - 60, saw_lock=True, upload_error="exceed the limit",
                      upload_error_at=NOW - 10, upload_error_quota=True)
    result = visit(image(stores=("fast",), failed=("slow",)),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)], track=track)
    slow = result.changes["slow"]
    assert (slow.state, slow.error_kind) == (RETRYING, Kind.QUOTA.value)
    assert slow.next_attempt_at == NOW + SETTINGS.quota_retry_delay
    assert slow.error_message == "exceed the limit"


def test_a_quota_upload_error_from_before_the_import_started_is_not_blamed_on_it():
    track = importing(started=NOW - 60, saw_lock=True, upload_error="exceed the limit",
                      upload_error_at=NOW - 3600, upload_error_quota=True)
    result = visit(image(stores=("fast",)), [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)],
                   track=track)
    assert result.changes["slow"].error_kind == Kind.COPY_FAILED.value
    assert result.changes["slow"].next_attempt_at == NOW + 100.0


def test_an_import_that_takes_the_image_out_of_a_store_halts_every_copy_not_in_glance():
    # Given our import to slow and edge was sent while the image was in fast and west, and it
    # ended with the image in edge only: Glance deleted the fast and west copies (2025.1 does
    # this when a copy-image goes over user_storage_quota)
    track = importing(saw_lock=True, import_stores=frozenset({"fast", "west"}))
    result = visit(image(stores=("edge",), failed=("slow", "edge")),
                   [copy("west", DONE), copy("slow", IN_FLIGHT, 1), copy("edge", IN_FLIGHT, 1),
                    copy("east", RETRYING, 1, next_attempt_at=NOW + 50),
                    copy("north", CANCELLED, error_kind=Kind.NOT_WANTED.value)],
                   desired=want("west", "slow", "edge", "east"), track=track)
    # Then edge, which arrived, is done; every other wanted copy is failed for good, with a
    # reason naming the lost stores, not retried and not copied again
    assert result.changes["edge"].state == DONE
    for store in ("west", "slow", "east"):
        halted = result.changes[store]
        assert (halted.state, halted.error_kind, halted.next_attempt_at) == (
            FAILED, Kind.LOST_COPY.value, None), store
        assert "removed the image from fast, west during imagesync's copy to edge, slow" \
            in halted.error_message
        assert f"imagesync retry {IMAGE_ID}" in halted.error_message
    assert "north" not in result.changes
    assert result.import_over and result.look_at is None
    # And a later visit leaves them failed (west is not copied again although it is missing)
    later = visit(image(stores=("edge",)),
                  [*result.changes.values(), copy("north", CANCELLED)],
                  desired=want("west", "slow", "edge", "east"), now=NOW + 7200)
    assert not later.changes and later.look_at is None


def test_an_import_that_keeps_every_store_it_found_halts_nothing():
    track = importing(saw_lock=True, import_stores=frozenset({"fast"}))
    result = visit(image(stores=("fast",), failed=("slow",)),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)], track=track)
    assert result.changes["slow"].error_kind == Kind.COPY_FAILED.value


def test_after_a_restart_mid_import_a_copy_that_never_arrived_goes_back_to_pending_for_free():
    # Given the daemon stopped with slow in flight (attempt 2), and Glance shows no trace of it
    result = visit(image(stores=("fast",)), [copy("fast", DONE), copy("slow", IN_FLIGHT, 2)],
                   track=importing(started=NOW - 1, recovering=True))
    # Then slow is pending again and the attempt that may never have been sent is given back
    slow = result.changes["slow"]
    assert (slow.state, slow.attempts, slow.next_attempt_at) == (PENDING, 1, None)
    assert result.import_over


def test_our_import_cut_off_by_a_dead_glance_api_gives_its_attempt_back():
    # Given our import's task died with its glance-api: its lock aged past Glance's expiry
    img = image(stores=("fast",), lock=OUR_TASK)
    track = importing(started=NOW - 7200, saw_lock=True, lock_task=OUR_TASK,
                      lock_task_status="processing", lock_task_updated_at=NOW - 3700)
    result = visit(img, [copy("fast", DONE), copy("slow", IN_FLIGHT, 3)], track=track)
    # Then the copy is pending again, its attempt given back: the outage said nothing about it
    slow = result.changes["slow"]
    assert (slow.state, slow.attempts, slow.error_kind) == (PENDING, 2, Kind.TRANSIENT.value)
    assert "cut off" in slow.error_message
    assert result.import_over


def test_our_import_whose_lock_names_a_task_glance_lost_gives_its_attempt_back():
    img = image(stores=("fast",), lock=OUR_TASK)
    track = importing(started=NOW - 60, saw_lock=True, lock_task=OUR_TASK,
                      lock_task_status="missing")
    result = visit(img, [copy("fast", DONE), copy("slow", IN_FLIGHT, 1)], track=track)
    assert (result.changes["slow"].state, result.changes["slow"].attempts) == (PENDING, 0)


def test_after_a_restart_a_copy_glance_reported_failed_uses_its_attempt():
    result = visit(image(stores=("fast",), failed=("slow",)),
                   [copy("fast", DONE), copy("slow", IN_FLIGHT, 2)],
                   track=importing(recovering=True))
    assert (result.changes["slow"].state, result.changes["slow"].attempts) == (RETRYING, 2)


# -- the image changed ------------------------------------------------------------------------


@pytest.mark.parametrize("gone", [None, "deleted", "pending_delete", "killed"])
def test_an_image_that_is_gone_cancels_its_open_and_failed_copies_and_keeps_done_ones(gone):
    img = None if gone is None else image(status=gone)
    result = visit(img, [copy("fast", DONE), copy("slow", PENDING), copy("edge", RETRYING, 2),
                         copy("west", IN_FLIGHT, 1), copy("east", FAILED, 4)])
    # The failed copy leaves `failed` too, so an alert on failed copies clears
    assert {s: c.state for s, c in result.changes.items()} == \
        {"slow": CANCELLED, "edge": CANCELLED, "west": CANCELLED, "east": CANCELLED}
    assert all(c.error_kind == Kind.GONE.value for c in result.changes.values())
    assert result.changes["east"].attempts == 4   # its history stays
    assert result.deleted and result.import_over


def test_a_store_no_longer_wanted_cancels_open_and_failed_copies_and_leaves_done_ones_alone():
    # Given the policy used to want slow, edge, west and east; now it wants fast only
    result = visit(image(stores=("fast", "west")),
                   [copy("fast", DONE), copy("slow", PENDING), copy("edge", RETRYING, 1),
                    copy("west", DONE), copy("east", FAILED, 4, error_kind="copy_failed")],
                   desired=want("fast"))
    assert {s: c.state for s, c in result.changes.items()} == \
        {"slow": CANCELLED, "edge": CANCELLED, "east": CANCELLED}
    assert all(c.error_kind == Kind.NOT_WANTED.value for c in result.changes.values())
    assert result.changes["east"].error_message == "no rule wants this store any more"


@pytest.mark.parametrize(("used", "kept"), [(0, 0), (2, 2), (4, 3), (9, 3)])
def test_a_cancelled_copy_wanted_again_keeps_its_attempts_but_gets_at_least_one_more_try(
        used, kept):
    # Given slow was cancelled (no rule wanted it) after `used` attempts; max_attempts is 4
    cancelled = copy("slow", CANCELLED, used, error_kind=Kind.NOT_WANTED.value,
                     error_message="no rule wants this store any more", finished_at=NOW - 60)
    # When a rule wants slow again
    result = visit(image(stores=("fast",)), [copy("fast", DONE), cancelled])
    # Then it is pending with its attempts kept (a flapping policy cannot reset them), but
    # never so many that it would fail without one more try; the cancel reason is gone
    slow = result.changes["slow"]
    assert (slow.state, slow.attempts) == (PENDING, kept)
    assert (slow.error_kind, slow.error_message, slow.finished_at) == (None, None, None)


def test_a_copy_that_fails_after_being_wanted_again_fails_on_its_remaining_attempts():
    # Given a copy that used 3 of 4 attempts, was cancelled, and is wanted again
    slow = visit(image(stores=("fast",)),
                 [copy("fast", DONE), copy("slow", CANCELLED, 3)]).changes["slow"]
    # When its next attempt (the 4th) fails
    in_flight = dataclasses.replace(slow, state=IN_FLIGHT, attempts=slow.attempts + 1)
    result = visit(image(stores=("fast",), failed=("slow",)), [copy("fast", DONE), in_flight],
                   track=importing(saw_lock=True))
    # Then it is failed: the history counted
    assert result.changes["slow"].state == FAILED


def test_a_done_copy_whose_store_lost_the_image_is_copied_again_with_fresh_attempts():
    # Given slow was done after 3 attempts; then an operator deleted the image from slow
    result = visit(image(stores=("fast",)),
                   [copy("fast", DONE), copy("slow", DONE, 3, finished_at=NOW - 86400)])
    slow = result.changes["slow"]
    assert (slow.state, slow.attempts, slow.finished_at) == (PENDING, 0, None)


def test_a_deactivated_image_waits_with_a_reason_and_is_not_polled():
    result = visit(image(stores=("fast",), status="deactivated"))
    assert result.waiting == "image is deactivated"
    assert result.look_at is None
    assert result.changes["slow"].state == PENDING


# -- someone else's import holds the image ----------------------------------------------------


def test_a_foreign_lock_is_shown_as_waiting_and_named_for_a_task_lookup():
    result = visit(image(stores=("fast",), lock=FOREIGN_TASK))
    assert result.foreign_lock == FOREIGN_TASK
    assert result.waiting.startswith(f"import lock held by task {FOREIGN_TASK}")
    assert not result.lock_stale
    assert result.look_at == NOW + SETTINGS.lock_poll


def lock_seen(status: str, age: float) -> Tracking:
    return Tracking(lock_task=FOREIGN_TASK, lock_task_status=status,
                    lock_task_updated_at=NOW - age)


@pytest.mark.parametrize(("status", "age", "stale"), [
    ("processing", 3599.0, False),
    ("processing", 3600.0, True),
    ("pending", 3601.0, False),      # a pending task keeps its lock twice as long
    ("pending", 7199.0, False),
    ("pending", 7200.0, True),
])
def test_a_foreign_lock_becomes_stale_once_its_task_is_older_than_the_lock_expiry(
        status, age, stale):
    result = visit(image(stores=("fast",), lock=FOREIGN_TASK), track=lock_seen(status, age))
    assert result.lock_stale is stale
    assert (status in result.waiting) and (f"{age / 60:.0f} min ago" in result.waiting)
    assert ("stale" in result.waiting) is stale


def test_a_stale_lock_is_not_polled_because_the_next_import_breaks_it():
    result = visit(image(stores=("fast",), lock=FOREIGN_TASK),
                   track=lock_seen("processing", 4000.0))
    assert result.lock_stale and result.look_at is None


# -- targets: which stores are worth copying to -----------------------------------------------

POLICY = parse_policy("""\
version: 1
rules:
  - name: everywhere
    match: {}
    stores: all
  - name: mirror
    match: {}
    stores: [web]
""")
STORES = {
    "fast": StoreInfo("fast", "file"),
    "array": StoreInfo("array", "cinder"),
    "pool": StoreInfo("pool", "rbd"),
    "web": StoreInfo("web", "http", read_only=True),
}


def test_a_non_raw_image_skips_cinder_and_rbd_stores_and_says_why():
    desired, skipped = targets(POLICY, image(disk_format="qcow2"), STORES)
    assert set(desired) == {"fast"}
    assert set(skipped) >= {"array", "pool"}
    rules, reason = skipped["array"]
    assert rules == ("everywhere",)
    assert "qcow2" in reason and "cinder" in reason and "cannot be cloned" in reason


def test_a_read_only_store_is_never_a_target():
    desired, skipped = targets(POLICY, image(), STORES)
    assert "web" not in desired
    assert skipped["web"] == (("mirror",), "store web is read-only")


def test_a_raw_image_is_copied_to_cinder_and_rbd_stores():
    desired, skipped = targets(POLICY, image(disk_format="raw"), STORES)
    assert set(desired) == {"fast", "array", "pool"}
    assert set(skipped) == {"web"}


def test_a_skipped_store_is_recorded_as_cancelled_with_its_reason():
    desired, skipped = targets(POLICY, image(disk_format="qcow2"), STORES)
    result = plan_visit(image(disk_format="qcow2"), {}, desired, skipped, Tracking(), NOW,
                        SETTINGS)
    array = result.changes["array"]
    assert (array.state, array.error_kind) == (CANCELLED, Kind.SKIPPED.value)
    assert "cannot be cloned" in array.error_message


# -- apply_outcome: what a refused request does to its copies ---------------------------------

CLAIMED = rows(copy("slow", IN_FLIGHT, 2), copy("edge", IN_FLIGHT, 2))
BOTH = frozenset({"slow", "edge"})


def refused(kind, action, done=frozenset(), status=409, message="refused") -> Outcome:
    return Outcome(kind, action, message, status, frozenset(done))


@pytest.mark.parametrize(("kind", "action"), [(Kind.ALREADY_PRESENT, Action.REPLAN),
                                              (Kind.NOT_ACTIVE, Action.PAUSE)])
def test_a_replan_or_pause_gives_the_attempt_back(kind, action):
    changes, _ = apply_outcome(CLAIMED, BOTH, refused(kind, action), NOW, SETTINGS)
    assert {s: (c.state, c.attempts) for s, c in changes.items()} == \
        {"slow": (PENDING, 1), "edge": (PENDING, 1)}


def test_already_present_marks_the_present_store_done_and_replans_the_rest_now():
    outcome = refused(Kind.ALREADY_PRESENT, Action.REPLAN, done={"slow"}, status=400)
    changes, look_at = apply_outcome(CLAIMED, BOTH, outcome, NOW, SETTINGS)
    assert changes["slow"].state == DONE
    assert (changes["edge"].state, changes["edge"].attempts) == (PENDING, 1)
    assert look_at == NOW


def test_a_forbidden_copy_is_failed_without_a_retry():
    outcome = refused(Kind.FORBIDDEN, Action.BLOCK, status=403, message=FORBIDDEN_MESSAGE)
    changes, look_at = apply_outcome(CLAIMED, BOTH, outcome, NOW, SETTINGS)
    assert {c.state for c in changes.values()} == {FAILED}
    assert all(c.next_attempt_at is None and c.error_message == FORBIDDEN_MESSAGE
               for c in changes.values())
    assert look_at is None


def test_an_unknown_store_is_tried_a_few_times_with_backoff_then_blocked_with_the_reason():
    outcome = refused(Kind.UNKNOWN_STORE, Action.RETRY, message="Glance has no store slow")
    tries = SETTINGS.unknown_store_tries
    early, _ = apply_outcome(rows(copy("slow", IN_FLIGHT, tries - 1)), frozenset({"slow"}),
                             outcome, NOW, SETTINGS)
    late, look_at = apply_outcome(rows(copy("slow", IN_FLIGHT, tries)), frozenset({"slow"}),
                                  outcome, NOW, SETTINGS)
    assert early["slow"].state == RETRYING
    assert early["slow"].next_attempt_at == NOW + 100.0 * (tries - 1)   # backoff(attempts)
    blocked = late["slow"]
    assert (blocked.state, blocked.error_kind) == (FAILED, Kind.UNKNOWN_STORE.value)
    assert blocked.error_message.startswith("Glance has no store slow; blocked")
    # ... until the store list is next refreshed: its next try is due then
    assert blocked.next_attempt_at == NOW + SETTINGS.store_list_ttl
    assert look_at == blocked.next_attempt_at   # the image is looked at then
    assert blocked.attempts == tries   # not inflated to max_attempts


def test_an_unknown_store_outcome_sends_the_stores_it_does_not_blame_again_at_no_cost():
    outcome = dataclasses.replace(
        refused(Kind.UNKNOWN_STORE, Action.RETRY, message="... edge ..."),
        blamed=frozenset({"edge"}))
    changes, _ = apply_outcome(CLAIMED, BOTH, outcome, NOW, SETTINGS)
    assert (changes["slow"].state, changes["slow"].attempts) == (PENDING, 1)
    assert changes["slow"].next_attempt_at is None
    assert (changes["edge"].error_kind, changes["edge"].attempts) == (Kind.UNKNOWN_STORE.value, 2)


def test_a_store_list_cached_for_no_time_still_keeps_a_blocked_copy_waiting_a_while():
    outcome = refused(Kind.UNKNOWN_STORE, Action.RETRY, message="Glance has no store slow")
    settings = dataclasses.replace(SETTINGS, store_list_ttl=0.0)
    changes, look_at = apply_outcome(rows(copy("slow", IN_FLIGHT, 5)), frozenset({"slow"}),
                                     outcome, NOW, settings)
    assert changes["slow"].state == FAILED and look_at >= NOW + 10


def blocked_copy(at: float) -> Copy:
    return copy("slow", FAILED, 2, error_kind=Kind.UNKNOWN_STORE.value,
                error_message="Glance answered 409 ...; blocked", next_attempt_at=at,
                finished_at=at - SETTINGS.store_list_ttl)


def test_a_blocked_copy_waits_for_the_store_list_refresh_and_is_looked_at_then():
    result = visit(image(stores=("fast",)), [copy("fast", DONE), blocked_copy(NOW + 120)])
    assert result.changes == {}
    assert result.look_at == NOW + 120


def test_a_blocked_copy_gets_one_more_try_once_the_store_list_is_refreshed():
    result = visit(image(stores=("fast",)), [copy("fast", DONE), blocked_copy(NOW - 1)])
    slow = result.changes["slow"]
    assert (slow.state, slow.next_attempt_at, slow.attempts) == (RETRYING, None, 2)


def test_a_blocked_copy_of_a_store_no_rule_wants_is_cancelled():
    result = visit(image(stores=("fast",)), [copy("fast", DONE), blocked_copy(NOW + 120)],
                   desired=want("fast"))
    assert result.changes["slow"].state == CANCELLED
    assert result.look_at is None


def test_a_copy_failed_for_good_is_not_tried_again_by_a_visit():
    failed = copy("slow", FAILED, 4, error_kind=Kind.COPY_FAILED.value, finished_at=NOW - 10)
    result = visit(image(stores=("fast",)), [copy("fast", DONE), failed])
    assert result.changes == {} and result.look_at is None


def test_over_quota_waits_the_quota_delay_not_the_backoff():
    outcome = refused(Kind.QUOTA, Action.RETRY, status=413, message="over quota")
    changes, _ = apply_outcome(CLAIMED, BOTH, outcome, NOW, SETTINGS)
    assert {c.state for c in changes.values()} == {RETRYING}
    assert {c.next_attempt_at for c in changes.values()} == {NOW + SETTINGS.quota_retry_delay}


def test_a_transient_error_waits_the_images_backoff_without_using_an_attempt():
    outcome = dataclasses.replace(refused(Kind.TRANSIENT, Action.BACKOFF, status=503), delay=40.0)
    changes, look_at = apply_outcome(CLAIMED, BOTH, outcome, NOW, SETTINGS)
    assert {(c.state, c.attempts) for c in changes.values()} == {(RETRYING, 1)}
    assert {c.next_attempt_at for c in changes.values()} == {NOW + 40.0}
    assert {c.error_kind for c in changes.values()} == {Kind.TRANSIENT.value}
    assert look_at == NOW + 40.0   # the image is re-read before the next try


def test_a_transient_error_without_a_delay_waits_the_first_step_of_the_image_backoff():
    changes, look_at = apply_outcome(CLAIMED, BOTH, refused(Kind.TRANSIENT, Action.BACKOFF),
                                     NOW, SETTINGS)
    assert look_at == NOW + SETTINGS.image_backoff_base


@pytest.mark.parametrize("kind", [Kind.TRANSIENT, Kind.UNAUTHORIZED])
def test_an_outage_of_any_length_never_fails_a_copy(kind):
    # Given a copy that already used 3 of its 4 attempts
    copies = rows(copy("slow", RETRYING, 3))
    now = NOW
    # When Glance gives no real answer to a thousand claims in a row (each claim counts an
    # attempt before its POST, as the ledger does)
    for _ in range(1000):
        claimed = {s: dataclasses.replace(c, state=IN_FLIGHT, attempts=c.attempts + 1)
                   for s, c in copies.items()}
        outcome = dataclasses.replace(refused(kind, Action.BACKOFF, status=503), delay=300.0)
        changes, _ = apply_outcome(claimed, frozenset(claimed), outcome, now, SETTINGS)
        copies = {**claimed, **changes}
        now = copies["slow"].next_attempt_at
    # Then it is still retrying, with the attempts it had
    assert (copies["slow"].state, copies["slow"].attempts) == (RETRYING, 3)


def test_a_locked_image_waits_a_few_polls_without_using_an_attempt():
    changes, look_at = apply_outcome(CLAIMED, BOTH, refused(Kind.LOCKED, Action.WAIT), NOW,
                                     SETTINGS)
    assert {(c.state, c.attempts) for c in changes.values()} == {(PENDING, 1)}
    assert look_at == NOW + SETTINGS.poll_interval * 5


def test_a_gone_image_cancels_the_claimed_copies():
    changes, _ = apply_outcome(CLAIMED, BOTH, refused(Kind.GONE, Action.CANCEL, status=404),
                               NOW, SETTINGS)
    assert {c.state for c in changes.values()} == {CANCELLED}



def test_an_import_older_than_a_minute_is_polled_every_long_poll_not_every_second():
    from imagesync.planner import LONG_IMPORT, _poll_delay

    s = Settings()                                                  # the defaults: 2 s, 30 s
    started = Tracking(import_started_at=NOW)
    assert _poll_delay(started, NOW + 0.4, s) == 2.0               # young: poll_interval
    assert _poll_delay(started, NOW + 5.0, s) == 5.0               # as long again as its age
    assert _poll_delay(started, NOW + LONG_IMPORT, s) == 30.0      # long: quiet
    # A 10-minute import is polled at most 25 times (the goal of the events issue)
    age, polls = s.poll_interval, 1                                 # the first, at poll_interval
    while (age := age + _poll_delay(started, NOW + age, s)) <= 600:
        polls += 1
    assert polls == 23


def test_our_import_whose_task_ended_is_done_at_once_and_leaves_nothing_waiting_on_its_lock():
    # Given our import to slow in flight, and task.success noted for the task holding the
    # lock: Glance has not dropped the lock yet when the look comes
    copies = {"slow": Copy(IMAGE_ID, "slow", state=IN_FLIGHT, attempts=1, started_at=NOW - 3)}
    track = Tracking(import_started_at=NOW - 3, saw_lock=True, lock_task=OUR_TASK,
                     lock_task_status="success")
    visit = plan_visit(image(("fast", "slow"), lock=OUR_TASK), copies,
                       {"slow": ("r",)}, {}, track, NOW, SETTINGS)
    # Then the copy is done on this look, and nothing waits on a lock about to go
    assert visit.changes["slow"].state == DONE
    assert (visit.waiting, visit.look_at, visit.foreign_lock) == (None, None, None)
