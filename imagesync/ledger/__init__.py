"""The SQLite ledger: every image imagesync looked at and every (image, store) copy.

The only package that speaks SQL. `schema`: the file, opened for writing or read-only.
`writer`: the daemon's `Ledger`, one writer thread with group commits; `upkeep`: when it
prunes and what it says at its size cap. `ops`: what the writer records (notifications,
visits, outcomes), with `claims` (which copies go next), `prune` (what it forgets) and
`requests` (the CLI's requests, the last good policy) mixed in; `read`: the CLI's and the
metrics' queries. Everything callers use is importable from `imagesync.ledger`.
"""

from __future__ import annotations

from imagesync.ledger.claims import SPLIT_AFTER
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
                                   connect,
                                   migrations,
                                   open_readonly,
                                   usage,
)
from imagesync.ledger.writer import Ledger

__all__ = [
    "RETRY", "RETRY_CAP", "RETRY_NOW", "SCHEMA", "SPLIT_AFTER", "SYNC", "Ledger", "LedgerError",
    "LedgerFull", "Ops", "Retention", "Usage", "connect", "count_copies",
    "count_copies_by_store", "find_image_ids", "migrations", "open_readonly", "read_copies",
    "read_copy_states", "read_daemon", "read_image", "read_policy", "read_request",
    "read_store_counts", "usage",
]
