"""The Glance adapter, the only openstacksdk user: Glance's v2 API as imagesync's plain data,
each request rate-limited and sent once (keystoneauth retries only a 401, once, with a new
token), and every kind of non-answer told apart. Never reads `locations`; decides nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as sdk_exc

from imagesync.model import Image, epoch
from imagesync.planner import StoreInfo

COPY_IMAGE = "copy-image"
STORE_READS = 4   # reads of the store list per refresh at most (API nodes may differ)
_TAG = re.compile(r"<[^>]*>")


class GlanceError(Exception):
    """Glance answered with an error, or did not answer (status None)."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after   # seconds, from a Retry-After header


class GlanceUnavailable(GlanceError):
    """No usable answer: connection refused, timeout, or a 5xx.

    `maybe_sent`: the request may have reached Glance (the connection dropped or timed out
    after it was sent); False when no connection was made, or for a 5xx."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None,
                 maybe_sent: bool = False):
        super().__init__(status, message, retry_after)
        self.maybe_sent = maybe_sent


class KeystoneUnavailable(GlanceUnavailable):
    """No token: Keystone did not answer (or answered 5xx). Glance was not asked."""


class GlanceMisconfigured(GlanceUnavailable):
    """The client cannot be set up (clouds.yaml missing, no such cloud, bad auth type):
    retried like an outage, so that fixing the file and reloading is enough."""


class CredentialsRejected(GlanceError):
    """Keystone refused imagesync's credentials, or Glance answered 401 (keystoneauth had
    already re-authenticated once and sent the request again, when its plugin can)."""


class RateLimited(GlanceError):
    """429: a load balancer (HAProxy) in front of Glance limits the request rate."""


class RateLimiter:
    """Token bucket: at most `rate` requests per second, bursts of `burst`."""

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic,
                 sleep=time.sleep):
        self.rate, self.burst = rate, burst or max(rate, 1.0)
        self.tokens, self.clock, self.sleep = self.burst, clock, sleep
        self.last = clock()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= 1
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            self.sleep(wait)


def _message(resp) -> str:
    """The human part of a Glance error page (HTML or JSON), shortened."""
    text = (resp.text or "").strip()
    if "</h1>" in text:   # webob's page (Glance), or a load balancer's (HAProxy)
        text = _TAG.sub(" ", text.split("</h1>", 1)[1].split("<br", 1)[0])
    return " ".join(text.split())[:300] or resp.reason or ""


def _retry_after(resp) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None without one."""
    value = (resp.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)  # noqa: UP017
    return max(0.0, when.timestamp() - time.time())


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _never_connected(exc: BaseException) -> bool:
    """Did the request fail before a connection was made (so Glance never saw it)?"""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if type(cause).__name__ in ("NewConnectionError", "ConnectTimeoutError",
                                    "ConnectTimeout", "ConnectionRefusedError"):
            if type(cause).__module__.startswith(("urllib3", "requests", "builtins")):
                return True
        nested = [a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(cause, "reason", None)
        cause = cause.__cause__ or cause.__context__ or \
            (reason if isinstance(reason, BaseException) else None) or \
            (nested[0] if nested else None)
    return False


def _tls_problem(exc: BaseException, what: str) -> GlanceMisconfigured:
    """A TLS failure is a configuration problem (the CA file), said as such, not an outage."""
    if isinstance(exc, ks_exc.SSLError):
        why = "cannot verify its TLS certificate"
    else:   # requests raises a bare OSError when the CA file is missing
        why = "cannot read the CA file"
    return GlanceMisconfigured(None, f"{what}: {why}: check `cacert` in clouds.yaml "
                                     f"({_first_line(exc)})")


class Glance:
    """imagesync's view of one Glance endpoint."""

    def __init__(self, conn=None, rate: float = 20.0, stores_ttl: float = 300.0,
                 timeout: float = 60.0, clock=time.monotonic, connector=None):
        self._conn, self._connector, self._timeout = None, connector, timeout
        self._proxy = None
        if conn is not None:
            self._use(conn)
        self.limiter = RateLimiter(rate, clock=clock)
        self.stores_ttl, self.clock = stores_ttl, clock
        self._stores: dict[str, StoreInfo] | None = None
        self._stores_at = 0.0
        self.requests = 0  # for metrics and benchmarks
        self._here = threading.local()   # requests made by the calling thread

    @classmethod
    def connect(cls, cloud: str, clouds_file: str | None = None, lazy: bool = False,
                **kw) -> Glance:
        """openstacksdk for `cloud`. Eager (the CLI): a clouds.yaml problem raises here.
        Lazy (the daemon): nothing happens until the first request, and a clouds.yaml
        problem or an unreachable Glance is then a GlanceUnavailable, retried with backoff
        like any outage, so the worker never crash-loops on it."""
        import openstack.config
        import openstack.connection

        def make():
            files = [clouds_file] if clouds_file else None
            # force_ipv4 only changes how openstacksdk picks a *server's* address; without
            # it, Connection() asks psutil.net_if_addrs() whether this host has IPv6, which
            # opens an AF_NETLINK socket that the unit's RestrictAddressFamilies= refuses.
            region = openstack.config.OpenStackConfig(config_files=files).get_one(
                cloud, force_ipv4=True)
            return openstack.connection.Connection(config=region)

        return cls(connector=make, **kw) if lazy else cls(make(), **kw)

    def _use(self, conn) -> None:
        if getattr(conn.session, "timeout", None) is None:
            conn.session.timeout = self._timeout
        self._conn = conn

    @property
    def conn(self):
        if self._conn is None:
            try:
                self._use(self._connector())
            except Exception as exc:  # openstacksdk's config errors have no common base
                raise GlanceMisconfigured(None, f"cannot set up the Glance client: "
                                                f"{_first_line(exc)}") from exc
        return self._conn

    @property
    def proxy(self):
        """openstacksdk's image proxy, made on first use: making it asks Glance for its API
        versions, which must not crash a worker that starts while Glance is down."""
        if self._proxy is None:
            try:
                proxy = self.conn.image
                proxy.request   # noqa: B018 - a service missing from the catalog raises here
                self._proxy = proxy
            except ks_exc.SSLError as exc:
                raise _tls_problem(exc, "Glance") from exc
            except ks_exc.ClientException as exc:
                raise GlanceUnavailable(None, f"Glance unreachable: {_first_line(exc)}",
                                        maybe_sent=False) from exc
            except sdk_exc.SDKException as exc:   # no image endpoint for interface/region
                if self._connector is not None:
                    self._conn = None   # the SDK keeps the disabled service: start afresh
                raise GlanceMisconfigured(None, f"no usable Glance endpoint in Keystone's "
                                                f"catalog (check interface and region_name "
                                                f"in clouds.yaml): {_first_line(exc)}") from exc
        return self._proxy

    @proxy.setter
    def proxy(self, value) -> None:
        self._proxy = value

    # -- transport

    def requests_here(self) -> int:
        """Requests to Glance the calling thread has made so far (one operation's count is
        the difference before and after it: a worker runs one operation at a time)."""
        return getattr(self._here, "count", 0)

    def _request(self, method: str, path: str, **kw):
        """Send one request (no retry of our own or keystoneauth's) and return the answer;
        raise for a non-answer: no token, no connection, 401, 429, 5xx."""
        self._authenticate()
        self.limiter.acquire()
        self.requests += 1
        self._here.count = self.requests_here() + 1
        try:
            resp = self.proxy.request(path, method, raise_exc=False, connect_retries=0,
                                      status_code_retries=0, **kw)
        except ks_exc.SSLError as exc:
            raise _tls_problem(exc, "Glance") from exc
        except ks_exc.ClientException as exc:
            raise GlanceUnavailable(None, f"Glance unreachable: {_first_line(exc)}",
                                    maybe_sent=not _never_connected(exc)) from exc
        except OSError as exc:
            raise _tls_problem(exc, "Glance") from exc
        status = resp.status_code
        if status == 401:
            raise CredentialsRejected(401, f"Glance refused imagesync's token: "
                                           f"{_message(resp)}")
        if status == 429:
            raise RateLimited(429, _message(resp), _retry_after(resp))
        if status >= 500:
            raise GlanceUnavailable(status, _message(resp), _retry_after(resp))
        return resp

    def _authenticate(self) -> None:
        """Get a token (keystoneauth reuses a valid one) before asking Glance, so that a
        Keystone that is down, or refuses the credentials, is told apart from Glance."""
        session = self.conn.session
        if getattr(session, "auth", None) is None:
            return
        try:
            session.get_auth_headers()
        except ks_exc.SSLError as exc:
            raise _tls_problem(exc, "Keystone") from exc
        except (ks_exc.ConnectionError, ks_exc.DiscoveryFailure) as exc:
            raise KeystoneUnavailable(None, f"Keystone unreachable: {_first_line(exc)}") \
                from exc
        except ks_exc.HttpError as exc:   # Keystone's HTTP status, said as such
            if (exc.http_status or 0) >= 500:
                raise KeystoneUnavailable(None, f"Keystone failed: {_first_line(exc)}") \
                    from exc
            raise CredentialsRejected(None, f"Keystone refused imagesync's credentials: "
                                            f"{_first_line(exc)}") from exc
        except ks_exc.ClientException as exc:   # no token in the answer, bad auth options
            raise CredentialsRejected(None, f"cannot authenticate with Keystone: "
                                            f"{_first_line(exc)}") from exc
        except OSError as exc:
            raise _tls_problem(exc, "Keystone") from exc

    def _json(self, path: str, ok=(200,)) -> Any:
        resp = self._request("GET", path)
        if resp.status_code not in ok:
            raise GlanceError(resp.status_code, _message(resp))
        try:
            return resp.json()
        except ValueError as exc:
            raise GlanceUnavailable(resp.status_code, f"unreadable answer from {path}") from exc

    # -- reads

    def get_image(self, image_id: str) -> Image | None:
        """The image as Glance shows it now; None when it is gone."""
        resp = self._request("GET", f"/images/{image_id}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise GlanceError(resp.status_code, _message(resp))
        return Image.from_api(resp.json())

    def stores(self, refresh: bool = False) -> dict[str, StoreInfo]:
        """Live store list, cached; types come from /detail when the credentials allow.

        Behind a load balancer each read may come from another API node, and nodes may
        differ (an edge store enabled on some only): a store any node lists is live. So a
        refresh reads again while a read adds a store, at least twice and at most
        STORE_READS times, and keeps the union."""
        if not refresh and self._stores is not None and \
                self.clock() - self._stores_at < self.stores_ttl:
            return self._stores
        stores: dict[str, StoreInfo] = {}
        for n in range(STORE_READS):
            found = self._read_stores()
            new = {k: v for k, v in found.items() if k not in stores}
            stores.update(new)
            if n >= 1 and not new:
                break
        self._stores, self._stores_at = stores, self.clock()
        return stores

    def _read_stores(self) -> dict[str, StoreInfo]:
        try:
            body = self._json("/info/stores/detail")
        except GlanceError as exc:
            if exc.status not in (403, 404):   # only "not for you" falls back to the plain list
                raise
            body = self._json("/info/stores")
        stores = {}
        for s in body.get("stores", []):
            read_only = str(s.get("read-only", s.get("read_only", ""))).lower() == "true"
            stores[s["id"]] = StoreInfo(s["id"], s.get("type"), read_only)
        return stores

    def import_methods(self) -> list[str]:
        body = self._json("/info/import")
        return list(body.get("import-methods", {}).get("value", []))

    def image_tasks(self, image_id: str) -> list[dict]:
        """Import tasks of one image (id, status, updated_at as epoch), newest first."""
        body = self._json(f"/images/{image_id}/tasks")
        tasks = [{"id": t.get("id"), "status": t.get("status"),
                  "updated_at": epoch(t.get("updated_at"))} for t in body.get("tasks", [])]
        return sorted(tasks, key=lambda t: t["updated_at"] or 0, reverse=True)

    def list_pages(self, page_size: int = 1000, hidden: bool = False,
                   owner: str | None = None) -> Iterator[list[Image]]:
        """Every image any project can see (visibility=all), or those `owner` owns, one page
        at a time; hidden images (os_hidden) only with `hidden`, and only those."""
        path = f"/images?limit={page_size}&visibility=all"
        if hidden:
            path += "&os_hidden=true"
        if owner:
            path += f"&owner={owner}"
        while path:
            body = self._json(path)
            yield [Image.from_api(i) for i in body.get("images", []) if i.get("id")]
            nxt = body.get("next")
            path = nxt[len("/v2"):] if nxt and nxt.startswith("/v2/") else nxt

    def image_schema(self) -> dict:
        """GET /v2/schemas/image: the image properties Glance knows, with the disk and
        container formats it accepts (for `policy check --glance`)."""
        body = self._json("/schemas/image")
        if not isinstance(body, dict):
            raise GlanceUnavailable(200, "unreadable image schema")
        return body

    def members(self, image_id: str) -> frozenset[str]:
        """The projects an image is shared with (members accepted or pending, not rejected)."""
        body = self._json(f"/images/{image_id}/members", ok=(200, 404))
        found = body.get("members") or [] if isinstance(body, dict) else []
        return frozenset(str(m["member_id"]) for m in found if isinstance(m, dict) and
                         m.get("member_id") and m.get("status") != "rejected")

    def usage_info(self) -> dict:
        """GET /v2/info/usage: the caller's quota usage with Keystone unified limits, {}
        without them."""
        body = self._json("/info/usage")
        return body.get("usage") or {} if isinstance(body, dict) else {}

    # -- the copy

    def copy_image(self, image_id: str, stores: list[str]) -> tuple[int, str]:
        """POST one copy-image import for all `stores`: (status, message) of Glance's answer
        (202, or a refusal that says something: 400, 403, 404, 409, 413). Raises GlanceError
        when there was no real answer (no connection or no answer: GlanceUnavailable, whose
        `maybe_sent` says whether Glance may have acted; 5xx; 401; 429)."""
        body = {"method": {"name": COPY_IMAGE}, "stores": list(stores),
                "all_stores_must_succeed": False}
        resp = self._request("POST", f"/images/{image_id}/import", json=body)
        return resp.status_code, ("" if resp.status_code == 202 else _message(resp))

    # -- reads added for the reconciler's resumable listing

    def image_page(self, marker: str | None, page_size: int = 1000,
                   hidden: bool = False) -> tuple[list[Image], bool]:
        """One page of every image (visibility=all) after the image `marker`, and whether
        Glance says more follow. A marker Glance cannot find any more gives HTTP 400."""
        path = f"/images?limit={page_size}&visibility=all"
        if hidden:
            path += "&os_hidden=true"
        if marker:
            path += f"&marker={marker}"
        body = self._json(path)
        images = [Image.from_api(i) for i in body.get("images", []) if i.get("id")]
        return images, bool(body.get("next"))


def with_members(glance, image: Image, policy) -> Image:
    """The image with `members` filled in when `policy` matches on them (shared_with) and
    the image is shared; else as it is: reading them costs a request per image."""
    if not getattr(policy, "needs_members", False) or image.visibility != "shared":
        return image
    return dataclasses.replace(image, members=glance.members(image.id))
