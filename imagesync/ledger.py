"""The SQLite ledger: every image imagesync looked at and every (image, store) copy.

The only module that speaks SQL. The daemon writes through one writer thread
(`Ledger`): callers hand it operations, it runs queued operations together in
one `BEGIN IMMEDIATE` transaction (group commit) and returns each result only
after the commit. Readers in other processes (`imagesync status`) use
`open_readonly()`; WAL keeps them from blocking the writer.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from imagesync import planner
from imagesync.errors import Outcome
from imagesync.events import Event, EventKind
from imagesync.model import Image
from imagesync.planner import IN_FLIGHT, OPEN, Copy, Settings, Tracking, Visit

migrations = Migrations("imagesync")


class LedgerError(RuntimeError):
    """The ledger cannot be opened or written; the message names the file and the cause."""


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db.executescript("""
        CREATE TABLE images (
            id TEXT PRIMARY KEY, name TEXT, owner TEXT, visibility TEXT, status TEXT,
            disk_format TEXT, size INTEGER, stores TEXT, hidden INTEGER NOT NULL DEFAULT 0,
            look_at REAL, last_event_at REAL, seen_at REAL, reconciled_at REAL,
            visit_failures INTEGER NOT NULL DEFAULT 0, waiting TEXT,
            deleted INTEGER NOT NULL DEFAULT 0,
            import_started_at REAL, saw_lock INTEGER NOT NULL DEFAULT 0,
            recovering INTEGER NOT NULL DEFAULT 0,
            upload_error TEXT, upload_error_at REAL, upload_error_quota INTEGER NOT NULL DEFAULT 0,
            lock_task TEXT, lock_stale INTEGER NOT NULL DEFAULT 0, lock_seen_at REAL,
            lock_task_status TEXT, lock_task_updated_at REAL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL);
        CREATE INDEX images_look_at ON images(look_at) WHERE look_at IS NOT NULL;
        CREATE INDEX images_lock_task ON images(lock_task) WHERE lock_task IS NOT NULL;
        CREATE TABLE copies (
            image_id TEXT NOT NULL, store TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('pending','in_flight','done','retrying','failed','cancelled')),
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, rules TEXT,
            error_kind TEXT, error_status INTEGER, error_message TEXT, bytes INTEGER,
            created_at REAL NOT NULL, updated_at REAL NOT NULL,
            started_at REAL, finished_at REAL,
            PRIMARY KEY (image_id, store));
        CREATE INDEX copies_state ON copies(state, store);
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY, action TEXT NOT NULL, image_id TEXT,
            created_at REAL NOT NULL, done_at REAL, result TEXT);
        CREATE TABLE policy (
            id INTEGER PRIMARY KEY CHECK (id = 1), source TEXT, text TEXT, saved_at REAL);
        CREATE TABLE daemon (
            id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER, started_at REAL,
            last_event_at REAL, events_total INTEGER NOT NULL DEFAULT 0,
            last_reconcile_at REAL, reconcile_seconds REAL);
    """)


SCHEMA = [m.name for m in migrations._migrations]
_COPY_FIELDS = ("image_id", "store", "state", "attempts", "next_attempt_at", "rules",
                "error_kind", "error_status", "error_message", "started_at", "finished_at")


def _copy_from_row(row: sqlite3.Row) -> Copy:
    values = {k: row[k] for k in _COPY_FIELDS}
    values["rules"] = tuple(r for r in (row["rules"] or "").split(",") if r)
    return Copy(**values)


def _create_private(path: Path) -> None:
    """Create the ledger file 0600 before SQLite does (it copies the mode to -wal/-shm)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def connect(path: str | Path, max_size_mb: int = 0) -> sqlite_utils.Database:
    """Open the ledger for writing: private file, WAL, migrations applied, size capped."""
    path = Path(path)
    try:
        _create_private(path)
        conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        db = sqlite_utils.Database(conn)
        with db.ensure_autocommit_on():
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
        migrations.apply(db)
        if max_size_mb:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {max_size_mb * (1 << 20) // page}")
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
    return db


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection for the CLI: no migrations, no journal change, schema checked."""
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"no ledger at {path} (has the daemon run? see [imagesync] ledger_path)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        applied = [r[0] for r in conn.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = 'imagesync' ORDER BY id")]
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from exc
    if applied != SCHEMA[: len(applied)] or len(applied) > len(SCHEMA):
        raise LedgerError(f"ledger {path} has schema {applied}; this imagesync knows {SCHEMA}")
    if len(applied) < len(SCHEMA):
        raise LedgerError(f"ledger {path} is older than this imagesync; start the daemon once")
    return conn


class Ledger:
    """The daemon's handle: one writer thread, group commits, results after commit."""

    def __init__(self, path: str | Path, max_batch: int = 500, max_size_mb: int = 0):
        self.path = Path(path)
        self.max_size_mb = max_size_mb
        self._queue: queue.Queue = queue.Queue()
        self._max_batch = max_batch
        self._ready = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        self._ready.result()  # raises LedgerError if the file cannot be opened

    # -- the writer thread

    def _run(self) -> None:
        try:
            db = connect(self.path, self.max_size_mb)
        except LedgerError as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        ops = Ops(db)
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is None for item in batch):
                db.close()
                for item in batch:
                    if item is not None:
                        item[2].set_exception(LedgerError("ledger closed"))
                return
            self._commit(db, ops, batch)

    def _commit(self, db, ops: Ops, batch) -> None:
        results = []
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            for fn, args, future in batch:
                db.conn.execute("SAVEPOINT op")
                try:
                    results.append((future, True, fn(ops, *args)))
                    db.conn.execute("RELEASE op")
                except Exception as exc:  # one bad operation must not sink its neighbours
                    db.conn.execute("ROLLBACK TO op")
                    db.conn.execute("RELEASE op")
                    results.append((future, False, exc))
            db.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.conn.in_transaction:
                db.conn.rollback()
            error = LedgerError(f"cannot write ledger {self.path}: {exc}")
            for _fn, _args, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for future, ok, value in results:
            future.set_result(value) if ok else future.set_exception(value)

    # -- the callers' side

    def submit(self, fn: Callable[..., Any], *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, args, future))
        return future

    def call(self, fn: Callable[..., Any], *args, timeout: float | None = 120) -> Any:
        return self.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def __getattr__(self, name: str):
        """ledger.note_events(...) runs Ops.note_events(...) in the writer and waits."""
        op = getattr(Ops, name, None)
        if op is None or name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.call(op, *args)


class Ops:
    """Operations run inside the writer's transaction. Each gets `now` from its caller."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self.x = db.conn.execute

    # -- notifications

    def note_events(self, events: Iterable[Event], now: float) -> int:
        """Record a batch of parsed notifications, coalesced per image; mark images to look at."""
        per_image: dict[str, dict] = {}
        tasks = set()
        count = 0
        for ev in events:
            count += 1
            if ev.kind is EventKind.TASK:
                # The lock is released without a notification, around these last events.
                if ev.task_id and ev.event_type in ("task.success", "task.failure", "task.run"):
                    tasks.add(ev.task_id)
                continue
            ts = ev.timestamp.timestamp() if ev.timestamp else now
            cur = per_image.setdefault(ev.image_id, {"ts": ts, "status": None, "look": False})
            if ev.task_id:
                cur["lock_ts"] = max(cur.get("lock_ts", 0.0), ts)
            if ts >= cur["ts"]:
                cur["ts"] = ts
                if ev.status:
                    cur["status"] = ev.status
            if ev.kind is EventKind.DELETED:
                cur["status"], cur["look"] = "deleted", True
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
            if "error" in cur:
                self.x("UPDATE images SET upload_error = ?, upload_error_at = ?, "
                       "upload_error_quota = ? WHERE id = ?", (*cur["error"], image_id))
        for task in tasks:
            self.x("UPDATE images SET look_at = ? WHERE lock_task = ? "
                   "AND (look_at IS NULL OR look_at > ?)", (now, task, now))
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
                        r["lock_task"], r["lock_task_status"], r["lock_task_updated_at"])

    def _write_copies(self, changes: dict[str, Copy], now: float, size: int | None = None):
        for copy in changes.values():
            self.x("""
                INSERT INTO copies (image_id, store, state, attempts, next_attempt_at, rules,
                    error_kind, error_status, error_message, started_at, finished_at, bytes,
                    created_at, updated_at)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(image_id, store) DO UPDATE SET state = excluded.state,
                  attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
                  rules = excluded.rules, error_kind = excluded.error_kind,
                  error_status = excluded.error_status, error_message = excluded.error_message,
                  started_at = excluded.started_at, finished_at = excluded.finished_at,
                  bytes = coalesce(excluded.bytes, copies.bytes), updated_at = excluded.updated_at
                """, (copy.image_id, copy.store, copy.state, copy.attempts, copy.next_attempt_at,
                      ",".join(copy.rules), copy.error_kind, copy.error_status,
                      copy.error_message, copy.started_at, copy.finished_at, size, now, now))

    def record_visit(self, image_id: str, image: Image | None, desired, skipped,
                     now: float, settings: Settings) -> tuple[Visit, dict[str, Copy]]:
        """Plan one image from a fresh GET and write the result. Returns the plan and old rows."""
        before = self._copies(image_id)
        track = self._tracking(image_id)
        visit = planner.plan_visit(image, before, desired, skipped, track, now, settings)
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
        sets = ", ".join(f"{k} = ?" for k in common)
        self.x(f"UPDATE images SET {sets} WHERE id = ?", (*common.values(), image_id))
        return visit, before

    def record_visit_error(self, image_id: str, look_at: float, now: float) -> None:
        self.x("UPDATE images SET look_at = ?, visit_failures = visit_failures + 1, "
               "updated_at = ? WHERE id = ?", (look_at, now, image_id))

    def record_lock_task(self, image_id: str, task_id: str, status: str | None,
                         updated_at: float | None) -> None:
        self.x("UPDATE images SET lock_task_status = ?, lock_task_updated_at = ? "
               "WHERE id = ? AND lock_task = ?", (status, updated_at, image_id, task_id))

    # -- imports

    def claim(self, now: float, max_imports: int, per_store: int, max_bytes_in_flight: int,
              max_bytes_per_hour: int, limit: int, exclude: Iterable[str] = (),
              poll_interval: float = 1.0) -> list[tuple[str, list[str], int]]:
        """Mark the next copies in flight, within every cap, BEFORE their POST is sent.

        `exclude`: images another operation is busy with; they wait for the next claim.
        """
        exclude = set(exclude)
        in_flight = self.x("SELECT count(DISTINCT image_id), coalesce(sum(bytes), 0) FROM copies "
                           "WHERE state = 'in_flight'").fetchone()
        images_in_flight, bytes_in_flight = in_flight[0], in_flight[1]
        free = min(max_imports - images_in_flight, limit)
        if free <= 0:
            return []
        per = dict(self.x("SELECT store, count(*) FROM copies WHERE state = 'in_flight' "
                          "GROUP BY store").fetchall())
        hour = self.x("SELECT coalesce(sum(bytes), 0) FROM copies WHERE started_at > ?",
                      (now - 3600,)).fetchone()[0] if max_bytes_per_hour else 0
        rows = self.x("""
            SELECT c.image_id, group_concat(c.store) AS stores, coalesce(i.size, 0) AS size
            FROM copies c JOIN images i ON i.id = c.image_id
            WHERE c.state IN ('pending', 'retrying')
              AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= :now)
              AND i.status = 'active' AND i.deleted = 0
              AND (i.lock_task IS NULL OR i.lock_stale = 1)
              AND (i.look_at IS NULL OR i.look_at > :now)
              AND NOT EXISTS (SELECT 1 FROM copies f WHERE f.image_id = c.image_id
                              AND f.state = 'in_flight')
            GROUP BY c.image_id ORDER BY min(coalesce(c.next_attempt_at, c.created_at))
            LIMIT 200""", {"now": now}).fetchall()
        claims = []
        for row in rows:
            if len(claims) >= free:
                break
            if row["image_id"] in exclude:
                continue
            size = row["size"]
            chosen = []
            for store in sorted(row["stores"].split(",")):
                if per.get(store, 0) >= per_store:
                    continue
                if max_bytes_in_flight and bytes_in_flight + size > max_bytes_in_flight \
                        and (bytes_in_flight or chosen):
                    continue
                if max_bytes_per_hour and hour + size > max_bytes_per_hour and (hour or chosen):
                    continue
                chosen.append(store)
                per[store] = per.get(store, 0) + 1
                bytes_in_flight += size
                hour += size
            if not chosen:
                continue
            marks = ",".join("?" * len(chosen))
            self.x(f"UPDATE copies SET state = 'in_flight', attempts = attempts + 1, "
                   f"started_at = ?, finished_at = NULL, next_attempt_at = NULL, bytes = ?, "
                   f"updated_at = ? WHERE image_id = ? AND store IN ({marks})",
                   (now, size, now, row["image_id"], *chosen))
            # A look is scheduled even before the POST's outcome is recorded: if that record
            # cannot be written (disk full), the image is still polled, never forgotten.
            self.x("UPDATE images SET import_started_at = ?, saw_lock = 0, recovering = 0, "
                   "look_at = ?, updated_at = ? WHERE id = ?",
                   (now, now + poll_interval, now, row["image_id"]))
            claims.append((row["image_id"], chosen, size))
        return claims

    def release_claim(self, image_id: str, stores: list[str], now: float) -> None:
        """A claim whose POST was never sent: back to pending, its attempt given back."""
        marks = ",".join("?" * len(stores))
        self.x(f"UPDATE copies SET state = 'pending', attempts = max(attempts - 1, 0), "
               f"updated_at = ? WHERE image_id = ? AND state = 'in_flight' AND store IN ({marks})",
               (now, image_id, *stores))
        self.x("UPDATE images SET import_started_at = NULL, look_at = ? WHERE id = ?",
               (now, image_id))

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

    def reconcile_page(self, items: list[tuple[Image, dict, dict]], now: float) -> int:
        """Record listed images; mark those whose copies disagree with the policy to look at."""
        if not items:
            return 0
        ids = [img.id for img, _, _ in items]
        rows: dict[str, dict[str, str]] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            for r in self.x(f"SELECT image_id, store, state FROM copies WHERE image_id IN "
                            f"({','.join('?' * len(part))})", part):
                rows.setdefault(r[0], {})[r[1]] = r[2]
        marked = 0
        for image, desired, skipped in items:
            have = rows.get(image.id, {})
            look = image.status == "active" and _disagrees(image, desired, skipped, have)
            self.x("""
                INSERT INTO images (id, name, owner, visibility, status, disk_format, size,
                    stores, hidden, reconciled_at, look_at, created_at, updated_at)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(id) DO UPDATE SET name = excluded.name, owner = excluded.owner,
                  visibility = excluded.visibility, status = excluded.status,
                  disk_format = excluded.disk_format, size = excluded.size,
                  stores = excluded.stores, hidden = excluded.hidden,
                  reconciled_at = excluded.reconciled_at, deleted = 0,
                  look_at = CASE WHEN excluded.look_at IS NOT NULL AND
                                 (images.look_at IS NULL OR images.look_at > excluded.look_at)
                            THEN excluded.look_at ELSE images.look_at END,
                  updated_at = excluded.updated_at""",
                   (image.id, image.name, image.owner, image.visibility, image.status,
                    image.disk_format, image.size, ",".join(sorted(image.stores)),
                    int(image.hidden), now, now if look else None, now, now))
            marked += look
        return marked

    def reconcile_finish(self, started: float, now: float, seconds: float) -> int:
        """Images the full listing did not show, with copies still open: look (gone?)."""
        n = self.x("""UPDATE images SET look_at = ? WHERE deleted = 0
                      AND (reconciled_at IS NULL OR reconciled_at < ?) AND look_at IS NULL
                      AND EXISTS (SELECT 1 FROM copies WHERE image_id = images.id
                                  AND state IN ('pending','retrying','in_flight'))""",
                   (now, started)).rowcount
        self.x("INSERT INTO daemon (id, last_reconcile_at, reconcile_seconds) VALUES (1, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET last_reconcile_at = excluded.last_reconcile_at, "
               "reconcile_seconds = excluded.reconcile_seconds", (now, seconds))
        return n

    # -- requests from the CLI, policy, daemon facts

    def add_request(self, action: str, image_id: str | None, now: float) -> int:
        return self.x("INSERT INTO requests (action, image_id, created_at) VALUES (?, ?, ?)",
                      (action, image_id, now)).lastrowid

    def process_requests(self, now: float) -> list[tuple[str, str | None, int]]:
        done = []
        for req in self.x("SELECT * FROM requests WHERE done_at IS NULL ORDER BY id").fetchall():
            where, args = "state = 'failed'", []
            if req["image_id"]:
                where += " AND image_id = ?"
                args.append(req["image_id"])
            n = 0
            if req["action"] == "retry":
                ids = [r[0] for r in self.x(f"SELECT DISTINCT image_id FROM copies WHERE {where}",
                                            args)]
                n = self.x(f"UPDATE copies SET state = 'pending', attempts = 0, "
                           f"next_attempt_at = NULL, updated_at = ? WHERE {where}",
                           (now, *args)).rowcount
                for image_id in ids:
                    self.x("UPDATE images SET look_at = ? WHERE id = ?", (now, image_id))
            if req["image_id"]:
                self.x("INSERT INTO images (id, look_at, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET look_at = ?",
                       (req["image_id"], now, now, now, now))
            self.x("UPDATE requests SET done_at = ?, result = ? WHERE id = ?",
                   (now, f"{n} copies re-queued" if req["action"] == "retry" else "queued",
                    req["id"]))
            done.append((req["action"], req["image_id"], n))
        return done

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

    def counts(self) -> dict[str, int]:
        return dict(self.x("SELECT state, count(*) FROM copies GROUP BY state").fetchall())

    def counts_by_store(self) -> dict[tuple[str, str], int]:
        """{(store, state): n} over every copy in the ledger."""
        rows = self.x("SELECT store, state, count(*) FROM copies GROUP BY store, state")
        return {(store, state): n for store, state, n in rows.fetchall()}


def _disagrees(image: Image, desired, skipped, have: dict[str, str]) -> bool:
    """Does the ledger's view of this image's copies differ from what the policy wants?"""
    if "in_flight" in have.values():
        return False
    for store in desired:
        state = have.get(store)
        if store in image.stores:
            if state != "done":
                return True
        elif store not in image.importing_to and state not in ("pending", "retrying", "failed"):
            return True
    for store in skipped:
        if store not in image.stores and have.get(store) != "cancelled":
            return True
    return any(state in OPEN and (store not in desired or store in image.stores)
               for store, state in have.items())


# -- read side, for the CLI -------------------------------------------------------------------
# Plain queries over a connection from open_readonly(): nothing below writes. Rows come back
# as dicts of the stored values; imagesync.report formats them.


def read_store_counts(conn: sqlite3.Connection) -> list[dict]:
    """Per store: copies in each state, and since when the oldest pending copy has waited."""
    stores: dict[str, dict] = {}
    for state, store, n in conn.execute(
            "SELECT state, store, count(*) FROM copies GROUP BY state, store"):
        row = stores.setdefault(store, {"store": store, **dict.fromkeys(planner.STATES, 0),
                                        "oldest_pending_at": None})
        row[state] = n
    for store, oldest in conn.execute(
            "SELECT store, min(updated_at) FROM copies WHERE state = 'pending' GROUP BY store"):
        stores[store]["oldest_pending_at"] = oldest
    return [stores[s] for s in sorted(stores)]


def read_daemon(conn: sqlite3.Connection) -> dict | None:
    row = conn.execute("SELECT * FROM daemon WHERE id = 1").fetchone()
    return dict(row) if row else None


def read_image(conn: sqlite3.Connection, image_id: str) -> dict | None:
    row = conn.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
    return dict(row) if row else None


def find_image_ids(conn: sqlite3.Connection, name: str) -> list[str]:
    """Ids of the images last seen with this exact name, live ones first."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM images WHERE name = ? ORDER BY deleted, id", (name,))]


def read_copies(conn: sqlite3.Connection, image_id: str | None = None,
                states: Iterable[str] | None = None, project: str | None = None,
                store: str | None = None) -> list[dict]:
    """Copies with their image's name and owner, filtered, ordered by image and store."""
    where, args = [], []
    if image_id is not None:
        where.append("c.image_id = ?")
        args.append(image_id)
    if states is not None:
        states = list(states)
        where.append(f"c.state IN ({','.join('?' * len(states))})")
        args.extend(states)
    if project is not None:
        where.append("i.owner = ?")
        args.append(project)
    if store is not None:
        where.append("c.store = ?")
        args.append(store)
    sql = ("SELECT c.*, i.name AS name, i.owner AS owner FROM copies c "
           "LEFT JOIN images i ON i.id = c.image_id")
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [dict(r) for r in conn.execute(sql + " ORDER BY c.image_id, c.store", args)]


def read_copy_states(conn: sqlite3.Connection, image_ids: Iterable[str]) -> dict[tuple, str]:
    """(image id, store) -> state, for the given images."""
    ids, out = list(image_ids), {}
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        for r in conn.execute(f"SELECT image_id, store, state FROM copies WHERE image_id IN "
                              f"({','.join('?' * len(part))})", part):
            out[(r[0], r[1])] = r[2]
    return out


def read_request(conn: sqlite3.Connection, request_id: int) -> dict | None:
    row = conn.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
    return dict(row) if row else None


def read_policy(conn: sqlite3.Connection) -> dict | None:
    """The policy the daemon last loaded successfully (source path, text, when)."""
    row = conn.execute("SELECT source, text, saved_at FROM policy WHERE id = 1").fetchone()
    return dict(row) if row else None
