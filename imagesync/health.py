"""Liveness of the daemon's loops, for the systemd watchdog.

Each loop beats its Heartbeat at least every few seconds, also while it waits on
purpose (a backoff, an idle poll); a loop that is wedged stops beating. Pure: a
clock in, ages out; the watchdog (imagesync.systemd) decides what to do with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Heartbeat:
    """The last time one loop showed progress; stale after `limit` seconds of silence."""

    def __init__(self, name: str, limit: float = 20.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.limit, self.clock = name, limit, clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def silent_for(self) -> float:
        return self.clock() - self.last

    def stale(self) -> bool:
        return self.silent_for() > self.limit

    def wait(self, event: threading.Event, seconds: float, step: float = 1.0) -> bool:
        """event.wait(seconds), beating at least every `step` s: waiting on purpose is alive.
        Returns True when the event was set."""
        deadline = self.clock() + seconds
        while True:
            self.beat()
            left = deadline - self.clock()
            if left <= 0:
                return event.is_set()
            if event.wait(min(step, left)):
                self.beat()
                return True
