"""The daemon's oslo.service Service: listener, executor, reconciler, readiness.

Everything is built in start(), which runs in the child that oslo.service forks,
so no connection crosses the fork. A SIGHUP restarts that child, which re-reads
config and policy; an invalid file then leaves the last good one in force (the
config in memory, the policy in the ledger). The worker says READY=1 once it
consumes, never STOPPING=1: it also stops for a reload, which is not a stop of the
service. Wiring only: the work is done by the modules it starts.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import time

import structlog
from oslo_service import backend

backend.init_backend(backend.BackendType.THREADING)  # before oslo_service.service is imported
from oslo_service import service as oslo_service  # noqa: E402

from imagesync import log as logsetup  # noqa: E402
from imagesync import metrics as metrics_mod
from imagesync import systemd
from imagesync.backoff import compute_backoff
from imagesync.coordination import Lease, default_member_id, redact
from imagesync.executor import Caps, Executor, PolicyHolder
from imagesync.glance import (
    CredentialsRejected,
    Glance,
    GlanceError,
    GlanceMisconfigured,
    KeystoneUnavailable,
)
from imagesync.ledger import Ledger, LedgerError
from imagesync.limits import OwnerQuota
from imagesync.listener import Endpoint, Listener
from imagesync.planner import Settings
from imagesync.policy import Policy, PolicyError, load_policy, parse_policy
from imagesync.reconcile import Reconciler

log = structlog.get_logger("imagesync.service")

NO_RULES = "version: 1\nrules: []\n"
LEDGER_PROBE_TIMEOUT = 10.0  # seconds the watchdog waits for the ledger writer to answer


def settings_from(conf) -> Settings:
    c = conf.copy
    return Settings(
        max_attempts=c.max_attempts,
        backoff=lambda attempt: compute_backoff(attempt, base=c.backoff_base, cap=c.backoff_cap),
        quota_retry_delay=c.quota_retry_delay, unknown_store_tries=c.unknown_store_tries,
        poll_interval=c.poll_interval, long_poll=c.long_import_poll_interval,
        lock_expiry=c.lock_expiry,
        lock_poll=c.lock_poll_interval, settle_grace=c.settle_grace,
        image_backoff_base=c.image_backoff_base, image_backoff_cap=c.image_backoff_cap,
        image_request_share=c.image_request_share,
        quota_recheck=conf.quota.recheck_interval)


def owner_quota_from(conf, glance) -> OwnerQuota | None:
    q = conf.quota
    if not q.check_owner_quota:
        return None
    return OwnerQuota(glance, q.headroom_percent, q.user_storage_quota, q.limits_cache_ttl)


def caps_from(conf) -> Caps:
    c = conf.copy
    return Caps(c.max_imports, c.max_imports_per_store, c.max_bytes_in_flight,
                c.max_bytes_per_hour)


def choose_policy(conf, ledger, known_stores) -> Policy:
    """The policy file if valid; else the last good one; else no rules at all (copy nothing)."""
    path = conf.imagesync.policy_file
    try:
        policy = load_policy(path, known_stores=known_stores)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("invalid policy", problem=str(problem))
        last = ledger.last_policy()
        if last is None:
            log.error("no valid policy and none kept from before: copying nothing", file=path)
            return parse_policy(NO_RULES, f"{path} (invalid; no rules in force)")
        log.warning("keeping the last good policy", file=path)
        return parse_policy(last[1], f"{last[0]} (last good)")
    for warning in policy.warnings:
        log.warning("policy warning", problem=str(warning))
    if known_stores is None:
        log.warning("store list unavailable: store names in the policy not checked", file=path)
    try:
        ledger.save_policy(path, policy.text, time.time())
    except LedgerError as exc:  # it runs; it just cannot be the fallback until saved
        log.error("cannot keep this policy as the last good one", error=str(exc))
    log.info("policy loaded", file=path, rules=len(policy.rules))
    return policy


class ImagesyncService(oslo_service.Service):
    def __init__(self, conf):
        super().__init__()
        self.conf = conf
        self._stopped = threading.Event()
        self.parts: list = []

    def start(self) -> None:
        conf = self.conf
        # A SIGHUP restarts this worker; oslo.service's "mutate" restart only changes
        # mutable options, so read the files again: a reload re-reads config and policy.
        reloaded = conf.reload_config_files()
        logsetup.setup(conf.imagesync.log_format, conf.imagesync.log_level)
        if not reloaded:
            for problem in getattr(conf, "problems", []):
                log.error("invalid configuration: keeping the settings in force",
                          problem=problem)
        os.umask(0o077)
        self.ledger = Ledger.from_conf(conf)
        try:
            self.ledger.daemon_started(os.getpid(), time.time())
        except LedgerError as exc:
            log.error("cannot write the ledger", error=str(exc))
        self.glance = Glance.connect(conf.imagesync.cloud, conf.imagesync.clouds_file,
                                     lazy=True, rate=conf.copy.glance_requests_per_second,
                                     stores_ttl=conf.reconcile.stores_cache_ttl)
        try:
            known = set(self.glance.stores())
        except GlanceMisconfigured as exc:
            log.error("cannot set up the Glance client; fix clouds.yaml or [imagesync] cloud, "
                      "then reload", error=str(exc), cloud=conf.imagesync.cloud)
            known = None
        except KeystoneUnavailable as exc:
            log.warning("Keystone unreachable at start", error=str(exc))
            known = None
        except CredentialsRejected as exc:
            log.error("credentials rejected at start", error=str(exc),
                      cloud=conf.imagesync.cloud)
            known = None
        except GlanceError as exc:
            log.warning("Glance unreachable at start", error=str(exc))
            known = None
        self.policy = PolicyHolder(choose_policy(conf, self.ledger, known))
        dry_run = conf.imagesync.dry_run
        ledger = self.ledger
        self.metrics = metrics_mod.from_conf(
            conf, counts=ledger.counts_by_store)  # a read-only connection, off the writer
        if self.metrics:
            self.parts.append(self.metrics)
        self.work: list = []          # the active role's parts, started by _activate
        self.work_lock = threading.Lock()
        self.lease = None
        url = conf.coordination.backend_url
        if url:
            self.lease = Lease(url, conf.coordination.member_id or default_member_id(),
                               conf.coordination.lease, on_active=self._activate,
                               on_standby=self._deactivate)
            self.lease.start()
            self.parts.append(self.lease)
            role = (f"member {self.lease.member} of {redact(url)}: active or standby as "
                    f"the coordination backend decides")
        else:
            self._activate()
            role = "listening to Glance notifications"
        log.info("imagesync started", pid=os.getpid(), dry_run=dry_run,
                 pool=conf.notifications.pool, topic=conf.notifications.topic,
                 coordination=redact(url) if url else None)
        policy = self.policy.policy
        digest = hashlib.sha256(policy.text.encode()).hexdigest()[:12]
        # A standby is healthy: READY at once, whichever role it gets.
        systemd.notify(f"READY=1\nSTATUS=worker {os.getpid()} {role}; policy "
                       f"{policy.source} sha256:{digest} ({len(policy.rules)} rules)")
        interval = systemd.watchdog_interval()
        if interval:
            self.watchdog = systemd.Watchdog(interval, self.health_checks())
            self.watchdog.start()
            self.parts.insert(0, self.watchdog)

    def _activate(self) -> None:
        """Start the active role's work: executor, listener, reconciler (a pass at once)."""
        conf = self.conf
        with self.work_lock:
            if self.work:
                return
            self.executor = Executor(self.ledger, self.glance, self.policy, settings_from(conf),
                                     caps_from(conf), dry_run=conf.imagesync.dry_run,
                                     workers=conf.copy.max_imports + 4, metrics=self.metrics,
                                     may_import=self.lease.may_import if self.lease else None,
                                     owner_quota=owner_quota_from(conf, self.glance))
            self.reconciler = Reconciler(self.ledger, self.glance, self.policy,
                                         conf.reconcile.interval, conf.reconcile.page_size,
                                         on_change=self.executor.poke, metrics=self.metrics)
            self.endpoint = Endpoint(self.ledger, on_change=self.executor.poke,
                                     metrics=self.metrics)
            self.listener = Listener(conf, self.endpoint)
            self.executor.start()
            self.listener.start()
            self.reconciler.start()
            self.work = [self.listener, self.reconciler, self.executor]
        if self.metrics:
            self.metrics.set_active(True)
        if self.lease:
            systemd.notify(f"STATUS=worker {os.getpid()} active ({self.lease.member}): "
                           "listening to Glance notifications")

    def _deactivate(self, reason: str) -> None:
        """Stop the active role's work (the claim is lost or given up); stay ready."""
        with self.work_lock:
            work, self.work = self.work, []
        for part in work:
            try:
                part.stop()
            except Exception:
                log.exception("error while stopping", part=type(part).__name__)
        if self.metrics:
            self.metrics.set_active(False)
        if self.lease:
            systemd.notify(f"STATUS=worker {os.getpid()} standby ({self.lease.member}): "
                           f"{reason}")

    def health_checks(self) -> dict:
        """Each part's liveness, for the watchdog: None when fine, else why not."""

        def thread(part, name):
            t = getattr(part, "thread", None)
            return None if t is not None and t.is_alive() else f"the {name} thread has died"

        def heartbeat(hb):
            age = hb.silent_for()
            return f"no progress for {age:.0f} s (limit {hb.limit:.0f} s)" if hb.stale() else None

        def ledger_writer():
            try:  # any answer, even a LedgerError (disk full), shows the writer is alive
                self.ledger.call(lambda _ops: None, timeout=LEDGER_PROBE_TIMEOUT)
            except LedgerError:
                pass
            except concurrent.futures.TimeoutError:
                return f"the ledger writer did not answer within {LEDGER_PROBE_TIMEOUT:.0f} s"
            return None

        def working(check):   # the active role's parts exist only while it is active
            return lambda: check() if self.work else None

        checks = {
            "listener": working(lambda: heartbeat(self.endpoint.heartbeat)),
            "ledger writer": ledger_writer,
            "executor": working(lambda: (thread(self.executor, "executor")
                                         or heartbeat(self.executor.heartbeat))),
        }
        if self.conf.reconcile.interval > 0:  # with 0 it makes one pass and is done
            checks["reconciler"] = working(lambda: thread(self.reconciler, "reconciler"))
        if self.lease is not None:
            checks["coordination"] = lambda: (
                None if self.lease.alive() else "the coordination thread has died"
            ) or heartbeat(self.lease.heartbeat)
        return checks

    def stop(self, graceful: bool = False) -> None:
        systemd.notify("STATUS=worker stopping")
        with getattr(self, "work_lock", threading.Lock()):
            work, self.work = getattr(self, "work", []), []
        for part in [*work, *self.parts]:
            try:
                part.stop()
            except Exception:
                log.exception("error while stopping", part=type(part).__name__)
        if getattr(self, "ledger", None):
            self.ledger.close()
        executor = getattr(self, "executor", None)
        log.info("imagesync stopped", pid=os.getpid(),
                 glance_requests=getattr(getattr(self, "glance", None), "requests", None),
                 visits=getattr(executor, "visits", None), polls=getattr(executor, "polls", None))
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()
