"""What the CLI says about the ledger and the policy: rows, records and lines of text.

Builds the rows of `status`, `plan` and `explain` from the ledger's read side and from
Glance data the CLI fetched; imagesync.output prints them. No SQL, no Glance calls, no
clock of its own (`now` is passed in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from imagesync import planner
from imagesync.ledger.read import HELD, shown_state
from imagesync.output import Column, ago, duration, iso, records, size

# -- status: stores, copies, one image, the daemon ----------------------------------------


def _next_try(value: float | None, row: dict, now: float) -> str:
    if row.get("state") not in ("pending", "retrying"):
        return ""
    if value is None:
        return "now"
    return "overdue" if value <= now else f"in {duration(value - now)}"


STORE_COLUMNS = (
    Column("store"), Column("done", "int"), Column("pending", "int"),
    Column("in_flight", "int"), Column("retrying", "int"), Column("failed", "int"),
    Column("cancelled", "int"), Column("oldest_pending", "time"),
)

COPY_COLUMNS = (
    Column("image_id"), Column("name"), Column("project"), Column("store"), Column("state"),
    Column("attempts", "int"), Column("error_kind"), Column("http_status", "int"),
    Column("error_message", width=70), Column("next_try", "time", human=_next_try),
    Column("rules", "list"), Column("updated", "time", default=False),
    Column("started", "time", default=False), Column("finished", "time", default=False),
    Column("bytes", "bytes", default=False),
)

# The view of one image: its copies without the image's own id, name and project.
IMAGE_COPY_COLUMNS = tuple(
    dataclasses.replace(c, default=False) if c.name in ("image_id", "name", "project") else c
    for c in COPY_COLUMNS)


def store_row(counts: dict) -> dict:
    return {**counts, "oldest_pending": counts.get("oldest_pending_at")}


def copy_row(copy: dict) -> dict:
    """A ledger copy row (joined with its image's name and owner) in column names."""
    return {
        "image_id": copy["image_id"], "name": copy.get("name"), "project": copy.get("owner"),
        "store": copy["store"], "state": shown_state(copy["state"], copy["error_kind"]),
        "attempts": copy["attempts"],
        "error_kind": copy["error_kind"], "http_status": copy["error_status"],
        "error_message": copy["error_message"], "next_try": copy["next_attempt_at"],
        "rules": [r for r in (copy["rules"] or "").split(",") if r],
        "updated": copy["updated_at"], "started": copy["started_at"],
        "finished": copy["finished_at"], "bytes": copy["bytes"],
    }


def daemon_record(daemon: dict | None, running: bool | None) -> dict | None:
    if daemon is None:
        return None
    return {"pid": daemon["pid"], "running": running, "started_at": iso(daemon["started_at"]),
            "last_event_at": iso(daemon["last_event_at"]),
            "events_total": daemon["events_total"],
            "last_reconcile_at": iso(daemon["last_reconcile_at"]),
            "reconcile_seconds": daemon["reconcile_seconds"]}


def daemon_text(daemon: dict | None, running: bool | None, now: float) -> str:
    """One line: is the daemon up, when did it last hear from Glance and last reconcile."""
    if daemon is None:
        return "daemon: has never run with this ledger"
    pid, started = daemon["pid"], ago(daemon["started_at"], now)
    if running is False:
        state = f"not running (no imagesync process {pid}; it started {started})"
    else:
        state = f"running (pid {pid}, started {started})" if pid else "started"
    if daemon["last_event_at"] is None:
        heard = "no notification received yet (imagesync doctor checks why)"
    else:
        heard = (f"last notification {ago(daemon['last_event_at'], now)} "
                 f"({daemon['events_total']} in all)")
    if daemon["last_reconcile_at"] is None:
        swept = "no reconcile pass yet"
    else:
        took = daemon["reconcile_seconds"]
        swept = f"last reconcile {ago(daemon['last_reconcile_at'], now)}" + (
            f" (took {took:.1f} s)" if took is not None else "")
    return f"daemon: {state}; {heard}; {swept}"


def _members(found: dict | None) -> dict[str, tuple[str, float | None]]:
    """coordination.members()'s answer as member id -> (role, since), sorted by id."""
    out = {}
    for member, caps in sorted((found or {}).items()):
        caps = caps if isinstance(caps, dict) else {}
        since = caps.get("since")
        out[member] = (str(caps.get("role") or "unknown"),
                       float(since) if isinstance(since, (int, float)) else None)
    return out


def _active(members: dict[str, tuple[str, float | None]]) -> str | None:
    """The active member; should two say so for a moment (a lost claim not yet published),
    the one that became active last."""
    active = sorted((since or 0.0, m) for m, (role, since) in members.items()
                    if role == "active")
    return active[-1][1] if active else None


def coordination_record(backend: str, member: str, found: dict | None,
                        error: str | None) -> dict:
    """`status -f json`'s "coordination": who is active since when, and this node's role.

    `backend` is the URL already redacted; `found` is what coordination.members() answered
    (member id -> {"role", "since"}), None when the backend could not be asked (`error`)."""
    members = _members(found)
    active = _active(members)
    return {"backend": backend, "member": member,
            "role": members[member][0] if member in members else None,
            "active_member": active, "active_since": iso(members[active][1]) if active else None,
            "members": None if found is None else
            {m: {"role": role, "since": iso(since)} for m, (role, since) in members.items()},
            "error": error}


def coordination_lines(backend: str, member: str, found: dict | None, error: str | None,
                       now: float) -> list[str]:
    """Above `status`'s store table: who is active and this node's role, and, on any node but
    the active one, that its ledger is the last known view (written only while active)."""
    if found is None:
        return [f"coordination: cannot reach {backend} ({error}); this node's role is "
                "unknown: the ledger below may be behind the active daemon's"]
    members = _members(found)
    active = _active(members)

    def this(m: str) -> str:
        return m + (" (this node)" if m == member else "")

    def named(role: str) -> str:
        return f"{role} " + ", ".join(this(m) for m, (r, _) in members.items() if r == role)

    if active:
        since = members[active][1]
        head = f"active {this(active)}" + (f" since {iso(since)} ({ago(since, now)})"
                                           if since is not None else "")
    else:
        head = "no member is active"
    parts = [head]
    also = [this(m) for m, (r, _) in members.items() if r == "active" and m != active]
    if also:   # a claim lost a moment ago, until its holder publishes standby
        parts.append(f"also saying active: {', '.join(also)}")
    parts += [named(r) for r in sorted({r for r, _ in members.values()} - {"active"},
                                       key=lambda r: (r != "standby", r))]
    if member not in members:
        parts.append(f"this node ({member}) is not a member: its daemon is stopped or cannot "
                     "reach the backend")
    lines = ["coordination: " + "; ".join(parts)]
    if member != active:
        there = (f"{active} is active: imagesync status there shows the current view"
                 if active else "no member is active now")
        lines.append(f"last known: this node's ledger, written only while its daemon is "
                     f"active ({there})")
    return lines


def _lock(image: dict) -> dict | None:
    if not image.get("lock_task"):
        return None
    return {"task": image["lock_task"], "task_status": image["lock_task_status"],
            "seen_at": iso(image["lock_seen_at"]),
            "task_updated_at": iso(image["lock_task_updated_at"]),
            "stale": bool(image["lock_stale"])}


def image_record(image: dict) -> dict:
    """One ledger image row for JSON: what Glance last showed and what the daemon waits on."""
    return {
        "id": image["id"], "name": image["name"], "project": image["owner"],
        "status": image["status"], "visibility": image["visibility"],
        "disk_format": image["disk_format"], "size": image["size"],
        "stores": [s for s in (image["stores"] or "").split(",") if s],
        "deleted": bool(image["deleted"]), "seen_at": iso(image["seen_at"]),
        "waiting": image["waiting"], "lock": _lock(image),
        "upload_error": image["upload_error"], "upload_error_at": iso(image["upload_error_at"]),
    }


def image_lines(image: dict, now: float) -> list[str]:
    """The head of `imagesync status IMAGE`: the image, what it waits on, its lock's age."""
    name = f' "{image["name"]}"' if image["name"] else " (no name)"
    lines = [f"image:   {image['id']}{name}"]
    seen = f" (as of {ago(image['seen_at'], now)})" if image["seen_at"] else ""
    if image["deleted"]:
        lines.append(f"glance:  {image['status'] or 'deleted'}, gone{seen}")
    elif image["status"]:
        facts = [image["status"], image["disk_format"] or "", size(image["size"]),
                 f"project {image['owner']}" if image["owner"] else "",
                 f"in {image['stores'].replace(',', ', ')}" if image["stores"] else "in no store"]
        lines.append("glance:  " + ", ".join(f for f in facts if f) + seen)
    else:
        lines.append("glance:  not read yet (the daemon only heard of it)")
    if image["waiting"]:
        lines.append(f"waiting: {image['waiting']}{seen}")
    if image["lock_task"]:
        lock = f"lock:    task {image['lock_task']}"
        if image["lock_task_status"]:
            lock += f" ({image['lock_task_status']})"
        if image["lock_seen_at"]:
            lock += f", held since at least {ago(image['lock_seen_at'], now)}"
        if image["lock_task_updated_at"]:
            lock += f", task last updated {ago(image['lock_task_updated_at'], now)}"
        if image["lock_stale"]:
            lock += "; stale" if "stale" in (image["waiting"] or "") else \
                "; stale: Glance preempts it on the next import"
        lines.append(lock)
    if image["upload_error"]:
        lines.append(f"glance said: {image['upload_error']} "
                     f"({ago(image['upload_error_at'], now)})")
    return lines


# -- plan and explain: the policy against Glance's images ---------------------------------

PLAN_COLUMNS = (
    Column("image_id"), Column("name"), Column("project", default=False), Column("store"),
    Column("action"), Column("bytes", "bytes"), Column("rules", "list"), Column("ledger"),
    Column("reason", width=80),
)

RULE_COLUMNS = (Column("rule"), Column("deny", "bool"), Column("matched", "bool"),
                Column("stores", "list"), Column("reason"))


PLAN_ACTIONS = {
    "copy": "the daemon copies it (now, or after a retry's backoff)",
    "importing": "another import is copying it there now",
    "held": "it failed: the daemon does not copy it again until `imagesync retry`; or the "
            "owner's quota has no room for it: it goes when there is",
    "skip": "a useless copy: read-only store, or non-raw image to cinder/rbd",
}
HELD_REASON = "failed: not copied again until `imagesync retry`"


QUOTA_HELD_REASON = ("the owner's quota has no room for it (Owners' quota in the README); "
                     "`imagesync explain IMAGE` shows the numbers")


def _wanted_action(store: str, busy: frozenset, ledger_state: str | None) -> str:
    if store in busy:
        return "importing"
    return "held" if ledger_state in (planner.FAILED, HELD) else "copy"


def plan_rows(image, stores, policy, ledger_states: dict, now: float | None = None) -> list[dict]:
    """What the daemon would do for one image now: a row per store it lacks.

    action (PLAN_ACTIONS): copy (bytes = the image's size), importing (another import is
    copying it there now), held (the ledger says failed: nothing happens until `imagesync
    retry`), or skip (a useless copy: read-only store, non-raw image to cinder/rbd).
    """
    if image.status != "active":
        return []
    desired, skipped = planner.targets(policy, image, stores, now=now)
    busy = image.importing_to if image.import_task else frozenset()
    rows = []
    base = {"image_id": image.id, "name": image.name, "project": image.owner}
    for store, rules in sorted(desired.items()):
        if store not in image.stores:
            state = ledger_states.get((image.id, store))
            action = _wanted_action(store, busy, state)
            rows.append({**base, "store": store, "action": action,
                         "bytes": image.size if action == "copy" else None, "rules": rules,
                         "ledger": state,
                         "reason": None if action != "held" else
                         QUOTA_HELD_REASON if state == HELD else HELD_REASON})
    for store, (rules, reason) in sorted(skipped.items()):
        if store not in image.stores:
            rows.append({**base, "store": store, "action": "skip", "bytes": None,
                         "rules": rules, "ledger": ledger_states.get((image.id, store)),
                         "reason": reason})
    return rows


def plan_totals(rows: Sequence[dict], checked: int, inactive: int) -> dict:
    copies = [r for r in rows if r["action"] == "copy"]
    per_store: dict[str, int] = {}
    for r in copies:
        per_store[r["store"]] = per_store.get(r["store"], 0) + (r["bytes"] or 0)
    return {"images_checked": checked, "images_not_active": inactive,
            "copies": len(copies), "images": len({r["image_id"] for r in copies}),
            "bytes": sum(per_store.values()), "bytes_per_store": dict(sorted(per_store.items())),
            "skipped": sum(r["action"] == "skip" for r in rows),
            "importing": sum(r["action"] == "importing" for r in rows),
            "held": sum(r["action"] == "held" for r in rows)}


def plan_text(t: dict) -> str:
    if t["copies"]:
        stores = ", ".join(f"{s} {size(b)}" for s, b in t["bytes_per_store"].items())
        head = (f"would copy {t['copies']} cop{'y' if t['copies'] == 1 else 'ies'} of "
                f"{t['images']} image(s): {size(t['bytes'])} in total ({stores})")
    elif t["held"] or t["importing"]:
        head = "nothing to copy now"
    else:
        head = "nothing to copy: every image is where the policy wants it"
    extra = [f"{t['images_checked']} image(s) checked"]
    if t["images_not_active"]:
        extra.append(f"{t['images_not_active']} not active (only active images are copied)")
    if t["importing"]:
        extra.append(f"{t['importing']} copy(ies) being imported now")
    if t["held"]:
        extra.append(f"{t['held']} failed copy(ies) held until `imagesync retry`")
    if t["skipped"]:
        extra.append(f"{t['skipped']} useless copy(ies) skipped (see reason)")
    return head + "; " + "; ".join(extra)


def rule_rows(verdicts) -> list[dict]:
    """A row per rule; a deny rule's stores are those it takes away."""
    return [{"rule": v.rule, "deny": v.deny, "matched": v.matched, "stores": sorted(v.stores),
             "reason": v.reason} for v in verdicts]


def glance_image_record(image) -> dict:
    return {"id": image.id, "name": image.name, "project": image.owner,
            "status": image.status, "visibility": image.visibility,
            "disk_format": image.disk_format, "size": image.size, "tags": sorted(image.tags),
            "stores": sorted(image.stores), "import_task": image.import_task,
            "importing_to": sorted(image.importing_to)}


def glance_image_line(image) -> str:
    name = f' "{image.name}"' if image.name else " (no name)"
    facts = [image.status, image.disk_format or "", size(image.size),
             f"project {image.owner}" if image.owner else "", f"visibility {image.visibility}",
             f"tags {', '.join(sorted(image.tags))}" if image.tags else ""]
    return f"image:   {image.id}{name}: " + ", ".join(f for f in facts if f)


def store_rules(wanted: dict) -> str:
    """{store: rules} as "edge (rule-a), slow (rule-a, rule-b)"."""
    return ", ".join(f"{s} ({', '.join(r)})" for s, r in sorted(wanted.items())) or "none"


def ledger_copies_text(copies: Sequence[dict], now: float) -> str:
    """Copy rows (as copy_row gives them) in one line: "edge retrying (1 attempt(s); ...)"."""
    parts = []
    for c in copies:
        text = f"{c['store']} {c['state']}"
        if c["state"] in ("pending", "retrying", "failed", "in_flight"):
            bits = [f"{c['attempts']} attempt(s)"]
            nxt = _next_try(c["next_try"], c, now)
            if nxt:
                bits.append(f"next try {nxt}")
            if c["error_kind"]:
                bits.append(f"{c['error_kind']}: {c['error_message']}")
            text += f" ({'; '.join(bits)})"
        parts.append(text)
    return "; ".join(parts)


def owner_quota_text(state: dict) -> str:
    """explain's line on the owner's quota (cli._owner_quota's dict)."""
    if not state["checked"]:
        return "owner quota: not checked ([quota] check_owner_quota = false)"
    if state.get("error"):
        return f"owner quota: unknown ({state['error']}): copies wait until it can be read"
    limit, owner = state.get("limit_bytes"), state["owner"]
    source = {"keystone": "image_size_total, Keystone unified limits",
              "user_storage_quota": "[quota] user_storage_quota"}.get(state.get("source", ""))
    if limit is None:
        return f"owner quota: project {owner} has no limit" + (f" ({source})" if source else
                                                             " (Glance enforces none)")
    ceiling = int(limit * (1 - state["headroom_percent"] / 100))
    return (f"owner quota: project {owner} uses {size(state['used_bytes'])} of "
            f"{size(limit)} ({source}); imagesync copies while that stays within "
            f"{size(ceiling)} ({state['headroom_percent']:g}% headroom)")


def explain_lines(image, desired: dict, skipped: dict, row: dict | None,
                  copies: Sequence[dict], note: str | None, now: float) -> list[str]:
    """Below explain's rule table: desired against current stores, then the ledger's view."""
    lines = [f"desired: {store_rules(desired)}" + ("" if desired else " (no rule matches)")]
    lines += [f"skipped: {store} ({', '.join(rules)}): {why}"
              for store, (rules, why) in sorted(skipped.items())]
    lines.append(f"current: {', '.join(sorted(image.stores)) or 'none'}")
    lines.append(f"missing: {', '.join(sorted(set(desired) - image.stores)) or 'none'}")
    lines.append(f"ledger:  {note or ledger_copies_text(copies, now) or 'no copies recorded'}")
    if row and row["waiting"]:
        lines.append(f"waiting: {row['waiting']}")
    return lines


def explain_record(image, rules: list[dict], desired: dict, skipped: dict, row: dict | None,
                   copies: Sequence[dict], note: str | None) -> dict:
    """explain as JSON: the rule table (already cut to the -c columns) and everything else."""
    return {
        "image": glance_image_record(image), "rules": rules,
        "desired": {s: list(r) for s, r in sorted(desired.items())},
        "skipped": {s: {"rules": list(r), "reason": why}
                    for s, (r, why) in sorted(skipped.items())},
        "current": sorted(image.stores), "missing": sorted(set(desired) - image.stores),
        "ledger": {"image": image_record(row) if row else None,
                   "copies": records(IMAGE_COPY_COLUMNS, copies), "note": note},
    }
