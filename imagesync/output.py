"""Output for the CLI: columns, the table / JSON / value formats, and words for numbers.

Generic: knows nothing of images or copies (imagesync.report builds the rows). The same
columns and `-c` names serve every format; tables show ages ("3 min ago") and sizes
("1.0 MiB"), JSON shows ISO times and plain numbers, `value` is for shell scripts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

FORMATS = ("table", "json", "value")


class OutputError(ValueError):
    """An output the caller cannot have (an unknown column); the message says what exists."""


# -- words for numbers and times ------------------------------------------------------------


def duration(seconds: float) -> str:
    """40 s, 75 min, 5 h, 3 d: rounded to the unit an operator reads at a glance."""
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def ago(when: float | None, now: float) -> str:
    if when is None:
        return ""
    return f"in {duration(when - now)}" if when > now + 1 else f"{duration(now - when)} ago"


def size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def iso(when: float | None) -> str | None:
    if when is None:
        return None
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)  # noqa: UP017
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


# -- columns and formats -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """One column: `kind` decides how a value shows (text, int, bytes, time, list, bool).

    `human` overrides the table text (it gets the value, the whole row and now). Columns
    with `default=False` show only when asked for with -c (JSON always has them).
    """

    name: str
    kind: str = "text"
    human: Callable[[Any, dict, float], str] | None = None
    default: bool = True
    width: int | None = None  # longest text a table shows before cutting it with "…"


def select(columns: Sequence[Column], names: Iterable[str], fmt: str) -> list[Column]:
    """The columns to print: the -c names in order, or the defaults (all of them for JSON)."""
    names = [n.strip().lower().replace("-", "_").replace(" ", "_") for n in names]
    if not names:
        return [c for c in columns if c.default or fmt == "json"]
    known = {c.name: c for c in columns}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OutputError(f"no column {', '.join(unknown)}; columns: "
                          f"{', '.join(c.name for c in columns)}")
    return [known[n] for n in names]


def json_value(column: Column, value: Any) -> Any:
    if column.kind == "time":
        return iso(value)
    if column.kind == "list":
        return list(value or ())
    if column.kind == "bool":
        return bool(value)
    return value


def text_value(column: Column, value: Any, row: dict, now: float) -> str:
    if column.human is not None:
        text = column.human(value, row, now)
    elif value is None:
        text = ""
    elif column.kind == "time":
        text = ago(value, now)
    elif column.kind == "bytes":
        text = size(value)
    elif column.kind == "list":
        text = ", ".join(value)
    elif column.kind == "bool":
        text = "yes" if value else "no"
    else:
        text = str(value)
    if column.width and len(text) > column.width:
        text = text[: column.width - 1] + "…"
    return text


def _value_field(column: Column, value: Any) -> str:
    value = json_value(column, value)
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table(columns: Sequence[Column], rows: Sequence[dict], now: float) -> str:
    """An ASCII table like the openstack client's."""
    cells = [[text_value(c, row.get(c.name), row, now) for c in columns] for row in rows]
    widths = [max([len(c.name)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(values: Sequence[str], header: bool = False) -> str:
        parts = []
        for column, value, width in zip(columns, values, widths, strict=True):
            right = column.kind in ("int", "bytes") and not header
            parts.append(f" {value.rjust(width) if right else value.ljust(width)} ")
        return "|" + "|".join(parts) + "|"

    out = [rule, line([c.name for c in columns], header=True), rule]
    out += [line(r) for r in cells]
    out.append(rule)
    return "\n".join(out)


def records(columns: Sequence[Column], rows: Sequence[dict]) -> list[dict]:
    """Rows as JSON-ready dicts holding only `columns`."""
    return [{c.name: json_value(c, row.get(c.name)) for c in columns} for row in rows]


def render(columns: Sequence[Column], rows: Sequence[dict], fmt: str, now: float) -> str:
    """Rows in one format. Callers print their own context lines around a table."""
    if fmt == "json":
        return dumps(records(columns, rows))
    if fmt == "value":
        return "\n".join(" ".join(_value_field(c, row.get(c.name)) for c in columns)
                         for row in rows)
    return table(columns, rows, now)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)
