"""The SQLite ledger: every image imagesync looked at and every (image, store) copy.

The only package that speaks SQL. `schema`: the file as readers see it; `migrate`: the
file as its one writer opens it (migrations, WAL, the size cap). `writer`: the daemon's
`Ledger`, one writer thread with group commits; `upkeep`: when it prunes and what it says
at its size cap. `ops`: what the writer records (notifications, visits, outcomes), with
`claims` (which copies go next), `prune` (what it forgets) and `requests` (the CLI's
requests, the last good policy) mixed in; `read`: the CLI's and the metrics' queries.
Everything callers use is importable from `imagesync.ledger`, each part loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Where each name lives, imported on first use: `imagesync status` reads the ledger without
# loading the writer's side (sqlite-utils, the writer thread, the claims).
_WHERE = {
    "SPLIT_AFTER": "claims", "Ops": "ops", "Retention": "prune", "Ledger": "writer",
    "RETRY": "requests", "RETRY_NOW": "requests", "SYNC": "requests",
    "connect": "migrate", "migrations": "migrate",
    **dict.fromkeys(("RETRY_CAP", "SCHEMA", "LedgerError", "LedgerFull", "Usage",
                     "open_readonly", "usage"), "schema"),
    **dict.fromkeys(("count_copies", "count_copies_by_store", "find_image_ids", "read_copies",
                     "read_copy_states", "read_daemon", "read_image", "read_policy",
                     "read_request", "read_store_counts"), "read"),
}
__all__ = [
    "Ledger", "LedgerError", "LedgerFull", "Ops", "RETRY", "RETRY_CAP", "RETRY_NOW", "Retention",
    "SCHEMA", "SPLIT_AFTER", "SYNC", "Usage", "connect", "count_copies", "count_copies_by_store",
    "find_image_ids", "migrations", "open_readonly", "read_copies", "read_copy_states",
    "read_daemon", "read_image", "read_policy", "read_request", "read_store_counts", "usage",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:   # what type checkers and readers see; at run time, __getattr__ above
    from imagesync.ledger.claims import SPLIT_AFTER
    from imagesync.ledger.migrate import connect, migrations
    from imagesync.ledger.ops import Ops
    from imagesync.ledger.prune import Retention
    from imagesync.ledger.read import (
        count_copies,
        count_copies_by_store,
        find_image_ids,
        read_copies,
        read_copy_states,
        read_daemon,
        read_image,
        read_policy,
        read_request,
        read_store_counts,
    )
    from imagesync.ledger.requests import RETRY, RETRY_NOW, SYNC
    from imagesync.ledger.schema import (
        RETRY_CAP,
        SCHEMA,
        LedgerError,
        LedgerFull,
        Usage,
        open_readonly,
        usage,
    )
    from imagesync.ledger.writer import Ledger
