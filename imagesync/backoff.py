"""How long to wait before trying a failed copy again: one replaceable function.

The executor asks ``compute_backoff(attempt)`` and the ledger stores the due time. It must
not sleep, read the clock or keep state; its only randomness comes from the rng it is given,
so tests pass a seeded ``random.Random`` and get the same delays every run.
"""

from __future__ import annotations

import random

# Seconds before the first retry: long enough for a restarting glance-api or a brief store
# outage to come back, short enough that a one-off 5xx costs well under a minute.
BASE = 30.0
# Longest wait between two tries, in seconds (before jitter). A copy that keeps failing is
# still tried every hour, and the reconciler re-checks every image in between anyway.
CAP = 3600.0
# Each delay is multiplied by a random factor in [1 - JITTER, 1 + JITTER], so images that
# failed together (a store went down) come back spread out instead of in one burst.
JITTER = 0.25

# Doubling past this many times cannot matter: 2**64 * BASE is far beyond any sensible cap,
# and bounding the exponent keeps 2.0 ** n from overflowing on huge attempt counts.
_MAX_DOUBLINGS = 64
_SHARED_RNG = random.Random()


def compute_backoff(
    attempt: int,
    *,
    base: float = BASE,
    cap: float = CAP,
    jitter: float = JITTER,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first failure).

    ``base`` doubled for each attempt after the first, never above ``cap``, then scaled by a
    uniform factor in [1 - jitter, 1 + jitter]. Attempts below 1 count as 1; never negative.
    """
    doublings = min(max(attempt, 1) - 1, _MAX_DOUBLINGS)
    delay = min(cap, base * 2.0**doublings)
    factor = (rng if rng is not None else _SHARED_RNG).uniform(1.0 - jitter, 1.0 + jitter)
    return max(0.0, delay * factor)
