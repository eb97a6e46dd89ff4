"""systemd readiness and watchdog, across oslo.service's fork.

The threading backend's parent sends READY=1 as soon as it starts and drops
NOTIFY_SOCKET before forking. So the entry point moves NOTIFY_SOCKET to
IMAGESYNC_NOTIFY_SOCKET before launching (the parent's early READY goes nowhere)
and the child, once really ready, notifies through it (the unit says
NotifyAccess=all). No-ops when not under systemd.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping, MutableMapping

import structlog

log = structlog.get_logger("imagesync.systemd")
HANDED = "IMAGESYNC_NOTIFY_SOCKET"


def hand_over(environ: MutableMapping[str, str] = os.environ) -> None:
    if "NOTIFY_SOCKET" in environ:
        environ[HANDED] = environ.pop("NOTIFY_SOCKET")


def notify(state: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    path = environ.get(HANDED) or environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval(environ: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Watchdog:
    """Pings WATCHDOG=1 only while every part of the daemon says it is healthy.

    `checks` maps a part's name to a callable that returns None when the part is fine,
    else why not. A part that turns unhealthy is logged once, with the reason, and
    WATCHDOG=1 is withheld until it recovers: systemd then kills and restarts the
    service after WatchdogSec (Result=watchdog), and the log says which part hung.
    """

    def __init__(self, interval: float, checks: Mapping[str, Callable[[], str | None]]):
        self.interval, self.checks = interval, dict(checks)
        self.stopping = threading.Event()
        self.failing: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, name="imagesync-watchdog", daemon=True)

    def healthy(self) -> bool:
        failing = {}
        for name, check in self.checks.items():
            try:
                reason = check()
            except Exception as exc:  # a broken check is an unhealthy part, not a dead watchdog
                reason = f"health check failed: {type(exc).__name__}: {exc}"
            if reason:
                failing[name] = reason
        for name, reason in failing.items():
            if name not in self.failing:
                log.error("part of the daemon is not healthy; withholding WATCHDOG=1",
                          part=name, reason=reason)
        for name in self.failing.keys() - failing.keys():
            log.info("part of the daemon is healthy again", part=name)
        self.failing = failing
        return not failing

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            if self.healthy():
                notify("WATCHDOG=1")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
