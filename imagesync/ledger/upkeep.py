"""Upkeep: what the ledger's writer does between writes, and what it says at its size cap.

It prunes on a schedule (the retention), near `ledger_max_size_mb` ahead of the retention,
and at the cap everything settled; it says once when the ledger is near its cap, once when
it is full (naming the cap and the size) and once when it has room again. It decides and
logs; the writer runs each prune step in its own short transaction (`step`).
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from imagesync.ledger.prune import Retention
from imagesync.ledger.schema import LedgerFull, Usage, usage

log = structlog.get_logger("imagesync.ledger")

NEAR_CAP = 0.9          # share of the cap in use at which pruning starts ahead of retention
ROOMY = 0.8             # ... and stops cutting into the retention once below this
CAP_STEPS = (1.0, 0.25, 1 / 16, 0.0)   # retention factors tried in turn near the cap
NEAR_CAP_REPEAT = 60.0  # seconds between prunes ahead of the retention while near the cap
SIZE_CHECK = 5.0        # seconds between checks of the size against the cap
ROOM_MARGIN = 0.05      # share of the cap that must be free again before "room again"
DISK_MARGIN = 4 << 20   # bytes of free disk space that must be back before "room again"

Step = Callable[[Retention], "dict[str, int] | None"]   # one prune step; None: it failed


class Upkeep:
    """`retention`: prune on its schedule (None: only near and at the cap). `clock`: the
    wall clock rows are aged by; `size_check`: seconds between size checks."""

    def __init__(self, path: Path, max_size_mb: int, retention: Retention | None,
                 clock: Callable[[], float], size_check: float = SIZE_CHECK):
        self.path, self.max_size_mb, self.retention = path, max_size_mb, retention
        self.clock, self.size_check = clock, size_check
        self.full = False            # the last write that needed room did not get it
        self.last_prune: dict[str, Any] | None = None
        self._plan: list[Retention] = []     # prune steps still to run, in order
        self._tally: dict[str, int] = {}
        self._next_prune = 0.0               # `clock`: due at once
        self._next_near_prune = 0.0          # `clock`
        self._next_size_check = 0.0          # monotonic
        self._near_cap = False

    def usage(self, conn: sqlite3.Connection) -> Usage:
        return usage(conn, bool(self.max_size_mb))

    # -- between writes

    def idle_wait(self) -> float | None:
        """How long the writer may wait for work before upkeep is due (None: forever)."""
        if self._plan:
            return 0.0
        waits = []
        if self.max_size_mb:
            waits.append(self._next_size_check - time.monotonic())
        if self.retention is not None:
            waits.append(self._next_prune - self.clock())
        return max(min(waits), 0.05) if waits else None

    def between_writes(self, conn: sqlite3.Connection, step: Step) -> None:
        """At most one prune step per call, so that queued writes go first."""
        if self.max_size_mb and time.monotonic() >= self._next_size_check:
            self._next_size_check = time.monotonic() + self.size_check
            self._check_size(conn)
        if not self._plan and self.retention is not None and self.clock() >= self._next_prune:
            self._next_prune = self.clock() + self.retention.interval
            self._start([self.retention])
        if self._plan:
            self._step(conn, step)

    def _start(self, plan: list[Retention]) -> None:
        self._plan, self._tally = plan, {}

    def _check_size(self, conn: sqlite3.Connection) -> None:
        """Near the cap: say so once, and prune ahead of the retention, cutting deeper
        (CAP_STEPS) until below ROOMY; again every NEAR_CAP_REPEAT seconds while near."""
        now_usage = self.usage(conn)
        near = now_usage.fraction >= NEAR_CAP
        if near and not self._near_cap:
            log.warning("ledger near its cap: pruning ahead of the retention",
                        ledger=str(self.path), cap_mb=self.max_size_mb, size=now_usage.text())
        self._near_cap = near
        if near and not self._plan and self.clock() >= self._next_near_prune:
            self._next_near_prune = self.clock() + NEAR_CAP_REPEAT
            base = self.retention or Retention()
            self._start([base.scaled(f) for f in CAP_STEPS])

    def _step(self, conn: sqlite3.Connection, step: Step) -> None:
        counts = step(self._plan[0])
        if counts is None:
            self._plan = []
            return
        for kind in ("images", "copies", "requests"):
            self._tally[kind] = self._tally.get(kind, 0) + counts[kind]
        if counts["more"]:
            return
        self._plan.pop(0)
        if self._plan and self.usage(conn).fraction < ROOMY:
            self._plan = []   # near-cap pruning: room enough without cutting deeper
        if not self._plan:
            self.last_prune = {"at": self.clock(), **self._tally,
                               "size": self.usage(conn).text()}
            level = "info" if any(self._tally.values()) else "debug"
            getattr(log, level)("ledger pruned", ledger=str(self.path), **self.last_prune)

    # -- at the cap

    def at_cap(self, step: Step) -> None:
        """A write needs room: everything settled goes, whatever its age."""
        everything = (self.retention or Retention()).scaled(0.0)
        while (counts := step(everything)) is not None and counts["more"]:
            pass

    def full_error(self, conn: sqlite3.Connection) -> LedgerFull:
        """The error for a write that found no room even so; the log says it once."""
        now_usage = self.usage(conn)
        if self._disk_free() < DISK_MARGIN:
            where, fix = "out of disk space", "free disk space"
        else:
            where = f"at its cap ([imagesync] ledger_max_size_mb = {self.max_size_mb})"
            fix = "raise the cap"
        if not self.full:
            self.full = True
            log.error("ledger full: new notifications are held and new copies wait until it "
                      "has room; copies it already tracks go on", ledger=str(self.path),
                      cap_mb=self.max_size_mb or None, size=now_usage.text(), fix=fix)
        return LedgerFull(f"ledger {self.path} is full: {where}, {now_usage.text()}, with "
                          f"everything settled pruned; {fix} (what it already tracks goes on)")

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """Say once that a full ledger has room again: below the cap by ROOM_MARGIN and
        DISK_MARGIN free on disk (a margin, so that the log does not flap)."""
        if not self.full:
            return
        if self.max_size_mb and self.usage(conn).fraction > 1 - ROOM_MARGIN:
            return
        if self._disk_free() < DISK_MARGIN:
            return
        self.full = False
        log.info("ledger has room again", ledger=str(self.path), size=self.usage(conn).text())

    def _disk_free(self) -> int:
        return shutil.disk_usage(self.path.parent).free
