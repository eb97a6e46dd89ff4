"""A slow array, modelled: the sandbox's Glance writes to named stores at a set rate.

Every Glance uWSGI worker of the sandbox imports this module (uWSGI `import`). It is inert
until `Sandbox.set_store_rate("slow", 1.0)` writes the rates file that
IMAGESYNC_SANDBOX_STORE_RATES names ({"slow": MiB/s}); from then on glance_store's
filesystem and rbd drivers are handed the data of such a store no faster than its rate, so a
copy-image to it takes as long as it would on a slow array, with Glance's import lock held
all along. Uploads and copies to other stores are untouched; the file is read at each
write, so rates change without a restart. Runs inside Glance's virtualenv: stdlib and
glance_store only.
"""

from __future__ import annotations

import json
import os
import time

from glance_store._drivers import filesystem, rbd

RATES_FILE = os.environ.get("IMAGESYNC_SANDBOX_STORE_RATES", "")


def _rate(store: str | None) -> float:
    """Bytes per second for `store`, 0 for full speed."""
    try:
        with open(RATES_FILE) as f:
            return float(json.load(f).get(store or "", 0)) * (1 << 20)
    except (OSError, ValueError):
        return 0.0


class _Throttled:
    """A file-like reader that hands over at most `rate` bytes per second."""

    def __init__(self, data, rate: float):
        self.data, self.rate = data, rate
        self.started, self.handed = time.monotonic(), 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.data.read(size)
        self.handed += len(chunk)
        ahead = self.handed / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
        return chunk

    def __getattr__(self, name: str):
        return getattr(self.data, name)


def _throttle(add):
    def slow_add(self, image_id, image_file, *args, **kwargs):
        rate = _rate(getattr(self, "backend_group", None))
        return add(self, image_id, _Throttled(image_file, rate) if rate else image_file,
                   *args, **kwargs)

    return slow_add


filesystem.Store.add = _throttle(filesystem.Store.add)
rbd.Store.add = _throttle(rbd.Store.add)
