"""Stories about the executor facing a Glance that misbehaves: request discipline per image,
transient failures that use no attempt, a lost answer to an import, a node lacking a store.

The executor runs on a real ledger (a file under tmp_path) against a scripted Glance, with an
injected clock and its operations run inline: a simulated hour takes well under a second, and
every request the executor makes is counted at the fake Glance, as a proxy would count it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sqlite3

import pytest
from structlog.testing import capture_logs

from imagesync.discipline import Discipline
from imagesync.executor import PAUSE_BASE, Caps, Executor, PolicyHolder
from imagesync.glance import STORE_READS, CredentialsRejected, GlanceUnavailable, RateLimited
from imagesync.ledger import Ledger
from imagesync.model import IMPORT_TASK, Image
from imagesync.planner import Settings, StoreInfo
from imagesync.policy import parse_policy

T0 = 1_800_000_000.0
HOT = "11111111-0000-4000-8000-000000000000"
CALM = "22222222-0000-4000-8000-000000000000"
POLICY = parse_policy("version: 1\nrules:\n  - name: copy-to-slow\n    match: {}\n"
                      "    stores: [slow]\n")
SETTINGS = Settings(max_attempts=2, backoff=lambda attempt: 10.0 * attempt, poll_interval=1.0,
                    settle_grace=5.0, lock_poll=30.0, store_list_ttl=300.0,
                    unknown_store_tries=2, image_backoff_base=2.0, image_backoff_cap=300.0)
STORES = {s: StoreInfo(s, "file") for s in ("fast", "slow")}


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Inline:
    """Runs each operation at once in the caller's thread: one tick, all its work done."""

    def submit(self, fn, *args):
        future: concurrent.futures.Future = concurrent.futures.Future()
        fn(*args)
        future.set_result(None)
        return future

    def shutdown(self, **_kw) -> None:
        pass


class FakeGlance:
    """Glance as a proxy in front of it would show it: every request counted, faults scripted.

    `faults[(method, image_id)]` is a list of exceptions (or callables that act, then raise)
    consumed one per request; when empty the request works. A 202 copies at once."""

    def __init__(self, clock: Clock, images: list[str]):
        self.clock = clock
        self.images = {i: Image(i, name=i[:4], status="active", stores=frozenset({"fast"}),
                                disk_format="raw", size=1024) for i in images}
        self.faults: dict[tuple[str, str | None], list] = {}
        self.always: dict[tuple[str, str | None], Exception] = {}
        self.calls: list[tuple[float, str, str | None]] = []
        self.limiter = type("Limiter", (), {"rate": 20.0})()
        self.copy_answer: tuple[int, str] = (202, "")

    def requests_here(self) -> int:
        return len(self.calls)

    def _ask(self, method: str, image_id: str | None) -> None:
        self.calls.append((self.clock(), method, image_id))
        fault = self.always.get((method, image_id))
        script = self.faults.get((method, image_id))
        if fault is None and script:
            fault = script.pop(0)
        if callable(fault) and not isinstance(fault, Exception):
            fault = fault()
        if fault is not None:
            raise fault

    def asked(self, method: str, image_id: str | None, since: float = 0.0) -> list[float]:
        return [t for t, m, i in self.calls if m == method and i == image_id and t >= since]

    def get_image(self, image_id: str) -> Image | None:
        self._ask("GET", image_id)
        return self.images.get(image_id)

    def stores(self, refresh: bool = False) -> dict[str, StoreInfo]:
        if refresh:
            self._ask("STORES", None)
        return STORES

    def image_tasks(self, image_id: str) -> list[dict]:
        self._ask("TASKS", image_id)
        return []

    def copy_image(self, image_id: str, stores: list[str]) -> tuple[int, str]:
        self._ask("POST", image_id)
        if self.copy_answer[0] == 202:
            self.copy_now(image_id, stores)
        return self.copy_answer

    def copy_now(self, image_id: str, stores) -> None:
        image = self.images[image_id]
        self.images[image_id] = dataclasses.replace(image, stores=image.stores | set(stores))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


@pytest.fixture
def glance(clock) -> FakeGlance:
    return FakeGlance(clock, [HOT, CALM])


def inline_executor(ledger, glance, clock, settings: Settings = SETTINGS, **kw) -> Executor:
    """An Executor whose operations run inline, at once, in the test's thread."""
    ex = Executor(ledger, glance, PolicyHolder(POLICY), settings, Caps(), clock=clock,
                  discipline=Discipline(20.0, 0.1, 2.0, 300.0, jitter=0.0), **kw)
    ex.pool.shutdown()
    ex.pool = Inline()
    return ex


@pytest.fixture
def executor(ledger, glance, clock):
    return inline_executor(ledger, glance, clock)


def notify(ledger, clock, *image_ids) -> None:
    """What a notification does: the image is to be looked at now."""
    for image_id in image_ids:
        ledger.add_request("sync", image_id, clock())


def run(ex, clock, seconds: float, step: float = 0.1, every=None) -> None:
    """Tick the executor for `seconds` of simulated time; `every(t)` runs before each tick."""
    end = clock.now + seconds
    while clock.now < end:
        if every:
            every(clock.now)
        ex._tick()
        clock.now += step


def copies(tmp_path) -> dict[tuple[str, str], sqlite3.Row]:
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return {(r["image_id"], r["store"]): r for r in conn.execute("SELECT * FROM copies")}
    finally:
        conn.close()


def events(logs, name: str, **fields) -> list[dict]:
    return [e for e in logs if e["event"] == name and
            all(e.get(k) == v for k, v in fields.items())]


# -- one image answered 429, 401 or 403 over and over ------------------------------------------


@pytest.mark.parametrize("fault", [RateLimited(429, "Too Many Requests"),
                                   CredentialsRejected(401, "token expired"),
                                   GlanceUnavailable(None, "Connection reset", maybe_sent=True)])
def test_an_image_that_gets_no_real_answer_is_asked_about_on_a_growing_backoff(
        executor, ledger, glance, clock, tmp_path, fault):
    # Given one image whose every GET fails, and one that is fine
    glance.always[("GET", HOT)] = fault
    notify(ledger, clock, HOT, CALM)
    # When the executor runs for five simulated minutes while notifications keep coming for it
    with capture_logs() as logs:
        run(executor, clock, 300, step=0.25, every=lambda t: notify(ledger, clock, HOT)
            if int(t * 4) % 4 == 0 else None)
    # Then the troubled image was asked about on a growing backoff (2, 4, 8, ... s; capped at
    # 60 s, with pauses of all work, for a credential or connection problem), never at once
    asked = glance.asked("GET", HOT)
    gaps = [b - a for a, b in zip(asked, asked[1:], strict=False)]
    assert len(asked) <= 12, f"{len(asked)} GETs of one image in 300 s"
    assert all(g >= 1.9 for g in gaps), gaps
    assert gaps == sorted(gaps) or min(gaps[-2:]) >= 59
    # and with one log line when it entered trouble, no traceback per request
    entered = events(logs, "image in trouble: not asked about again for a while", image_id=HOT)
    assert len(entered) == 1 and "exc_info" not in entered[0]
    # while the other image was copied
    assert copies(tmp_path)[(CALM, "slow")]["state"] == "done"


def test_a_retry_after_is_honoured(executor, ledger, glance, clock):
    glance.faults[("GET", HOT)] = [RateLimited(429, "slow down", retry_after=45.0)]
    notify(ledger, clock, HOT)
    run(executor, clock, 60, step=0.5, every=lambda t: notify(ledger, clock, HOT))
    first, second = glance.asked("GET", HOT)[:2]
    assert second - first >= 45.0


def test_an_image_leaves_trouble_with_one_log_line_and_its_copy_is_made(
        executor, ledger, glance, clock, tmp_path):
    glance.faults[("GET", HOT)] = [RateLimited(429, "slow down")] * 4
    notify(ledger, clock, HOT)
    with capture_logs() as logs:
        run(executor, clock, 120)
    left = events(logs, "image out of trouble", image_id=HOT)
    assert len(left) == 1 and left[0]["failures"] == 4
    assert copies(tmp_path)[(HOT, "slow")]["state"] == "done"
    assert len(glance.asked("POST", HOT)) == 1


def test_credentials_rejected_pause_all_work_and_say_so_apart_from_an_unreachable_glance(
        executor, ledger, glance, clock):
    for image_id in (HOT, CALM):
        glance.faults[("GET", image_id)] = [CredentialsRejected(401, "Glance refused the token")]
    notify(ledger, clock, HOT, CALM)
    with capture_logs() as logs:
        executor._tick()
    assert events(logs, "credentials rejected; pausing")
    assert not events(logs, "Glance unavailable; pausing")
    assert executor.paused_until > clock()


def test_keystone_refusing_the_credentials_pauses_all_work_at_once(
        executor, ledger, glance, clock):
    glance.faults[("GET", HOT)] = [CredentialsRejected(None, "Keystone refused imagesync's "
                                                             "credentials: Unauthorized")]
    notify(ledger, clock, HOT)
    with capture_logs() as logs:
        executor._tick()
    assert events(logs, "credentials rejected; pausing")
    assert executor.paused_until > clock()


def test_answers_to_requests_out_when_the_work_paused_do_not_lengthen_the_pause(
        executor, clock):
    # Given five requests out at once, as when a pause ends, all answered 503 by a Glance
    # still starting (HAProxy: "No server is available")
    down = GlanceUnavailable(503, "No server is available to handle this request.")
    with capture_logs() as logs:
        for n in range(5):
            executor._note_trouble(f"image-{n}", down, "look")
    # Then the work pauses once, on the ladder's rung for two failures (the first two
    # images), not on the fifth rung: the rest were sent before that pause
    pauses = events(logs, "Glance unavailable; pausing")
    assert len(pauses) == 1, pauses
    assert executor.glance_failures == 2
    assert executor.paused_until - clock() <= 2 * PAUSE_BASE * 1.25
    # And once the pause is over, the next failure climbs one rung
    clock.now = executor.paused_until
    with capture_logs() as logs:
        executor._note_trouble("image-0", down, "look")
    assert len(events(logs, "Glance unavailable; pausing")) == 1
    assert executor.glance_failures == 3


def test_one_image_whose_url_alone_answers_503_does_not_stop_the_work_on_the_others(
        executor, ledger, glance, clock, tmp_path):
    # Given one image whose every request answers 503 (a load balancer rule for its URL)
    glance.always[("GET", HOT)] = GlanceUnavailable(503, "No server is available")
    notify(ledger, clock, HOT)
    run(executor, clock, 120, step=0.5)
    # When another image is uploaded
    uploaded = clock()
    notify(ledger, clock, CALM)
    run(executor, clock, 3, step=0.1)
    # Then it is copied at once: no pause of all work was taken for one image's answers
    assert copies(tmp_path)[(CALM, "slow")]["state"] == "done"
    assert glance.asked("POST", CALM)[0] - uploaded < 1.0


def test_one_image_asked_about_constantly_gets_no_more_than_its_share(
        executor, ledger, glance, clock):
    # Given notifications for one image every 100 ms (a client updating it in a loop)
    notify(ledger, clock, HOT)
    run(executor, clock, 90, step=0.1, every=lambda t: notify(ledger, clock, HOT))
    # Then it is looked at no more than its share of the budget: 10 % of 20/s, + one burst
    gets = glance.asked("GET", HOT, since=T0 + 30)
    assert len(gets) <= 2 * 60 + 1, f"{len(gets)} GETs in a minute"
    assert len(gets) >= 60   # and it is still looked at, about twice a second


# -- transient is not an attempt ---------------------------------------------------------------


def test_an_outage_longer_than_every_backoff_fails_no_copy(
        executor, ledger, glance, clock, tmp_path):
    # Given two images planned for copying (max_attempts 2), when Glance stops answering
    # just as their imports go out, for an hour
    notify(ledger, clock, HOT, CALM)
    run(executor, clock, 0.1)
    assert {r["state"] for r in copies(tmp_path).values()} == {"pending"}
    down = GlanceUnavailable(None, "Glance unreachable: ConnectFailure", maybe_sent=False)
    for key in [("GET", HOT), ("GET", CALM), ("POST", HOT), ("POST", CALM)]:
        glance.always[key] = down
    run(executor, clock, 3600, step=0.5)
    during = len(glance.calls)
    # (each import that got no answer is followed by looks, which fail: no import is sent
    # again before a look works)
    assert glance.asked("POST", HOT) and glance.asked("POST", CALM)
    assert {(r["state"], r["attempts"]) for r in copies(tmp_path).values()} == {("retrying", 0)}
    # When it comes back
    glance.always.clear()
    back = clock()
    run(executor, clock, 300, step=0.5)
    # Then no copy failed: both are done, with no attempt used by the outage
    rows = copies(tmp_path)
    assert {k: r["state"] for k, r in rows.items()} == \
        {(HOT, "slow"): "done", (CALM, "slow"): "done"}
    assert all(r["attempts"] == 1 for r in rows.values())
    # and the dead Glance was asked rarely (a pause of at most 60 s, per-image backoff)
    assert during <= 2 * 3600 / 30, f"{during} requests to a dead Glance in an hour"
    # and once it answers, the copies are made within the pause cap (60 s), not after the
    # images' own backoff cap (image_backoff_cap: 300 s by default)
    last_post = max(glance.asked("POST", HOT) + glance.asked("POST", CALM))
    assert last_post - back < 60 * 1.25 * 2, last_post - back


def test_a_5xx_to_an_import_backs_off_without_using_an_attempt(
        executor, ledger, glance, clock, tmp_path):
    glance.faults[("POST", HOT)] = [GlanceUnavailable(503, "No server is available")] * 3
    notify(ledger, clock, HOT)
    run(executor, clock, 3, step=0.1)
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["attempts"], row["error_kind"]) == ("retrying", 0, "transient")
    run(executor, clock, 200, step=0.5)
    posts = glance.asked("POST", HOT)
    assert len(posts) == 4
    gaps = [b - a for a, b in zip(posts, posts[1:], strict=False)]
    assert all(gap >= first_wait for gap, first_wait in zip(gaps, (2, 4, 8), strict=True))
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["attempts"]) == ("done", 1)


# -- a dropped answer to an import -------------------------------------------------------------


def test_an_import_whose_answer_was_lost_after_glance_took_it_is_tracked_not_sent_again(
        executor, ledger, glance, clock, tmp_path):
    # Given Glance takes the import (its lock shows) and the connection drops before the 202
    def took_then_dropped():
        image = glance.images[HOT]
        glance.images[HOT] = dataclasses.replace(
            image, properties={IMPORT_TASK: "task-1"})
        return GlanceUnavailable(None, "Connection aborted: RemoteDisconnected",
                                 maybe_sent=True)

    glance.faults[("POST", HOT)] = [took_then_dropped]
    notify(ledger, clock, HOT)
    with capture_logs() as logs:
        run(executor, clock, 2, step=0.1)
        # Then it was looked at at once, and treated as our import in flight
        assert events(logs, "copy-image answer lost", glance_took_it=True)
        assert copies(tmp_path)[(HOT, "slow")]["state"] == "in_flight"
        # When Glance finishes it
        glance.copy_now(HOT, ["slow"])
        glance.images[HOT] = dataclasses.replace(glance.images[HOT], properties={})
        run(executor, clock, 5, step=0.1)
    # Then the copy is done after one import, one attempt
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["attempts"]) == ("done", 1)
    assert len(glance.asked("POST", HOT)) == 1


def test_an_import_dropped_before_glance_saw_it_is_sent_again_only_after_a_look_and_a_backoff(
        executor, ledger, glance, clock, tmp_path):
    glance.faults[("POST", HOT)] = [GlanceUnavailable(None, "Connection reset",
                                                      maybe_sent=True)]
    notify(ledger, clock, HOT)
    run(executor, clock, 60, step=0.1)
    first, second = glance.asked("POST", HOT)
    looks_between = [t for t in glance.asked("GET", HOT) if first <= t <= second]
    assert looks_between and looks_between[0] - first < 0.2   # looked at once
    assert second - first >= SETTINGS.image_backoff_base
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["attempts"]) == ("done", 1)


# -- a Glance API node lacking a store ---------------------------------------------------------


def test_a_store_one_node_lacks_is_tried_a_few_times_then_blocked_until_the_store_list_refresh(
        executor, ledger, glance, clock, tmp_path):
    # Given every import answers 409 although the store list names slow
    glance.copy_answer = (409, "Store for identifier slow not found")
    notify(ledger, clock, HOT)
    run(executor, clock, 200, step=0.5)
    # Then after unknown_store_tries imports it is blocked, failed with the reason
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["error_kind"]) == ("failed", "unknown_store")
    assert "blocked" in row["error_message"] and "enabled_backends" in row["error_message"]
    # (each try: the POST and, back to back, STORE_READS more, for the other API nodes)
    per_try = 1 + STORE_READS
    assert len(glance.asked("POST", HOT)) == SETTINGS.unknown_store_tries * per_try
    # and is tried once more after the store list is refreshed (every store_list_ttl)
    glance.copy_answer = (202, "")
    run(executor, clock, SETTINGS.store_list_ttl, step=1.0)
    assert copies(tmp_path)[(HOT, "slow")]["state"] == "done"
    assert len(glance.asked("POST", HOT)) == SETTINGS.unknown_store_tries * per_try + 1


class RoundRobin(FakeGlance):
    """Two API nodes behind a strict round robin, every request counted at the balancer;
    glance2 lacks `slow` (Glance answers 409 there and does nothing)."""

    def __init__(self, clock, images):
        super().__init__(clock, images)
        self.node_of: list[str] = []

    def _ask(self, method, image_id):
        self.node_of.append(f"glance{len(self.calls) % 2 + 1}")
        super()._ask(method, image_id)

    def copy_image(self, image_id, stores):
        self._ask("POST", image_id)
        if self.node_of[-1] == "glance2":
            return 409, "Store for identifier slow not found"
        self.copy_now(image_id, stores)
        return 202, ""


def test_a_copy_refused_by_the_node_lacking_the_store_is_sent_again_at_once_to_the_other(
        ledger, clock, tmp_path):
    # Given two nodes in strict round robin, glance2 lacking slow, no other traffic, and
    # every visit's requests lined up so that the POST lands on glance2
    glance = RoundRobin(clock, [HOT])
    executor = inline_executor(ledger, glance, clock)
    notify(ledger, clock, HOT)
    run(executor, clock, 30, step=0.5)
    # Then the POST refused by glance2 was sent again at once, to glance1, which took it
    posts = [node for node, (_t, m, _i) in zip(glance.node_of, glance.calls, strict=True)
             if m == "POST"]
    assert posts == ["glance2", "glance1"]
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["attempts"]) == ("done", 1)
    assert executor.resent == 1


# -- the image owner's quota --------------------------------------------------------------------


class Quota:
    """The owner-quota check as the executor sees it: room for `room` more copies; each
    decision counted; `fail` makes the limits unreadable."""

    def __init__(self, room: int):
        self.room, self.asked, self.fail = room, [], None

    def decide(self, owner, stores, size, in_flight):
        from imagesync.quota import Decision
        self.asked.append((owner, tuple(stores), size, in_flight))
        if self.fail:
            raise self.fail
        go, held = tuple(stores[:self.room]), tuple(stores[self.room:])
        return Decision(go, held, "owner quota: no room" if held else None)


def test_a_copy_that_does_not_fit_its_owner_s_quota_is_held_unsent_until_it_fits(
        ledger, glance, clock, tmp_path):
    quota = Quota(room=0)
    ex = inline_executor(ledger, glance, clock,
                         dataclasses.replace(SETTINGS, quota_recheck=60.0), owner_quota=quota)
    notify(ledger, clock, HOT)
    # Given no room in the owner's quota, When the executor runs for two minutes
    run(ex, clock, 130, step=0.5)
    # Then nothing was sent, the copy is held with the reason, no attempt used, and it was
    # checked again every recheck interval (not more often)
    assert glance.asked("POST", HOT) == []
    row = copies(tmp_path)[(HOT, "slow")]
    assert (row["state"], row["error_kind"], row["attempts"]) == ("retrying", "owner_quota", 0)
    assert 2 <= len(quota.asked) <= 3
    # When room appears, Then it goes at the next check, once
    quota.room = 1
    run(ex, clock, 61, step=0.5)
    assert len(glance.asked("POST", HOT)) == 1
    assert copies(tmp_path)[(HOT, "slow")]["state"] == "done"


def test_a_copy_whose_owner_s_limit_cannot_be_read_is_not_sent(ledger, glance, clock, tmp_path):
    quota = Quota(room=5)
    quota.fail = GlanceUnavailable(None, "Keystone unreachable")
    ex = inline_executor(ledger, glance, clock, owner_quota=quota)
    notify(ledger, clock, HOT)
    run(ex, clock, 30, step=0.5)
    assert glance.asked("POST", HOT) == []
    row = copies(tmp_path)[(HOT, "slow")]
    assert row["attempts"] == 0 and "owner quota unknown" in row["error_message"]
