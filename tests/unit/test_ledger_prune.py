"""The ledger stays small: settled rows pruned on a schedule, near and at the size cap.

Real ledger files, an injected clock (`now`, or `clock=` for the writer's schedule), and
no waiting on time: the writer's housekeeping runs between two writes, so a test makes a
write and then reads what happened. `simulate_churn()` writes a busy cloud's churn
through the daemon's own operations; bench/bench_ledger_size.py runs it for a year.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
import re
import sqlite3
import threading

import pytest
from structlog.testing import capture_logs

from imagesync.errors import FORBIDDEN_MESSAGE, Action, Kind, Outcome
from imagesync.events import Event, EventKind
from imagesync.ledger import Ledger, LedgerFull, Ops, Retention, connect, usage
from imagesync.model import Image
from imagesync.planner import Settings

T0 = 1_800_000_000.0
DAY = 86400.0
SETTINGS = Settings(max_attempts=4, backoff=lambda attempt: 100.0 * attempt, poll_interval=2.0)
RETENTION = Retention(deleted_images=30 * DAY, settled_copies=30 * DAY, requests=30 * DAY,
                      interval=3600.0)
UTC = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs 3.11)
WANTED = {"fast": ("everywhere",), "slow": ("everywhere",), "edge": ("everywhere",)}


def image_id(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-000000000000"


def image(n: int, stores=("fast",), status="active", size=100) -> Image:
    return Image(image_id(n), name=f"image-{n}", status=status, stores=frozenset(stores),
                 size=size, disk_format="raw")


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def query(path, sql: str, *args) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def rows(path) -> dict[str, int]:
    return {t: query(path, f"SELECT count(*) FROM {t}")[0][0]
            for t in ("images", "copies", "requests")}


def copy_image(ops_or_ledger, n: int, now: float) -> None:
    """Image n, uploaded to fast, planned to slow and edge, copied, done."""
    ops_or_ledger.record_visit(image_id(n), image(n), WANTED, {}, now, SETTINGS)
    ops_or_ledger.claim(now, 100, 100, 0, 0, 100)
    ops_or_ledger.record_visit(image_id(n), image(n, ("fast", "slow", "edge")), WANTED, {},
                               now + 60, SETTINGS)


def delete_image(ops_or_ledger, n: int, now: float) -> None:
    ops_or_ledger.note_events([Event(EventKind.DELETED, image_id(n), "image.delete",
                                     datetime.datetime.fromtimestamp(now, UTC), None,
                                     status="deleted")], now)
    ops_or_ledger.record_visit(image_id(n), None, {}, {}, now, SETTINGS)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path):
    handle = Ledger(path)
    yield handle
    handle.close()


# -- what goes, what stays ------------------------------------------------------------------


def test_a_deleted_image_s_rows_go_after_the_retention_and_not_before(ledger, path):
    retention = dataclasses.replace(RETENTION, settled_copies=365 * DAY)
    copy_image(ledger, 1, T0)
    delete_image(ledger, 1, T0 + DAY)
    assert ledger.prune(T0 + 31 * DAY - 1, retention)["images"] == 0
    assert rows(path)["images"] == 1 and rows(path)["copies"] == 3
    assert ledger.prune(T0 + 31 * DAY + 1, retention) == {
        "images": 1, "copies": 3, "requests": 0, "more": 0}
    assert rows(path) == {"images": 0, "copies": 0, "requests": 0}


def test_old_done_copies_go_while_open_and_failed_copies_of_live_images_stay(ledger, path):
    # Given image 1 copied long ago, image 2 with a copy still pending, and image 3 whose
    # copy to slow failed for good
    copy_image(ledger, 1, T0)
    ledger.record_visit(image_id(2), image(2), {"fast": ("r",), "slow": ("r",)}, {}, T0,
                        SETTINGS)
    ledger.record_visit(image_id(3), image(3), {"fast": ("r",), "slow": ("r",)}, {}, T0,
                        SETTINGS)
    ledger.claim(T0, 100, 100, 0, 0, 100)
    forbidden = Outcome(Kind.FORBIDDEN, Action.BLOCK, FORBIDDEN_MESSAGE, 403)
    ledger.record_outcome(image_id(3), ["slow"], forbidden, T0, SETTINGS)
    ledger.submit(lambda ops: ops.x("UPDATE copies SET state = 'pending' WHERE image_id = ? "
                                    "AND store = 'slow'", (image_id(2),))).result(5)
    # When a year has passed (reconcile passes kept showing the images)
    later = T0 + 365 * DAY
    ledger.reconcile_page([(image(n), {}, {}) for n in (1, 2, 3)], later)
    ledger.prune(later, RETENTION)
    # Then only the settled copies went; every image is still known
    left = dict(((i, s), st) for i, s, st in query(path, "SELECT image_id, store, state "
                                                         "FROM copies"))
    assert left == {(image_id(2), "slow"): "pending", (image_id(3), "slow"): "failed"}
    assert rows(path)["images"] == 3


def test_an_image_with_nothing_to_track_that_glance_no_longer_shows_goes(ledger, path):
    copy_image(ledger, 1, T0)
    copy_image(ledger, 2, T0)
    # Image 2 is still listed by every reconcile pass; image 1 vanished without a notification
    ledger.reconcile_page([(image(2, ("fast", "slow", "edge")), WANTED, {})], T0 + 40 * DAY)
    ledger.prune(T0 + 40 * DAY, RETENTION)
    assert [r[0] for r in query(path, "SELECT id FROM images")] == [image_id(2)]


def test_processed_requests_go_after_the_retention_and_waiting_ones_stay(ledger, path):
    ledger.add_request("sync", image_id(1), T0)
    ledger.process_requests(T0)
    ledger.add_request("sync", image_id(2), T0 + 1)
    ledger.prune(T0 + 31 * DAY, RETENTION)
    assert query(path, "SELECT image_id, done_at FROM requests") == [(image_id(2), None)]


def test_a_pruned_done_copy_is_not_taken_for_a_missing_one_by_the_next_reconcile(ledger, path):
    copy_image(ledger, 1, T0)
    in_place = image(1, ("fast", "slow", "edge"))
    ledger.reconcile_page([(in_place, WANTED, {})], T0 + 30 * DAY)
    ledger.prune(T0 + 31 * DAY, RETENTION)
    assert rows(path)["copies"] == 0
    assert ledger.reconcile_page([(in_place, WANTED, {})], T0 + 31 * DAY).marked == 0
    # ... but a store the image has since lost is
    assert ledger.reconcile_page([(image(1, ("fast", "edge")), WANTED, {})],
                                 T0 + 32 * DAY).marked == 1


def test_pruning_goes_in_steps_that_leave_room_for_other_writes(ledger, path):
    for n in range(30):
        copy_image(ledger, n, T0)
    first = ledger.prune(T0 + 31 * DAY, RETENTION, 40)
    assert (first["copies"], first["more"]) == (40, 1)
    while ledger.prune(T0 + 31 * DAY, RETENTION, 40)["more"]:
        pass
    assert rows(path)["copies"] == 0


# -- on a schedule, in the writer ------------------------------------------------------------


def test_the_writer_prunes_soon_after_start_and_then_every_interval(path):
    # Given a ledger with an image deleted 40 days ago
    old = Ledger(path)
    copy_image(old, 1, T0 - 41 * DAY)
    delete_image(old, 1, T0 - 40 * DAY)
    old.close()
    clock = Clock(T0)
    retention = dataclasses.replace(RETENTION, interval=45 * DAY)
    ledger = Ledger(path, retention=retention, clock=clock)
    try:
        # When the daemon starts, Then it prunes at once (housekeeping runs between writes)
        ledger.next_wakeup()
        ledger.next_wakeup()
        assert rows(path)["images"] == 0
        # Given another image deleted now, a month later it is past the retention, but the
        # next prune is only due after the interval
        copy_image(ledger, 2, T0)
        delete_image(ledger, 2, T0)
        clock.now = T0 + 31 * DAY
        ledger.next_wakeup()
        ledger.next_wakeup()
        assert rows(path)["images"] == 1
        clock.now = T0 + 45 * DAY
        ledger.next_wakeup()
        ledger.next_wakeup()
        assert rows(path) == {"images": 0, "copies": 0, "requests": 0}
        assert (ledger.last_prune["images"], ledger.last_prune["copies"]) == (1, 3)
    finally:
        ledger.close()


# -- near and at the size cap ---------------------------------------------------------------


def fill(ledger, first: int, n: int, state: str, now: float) -> int:
    """Insert copies in `state` (and their images) until `n` are in, or not one more fits."""
    def insert(ops: Ops, start: int, count: int):
        for i in range(start, start + count):
            ops.x("INSERT INTO images (id, status, created_at, updated_at, seen_at) "
                  "VALUES (?, 'active', ?, ?, ?)", (image_id(i), now, now, now))
            ops.x("INSERT INTO copies (image_id, store, state, error_message, created_at, "
                  "updated_at, finished_at) VALUES (?, 'slow', ?, ?, ?, ?, ?)",
                  (image_id(i), state, "x" * 200, now, now, now))
    done, batch = 0, 50
    while done < n:
        try:
            ledger.call(insert, first + done, min(batch, n - done))
        except LedgerFull:
            if batch == 1:
                return done
            batch = 1
            continue
        done += min(batch, n - done)
    return done


def in_use(path) -> float:
    """Share of a 1 MiB cap in use, read as `imagesync status` would: another connection."""
    conn = sqlite3.connect(path)
    try:
        return usage(conn, False).in_use / (1 << 20)
    finally:
        conn.close()


def test_near_its_cap_the_ledger_prunes_settled_rows_ahead_of_the_retention(path):
    clock = Clock(T0)
    ledger = Ledger(path, max_size_mb=1, retention=RETENTION, clock=clock, size_check=0)
    try:
        with capture_logs() as logs:
            # Given settled copies, all written now, fill 92% of the cap
            n = 0
            while in_use(path) < 0.92:
                n += fill(ledger, n, 50, "done", T0)
            # When a day has passed (the rows are well within their 30-day retention)
            clock.now = T0 + DAY
            for _ in range(50):     # each write lets one prune step run
                ledger.next_wakeup()
        # Then it said once that it is near its cap, and pruned below 80% of it, ahead of
        # the retention, without ever being full
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "ledger near its cap: pruning ahead of the retention"]
        assert not [e for e in logs if e["log_level"] == "error"]
        assert in_use(path) < 0.8
    finally:
        ledger.close()


def test_at_its_cap_the_ledger_prunes_everything_settled_and_writes_go_on(path):
    # No schedule (the CLI's handle): only the cap makes it prune
    ledger = Ledger(path, max_size_mb=1, clock=Clock(T0 + 1))
    try:
        with capture_logs() as logs:
            # When twice what the cap holds is written, in settled rows a second old
            assert fill(ledger, 0, 5000, "done", T0) == 5000
        # Then every write went through: at the cap, settled rows made room, whatever their age
        conn = sqlite3.connect(path)
        assert usage(conn, False).file <= 1 << 20
        conn.close()
        assert rows(path)["copies"] < 5000
        assert not [e for e in logs if e["log_level"] == "error"]
    finally:
        ledger.close()


def test_at_its_cap_with_nothing_settled_it_says_so_once_and_serves_what_it_tracks(path):
    ledger = Ledger(path, max_size_mb=1)
    try:
        # Given the ledger is full of copies it still tracks (pending: nothing to prune)
        with capture_logs() as logs:
            fill(ledger, 0, 10**6, "pending", T0)
            # When notifications about new images keep coming, their writes fail clearly
            n = 10**7
            for n in range(10**7, 10**7 + 1000):   # the last few bytes of room go first
                try:
                    ledger.note_events([Event(EventKind.CHANGED, image_id(n), "image.update",
                                              None, None, status="active")], T0 + 1)
                except LedgerFull:
                    break
            for attempt in range(3):
                new = Event(EventKind.CHANGED, image_id(n + 1 + attempt), "image.update",
                            None, None, status="active")
                with pytest.raises(LedgerFull, match=re.escape(
                        "at its cap ([imagesync] ledger_max_size_mb = 1)")):
                    ledger.note_events([new], T0 + 1)
            # ... while a write grouped with them that changes tracked rows goes through
            gate = threading.Event()
            blocked = ledger.submit(lambda ops: gate.wait(5))
            doomed = ledger.submit(Ops.note_events, [new], T0 + 2)
            claimed = ledger.submit(Ops.claim, T0 + 2, 4, 2, 0, 0, 8)
            gate.set()
            blocked.result(5)
            with pytest.raises(LedgerFull):
                doomed.result(5)
            assert len(claimed.result(5)) == 2
        # Then one log line said so, naming the cap and the size
        full = [e for e in logs if e["log_level"] == "error"]
        assert [e["event"] for e in full] == [
            "ledger full: new notifications are held and new copies wait until it has room; "
            "copies it already tracks go on"]
        assert full[0]["cap_mb"] == 1 and "MiB in use of its 1 MiB cap" in full[0]["size"]
        assert query(path, "SELECT count(*) FROM copies WHERE state = 'in_flight'") == [(2,)]
    finally:
        ledger.close()


# -- reads never wait for the writer ---------------------------------------------------------


def test_counts_for_metrics_are_read_while_the_writer_is_busy(ledger):
    copy_image(ledger, 1, T0)
    gate = threading.Event()
    busy = ledger.submit(lambda ops: gate.wait(10))
    try:
        assert ledger.call(Ops.counts_by_store, timeout=2) == {
            ("fast", "done"): 1, ("slow", "done"): 1, ("edge", "done"): 1}
        assert ledger.counts() == {"done": 3}
        assert not busy.done()
    finally:
        gate.set()
    assert busy.result(5) is True


# -- a busy cloud's churn ---------------------------------------------------------------------


@dataclasses.dataclass
class Churn:
    """A busy cloud, per day: uploads copied to two more stores (three in all); most images
    deleted after a week to two months, the rest kept; retries; operators' requests."""

    uploads: int = 200
    kept_share: float = 0.2          # images never deleted
    life_days: tuple = (7, 60)       # how long the others live
    retry_share: float = 0.1         # copies that fail once before they succeed
    requests: int = 5
    events_per_upload: int = 6       # image.create, image.update, image.upload, ... task.*


def simulate_churn(path, days: int, retention: Retention | None, churn: Churn | None = None,
                   seed: int = 1, every: int = 0, report=None) -> dict:
    """Write `days` of churn through Ops on a ledger file, one transaction per hour, with a
    reconcile pass and a prune per day (None: never; the daemon prunes hourly, which only
    keeps it smaller). Returns the final figures: uploads, MiB in use and of the file,
    rows per table."""
    churn = churn or Churn()
    rng = random.Random(seed)
    db = connect(path)
    ops = Ops(db)
    live: dict[int, float] = {}   # image number -> when it is deleted (inf: kept)
    n = 0
    for day in range(days):
        for hour in range(24):
            now = T0 + day * DAY + hour * 3600
            with db.conn:
                for _ in range(churn.uploads // 24 + (hour < churn.uploads % 24)):
                    _upload(ops, n, now, churn, rng)
                    kept = rng.random() < churn.kept_share
                    live[n] = float("inf") if kept else now + rng.uniform(*churn.life_days) * DAY
                    n += 1
                for gone in [i for i, t in live.items() if t <= now]:
                    delete_image(ops, gone, now)
                    del live[gone]
                if hour == 12:
                    for _ in range(churn.requests):
                        ops.add_request("sync", image_id(rng.randrange(n)), now)
                    ops.process_requests(now)
                if hour == 0:
                    _reconcile(ops, sorted(live), now)
                if retention is not None and hour == 23:
                    while ops.prune(now, retention)["more"]:
                        pass
        if report and every and (day + 1) % every == 0:
            report(day + 1, _figures(db, n))
    figures = _figures(db, n)
    db.close()
    return figures


def _upload(ops: Ops, n: int, now: float, churn: Churn, rng: random.Random) -> None:
    stamp = datetime.datetime.fromtimestamp(now, UTC)
    ops.note_events([Event(EventKind.CHANGED, image_id(n), "image.update", stamp, None,
                           status="active")] * churn.events_per_upload, now)
    ops.record_visit(image_id(n), image(n), WANTED, {}, now, SETTINGS)
    ops.claim(now, 10**6, 10**6, 0, 0, 10**6, (), 1.0)
    if rng.random() < churn.retry_share:   # one store failed once; the retry succeeds
        ops.record_visit(image_id(n), image(n, ("fast", "edge")), WANTED, {}, now + 60,
                         SETTINGS)
        ops.claim(now + 200, 10**6, 10**6, 0, 0, 10**6, (), 1.0)
    ops.record_visit(image_id(n), image(n, ("fast", "slow", "edge")), WANTED, {}, now + 300,
                     SETTINGS)


def _reconcile(ops: Ops, numbers: list[int], now: float) -> None:
    for start in range(0, len(numbers), 1000):
        ops.reconcile_page([(image(i, ("fast", "slow", "edge")), WANTED, {})
                            for i in numbers[start:start + 1000]], now)
    ops.reconcile_finish(now, now, 1.0)


def _figures(db, uploads: int) -> dict:
    size = usage(db.conn, False)
    counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("images", "copies", "requests")}
    counts["deleted_images"] = db.execute("SELECT count(*) FROM images WHERE deleted = 1"
                                          ).fetchone()[0]
    return {"uploads": uploads, "in_use_mb": size.in_use / (1 << 20),
            "file_mb": size.file / (1 << 20), **counts}


def test_churn_levels_off_once_past_the_retention_and_grows_without_pruning(tmp_path):
    # 50 uploads a day for 40 days, images living 3 to 20 days, kept 10 days after
    churn = Churn(uploads=50, life_days=(3, 20))
    retention = Retention(10 * DAY, 10 * DAY, 10 * DAY)
    seen: dict[int, dict] = {}
    simulate_churn(tmp_path / "pruned.db", 40, retention, churn, every=10,
                   report=lambda day, figures: seen.__setitem__(day, figures))
    kept = simulate_churn(tmp_path / "kept.db", 40, None, churn)
    # Then the last 20 days added few copies and deleted images with pruning (the images
    # kept for good are the catalogue's growth), and twice as many without
    assert seen[40]["copies"] < 1.1 * seen[20]["copies"]
    assert seen[40]["deleted_images"] < 1.15 * seen[30]["deleted_images"]
    assert kept["copies"] > 2 * seen[40]["copies"]
    assert kept["deleted_images"] > 2 * seen[40]["deleted_images"]
