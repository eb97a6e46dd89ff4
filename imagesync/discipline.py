"""Request discipline per image: after an answer that is not a success or a 404, a growing,
capped backoff (Retry-After honoured); and no image takes more than its share of the request
budget. Pure: time comes in as `now`; the executor asks before, and tells after, each request.
"""

from __future__ import annotations

import dataclasses
import random
import threading

from imagesync.backoff import compute_backoff

LOOK, IMPORT = "look", "import"   # the two kinds of operation on an image, with own ladders
BURST_SECONDS = 10.0   # an image may spend this many seconds of its share at once
_PRUNE_ABOVE = 1_000   # entries kept before idle ones are forgotten (bounded memory)


@dataclasses.dataclass
class Trouble:
    """One image's requests of one kind going wrong: since when, how often in a row, what."""

    since: float
    failures: int = 0
    not_before: float = 0.0
    last: str = ""


class Discipline:
    """Per image: a backoff ladder for each kind of operation, and a token bucket.

    `rate` is the whole request budget (requests per second), `share` the part of it one
    image may use on average. An import's ladder is kept apart from the look's: a GET that
    works does not make a POST that keeps failing any less spaced out. Thread-safe: the
    executor's loop asks, its workers tell.
    """

    def __init__(self, rate: float, share: float = 0.1, base: float = 2.0, cap: float = 300.0,
                 jitter: float = 0.25, rng: random.Random | None = None):
        self.image_rate = max(rate * share, 1e-3)
        self.burst = max(1.0, self.image_rate * BURST_SECONDS)
        self.base, self.cap, self.jitter, self.rng = base, max(cap, base), jitter, rng
        self.troubles: dict[tuple[str, str], Trouble] = {}
        self.buckets: dict[str, tuple[float, float]] = {}   # image -> (tokens, when)
        self._prune_at = {"troubles": _PRUNE_ABOVE, "buckets": _PRUNE_ABOVE}
        self._lock = threading.Lock()

    # -- the share of the budget

    def _tokens(self, image_id: str, now: float) -> float:
        tokens, when = self.buckets.get(image_id, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.image_rate)

    def spent(self, image_id: str, now: float, requests: int = 1) -> None:
        """The requests one operation on the image made (the bucket may go into debt)."""
        if requests <= 0:
            return
        with self._lock:
            self.buckets[image_id] = (self._tokens(image_id, now) - requests, now)
            if len(self.buckets) > self._prune_at["buckets"]:
                self.buckets = {i: b for i, b in self.buckets.items()
                                if self._tokens(i, now) < self.burst}
                self._prune_at["buckets"] = max(_PRUNE_ABOVE, 2 * len(self.buckets))

    # -- trouble

    def wait(self, image_id: str, now: float) -> float:
        """Seconds before the image may be asked about again (0: now)."""
        with self._lock:
            waits = [t.not_before - now for _, t in self._of(image_id)]
            tokens = self._tokens(image_id, now)
        if tokens < 1.0:
            waits.append((1.0 - tokens) / self.image_rate)
        return max([0.0, *waits])

    def held(self, now: float) -> set[str]:
        """Images that may not be asked about now: no import is sent for them."""
        with self._lock:
            held = {image for (image, _), t in self.troubles.items() if t.not_before > now}
            return held | {image for image in self.buckets if self._tokens(image, now) < 1.0}

    def failed(self, image_id: str, now: float, what: str, retry_after: float | None = None,
               kind: str = LOOK, cap: float | None = None) -> tuple[float, bool]:
        """An operation got no real answer: (seconds to leave the image alone, whether the
        image just entered trouble, i.e. had none of either kind before). `cap`: a lower cap
        for this answer (one about Glance as a whole, which a pause of all work covers)."""
        with self._lock:
            entered = not any(True for _ in self._of(image_id))
            trouble = self.troubles.setdefault((image_id, kind), Trouble(since=now))
            trouble.failures += 1
            cap = self.cap if cap is None else max(self.base, min(cap, self.cap))
            delay = compute_backoff(trouble.failures, base=self.base, cap=cap,
                                    jitter=self.jitter, rng=self.rng)
            if retry_after is not None and retry_after > 0:
                delay = max(delay, min(retry_after, cap))
            trouble.not_before, trouble.last = now + delay, what
            if len(self.troubles) > self._prune_at["troubles"]:   # long forgotten images
                self.troubles = {k: t for k, t in self.troubles.items()
                                 if t.not_before > now - 4 * self.cap}
                self._prune_at["troubles"] = max(_PRUNE_ABOVE, 2 * len(self.troubles))
            return delay, entered

    def succeeded(self, image_id: str, kind: str = LOOK) -> Trouble | None:
        """An operation got a real answer: its ladder starts again. Returns the trouble the
        image left when it has none of either kind any more."""
        with self._lock:
            trouble = self.troubles.pop((image_id, kind), None)
            if trouble is None or any(True for _ in self._of(image_id)):
                return None
            return trouble

    def trouble(self, image_id: str, kind: str = LOOK) -> Trouble | None:
        with self._lock:
            return self.troubles.get((image_id, kind))

    def _of(self, image_id: str):
        for kind in (LOOK, IMPORT):
            trouble = self.troubles.get((image_id, kind))
            if trouble is not None:
                yield (image_id, kind), trouble
