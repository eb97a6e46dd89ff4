"""A fault-injecting HTTP/1.1 reverse proxy that tests put between imagesync and the real Glance.

Its upstream is the sandbox's load balancer (HAProxy's TLS frontend, verified with the
sandbox's CA: `cafile=`) or one Glance API node over plain HTTP; the proxy itself listens
over plain HTTP on 127.0.0.1. It forwards every request, records each one at the proxy
(time, method, path, image, status, forwarded or not) and, by rules a test changes while it
runs, answers the way misbehaving deployments do: 429 (with or without Retry-After), 5xx
bursts, 401, connections dropped before or after Glance acted, stalled answers, and one API
node's 409 "store not found".

Stdlib only (PyYAML for clouds.yaml), loopback only. Usage::

    with FaultProxy(sandbox.glance_url, cafile=sandbox.cacert) as proxy:
        clouds = proxy.write_clouds_yaml(tmp_path / "clouds.yaml", sandbox.clouds_yaml)
        proxy.add(too_many_requests(retry_after=5, method="GET", image_id=image.id, times=3))
        ...  # run the daemon with {"imagesync": {"clouds_file": clouds}}
        assert proxy.image_rate(image.id) <= 10

Rules are tried in the order they were added; the first that matches and has budget left acts.
Nothing secret is ever logged or kept: a record holds no header and no body (the client's
X-Auth-Token is only passed on to the upstream).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import yaml

LOG = logging.getLogger("faultproxy")

ACTIONS = ("answer", "drop_before", "drop_after", "stall")
SOURCES = ("glance", "haproxy", "keystone")
IMAGE_PATH = re.compile(r"^/v2/(?:images|stores/[^/?#]+)/([^/?#]+)")
IMPORT_PATH = re.compile(r"^/v2/images/[^/?#]+/import$")
# Never forwarded as they came: they describe one hop, or the proxy recomputes them.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length"})
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CHUNK_LINE = 65537

# Bodies of the answers a load balancer makes itself (HAProxy's default error pages).
HAPROXY_TEXT = {
    429: "You have sent too many requests in a given amount of time.",
    500: "An internal server error occurred.",
    502: "The server returned an invalid or incomplete response.",
    503: "No server is available to handle this request.",
    504: "The server didn't respond in time.",
}
# webob's default explanations, which Glance sends when it has nothing more precise to say.
GLANCE_TEXT = {
    409: "There was a conflict when trying to complete your request.",
    500: "The server has either erred or is incapable of performing the requested operation.",
    503: "The server is currently unavailable. Please try again at a later time.",
}
# keystonemiddleware (in Glance's paste pipeline) refuses a missing, expired or revoked token
# with webob's 401, in Glance's error page shape, naming Keystone in WWW-Authenticate.
KEYSTONE_401_TEXT = ("This server could not verify that you are authorized to access the "
                     "document you requested. Either you supplied the wrong credentials (e.g., "
                     "bad password), or your browser does not understand how to supply the "
                     "credentials required.")
KEYSTONE_URI = "https://127.0.0.1/identity/v3"   # FaultProxy(keystone_url=...) sets the real one


# ---------------------------------------------------------------- rules


@dataclass(eq=False)
class Rule:
    """One fault: which requests it matches, what it does to them, and how often.

    Match (all given fields must match): `method` (exact, any case), `path` (regex searched in
    the request target, query string included), `image_id` (parsed from /v2/images/<id>... or
    /v2/stores/<store>/<id>), `store` (an import request naming that store in its body's
    "stores" or its X-Image-Meta-Store header).
    Budget: `skip` first matches pass untouched, then it acts at most `times` times (None: no
    limit), each time with `probability` (drawn from the proxy's seeded random generator).
    Actions:
      answer       answer `status` without forwarding; `retry_after` adds Retry-After: N;
                   body in the shape of `source` ("glance": webob's error page as Glance sends
                   it, by the client's Accept; "haproxy": HAProxy's error page; "keystone":
                   keystonemiddleware's 401 with WWW-Authenticate), chosen by status when
                   None; `message`, `body`, `content_type`, `headers` override; `close`
                   closes the connection after it.
      drop_before  close the client's connection with no answer; Glance never sees it.
      drop_after   forward, let Glance answer, then close with no answer (Glance acted).
      stall        forward (unless `forward_first` is False), hold the answer `seconds`,
                   then `then` = "answer" (forwarding now if not done) or "drop".
    Drops reset the connection (RST, like a keep-alive reset) when `reset`, else close it (FIN).
    `hits` counts the times it acted, `seen` the requests it matched.
    """

    action: str
    method: str | None = None
    path: str = ""
    image_id: str | None = None
    store: str | None = None
    times: int | None = None
    skip: int = 0
    probability: float = 1.0
    status: int = 503
    retry_after: int | None = None
    source: str | None = None
    message: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    seconds: float = 0.0
    then: str = "answer"
    forward_first: bool = True
    reset: bool = True
    name: str = ""
    hits: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"rule action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.then not in ("answer", "drop"):
            raise ValueError(f"rule 'then' {self.then!r} is not 'answer' or 'drop'")
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"rule source {self.source!r} is not one of {', '.join(SOURCES)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"rule probability {self.probability} is not between 0 and 1")
        if (self.times is not None and self.times < 0) or self.skip < 0 or self.seconds < 0:
            raise ValueError("rule times, skip and seconds cannot be negative")
        if not 100 <= self.status <= 599:
            raise ValueError(f"rule status {self.status} is not an HTTP status")
        try:
            self._path = re.compile(self.path)
        except re.error as exc:
            raise ValueError(f"rule path {self.path!r} is not a regular expression: {exc}") from exc
        self.method = self.method.upper() if self.method else None
        if not self.name:
            self.name = f"{self.status}" if self.action == "answer" else self.action
            if self.action == "stall":
                self.name = f"stall {self.seconds:g}s then {self.then}"

    def matches(self, method: str, target: str, image_id: str | None,
                stores: tuple[str, ...]) -> bool:
        return ((self.method is None or self.method == method)
                and (self.image_id is None or self.image_id == image_id)
                and (self.store is None or self.store in stores)
                and self._path.search(target) is not None)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


def too_many_requests(retry_after: int | None = None, **match) -> Rule:
    """429 Too Many Requests from the load balancer, not forwarded; Retry-After: N if given."""
    return Rule("answer", status=429, retry_after=retry_after, **match)


def unavailable(**match) -> Rule:
    """503 from the load balancer, not forwarded (pass times=N for a burst of N)."""
    return Rule("answer", status=503, **match)


def error(status: int, **match) -> Rule:
    """Any other error answer (500, 502, 504, ...), not forwarded."""
    return Rule("answer", status=status, **match)


def unauthorized(**match) -> Rule:
    """keystonemiddleware's 401 (expired or revoked token), not forwarded."""
    return Rule("answer", status=401, **match)


def drop_before(**match) -> Rule:
    """Close the connection without forwarding and without an answer."""
    return Rule("drop_before", **match)


def drop_after(**match) -> Rule:
    """Forward, let Glance act and answer, then close the connection without an answer."""
    return Rule("drop_after", **match)


def stall(seconds: float, then: str = "answer", **match) -> Rule:
    """Hold the answer `seconds`, then answer or drop (`then`); Glance acts first by default."""
    return Rule("stall", seconds=seconds, then=then, **match)


def store_not_found(store: str, **match) -> Rule:
    """An API node lacking `store`: a copy-image POST naming it gets Glance's 409."""
    match.setdefault("method", "POST")
    match.setdefault("path", r"/import$")
    return Rule("answer", status=409, store=store, source="glance",
                message=f"Store for identifier {store} not found", **match)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it. `status` is what the client got (None: no answer)."""

    t: float                      # the proxy's clock when the request arrived
    method: str
    path: str                     # request target, query string included
    image_id: str | None
    status: int | None
    forwarded: bool               # the request was sent to Glance
    upstream_status: int | None   # what Glance answered (None: not forwarded, or no answer)
    fault: str | None             # name of the rule that acted, None when passed through
    stores: tuple[str, ...]       # stores an import request named ("*" for all_stores)
    connection: int               # serial number of the client connection (keep-alive proof)
    finished: bool = True         # False while the proxy still holds it (forwarding, stalling)


def image_id_of(target: str) -> str | None:
    m = IMAGE_PATH.match(target)
    return m.group(1) if m else None


def import_stores(method: str, target: str, store_header: str | None, body: bytes) -> tuple:
    """The stores a copy-image (or any) import request names; () for any other request."""
    if method != "POST" or not IMPORT_PATH.match(target.split("?", 1)[0]):
        return ()
    stores = [store_header] if store_header else []
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        doc = {}
    if isinstance(doc, dict):
        if doc.get("all_stores"):
            stores.append("*")
        stores += [s for s in doc.get("stores") or [] if isinstance(s, str)]
    return tuple(stores)


def busiest_window(times: list[float], window: float) -> int:
    """Most of `times` falling in any half-open interval [t, t + window)."""
    times = sorted(times)
    best = lo = 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# ---------------------------------------------------------------- answers


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def _accept_quality(ranges: list[tuple[str, float]], offer: str) -> float:
    """webob's rule: the q of the most specific media range matching `offer`."""
    kind = offer.split("/")[0]
    best, spec = 0.0, -1
    for media, q in ranges:
        s = 2 if media == offer else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
        if s > spec:
            best, spec = q, s
    return best if spec >= 0 else 0.0


def preferred_error_type(accept: str | None) -> str:
    """The content type webob (hence Glance) picks for an error page, given Accept."""
    ranges = []
    for part in (accept or "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if not media:
            continue
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        ranges.append((media.lower(), q))
    offers = [(o, _accept_quality(ranges, o)) for o in ("text/html", "application/json")]
    offers = sorted((o for o in offers if o[1] > 0), key=lambda o: -o[1])
    return offers[0][0] if offers else "text/plain"


def glance_error(status: int, explanation: str, accept: str | None) -> tuple[str, bytes]:
    """(content type, body) of a webob error page exactly as Glance sends it."""
    phrase = HTTPStatus(status).phrase
    code = f"{status} {phrase}"
    kind = preferred_error_type(accept)
    if kind == "application/json":
        doc = {"message": f"{explanation}<br /><br />\n\n\n", "code": code, "title": phrase}
        return "application/json", json.dumps(doc).encode()
    if kind == "text/html":
        page = (f"<html>\n <head>\n  <title>{code}</title>\n </head>\n <body>\n"
                f"  <h1>{code}</h1>\n  {escape(explanation)}<br /><br />\n\n\n\n"
                " </body>\n</html>")
        return "text/html; charset=UTF-8", page.encode()
    return "text/plain; charset=UTF-8", f"{code}\n\n{explanation}\n\n   ".encode()


def fault_answer(rule: Rule, accept: str | None, keystone_uri: str = KEYSTONE_URI) -> Answer:
    status = rule.status
    phrase = HTTPStatus(status).phrase
    source = rule.source or ("keystone" if status == 401 else
                             "haproxy" if status in HAPROXY_TEXT and status != 500 else "glance")
    headers = [("Date", formatdate(usegmt=True))]
    if source == "keystone":
        ctype, body = glance_error(status, rule.message or KEYSTONE_401_TEXT, accept)
        headers.append(("WWW-Authenticate", f'Keystone uri="{keystone_uri}"'))
    elif source == "haproxy":
        text = rule.message or HAPROXY_TEXT.get(status, phrase)
        ctype = "text/html"
        body = f"<html><body><h1>{status} {phrase}</h1>\n{text}\n</body></html>\n".encode()
        headers.append(("Cache-Control", "no-cache"))
    else:
        text = rule.message or GLANCE_TEXT.get(status) or HTTPStatus(status).description
        ctype, body = glance_error(status, text, accept)
    if rule.body is not None:
        body = rule.body
    headers.append(("Content-Type", rule.content_type or ctype))
    if rule.retry_after is not None:
        headers.append(("Retry-After", str(rule.retry_after)))
    headers += list(rule.headers.items())
    return Answer(status, phrase, headers, body)


def upstream_failure(exc: BaseException) -> Answer:
    """What a load balancer answers when Glance is down (503), silent (504) or garbled (502)."""
    status = (503 if isinstance(exc, ConnectionRefusedError) else
              504 if isinstance(exc, TimeoutError) else 502)
    return fault_answer(Rule("answer", status=status, source="haproxy"), None)


# ---------------------------------------------------------------- the proxy


class FaultProxy:
    """Forward to `upstream` from http://127.0.0.1:<port>, with faults.

    `upstream` is a loopback URL: https (the load balancer; its certificate is verified with
    `cafile`, or with `ssl_context` when given) or http (one Glance API node, directly).
    Start and stop it with `with FaultProxy(url) as proxy:` (or start()/stop()). stop() ends
    every connection and thread within `stop_timeout` seconds, or raises.
    """

    def __init__(self, upstream: str, *, cafile: Path | str | None = None,
                 ssl_context: ssl.SSLContext | None = None, port: int = 0,
                 upstream_timeout: float = 60.0, idle_timeout: float = 60.0,
                 stop_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 seed: int | None = 0, keystone_url: str = KEYSTONE_URI):
        parts = urlsplit(upstream)
        if (parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK
                or not parts.port):
            raise ValueError(f"upstream {upstream!r} is not an http(s)://127.0.0.1:PORT URL")
        if parts.scheme == "http" and (cafile is not None or ssl_context is not None):
            raise ValueError(f"upstream {upstream!r} is plain http: cafile/ssl_context "
                             "make no sense for it")
        self.upstream = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "https":  # verified: a wrong CA is an error, not a quiet 502
            self.tls = ssl_context or ssl.create_default_context(
                cafile=str(cafile) if cafile is not None else None)
        self.keystone_url = keystone_url   # named in a faked 401's WWW-Authenticate
        self.upstream_timeout, self.idle_timeout = upstream_timeout, idle_timeout
        self.stop_timeout, self.clock = stop_timeout, clock
        self.random = random.Random(seed)
        self.errors: list[str] = []          # unexpected exceptions in the proxy (a bug)
        self._requested_port = port
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._records: list[Request] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    # -- life

    @property
    def port(self) -> int:
        if not self._requested_port:
            raise RuntimeError("the fault proxy was never started: it has no port yet")
        return self._requested_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Listen (again: a restart keeps the port, so clouds.yaml files stay valid)."""
        if self._server is not None:
            raise RuntimeError(f"the fault proxy on {self.url} is already started")
        self._stopping.clear()
        self._server = _Server(self, ("127.0.0.1", self._requested_port))
        self._requested_port = self._server.server_address[1]
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"faultproxy-{self.port}-serve", daemon=True)
        self._serve_thread.start()
        LOG.debug("faultproxy %s -> %s started", self.url, self.upstream)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        threads = server.end_connections()
        if self._serve_thread:
            threads.append(self._serve_thread)
        deadline = time.monotonic() + self.stop_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threads if t.is_alive()]
        if left:
            raise RuntimeError(f"fault proxy threads still running {self.stop_timeout:g}s "
                               f"after stop: {left}")
        LOG.debug("faultproxy %s stopped", self.upstream)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- rules

    def add(self, rule: Rule) -> Rule:
        """Add a rule after the others; returns it (read rule.hits later, or remove it)."""
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear_rules(self) -> None:
        with self._lock:
            self._rules = []

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def _pick(self, method: str, target: str, image_id: str | None,
              stores: tuple[str, ...]) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, target, image_id, stores):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip or rule.exhausted:
                    continue
                if rule.probability < 1.0 and self.random.random() >= rule.probability:
                    continue
                rule.hits += 1
                return rule
        return None

    # -- what it saw

    def now(self) -> float:
        """The proxy's clock, for `since=` (time.monotonic unless a clock was injected)."""
        return self.clock()

    def _record(self, request: Request) -> None:
        with self._lock:
            self._records.append(request)

    def _amend(self, request: Request, **changes) -> Request:
        new = replace(request, **changes)
        with self._lock:
            for i in range(len(self._records) - 1, -1, -1):
                if self._records[i] is request:  # gone if clear() ran meanwhile
                    self._records[i] = new
                    break
        return new

    def requests(self, method: str | None = None, path_re: str | None = None,
                 image_id: str | None = None, since: float | None = None) -> list[Request]:
        """Every request seen, by arrival, filtered by method, path regex (searched), image and
        arrival time (>= since, on the proxy's clock). Includes requests still held
        (finished False), so rates count a request from the moment it arrived."""
        pattern = re.compile(path_re) if path_re else None
        with self._lock:
            records = list(self._records)
        return [r for r in records
                if (method is None or r.method == method.upper())
                and (pattern is None or pattern.search(r.path))
                and (image_id is None or r.image_id == image_id)
                and (since is None or r.t >= since)]

    def count(self, method: str | None = None, path_re: str | None = None,
              image_id: str | None = None, since: float | None = None) -> int:
        return len(self.requests(method, path_re, image_id, since))

    def image_rate(self, image_id: str, window: float = 60.0, since: float | None = None) -> int:
        """Most requests about one image in any `window` seconds (default: per minute)."""
        return busiest_window([r.t for r in self.requests(image_id=image_id, since=since)],
                              window)

    def image_rates(self, window: float = 60.0, since: float | None = None) -> dict[str, int]:
        """image_rate of every image seen: {image id: most requests in any window}."""
        times: dict[str, list[float]] = {}
        for r in self.requests(since=since):
            if r.image_id:
                times.setdefault(r.image_id, []).append(r.t)
        return {image: busiest_window(ts, window) for image, ts in times.items()}

    def peak_rate(self, window: float = 1.0, since: float | None = None) -> int:
        """Most requests of any kind in any `window` seconds (default: per second)."""
        return busiest_window([r.t for r in self.requests(since=since)], window)

    def imports_per_image(self, since: float | None = None) -> dict[str, int]:
        """Imports Glance accepted (POST .../import forwarded and answered 202 by Glance, even
        when the proxy then dropped the answer), per image."""
        accepted = Counter(r.image_id for r in self.requests("POST", IMPORT_PATH.pattern,
                                                             since=since)
                           if r.forwarded and r.upstream_status == 202 and r.image_id)
        return dict(accepted)

    def clear(self) -> None:
        """Forget every request seen (rules and their counters stay)."""
        with self._lock:
            self._records = []

    # -- for clients

    def write_clouds_yaml(self, dest: Path | str, source: Path | str) -> Path:
        """Copy `source` (e.g. the sandbox's clouds.yaml) to `dest` (mode 0600) so that every
        cloud in it sends its Glance traffic through the proxy: each gets
        `image_endpoint_override: <proxy url>` (Glance is otherwise found in Keystone's
        catalog), and the upstream URL is replaced wherever it appears. Everything else (auth
        against the real Keystone, cacert, region, interface) is kept as it was."""
        doc = yaml.safe_load(Path(source).read_text())
        clouds = doc.get("clouds") if isinstance(doc, dict) else None
        if not isinstance(clouds, dict) or not clouds:
            raise ValueError(f"{source} has no clouds: nothing to send through the proxy")
        upstream = re.compile(re.escape(self.upstream) + r"(?![0-9])")

        def redirect(value):
            if isinstance(value, str):
                return upstream.sub(self.url, value)
            if isinstance(value, dict):
                return {k: redirect(v) for k, v in value.items()}
            if isinstance(value, list):
                return [redirect(v) for v in value]
            return value

        doc = redirect(doc)
        for name, cloud in doc["clouds"].items():
            if not isinstance(cloud, dict):
                raise ValueError(f"{source}: cloud {name!r} is not a mapping")
            cloud["image_endpoint_override"] = self.url
        text = yaml.safe_dump(doc, default_flow_style=False, sort_keys=False)
        dest = Path(dest)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds secrets
        with os.fdopen(fd, "w") as f:
            f.write(text)
        dest.chmod(0o600)  # an existing file keeps its mode through os.open
        return dest


# ---------------------------------------------------------------- server side


class _Server(ThreadingHTTPServer):
    """One thread per client connection, each tracked so that stop() can end it."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, proxy: FaultProxy, address: tuple[str, int]):
        self.proxy = proxy
        self._conn_lock = threading.Lock()
        self._open: dict[socket.socket, threading.Thread] = {}
        self._upstream: set[http.client.HTTPConnection] = set()
        self._resets: set[socket.socket] = set()
        self._serial = 0
        # The idle timeout closes a kept-alive connection nobody uses, as real servers do.
        handler = type("_Handler", (_Handler,), {"timeout": proxy.idle_timeout})
        super().__init__(address, handler)

    def next_serial(self) -> int:
        with self._conn_lock:
            self._serial += 1
            return self._serial

    def process_request(self, request, client_address) -> None:
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name=f"faultproxy-{self.server_address[1]}-conn", daemon=True)
        with self._conn_lock:
            self._open[request] = thread
        thread.start()

    def _serve_connection(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError:
            pass  # the client reset or vanished: an ordinary network event, not a bug
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._open.pop(request, None)

    def shutdown_request(self, request) -> None:
        with self._conn_lock:
            reset = request in self._resets
            self._resets.discard(request)
        if reset:
            try:  # linger 0: close() sends RST, as a reset keep-alive connection does
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def reset_on_close(self, request) -> None:
        with self._conn_lock:
            self._resets.add(request)

    def track(self, conn: http.client.HTTPConnection, on: bool) -> None:
        with self._conn_lock:
            (self._upstream.add if on else self._upstream.discard)(conn)

    def handle_error(self, request, client_address) -> None:
        import traceback

        self.proxy.errors.append(traceback.format_exc(limit=5))

    def end_connections(self) -> list[threading.Thread]:
        """Wake every handler: shut client and upstream sockets; return their threads."""
        with self._conn_lock:
            sockets = list(self._open) + [c.sock for c in self._upstream if c.sock]
            threads = list(self._open.values())
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return threads


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive towards the client, as real servers do
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall
    server: _Server

    def setup(self) -> None:
        self.serial = self.server.next_serial()
        super().setup()

    def log_message(self, *args) -> None:
        pass  # never print requests: their headers may hold tokens

    def serve(self) -> None:
        proxy = self.server.proxy
        arrived = proxy.clock()
        body = self.read_body()
        image_id = image_id_of(self.path)
        stores = import_stores(self.command, self.path, self.headers.get("X-Image-Meta-Store"),
                               body)
        rule = proxy._pick(self.command, self.path, image_id, stores)
        self.record = Request(arrived, self.command, self.path, image_id, None, False, None,
                              rule.name if rule else None, stores, self.serial, finished=False)
        proxy._record(self.record)  # counted from its arrival, even while held
        try:
            self.act(rule, body)
        finally:
            if not self.record.finished:
                self.note(finished=True)

    def note(self, **changes) -> None:
        """Update this request's record as it happens; the record is finished before the
        client can see the outcome, so a test that got an answer (or a dropped connection)
        always finds it complete."""
        self.record = self.server.proxy._amend(self.record, **changes)
        if changes.get("finished"):
            r = self.record
            LOG.debug("faultproxy %s %s -> %s%s%s", r.method, r.path,
                      r.status if r.status is not None else "no answer",
                      " (forwarded)" if r.forwarded else "", f" [{r.fault}]" if r.fault else "")

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = serve

    # -- steps

    def act(self, rule: Rule | None, body: bytes) -> None:
        if rule is None:
            self.send(self.forward(body))
        elif rule.action == "answer":
            self.send(fault_answer(rule, self.headers.get("Accept"),
                                   self.server.proxy.keystone_url), close=rule.close)
        elif rule.action == "drop_before":
            self.drop(rule.reset)
        elif rule.action == "drop_after":
            self.forward(body)
            self.drop(rule.reset)
        else:
            answer = self.forward(body) if rule.forward_first else None
            stopping = self.server.proxy._stopping.wait(rule.seconds)
            if rule.then == "drop" or stopping:
                self.drop(rule.reset)
            else:
                self.send(answer or self.forward(body))

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            size = int(self.rfile.readline(MAX_CHUNK_LINE).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(MAX_CHUNK_LINE).strip():
                    pass  # trailers
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline(MAX_CHUNK_LINE)

    def forward(self, body: bytes) -> Answer:
        """Send the request to Glance on a fresh connection; its whole answer, or a load
        balancer's error page when Glance is unreachable."""
        proxy = self.server.proxy
        if proxy.tls is not None:
            conn = http.client.HTTPSConnection(proxy.upstream_host, proxy.upstream_port,
                                               timeout=proxy.upstream_timeout,
                                               context=proxy.tls)
        else:
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=proxy.upstream_timeout)
        self.server.track(conn, True)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            self.note(forwarded=True)
            resp = conn.getresponse()
            data = resp.read()
            self.note(upstream_status=resp.status)
            keep = HOP_BY_HOP - {"content-length"} if self.command == "HEAD" else HOP_BY_HOP
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in keep]
            return Answer(resp.status, resp.reason, headers, data)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                # A test set up wrong (no or another CA), not a fault it injected.
                proxy.errors.append(f"{proxy.upstream}: TLS verification failed: "
                                    f"{exc.verify_message or exc}")
            return upstream_failure(exc)
        finally:
            conn.close()
            self.server.track(conn, False)

    def send(self, answer: Answer, close: bool = False) -> None:
        try:
            self.send_response_only(answer.status, answer.reason)
            for name, value in answer.headers:
                self.send_header(name, value)
            if not any(k.lower() == "content-length" for k, _ in answer.headers):
                self.send_header("Content-Length", str(len(answer.body)))
            if close or self.close_connection:
                self.send_header("Connection", "close")
            self.note(status=answer.status, finished=True)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)
        except OSError:
            self.close_connection = True  # the client went away: it got no answer
            if self.record.finished:
                self.note(status=None)

    def drop(self, reset: bool) -> None:
        self.close_connection = True
        if reset:
            self.server.reset_on_close(self.connection)
