"""Active/standby between the imagesync daemons of several controllers, through tooz.

One tooz lock, `imagesync-active`, in the deployment's coordination backend ([coordination]
backend_url: Redis, Redis Sentinel, etcd). The daemon holding it is active: it consumes
notifications, plans, imports and reconciles. The others stand by, connected, and try to
take the lock every renewal period. Every daemon also joins the tooz group `imagesync` with
its role as capabilities, so that `imagesync status` on any node names the active one.

Fencing. Nothing in tooz is a fencing token, so the claim is bounded by time: it is valid
until `lease` seconds after the start of the last renewal the backend confirmed (this
process's monotonic clock, read before the renewal was sent), less a margin. `may_import()`
is true only inside that window. A daemon that was paused, partitioned or cut off from the
backend therefore stops sending imports before the backend can let another daemon take the
lock (which needs the same `lease` to run out there), and it steps down as soon as a
renewal fails for longer than one renewal period. Glance's own import lock (409) bounds
what could still slip through; the executor counts those answers.

An adapter: talks to the backend only; the service decides what activity means.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import structlog

from imagesync.health import Heartbeat

log = structlog.get_logger("imagesync.coordination")

LOCK = b"imagesync-active"
GROUP = b"imagesync"
ACTIVE, STANDBY, DISCONNECTED = "active", "standby", "disconnected"


def default_member_id() -> str:
    return socket.gethostname()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def redact(url: str) -> str:
    """The backend URL without its passwords (in the netloc, and query options such as
    Sentinel's `sentinel_password`), for logs and `status`."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.hostname or ""
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}" +
                               (f":{parts.port}" if parts.port else ""))
    query = [(k, "***" if "password" in k.lower() else v)
             for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


class Lease:
    """This daemon's claim to be the active one, kept by a thread of its own.

    `on_active()` is called (in that thread) when the claim is won, `on_standby(reason)`
    when it is lost or given up; neither is called twice in a row."""

    def __init__(self, backend_url: str, member_id: str, lease: float,
                 on_active: Callable[[], None], on_standby: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, coordinator_factory=None):
        self.url, self.member = backend_url, member_id or default_member_id()
        self.lease, self.period = float(lease), float(lease) / 3.0
        self.margin = min(2.0, self.period / 2)
        self.on_active, self.on_standby, self.clock = on_active, on_standby, clock
        self._factory = coordinator_factory or self._tooz_coordinator
        self.role = DISCONNECTED
        self.since = time.time()
        self.valid_until = 0.0      # monotonic: imports allowed before this instant
        self.last_ok = 0.0          # monotonic: last time the backend answered
        self.error: str | None = None
        self._coord = None
        self._lock = None
        self._stop = threading.Event()
        # Set when the thread's loop has ended. Thread.join()/is_alive() are not used: after
        # tooz's redis driver ran in a thread, CPython 3.11 kept reporting that thread alive
        # (and join() blocking) once the OS thread had exited.
        self._done = threading.Event()
        self.thread: threading.Thread | None = None
        # A call to a Redis that went away returns only after tooz's and redis-py's retries
        # (about a minute, measured): the claim's time bound fences imports meanwhile, and
        # the watchdog must not kill the daemon for that wait.
        self.heartbeat = Heartbeat("coordination", limit=max(90.0, 3 * self.lease))

    # -- what the daemon asks

    @property
    def active(self) -> bool:
        return self.role == ACTIVE

    def may_import(self) -> bool:
        """True while this daemon's claim is certainly still its own."""
        return self.role == ACTIVE and self.clock() < self.valid_until

    # -- the thread

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="imagesync-coordination",
                                       daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and not self._done.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self._done.wait(timeout=self.lease + 5)
        if self.role == ACTIVE:
            self._become(STANDBY, "stopping")
        self._release()
        self._disconnect()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._done.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.heartbeat.beat()
            started = self.clock()
            try:
                self._step(started)
                self.error = None
            except Exception as exc:  # noqa: BLE001 - tooz, redis and etcd errors alike
                self._trouble(exc)
            self._stop.wait(max(0.1, self.period - (self.clock() - started)))

    def _step(self, started: float) -> None:
        if self._coord is None:
            self._connect()
        assert self._coord is not None and self._lock is not None
        if self.role == ACTIVE:
            if not self._renew():
                self._become(STANDBY, "lost the claim: another daemon holds it")
                return
        elif self._lock.acquire(blocking=False):
            self.valid_until = started + self.lease - self.margin
            self.last_ok = self.clock()
            self._become(ACTIVE, "won the claim")
        elif self.role != STANDBY:
            self._become(STANDBY, "another daemon is active")
        else:
            self.last_ok = self.clock()
        if self.role == ACTIVE:
            self.valid_until = started + self.lease - self.margin
            self.last_ok = self.clock()
        self._coord.heartbeat()
        self._coord.run_watchers()

    def _renew(self) -> bool:
        """Renew the claim; False when the backend says it is no longer ours."""
        assert self._lock is not None
        self._lock.heartbeat()   # tooz ignores a lapsed claim here: check it ourselves
        lease = getattr(self._lock, "_lease", None)   # etcd3gw: the lock key lives on a lease
        if lease is not None:                         # (is_still_owner: NotImplemented)
            return lease.ttl() > 0
        return bool(self._lock.is_still_owner())     # redis: the key holds our token

    def _trouble(self, exc: Exception) -> None:
        first = self.error is None
        self.error = _first_line(exc)
        if first:
            log.warning("coordination backend unavailable", backend=redact(self.url),
                        error=self.error, role=self.role)
        if self.role == ACTIVE and self.clock() - self.last_ok > self.period:
            self._become(STANDBY, f"coordination backend unavailable: {self.error}")
            self._disconnect()
        elif self.role == STANDBY and self.clock() - self.last_ok > self.lease:
            self._disconnect()   # connect afresh: an expired etcd lease is not re-joined

    def _become(self, role: str, reason: str) -> None:
        if role == self.role:
            return
        was, self.role, self.since = self.role, role, time.time()
        if role != ACTIVE:
            self.valid_until = 0.0
        log.info(f"coordination: {role}", member=self.member, was=was, reason=reason)
        self._publish_role()
        if role == ACTIVE:
            self.on_active()
        elif was == ACTIVE:
            self.on_standby(reason)

    # -- the backend

    def _tooz_coordinator(self):
        from tooz import coordination

        # Bound every backend call by one renewal period: a hung call must not outlive the
        # claim unnoticed (the thread's heartbeat feeds the systemd watchdog).
        return coordination.get_coordinator(self.url, self.member.encode(),
                                             timeout=max(1, int(self.period)),
                                             lock_timeout=int(self.lease),
                                             membership_timeout=int(self.lease))

    def _connect(self) -> None:
        coord = self._factory()
        coord.start(start_heart=False)
        self._coord, self._lock = coord, coord.get_lock(LOCK)
        try:
            coord.create_group(GROUP).get()
        except Exception as exc:  # noqa: BLE001 - GroupAlreadyExist, or no group support
            if type(exc).__name__ != "GroupAlreadyExist":
                log.debug("no coordination group", error=_first_line(exc))
        try:
            coord.join_group(GROUP, self._capabilities()).get()
        except Exception as exc:  # noqa: BLE001 - MemberAlreadyExist after a reconnect
            if type(exc).__name__ != "MemberAlreadyExist":
                log.debug("cannot join the coordination group", error=_first_line(exc))
        self.last_ok = self.clock()
        if self.role == DISCONNECTED:
            log.info("coordination backend connected", backend=redact(self.url),
                     member=self.member)

    def _capabilities(self) -> dict:
        return {"role": self.role, "since": self.since}

    def _publish_role(self) -> None:
        if self._coord is None:
            return
        try:
            self._coord.update_capabilities(GROUP, self._capabilities()).get()
        except Exception as exc:  # noqa: BLE001 - status only; the lock is what counts
            log.debug("cannot publish the role", error=_first_line(exc))

    def _release(self) -> None:
        if self._lock is not None and self._lock.acquired:
            try:
                self._lock.release()
            except Exception as exc:  # noqa: BLE001 - it lapses by itself anyway
                log.debug("cannot release the claim", error=_first_line(exc))

    def _disconnect(self) -> None:
        coord, self._coord, self._lock = self._coord, None, None
        if coord is None:
            return
        try:
            coord.leave_group(GROUP).get()
        except Exception:  # noqa: BLE001, S110 - the membership lapses by itself
            pass
        try:
            coord.stop()
        except Exception:  # noqa: BLE001, S110 - a dead backend cannot be told
            pass


def members(backend_url: str, member_id: str = "imagesync-cli") -> dict[str, dict]:
    """Each daemon's published role, for `imagesync status`: member id -> capabilities."""
    from tooz import coordination

    # One lookup: tooz's default executor thread costs a 1 s join at stop() (futurist), the
    # synchronous one nothing (`imagesync status` took 2.1 s on Redis, 0.02 s with it).
    if "executor=" not in backend_url:
        backend_url += ("&" if "?" in backend_url else "?") + "executor=synchronous"
    coord = coordination.get_coordinator(backend_url, member_id.encode())
    coord.start(start_heart=False)
    try:
        found = coord.get_members_with_capabilities(GROUP).get()
        return {(m.decode() if isinstance(m, bytes) else str(m)): dict(c or {})
                for m, c in found.items()}
    finally:
        coord.stop()
