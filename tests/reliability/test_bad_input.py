"""Bad input never takes the daemon down: fuzzed notifications and broken policy files.

Fuzzed notifications go through the real RabbitMQ into a running daemon, published with
kombu the way Glance's oslo.messaging notifier does (topic exchange `glance`, durable=False,
auto_delete=False, the oslo 2.0 envelope), plus raw garbage, as Glance's own RabbitMQ user
(imagesync's may not write to Glance's exchange). They use a routing key of this
test's own (the daemon's `[notifications] topic`), so the garbage never reaches the shared
sandbox's other queues; the daemon's code path is the same as for `notifications.info`.
Broken policy files go through `imagesync policy check` and through the daemon's first start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pickle
import random
import re
import signal
import string
import subprocess
import sys
import time
import uuid
from pathlib import Path

import kombu
import pytest

from daemon import Daemon, import_requests
from helpers import stores_of, upload_image, wait_for

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "tests" / "fixtures" / "glance-notifications").glob("*.json"))
SEED = 20261125
STARTED = "imagesync started"


def imagesync_cli() -> list[str]:
    """The operator's `imagesync`, as `python -m imagesync.cli` of this interpreter."""
    return [sys.executable, "-m", "imagesync.cli"]


def amqp_url(transport_url: str) -> str:
    return re.sub(r"^rabbit://", "amqp://", transport_url)


def starts(d: Daemon) -> int:
    return sum(1 for e in d.logs() if e.get("event") == STARTED)


def delete_queue(sandbox, name: str) -> None:
    """Drop a queue this test made (it may hold megabytes of garbage); a pool queue is named
    imagesync*, which imagesync's RabbitMQ user may delete."""
    with kombu.Connection(amqp_url(sandbox.transport_url)) as conn, \
            contextlib.suppress(conn.channel_errors):  # already gone
        conn.default_channel.queue_delete(name)


@pytest.fixture
def prefix() -> str:
    return f"bi{uuid.uuid4().hex[:6]}"


@pytest.fixture
def daemons(sandbox):
    made: list[Daemon] = []
    yield made
    for d in made:
        if d.proc and d.proc.poll() is None:
            d.stop()
        delete_queue(sandbox, d.pool)


def to_slow(prefix: str) -> str:
    return f"""version: 1
rules:
  - name: bad-input-{prefix}
    match: {{name: "{prefix}-*"}}
    stores: [slow]
"""


# -- the fuzzer ------------------------------------------------------------------------------
# A seeded, hand-written generator (reproducible: SEED). Every message is one of the kinds
# below; `kind` is kept so a failure can say what was sent.

EVENT_TYPES = ("image.create", "image.update", "image.delete", "image.prepare", "image.upload",
               "image.activate", "image.send", "image.member.create", "image.member.update",
               "image.member.delete", "task.create", "task.processing", "task.success",
               "task.failure", "task.run", "task.delete")
UNKNOWN_EVENT_TYPES = ("image.foo", "compute.instance.create.end", "", "IMAGE.UPDATE",
                       "image.update ", "image", "task", ".", "image.update\x00",
                       "x" * 300, "image.uploaded", "image.member", "image.*")
ENVELOPE_FIELDS = ("message_id", "publisher_id", "event_type", "priority", "payload",
                   "timestamp", "_unique_id")
PAYLOAD_FIELDS = ("id", "image_id", "status", "properties", "name", "owner", "visibility",
                  "size", "tags", "disk_format", "created_at", "updated_at", "checksum")
WEIRD_TEXT = ("\ud800", "\udfff", "\x00", "\u202e", "\U0001f4a9", "Ａ", "١٢٣", "\n\r\t",
              "'; DROP TABLE copies; --", "%s%s%n", "{{7*7}}", "../../etc/passwd", "\\")


def _text(rng: random.Random, size: int | None = None) -> str:
    size = rng.choice((0, 1, 8, 36, 200)) if size is None else size
    out = "".join(rng.choice(string.printable) for _ in range(size))
    if rng.random() < 0.3:
        out += rng.choice(WEIRD_TEXT)
    return out


def _junk(rng: random.Random, depth: int = 0):
    choice = rng.randrange(12 if depth < 4 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice((True, False))
    if choice == 2:
        return rng.choice((0, -1, 1 << 70, -(1 << 64), rng.randint(-10**9, 10**9)))
    if choice == 3:
        return rng.choice((0.5, -1e308, 1e308, float("nan"), float("inf")))
    if choice in (4, 5, 6):
        return _text(rng)
    if choice == 7:
        return rng.choice((str(uuid.UUID(int=rng.getrandbits(128))),
                           uuid.UUID(int=rng.getrandbits(128)).hex.upper(), "{" + "0" * 32 + "}"))
    if choice in (8, 9):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_text(rng, 6): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _odd_id(rng: random.Random):
    u = uuid.UUID(int=rng.getrandbits(128))
    return rng.choice((
        str(u), str(u).upper(), u.hex, u.hex.upper(), "{" + str(u) + "}", f" {u} ", str(u)[:-1],
        str(u) + "0", str(u).replace("-", "_"), u.hex[:31] + "g", "urn:uuid:" + str(u),
        "１" * 32, str(u).replace("-", "") + "-", "", None, 0, u.int, [str(u)], {"id": str(u)},
    ))


def _sample(rng: random.Random) -> dict:
    """A real Glance notification (a recorded fixture) as oslo.messaging sends it."""
    fixture = json.loads(rng.choice(SAMPLES).read_text())
    return {"message_id": str(_uuid(rng)), "publisher_id": fixture["publisher_id"],
            "event_type": fixture["event_type"], "priority": fixture["priority"].upper(),
            "payload": fixture["payload"], "timestamp": fixture["metadata"]["timestamp"],
            "_unique_id": _uuid(rng).hex}


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _fresh_ids(message: dict, rng: random.Random) -> dict:
    """The same notification about an image (or task) nobody has: Glance answers 404."""
    payload = message["payload"]
    if isinstance(payload, dict):
        for key in ("id", "image_id"):
            if key in payload:
                payload[key] = str(_uuid(rng))
    elif isinstance(payload, str):
        message["payload"] = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", str(_uuid(rng)), payload)
    return message


def envelope(message) -> dict:
    return {"oslo.version": "2.0", "oslo.message": json.dumps(message)}


class Fuzz:
    """Builds (kind, body, content_type, routing suffix) tuples."""

    def __init__(self, seed: int, marker: Path):
        self.rng = random.Random(seed)
        self.marker = marker

    def message(self, kind: str):
        rng = self.rng
        base = _fresh_ids(_sample(rng), rng)
        if kind == "valid":
            return envelope(base), None
        if kind == "wrong_type":
            for field in rng.sample(ENVELOPE_FIELDS, rng.randint(1, 3)):
                base[field] = _junk(rng)
            if isinstance(base.get("payload"), dict):
                for field in rng.sample(PAYLOAD_FIELDS, rng.randint(0, 4)):
                    base["payload"][field] = _junk(rng)
            return envelope(base), None
        if kind == "missing":
            for field in rng.sample(ENVELOPE_FIELDS, rng.randint(1, 4)):
                base.pop(field, None)
            if isinstance(base.get("payload"), dict):
                for field in rng.sample(PAYLOAD_FIELDS, rng.randint(1, 5)):
                    base["payload"].pop(field, None)
            return envelope(base), None
        if kind == "plain_string_payload":
            base["event_type"] = rng.choice(("image.upload",) * 4 + EVENT_TYPES)
            base["priority"] = rng.choice(("ERROR", "error", "INFO"))
            u = _uuid(rng)
            base["payload"] = rng.choice((
                f"Failed to upload image data for image {u} due to internal error: boom",
                f"Failed to upload image data for image {str(u).upper()}: quota exceeded",
                f"Image storage media is full: {u}", _text(rng, 500), "",
                f"Failed to upload image {u}" + _text(rng, 3000),
                f"{u}: The size of the data 5 will exceed the limit. -3 bytes remaining.",
            ))
            return envelope(base), None
        if kind == "unknown_event":
            base["event_type"] = rng.choice(UNKNOWN_EVENT_TYPES + (_text(rng),))
            return envelope(base), None
        if kind == "odd_ids":
            base["event_type"] = rng.choice(EVENT_TYPES)
            if isinstance(base["payload"], dict):
                base["payload"]["id"] = _odd_id(rng)
                base["payload"]["image_id"] = _odd_id(rng)
                if rng.random() < 0.5:
                    base["payload"]["properties"] = {"os_glance_import_task": _odd_id(rng)}
            return envelope(base), None
        if kind == "nested":
            value = rng.choice(("x", None, 1))
            for _ in range(rng.randint(20, 400)):
                value = [value] if rng.random() < 0.5 else {"k": value}
            base[rng.choice(("payload", "event_type", "priority", "timestamp"))] = value
            return envelope(base), None
        if kind == "deep_json":
            depth = rng.choice((5_000, 100_000))
            text = "[" * depth + "]" * depth
            if rng.random() < 0.5:
                return {"oslo.version": "2.0", "oslo.message": text}, None
            return text.encode(), "application/json"
        if kind == "huge":
            if rng.random() < 0.5:
                base["payload"] = dict(base["payload"]) if isinstance(base["payload"], dict) \
                    else {}
                base["payload"]["name"] = "n" * (1 << 20)
                base["payload"]["properties"] = {f"p{i}": "v" * 20 for i in range(5000)}
            else:
                base["event_type"] = "image.upload"
                base["payload"] = f"Failed to upload image data for image {_uuid(rng)}: " + \
                    "e" * (1 << 20)
            return envelope(base), None
        if kind == "non_json_body":
            return rng.choice((
                (b"{not json", "application/json"),
                (bytes(rng.getrandbits(8) for _ in range(64)), "application/json"),
                (bytes(rng.getrandbits(8) for _ in range(64)), "application/octet-stream"),
                (b"hello, imagesync", "text/plain"),
                (b"\xff\xfe\x00", "text/plain"),
                (b"<xml/>", "application/xml"),
                (b"", "application/json"),
            ))
        if kind == "non_dict_message":
            inner = rng.choice(([1, 2], ["ab", "cd"], "a string", 42, None, True, [], [[1, 2]]))
            return {"oslo.version": "2.0", "oslo.message": json.dumps(inner)}, None
        if kind == "no_envelope":
            body = rng.choice((
                {k: v for k, v in base.items() if not k.startswith("_")},   # oslo 1.0 style
                {"oslo.version": "2.0"},
                {"oslo.message": json.dumps(base)},
                {"oslo.version": "3.0", "oslo.message": json.dumps(base)},
                {"oslo.version": _junk(rng), "oslo.message": json.dumps(base)},
                {"oslo.version": "2.0", "oslo.message": "{not json"},
                {"oslo.version": "2.0", "oslo.message": _junk(rng)},
                [envelope(base)], "just a string", 7, None,
                {"_context_user": "x", "_msg_id": "1", "_reply_q": "nowhere", **base},
            ))
            return body, None
        if kind == "code_execution":
            # Bodies that would run code if a consumer deserialized them unsafely.
            if rng.random() < 0.5:
                return pickle.dumps(_Touch(str(self.marker))), "application/x-python-serialize"
            return (f'!!python/object/apply:os.system ["touch {self.marker}"]'.encode(),
                    "application/x-yaml")
        raise ValueError(kind)

    def batch(self, n: int, huge: int) -> list[tuple[str, object, str | None, str]]:
        kinds = {"valid": 3, "wrong_type": 25, "missing": 12, "plain_string_payload": 10,
                 "unknown_event": 8, "odd_ids": 12, "nested": 6, "deep_json": 1,
                 "non_json_body": 6, "non_dict_message": 5, "no_envelope": 10,
                 "code_execution": 0.3}
        names, weights = zip(*kinds.items(), strict=True)
        huge_at = set(self.rng.sample(range(n), huge))
        out = []
        for i in range(n):
            kind = "huge" if i in huge_at else self.rng.choices(names, weights)[0]
            body, content_type = self.message(kind)
            out.append((kind, body, content_type, "error" if self.rng.random() < 0.15 else "info"))
        return out


class _Touch:
    """Unpickling this would create a file: proof that a consumer ran pickle.loads."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def publish(sandbox, topic: str, messages) -> tuple[float, int]:
    """Send every message to exchange `glance` as oslo.messaging's notifier declares it, as
    Glance's RabbitMQ user."""
    t0, size = time.monotonic(), 0
    exchange = kombu.Exchange("glance", type="topic", durable=False, auto_delete=False)
    with kombu.Connection(amqp_url(sandbox.glance_transport_url)) as conn:
        producer = conn.Producer()
        exchange(conn.default_channel).declare()
        for _kind, body, content_type, suffix in messages:
            key = f"{topic}.{suffix}"
            if content_type is None:
                data = json.dumps(body).encode()
                producer.publish(data, exchange=exchange, routing_key=key,
                                 content_type="application/json", content_encoding="utf-8")
            else:
                producer.publish(body, exchange=exchange, routing_key=key,
                                 content_type=content_type, content_encoding="binary")
                data = body
            size += len(data)
        # Publishing is asynchronous: a refused publish closes the channel, which the next
        # synchronous call on it reports (raises) instead of letting the test count nothing.
        exchange(conn.default_channel).declare(passive=True)
    return time.monotonic() - t0, size


def bind(sandbox, queue: str, routing_key: str) -> None:
    """Bind a pool queue (imagesync*) to Glance's exchange, as imagesync's RabbitMQ user."""
    with kombu.Connection(amqp_url(sandbox.transport_url)) as conn:
        conn.default_channel.queue_bind(queue, "glance", routing_key)


def publish_one(sandbox, topic: str, message: dict, suffix: str = "info") -> None:
    publish(sandbox, topic, [("one", envelope(message), None, suffix)])


def drained(sandbox, queue: str, timeout: float) -> tuple[float | None, tuple[int, int]]:
    """Seconds until the queue shows (0 ready, 0 unacked), or None; and the last figures."""
    t0 = time.monotonic()
    last = (-1, -1)
    while time.monotonic() - t0 < timeout:
        last = sandbox.queues().get(queue, (-1, -1))
        if last == (0, 0):
            return time.monotonic() - t0, last
        time.sleep(1)
    return None, last


def count(d: Daemon, event: str) -> int:
    return sum(1 for e in d.logs() if e.get("event") == event)


# -- 1. fuzzed notifications -----------------------------------------------------------------


def test_fuzzed_notifications_are_all_acked_and_the_daemon_keeps_working(
        sandbox, admin_conn, daemons, prefix, scale, figures, tmp_path):
    n = scale["fuzz"]
    huge = 5 if scale["full"] else 3
    topic = f"fuzz-{prefix}"
    marker = Path(f"/tmp/imagesync-fuzz-pwned-{prefix}")
    d = Daemon(sandbox, tmp_path / "d", to_slow(prefix),
               {"notifications": {"topic": topic},
                "copy": {"glance_requests_per_second": 100}})
    daemons.append(d)
    d.start()
    wait_for(lambda: d.pool in sandbox.queues(), timeout=30, message="the pool queue")
    pids = sorted(d.children())
    messages = Fuzz(SEED, marker).batch(n, huge)
    kinds: dict[str, int] = {}
    for kind, *_ in messages:
        kinds[kind] = kinds.get(kind, 0) + 1

    publish_seconds, size = publish(sandbox, topic, messages)
    bound = 300 if scale["full"] else 60
    drain_seconds, left = drained(sandbox, d.pool, bound)

    alive = d.proc.poll() is None
    crashes = (starts(d) - 1) + (0 if alive else 1)
    requeue_loops = count(d, "Exception during messages handling.") + \
        count(d, "Callback raised an exception.")
    parse_failures = count(d, "unparseable notification dropped")
    ignored = sum(1 for e in d.logs()
                  if str(e.get("event", "")).startswith("ignoring duplicate message"))
    cmd = "pytest tests/reliability/test_bad_input.py -k fuzzed"
    figures("fuzzed notifications", "messages sent (kinds)",
            f"{len(messages)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
            f"{size / 1e6:.1f} MB in {publish_seconds:.1f} s", cmd)
    figures("fuzzed notifications", "time to drain the pool queue",
            f"{drain_seconds:.1f} s" if drain_seconds is not None
            else f"not drained in {bound} s", cmd)
    figures("fuzzed notifications", "messages left in the queue (ready, unacked)", left, cmd)
    figures("fuzzed notifications", "crashes / child respawns", crashes, cmd)
    figures("fuzzed notifications", "batches requeued by an exception", requeue_loops, cmd)
    figures("fuzzed notifications", "messages ignored as duplicates (never acked)", ignored, cmd)

    # Garbage naming valid-looking image ids costs one Glance GET each, at the configured
    # request rate: let that backlog of visits drain (bounded), and say how long it took.
    t_visits = time.monotonic()
    due = "SELECT count(*) AS n FROM images WHERE look_at IS NOT NULL AND look_at <= ?"
    visits_drained = True
    try:
        wait_for(lambda: d.query(due, time.time())[0]["n"] == 0, timeout=600, interval=1,
                 message="the visits of the ids the garbage named")
    except AssertionError:
        visits_drained = False
    figures("fuzzed notifications", "images named by the garbage, looked up at the rate cap",
            f"{d.query('SELECT count(*) AS n FROM images')[0]['n']} in "
            f"{time.monotonic() - t_visits:.0f} s", cmd)
    assert visits_drained, "the visits the garbage caused never drained"

    # The daemon still works: a real upload (Glance's own notification) is synced.
    bind(sandbox, d.pool, "notifications.info")
    image = upload_image(admin_conn, 4096, name=f"{prefix}-after-fuzz")
    t0 = time.monotonic()
    synced = True
    try:
        wait_for(lambda: "slow" in stores_of(admin_conn, image.id),
                 timeout=90 if drain_seconds is not None else 30,
                 message="the image uploaded after the fuzz in slow")
    except AssertionError:
        synced = False
    figures("fuzzed notifications", "real upload synced afterwards",
            f"yes, in {time.monotonic() - t0:.1f} s" if synced else "no", cmd)

    assert alive and d.children() and sorted(d.children()) == pids, \
        f"the daemon died or respawned its child:\n{d.tail()}"
    assert starts(d) == 1, f"{starts(d)} 'imagesync started' lines: the child was restarted"
    assert parse_failures == 0, "events.parse raised (it must never raise)"
    assert not marker.exists(), "a notification body ran code in the daemon"
    assert requeue_loops == 0 and drain_seconds is not None, (
        f"the pool queue did not drain in {bound} s (left: {left}); batches requeued by an "
        f"exception: {requeue_loops}; messages oslo.messaging ignored as duplicates without "
        f"acking them: {ignored}; garbage must be acked, never requeued:\n"
        + "\n".join(sorted({_exception_summary(e) for e in d.logs()
                            if e.get("level") == "error" and e.get("exception")}))[:3000])
    assert synced, f"a real upload after the fuzz was not synced:\n{d.tail()}"
    assert import_requests(sandbox, image.id) == 1


def _exception_summary(entry: dict) -> str:
    lines = [line for line in entry["exception"].splitlines() if line.strip()]
    return f"{entry.get('event')}: {lines[-1] if lines else ''}"


# Focused regressions for the two poison messages the fuzzer found: each alone must be acked
# and must not hold a good notification hostage in the same batch.


def _poison_test(sandbox, admin_conn, daemons, prefix, tmp_path, poison: dict) -> None:
    topic = f"poison-{prefix}"
    d = Daemon(sandbox, tmp_path / "d", to_slow(prefix), {"notifications": {"topic": topic}})
    daemons.append(d)
    d.start()
    wait_for(lambda: d.pool in sandbox.queues(), timeout=30, message="the pool queue")
    image = upload_image(admin_conn, 4096, name=f"{prefix}-good")
    good = {"message_id": str(uuid.uuid4()), "publisher_id": "image.localhost",
            "event_type": "image.update", "priority": "INFO", "timestamp": "2026-11-25 00:00:00",
            "payload": {"id": image.id, "status": "active", "name": image.name}}
    publish(sandbox, topic, [("poison", envelope(poison), None, "info"),
                             ("good", envelope(good), None, "info")])
    seconds, left = drained(sandbox, d.pool, 20)
    loops = count(d, "Exception during messages handling.") + \
        count(d, "Callback raised an exception.")
    assert seconds is not None and loops == 0, (
        f"the queue still holds {left} (ready, unacked) after 20 s; the batch was requeued "
        f"{loops} times by an exception:\n"
        + "\n".join(sorted({_exception_summary(e) for e in d.logs() if e.get("exception")})))
    wait_for(lambda: "slow" in stores_of(admin_conn, image.id), timeout=60,
             message="the good notification's image in slow")


def test_a_notification_whose_priority_is_not_a_string_is_acked_not_requeued_forever(
        sandbox, admin_conn, daemons, prefix, tmp_path):
    poison = {"message_id": str(uuid.uuid4()), "publisher_id": "image.localhost",
              "event_type": "image.update", "priority": 5, "timestamp": "2026-11-25 00:00:00",
              "payload": {"id": str(uuid.uuid4()), "status": "active"}}
    _poison_test(sandbox, admin_conn, daemons, prefix, tmp_path, poison)


def test_a_notification_with_a_lone_surrogate_in_its_status_is_acked_not_requeued_forever(
        sandbox, admin_conn, daemons, prefix, tmp_path):
    poison = {"message_id": str(uuid.uuid4()), "publisher_id": "image.localhost",
              "event_type": "image.update", "priority": "INFO",
              "timestamp": "2026-11-25 00:00:00",
              "payload": {"id": str(uuid.uuid4()), "status": "\ud800"}}
    _poison_test(sandbox, admin_conn, daemons, prefix, tmp_path, poison)


def test_a_notification_sent_twice_with_the_same_unique_id_is_acked_both_times(
        sandbox, admin_conn, daemons, prefix, tmp_path, figures):
    """A notifier that retries a publish which had in fact arrived sends the same message
    (same `_unique_id`) twice. The copy must be acked too, or it stays unacked forever."""
    topic = f"dup-{prefix}"
    d = Daemon(sandbox, tmp_path / "d", to_slow(prefix), {"notifications": {"topic": topic}})
    daemons.append(d)
    d.start()
    wait_for(lambda: d.pool in sandbox.queues(), timeout=30, message="the pool queue")
    image = upload_image(admin_conn, 4096, name=f"{prefix}-dup")
    message = {"message_id": str(uuid.uuid4()), "publisher_id": "image.localhost",
               "event_type": "image.update", "priority": "INFO",
               "timestamp": "2026-11-25 00:00:00", "_unique_id": uuid.uuid4().hex,
               "payload": {"id": image.id, "status": "active", "name": image.name}}

    publish_one(sandbox, topic, message)
    first, _ = drained(sandbox, d.pool, 20)
    publish_one(sandbox, topic, message)
    second, left = drained(sandbox, d.pool, 20)

    figures("fuzzed notifications", "a duplicate notification left unacked (ready, unacked)",
            left, "pytest tests/reliability/test_bad_input.py -k same_unique_id")
    assert first is not None
    assert second is not None, (
        f"the second copy of the message is still in the queue {left} (ready, unacked): "
        "oslo.messaging remembers the _unique_id of acked notifications and ignores a later "
        "message with the same id without acking it: "
        + "; ".join(str(e.get("event")) for e in d.logs()
                    if str(e.get("event", "")).startswith("ignoring duplicate")))


# -- 2. broken policy files ------------------------------------------------------------------

GOOD_RULE = "  - name: r\n    match: {name: \"x-*\"}\n    stores: [slow]\n"
PWNED = Path(f"/tmp/imagesync-policy-pwned-{uuid.uuid4().hex[:8]}")

# name -> (text, line the first error must be reported on, or None when not pinned)
BROKEN: dict[str, tuple[str | bytes, int | None]] = {
    "syntax-unclosed-list": (("version: 1\nrules:\n  - name: r\n    match: {}\n"
                             "    stores: [slow\n"), None),
    "syntax-bad-indent": ("version: 1\nrules:\n  - name: r\n   match: {}\n    stores: [slow]\n",
                          None),
    "tab-indent": ("version: 1\nrules:\n\t- name: r\n", 3),
    "empty-file": ("", 1),
    "only-comments": ("# nothing here\n\n", 1),
    "list-at-top": ("- version: 1\n- rules: []\n", 1),
    "scalar-at-top": ("imagesync\n", 1),
    "missing-version": ("rules:\n" + GOOD_RULE, 1),
    "version-3": ("version: 3\nrules:\n" + GOOD_RULE, 1),
    "version-string": ("version: \"1\"\nrules:\n" + GOOD_RULE, 1),
    "version-float": ("version: 1.0\nrules:\n" + GOOD_RULE, 1),
    "missing-rules": ("version: 1\n", 1),
    "rules-null": ("version: 1\nrules:\n", 2),
    "rules-mapping": ("version: 1\nrules:\n  r: {match: {}, stores: [slow]}\n", 3),
    "rule-a-string": ("version: 1\nrules:\n  - just-a-name\n", 3),
    "rule-without-name": ("version: 1\nrules:\n  - match: {}\n    stores: [slow]\n", 3),
    "rule-without-stores": ("version: 1\nrules:\n  - name: r\n    match: {}\n", 3),
    "rule-without-match": ("version: 1\nrules:\n  - name: r\n    stores: [slow]\n", 3),
    "unknown-top-key": ("version: 1\nrulez: []\nrules:\n" + GOOD_RULE, 2),
    "unknown-rule-key": ("version: 1\nrules:\n  - name: r\n    match: {}\n    store: [slow]\n", 3),
    "unknown-matcher": (("version: 1\nrules:\n  - name: r\n    match: {owner: abc}\n"
                        "    stores: [slow]\n"), 4),
    "duplicate-rule-names": ("version: 1\nrules:\n" + GOOD_RULE + GOOD_RULE, 6),
    "duplicate-key": (("version: 1\nrules:\n  - name: r\n    name: s\n    match: {}\n"
                      "    stores: [slow]\n"), 4),
    "stores-a-string": ("version: 1\nrules:\n  - name: r\n    match: {}\n    stores: slow\n", 5),
    "stores-empty": ("version: 1\nrules:\n  - name: r\n    match: {}\n    stores: []\n", 5),
    "stores-numbers": ("version: 1\nrules:\n  - name: r\n    match: {}\n    stores: [1, 2]\n", 5),
    "exclude-a-string": (("version: 1\nrules:\n  - name: r\n    match: {}\n    stores: all\n"
                         "    exclude_stores: edge\n"), 6),
    "match-a-list": ("version: 1\nrules:\n  - name: r\n    match: [name]\n    stores: [slow]\n",
                     4),
    "name-an-int": (("version: 1\nrules:\n  - name: r\n    match: {name: 5}\n"
                    "    stores: [slow]\n"), 4),
    "rule-name-empty": (("version: 1\nrules:\n  - name: \"\"\n    match: {}\n"
                        "    stores: [slow]\n"), 3),
    "unknown-visibility": (("version: 1\nrules:\n  - name: r\n    match: {visibility: [secret]}\n"
                           "    stores: [slow]\n"), 4),
    "tags-a-mapping": (("version: 1\nrules:\n  - name: r\n    match: {tags: {a: b}}\n"
                       "    stores: [slow]\n"), 4),
    "property-a-float": (("version: 1\nrules:\n  - name: r\n    match:\n      properties:\n"
                         "        os_version: 20.04\n    stores: [slow]\n"), 6),
    "property-a-bool": (("version: 1\nrules:\n  - name: r\n    match:\n      properties:\n"
                        "        hw_qemu_guest_agent: yes\n    stores: [slow]\n"), 6),
    "property-a-list-of-maps": (("version: 1\nrules:\n  - name: r\n    match:\n      properties:\n"
                                "        os_distro: [{a: b}]\n    stores: [slow]\n"), 6),
    "reserved-os-glance": (("version: 1\nrules:\n  - name: r\n    match:\n      properties:\n"
                           "        os_glance_import_task: abc\n    stores: [slow]\n"), 6),
    "reserved-stores-property": (("version: 1\nrules:\n  - name: r\n    match:\n"
                                 "      properties: {stores: fast}\n    stores: [slow]\n"), 5),
    "properties-a-list": (("version: 1\nrules:\n  - name: r\n    match: {properties: [a, b]}\n"
                          "    stores: [slow]\n"), 4),
    "python-object": ((f"version: 1\nrules:\n  - name: !!python/object/apply:os.system "
                      f"[\"touch {PWNED}\"]\n    match: {{}}\n    stores: [slow]\n"), 3),
    "python-object-top": (f"!!python/object/apply:os.system [\"touch {PWNED}\"]\n", 1),
    "two-documents": ("version: 1\nrules: []\n---\nversion: 1\nrules: []\n", None),
    "non-utf8": (b"version: 1\nrules: []\n# caf\xe9\n", 1),
    "nul-byte": ("version: 1\nrules:\n  - name: r\x00\n", 3),
    "complex-key": ("version: 1\n? [a, b]\n: c\nrules:\n" + GOOD_RULE, 2),
    "merge-key": (("version: 1\nbase: &b {match: {}, stores: [slow]}\nrules:\n"
                  "  - <<: *b\n    name: r\n"), 2),
    "nested-too-deep": ("version: 1\nrules: " + "[" * 2000 + "]" * 2000 + "\n", None),
    # Only Glance can tell: the daemon asks it, and so does `policy check --glance`.
    "unknown-store": (("version: 1\nrules:\n  - name: r\n    match: {}\n"
                      "    stores: [slow, nowhere]\n"), 5),
}
# What the error must say (a word or two of it), for the files where that matters most.
SAYS = {"tab-indent": "tab", "empty-file": "empty", "list-at-top": "got a list",
        "version-3": "unsupported version", "unknown-top-key": "unknown key 'rulez'",
        "unknown-rule-key": "unknown key 'store'", "unknown-matcher": "unknown matcher 'owner'",
        "duplicate-rule-names": "duplicate rule name", "duplicate-key": "duplicate key",
        "property-a-float": "quote it", "property-a-bool": "quote it",
        "reserved-os-glance": "reserved property", "reserved-stores-property": "reserved",
        "python-object": "not allowed", "python-object-top": "not allowed",
        "two-documents": "single document", "non-utf8": "UTF-8",
        "unknown-store": "unknown store 'nowhere'", "nested-too-deep": "deep"}
NEEDS_GLANCE = {"unknown-store"}
THROUGH_THE_DAEMON = ("syntax-unclosed-list", "unknown-store", "python-object",
                      "duplicate-rule-names", "reserved-os-glance", "nested-too-deep")


def write_policy(directory: Path, name: str) -> Path:
    text, _line = BROKEN[name]
    path = directory / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


def located(output: str, path: Path) -> list[tuple[int, int]]:
    """(line, column) of every `FILE:LINE:COL: message` line that names this file."""
    found = re.findall(rf"^{re.escape(str(path))}:(\d+):(\d+): \S", output, re.MULTILINE)
    return [(int(line), int(col)) for line, col in found]


def check_error(name: str, path: Path, result: subprocess.CompletedProcess) -> str | None:
    """None when the command failed with a located error; else what was wrong."""
    out = result.stdout + result.stderr
    where = located(out, path)
    expected_line = BROKEN[name][1]
    if result.returncode != 1:
        return f"{name}: exit {result.returncode} (expected 1): {out.strip()[-300:]}"
    if "Traceback" in out:
        return f"{name}: a traceback instead of an error: {out.strip().splitlines()[-1][:200]}"
    if not where:
        return f"{name}: no {path}:LINE:COL in: {out.strip()[-300:]}"
    if name in SAYS and SAYS[name].lower() not in out.lower():
        return f"{name}: the error does not say {SAYS[name]!r}: {out.strip()[-300:]}"
    if expected_line is not None and where[0][0] != expected_line:
        return f"{name}: first error at line {where[0][0]}, expected {expected_line}: " \
               f"{out.strip()[:300]}"
    return None


def test_policy_check_rejects_every_broken_file_naming_file_line_and_column(
        sandbox, tmp_path, figures):
    conf = Daemon(sandbox, tmp_path / "conf", "").conf_file   # for --glance: the live stores
    names = list(BROKEN)
    paths = {name: write_policy(tmp_path, name) for name in names}

    def check(name):
        args = ["--config-file", str(conf), "policy", "check", "--glance"] \
            if name in NEEDS_GLANCE else ["policy", "check"]
        return name, subprocess.run([*imagesync_cli(), *args, str(paths[name])],
                                    capture_output=True, text=True, timeout=60,
                                    errors="replace", check=False)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(check, names))
    problems = [p for p in (check_error(n, paths[n], results[n]) for n in names) if p]

    cmd = "pytest tests/reliability/test_bad_input.py -k policy_check"
    figures("broken policy files", "files tried with `imagesync policy check`", len(names), cmd)
    figures("broken policy files", "clear FILE:LINE:COL errors", len(names) - len(problems), cmd)
    assert not PWNED.exists(), "a policy file ran code"
    assert len(names) >= 30
    assert not problems, "\n".join(problems)


def test_policy_check_rejects_every_broken_version_2_file_at_its_line_and_column(
        sandbox, tmp_path, figures):
    """The unit tests' broken version 2 files, through the operator's real command (with
    --glance, the sandbox's stores, for those about a store name)."""
    from unit.test_policy_v2 import BROKEN_V2

    conf = Daemon(sandbox, tmp_path / "conf", "").conf_file

    def check(case):
        name, text, line, column, words = case
        # (the unit tests' Glance has the file stores; the sandbox may run `ceph` too)
        words = words.replace("(Glance has: edge, fast, slow)",
                              f"(Glance has: {', '.join(sorted(sandbox.stores))})")
        path = tmp_path / f"{re.sub(r'[^a-z0-9]+', '-', name)}.yaml"
        path.write_text(text)
        args = ["--config-file", str(conf), "policy", "check", "--glance"] \
            if "unknown store" in words else ["policy", "check"]
        result = subprocess.run([*imagesync_cli(), *args, str(path)],
                                capture_output=True, text=True, timeout=60, check=False)
        out = result.stdout + result.stderr
        if result.returncode != 1 or "Traceback" in out:
            return f"{name}: exit {result.returncode}: {out.strip()[-300:]}"
        if (line, column) not in located(out, path) or words not in out:
            return f"{name}: no {path}:{line}:{column} saying {words!r} in: {out.strip()[:300]}"
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(check, BROKEN_V2) if p]
    cmd = "pytest tests/reliability/test_bad_input.py -k broken_version_2"
    figures("broken policy files", "version 2 files tried / clear FILE:LINE:COL errors",
            f"{len(BROKEN_V2)} / {len(BROKEN_V2) - len(problems)}", cmd)
    assert len(BROKEN_V2) >= 30
    assert not problems, "\n".join(problems)


def test_python_dash_m_imagesync_cli_runs_the_cli():
    """The documented `python -m imagesync.cli ...` form must run the CLI, not exit 0 silently."""
    result = subprocess.run([sys.executable, "-m", "imagesync.cli", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "policy" in result.stdout, (
        f"`python -m imagesync.cli --help` exited {result.returncode} and printed "
        f"{result.stdout!r}: imagesync/cli.py lacks `if __name__ == '__main__': main()`")


def test_the_daemon_refuses_to_start_on_a_broken_policy_and_records_none(
        sandbox, tmp_path, figures):
    def first_start(name):
        d = Daemon(sandbox, tmp_path / name, BROKEN[name][0])
        result = subprocess.run([sys.executable, "-m", "imagesync.cmd", "--config-file",
                                 str(d.conf_file)], capture_output=True, text=True, timeout=120,
                                start_new_session=True, errors="replace", check=False)
        partial = bool(d.ledger_path.exists() and d.query("SELECT * FROM policy"))
        return name, (d.policy_file, result, partial)

    with concurrent.futures.ThreadPoolExecutor(len(THROUGH_THE_DAEMON)) as pool:
        results = dict(pool.map(first_start, THROUGH_THE_DAEMON))
    problems = [p for p in (check_error(n, path, r) for n, (path, r, _) in results.items()) if p]
    partial = [n for n, (_, _, p) in results.items() if p]

    cmd = "pytest tests/reliability/test_bad_input.py -k refuses_to_start"
    figures("broken policy files", "first starts of the daemon on a broken policy",
            len(results), cmd)
    figures("broken policy files", "daemon exits 1 with FILE:LINE:COL",
            len(results) - len(problems), cmd)
    figures("broken policy files", "partial policies run (policy rows written)", len(partial), cmd)
    assert not PWNED.exists(), "a policy file ran code in the daemon"
    assert not partial, f"a policy was recorded from a broken file: {partial}"
    assert not problems, "\n".join(problems)


def test_a_policy_nested_too_deeply_on_sighup_keeps_the_last_good_one_without_respawning(
        sandbox, admin_conn, daemons, prefix, tmp_path, figures):
    d = Daemon(sandbox, tmp_path / "d", to_slow(prefix))
    daemons.append(d)
    d.start()
    good = d.query("SELECT text FROM policy")[0]["text"]
    d.policy_file.write_text(BROKEN["nested-too-deep"][0])
    offset = d.log_path.stat().st_size

    d.signal(signal.SIGHUP)
    t0 = time.monotonic()
    kept = True
    try:
        wait_for(lambda: count(d, "keeping the last good policy") >= 1, timeout=20,
                 message="the restarted child to keep the last good policy")
    except AssertionError:
        kept = False
    time.sleep(3)
    since = d.log_path.read_bytes()[offset:].decode(errors="replace")
    crashes = since.count("Traceback (most recent call last)")
    figures("broken policy files", "child crashes after SIGHUP with a too-deep policy", crashes,
            "pytest tests/reliability/test_bad_input.py -k nested_too_deeply")
    assert d.proc.poll() is None
    assert kept and crashes == 0, (
        f"the restarted child did not fall back to the last good policy; it crashed {crashes} "
        f"times in {time.monotonic() - t0:.0f} s (oslo.service respawns it), last:\n"
        + since[since.rfind("Traceback"):][-1500:])
    assert d.query("SELECT text FROM policy")[0]["text"] == good
    image = upload_image(admin_conn, 4096, name=f"{prefix}-after-hup")
    wait_for(lambda: "slow" in stores_of(admin_conn, image.id), timeout=60,
             message="a copy made by the last good policy")
