"""Ingest: 50,000 Glance-shaped image.update notifications over 5,000 images, preloaded on
the daemon's queue; imagesync's drain time (ledger writes included) versus a raw kombu
consumer acking each message of the same messages on a queue of its own.

The messages are published as Glance publishes them (RabbitMQ user `glance`); both consumers
read as imagesync's own RabbitMQ user, whose queues must be named imagesync*."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import kombu

from bench.common import LISTENER, RUNS, Section, get_sandbox, scale, spread

from daemon import Daemon
from helpers import wait_for

MESSAGES, IMAGES = scale(50_000, 2_000), scale(5_000, 200)


def envelope(image_id: str, n: int) -> str:
    payload = {"id": image_id, "name": f"ingest-{image_id[:8]}", "status": "active",
               "visibility": "shared", "owner": None, "disk_format": "raw",
               "container_format": "bare", "size": 1024, "checksum": "x" * 32,
               "properties": {}, "tags": [], "deleted": False, "protected": False,
               "min_disk": 0, "min_ram": 0, "created_at": "2026-11-25T00:53:50Z",
               "updated_at": "2026-11-25T00:53:52Z", "virtual_size": 1024, "is_public": False}
    msg = {"message_id": str(uuid.uuid4()), "publisher_id": "image.localhost",
           "event_type": "image.update", "priority": "INFO", "payload": payload,
           "timestamp": f"2026-11-25 01:{(n // 1000) % 60:02d}:{n % 60:02d}.{n % 999999:06d}"}
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(msg)})


def amqp(url: str) -> str:
    return url.replace("rabbit://", "amqp://", 1)


def publish(url: str, queues: list[str]) -> None:
    """Publish MESSAGES once to Glance's exchange; every bound queue gets a copy.
    `url`: Glance's RabbitMQ user (box.glance_transport_url), who may write to the exchange."""
    ids = [str(uuid.uuid4()) for _ in range(IMAGES)]
    exchange = kombu.Exchange("glance", type="topic", durable=False, auto_delete=False)
    # A busy broker applies flow control to a fast publisher: wait rather than time out.
    with kombu.Connection(amqp(url), transport_options={"write_timeout": 300}) as conn:
        channel = conn.channel()
        for name in queues:
            kombu.Queue(name, exchange, routing_key="notifications.info", durable=False,
                        auto_delete=False)(channel).declare()
        producer = kombu.Producer(channel, exchange=exchange, routing_key="notifications.info",
                                  serializer=None)
        for n in range(MESSAGES):
            producer.publish(envelope(ids[n % IMAGES], n), content_type="application/json",
                             content_encoding="utf-8", delivery_mode=2)


def raw_drain(url: str, queue_name: str) -> float:
    """Seconds a plain kombu consumer takes to receive and ack every message."""
    got = 0
    exchange = kombu.Exchange("glance", type="topic", durable=False, auto_delete=False)
    queue = kombu.Queue(queue_name, exchange, routing_key="notifications.info", durable=False,
                        auto_delete=False)

    def on_message(body, message):
        nonlocal got
        json.loads(json.loads(body)["oslo.message"]) if isinstance(body, str) else None
        message.ack()
        got += 1

    with kombu.Connection(amqp(url)) as conn:
        with conn.Consumer(queue, callbacks=[on_message], accept=["json", "text/plain"]):
            t0 = time.perf_counter()
            while got < MESSAGES:
                conn.drain_events(timeout=30)
            return time.perf_counter() - t0


def cleanup(url: str, pool: str) -> None:
    """Delete our pool queue and purge Glance's undrained default queue: every bound queue
    gets a copy of each burst, and a broker under memory pressure blocks publishers.
    `url`: Glance's RabbitMQ user (imagesync's may not touch notifications.info)."""
    with kombu.Connection(amqp(url)) as conn:
        channel = conn.channel()
        for name, action in ((pool, "delete"), ("notifications.info", "purge")):
            try:
                getattr(channel, f"queue_{action}")(name)
            except Exception:  # noqa: BLE001 - absent queue: nothing to clean
                channel = conn.channel()


def daemon_drain(d: Daemon) -> float:
    """Seconds from the daemon's start to every message recorded in its ledger."""
    before = d.query("SELECT events_total FROM daemon")[0]["events_total"]
    d.start()
    t0 = time.perf_counter()  # the listener is consuming once 'imagesync started' is logged
    wait_for(lambda: d.query("SELECT events_total FROM daemon")[0]["events_total"]
             >= before + MESSAGES, timeout=600, interval=0.01, message="the daemon to drain")
    seconds = time.perf_counter() - t0
    d.stop()
    return seconds


def run() -> Section:
    box = get_sandbox()
    section = Section("Ingest", f"{MESSAGES:,} `image.update` notifications over {IMAGES:,} "
                      "images preloaded on the daemon's pool queue (published as Glance's RabbitMQ "
                      "user); imagesync drains them (parse, coalesce, one ledger commit per "
                      "batch) versus a raw kombu consumer that receives and acks each of the "
                      "same messages, reading as imagesync's RabbitMQ user like the daemon "
                      "(`python bench/bench_ingest.py`).")
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    d = Daemon(box, work, "version: 1\nrules: []\n",
               {"imagesync": {"log_level": "INFO"}, "reconcile": {"interval": 0},
                "notifications": LISTENER})
    d.start()  # declares and binds its pool queue
    d.stop()
    mine, raw = [], []
    try:
        for _ in range(RUNS):
            raw_queue = f"imagesync-bench-raw-{uuid.uuid4().hex[:6]}"
            try:
                publish(box.glance_transport_url, [d.pool, raw_queue])
                raw.append(raw_drain(box.transport_url, raw_queue))
            finally:
                cleanup(box.glance_transport_url, raw_queue)
            mine.append(daemon_drain(d))
    finally:
        if d.proc and d.proc.poll() is None:
            d.stop()
        cleanup(box.glance_transport_url, d.pool)
    rate = [MESSAGES / s for s in mine]
    raw_rate = [MESSAGES / s for s in raw]
    ratio = sorted(rate)[len(rate) // 2] / sorted(raw_rate)[len(raw_rate) // 2]
    section.row("drain rate (msg/s)", spread(rate), spread(raw_rate), f"{ratio:.2f}x",
                ">= 0.5x raw kombu")
    section.row("drain time (s)", spread(mine), spread(raw))
    conf = d.conf_file.read_text()
    section.note("listener settings: " + ", ".join(
        line.strip() for line in conf.splitlines()
        if line.startswith("batch")) + " (the daemon's defaults where "
        "not listed)")
    return section


if __name__ == "__main__":
    print(run().markdown())
