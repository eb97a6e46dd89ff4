"""What imagesync knows about one Glance image, as plain immutable data.

Built by the glance adapter from an API response (or by tests); read by the
policy, the planner and the CLI. Pure: no I/O, no openstacksdk.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# Properties Glance manages itself; a policy may never match on them.
RESERVED_PROPERTY_PREFIX = "os_glance_"
IMPORT_TASK = "os_glance_import_task"
IMPORTING_TO = "os_glance_importing_to_stores"
FAILED_IMPORT = "os_glance_failed_import"

# Top-level keys of a Glance v2 image that are not free-form properties.
CORE_KEYS = frozenset(
    {
        "id", "name", "owner", "visibility", "status", "tags", "disk_format",
        "container_format", "size", "virtual_size", "checksum", "os_hash_algo",
        "os_hash_value", "os_hidden", "protected", "min_disk", "min_ram",
        "created_at", "updated_at", "file", "schema", "self", "direct_url",
        "locations", "stores", "properties", "deleted", "deleted_at", "is_public",
    }
)

# Glance's defaults for [image_format] disk_formats and container_formats (a deployment may
# change them: GET /v2/schemas/image has its own), and the store types its drivers report.
DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop")
CONTAINER_FORMATS = ("ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed")
STORE_TYPES = ("file", "rbd", "cinder", "swift", "s3", "http", "vmware")


def split_csv(value: Any) -> frozenset[str]:
    """Glance's comma-separated store lists ('fast,slow', '', None) as a set."""
    if not value:
        return frozenset()
    if isinstance(value, (list, tuple, set, frozenset)):
        return frozenset(str(v).strip() for v in value if str(v).strip())
    return frozenset(p.strip() for p in str(value).split(",") if p.strip())


def epoch(value: Any) -> float | None:
    """Glance's ISO 8601 time ("2026-11-30T12:00:00Z"; no zone means UTC) as epoch seconds."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)  # noqa: UP017
    return parsed.timestamp()


def _flag(value: Any) -> bool:
    """A Glance boolean: JSON true, or "true" from an API that sends it as a string."""
    return value is True or str(value).lower() == "true"


@dataclasses.dataclass(frozen=True)
class Image:
    """One image as Glance last showed it."""

    id: str
    name: str | None = None
    owner: str | None = None
    visibility: str = "shared"
    status: str = "queued"
    tags: frozenset[str] = frozenset()
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    disk_format: str | None = None
    container_format: str | None = None
    size: int | None = None
    stores: frozenset[str] = frozenset()
    hidden: bool = False
    protected: bool = False
    created_at: float | None = None  # epoch seconds
    members: frozenset[str] | None = None  # projects it is shared with; None: not read

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", frozenset(self.tags))
        object.__setattr__(self, "stores", frozenset(self.stores))
        object.__setattr__(self, "properties", MappingProxyType(dict(self.properties)))
        if self.members is not None:
            object.__setattr__(self, "members", frozenset(self.members))

    @property
    def import_task(self) -> str | None:
        """The id of the import task holding this image's lock, if any."""
        return self.properties.get(IMPORT_TASK) or None

    @property
    def importing_to(self) -> frozenset[str]:
        return split_csv(self.properties.get(IMPORTING_TO))

    @property
    def failed_import(self) -> frozenset[str]:
        return split_csv(self.properties.get(FAILED_IMPORT))

    @classmethod
    def from_api(cls, body: Mapping[str, Any]) -> Image:
        """Build from a Glance v2 image body (flat: properties are top-level keys)."""
        props: dict[str, str] = {}
        nested = body.get("properties")
        if isinstance(nested, Mapping):
            props.update({str(k): str(v) for k, v in nested.items() if v is not None})
        for key, value in body.items():
            if key not in CORE_KEYS and value is not None:
                props[str(key)] = value if isinstance(value, str) else str(value)
        size = body.get("size")
        return cls(
            id=str(body["id"]),
            name=body.get("name"),
            owner=body.get("owner"),
            visibility=body.get("visibility") or "shared",
            status=body.get("status") or "queued",
            tags=frozenset(str(t) for t in (body.get("tags") or ())),
            properties=props,
            disk_format=body.get("disk_format"),
            container_format=body.get("container_format"),
            size=int(size) if isinstance(size, (int, float)) else None,
            stores=split_csv(body.get("stores")),
            hidden=_flag(body.get("os_hidden")),
            protected=_flag(body.get("protected")),
            created_at=epoch(body.get("created_at")),
        )
