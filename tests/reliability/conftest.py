"""Reliability suite: faults on the real services, with figures.

`tox -e reliability` runs it at full scale (IMAGESYNC_RELIABILITY=full) and writes
RELIABILITY.md from the figures the tests record; the default test run (CI) runs
the same tests at the reduced counts the issue allows and only prints the table.
Scenarios that break a service (broker restart, Glance outage, quotas) get a
private sandbox, so they never disturb the shared one.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

import sandbox as sandbox_mod

FULL = os.environ.get("IMAGESYNC_RELIABILITY") == "full"
ROOT = Path(__file__).resolve().parents[2]
_FIGURES: list[tuple[str, str, str, str]] = []


def pytest_collection_modifyitems(items):
    for item in items:
        if "/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.functional)


@pytest.fixture(scope="session")
def scale():
    """Counts for this run: the issue's full figures, or CI's bracketed ones."""
    return {"full": FULL, "kills": 20 if FULL else 5, "fuzz": 10_000 if FULL else 2_000}


@pytest.fixture(scope="session")
def figures():
    """record(scenario, figure, value, command): a row of the RELIABILITY.md table."""

    def record(scenario: str, figure: str, value, command: str) -> None:
        release = sandbox_mod.pick_glance_release().name   # what this run's sandboxes run
        if release != sandbox_mod.DEFAULT_GLANCE_RELEASE:
            command = f"{sandbox_mod.GLANCE_RELEASE_ENV}={release} {command}"
        _FIGURES.append((scenario, release, figure, str(value), command))

    return record


@pytest.fixture(scope="module")
def private_sandbox(tmp_path_factory):
    """Start a sandbox of this module's own: private_sandbox(glance_options) -> Sandbox.
    Without Ceph: these stories break Glance on its file stores (Ceph costs ~20 s a start)."""
    boxes = []

    def start(glance_options: dict | None = None):
        box = sandbox_mod.Sandbox(tmp_path_factory.mktemp("private-sandbox"))
        boxes.append(box)
        try:
            box.up(glance_options=glance_options, ceph=False)
        except Exception as exc:
            pytest.fail(f"a private sandbox could not start: {exc}", pytrace=False)
        return box

    yield start
    for box in boxes:
        box.down()


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
    ran = {c for *_, c in _FIGURES}
    new = _rows(_FIGURES)
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


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.write_sep("=", "reliability figures" + (" (full)" if FULL else " (CI scale)"))
    terminalreporter.write_line(_table(_rows(_FIGURES)))
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
