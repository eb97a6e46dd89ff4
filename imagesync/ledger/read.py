"""The ledger's read side: plain queries over a read-only connection (`open_readonly()`).

Used by the CLI and by metric scrapes: nothing here writes, and nothing here runs in the
daemon's writer thread (WAL lets readers and the writer go on at once). Rows come back as
dicts of the stored values; imagesync.report formats them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from imagesync import planner


def count_copies(conn: sqlite3.Connection) -> dict[str, int]:
    """{state: n} over every copy in the ledger."""
    return dict(conn.execute("SELECT state, count(*) FROM copies GROUP BY state").fetchall())


def count_copies_by_store(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """{(store, state): n} over every copy in the ledger (the imagesync_copies metric)."""
    rows = conn.execute("SELECT store, state, count(*) FROM copies GROUP BY store, state")
    return {(store, state): n for store, state, n in rows.fetchall()}


def read_store_counts(conn: sqlite3.Connection) -> list[dict]:
    """Per store: copies in each state, and since when the oldest pending copy has waited
    (from when it joined the queue: a claim handed back does not reset it)."""
    stores: dict[str, dict] = {}
    for state, store, n in conn.execute(
            "SELECT state, store, count(*) FROM copies GROUP BY state, store"):
        row = stores.setdefault(store, {"store": store, **dict.fromkeys(planner.STATES, 0),
                                        "oldest_pending_at": None})
        row[state] = n
    for store, oldest in conn.execute(
            "SELECT store, min(coalesce(queued_at, updated_at)) FROM copies "
            "WHERE state = 'pending' GROUP BY store"):
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


HELD = "held"


def read_copy_states(conn: sqlite3.Connection, image_ids: Iterable[str]) -> dict[tuple, str]:
    """(image id, store) -> state, for the given images ("held": waiting for room in its
    owner's quota)."""
    ids, out = list(image_ids), {}
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        for r in conn.execute(f"SELECT image_id, store, state, error_kind FROM copies "
                              f"WHERE image_id IN ({','.join('?' * len(part))})", part):
            out[(r[0], r[1])] = shown_state(r[2], r[3])
    return out


def shown_state(state: str, error_kind: str | None) -> str:
    """The state operators see: a copy waiting for room in its owner's quota is "held"."""
    return HELD if state == "retrying" and error_kind == "owner_quota" else state


def read_request(conn: sqlite3.Connection, request_id: int) -> dict | None:
    row = conn.execute("SELECT * FROM requests WHERE id = ?", (request_id,)).fetchone()
    return dict(row) if row else None


def read_policy(conn: sqlite3.Connection) -> dict | None:
    """The policy the daemon last loaded successfully (source path, text, when)."""
    row = conn.execute("SELECT source, text, saved_at FROM policy WHERE id = 1").fetchone()
    return dict(row) if row else None
