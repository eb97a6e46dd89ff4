"""The notification listener: Glance events from RabbitMQ into the ledger.

An oslo.messaging batch listener on exchange `glance` with its own pool queue.
A batch is parsed, coalesced per image and written in one ledger commit; it is
acknowledged (HANDLED) only after that commit, and requeued when the ledger
cannot be written, after backing off so the broker is not spun on. Garbage is
logged and acknowledged: it can never succeed, so requeueing it would loop.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import oslo_messaging
import structlog
from oslo_messaging.notify import dispatcher as notify_dispatcher
from oslo_messaging.notify import listener as notify_listener

from imagesync import events
from imagesync.backoff import compute_backoff
from imagesync.health import Heartbeat
from imagesync.ledger import RETRY_CAP, LedgerError

log = structlog.get_logger("imagesync.listener")

PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical", "sample")
IDLE_POLL = 1.0  # longest one poll of an idle queue blocks: the idle listener's wake-ups/s


class Endpoint:
    """Batch endpoint: one method per priority, each receives a list of messages."""

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
        for priority in PRIORITIES:
            setattr(self, priority, functools.partial(self._handle, priority=priority))

    def _parse(self, message: dict, priority: str) -> events.Event | None:
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

    def _handle(self, messages: list[dict], priority: str):
        parsed = [e for e in (self._parse(m, priority) for m in messages) if e is not None]
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


class _BatchDispatcher(notify_dispatcher.BatchNotificationDispatcher):
    """oslo.messaging's, except that one malformed envelope cannot requeue a whole batch.

    oslo.messaging calls ``priority.lower()`` before any endpoint runs: a non-string priority
    raises, and the server then requeues every message of the batch, forever. Such a message
    gets no priority instead, which oslo.messaging logs as unknown and acknowledges.
    """

    def _extract_user_message(self, incoming):
        try:
            return super()._extract_user_message(incoming)
        except Exception:
            log.warning("malformed notification envelope dropped",
                        priority=repr(incoming.message.get("priority"))[:100])
            return "", incoming, None


class _NoDuplicateCheck:
    """Replaces oslo.messaging's cache of acknowledged `_unique_id`s on our listener.

    oslo.messaging remembers the ids of the last 16 acknowledged notifications and drops a
    later message with one of them WITHOUT acknowledging it: it stays unacknowledged for as
    long as the connection lives, and is redelivered and dropped again after a reconnect
    (a notifier's retried publish sends exactly such a copy). Recording an event twice is
    harmless, so duplicates go through and are acknowledged like any other message.
    """

    @staticmethod
    def check_duplicate_message(message: dict):
        return message.pop("_unique_id", None)

    @staticmethod
    def add(_msg_id) -> None:
        pass


class _FirstThenBatch:
    """Wait for a batch's first message in long polls, and only then batch_timeout for more.

    oslo.messaging's batch poll waits in batch_timeout slices even while the queue is empty,
    so a small batch_timeout makes an idle listener wake 1 / batch_timeout times a second.
    """

    def __init__(self, poll, idle_poll: float, on_poll=lambda: None):
        self.poll, self.idle_poll, self.on_poll = poll, idle_poll, on_poll

    def __call__(self, timeout=None, batch_size=1, batch_timeout=None):
        self.on_poll()
        first = self.poll(batch_size=1, batch_timeout=self.idle_poll)
        if not first or batch_size <= 1:
            return first
        return first + self.poll(batch_size=batch_size - 1, batch_timeout=batch_timeout)


class Listener:
    """Owns the oslo.messaging transport and listener for one ConfigOpts."""

    def __init__(self, conf, endpoint: Endpoint):
        self.conf, self.endpoint = conf, endpoint
        n = conf.notifications
        self.transport = oslo_messaging.get_notification_transport(conf)
        targets = [oslo_messaging.Target(exchange=n.exchange, topic=n.topic)]
        self.listener = notify_listener.BatchNotificationServer(
            self.transport, targets, _BatchDispatcher([endpoint], None), "threading",
            allow_requeue=True, pool=n.pool or None, batch_size=n.batch_size,
            batch_timeout=n.batch_timeout)
        conf.set_override("executor_thread_pool_size", n.executor_threads)  # registered now

    def start(self) -> None:
        self.listener.start()
        driver_listener: Any = getattr(self.listener.listener, "_poll_style_listener", None)
        if hasattr(driver_listener, "msg_id_cache"):
            driver_listener.msg_id_cache = _NoDuplicateCheck()
        if hasattr(driver_listener, "poll"):
            driver_listener.poll = _FirstThenBatch(driver_listener.poll, IDLE_POLL,
                                                   self.endpoint.heartbeat.beat)

    def stop(self) -> None:
        self.endpoint.stopping.set()
        self.listener.stop()
        self.listener.wait()
        self.transport.cleanup()
