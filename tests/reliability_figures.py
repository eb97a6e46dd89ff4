"""The reliability suite's figures: recorded by its tests, printed at the end of a run, and
merged into RELIABILITY.md at full scale (`tox -e reliability`). Under pytest-xdist each
worker records its own, and the controller prints them all (tests/conftest.py)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import sandbox as sandbox_mod

FULL = os.environ.get("IMAGESYNC_RELIABILITY") == "full"
ROOT = Path(__file__).resolve().parents[1]
# (scenario, Glance release, figure, value, command)
FIGURES: list[tuple[str, str, str, str, str]] = []


def _rows(figures) -> list[str]:
    return [f"| {s} | {g} | {f} | {v} | `{c}` |" for s, g, f, v, c in figures]


def _table(rows: list[str]) -> str:
    return "\n".join(["| scenario | Glance | figure | value | reproduce with |",
                      "|---|---|---|---|---|", *rows])


def _with_release(line: str) -> str:
    """A row written before rows named their Glance release: those all ran on 33."""
    scenario, rest = line[2:].split(" | ", 1)
    return line if rest.count(" | ") >= 3 else \
        f"| {scenario} | {sandbox_mod.DEFAULT_GLANCE_RELEASE} | {rest}"


def _merged(old_text: str) -> list[str]:
    """RELIABILITY.md's rows with this run's in place of those of the tests it ran (a row's
    command names its test): a full run of one file updates that file's figures only."""
    ran = {c for *_, c in FIGURES}
    new = _rows(FIGURES)
    out: list[str] = []
    for line in old_text.splitlines():
        command = line.rsplit("`", 2)[1] if line.startswith("| ") and line.count("`") >= 2 \
            else None
        if command is None or line.startswith("| scenario |"):
            continue
        if command in ran:
            out += new   # the first row of a test that ran: this run's rows go here
            new = []
            continue
        out.append(_with_release(line))
    return out + new


def summary(terminalreporter) -> None:
    """The figures' table at the end of the run; at full scale, RELIABILITY.md too."""
    if not FIGURES:
        return
    terminalreporter.write_sep("=", "reliability figures" + (" (full)" if FULL else " (CI scale)"))
    terminalreporter.write_line(_table(_rows(FIGURES)))
    if FULL:
        path = ROOT / "RELIABILITY.md"
        rows = _merged(path.read_text() if path.exists() else "")
        path.write_text(
            "# imagesync reliability figures\n\n"
            f"Updated by `tox -e reliability` on {datetime.date.today()} "
            f"(real RabbitMQ, MariaDB and Glance on loopback; {os.cpu_count()} cores); a run of "
            "some tests replaces their rows and keeps the others.\n"
            "Every figure comes from the test named in its row; the command reruns it.\n\n"
            + _table(rows) + "\n")
        terminalreporter.write_line("written to RELIABILITY.md")
