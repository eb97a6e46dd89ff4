"""The ledger's file as its one writer opens it: private, WAL, migrated, size-capped.

The migrations (sqlite-utils' Migrations) are the schema's history; schema.SCHEMA lists
their names for readers, which never load sqlite-utils.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import sqlite_utils
from sqlite_utils.migrations import Migrations

from imagesync.ledger.schema import MIB, LedgerError

migrations = Migrations("imagesync")


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


@migrations()
def m003_import_stores(db: sqlite_utils.Database) -> None:
    """images.import_stores: the image's stores when our import was sent. An import that
    ends with the image gone from one of them destroyed a copy (Glance before 33 deletes an
    image's first location when a copy-image goes over user_storage_quota): the planner
    halts that image instead of copying again and again."""
    db.execute("ALTER TABLE images ADD COLUMN import_stores TEXT")


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


