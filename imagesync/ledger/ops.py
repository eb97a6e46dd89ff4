"""Ops: the writes that track images and copies, run inside the writer's transaction.

Each operation gets `now` from its caller and plans nothing itself: the planner decides,
Ops records. Notifications, visits, import outcomes, reconcile pages. Claiming (claims.py),
pruning (prune.py) and the operator's requests (requests.py) are mixed in.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable
from typing import NamedTuple

import sqlite_utils

from imagesync import planner
from imagesync.errors import Outcome
from imagesync.events import Event, EventKind
from imagesync.ledger import read
from imagesync.ledger.claims import SPLIT_AFTER, ClaimOps
from imagesync.ledger.prune import PruneOps
from imagesync.ledger.requests import RequestOps
from imagesync.model import Image
from imagesync.planner import (
    CANCELLED,
    DONE,
    FAILED,
    IN_FLIGHT,
    OPEN,
    Copy,
    Settings,
    Tracking,
    Visit,
)

_COPY_FIELDS = ("image_id", "store", "state", "attempts", "next_attempt_at", "rules",
                "error_kind", "error_status", "error_message", "started_at", "finished_at")


def _stores(text: str | None) -> frozenset[str] | None:
    """A stores column ("a,b"; NULL: not known) as a set."""
    return None if text is None else frozenset(s for s in text.split(",") if s)


def _copy_from_row(row: sqlite3.Row) -> Copy:
    values = {k: row[k] for k in _COPY_FIELDS}
    values["rules"] = tuple(r for r in (row["rules"] or "").split(",") if r)
    return Copy(**values)


class Ops(ClaimOps, PruneOps, RequestOps):
    """Operations run inside the writer's transaction. Each gets `now` from its caller."""

    def __init__(self, db: sqlite_utils.Database, split_after: float = SPLIT_AFTER):
        self.db = db
        self.x = db.conn.execute
        self.split_after = split_after

    # -- notifications

    def note_events(self, events: Iterable[Event], now: float) -> int:
        """Record a batch of parsed notifications, coalesced per image; mark images to look at."""
        per_image: dict[str, dict] = {}
        tasks: dict[str, tuple[str | None, float | None]] = {}   # task id -> (how, when) it ended
        count = 0
        for ev in events:
            count += 1
            if ev.kind is EventKind.TASK or ev.image_id is None:   # only a task has no image
                # The lock is released without a notification, around these last events.
                if ev.task_id and ev.event_type in ("task.success", "task.failure", "task.run"):
                    ended = ev.event_type.removeprefix("task.")
                    at = ev.timestamp.timestamp() if ev.timestamp else now
                    tasks[ev.task_id] = tasks.get(ev.task_id, (None, None)) if ended == "run" \
                        else (ended, at)
                continue
            ts = ev.timestamp.timestamp() if ev.timestamp else now
            cur = per_image.setdefault(ev.image_id, {"ts": ts, "status": None, "look": False})
            if ev.task_id:
                if ts >= cur.get("lock_ts", 0.0):
                    cur["lock"] = ev.task_id
                cur["lock_ts"] = max(cur.get("lock_ts", 0.0), ts)
            if ts >= cur["ts"]:
                cur["ts"] = ts
                if ev.status:
                    cur["status"] = ev.status
            if ev.kind is EventKind.DELETED:
                cur["status"], cur["look"], cur["deleted"] = "deleted", True, True
            elif ev.kind is EventKind.UPLOAD_FAILED:
                cur["error"] = (ev.reason, ts, int(ev.quota))
            elif ev.status in (None, "active"):
                cur["look"] = True
        for image_id, cur in per_image.items():
            look = now if cur["look"] else None
            self.x("""
                INSERT INTO images (id, status, look_at, last_event_at, created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET
                  status = CASE WHEN excluded.last_event_at >= coalesce(images.last_event_at, 0)
                                 AND excluded.status IS NOT NULL
                                THEN excluded.status ELSE images.status END,
                  look_at = CASE
                    WHEN excluded.look_at IS NULL THEN images.look_at
                    WHEN EXISTS (SELECT 1 FROM copies WHERE image_id = images.id
                                 AND state = 'in_flight') THEN images.look_at
                    WHEN images.look_at IS NULL OR images.look_at > excluded.look_at
                    THEN excluded.look_at ELSE images.look_at END,
                  last_event_at = max(coalesce(images.last_event_at, 0), excluded.last_event_at),
                  updated_at = excluded.updated_at""",
                   (image_id, cur["status"], look, cur["ts"], now, now))
            if "lock_ts" in cur:
                # Glance showed a lock after our POST: our import did start (it may be over
                # before a poll ever sees the lock).
                self.x("UPDATE images SET saw_lock = 1 WHERE id = ? AND import_started_at "
                       "IS NOT NULL AND import_started_at <= ?", (image_id, cur["lock_ts"] + 1))
                # ... and which task holds it: its task.success / task.failure then says the
                # import is over, even before a poll sees the lock (or sees it dropped).
                self.x("UPDATE images SET lock_task = ?, lock_seen_at = ?, lock_task_status = "
                       "NULL, lock_task_updated_at = NULL WHERE id = ? AND "
                       "(lock_task IS NULL OR lock_task != ?)",
                       (cur["lock"], now, image_id, cur["lock"]))
            if "error" in cur:
                self.x("UPDATE images SET upload_error = ?, upload_error_at = ?, "
                       "upload_error_quota = ? WHERE id = ?", (*cur["error"], image_id))
            if cur.get("deleted"):
                # Deleted, and nothing of ours open or failed to cancel: no look (a GET only
                # to hear 404); a backlog of deletions then never delays a new upload's look.
                self.x("UPDATE images SET deleted = 1, look_at = NULL WHERE id = ? AND NOT "
                       "EXISTS (SELECT 1 FROM copies WHERE image_id = ? AND state IN "
                       "('pending', 'retrying', 'in_flight', 'failed'))", (image_id, image_id))
        for task, (how, ended_at) in tasks.items():
            # Glance sends task.success before it saves the task and drops the lock: the
            # copy is made (or failed) by then, so the look now may still see the lock, and
            # the status says the import is over all the same (planner.plan_visit). A
            # task.run after the task's end was heard (Glance 33 sends it last) adds nothing.
            self.x("UPDATE images SET look_at = CASE WHEN look_at IS NULL OR look_at > ? "
                   "THEN ? ELSE look_at END, lock_task_status = coalesce(?, lock_task_status), "
                   "lock_task_updated_at = coalesce(?, lock_task_updated_at) "
                   "WHERE lock_task = ? AND (? IS NOT NULL OR "
                   "coalesce(lock_task_status, '') NOT IN ('success', 'failure'))",
                   (now, now, how, ended_at, task, how))
        self.x("INSERT INTO daemon (id, last_event_at, events_total) VALUES (1, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET last_event_at = excluded.last_event_at, "
               "events_total = daemon.events_total + excluded.events_total", (now, count))
        return len(per_image)

    # -- scheduling

    def due_images(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[str]:
        exclude = set(exclude)
        rows = self.x("SELECT id FROM images WHERE look_at <= ? ORDER BY look_at LIMIT ?",
                      (now, limit + len(exclude))).fetchall()
        return [r[0] for r in rows if r[0] not in exclude][:limit]

    def next_wakeup(self) -> float | None:
        row = self.x("SELECT min(look_at) FROM images WHERE look_at IS NOT NULL").fetchone()
        return row[0]

    def recover(self, now: float) -> int:
        """At start: images with copies in flight are re-checked, as possibly never sent."""
        return self.x("""UPDATE images SET recovering = 1, look_at = ? WHERE id IN
                         (SELECT image_id FROM copies WHERE state = 'in_flight')""",
                      (now,)).rowcount

    # -- visits

    def _copies(self, image_id: str) -> dict[str, Copy]:
        rows = self.x("SELECT * FROM copies WHERE image_id = ?", (image_id,)).fetchall()
        return {r["store"]: _copy_from_row(r) for r in rows}

    def _tracking(self, image_id: str) -> Tracking:
        r = self.x("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if r is None:
            return Tracking()
        return Tracking(r["import_started_at"], bool(r["saw_lock"]), bool(r["recovering"]),
                        r["upload_error"], r["upload_error_at"], bool(r["upload_error_quota"]),
                        r["lock_task"], r["lock_task_status"], r["lock_task_updated_at"],
                        _stores(r["import_stores"]))

    def _write_copies(self, changes: dict[str, Copy], now: float, size: int | None = None):
        """Upsert the planner's copies. queued_at: now when a copy joins the queue; kept
        while it stays open or in flight (a refund or a handed-back claim keeps its place)."""
        for copy in changes.values():
            queued = now if copy.state in OPEN else None
            self.x("""
                INSERT INTO copies (image_id, store, state, attempts, next_attempt_at, rules,
                    error_kind, error_status, error_message, started_at, finished_at, bytes,
                    created_at, updated_at, queued_at)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(image_id, store) DO UPDATE SET state = excluded.state,
                  attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
                  rules = excluded.rules, error_kind = excluded.error_kind,
                  error_status = excluded.error_status, error_message = excluded.error_message,
                  started_at = excluded.started_at, finished_at = excluded.finished_at,
                  bytes = coalesce(excluded.bytes, copies.bytes), updated_at = excluded.updated_at,
                  queued_at = CASE
                    WHEN excluded.state IN ('done', 'failed', 'cancelled') THEN NULL
                    WHEN copies.state IN ('pending', 'retrying', 'in_flight')
                    THEN coalesce(copies.queued_at, excluded.queued_at)
                    ELSE excluded.queued_at END
                """, (copy.image_id, copy.store, copy.state, copy.attempts, copy.next_attempt_at,
                      ",".join(copy.rules), copy.error_kind, copy.error_status,
                      copy.error_message, copy.started_at, copy.finished_at, size, now, now,
                      queued))

    def record_visit(self, image_id: str, image: Image | None, desired, skipped,
                     now: float, settings: Settings,
                     asked_at: float | None = None) -> tuple[Visit, dict[str, Copy]]:
        """Plan one image from a fresh GET (sent at `asked_at`) and write the result. Returns
        the plan and old rows. A look asked for while the GET was out (a notification, a
        request: the row was written since `asked_at`) is kept when it is sooner than the
        plan's own: the GET may predate what that notification reports (an image read as
        saving, then activated), and waiting for a notification already noted waits forever."""
        before = self._copies(image_id)
        track = self._tracking(image_id)
        visit = planner.plan_visit(image, before, desired, skipped, track, now, settings)
        if image is not None and image.status != "active" and visit.look_at is None and \
                self._said_active(image_id, now):
            # Glance sends image.activate before its commit: a GET right after it can still
            # read the image as saving. The notification already came; look again soon.
            visit = dataclasses.replace(visit, look_at=now + planner.MIN_POLL)
        self._write_copies(visit.changes, now, image.size if image else None)
        self.x("INSERT INTO images (id, created_at, updated_at) VALUES (?, ?, ?) "
               "ON CONFLICT(id) DO NOTHING", (image_id, now, now))
        common = dict(look_at=visit.look_at, waiting=visit.waiting, seen_at=now,
                      visit_failures=0, updated_at=now, lock_stale=int(visit.lock_stale))
        if image is None or visit.deleted:
            common.update(deleted=1, status=image.status if image else "deleted", look_at=None)
        else:
            lock = image.import_task
            common.update(
                name=image.name, owner=image.owner, visibility=image.visibility,
                status=image.status, disk_format=image.disk_format, size=image.size,
                stores=",".join(sorted(image.stores)), hidden=int(image.hidden), lock_task=lock)
            if lock and track.lock_task != lock:
                common.update(lock_seen_at=now, lock_task_status=None, lock_task_updated_at=None)
            if lock and any(c.state == IN_FLIGHT for c in self._copies(image_id).values()):
                common["saw_lock"] = 1
        if visit.import_over:
            common.update(import_started_at=None, saw_lock=0, recovering=0)
        look_at = common.pop("look_at")
        sets = ", ".join(f"{k} = ?" for k in common)
        # A look asked for since the GET went out is set to a time after it; the look that
        # brought this visit was due before it (kept, it would bring the next one at once).
        self.x(f"UPDATE images SET look_at = CASE WHEN ? IS NOT NULL AND updated_at > ? "
               f"AND look_at > ? AND (? IS NULL OR look_at < ?) THEN look_at ELSE ? "
               f"END, {sets} WHERE id = ?",
               (asked_at, asked_at, asked_at, look_at, look_at, look_at, *common.values(),
                image_id))
        return visit, before

    def _said_active(self, image_id: str, now: float) -> bool:
        """A notification said this image is active, lately (ACTIVATE_GRACE seconds)."""
        row = self.x("SELECT status, last_event_at FROM images WHERE id = ?",
                     (image_id,)).fetchone()
        return bool(row) and row[0] == "active" and now - (row[1] or 0) < ACTIVATE_GRACE

    def record_visit_error(self, image_id: str, look_at: float, now: float) -> None:
        self.x("UPDATE images SET look_at = ?, visit_failures = visit_failures + 1, "
               "updated_at = ? WHERE id = ?", (look_at, now, image_id))

    def record_lock_task(self, image_id: str, task_id: str, status: str | None,
                         updated_at: float | None) -> None:
        self.x("UPDATE images SET lock_task_status = ?, lock_task_updated_at = ? "
               "WHERE id = ? AND lock_task = ?", (status, updated_at, image_id, task_id))

    # -- imports (claiming is in claims.py)

    def record_started(self, image_id: str, look_at: float, now: float) -> None:
        self.x("UPDATE images SET look_at = ?, updated_at = ? WHERE id = ?",
               (look_at, now, image_id))

    def record_outcome(self, image_id: str, stores: list[str], outcome: Outcome, now: float,
                       settings: Settings) -> dict[str, Copy]:
        copies = self._copies(image_id)
        changes, look_at = planner.apply_outcome(
            copies, frozenset(s for s in stores if s in copies), outcome, now, settings)
        self._write_copies(changes, now)
        self.x("UPDATE images SET look_at = ?, import_started_at = NULL, saw_lock = 0, "
               "updated_at = ? WHERE id = ?", (look_at, now, image_id))
        return changes

    # -- reconcile

    def reconcile_page(self, items: list[tuple[Image, dict, dict]], now: float) -> Reconciled:
        """Record listed images; mark those whose copies disagree with the policy to look at.
        An image seen for the first time whose listing alone settles every copy (active,
        unlocked, already in every store it should be in) gets its rows from the listing,
        with no visit: after a fresh start or a failover, only images needing a copy are
        looked at."""
        if not items:
            return Reconciled(0, 0)
        ids = [img.id for img, _, _ in items]
        rows: dict[str, dict[str, str]] = {}
        visited: set[str] = set()
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            marks = ",".join("?" * len(part))
            for r in self.x(f"SELECT image_id, store, state FROM copies WHERE image_id IN "
                            f"({marks})", part):
                rows.setdefault(r[0], {})[r[1]] = r[2]
            visited.update(r[0] for r in self.x(
                f"SELECT id FROM images WHERE seen_at IS NOT NULL AND id IN ({marks})", part))
        marked = trusted = 0
        for image, desired, skipped in items:
            have = rows.get(image.id, {})
            settled = None if have or image.id in visited else \
                _settled_by_listing(image, desired, skipped, now)
            look = not settled and image.status == "active" and \
                _disagrees(image, desired, skipped, have, image.id in visited)
            self.x("""
                INSERT INTO images (id, name, owner, visibility, status, disk_format, size,
                    stores, hidden, reconciled_at, look_at, seen_at, created_at, updated_at)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(id) DO UPDATE SET name = excluded.name, owner = excluded.owner,
                  visibility = excluded.visibility, status = excluded.status,
                  disk_format = excluded.disk_format, size = excluded.size,
                  stores = excluded.stores, hidden = excluded.hidden,
                  reconciled_at = excluded.reconciled_at, deleted = 0,
                  seen_at = coalesce(excluded.seen_at, images.seen_at),
                  look_at = CASE WHEN excluded.look_at IS NOT NULL AND
                                 (images.look_at IS NULL OR images.look_at > excluded.look_at)
                            THEN excluded.look_at ELSE images.look_at END,
                  updated_at = excluded.updated_at""",
                   (image.id, image.name, image.owner, image.visibility, image.status,
                    image.disk_format, image.size, ",".join(sorted(image.stores)),
                    int(image.hidden), now, now if look else None, now if settled else None,
                    now, now))
            if settled:
                self._write_copies(settled, now, image.size)
                trusted += 1
            marked += look
        return Reconciled(marked, trusted)

    def reconcile_finish(self, started: float, now: float, seconds: float) -> int:
        """Images the full listing did not show, with copies still open or failed: look
        (gone? then their copies stop counting as open or failed)."""
        n = self.x("""UPDATE images SET look_at = ? WHERE deleted = 0
                      AND (reconciled_at IS NULL OR reconciled_at < ?) AND look_at IS NULL
                      AND EXISTS (SELECT 1 FROM copies WHERE image_id = images.id
                                  AND state IN ('pending','retrying','in_flight','failed'))""",
                   (now, started)).rowcount
        self.x("INSERT INTO daemon (id, last_reconcile_at, reconcile_seconds) VALUES (1, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET last_reconcile_at = excluded.last_reconcile_at, "
               "reconcile_seconds = excluded.reconcile_seconds", (now, seconds))
        return n

    def counts(self) -> dict[str, int]:
        """{state: n}. Answered from a read-only connection, never the writer (writer.py)."""
        return read.count_copies(self.db.conn)

    def counts_by_store(self) -> dict[tuple[str, str], int]:
        """{(store, state): n}. Answered from a read-only connection, never the writer."""
        return read.count_copies_by_store(self.db.conn)


ACTIVATE_GRACE = 10.0   # seconds a GET may lag an image.activate notification (its commit)


class Reconciled(NamedTuple):
    marked: int    # images to look at
    trusted: int   # images first seen and settled from the listing alone (no GET)


def _settled_by_listing(image: Image, desired, skipped, now: float) -> dict[str, Copy] | None:
    """The rows a visit would write for an image the ledger has never seen, when the
    listing alone settles them: active, no import lock, in every store it should be in
    (skipped stores recorded as a visit records them). None when it needs a look."""
    if image.status != "active" or image.import_task or not (desired or skipped):
        return None
    visit = planner.plan_visit(image, {}, desired, skipped, Tracking(), now, Settings())
    if visit.look_at is not None or visit.waiting or \
            any(c.state not in (DONE, CANCELLED) for c in visit.changes.values()):
        return None
    return visit.changes


def _disagrees(image: Image, desired, skipped, have: dict[str, str], visited: bool) -> bool:
    """Does the ledger's view of this image's copies differ from what the policy wants?

    Once an image has been visited, a missing row for a store it is in, or for a store the
    policy skips, is settled: pruning removes such rows (done, cancelled) after retention.
    A failed copy to a store no rule wants any more is looked at (the planner cancels it).
    """
    if "in_flight" in have.values():
        return False
    for store in desired:
        state = have.get(store)
        if store in image.stores:
            if state != "done" and not (state is None and visited):
                return True
        elif store not in image.importing_to and state not in ("pending", "retrying", "failed"):
            return True
    for store in skipped:
        state = have.get(store)
        if store not in image.stores and state != "cancelled" and not (state is None and visited):
            return True
    return any(state in OPEN and (store not in desired or store in image.stores) or
               state == FAILED and store not in desired and store not in skipped
               for store, state in have.items())
