"""Claiming: which copies go to Glance next, as one copy-image import per image, within caps.

Every copy-image import first reads the whole image into Glance's staging area, so an
image's missing stores go in ONE import: it waits until each of its open copies is due
(jittered retries come due seconds apart) and each store has room under
`max_imports_per_store`. Once it has waited `split_after` seconds (`[ledger]
split_imports_after`, counted from when its first copy could have gone: that copy's retry
time, else when it joined the queue), it goes to the stores with room and the rest follow
in a later import. Candidates are chosen in SQL among copies to stores below their cap, so
a store at its cap never holds back copies to other stores.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Iterable

# Seconds an image waits for room in all the stores it needs before it is split.
# Typical copies take seconds to minutes: five minutes of waiting costs less than reading
# a large image into staging twice, and bounds the wait behind a store that stays busy
# (a rollout onto a new store queues thousands of copies there).
SPLIT_AFTER = 300.0
CANDIDATES = 50   # images looked at per query; more only matter under byte caps
MAX_ROUNDS = 4    # queries per claim, when the first candidates cannot go after all


@dataclasses.dataclass
class _Room:
    """What the caps leave, updated as copies are claimed within one call."""

    per_store: dict[str, int]
    cap: int
    bytes_in_flight: int
    max_bytes_in_flight: int
    hour: int
    max_bytes_per_hour: int

    def capped(self) -> list[str]:
        return sorted(s for s, n in self.per_store.items() if n >= self.cap)

    def fits(self, size: int, n_stores: int) -> bool:
        """n copies of `size` bytes within the byte caps (one image alone always fits when
        nothing is in flight, or it could never go)."""
        total = size * n_stores
        ok_flight = not self.max_bytes_in_flight or not self.bytes_in_flight or \
            self.bytes_in_flight + total <= self.max_bytes_in_flight
        ok_hour = not self.max_bytes_per_hour or not self.hour or \
            self.hour + total <= self.max_bytes_per_hour
        return ok_flight and ok_hour

    def take(self, stores: list[str], size: int) -> None:
        for store in stores:
            self.per_store[store] = self.per_store.get(store, 0) + 1
        self.bytes_in_flight += size * len(stores)
        self.hour += size * len(stores)


class ClaimOps:
    """Mixed into Ops: runs in the writer's transaction (`self.x` executes SQL)."""

    x: Callable[..., sqlite3.Cursor]
    split_after: float = SPLIT_AFTER

    def claim(self, now: float, max_imports: int, per_store: int, max_bytes_in_flight: int,
              max_bytes_per_hour: int, limit: int, exclude: Iterable[str] = (),
              poll_interval: float = 1.0,
              split_after: float | None = None) -> list[tuple[str, list[str], int]]:
        """Mark the next copies in flight, within every cap, BEFORE their POST is sent.

        Returns (image id, stores, size) per import to send, oldest waiting first.
        `exclude`: images another operation is busy with; they wait for the next claim.
        `split_after`: overrides `[ledger] split_imports_after` for this call.
        """
        wait = self.split_after if split_after is None else split_after
        skip = set(exclude)
        images_in_flight, bytes_in_flight = self.x(
            "SELECT count(DISTINCT image_id), coalesce(sum(bytes), 0) FROM copies "
            "WHERE state = 'in_flight'").fetchone()
        free = min(max_imports - images_in_flight, limit)
        if free <= 0:
            return []
        hour = self.x("SELECT coalesce(sum(bytes), 0) FROM copies WHERE started_at > ?",
                      (now - 3600,)).fetchone()[0] if max_bytes_per_hour else 0
        room = _Room(dict(self.x("SELECT store, count(*) FROM copies WHERE state = 'in_flight' "
                                 "GROUP BY store").fetchall()), per_store, bytes_in_flight,
                     max_bytes_in_flight, hour, max_bytes_per_hour)
        claims: list[tuple[str, list[str], int]] = []
        for _round in range(MAX_ROUNDS):
            # Caps only tighten within one claim: an image passed over stays passed over,
            # and the next query (if any) reaches further down the queue.
            rows = self._candidates(now, room.capped(), skip, now - wait)
            for row in rows:
                if len(claims) >= free:
                    return claims
                skip.add(row["image_id"])
                stores = self._stores_to_send(row, room, now - wait)
                if stores:
                    room.take(stores, row["size"])
                    self._mark_in_flight(row["image_id"], stores, row["size"], now,
                                         poll_interval)
                    claims.append((row["image_id"], stores, row["size"]))
            if len(rows) < CANDIDATES:
                break
        return claims

    def owner_in_flight(self, image_id: str) -> tuple[str | None, int]:
        """The image's owner, and the bytes our copies of that owner's other images in
        flight will add to its usage (Glance counts a copy once it is made)."""
        row = self.x("SELECT owner FROM images WHERE id = ?", (image_id,)).fetchone()
        owner = row[0] if row else None
        if owner is None:
            return None, 0
        return owner, self.x(
            "SELECT coalesce(sum(c.bytes), 0) FROM copies c JOIN images i ON i.id = c.image_id "
            "WHERE c.state = 'in_flight' AND i.owner = ? AND c.image_id != ?",
            (owner, image_id)).fetchone()[0]

    @staticmethod
    def _stores_to_send(row, room: _Room, cut: float) -> list[str]:
        """All the image's stores when every open copy is due and has room (one import);
        after waiting since `cut`, those with room; else none (it waits)."""
        capped = set(room.capped())
        ready = sorted(s for s in row["ready_stores"].split(",") if s not in capped)
        if len(ready) == row["open"] and room.fits(row["size"], len(ready)):
            return ready
        if row["since"] is None or row["since"] > cut:
            return []
        chosen: list[str] = []
        trial = dataclasses.replace(room, per_store=dict(room.per_store))
        for store in ready:
            if trial.fits(row["size"], 1):
                chosen.append(store)
                trial.take([store], row["size"])
        return chosen

    def _candidates(self, now: float, capped: list[str], skip: set[str], cut: float):
        """Images with copies due to stores below their cap, oldest first: those whose every
        open copy is due and has room (one whole import), or that have waited since `cut`.

        One pass over the open copies (the covering index copies_open), grouped per image;
        `since`: when the image's first copy that could go now became due (its retry time,
        else when it joined the queue).
        """
        return self.x(f"""
            SELECT g.image_id, g.ready_stores, g.open, g.since, coalesce(i.size, 0) AS size
            FROM (SELECT image_id, group_concat(CASE WHEN ready THEN store END) AS ready_stores,
                         count(*) AS open, sum(ready AND uncapped) AS go,
                         min(CASE WHEN ready AND uncapped THEN since END) AS since
                  FROM (SELECT image_id, store,
                               (next_attempt_at IS NULL OR next_attempt_at <= ?) AS ready,
                               store NOT IN ({",".join("?" * len(capped))}) AS uncapped,
                               coalesce(next_attempt_at, queued_at) AS since
                        FROM copies INDEXED BY copies_open
                        WHERE state IN ('pending', 'retrying'))
                  GROUP BY image_id
                  HAVING go > 0 AND (go = open OR since <= ?)) g
            JOIN images i ON i.id = g.image_id
            WHERE i.status = 'active' AND i.deleted = 0
              AND (i.lock_task IS NULL OR i.lock_stale = 1)
              AND (i.look_at IS NULL OR i.look_at > ?)
              AND g.image_id NOT IN (SELECT image_id FROM copies WHERE state = 'in_flight')
              AND g.image_id NOT IN ({",".join("?" * len(skip))})
            ORDER BY g.since, g.image_id LIMIT {CANDIDATES}""",
                      (now, *capped, cut, now, *skip)).fetchall()

    def _mark_in_flight(self, image_id: str, stores: list[str], size: int, now: float,
                        poll_interval: float) -> None:
        marks = ",".join("?" * len(stores))
        self.x(f"UPDATE copies SET state = 'in_flight', attempts = attempts + 1, "
               f"started_at = ?, finished_at = NULL, next_attempt_at = NULL, bytes = ?, "
               f"updated_at = ? WHERE image_id = ? AND store IN ({marks})",
               (now, size, now, image_id, *stores))
        # A look is scheduled even before the POST's outcome is recorded: if that record
        # cannot be written (disk full), the image is still polled, never forgotten.
        self.x("UPDATE images SET import_started_at = ?, saw_lock = 0, recovering = 0, "
               "import_stores = stores, look_at = ?, updated_at = ? WHERE id = ?",
               (now, now + poll_interval, now, image_id))

    def release_claim(self, image_id: str, stores: list[str], now: float) -> None:
        """A claim whose POST was never sent: back to pending, its attempt given back."""
        marks = ",".join("?" * len(stores))
        self.x(f"UPDATE copies SET state = 'pending', attempts = max(attempts - 1, 0), "
               f"updated_at = ? WHERE image_id = ? AND state = 'in_flight' AND store IN ({marks})",
               (now, image_id, *stores))
        self.x("UPDATE images SET import_started_at = NULL, look_at = ? WHERE id = ?",
               (now, image_id))
