"""The Glance adapter: the only module that uses openstacksdk.

Speaks Glance's v2 API through openstacksdk's session (so clouds.yaml, TLS and
auth work as operators expect) and returns imagesync's plain data. Never reads
`locations` (imagesync works with show_multiple_locations = False). Every request
passes one rate limiter. No decisions here: the planner and errors modules decide.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

from keystoneauth1 import exceptions as ks_exc

from imagesync.model import Image
from imagesync.planner import StoreInfo

COPY_IMAGE = "copy-image"


class GlanceError(Exception):
    """Glance answered with an error, or did not answer (status None)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class GlanceUnavailable(GlanceError):
    """No usable answer: connection refused, timeout, or a 5xx."""


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
    for tag in ("<br", "</h1>"):
        if tag in text and "</h1>" in text:
            text = text.split("</h1>", 1)[1].split("<br", 1)[0].strip()
            break
    return " ".join(text.split())[:300] or resp.reason or ""


def _epoch(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)  # noqa: UP017
    return parsed.timestamp()


class Glance:
    """imagesync's view of one Glance endpoint."""

    def __init__(self, conn, rate: float = 20.0, stores_ttl: float = 300.0,
                 timeout: float = 60.0, clock=time.monotonic):
        self.conn = conn
        self.proxy = conn.image
        if getattr(conn.session, "timeout", None) is None:
            conn.session.timeout = timeout
        self.limiter = RateLimiter(rate, clock=clock)
        self.stores_ttl, self.clock = stores_ttl, clock
        self._stores: dict[str, StoreInfo] | None = None
        self._stores_at = 0.0
        self.requests = 0  # for metrics and benchmarks

    @classmethod
    def connect(cls, cloud: str, clouds_file: str | None = None, **kw) -> Glance:
        import openstack.config
        import openstack.connection

        files = [clouds_file] if clouds_file else None
        # force_ipv4 only changes how openstacksdk picks a *server's* address; without it,
        # Connection() asks psutil.net_if_addrs() whether this host has IPv6, which opens an
        # AF_NETLINK socket that the systemd unit's RestrictAddressFamilies= refuses.
        region = openstack.config.OpenStackConfig(config_files=files).get_one(
            cloud, force_ipv4=True)
        return cls(openstack.connection.Connection(config=region), **kw)

    # -- transport

    def _request(self, method: str, path: str, **kw):
        self.limiter.acquire()
        self.requests += 1
        try:
            resp = self.proxy.request(path, method, raise_exc=False, **kw)
        except ks_exc.ClientException as exc:
            raise GlanceUnavailable(None, f"Glance unreachable: {type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:200]}") from exc
        if resp.status_code >= 500:
            raise GlanceUnavailable(resp.status_code, _message(resp))
        return resp

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
        """Live store list, cached; types come from /detail when the credentials allow."""
        if not refresh and self._stores is not None and \
                self.clock() - self._stores_at < self.stores_ttl:
            return self._stores
        try:
            body = self._json("/info/stores/detail")
        except GlanceError as exc:
            if isinstance(exc, GlanceUnavailable):
                raise
            body = self._json("/info/stores")
        stores = {}
        for s in body.get("stores", []):
            read_only = str(s.get("read-only", s.get("read_only", ""))).lower() == "true"
            stores[s["id"]] = StoreInfo(s["id"], s.get("type"), read_only)
        self._stores, self._stores_at = stores, self.clock()
        return stores

    def import_methods(self) -> list[str]:
        body = self._json("/info/import")
        return list(body.get("import-methods", {}).get("value", []))

    def image_tasks(self, image_id: str) -> list[dict]:
        """Import tasks of one image (id, status, updated_at as epoch), newest first."""
        body = self._json(f"/images/{image_id}/tasks")
        tasks = [{"id": t.get("id"), "status": t.get("status"),
                  "updated_at": _epoch(t.get("updated_at"))} for t in body.get("tasks", [])]
        return sorted(tasks, key=lambda t: t["updated_at"] or 0, reverse=True)

    def list_pages(self, page_size: int = 1000, hidden: bool = False) -> Iterator[list[Image]]:
        """Every image any project can see (visibility=all), one page at a time."""
        path = f"/images?limit={page_size}&visibility=all"
        if hidden:
            path += "&os_hidden=true"
        while path:
            body = self._json(path)
            yield [Image.from_api(i) for i in body.get("images", []) if i.get("id")]
            nxt = body.get("next")
            path = nxt[len("/v2"):] if nxt and nxt.startswith("/v2/") else nxt

    # -- the copy

    def copy_image(self, image_id: str, stores: list[str]) -> tuple[int | None, str]:
        """POST one copy-image import for all `stores`; (status, message), never raises."""
        body = {"method": {"name": COPY_IMAGE}, "stores": list(stores),
                "all_stores_must_succeed": False}
        try:
            resp = self._request("POST", f"/images/{image_id}/import", json=body)
        except GlanceUnavailable as exc:
            return exc.status, exc.message
        return resp.status_code, ("" if resp.status_code == 202 else _message(resp))
