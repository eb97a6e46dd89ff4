"""Stories about a refused copy-image request: DESIGN's error table, row by row.

classify_import_error reads the HTTP status and the image as Glance shows it right after the
refusal; Glance's message text is translated, so it may shape the explanation, never the kind.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from imagesync.errors import FORBIDDEN_MESSAGE, Action, Kind, classify_import_error
from imagesync.model import IMPORT_TASK, Image

IMAGE_ID = "1d818d51-f1d8-4f02-a97d-aeedcba99c00"
LOCK_TASK = "e34cac94-b56e-40c0-9fee-6f52c8ea8985"
LIVE = ("fast", "slow", "edge")


def image(status: str = "active", stores=("fast",), lock: str | None = None) -> Image:
    properties = {IMPORT_TASK: lock} if lock else {}
    return Image(IMAGE_ID, status=status, stores=frozenset(stores), properties=properties)


def classify(status, image_after, targets=("slow",), live=LIVE, message="refused"):
    return classify_import_error(status, message, image_after, targets, live)


# -- 409: the image is held, not ready, or the store is unknown -------------------------------


def test_a_409_while_another_import_holds_the_lock_waits_without_failing():
    # Given an active image whose lock is held by an import that is not ours
    # When Glance refuses our copy with 409
    outcome = classify(409, image(lock=LOCK_TASK))
    # Then we wait and look again; the lock's task is named
    assert (outcome.kind, outcome.action) == (Kind.LOCKED, Action.WAIT)
    assert LOCK_TASK in outcome.message
    assert outcome.status == 409


@pytest.mark.parametrize("status", ["queued", "importing", "deactivated"])
def test_a_409_for_an_image_that_is_not_active_pauses_until_it_is(status):
    outcome = classify(409, image(status=status))
    assert (outcome.kind, outcome.action) == (Kind.NOT_ACTIVE, Action.PAUSE)
    assert outcome.message == f"image is {status}"


def test_a_deactivated_image_pauses_even_while_a_lock_is_still_recorded():
    outcome = classify(409, image(status="deactivated", lock=LOCK_TASK))
    assert (outcome.kind, outcome.action) == (Kind.NOT_ACTIVE, Action.PAUSE)


def test_a_409_naming_a_store_glance_does_not_list_is_retried_as_unknown_store():
    # Given Glance lists fast and slow only, and the image is active and unlocked
    outcome = classify(409, image(), targets=("slow", "gone-store"), live=("fast", "slow"))
    # Then the copy is retried (transient for a few tries) and the store is named
    assert (outcome.kind, outcome.action) == (Kind.UNKNOWN_STORE, Action.RETRY)
    assert "gone-store" in outcome.message and "slow" not in outcome.message


def test_a_409_for_an_active_unlocked_image_whose_stores_glance_lists_is_a_node_lacking_it():
    # Given Glance's store list (from one API node) names slow, and the image is active and
    # unlocked, yet the import (answered by another node) got 409
    outcome = classify(409, image(), live=LIVE)
    # Then it is an unknown store, tried a few times: one node may lack the store
    assert (outcome.kind, outcome.action) == (Kind.UNKNOWN_STORE, Action.RETRY)
    assert "slow" in outcome.message and "enabled_backends" in outcome.message


@pytest.mark.parametrize("message", ["Store for identifier edge not found",
                                     "Speicher für Kennung edge nicht gefunden"])
def test_a_409_naming_one_of_several_targets_blames_only_that_store(message):
    # Given a copy to slow and edge, and a node lacking edge says so (in any language: store
    # ids are never translated)
    outcome = classify(409, image(), targets=("slow", "edge"), message=message)
    # Then only edge is held responsible; slow goes again at no cost
    assert (outcome.kind, outcome.blamed) == (Kind.UNKNOWN_STORE, frozenset({"edge"}))
    assert "edge" in outcome.message and "slow" not in outcome.message


@pytest.mark.parametrize("message", ["", "Conflict", "Store for identifier slowly not found",
                                     "slow and edge are both missing"])
def test_a_409_that_names_no_single_target_blames_them_all(message):
    outcome = classify(409, image(), targets=("slow", "edge"), message=message)
    assert (outcome.kind, outcome.blamed) == (Kind.UNKNOWN_STORE, None)


def test_a_409_for_a_store_glance_does_not_list_blames_only_that_store():
    outcome = classify(409, image(), targets=("slow", "gone-store"), live=("fast", "slow"))
    assert outcome.blamed == frozenset({"gone-store"})


def test_a_409_after_another_import_put_a_target_there_marks_it_done_and_replans():
    # Given we lost the lock race to an import that has already copied slow and let go
    outcome = classify(409, image(stores=("fast", "slow")), targets=("slow", "edge"))
    assert (outcome.kind, outcome.action) == (Kind.ALREADY_PRESENT, Action.REPLAN)
    assert outcome.done == frozenset({"slow"})


# -- 400: the whole multi-store request was rejected ------------------------------------------


def test_a_400_with_a_target_already_in_stores_replans_and_marks_the_present_ones_done():
    # Given we asked for slow and edge, and slow is already there
    outcome = classify(400, image(stores=("fast", "slow")), targets=("slow", "edge"))
    # Then the request is re-planned at once; only slow counts as done
    assert (outcome.kind, outcome.action) == (Kind.ALREADY_PRESENT, Action.REPLAN)
    assert outcome.done == frozenset({"slow"})
    assert "slow" in outcome.message


def test_a_400_that_the_image_does_not_explain_is_a_bad_request_retried_with_backoff():
    outcome = classify(400, image(stores=("fast",)), targets=("slow",))
    assert (outcome.kind, outcome.action) == (Kind.BAD_REQUEST, Action.RETRY)
    assert outcome.done == frozenset()


# -- the image is gone ------------------------------------------------------------------------


def test_a_404_cancels_the_copies():
    outcome = classify(404, image())
    assert (outcome.kind, outcome.action) == (Kind.GONE, Action.CANCEL)


@pytest.mark.parametrize("status", [400, 409])
def test_a_refusal_after_which_the_image_cannot_be_read_means_it_is_gone(status):
    outcome = classify(status, None)
    assert (outcome.kind, outcome.action) == (Kind.GONE, Action.CANCEL)


# -- quota, credentials, transient ------------------------------------------------------------


def test_a_413_is_over_quota_and_retried_with_the_reason_shown():
    outcome = classify(413, image(), message="Maximum allowed image_size_total exceeded")
    assert (outcome.kind, outcome.action) == (Kind.QUOTA, Action.RETRY)
    assert "image_size_total" in outcome.message


def test_a_403_blocks_the_copy_and_says_copy_image_needs_the_admin_role():
    outcome = classify(403, image(), message="Policy doesn't allow copy_image to be performed.")
    assert (outcome.kind, outcome.action) == (Kind.FORBIDDEN, Action.BLOCK)
    assert outcome.message == FORBIDDEN_MESSAGE
    assert outcome.message.startswith("copy-image needs the admin role")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_a_5xx_or_a_429_is_transient_and_backs_off_without_using_an_attempt(status):
    outcome = classify(status, image(), message="Service Unavailable")
    assert (outcome.kind, outcome.action) == (Kind.TRANSIENT, Action.BACKOFF)
    assert outcome.status == status


def test_a_429_with_no_text_says_glance_is_rate_limiting():
    outcome = classify_import_error(429, "", None, ["slow"], None)
    assert outcome.message == "Glance is rate limiting (429)"


def test_no_answer_at_all_is_transient_and_says_so():
    outcome = classify_import_error(None, "", None, ["slow"], None)
    assert (outcome.kind, outcome.action) == (Kind.TRANSIENT, Action.BACKOFF)
    assert outcome.status is None
    assert outcome.message == "no answer from Glance"


def test_a_401_is_a_credential_problem_that_backs_off_without_using_an_attempt():
    outcome = classify(401, image(), message="The request you have made requires authentication.")
    assert (outcome.kind, outcome.action) == (Kind.UNAUTHORIZED, Action.BACKOFF)
    assert "credentials" in outcome.message and "401" in outcome.message


@pytest.mark.parametrize("status", [None, 401, 429, 500, 503])
def test_no_real_answer_never_uses_an_attempt(status):
    # Whatever the image looks like, an answer that says nothing about the copy itself
    for after in (None, image(), image(lock=LOCK_TASK), image(status="deactivated")):
        assert classify(status, after).action == Action.BACKOFF


# -- the message never decides ----------------------------------------------------------------

# (status, image as re-read, targets, live stores) for every row of the table.
SCENARIOS = {
    "locked": (409, image(lock=LOCK_TASK), ("slow",), LIVE),
    "deactivated": (409, image(status="deactivated"), ("slow",), LIVE),
    "already present": (400, image(stores=("fast", "slow")), ("slow", "edge"), LIVE),
    "unknown store": (409, image(), ("nowhere",), LIVE),
    "not found": (404, None, ("slow",), None),
    "over quota": (413, image(), ("slow",), None),
    "forbidden": (403, image(), ("slow",), None),
    "server error": (503, image(), ("slow",), None),
    "no answer": (None, None, ("slow",), None),
    "rate limited": (429, None, ("slow",), None),
    "unauthorized": (401, None, ("slow",), None),
    "node lacks a store": (409, image(), ("slow",), LIVE),
}
TRANSLATED = [
    "Image 1d818d51 already present at store slow",            # what Glance says in English
    "Abbild bereits im Speicher slow vorhanden",                 # ... in German
    "イメージはすでにストア slow に存在します",                      # ... in Japanese
    "<html><body><h1>409 Conflict</h1>quota lock 404</body></html>",  # misleading words
    "",
    None,
]


def _verdict(outcome):
    return outcome.kind, outcome.action, outcome.done


@pytest.mark.parametrize("message", TRANSLATED)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_translated_or_garbled_message_gives_the_same_kind(scenario, message):
    status, after, targets, live = SCENARIOS[scenario]
    reference = classify_import_error(status, "refused", after, targets, live)
    assert _verdict(classify_import_error(status, message, after, targets, live)) == \
        _verdict(reference)


@pytest.mark.parametrize("message", ["   ", "\n", "\r\n\t "])
def test_a_blank_message_is_classified_like_any_other(message):
    # Given Glance (or a proxy in front of it) answers 503 with a body of blanks
    status, after, targets, live = SCENARIOS["server error"]
    # When the refusal is classified, Then it is transient like any other 503
    outcome = classify_import_error(status, message, after, targets, live)
    assert (outcome.kind, outcome.action) == (Kind.TRANSIENT, Action.BACKOFF)


@settings(max_examples=150, deadline=None)
@given(scenario=st.sampled_from(sorted(SCENARIOS)), message=st.text(max_size=400))
@example(scenario="locked", message="x\n" * 500)
def test_no_message_text_changes_the_classification(scenario, message):
    status, after, targets, live = SCENARIOS[scenario]
    reference = classify_import_error(status, "refused", after, targets, live)
    outcome = classify_import_error(status, message, after, targets, live)
    assert _verdict(outcome) == _verdict(reference)
    assert len(outcome.message) <= 300 or outcome.message == reference.message
