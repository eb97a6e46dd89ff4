"""The ledger's file: its schema (migrations), how it is opened for writing and for reading.

`connect()` is for the one writer (private file, WAL, migrations, the size cap);
`open_readonly()` is for every reader (the CLI, metric scrapes). `usage()` says how
full the file is, in the operator's terms (MiB in use, the cap).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path

import sqlite_utils
from sqlite_utils.migrations import Migrations

migrations = Migrations("imagesync")
MIB = 1 << 20
SQLITE_FULL = 13   # sqlite3.SQLITE_FULL, named there from Python 3.11
# Longest wait (before jitter) between two tries at a ledger that cannot be written: a full
# disk costs nothing to probe, and work must resume within seconds of space returning.
RETRY_CAP = 15.0


class LedgerError(RuntimeError):
    """The ledger cannot be opened or written; the message names the file and the cause."""


class LedgerFull(LedgerError):
    """A write needs room the ledger does not have (its cap, or the disk), even after pruning.

    Writes that only change rows already there still succeed: what it tracks goes on."""


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


@migrations()
def m002_queued_at(db: sqlite_utils.Database) -> None:
    """copies.queued_at: when a copy last joined the queue (became pending or retrying from
    done, failed, cancelled or new). A claim handed back keeps it, unlike updated_at, so
    `status` ages the oldest pending copy, and claims order the queue, from it. Claims read
    every open copy each time: a covering index of only those rows, in image order, saves a
    sort and a table lookup per row (claims.py)."""
    db.executescript("""
        ALTER TABLE copies ADD COLUMN queued_at REAL;
        UPDATE copies SET queued_at = updated_at WHERE state IN ('pending', 'retrying');
        CREATE INDEX copies_open ON copies(image_id, store, next_attempt_at, queued_at, state)
            WHERE state IN ('pending', 'retrying');
    """)


SCHEMA = [m.name for m in migrations._migrations]


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
            db.execute(f"PRAGMA max_page_count = {max_size_mb * MIB // page}")
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
    return db


def open_readonly(path: str | Path, check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only connection: no migrations, no journal change, schema checked."""
    path = Path(path)
    if not path.exists():
        raise LedgerError(f"no ledger at {path} (has the daemon run? see [imagesync] ledger_path)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5,
                               check_same_thread=check_same_thread)
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


@dataclasses.dataclass(frozen=True)
class Usage:
    """How full the ledger file is. `in_use` excludes pages freed by pruning (reused first)."""

    in_use: int        # bytes holding rows
    file: int          # bytes of the file (its high-water mark: pruning does not shrink it)
    cap: int | None    # bytes it may not grow past (ledger_max_size_mb), None without a cap

    @property
    def fraction(self) -> float:
        """Share of the cap in use (0 without a cap)."""
        return self.in_use / self.cap if self.cap else 0.0

    def text(self) -> str:
        cap = f" of its {self.cap / MIB:.0f} MiB cap" if self.cap else ""
        return f"{self.in_use / MIB:.1f} MiB in use{cap} (file {self.file / MIB:.1f} MiB)"


def usage(conn: sqlite3.Connection, capped: bool) -> Usage:
    """Read from the file's header: cheap enough to ask after every commit."""
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    cap = conn.execute("PRAGMA max_page_count").fetchone()[0] * page if capped else None
    return Usage((pages - free) * page, pages * page, cap)


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the cap (max_page_count) or the disk. SQLite then rolls back the whole
    transaction by itself, savepoints included."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == SQLITE_FULL or "database or disk is full" in str(exc)
