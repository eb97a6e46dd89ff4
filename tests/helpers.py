"""Helpers shared by the functional tests: bounded waits and image uploads."""

from __future__ import annotations

import struct
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
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
                 visibility: str = "shared", disk_format: str = "raw",
                 data: bytes | None = None, **properties):
    """Create an image as `conn`'s project and upload `size` bytes (or `data`) to `store`;
    return it active."""
    image = conn.image.create_image(
        name=name or f"test-{uuid.uuid4().hex[:8]}", disk_format=disk_format,
        container_format="bare", visibility=visibility, **properties)
    if data is None:
        data = (uuid.uuid4().bytes * (size // 16 + 1))[:size]
    resp = conn.image.put(f"/images/{image.id}/file", data=data,
                          headers={"Content-Type": "application/octet-stream",
                                   "X-Image-Meta-Store": store})
    assert resp.status_code == 204, f"upload of {image.id} to {store} gave {resp.status_code}"
    image = conn.image.get_image(image.id)
    assert image.status == "active", image.status
    return image


def qcow2(virtual_size: int = 1 << 30, size: int = 1 << 20) -> bytes:
    """A valid, empty qcow2 image (version 2 header, no backing file) of `size` bytes, which
    Glance's format inspector accepts as qcow2."""
    cluster = 1 << 16
    l1_entries = -(-virtual_size // (cluster * (cluster // 8)))
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 0, 0, 16, virtual_size, 0,
                         l1_entries, 3 * cluster, cluster, 1, 0, 0)
    return header + bytes(size - len(header))


def stores_of(conn, image_id: str) -> set[str]:
    stores = conn.image.get_image(image_id).properties.get("stores") or ""
    return {s for s in stores.split(",") if s}


def import_settled(conn, image_id: str) -> bool:
    """True when no import holds the image's lock (the copy-image flow is over)."""
    return not conn.image.get_image(image_id).properties.get("os_glance_import_task")


def connect(box, cloud: str = "sandbox"):
    """openstacksdk as a sandbox's admin, from its clouds.yaml. The tests' own client
    re-sends a request whose kept-alive connection HAProxy closed as it went out (the sandbox
    closes idle connections after 2 s without a word; imagesync survives that itself)."""
    import openstack.config
    import openstack.connection

    region = openstack.config.OpenStackConfig(
        config_files=[str(box.clouds_yaml)], load_envvars=False).get_one(
            cloud, connect_retries=2)
    return openstack.connection.Connection(config=region)


class Images:
    """The images a story made, deleted (and their staging leftovers removed) at the end."""

    def __init__(self):
        self.made: list[tuple[object, object, str]] = []   # (sandbox, conn, image id)

    def upload(self, box, conn, size: int, name: str):
        image = upload_image(conn, size, name=name)
        self.made.append((box, conn, image.id))
        return image

    def delete_all(self) -> None:
        for box, conn, image_id in self.made:
            try:
                conn.image.delete_image(image_id, ignore_missing=True)
            except Exception as exc:  # noqa: BLE001 (every image gets its chance)
                print(f"could not delete image {image_id}: {exc}", file=sys.stderr)
            # A Glance API node killed mid-copy leaves a partial file in its staging area.
            for leftover in (Path(box.dir) / "glance").glob(f"*/staging/{image_id}*"):
                leftover.unlink(missing_ok=True)


def delete_project_images(conn, project_id: str) -> None:
    """Delete every image a project owns (stories that count a project's quota usage start
    from none, whatever ran before them on a shared sandbox)."""
    for image in list(conn.image.images(owner=project_id)):
        conn.image.delete_image(image.id, ignore_missing=True)
