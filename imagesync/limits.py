"""Reads what the owner-quota check needs: whether Glance enforces Keystone unified limits,
each owner's `image_size_total` limit from Keystone, and an owner's usage from Glance.

An adapter over the Glance client (its session, token and request discipline). Unified
limits are on when Glance's `GET /v2/info/usage` reports `image_size_total` (it answers an
empty usage otherwise). Keystone's limits are read with the credential imagesync already
has (listing limits needs no extra role) and cached for `ttl` seconds; an owner's usage is
read fresh from Glance before each copy of its images (its images, hidden ones too).
A failure to read raises a GlanceError: the copy then waits, it is never sent unchecked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from imagesync import quota
from imagesync.glance import Glance, GlanceError, KeystoneUnavailable
from imagesync.model import Image


class OwnerQuota:
    """Decides, before a copy is sent, which of its stores fit in the image owner's quota."""

    def __init__(self, glance: Glance, headroom_percent: float = 10.0,
                 user_storage_quota: int = 0, ttl: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.glance, self.headroom = glance, headroom_percent
        self.legacy = user_storage_quota
        self.ttl, self.clock = ttl, clock
        self._limits: quota.Limits | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def decide(self, owner: str | None, stores: list[str], size: int | None,
               in_flight: int) -> quota.Decision:
        """Stores to copy now and stores held for the owner's quota (GlanceError when the
        limit or the usage cannot be read)."""
        limit = self.limits().of(owner)
        if limit is None or owner is None:
            return quota.Decision(tuple(stores), (), None)
        used = quota.usage(self.owner_images(owner))
        return quota.room(stores, size, owner, used, in_flight, limit, self.headroom)

    def limits(self) -> quota.Limits:
        with self._lock:
            if self._limits is None or self.clock() - self._read_at >= self.ttl:
                self._limits = self._read_limits()
                self._read_at = self.clock()
            return self._limits

    def _read_limits(self) -> quota.Limits:
        if quota.SIZE_TOTAL in self.glance.usage_info():
            return self._keystone_limits()
        if self.legacy:
            return quota.Limits(self.legacy, {}, "user_storage_quota")
        return quota.Limits()

    def _keystone_limits(self) -> quota.Limits:
        try:
            identity = self.glance.conn.identity
            services = [s.id for s in identity.services(type="image")]
            registered = [r for r in identity.registered_limits(resource_name=quota.SIZE_TOTAL)
                          if r.service_id in services]
            projects = {lim.project_id: lim.resource_limit for lim in
                        identity.limits(resource_name=quota.SIZE_TOTAL)
                        if lim.service_id in services and lim.project_id}
        except GlanceError:
            raise
        except Exception as exc:  # noqa: BLE001 - keystoneauth and SDK errors alike
            raise KeystoneUnavailable(None, f"cannot read image_size_total limits from "
                                            f"Keystone: {str(exc).splitlines()[0][:200]}") \
                from exc
        default = registered[0].default_limit if registered else None
        return quota.Limits.from_keystone(default, projects)

    def owner_images(self, owner: str) -> list[Image]:
        """Every image `owner` owns, hidden or not, as Glance lists them now."""
        return [image for hidden in (False, True)
                for page in self.glance.list_pages(hidden=hidden, owner=owner) for image in page]
