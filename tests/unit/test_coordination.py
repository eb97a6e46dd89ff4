"""The active/standby claim's logic, stepped by hand with a fake backend and a fake clock:
who may import when, and when a daemon steps down. (The real backends: functional tests.)"""

from __future__ import annotations

import pytest

from imagesync.coordination import ACTIVE, STANDBY, Lease, redact


class Backend:
    """One shared lock, as a tooz backend keeps it; `down` makes every call fail."""

    def __init__(self):
        self.holder: str | None = None
        self.down = False

    def check(self):
        if self.down:
            raise ConnectionError("backend unreachable")


class FakeLock:
    def __init__(self, backend: Backend, member: str):
        self.backend, self.member = backend, member

    @property
    def acquired(self) -> bool:
        return self.backend.holder == self.member

    def acquire(self, blocking=False) -> bool:
        self.backend.check()
        if self.backend.holder in (None, self.member):
            self.backend.holder = self.member
            return True
        return False

    def heartbeat(self) -> bool:
        self.backend.check()
        return True

    def is_still_owner(self) -> bool:
        self.backend.check()
        return self.acquired

    def release(self) -> None:
        self.backend.check()
        if self.acquired:
            self.backend.holder = None


class FakeCoordinator:
    def __init__(self, backend: Backend, member: str):
        self.backend, self.member = backend, member

    def start(self, start_heart=False):
        self.backend.check()

    def get_lock(self, name):
        return FakeLock(self.backend, self.member)

    def create_group(self, group):
        return self

    join_group = update_capabilities = lambda self, *a: self   # noqa: E731

    def leave_group(self, group):
        return self

    def get(self):
        return None

    def heartbeat(self):
        self.backend.check()

    def run_watchers(self):
        pass

    def stop(self):
        pass


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world():
    backend, clock, events = Backend(), Clock(), []

    def lease(member: str) -> Lease:
        return Lease("redis://:s3cret@ctl1:6379", member, 15,
                     on_active=lambda: events.append((member, "active")),
                     on_standby=lambda why: events.append((member, "standby", why)),
                     clock=clock, coordinator_factory=lambda: FakeCoordinator(backend, member))

    return backend, clock, events, lease


def step(lease: Lease) -> None:
    """One turn of the lease's loop, as its thread runs it."""
    try:
        lease._step(lease.clock())
        lease.error = None
    except Exception as exc:  # noqa: BLE001 - as the loop does
        lease._trouble(exc)


def test_the_first_daemon_becomes_active_the_second_stands_by(world):
    backend, clock, events, lease = world
    a, b = lease("a"), lease("b")
    step(a)
    step(b)
    assert (a.role, b.role) == (ACTIVE, STANDBY)
    assert a.may_import() and not b.may_import()
    assert events == [("a", "active")]


def test_a_paused_active_daemon_imports_nothing_once_its_claim_may_have_lapsed(world):
    backend, clock, events, lease = world
    a = lease("a")
    step(a)
    clock.now += 15 - 2.0 - 0.01   # within lease minus the margin: still certain
    assert a.may_import()
    clock.now += 0.02              # past it (SIGSTOP, a long GC, a stalled thread)
    assert not a.may_import(), "the claim may have lapsed in the backend by now"
    assert a.role == ACTIVE        # not told yet: the import check alone fences it


def test_the_active_daemon_steps_down_when_the_backend_is_gone_longer_than_a_renewal(world):
    backend, clock, events, lease = world
    a = lease("a")
    step(a)
    backend.down = True
    clock.now += 1.0
    step(a)                        # one failed renewal inside the period: keeps the role
    assert a.role == ACTIVE
    clock.now += a.period
    step(a)
    assert a.role == STANDBY and not a.may_import()
    assert events[-1][:2] == ("a", "standby") and "backend unavailable" in events[-1][2]


def test_a_daemon_whose_claim_was_taken_steps_down_at_its_next_renewal(world):
    backend, clock, events, lease = world
    a, b = lease("a"), lease("b")
    step(a)
    backend.holder = None          # the claim lapsed in the backend (a was paused) ...
    step(b)                        # ... and b took it
    assert b.role == ACTIVE
    step(a)
    assert a.role == STANDBY and not a.may_import()
    assert events[-1] == ("a", "standby", "lost the claim: another daemon holds it")


def test_a_standby_takes_over_once_the_holder_released(world):
    backend, clock, events, lease = world
    a, b = lease("a"), lease("b")
    step(a)
    step(b)
    a.stop()                       # releases the claim
    step(b)
    assert b.role == ACTIVE and b.may_import()
    assert ("a", "standby", "stopping") in events


def test_the_backend_password_never_reaches_a_log_line():
    assert redact("redis://:s3cret@ctl1:6379?sentinel=m") == "redis://:***@ctl1:6379?sentinel=m"
    assert redact("etcd3+http://ctl1:2379") == "etcd3+http://ctl1:2379"
    assert redact("redis://:s3cret@ctl1:26379?sentinel=m&sentinel_password=s3cret&db=0") == \
        "redis://:***@ctl1:26379?sentinel=m&sentinel_password=***&db=0"
