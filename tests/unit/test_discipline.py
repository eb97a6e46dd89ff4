"""Stories about the request discipline per image: how soon Glance is asked about an image again.

Pure: every story hands in the time (`now`) and runs without jitter (or with a seeded one), so
it takes microseconds and gives the same answer every time.
"""

from __future__ import annotations

import random

import pytest

from imagesync.discipline import IMPORT, LOOK, Discipline

IMAGE = "1d818d51-f1d8-4f02-a97d-aeedcba99c00"
OTHER = "7a0c9f2e-55b1-4f0e-9d65-3c1a2b3c4d5e"
T0 = 1_000.0


def discipline(rate=20.0, share=0.1, base=2.0, cap=300.0, jitter=0.0) -> Discipline:
    return Discipline(rate, share, base, cap, jitter=jitter, rng=random.Random(7))


# -- trouble: a growing, capped backoff --------------------------------------------------------


def test_an_image_that_got_a_429_is_not_asked_again_before_its_backoff():
    d = discipline()
    delay, entered = d.failed(IMAGE, T0, "HTTP 429")
    assert (delay, entered) == (2.0, True)
    assert d.wait(IMAGE, T0) == 2.0
    assert d.wait(IMAGE, T0 + 1.5) == pytest.approx(0.5)
    assert d.wait(IMAGE, T0 + 2.0) == 0.0
    assert IMAGE in d.held(T0 + 1.0) and IMAGE not in d.held(T0 + 2.0)


def test_the_backoff_doubles_with_each_answer_in_a_row_and_stops_at_the_cap():
    d = discipline(base=2.0, cap=60.0)
    delays = [d.failed(IMAGE, T0 + i, "HTTP 503")[0] for i in range(8)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_with_jitter_images_in_trouble_together_come_back_spread_out():
    d = discipline(jitter=0.25)
    delays = {d.failed(f"image-{i}", T0, "no answer")[0] for i in range(50)}
    assert len(delays) > 40 and min(delays) >= 1.5 and max(delays) <= 2.5


def test_a_retry_after_longer_than_the_backoff_is_honoured():
    d = discipline()
    assert d.failed(IMAGE, T0, "HTTP 429", retry_after=30.0)[0] == 30.0
    assert d.wait(IMAGE, T0 + 29.0) == pytest.approx(1.0)


def test_a_retry_after_is_cut_to_the_cap():
    d = discipline(cap=300.0)
    assert d.failed(IMAGE, T0, "HTTP 429", retry_after=86_400.0)[0] == 300.0


def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it():
    d = discipline()
    for i in range(3):
        d.failed(IMAGE, T0 + i, "HTTP 429")
    assert d.failed(IMAGE, T0 + 3, "HTTP 429", retry_after=1.0)[0] == 16.0


def test_an_image_enters_trouble_once_and_leaves_it_once():
    d = discipline()
    entered = [d.failed(IMAGE, T0 + i, "HTTP 503")[1] for i in range(5)]
    assert entered == [True, False, False, False, False]
    left = d.succeeded(IMAGE)
    assert left is not None and (left.failures, left.since, left.last) == (5, T0, "HTTP 503")
    assert d.succeeded(IMAGE) is None   # leaving twice says nothing the second time
    assert d.wait(IMAGE, T0 + 5) == 0.0
    # and the next trouble starts the ladder again
    assert d.failed(IMAGE, T0 + 10, "HTTP 503") == (2.0, True)


def test_a_look_that_works_does_not_space_out_a_post_that_keeps_failing_any_less():
    d = discipline()
    d.failed(IMAGE, T0, "HTTP 503", kind=IMPORT)
    assert d.succeeded(IMAGE, LOOK) is None          # the GET worked: still in import trouble
    assert d.failed(IMAGE, T0 + 3, "HTTP 503", kind=IMPORT) == (4.0, False)
    left = d.succeeded(IMAGE, IMPORT)                  # a 202 at last
    assert left is not None and left.failures == 2


def test_an_image_in_trouble_holds_its_imports_and_others_are_not_held():
    d = discipline()
    d.failed(IMAGE, T0, "HTTP 401")
    assert d.held(T0 + 1) == {IMAGE}
    assert d.wait(OTHER, T0 + 1) == 0.0


def test_an_answer_about_glance_as_a_whole_keeps_the_images_wait_within_a_lower_cap():
    d = discipline(cap=300.0)
    delays = [d.failed(IMAGE, T0 + i, "Glance unreachable", cap=60.0)[0] for i in range(8)]
    assert max(delays) == 60.0
    assert d.failed(IMAGE, T0 + 9, "HTTP 429", retry_after=200.0, cap=60.0)[0] == 60.0


def test_images_that_stay_in_trouble_long_after_being_forgotten_do_not_grow_memory():
    d = discipline(cap=10.0)
    for i in range(5_000):
        d.failed(f"image-{i}", T0 + i, "no answer")
    assert len(d.troubles) < 2_100


# -- the share of the request budget -----------------------------------------------------------


def test_one_image_cannot_take_more_than_its_share_of_the_request_budget():
    # Given a budget of 20 requests per second, of which one image may use 10 %
    d = discipline(rate=20.0, share=0.1)
    # When something asks about that image as fast as it is allowed, for a simulated minute
    now, asked = T0, 0
    while now < T0 + 60:
        wait = d.wait(IMAGE, now)
        if wait == 0:
            d.spent(IMAGE, now)
            asked += 1
            now += 0.01
        else:
            now += wait
    # Then it got its share (2 per second) plus one burst (10 s worth), no more
    assert asked <= 2 * 60 + 20 + 1
    assert asked >= 2 * 60


def test_an_operation_that_made_several_requests_pays_for_all_of_them():
    d = discipline(rate=1.0, share=0.5)    # 0.5 per second, a burst of 5
    d.spent(IMAGE, T0, requests=7)           # 2 in debt
    assert d.wait(IMAGE, T0) == pytest.approx(6.0)   # back to 1 token after 6 s
    assert IMAGE in d.held(T0 + 1)


def test_the_polls_of_a_normal_import_are_never_held_back_at_the_default_settings():
    # An import is polled after poll_interval (1 s), then as long again as it has taken:
    # the busiest schedule imagesync has for one image.
    from imagesync.planner import Settings, Tracking, _poll_delay

    d = discipline(rate=20.0, share=0.1)
    started = now = T0
    d.spent(IMAGE, now, requests=2)   # the visit that planned it, and the POST
    for _ in range(300):
        now += _poll_delay(Tracking(import_started_at=started), now, Settings())
        assert d.wait(IMAGE, now) == 0.0, f"poll at +{now - started:.1f} s held back"
        d.spent(IMAGE, now)


def test_spending_nothing_changes_nothing():
    d = discipline()
    d.spent(IMAGE, T0, requests=0)
    assert IMAGE not in d.buckets


def test_idle_images_are_forgotten_once_many_have_been_seen():
    d = discipline()
    for i in range(3_000):
        d.spent(f"image-{i}", T0 + i * 20.0)   # each is full again 10 s later
    assert len(d.buckets) <= 1_001
