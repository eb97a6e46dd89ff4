"""What the sandbox's Glance itself answered, read from its uWSGI access log.

Tests count requests at the server: `AccessLog(sandbox)` remembers where the log ends,
and `requests()` gives every (method, path, status) Glance logged after that point.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path

from helpers import wait_for

LINE = re.compile(r"\] (GET|POST|PUT|PATCH|DELETE|HEAD) (\S+) => .*\(HTTP/1\.[01] (\d{3})\)")


class AccessLog:
    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.path = Path(sandbox.dir) / "log" / "glance-uwsgi.log"
        self.offset = self.path.stat().st_size

    def requests(self, method: str | None = None, prefix: str = "") -> list[tuple[str, str, int]]:
        """(method, path, status) of each request logged since this object was made.

        uWSGI writes a line after it answered: first a marker request is sent and waited
        for, so that requests answered before this call are in the log."""
        marker = f"/v2/images/{uuid.uuid4()}"
        try:
            urllib.request.urlopen(self.sandbox.glance_url + marker, timeout=10)
        except OSError:
            pass  # a 404 is the point
        wait_for(lambda: marker in self._text(), timeout=10, message="Glance's access log")
        found = [(m, p, int(s)) for m, p, s in LINE.findall(self._text()) if p != marker]
        return [r for r in found if (method is None or r[0] == method) and r[1].startswith(prefix)]

    def _text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")
