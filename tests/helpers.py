"""Helpers shared by the functional tests: bounded waits and image uploads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
             message: str = "condition") -> T:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds.

    Returns the truthy value, so a test can wait for and read a result at once.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message} "
                                 f"(last value: {last!r})")
        time.sleep(interval)


def upload_image(conn, size: int, store: str = "fast", name: str | None = None,
                 visibility: str = "shared", **properties):
    """Create an image as `conn`'s project and upload `size` bytes to `store`; return it active."""
    image = conn.image.create_image(
        name=name or f"test-{uuid.uuid4().hex[:8]}", disk_format="raw", container_format="bare",
        visibility=visibility, **properties)
    data = (uuid.uuid4().bytes * (size // 16 + 1))[:size]
    resp = conn.image.put(f"/images/{image.id}/file", data=data,
                          headers={"Content-Type": "application/octet-stream",
                                   "X-Image-Meta-Store": store})
    assert resp.status_code == 204, f"upload of {image.id} to {store} gave {resp.status_code}"
    image = conn.image.get_image(image.id)
    assert image.status == "active", image.status
    return image


def stores_of(conn, image_id: str) -> set[str]:
    stores = conn.image.get_image(image_id).properties.get("stores") or ""
    return {s for s in stores.split(",") if s}


def import_settled(conn, image_id: str) -> bool:
    """True when no import holds the image's lock (the copy-image flow is over)."""
    return not conn.image.get_image(image_id).properties.get("os_glance_import_task")
