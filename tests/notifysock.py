"""A stand-in for systemd's notify socket, for tests that run the daemon without systemd.

An AF_UNIX datagram socket that, like systemd's, reads each sender's pid from
SCM_CREDENTIALS, and records (time, pid, message) for the test to query.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path


class NotifySocket:
    """A stand-in for systemd's notify socket: records (time, sender pid, message)."""

    def __init__(self, path: Path, on_message=None):
        self.path, self.on_message = path, on_message
        self.messages: list[tuple[float, int | None, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except TimeoutError:
                continue
            pid = None
            for level, kind, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:12])[0]
            text = data.decode()
            if self.on_message:
                self.on_message(pid, text)
            self.messages.append((time.monotonic(), pid, text))

    def sent(self, assignment: str, pid: int | None = None) -> list[tuple[float, int | None]]:
        """(time, pid) of each message carrying `assignment` (e.g. READY=1), from `pid` if given."""
        return [(t, p) for t, p, text in list(self.messages)
                if assignment in text.splitlines() and (pid is None or p == pid)]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
