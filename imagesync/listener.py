"""The notification listener: Glance events from RabbitMQ into the ledger.

A consumer on oslo.messaging's RabbitMQ connection, on exchange `glance` with its own
pool queue. A batch is parsed, coalesced per image and written in one ledger commit; it
is acknowledged only after that commit, and requeued when the ledger cannot be written,
after backing off so the broker is not spun on. Garbage is logged and acknowledged (or
rejected by oslo.messaging): it can never succeed, so requeueing it would loop. A
redelivered duplicate is simply recorded again: that is harmless.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import oslo_messaging
import structlog
from oslo_messaging._drivers import common as rpc_common
from oslo_messaging._drivers import impl_rabbit

from imagesync import events
from imagesync.backoff import compute_backoff
from imagesync.health import Heartbeat
from imagesync.ledger import RETRY_CAP, LedgerError

log = structlog.get_logger("imagesync.listener")

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")
IDLE_POLL = 1.0  # longest one poll of an idle queue blocks: the idle listener's wake-ups/s


class ListenerError(RuntimeError):
    """The notification transport cannot be listened to (its driver is not RabbitMQ)."""


class Endpoint:
    """Records batches of notifications in the ledger: parse, one commit, say how it went."""

    def __init__(self, ledger, on_change=None, clock=time.time, sleep=None,
                 max_write_tries: int = 6, metrics=None):
        self.ledger, self.on_change, self.clock = ledger, on_change, clock
        self.stopping = threading.Event()
        # Beaten by every poll (at least every IDLE_POLL s) and while backing off on purpose.
        self.heartbeat = Heartbeat("listener")
        self.sleep = sleep or (lambda seconds: self.heartbeat.wait(self.stopping, seconds))
        self.max_write_tries = max_write_tries
        self.metrics = metrics
        self.failures = 0          # consecutive failed ledger writes, shared by all threads
        self.healthy = threading.Event()
        self.healthy.set()

    def _parse(self, message: dict) -> events.Event | None:
        priority = message.get("priority")
        if not isinstance(priority, str):
            log.warning("malformed notification envelope dropped",
                        priority=repr(priority)[:100])
            return None
        try:
            event = events.parse(message.get("event_type"), message.get("payload"),
                                 message.get("metadata"), priority)
        except Exception:  # parse never raises by contract; never let one message sink a batch
            log.exception("unparseable notification dropped",
                          event_type=repr(message.get("event_type"))[:100])
            return None
        if event is None:
            log.debug("notification ignored", event_type=repr(message.get("event_type"))[:100],
                      reason=events.reject_reason(message.get("event_type"),
                                                  message.get("payload")))
        elif event.kind is events.EventKind.UPLOAD_FAILED:
            log.warning("Glance reports a failed upload", image_id=event.image_id,
                        reason=event.reason, quota=event.quota)
        return event

    def handle_batch(self, messages: list[dict]):
        """Record a batch in one commit: HANDLED once it is, REQUEUE if it never could be."""
        parsed = [e for e in (self._parse(m) for m in messages) if e is not None]
        if self.metrics:
            self.metrics.notifications(len(messages), parsed, self.clock())
        if not parsed:
            return oslo_messaging.NotificationResult.HANDLED
        for _attempt in range(self.max_write_tries):
            try:
                self.ledger.note_events(parsed, self.clock())
            except LedgerError as exc:
                self.failures += 1
                self.healthy.clear()
                delay = compute_backoff(self.failures, base=1.0, cap=RETRY_CAP)
                log.error("cannot record notifications; holding them and backing off",
                          error=str(exc), retry_in=round(delay, 1), batch=len(messages))
                if self.sleep(delay):  # stopping
                    break
                continue
            if self.failures:
                log.info("ledger writable again", after_failures=self.failures)
            self.failures = 0
            self.healthy.set()
            if self.on_change:
                self.on_change()
            return oslo_messaging.NotificationResult.HANDLED
        return oslo_messaging.NotificationResult.REQUEUE


class Listener:
    """Consumes Glance's notifications on oslo.messaging's own RabbitMQ connection.

    oslo.messaging builds and keeps the connection: transport_url with its failover hosts,
    every [oslo_messaging_rabbit] option (TLS, heartbeats, quorum or HA queues, durability),
    the pool queue bound to each priority of the topic, and reconnection with the consumers
    declared again. What this class replaces is oslo.messaging's notification server above
    that connection (its poll loop, dispatcher and executor), which cost three quarters of
    the receive path per message (BENCHMARKS.md, Ingest): here one thread takes a batch,
    has it recorded, then acknowledges it, in that order.

    A batch starts with one message waited for in polls of at most IDLE_POLL seconds
    through oslo.messaging's `consume` (which reconnects); the rest is what the socket
    already holds, read without a reconnect wrapper per message, and what arrives within
    batch_timeout. Garbage that oslo.messaging cannot deserialize is rejected by it and
    logged; a message without a usable priority is logged and acknowledged.
    """

    def __init__(self, conf, endpoint: Endpoint):
        self.conf, self.endpoint = conf, endpoint
        n = conf.notifications
        self.transport = oslo_messaging.get_notification_transport(conf)
        driver = self.transport._driver
        if not isinstance(driver, impl_rabbit.RabbitDriver):
            raise ListenerError(
                "notifications are read from RabbitMQ only: the notification transport_url "
                f"uses the {type(driver).__name__} driver, not rabbit://")
        self.driver = driver
        self.bindings = [f"{n.topic}.{p}" for p in PRIORITIES]
        self.batch_size, self.batch_timeout = n.batch_size, n.batch_timeout
        self.incoming: list[impl_rabbit.RabbitMessage] = []
        self.conn: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        n = self.conf.notifications
        self.conn = self.driver._get_connection(rpc_common.PURPOSE_LISTEN)
        for topic in self.bindings:
            self.conn.declare_topic_consumer(exchange_name=n.exchange, topic=topic,
                                             callback=self.incoming.append,
                                             queue_name=n.pool or None)
        # oslo.messaging subscribes (basic.consume) on its first consume(): do it now, so
        # that the daemon says it is ready only once the broker counts it as a consumer.
        self._consume(0.01)
        self.thread = threading.Thread(target=self._run, name="listener", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.endpoint.stopping.set()
        if self.conn is not None:
            self.conn.stop_consuming()
        if self.thread is not None:
            self.thread.join()
        if self.conn is not None:
            self.conn.close()
        self.transport.cleanup()

    def _run(self) -> None:
        stopping = self.endpoint.stopping
        while not stopping.is_set():
            self.endpoint.heartbeat.beat()
            try:
                batch = self._batch()
            except Exception:  # oslo.messaging gave up reconnecting: wait and try again
                log.exception("cannot receive notifications; trying again")
                self.endpoint.sleep(compute_backoff(1, base=1.0, cap=RETRY_CAP))
                continue
            if batch:
                self._settle(batch, self.endpoint.handle_batch(
                    [self._message(m) for m in batch]))

    def _batch(self) -> list:
        """Up to batch_size messages: the first waited for, the rest already here or soon."""
        if not self.incoming and not self._consume(IDLE_POLL):
            return []
        deadline = time.monotonic() + self.batch_timeout
        while len(self.incoming) < self.batch_size:
            self._read_buffered()
            left = deadline - time.monotonic()
            if len(self.incoming) >= self.batch_size or left <= 0 or not self._consume(left):
                break
        batch = self.incoming[:self.batch_size]
        del self.incoming[:self.batch_size]
        return batch

    def _consume(self, timeout: float) -> bool:
        """One wait through oslo.messaging (reconnecting if it must); False on a timeout."""
        try:
            self.conn.consume(timeout=timeout)
        except rpc_common.Timeout:
            return False
        return not self.endpoint.stopping.is_set()

    def _read_buffered(self) -> None:
        """Messages the broker has already sent, without waiting: each `consume` call
        wraps a single message in oslo.messaging's reconnect machinery; this reads on
        until the socket is empty. A connection error is left to the next `consume`, which
        reconnects."""
        rabbit = self.conn.connection     # oslo's Connection, inside its ConnectionContext
        with rabbit._connection_lock:
            try:
                while len(self.incoming) < self.batch_size:
                    rabbit.connection.drain_events(timeout=0)   # kombu's
            except TimeoutError:   # socket.timeout: nothing more has arrived
                return
            except Exception as exc:  # noqa: BLE001 - see above
                log.debug("reading what the socket holds stopped", error=str(exc))

    def _settle(self, batch: list, result) -> None:
        """Acknowledge a batch after its commit, or requeue each of its messages.

        One basic.ack with `multiple` for the batch's last message acknowledges the whole
        batch: the batch is the oldest of what this channel delivered, everything before it
        is settled, and what came after it has higher delivery tags and stays unacked."""
        requeue = result == oslo_messaging.NotificationResult.REQUEUE
        with self.conn._connection_lock:
            try:
                if requeue:
                    for message in batch:
                        message.requeue()
                else:
                    batch[-1]._raw_message.ack(multiple=True)
            except Exception as exc:  # noqa: BLE001 - the connection is gone: the broker
                # redelivers what was not acknowledged, and duplicates are harmless
                log.warning("cannot settle notifications; the broker will redeliver them",
                            error=str(exc), requeue=requeue, batch=len(batch))

    @staticmethod
    def _message(message) -> dict:
        return {"event_type": message.get("event_type"), "payload": message.get("payload"),
                "priority": message.get("priority"),
                "metadata": {"message_id": message.get("message_id"),
                             "timestamp": message.get("timestamp")}}
