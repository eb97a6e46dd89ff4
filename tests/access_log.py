"""What the sandbox's Glance itself answered, read from its API nodes' uWSGI access logs.

Tests count requests at the server: `AccessLog(sandbox)` remembers where each node's log
ends, and `requests()` gives every (method, path, status) the nodes logged after that point.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path

import sandbox as sandbox_mod
from helpers import wait_for

LINE = re.compile(r"\] (GET|POST|PUT|PATCH|DELETE|HEAD) (\S+) => .*\(HTTP/1\.[01] (\d{3})\)")


class AccessLog:
    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.offsets = {node: self._path(node).stat().st_size for node in sandbox_mod.NODES}

    def _path(self, node: str) -> Path:
        return Path(self.sandbox.node_log(node))

    def requests(self, method: str | None = None, prefix: str = "",
                 node: str | None = None) -> list[tuple[str, str, int]]:
        """(method, path, status) of each request logged since this object was made, by
        every node or by `node` only.

        uWSGI writes a line after it answered: first a marker request is sent to each node
        directly and waited for, so that requests answered before this call are in the log.
        (Without a token a node answers 401; the line is what counts.)"""
        found = []
        for name in ([node] if node else sandbox_mod.NODES):
            marker = f"/v2/images/{uuid.uuid4()}"
            try:
                urllib.request.urlopen(self.sandbox.node_url(name) + marker, timeout=10)
            except OSError:
                pass  # a 401 is the point
            wait_for(lambda n=name, m=marker: m in self._text(n), timeout=10,
                     message=f"{name}'s access log")
            found += [(m, p, int(s)) for m, p, s in LINE.findall(self._text(name))
                      if p != marker]
        return [r for r in found if (method is None or r[0] == method) and r[1].startswith(prefix)]

    def _text(self, node: str) -> str:
        with self._path(node).open("rb") as f:
            f.seek(self.offsets[node])
            return f.read().decode(errors="replace")
