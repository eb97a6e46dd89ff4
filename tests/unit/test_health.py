"""The watchdog pings only while every part is healthy, and names the part that is not."""

from __future__ import annotations

import threading

from imagesync import systemd
from imagesync.health import Heartbeat


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_heartbeat_goes_stale_after_its_limit_of_silence():
    clock = Clock()
    hb = Heartbeat("listener", limit=20, clock=clock)
    clock.now += 19
    assert not hb.stale()
    clock.now += 2
    assert hb.stale() and hb.silent_for() == 21
    hb.beat()
    assert not hb.stale()


def test_waiting_on_purpose_keeps_beating():
    hb = Heartbeat("listener", limit=0.5)
    hb.wait(threading.Event(), 0.3, step=0.05)
    assert hb.silent_for() < 0.1


def test_the_watchdog_withholds_pings_and_logs_the_failing_part_once(monkeypatch):
    sent, logged = [], []
    monkeypatch.setattr(systemd, "notify", lambda state: sent.append(state))
    monkeypatch.setattr(systemd.log, "error", lambda event, **kw: logged.append(("error", kw)))
    monkeypatch.setattr(systemd.log, "info", lambda event, **kw: logged.append(("info", kw)))
    state = {"reason": None}
    dog = systemd.Watchdog(1.0, {"listener": lambda: None,
                                 "ledger writer": lambda: state["reason"]})

    assert dog.healthy()
    state["reason"] = "the ledger writer did not answer within 10 s"
    assert not dog.healthy() and not dog.healthy()
    state["reason"] = None
    assert dog.healthy()

    assert logged == [("error", {"part": "ledger writer",
                                 "reason": "the ledger writer did not answer within 10 s"}),
                      ("info", {"part": "ledger writer"})]


def test_a_check_that_raises_is_an_unhealthy_part_not_a_dead_watchdog():
    def broken():
        raise RuntimeError("boom")

    dog = systemd.Watchdog(1.0, {"executor": broken})
    assert not dog.healthy()
    assert "RuntimeError: boom" in dog.failing["executor"]
