"""The ledger's file as its readers see it: the schema version, its errors, how full it is.

`open_readonly()` is for every reader (the CLI, metric scrapes); `usage()` says how full
the file is, in the operator's terms (MiB in use, the cap). Writing (migrations, the size
cap) is `imagesync.ledger.migrate`, the only part that needs sqlite-utils: `imagesync
status` never loads it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

MIB = 1 << 20
SQLITE_FULL = 13   # sqlite3.SQLITE_FULL, named there from Python 3.11
# Longest wait (before jitter) between two tries at a ledger that cannot be written: a full
# disk costs nothing to probe, and work must resume within seconds of space returning.
RETRY_CAP = 15.0


# The migrations this imagesync knows, in order (imagesync.ledger.migrate defines them;
# a unit test checks the two lists agree).
SCHEMA = ["m001_initial", "m002_queued_at", "m003_import_stores"]


class LedgerError(RuntimeError):
    """The ledger cannot be opened or written; the message names the file and the cause."""


class LedgerFull(LedgerError):
    """A write needs room the ledger does not have (its cap, or the disk), even after pruning.

    Writes that only change rows already there still succeed: what it tracks goes on."""


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
