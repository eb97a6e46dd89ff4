"""Pruning: the ledger keeps what it tracks and forgets what is settled, so it stays small.

Removed once older than their retention: rows of images Glance deleted (with all their
copies), `done` and `cancelled` copies, images with nothing left to track that no
notification or reconcile pass has shown since, and processed CLI requests. Open copies
(pending, in flight, retrying) and `failed` ones of live images are never removed. The
writer runs `prune()` in small steps between other writes; near the size cap it prunes
ahead of the retention (see writer.py).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from typing import Any

DAY = 86400.0
STEP = 1000   # rows of each kind per step: one step holds the writer a few milliseconds


@dataclasses.dataclass(frozen=True)
class Retention:
    """How long settled rows are kept (seconds), and how often the daemon prunes."""

    deleted_images: float = 30 * DAY
    settled_copies: float = 30 * DAY
    requests: float = 30 * DAY
    interval: float = 3600.0

    def scaled(self, factor: float) -> Retention:
        """The same retention shortened (near the size cap); the schedule is unchanged."""
        return dataclasses.replace(self, deleted_images=self.deleted_images * factor,
                                   settled_copies=self.settled_copies * factor,
                                   requests=self.requests * factor)

    @classmethod
    def from_conf(cls, conf: Any) -> Retention:
        group = conf.ledger
        return cls(deleted_images=group.keep_deleted_images_days * DAY,
                   settled_copies=group.keep_settled_copies_days * DAY,
                   requests=group.keep_requests_days * DAY,
                   interval=group.prune_interval)


class PruneOps:
    """Mixed into Ops: runs in the writer's transaction (`self.x` executes SQL)."""

    x: Callable[..., sqlite3.Cursor]

    def prune(self, now: float, retention: Retention, limit: int = STEP) -> dict[str, int]:
        """One step: up to `limit` rows of each kind older than `retention`.

        Returns {"images", "copies", "requests": rows removed, "more": 1 if a kind hit
        `limit` (call again), else 0}.
        """
        requests = self.x(
            "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE done_at IS NOT "
            "NULL AND done_at < ? LIMIT ?)", (now - retention.requests, limit)).rowcount
        copies = self.x(
            "DELETE FROM copies WHERE rowid IN (SELECT rowid FROM copies WHERE state IN "
            "('done', 'cancelled') AND coalesce(finished_at, updated_at) < ? LIMIT ?)",
            (now - retention.settled_copies, limit)).rowcount
        gone = [r[0] for r in self.x(
            "SELECT id FROM images i WHERE deleted = 1 AND updated_at < ? AND NOT EXISTS "
            "(SELECT 1 FROM copies WHERE image_id = i.id AND state = 'in_flight') LIMIT ?",
            (now - retention.deleted_images, limit))]
        marks = ",".join("?" * len(gone))
        if gone:
            copies += self.x(f"DELETE FROM copies WHERE image_id IN ({marks})", gone).rowcount
            self.x(f"DELETE FROM images WHERE id IN ({marks})", gone)
        # Nothing to track, and neither a notification nor a reconcile pass has shown it
        # within the retention (each bumps updated_at): Glance no longer lists it.
        idle = self.x(
            "DELETE FROM images WHERE id IN (SELECT id FROM images i WHERE deleted = 0 "
            "AND updated_at < ? AND look_at IS NULL AND import_started_at IS NULL "
            "AND lock_task IS NULL AND NOT EXISTS (SELECT 1 FROM copies WHERE image_id = i.id) "
            "LIMIT ?)", (now - retention.deleted_images, limit)).rowcount
        more = max(requests, len(gone), idle) >= limit or copies >= limit
        return {"images": len(gone) + idle, "copies": copies, "requests": requests,
                "more": int(more)}
