"""compute_backoff: how long a failed copy waits before the next try."""

from __future__ import annotations

import random

import pytest

from imagesync.backoff import BASE, CAP, JITTER, compute_backoff


def test_without_jitter_the_wait_starts_at_base_and_doubles_until_the_cap():
    waits = [compute_backoff(attempt, jitter=0) for attempt in range(1, 10)]
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0, 3600.0]
    assert (BASE, CAP, JITTER) == (30.0, 3600.0, 0.25)


def test_the_wait_never_shrinks_as_attempts_grow():
    waits = [compute_backoff(attempt, jitter=0) for attempt in range(1, 200)]
    assert waits == sorted(waits)
    assert max(waits) == CAP


def test_jitter_spreads_waits_a_quarter_either_way_and_no_further():
    rng = random.Random(20261125)
    waits = [compute_backoff(3, rng=rng) for _ in range(2000)]  # 120 s before jitter
    assert all(90.0 <= wait <= 150.0 for wait in waits)
    assert min(waits) < 92.0 and max(waits) > 148.0  # the whole band is used


def test_a_capped_wait_stays_within_the_cap_plus_jitter():
    rng = random.Random(7)
    waits = [compute_backoff(40, rng=rng) for _ in range(2000)]
    assert all(CAP * 0.75 <= wait <= CAP * 1.25 for wait in waits)


def test_the_same_seed_gives_the_same_waits():
    rng, same_rng = random.Random(42), random.Random(42)
    first = [compute_backoff(3, rng=rng) for _ in range(20)]
    again = [compute_backoff(3, rng=same_rng) for _ in range(20)]
    assert first == again
    assert len(set(first)) == 20  # jitter really was applied, differently each time


def test_without_an_rng_the_shared_one_still_keeps_waits_in_the_band():
    assert all(22.5 <= compute_backoff(1) <= 37.5 for _ in range(200))


@pytest.mark.parametrize("attempt", [0, -1, -(10**6)])
def test_attempts_below_one_wait_like_the_first(attempt):
    assert compute_backoff(attempt, jitter=0) == BASE


@pytest.mark.parametrize("attempt", [10_000, 10**100])
def test_a_huge_attempt_count_waits_the_cap_without_overflowing(attempt):
    assert compute_backoff(attempt, jitter=0) == CAP


def test_a_wait_is_never_negative_even_with_a_jitter_above_one():
    rng = random.Random(3)
    assert all(compute_backoff(1, jitter=3.0, rng=rng) >= 0.0 for _ in range(500))
    assert compute_backoff(1, base=-5.0, jitter=0) == 0.0


def test_base_and_cap_can_be_replaced_per_call():
    assert compute_backoff(1, base=2.0, cap=5.0, jitter=0) == 2.0
    assert compute_backoff(3, base=2.0, cap=5.0, jitter=0) == 5.0
