"""The operator's side of the ledger: CLI requests the daemon takes, the last good policy,
and the daemon's own facts (pid, start) that `imagesync status` shows.

A mixin of Ops, run inside the writer's transaction. `retry-now` is `imagesync retry
--now`: failed copies re-queued with fresh attempts, and retrying copies due at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from imagesync.planner import FAILED, RETRYING

RETRY, RETRY_NOW, SYNC = "retry", "retry-now", "sync"   # actions of CLI requests


class RequestOps:
    """Mixed into Ops: runs in the writer's transaction (`self.x` executes SQL)."""

    x: Callable[..., sqlite3.Cursor]

    def add_request(self, action: str, image_id: str | None, now: float) -> int:
        return int(self.x("INSERT INTO requests (action, image_id, created_at) "
                          "VALUES (?, ?, ?)", (action, image_id, now)).lastrowid or 0)

    def process_requests(self, now: float) -> list[tuple[str, str | None, int]]:
        """Take the CLI's requests: (action, image id, copies affected) for each.

        `retry`: failed copies back to pending with fresh attempts. `retry-now`: that, and
        retrying copies due now (their attempts and last error kept). `sync`: look now.
        """
        done = []
        for req in self.x("SELECT * FROM requests WHERE done_at IS NULL ORDER BY id").fetchall():
            action, image_id = req["action"], req["image_id"]
            n, result = 0, "queued"
            if action in (RETRY, RETRY_NOW):
                n = self._requeue_failed(image_id, now)
                result = f"{n} copies re-queued"
            if action == RETRY_NOW:
                forward = self._bring_forward(image_id, now)
                n += forward
                result += f", {forward} retrying copies due now"
            if image_id:
                self.x("INSERT INTO images (id, look_at, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET look_at = ?",
                       (image_id, now, now, now, now))
            self.x("UPDATE requests SET done_at = ?, result = ? WHERE id = ?",
                   (now, result, req["id"]))
            done.append((action, image_id, n))
        return done

    def _requeue_failed(self, image_id: str | None, now: float) -> int:
        where, args = self._copies_where(FAILED, image_id)
        self._look_now(where, args, now)
        return self.x(f"UPDATE copies SET state = 'pending', attempts = 0, "
                      f"next_attempt_at = NULL, updated_at = ?, queued_at = ? WHERE {where}",
                      (now, now, *args)).rowcount

    def _bring_forward(self, image_id: str | None, now: float) -> int:
        where, args = self._copies_where(RETRYING, image_id)
        where += " AND next_attempt_at > ?"
        args.append(now)
        self._look_now(where, args, now)
        return self.x(f"UPDATE copies SET next_attempt_at = NULL, updated_at = ? WHERE {where}",
                      (now, *args)).rowcount

    @staticmethod
    def _copies_where(state: str, image_id: str | None) -> tuple[str, list]:
        if image_id:
            return "state = ? AND image_id = ?", [state, image_id]
        return "state = ?", [state]

    def _look_now(self, where: str, args: list, now: float) -> None:
        """Re-read these copies' images before they are sent (Glance may have moved on)."""
        self.x(f"UPDATE images SET look_at = ? WHERE id IN "
               f"(SELECT image_id FROM copies WHERE {where})", (now, *args))

    def save_policy(self, source: str, text: str, now: float) -> None:
        self.x("INSERT INTO policy (id, source, text, saved_at) VALUES (1, ?, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET source = excluded.source, text = excluded.text, "
               "saved_at = excluded.saved_at", (source, text, now))

    def last_policy(self) -> tuple[str, str] | None:
        row = self.x("SELECT source, text FROM policy WHERE id = 1").fetchone()
        return (row[0], row[1]) if row else None

    def daemon_started(self, pid: int, now: float) -> None:
        self.x("INSERT INTO daemon (id, pid, started_at) VALUES (1, ?, ?) ON CONFLICT(id) "
               "DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at", (pid, now))
