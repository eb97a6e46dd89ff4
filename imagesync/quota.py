"""Owners' image quota, the way Glance counts it, and whether one more copy fits.

Glance counts a project's image usage as size x locations over the images it owns (status
not killed, deleted or pending_delete; `_image_get_disk_usage_by_owner`), but checks the
quota of the *caller* at import time. A copy imagesync makes therefore spends the image
owner's quota and is never refused for it: imagesync must check it itself. The limit is
Keystone's `image_size_total` (MiB; the registered limit of the image service, overridden
per project) with unified limits, or Glance's legacy `user_storage_quota` (bytes, the same
for every project). Pure: the numbers come in, a decision goes out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from imagesync.model import Image

MIB = 1 << 20
SIZE_TOTAL = "image_size_total"
NOT_COUNTED = frozenset({"killed", "deleted", "pending_delete"})
_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def usage(images: Iterable[Image]) -> int:
    """Bytes an owner's images use, as Glance counts them: size x stores (one location per
    store)."""
    return sum(i.size * len(i.stores) for i in images
               if i.size and i.size > 0 and i.status not in NOT_COUNTED)


def parse_storage_quota(text: str) -> int:
    """Glance's `user_storage_quota` syntax ("0", "10737418240", "500MB", "10GB"; units are
    powers of 1024, as Glance reads them) in bytes; 0 means no quota. ValueError if bad."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a storage quota: {text!r} (bytes, or a number with B, KB, MB, "
                         "GB or TB)")
    return int(m[1]) * _UNITS[(m[2] or "").upper()]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Each owner's limit in bytes: a project's own, else the default (None: no limit)."""

    default: int | None = None
    projects: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    source: str = "none"   # "keystone" (unified limits), "user_storage_quota", "none"

    def of(self, owner: str | None) -> int | None:
        if owner is not None and owner in self.projects:
            return self.projects[owner]
        return self.default

    @classmethod
    def from_keystone(cls, registered_mib: int | None,
                      project_mib: Mapping[str, int]) -> Limits:
        """Keystone's image_size_total limits, in MiB; -1 means unlimited."""
        def size(mib: int | None) -> int | None:
            return None if mib is None or mib < 0 else mib * MIB
        return cls(size(registered_mib), {p: size(m) for p, m in project_mib.items()},
                   "keystone")


@dataclasses.dataclass(frozen=True)
class Decision:
    go: tuple[str, ...]     # stores whose copies fit
    held: tuple[str, ...]   # stores held: the owner's quota has no room for them
    reason: str | None      # why the held ones are held


def room(stores: Iterable[str], size: int | None, owner: str | None, used: int,
         in_flight: int, limit: int | None, headroom_percent: float) -> Decision:
    """Which of an image's copies (`size` bytes each) fit under the owner's limit, leaving
    `headroom_percent` of it free, given what the owner uses in Glance (`used`) and what
    copies of its images already in flight will add (`in_flight`)."""
    stores = tuple(stores)
    if limit is None or not size:
        return Decision(stores, (), None)
    ceiling = int(limit * (1 - headroom_percent / 100))
    fit = max(0, (ceiling - used - in_flight) // size)
    go, held = stores[:fit], stores[fit:]
    if not held:
        return Decision(go, (), None)
    need = used + in_flight + size * len(stores)
    reason = (f"owner quota: project {owner} uses {_mib(used + in_flight)} of its "
              f"{_mib(limit)} image_size_total; {len(held)} more cop"
              f"{'y' if len(held) == 1 else 'ies'} of {_mib(size)} would reach {_mib(need)}, "
              f"past the {headroom_percent:g}% headroom imagesync leaves")
    return Decision(go, held, reason)


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n} B"
