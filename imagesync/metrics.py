"""Prometheus metrics: what the daemon's parts report through their hooks, served on loopback.

Off unless [metrics] enabled. Each Metrics owns a private CollectorRegistry (no
process-wide state), so tests read exactly what one daemon reported. It never
speaks SQL: copies per store and state are asked of the ledger at scrape time
through a callable; everything else comes from the hooks the executor, listener and
reconciler call. The HTTP server binds only the configured address, and only a
loopback one unless the operator explicitly allows more.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily

from imagesync.errors import Kind
from imagesync.planner import DONE, IN_FLIGHT, STATES

log = structlog.get_logger("imagesync.metrics")


# {(store, state): n}, as Ledger.counts_by_store: read over the ledger's read-only
# connection in the scraping thread, never queued behind the ledger's writer.
Counts = Callable[[], dict[tuple[str, str], int]]


class CopiesByState:
    """imagesync_copies{store, state}: the ledger's own counts, read when Prometheus scrapes.

    Read at scrape time rather than kept up to date from hooks, because some state
    changes (a claim into in_flight, a `retry` request) happen inside the ledger
    without a hook; the read takes a read-only connection, never the writer's time.
    Every store that has any copy gets all the states, 0 when it has none in one, so
    dashboards see zeros rather than missing series. When the ledger cannot answer in
    time the family is left out of that scrape (absent, never stale).
    """

    NAME = "imagesync_copies"
    HELP = "Copies in the ledger, by store and state (read from the ledger at scrape time)."
    LABELS = ("store", "state")

    def __init__(self, counts: Counts):
        self.counts = counts

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:  # a slow or closed ledger must not break the scrape
            counts = self.counts()
        except Exception as exc:  # noqa: BLE001
            log.warning("copies per state left out of the metrics: ledger did not answer",
                        error=str(exc) or type(exc).__name__)
            return
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        for store in sorted({store for store, _ in counts}):
            for state in STATES:
                family.add_metric([store, state], counts.get((store, state), 0))
        yield family


class Metrics:
    """The hooks (import_started, import_failed, copy_state, notifications, reconciled)."""

    def __init__(self, counts: Counts | None = None):
        self.registry = CollectorRegistry()
        self.server: Any = None
        r = self.registry
        if counts is not None:
            r.register(CopiesByState(counts))
        self.copy_changes = Counter(
            "imagesync_copy_changes", "Copies that entered a state, per store, as reported by "
            "the executor's visits and import outcomes (claims into in_flight are counted by "
            "imagesync_imports_started_total).", ["store", "state"], registry=r)
        self.imports_started = Counter(
            "imagesync_imports_started", "copy-image imports Glance accepted (202), per target "
            "store.", ["store"], registry=r)
        self.imports_succeeded = Counter(
            "imagesync_imports_succeeded", "Copies an accepted import brought to done (in_flight "
            "to done), per target store.", ["store"], registry=r)
        self.imports_failed = Counter(
            "imagesync_imports_failed", "copy-image requests Glance refused, by error kind.",
            ["kind"], registry=r)
        for kind in Kind:
            self.imports_failed.labels(kind.value)
        self.held = Counter(
            "imagesync_quota_holds", "Copies not sent because the image owner's quota has no "
            "room for them (each check that held one), per target store.", ["store"],
            registry=r)
        self.notifications_total = Counter(
            "imagesync_notifications", "Notifications received from RabbitMQ.", registry=r)
        self.notifications_ignored = Counter(
            "imagesync_notifications_ignored", "Notifications received that imagesync has "
            "nothing to do with (other event types, unparseable).", registry=r)
        self.last_notification = Gauge(
            "imagesync_last_notification_timestamp_seconds", "When the last batch of "
            "notifications arrived (Unix time).", registry=r)
        self.notification_lag = Gauge(
            "imagesync_notification_lag_seconds", "Age of the newest notification of the last "
            "batch when it was handled: arrival time minus Glance's timestamp (clock skew "
            "between the hosts shows here too).", registry=r)
        self.reconcile_duration = Gauge(
            "imagesync_reconcile_duration_seconds", "How long the last complete reconcile "
            "pass took.", registry=r)
        self.reconcile_last_run = Gauge(
            "imagesync_reconcile_last_run_timestamp_seconds", "When the last complete "
            "reconcile pass ended (Unix time).", registry=r)
        self.active = Gauge(
            "imagesync_active", "1 while this daemon is the active one (it consumes "
            "notifications and imports), 0 while it stands by for another controller's.",
            registry=r)
        self.active.set(0)

    # -- hooks

    def set_active(self, active: bool) -> None:
        self.active.set(1 if active else 0)

    def import_started(self, stores: Iterable[str]) -> None:
        for store in stores:
            self.imports_started.labels(store).inc()
            self.imports_succeeded.labels(store)  # 0 until one succeeds, rather than absent

    def copies_held(self, stores) -> None:
        for store in stores:
            self.held.labels(store).inc()

    def import_failed(self, kind: str) -> None:
        self.imports_failed.labels(kind).inc()

    def copy_state(self, store: str, new_state: str, old_state: str | None) -> None:
        if new_state != old_state:
            self.copy_changes.labels(store, new_state).inc()
        if old_state == IN_FLIGHT and new_state == DONE:
            self.imports_succeeded.labels(store).inc()

    def notifications(self, n_messages: int, parsed_events, now: float) -> None:
        if n_messages <= 0:
            return
        self.notifications_total.inc(n_messages)
        self.notifications_ignored.inc(max(n_messages - len(parsed_events), 0))
        self.last_notification.set(now)
        stamps = [e.timestamp.timestamp() for e in parsed_events
                  if getattr(e, "timestamp", None) is not None]
        if stamps:
            self.notification_lag.set(now - max(stamps))

    def reconciled(self, seconds: float, now: float) -> None:
        self.reconcile_duration.set(seconds)
        self.reconcile_last_run.set(now)

    # -- the endpoint

    def serve(self, host: str, port: int, allow_non_loopback: bool = False) -> bool:
        """Serve GET /metrics on host:port; False (and an error logged) when it cannot."""
        try:
            address = bind_address(host, port)
        except OSError as exc:
            log.error("metrics endpoint not started: cannot resolve its host", host=host,
                      error=str(exc))
            return False
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            if not allow_non_loopback:
                log.error("metrics endpoint not started: host is not a loopback address "
                          "(set [metrics] allow_non_loopback = true to serve it anyway)",
                          host=host, address=address)
                return False
            log.warning("metrics endpoint served beyond loopback, without authentication",
                        host=host, address=address)
        try:
            started = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            log.error("metrics endpoint not started", host=host, port=port, error=str(exc))
            return False
        # Recent prometheus-client returns (server, thread); older releases return nothing.
        self.server = started[0] if isinstance(started, tuple) else None
        log.info("metrics endpoint started", address=address, port=port)
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def bind_address(host: str, port: int) -> str:
    """The numeric address the endpoint binds for `host`, resolved as prometheus-client does."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return str(infos[0][4][0])


def from_conf(conf, counts: Counts | None = None) -> Metrics | None:
    """A serving Metrics when [metrics] enabled, else None (the hooks are then skipped)."""
    m = conf.metrics
    if not m.enabled:
        return None
    metrics = Metrics(counts)
    metrics.serve(m.host, m.port, m.allow_non_loopback)
    return metrics
