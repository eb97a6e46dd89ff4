"""Reliability suite: faults on the real services, with figures.

`tox -e reliability` runs it at full scale (IMAGESYNC_RELIABILITY=full) and writes
RELIABILITY.md from the figures the tests record; the default test run (CI) runs
the same tests at the reduced counts the issue allows and only prints the table.
Scenarios that break a service (broker restart, Glance outage, quotas) get a
private sandbox, so they never disturb the shared one.
"""

from __future__ import annotations

import pytest
from reliability_figures import FIGURES, FULL

import sandbox as sandbox_mod


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
        FIGURES.append((scenario, release, figure, str(value), command))

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
