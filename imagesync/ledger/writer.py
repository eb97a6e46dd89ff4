"""The daemon's handle on the ledger: one writer thread, group commits, reads on the side.

Callers hand it operations (Ops methods); it runs the queued ones together in one
`BEGIN IMMEDIATE` transaction and returns each result only after the commit. Between
writes, `Upkeep` prunes (upkeep.py). When a write finds the ledger full, it prunes
everything settled and retries; still full, it runs each operation alone, so that writes
to rows it already tracks go on and only those needing new room fail (LedgerFull). Reads
that only count (metric scrapes) use a read-only connection and never wait for the writer.
"""

from __future__ import annotations

import concurrent.futures
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from imagesync.backoff import compute_backoff
from imagesync.ledger import read
from imagesync.ledger.claims import SPLIT_AFTER
from imagesync.ledger.migrate import connect
from imagesync.ledger.ops import Ops
from imagesync.ledger.prune import Retention
from imagesync.ledger.schema import RETRY_CAP, LedgerError, is_full, open_readonly
from imagesync.ledger.upkeep import SIZE_CHECK, Upkeep

log = structlog.get_logger("imagesync.ledger")

READ_TIMEOUT = 5.0      # seconds a read-only count waits for SQLite's locks


class _Full(Exception):
    """A transaction hit SQLITE_FULL; SQLite rolled it back whole."""


class Ledger:
    """The daemon's handle: one writer thread, group commits, results after commit.

    `retention`: prune on that schedule (the daemon); None: never on a schedule (the CLI).
    `split_after`: how long an image waits for room in all its stores (claims.py).
    `clock`: the wall clock pruning compares row times with; `size_check`: seconds
    between checks of the size against `max_size_mb`. `retry_open`: a ledger that cannot
    be opened (directory missing or unwritable, disk full) is retried with backoff while
    every call fails at once with LedgerError (the daemon: it must not crash-loop);
    without it the constructor raises (tools, tests).
    """

    def __init__(self, path: str | Path, max_batch: int = 500, max_size_mb: int = 0,
                 retention: Retention | None = None, split_after: float = SPLIT_AFTER,
                 clock: Callable[[], float] = time.time, size_check: float = SIZE_CHECK,
                 retry_open: bool = False):
        self.path = Path(path)
        self.max_size_mb = max_size_mb
        self.split_after = split_after
        self.upkeep = Upkeep(self.path, max_size_mb, retention, clock, size_check)
        self._queue: queue.Queue = queue.Queue()
        self._max_batch = max_batch
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._closed = False
        self._retry_open = retry_open
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        if not retry_open:
            self._ready.result()  # raises LedgerError if the file cannot be opened

    @classmethod
    def from_conf(cls, conf: Any) -> Ledger:
        """The daemon's ledger, as [imagesync] and [ledger] configure it."""
        return cls(conf.imagesync.ledger_path, max_size_mb=conf.imagesync.ledger_max_size_mb,
                   retention=Retention.from_conf(conf),
                   split_after=conf.ledger.split_imports_after, retry_open=True)

    @property
    def full(self) -> bool:
        """The last write that needed new room did not get it."""
        return self.upkeep.full

    @property
    def last_prune(self) -> dict[str, Any] | None:
        """When the last prune ended, the rows it removed, and the size after."""
        return self.upkeep.last_prune

    # -- the writer thread

    def _open(self):
        """The connection; with retry_open, retried with backoff until it opens (or close())."""
        failures = 0
        while True:
            try:
                db = connect(self.path, self.max_size_mb)
            except LedgerError as exc:
                if not self._retry_open:
                    self._ready.set_exception(exc)
                    return None
                failures += 1
                delay = compute_backoff(failures, base=1.0, cap=RETRY_CAP)
                log.error("cannot open the ledger; calls fail until it opens", error=str(exc),
                          retry_in=round(delay, 1), tries=failures)
                if not self._fail_calls_for(delay, exc):
                    return None  # closed meanwhile
                continue
            if failures:
                log.info("ledger opened", ledger=str(self.path), after_tries=failures)
            self._ready.set_result(None)
            return db

    def _fail_calls_for(self, seconds: float, exc: LedgerError) -> bool:
        """Answer every call with `exc` for `seconds`; False once close() was asked."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                return False
            item[2].set_exception(exc)
        return True

    def _run(self) -> None:
        db = self._open()
        if db is None:
            return
        ops = Ops(db, self.split_after)

        def step(retention: Retention) -> dict[str, int] | None:
            return self._prune_step(db, ops, retention)

        while True:
            try:
                first = self._queue.get(timeout=self.upkeep.idle_wait())
            except queue.Empty:
                self.upkeep.between_writes(db.conn, step)
                continue
            batch = [first]
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
            self._commit(db, ops, batch, step)
            self.upkeep.between_writes(db.conn, step)

    def _commit(self, db, ops: Ops, batch, step) -> None:
        try:
            try:
                results = self._transaction(db, ops, batch)
            except _Full:
                self.upkeep.at_cap(step)
                try:
                    results = self._transaction(db, ops, batch)
                except _Full:
                    results = [self._alone(db, ops, item) for item in batch]
        except sqlite3.Error as exc:
            error = LedgerError(f"cannot write ledger {self.path}: {exc}")
            results = [(future, False, error) for _fn, _args, future in batch]
        for future, ok, value in results:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

    def _transaction(self, db, ops: Ops, batch) -> list:
        """Run the batch in one transaction; one failing operation is rolled back alone."""
        conn = db.conn
        results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, args, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((future, True, fn(ops, *args)))
                    conn.execute("RELEASE op")
                except Exception as exc:  # one bad operation must not sink its neighbours
                    if is_full(exc):
                        raise _Full() from exc
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, False, exc))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.rollback()
            if isinstance(exc, sqlite3.Error) and is_full(exc):
                raise _Full() from exc
            raise
        self.upkeep.after_commit(conn)
        return results

    def _alone(self, db, ops: Ops, item):
        """At the cap: one operation in its own transaction; it fails only if it needs room."""
        try:
            (result,) = self._transaction(db, ops, [item])
            return result
        except _Full:
            return item[2], False, self.upkeep.full_error(db.conn)
        except sqlite3.Error as exc:   # this one alone: the others' commits stand
            return item[2], False, LedgerError(f"cannot write ledger {self.path}: {exc}")

    def _prune_step(self, db, ops: Ops, retention: Retention) -> dict[str, int] | None:
        """One prune step in its own transaction; None (and logged) when it fails."""
        item: tuple[Callable[..., Any], tuple, concurrent.futures.Future] = (
            Ops.prune, (self.upkeep.clock(), retention), concurrent.futures.Future())
        try:
            ((_future, ok, counts),) = self._transaction(db, ops, [item])
        except (_Full, sqlite3.Error) as exc:
            ok, counts = False, exc
        if not ok:
            log.error("cannot prune the ledger", ledger=str(self.path), error=str(counts))
            return None
        return counts

    # -- the callers' side

    def submit(self, fn: Callable[..., Any], *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if fn in _READS:   # counts: answered from a read-only connection, never queued
            try:
                future.set_result(self.read(_READS[fn], *args))
            except Exception as exc:  # noqa: BLE001 (the caller gets it from the future)
                future.set_exception(exc)
            return future
        self._queue.put((fn, args, future))
        return future

    def call(self, fn: Callable[..., Any], *args, timeout: float | None = 120) -> Any:
        return self.submit(fn, *args).result(timeout)

    def read(self, fn: Callable[..., Any], *args) -> Any:
        """fn(read-only connection, *args) in the caller's thread: never waits for the writer.

        One connection, opened on first use, shared under a lock (scrapes are rare)."""
        with self._reader_lock:
            if self._closed:
                raise LedgerError(f"ledger {self.path} closed")
            if self._reader is None:
                self._reader = open_readonly(self.path, check_same_thread=False)
                self._reader.execute(f"PRAGMA busy_timeout = {int(READ_TIMEOUT * 1000)}")
            try:
                return fn(self._reader, *args)
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot read ledger {self.path}: {exc}") from exc

    def counts(self) -> dict[str, int]:
        return self.read(read.count_copies)

    def counts_by_store(self) -> dict[tuple[str, str], int]:
        """{(store, state): n}: what the imagesync_copies metric shows."""
        return self.read(read.count_copies_by_store)

    def alive(self) -> bool:
        """The writer thread is running (for the watchdog)."""
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)
        with self._reader_lock:
            self._closed = True
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __getattr__(self, name: str):
        """ledger.note_events(...) runs Ops.note_events(...) in the writer and waits."""
        op = getattr(Ops, name, None)
        if op is None or name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.call(op, *args)


_READS: dict[Callable[..., Any], Callable[..., Any]] = {
    Ops.counts: read.count_copies,
    Ops.counts_by_store: read.count_copies_by_store,
}
