"""Stories of the operator CLI on a real ledger file, driven through click's CliRunner.

The ledger is written with the ledger's own operations (as the daemon would), then read by
the CLI through its read-only connection. Glance is faked only where the CLI asks it
(plan, explain, policy check --glance, doctor); tests/functional runs them for real.
Time is fixed: the CLI's clock is T0.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagesync import cli, doctor, output, report
from imagesync.errors import Action, Kind, Outcome
from imagesync.events import Event, EventKind
from imagesync.glance import GlanceError, GlanceUnavailable
from imagesync.ledger import Ledger, Ops, connect
from imagesync.model import IMPORT_TASK, Image
from imagesync.planner import Settings, StoreInfo
from imagesync.policy import parse_policy

T0 = 1_800_000_000.0
UTC = datetime.timezone.utc  # noqa: UP017
SETTINGS = Settings(max_attempts=3, backoff=lambda attempt: 40.0)
P1, P2 = "1" * 32, "2" * 32
UBUNTU = "0a000000-0000-4000-8000-000000000001"
CENTOS = "0b000000-0000-4000-8000-000000000002"
DEBIAN = "0c000000-0000-4000-8000-000000000003"
GONE_PID = 2 ** 22 + 12345  # above pid_max: never a live process


def image(image_id: str, name: str, owner: str = P1, stores=("fast",), lock=None,
          disk_format: str = "raw", size: int = 3 << 20, visibility: str = "shared") -> Image:
    return Image(image_id, name=name, owner=owner, status="active", stores=frozenset(stores),
                 size=size, disk_format=disk_format, visibility=visibility,
                 properties={IMPORT_TASK: lock} if lock else {})


def build_ledger(path: Path) -> None:
    """A ledger as the daemon leaves it:

    ubuntu (P1): slow done, edge retrying after a 503 (next try in 40 s);
    centos (P2): edge failed with a 403;
    debian (P1): edge pending behind another import's lock (task updated 75 min ago).
    """
    db = connect(path)
    ops = Ops(db)
    with db.conn:
        ops.daemon_started(GONE_PID, T0 - 7200)
        ubuntu = image(UBUNTU, "ubuntu", stores=("fast", "slow"))
        ops.record_visit(UBUNTU, ubuntu, {"slow": ("everywhere",),
                                          "edge": ("everywhere", "edge-too")}, {},
                         T0 - 3600, SETTINGS)
        centos = image(CENTOS, "centos", owner=P2)
        ops.record_visit(CENTOS, centos, {"edge": ("everywhere",)}, {}, T0 - 3600, SETTINGS)
        ops.claim(T0 - 100, 10, 10, 0, 0, 10)
        ops.record_outcome(UBUNTU, ["edge"], Outcome(Kind.TRANSIENT, Action.RETRY,
                                                     "HTTP 503: unavailable", 503),
                           T0, SETTINGS)
        ops.record_outcome(CENTOS, ["edge"], Outcome(Kind.FORBIDDEN, Action.BLOCK,
                                                     "copy-image needs the admin role", 403),
                           T0 - 50, SETTINGS)
        debian = image(DEBIAN, "debian", lock="task-9")
        ops.record_visit(DEBIAN, debian, {"edge": ("everywhere",)}, {}, T0 - 80 * 60, SETTINGS)
        ops.record_lock_task(DEBIAN, "task-9", "processing", T0 - 75 * 60)
        ops.record_visit(DEBIAN, debian, {"edge": ("everywhere",)}, {}, T0 - 60, SETTINGS)
        stamp = datetime.datetime.fromtimestamp(T0 - 40, UTC)
        ops.note_events([Event(EventKind.CHANGED, UBUNTU, "image.update", stamp, None,
                               status="active")] * 3, T0 - 30)
        ops.reconcile_finish(T0 - 700, T0 - 600, 12.5)
    db.close()


@pytest.fixture
def conf_file(tmp_path) -> Path:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: everywhere\n    match: {}\n"
                      "    stores: [slow, edge]\n")
    path = tmp_path / "imagesync.conf"
    path.write_text(f"[imagesync]\nledger_path = {tmp_path / 'state' / 'ledger.sqlite'}\n"
                    f"policy_file = {policy}\ncloud = test\n")
    return path


@pytest.fixture
def ledger_path(tmp_path, conf_file) -> Path:
    path = tmp_path / "state" / "ledger.sqlite"
    build_ledger(path)
    return path


@pytest.fixture
def run(conf_file, monkeypatch):
    """Run `imagesync --config-file CONF ARGS...` in-process at time T0."""
    monkeypatch.setattr(cli, "clock", lambda: T0)

    def invoke(*args: str):
        return CliRunner().invoke(cli.main, ["--config-file", str(conf_file), *args])

    return invoke


def rows(path: Path, sql: str, *args) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


# -- status -------------------------------------------------------------------------------


def test_status_counts_copies_per_store_and_says_when_the_daemon_last_heard_from_glance(
        run, ledger_path):
    result = run("status")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split("|")[1:-1] == [
        " store ", " done ", " pending ", " in_flight ", " retrying ", " failed ",
        " cancelled ", " oldest_pending "]
    edge = next(line for line in lines if line.startswith("| edge"))
    assert [c.strip() for c in edge.split("|")[1:-1]] == [
        "edge", "0", "1", "0", "1", "1", "0", "80 min ago"]
    slow = next(line for line in lines if line.startswith("| slow"))
    assert [c.strip() for c in slow.split("|")[2:4]] == ["1", "0"]
    assert lines[-1] == (f"daemon: not running (no imagesync process {GONE_PID}; it started "
                         "2 h ago); last notification 30 s ago (3 in all); "
                         "last reconcile 10 min ago (took 12.5 s)")


def test_oldest_pending_counts_from_when_the_copy_became_pending_not_from_a_handed_back_claim(
        run, conf_file, tmp_path):
    path = tmp_path / "state" / "ledger.sqlite"
    db = connect(path)
    ops = Ops(db)
    with db.conn:
        ops.record_visit(UBUNTU, image(UBUNTU, "ubuntu"), {"slow": ("r",)}, {}, T0 - 3600,
                         SETTINGS)
        assert ops.claim(T0 - 100, 10, 10, 0, 0, 10)  # taken for a POST...
        ops.release_claim(UBUNTU, ["slow"], T0 - 50)  # ...that was never sent: pending again
    db.close()

    stores = json.loads(run("status", "-f", "json").output)["stores"]

    assert stores == [{**stores[0], "store": "slow", "pending": 1,
                       "oldest_pending": output.iso(T0 - 3600)}]


def test_status_as_json_has_the_daemon_and_every_store_with_iso_times(run, ledger_path):
    result = run("status", "-f", "json")

    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["daemon"]["running"] is False
    assert body["daemon"]["events_total"] == 3
    assert body["daemon"]["last_event_at"] == "2027-01-15T07:59:30Z"  # T0 - 30
    assert [s["store"] for s in body["stores"]] == ["edge", "slow"]
    assert body["stores"][0] == {"store": "edge", "done": 0, "pending": 1, "in_flight": 0,
                                 "retrying": 1, "failed": 1, "cancelled": 0,
                                 "oldest_pending": output.iso(T0 - 80 * 60)}


def test_status_value_format_with_columns_prints_only_those_fields(run, ledger_path):
    result = run("status", "-f", "value", "-c", "store", "-c", "failed", "-c", "done")

    assert result.exit_code == 0, result.output
    assert result.output == "edge 1 0\nslow 0 1\n"


def test_an_unknown_column_is_a_usage_error_that_lists_the_columns(run, ledger_path):
    result = run("status", "-c", "colour")

    assert result.exit_code == 2
    assert "no column colour; columns: store, done, pending" in result.output


def test_status_of_one_image_shows_each_store_with_its_error_next_try_and_rules(
        run, ledger_path):
    result = run("status", UBUNTU)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == [
        f'image:   {UBUNTU} "ubuntu"',
        f"glance:  active, raw, 3.0 MiB, project {P1}, in fast, slow (as of 60 min ago)"]
    edge = next(line for line in result.output.splitlines() if line.startswith("| edge"))
    assert [c.strip() for c in edge.split("|")[1:-1]] == [
        "edge", "retrying", "1", "transient", "503", "HTTP 503: unavailable", "in 40 s",
        "everywhere, edge-too"]
    slow = next(line for line in result.output.splitlines() if line.startswith("| slow"))
    assert "done" in slow


def test_status_of_an_image_behind_another_imports_lock_shows_the_lock_and_its_age(
        run, ledger_path):
    result = run("status", "debian")

    assert result.exit_code == 0, result.output
    text = result.output
    assert ("waiting: import lock held by task task-9 (processing, last updated 74 min ago); "
            "stale: Glance will preempt it on the next import (as of 60 s ago)") in text
    assert ("lock:    task task-9 (processing), held since at least 80 min ago, "
            "task last updated 75 min ago; stale") in text
    edge = next(line for line in text.splitlines() if line.startswith("| edge"))
    assert [c.strip() for c in edge.split("|")[1:3]] == ["edge", "pending"]


def test_status_of_one_image_as_json_holds_the_image_and_its_copies(run, ledger_path):
    result = run("status", DEBIAN, "-f", "json")

    body = json.loads(result.output)
    assert body["image"]["lock"] == {"task": "task-9", "task_status": "processing",
                                     "seen_at": output.iso(T0 - 80 * 60),
                                     "task_updated_at": output.iso(T0 - 75 * 60),
                                     "stale": True}
    assert [(c["store"], c["state"], c["next_try"]) for c in body["copies"]] == [
        ("edge", "pending", None)]


def test_status_of_an_image_the_ledger_does_not_know_says_so_and_exits_1(run, ledger_path):
    result = run("status", "fedora")

    assert result.exit_code == 1
    assert "the ledger has no image 'fedora'" in result.output
    assert "imagesync explain fedora" in result.output


def test_failed_lists_failed_copies_with_image_name_store_attempts_and_error(
        run, ledger_path):
    result = run("status", "--failed", "-f", "value", "-c", "image_id", "-c", "name",
                 "-c", "store", "-c", "attempts", "-c", "http_status", "-c", "error_kind")

    assert result.exit_code == 0, result.output
    assert result.output == f"{CENTOS} centos edge 1 403 forbidden\n"
    table = run("status", "--failed").output
    assert "copy-image needs the admin role" in table and "centos" in table


def test_project_and_store_filters_list_the_unsettled_copies_they_select(run, ledger_path):
    by_project = run("status", "--project", P1, "-f", "value", "-c", "name", "-c", "store",
                     "-c", "state")
    by_store = run("status", "--store", "slow", "--state", "done", "-f", "value",
                   "-c", "name")

    assert by_project.output == "ubuntu edge retrying\ndebian edge pending\n"
    assert by_store.output == "ubuntu\n"
    assert run("status", "--store", "nowhere").output == "no copies match\n"


def test_status_on_a_missing_ledger_names_the_path_and_exits_1(run, conf_file, tmp_path):
    result = run("status")

    assert result.exit_code == 1
    assert f"no ledger at {tmp_path / 'state' / 'ledger.sqlite'}" in result.output


def test_a_config_file_that_does_not_exist_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli.main, ["--config-file", str(tmp_path / "nope.conf"),
                                           "status"])

    assert result.exit_code == 2
    assert "nope.conf" in result.output


def test_status_never_imports_openstacksdk_oslo_messaging_or_oslo_service(
        conf_file, ledger_path):
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from imagesync.cli import main\n"
        f"r = CliRunner().invoke(main, ['--config-file', {str(conf_file)!r}, 'status'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(main, ['--config-file', {str(conf_file)!r}, 'status', "
        f"{UBUNTU!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(json.loads(out.replace("'", '"')))
    assert not loaded & {"openstack", "keystoneauth1", "oslo_messaging", "oslo_service",
                         "kombu", "eventlet", "sqlite_utils"}


def test_status_reads_a_ledger_of_100000_copies_in_well_under_half_a_second(
        run, tmp_path, conf_file):
    path = tmp_path / "state" / "ledger.sqlite"
    db = connect(path)
    states = ("done",) * 7 + ("pending", "failed", "retrying")
    with db.conn:
        db.conn.executemany(
            "INSERT INTO images (id, name, owner, status, created_at, updated_at) "
            "VALUES (?, ?, 'p', 'active', ?, ?)",
            [(f"img-{i:05d}", f"n{i}", T0, T0) for i in range(20_000)])
        db.conn.executemany(
            "INSERT INTO copies (image_id, store, state, attempts, created_at, updated_at) "
            "VALUES (?, ?, ?, 1, ?, ?)",
            [(f"img-{i // 5:05d}", f"store-{i % 5}", states[i // 5 % 10], T0 - i, T0 - i)
             for i in range(100_000)])
    db.close()

    started = time.perf_counter()
    result = run("status")
    elapsed = time.perf_counter() - started

    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| store-0"))
    assert [c.strip() for c in row.split("|")[2:8]] == ["14000", "2000", "0", "2000", "2000",
                                                        "0"]
    assert elapsed < 0.25, f"status took {elapsed:.3f} s"


# -- retry and sync -----------------------------------------------------------------------


def test_retry_queues_a_request_that_the_daemon_turns_into_pending_copies(run, ledger_path):
    result = run("retry", "centos")

    assert result.exit_code == 0, result.output
    assert result.output == ("queued a retry of 1 failed copy of centos (edge); the daemon "
                             "is not running: it picks the request up when it starts\n")
    assert [(r["action"], r["image_id"], r["done_at"]) for r in
            rows(ledger_path, "SELECT * FROM requests")] == [("retry", CENTOS, None)]
    # When the daemon's executor ticks
    ledger = Ledger(ledger_path)
    try:
        assert ledger.process_requests(T0 + 1) == [("retry", CENTOS, 1)]
    finally:
        ledger.close()
    copy = rows(ledger_path, "SELECT * FROM copies WHERE image_id = ?", CENTOS)[0]
    assert (copy["state"], copy["attempts"]) == ("pending", 0)


def test_retry_of_an_image_without_failed_copies_queues_nothing(run, ledger_path):
    result = run("retry", UBUNTU)

    assert result.exit_code == 0
    assert result.output.startswith(f"no failed copies of {UBUNTU}: nothing to retry")
    assert rows(ledger_path, "SELECT * FROM requests") == []


def test_retry_all_failed_queues_one_request_for_every_image(run, ledger_path):
    result = run("retry", "--all-failed")

    assert result.output.startswith("queued a retry of 1 failed copy of 1 image(s) (edge)")
    assert [(r["action"], r["image_id"]) for r in
            rows(ledger_path, "SELECT * FROM requests")] == [("retry", None)]


def test_retry_needs_either_an_image_or_all_failed(run, ledger_path):
    assert run("retry").exit_code == 2
    assert run("retry", "centos", "--all-failed").exit_code == 2


def test_retry_wait_reports_what_the_daemon_did(run, ledger_path):
    ledger = Ledger(ledger_path)
    stop = threading.Event()

    def executor():
        while not stop.is_set():
            if ledger.process_requests(T0 + 1):
                return
            time.sleep(0.05)

    thread = threading.Thread(target=executor)
    thread.start()
    try:
        result = run("retry", CENTOS, "--wait")
    finally:
        stop.set()
        thread.join()
        ledger.close()
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "the daemon took it: 1 copies re-queued"


def test_sync_queues_a_look_at_an_image_even_one_the_ledger_has_not_seen(run, ledger_path):
    fresh = "0d000000-0000-4000-8000-000000000004"

    assert run("sync", "ubuntu").output.startswith(f"queued a sync of {UBUNTU}; ")
    assert run("sync", fresh).exit_code == 0
    assert [(r["action"], r["image_id"]) for r in rows(
        ledger_path, "SELECT * FROM requests ORDER BY id")] == [("sync", UBUNTU),
                                                                ("sync", fresh)]
    result = run("sync", "no-such-name")
    assert result.exit_code == 1
    assert "'no-such-name' is not an image id" in result.output


def test_a_name_two_images_share_must_be_given_as_an_id(run, ledger_path):
    db = connect(ledger_path)
    with db.conn:
        Ops(db).record_visit(UBUNTU[:-1] + "9", image(UBUNTU[:-1] + "9", "ubuntu"), {}, {},
                             T0, SETTINGS)
    db.close()

    result = run("status", "ubuntu")

    assert result.exit_code == 1
    assert "2 images are named 'ubuntu'" in result.output


# -- policy check -------------------------------------------------------------------------

GOOD = "version: 1\nrules:\n  - name: all\n    match: {visibility: [private]}\n" \
       "    stores: [slow]\n"
BAD = "version: 1\nrules:\n  - name: all\n    match: {colour: blue}\n    stores: [slow]\n"


def test_policy_check_of_a_valid_file_prints_ok_and_its_warnings(run, tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text(GOOD)

    result = run("policy", "check", str(file))

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{file}: OK, 1 rule(s)\n"
    assert result.stderr.startswith(f"{file}:4:")
    assert ": warning: " in result.stderr


def test_policy_check_of_an_invalid_file_prints_file_line_column_and_exits_1(run, tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text(BAD)

    result = run("policy", "check", str(file))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"{file}:4:13: ")
    assert "colour" in result.stderr


def test_policy_check_without_a_file_checks_the_configured_policy(run, conf_file):
    result = run("policy", "check")

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("policy.yaml: OK, 1 rule(s)\n")


ALREADY_PRESENT = (400, "Image is already present at store 'fast'")


def api(image: Image) -> dict:
    """An Image as Glance's API shows it (stores left out when it is in none)."""
    body = {"id": image.id, "name": image.name, "status": image.status,
            "owner": image.owner, "visibility": image.visibility, **image.properties}
    if image.stores:
        body["stores"] = ",".join(sorted(image.stores))
    return body


class FakeGlance:
    """Just enough of imagesync.glance.Glance for the CLI. `legacy`: ids whose listing
    shows no stores (locations from before multi-store), as Glance lists them until a GET."""

    def __init__(self, images=(), stores=None, answers=None, legacy=()):
        self.images = {i.id: i for i in images}
        self._stores = stores or {s: StoreInfo(s, "file") for s in ("fast", "slow", "edge")}
        self.answers = answers or {}
        self.legacy = set(legacy)
        self.gets: list[str] = []
        self.copies: list[tuple[str, list[str]]] = []

    def stores(self, refresh=False):
        return self._stores

    def get_image(self, image_id, poll=False):
        self.gets.append(image_id)
        return self.images.get(image_id)

    def image_page(self, marker, page_size=1000, hidden=False):
        listed = [dataclasses.replace(i, stores=frozenset()) if i.id in self.legacy else i
                  for i in self.images.values() if i.hidden == hidden]
        ids = [i.id for i in listed]
        if marker is not None and marker not in ids:
            raise GlanceError(400, f"No image found with ID {marker}")
        start = ids.index(marker) + 1 if marker else 0
        return listed[start:start + page_size], start + page_size < len(listed)

    def import_methods(self):
        return self.answers.get("import", ["glance-direct", "copy-image"])

    def usage_info(self):   # GET /v2/info/usage: {} unless Glance enforces unified limits
        return self.answers.get("usage", {})

    def image_schema(self):   # a Glance configured with two disk formats only
        return {"name": "image", "properties": {
            "disk_format": {"type": ["null", "string"], "enum": [None, "raw", "qcow2"]},
            "container_format": {"type": ["null", "string"], "enum": [None, "bare"]},
            "name": {"type": ["null", "string"]}, "os_hidden": {"type": "boolean"}}}

    def copy_image(self, image_id, stores):
        self.copies.append((image_id, list(stores)))
        answers = self.answers.get("copy", [ALREADY_PRESENT])
        answer = answers[min(len(self.copies), len(answers)) - 1]
        if isinstance(answer, Exception):  # Glance.copy_image raises for a non-answer
            raise answer
        return answer

    def _json(self, path):
        if path.startswith("/images?"):
            answer = self.answers.get("/images", {"images": [
                api(i) for i in self.images.values()]})
        else:
            answer = self.answers.get(path, {"stores": [{"id": s} for s in self._stores]})
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_policy_check_with_glance_rejects_a_store_glance_does_not_have(
        run, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.Env, "glance", lambda self: FakeGlance())
    file = tmp_path / "p.yaml"
    file.write_text(GOOD.replace("[slow]", "[slow, nfs]"))

    result = run("policy", "check", "--glance", str(file))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"{file}:5:")
    assert "nfs" in result.stderr


def test_policy_check_with_glance_checks_formats_against_its_image_schema(
        run, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.Env, "glance", lambda self: FakeGlance())
    file = tmp_path / "p.yaml"
    file.write_text("version: 2\nrules:\n  - name: r\n    match: {disk_format: vmdk}\n"
                    "    stores: [slow]\n")
    assert run("policy", "check", str(file)).exit_code == 0   # vmdk: in Glance's defaults

    result = run("policy", "check", "--glance", str(file))

    assert result.exit_code == 1
    assert result.stderr.startswith(f"{file}:4:") and "vmdk" in result.stderr


def test_policy_check_with_glance_unreachable_warns_and_checks_the_rest(
        run, tmp_path, monkeypatch):
    def unreachable(self):
        raise cli.click.ClickException("cannot set up Glance: rabbit://u:s3cret@h/ down")

    monkeypatch.setattr(cli.Env, "glance", unreachable)
    file = tmp_path / "p.yaml"
    file.write_text(GOOD)

    result = run("policy", "check", "--glance", str(file))

    assert result.exit_code == 0
    assert "warning: store names not checked" in result.stderr
    assert "s3cret" not in result.stderr


# -- plan and explain (Glance faked; tests/functional runs them for real) ------------------

POLICY = """version: 1
rules:
  - name: ubuntu-everywhere
    match: {name: "ubuntu*"}
    stores: all
  - name: golden
    match: {tags: [golden]}
    stores: [edge]
"""


@pytest.fixture
def glance(monkeypatch, conf_file):
    Path(conf_file.parent / "policy.yaml").write_text(POLICY)
    fake = FakeGlance(
        images=[image(UBUNTU, "ubuntu", stores=("fast", "slow"), size=1 << 20),
                image(CENTOS, "centos"),
                image(DEBIAN, "ubuntu-qcow", disk_format="qcow2", size=2 << 20)],
        stores={"fast": StoreInfo("fast", "file"), "slow": StoreInfo("slow", "file"),
                "edge": StoreInfo("edge", "file"), "rbd1": StoreInfo("rbd1", "rbd"),
                "web": StoreInfo("web", "http", read_only=True)})
    monkeypatch.setattr(cli.Env, "glance", lambda self: fake)
    return fake


def test_plan_lists_each_missing_copy_with_its_rule_and_bytes_and_flags_useless_ones(
        run, ledger_path, glance):
    result = run("plan", "-f", "value", "-c", "name", "-c", "store", "-c", "action",
                 "-c", "bytes", "-c", "ledger")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "ubuntu edge copy 1048576 retrying",
        "ubuntu rbd1 copy 1048576 ",
        "ubuntu-qcow edge copy 2097152 pending",
        "ubuntu-qcow slow copy 2097152 ",
        "ubuntu-qcow rbd1 skip  ",
    ]
    table = run("plan").output
    assert "qcow2 image on rbd store rbd1 cannot be cloned there" in table
    assert table.splitlines()[-1].startswith(
        "would copy 4 copies of 2 image(s): 6.0 MiB in total "
        "(edge 3.0 MiB, rbd1 1.0 MiB, slow 2.0 MiB); 3 image(s) checked; "
        "1 useless copy(ies) skipped")


def test_plan_as_json_carries_the_totals(run, ledger_path, glance):
    body = json.loads(run("plan", "-f", "json").output)

    assert body["totals"]["bytes"] == 6 << 20
    assert body["totals"]["bytes_per_store"] == {"edge": 3 << 20, "rbd1": 1 << 20,
                                                 "slow": 2 << 20}
    assert {r["rules"][0] for r in body["copies"]} == {"ubuntu-everywhere"}


def test_explain_names_the_failing_matcher_of_every_rule_and_the_ledger_view(
        run, ledger_path, glance):
    result = run("explain", UBUNTU)

    assert result.exit_code == 0, result.output
    text = result.output
    golden = next(line for line in text.splitlines() if line.startswith("| golden"))
    assert "no" in golden and "image lacks tag golden" in golden
    assert "desired: edge (ubuntu-everywhere), fast (ubuntu-everywhere), rbd1 " \
           "(ubuntu-everywhere), slow (ubuntu-everywhere)" in text
    assert "missing: edge, rbd1" in text
    assert "ledger:  edge retrying (1 attempt(s); next try in 40 s; transient: HTTP 503: " \
           "unavailable); slow done" in text


def test_explain_as_json_and_value_apply_to_the_rule_table(run, ledger_path, glance):
    body = json.loads(run("explain", "centos", "-f", "json").output)
    assert [(r["rule"], r["matched"], r["reason"]) for r in body["rules"]] == [
        ("ubuntu-everywhere", False, "name is 'centos', rule wants a name matching ubuntu*"),
        ("golden", False, "image lacks tag golden, rule wants all of golden")]
    assert body["desired"] == {} and body["ledger"]["copies"][0]["state"] == "failed"

    value = run("explain", DEBIAN, "-f", "value", "-c", "rule", "-c", "matched")
    assert value.output == "ubuntu-everywhere true\ngolden false\n"


def test_explain_of_an_image_glance_does_not_have_exits_1(run, ledger_path, glance):
    result = run("explain", "0f000000-0000-4000-8000-00000000000f")

    assert result.exit_code == 1
    assert "Glance has no image" in result.output


def test_an_invalid_policy_stops_plan_with_file_line_column(run, conf_file, glance):
    (conf_file.parent / "policy.yaml").write_text(BAD)

    result = run("plan")

    assert result.exit_code == 1
    assert f"{conf_file.parent / 'policy.yaml'}:4:13:" in result.stderr


def test_plan_rows_skip_read_only_stores_and_never_list_stores_the_image_has():
    policy = parse_policy("version: 1\nrules:\n  - name: r\n    match: {}\n"
                          "    stores: [web, fast]\n")
    stores = {"fast": StoreInfo("fast"), "web": StoreInfo("web", "http", read_only=True)}

    rows_ = report.plan_rows(image(UBUNTU, "u"), stores, policy, {})

    assert [(r["store"], r["action"], r["reason"]) for r in rows_] == [
        ("web", "skip", "store web is read-only")]


def test_plan_shows_a_failed_copy_as_held_until_retry_not_as_a_copy(
        run, ledger_path, conf_file, monkeypatch):
    (conf_file.parent / "policy.yaml").write_text(
        "version: 1\nrules:\n  - name: edge-too\n    match: {}\n    stores: [edge]\n")
    fake = FakeGlance(images=[image(CENTOS, "centos", size=1 << 20)])
    monkeypatch.setattr(cli.Env, "glance", lambda self: fake)

    table = run("plan")
    body = json.loads(run("plan", "-f", "json").output)

    assert [(r["store"], r["action"], r["bytes"], r["ledger"], r["reason"])
            for r in body["copies"]] == [
        ("edge", "held", None, "failed", "failed: not copied again until `imagesync retry`")]
    assert (body["totals"]["copies"], body["totals"]["held"], body["totals"]["bytes"]) == \
        (0, 1, 0)
    assert table.output.splitlines()[-1] == (
        "nothing to copy now; 1 image(s) checked; 1 failed copy(ies) held until "
        "`imagesync retry`")


def test_plan_reads_an_image_listed_in_no_store_before_planning_it(
        run, ledger_path, conf_file, monkeypatch):
    (conf_file.parent / "policy.yaml").write_text(
        "version: 1\nrules:\n  - name: two\n    match: {}\n    stores: [fast, slow]\n")
    legacy = image(DEBIAN, "old", stores=("fast",), size=1 << 20)
    fake = FakeGlance(images=[legacy, image(UBUNTU, "new", stores=("fast", "slow"))],
                      legacy={DEBIAN})
    monkeypatch.setattr(cli.Env, "glance", lambda self: fake)

    result = run("plan", "-f", "value", "-c", "name", "-c", "store", "-c", "action")

    assert result.exit_code == 0, result.output
    assert result.output == "old slow copy\n"  # not "old fast copy": it is in fast
    assert fake.gets == [DEBIAN]  # one GET, only for the image listed in no store


def test_plan_survives_a_listing_marker_deleted_between_pages(
        run, ledger_path, conf_file, monkeypatch):
    conf_file.write_text(conf_file.read_text() + "[reconcile]\npage_size = 1\n")
    fake = FakeGlance(images=[image(UBUNTU, "ubuntu"), image(CENTOS, "centos"),
                              image(DEBIAN, "ubuntu-qcow")])
    page = fake.image_page

    def delete_each_marker(marker, page_size=1000, hidden=False):
        answer = page(marker, page_size, hidden)
        if answer[0] and answer[0][-1].id == CENTOS:
            del fake.images[CENTOS]  # deleted (and purged) right after it was listed
        return answer

    fake.image_page = delete_each_marker
    monkeypatch.setattr(cli.Env, "glance", lambda self: fake)

    result = run("plan", "-f", "json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["images_checked"] == 3
    assert result.stderr.startswith(f"note: image {CENTOS} vanished while Glance listed it "
                                    f"(HTTP 400: No image found with ID {CENTOS}); the "
                                    f"listing goes on after {UBUNTU}")


def test_config_dir_files_are_read_after_the_config_file_like_the_daemon(
        run, conf_file, ledger_path, tmp_path):
    moved = tmp_path / "elsewhere" / "ledger.sqlite"
    moved.parent.mkdir()
    ledger_path.rename(moved)
    confd = tmp_path / "imagesync.conf.d"
    confd.mkdir()
    (confd / "10-ledger.conf").write_text(f"[imagesync]\nledger_path = {moved}\n")

    without = run("status")
    with_dir = run("--config-dir", str(confd), "status")

    assert without.exit_code == 1 and "no ledger" in without.output
    assert with_dir.exit_code == 0, with_dir.output
    assert with_dir.output.startswith("+-------+")
    missing = CliRunner().invoke(cli.main, ["--config-dir", str(tmp_path / "nope"), "status"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_a_drop_in_directory_of_the_daemon_applies_to_the_cli_too(
        run, conf_file, ledger_path, tmp_path, monkeypatch):
    # oslo.config's default directories: ~/.imagesync/ (here), /etc/imagesync/, ... each
    # with imagesync.conf.d/ and imagesync-daemon.conf.d/, the latter named after the daemon.
    moved = tmp_path / "elsewhere" / "ledger.sqlite"
    moved.parent.mkdir()
    ledger_path.rename(moved)
    monkeypatch.setenv("HOME", str(tmp_path))
    dropins = tmp_path / ".imagesync" / "imagesync-daemon.conf.d"
    dropins.mkdir(parents=True)
    (dropins / "50-ledger.conf").write_text(f"[imagesync]\nledger_path = {moved}\n")

    result = run("status", "-f", "value", "-c", "store")

    assert result.exit_code == 0, result.output
    assert result.output.split() == ["edge", "slow"]


# -- doctor -------------------------------------------------------------------------------


class GlanceConn:
    class image:  # noqa: N801
        @staticmethod
        def get_endpoint():
            return "http://glance:9292/v2"


SETTLED = image(UBUNTU, "ubuntu", stores=("fast", "slow"))


def doctor_glance(*images, **kw) -> FakeGlance:
    fake = FakeGlance(images=images, **kw)
    fake.conn = GlanceConn()
    return fake


def test_doctor_may_copy_when_glance_refuses_a_copy_to_a_store_the_image_is_in_with_400():
    # Glance's answers faked here; tests/functional/test_doctor.py asks the real Glance.
    locked = image(CENTOS, "centos", lock="task-1")
    nowhere = image(DEBIAN, "debian", stores=())
    fake = doctor_glance(locked, nowhere, SETTLED)

    result = doctor.copy_check(fake, "imagesync", {"fast", "slow", "edge"})

    assert result.status == "OK", result
    assert fake.copies == [(UBUNTU, ["fast"])]  # not the locked image, not one in no store
    assert f"image {UBUNTU} to store fast, which it is in" in result.detail
    assert "400 'already present'" in result.detail and "nothing copied" in result.detail


def test_doctor_says_copy_image_needs_the_admin_role_when_glance_refuses_the_copy_with_403():
    fake = doctor_glance(SETTLED, answers={"copy": [(403, "Forbidden")]})

    result = doctor.copy_check(fake, "imagesync", {"fast", "slow"})

    assert result.status == "FAIL"
    assert result.detail.startswith("copy-image needs the admin role: Glance refused")
    assert "admin role" in result.hint and "copy_image policy" in result.hint


def test_doctor_probes_only_stores_glance_lists_and_asks_the_next_image_after_a_409():
    other = image(CENTOS, "centos", stores=("gone", "edge"))
    fake = doctor_glance(other, SETTLED,
                         answers={"copy": [(409, "Image has active task"), ALREADY_PRESENT]})

    result = doctor.copy_check(fake, "c", {"fast", "slow", "edge"})

    assert result.status == "OK"
    assert fake.copies == [(CENTOS, ["edge"]), (UBUNTU, ["fast"])]


def test_doctor_cannot_tell_without_an_image_and_never_says_ok():
    fake = doctor_glance()

    result = doctor.copy_check(fake, "c", {"fast"})

    assert result.status == "WARN"
    assert result.detail.startswith("cannot tell: these credentials see no active image")
    assert fake.copies == []


def test_doctor_fails_credentials_that_may_not_even_list_images():
    fake = doctor_glance(answers={"/images": GlanceError(403, "Forbidden")})

    result = doctor.copy_check(fake, "c", {"fast"})

    assert result.status == "FAIL"
    assert "copy-image needs the admin role" in result.detail and fake.copies == []


@pytest.mark.parametrize("answer, status, words", [
    ((202, ""), "WARN", "Glance accepted"),
    ((413, "quota exceeded"), "WARN", "for quota"),
    (GlanceUnavailable(None, "Glance unreachable: ConnectFailure"), "WARN", "unreachable"),
    (GlanceUnavailable(503, "unavailable"), "WARN", "HTTP 503"),
    (GlanceError(429, "Too Many Requests"), "WARN", "HTTP 429"),
])
def test_doctor_says_what_any_other_answer_to_the_probe_means(answer, status, words):
    result = doctor.copy_check(doctor_glance(SETTLED, answers={"copy": [answer]}), "c", None)

    assert result.status == status and words in result.detail, result


def test_doctor_fails_without_copy_image_or_multi_store_and_passes_a_good_glance():
    bad = doctor_glance(SETTLED, answers={"import": ["glance-direct"],
                                          "/info/stores": GlanceError(404, "Not Found")})
    results, stores = doctor.glance_checks(bad, "c")
    assert [(r.title, r.status) for r in results] == [
        ("Glance reachable", "OK"), ("multi-store", "FAIL"), ("copy-image enabled", "FAIL"),
        ("credentials may copy", "WARN")]
    assert results[-1].detail == "not checked: copy-image is not enabled"
    assert stores is None and bad.copies == []

    good = doctor_glance(SETTLED)
    results, stores = doctor.glance_checks(good, "c")
    assert {r.status for r in results} == {"OK"} and stores == {"fast", "slow", "edge"}

    down = doctor_glance(answers={"import": None})
    down.import_methods = lambda: (_ for _ in ()).throw(GlanceUnavailable(None, "refused"))
    results, stores = doctor.glance_checks(down, "c")
    assert [(r.title, r.status) for r in results] == [("Glance reachable", "FAIL")]


def test_doctor_runs_every_check_in_order_against_what_it_is_given(conf_file, ledger_path):
    from imagesync import conf as conf_mod

    glance = doctor_glance(SETTLED)
    conf = conf_mod.load([], config_files=[str(conf_file)])

    results = list(doctor.run(conf, T0, glance_factory=lambda: glance,
                              queue_probe=lambda conf: ("amqp://guest:**@mq:5672//", 0, 1)))

    assert [r.title for r in results] == list(doctor.TITLES)
    assert [(r.status, r.title) for r in results] == [
        ("OK", "configuration"), ("OK", "coordination"), ("OK", "Glance reachable"),
        ("OK", "multi-store"), ("OK", "copy-image enabled"), ("OK", "credentials may copy"),
        ("OK", "notification queue"), ("OK", "notifications arriving"),
        ("WARN", "policy valid"), ("OK", "ledger writable")]
    assert results[1].detail == ("not configured: this daemon works alone ([coordination] "
                                 "backend_url is unset)")
    assert results[7].detail == "last one 30 s ago (3 in all)"
    assert "1 rule(s), 1 warning(s); store names checked against the live stores" \
        in results[8].detail  # the fixture's policy has `match: {}`


def test_doctor_checks_the_ledger_is_writable_and_private(tmp_path, ledger_path):
    assert doctor.ledger_check(str(ledger_path)).status == "OK"
    os.chmod(ledger_path, 0o644)
    result = doctor.ledger_check(str(ledger_path))
    assert (result.status, result.hint) == ("WARN", f"chmod 600 {ledger_path}")
    assert doctor.ledger_check(str(tmp_path / "nowhere" / "l.sqlite")).status == "FAIL"
    assert doctor.ledger_check(str(tmp_path / "l.sqlite")).status == "WARN"


def test_doctor_reports_a_missing_pool_queue_and_an_idle_one():
    class Conf:
        class notifications:  # noqa: N801
            pool, exchange, topic = "imagesync", "glance", "notifications"

    def missing(conf):
        raise RuntimeError("NOT_FOUND - no queue 'imagesync' in vhost '/'")

    assert doctor.queue_check(Conf, missing).status == "FAIL"
    idle = doctor.queue_check(Conf, lambda conf: ("amqp://guest:**@h:5672//", 3, 0))
    assert (idle.status, idle.hint) == ("WARN", "no consumer: the daemon is not listening")
    assert doctor.queue_check(Conf, lambda conf: ("amqp://h//", 0, 1)).status == "OK"


def test_doctor_masks_secrets_and_exits_1_when_a_check_fails(run, monkeypatch):
    def fake_run(conf, now):
        yield doctor.Result("OK", "configuration", "read x.conf")
        yield doctor.Result("FAIL", "notification queue",
                            "cannot reach RabbitMQ at rabbit://imagesync:s3cret@mq:5672/",
                            "check transport_url, password=s3cret")

    monkeypatch.setattr(doctor, "run", fake_run)

    result = run("doctor")

    assert result.exit_code == 1
    assert "s3cret" not in result.output
    assert "FAIL  notification queue: cannot reach RabbitMQ at rabbit://***@mq:5672/" \
        in result.output
    assert "      hint: check transport_url, password=***" in result.output


# -- help ---------------------------------------------------------------------------------


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [" ".join(p) for p, _ in _commands(cli.main)])
def test_every_command_has_help_with_an_example(path):
    result = CliRunner().invoke(cli.main, [*path.split(), "--help"])

    assert result.exit_code == 0
    assert "Example" in result.output, f"imagesync {path} --help shows no example"


def test_listing_commands_all_take_the_same_output_options():
    for name in ("status", "plan", "explain"):
        options = {o for p in cli.main.commands[name].params for o in p.opts}
        assert {"-f", "--format", "-c", "--column"} <= options, name


def test_the_daemon_counts_as_running_only_if_its_pid_lives_and_began_before_it_said_so():
    assert cli._running(GONE_PID, T0) is False
    assert cli._running(os.getpid(), time.time()) is True
    assert cli._running(os.getpid(), time.time() - 10 * 365 * 86400) is False  # pid reused
    assert cli._running(None, T0) is None


def test_retry_all_failed_with_nothing_failed_says_so(run, ledger_path):
    run("retry", "centos")
    db = connect(ledger_path)
    with db.conn:
        Ops(db).process_requests(T0 + 1)
    db.close()

    result = run("retry", "--all-failed")

    assert result.exit_code == 0
    assert result.output == "no failed copies: nothing to retry\n"


# -- several controllers: status and doctor ask the coordination backend ------------------
# The backend is faked at imagesync.coordination.members (what the daemons published);
# tests/functional runs status and doctor against the sandbox's Redis and etcd.

BACKEND = "redis://:s3cret@ctl1:6379"
SHOWN = "redis://:***@ctl1:6379"
PUBLISHED = {"ctl1": {"role": "active", "since": T0 - 7200},
             "ctl2": {"role": "standby", "since": T0 - 600},
             "ctl3": {"role": "standby", "since": T0 - 60}}


@pytest.fixture
def controllers(conf_file, monkeypatch):
    """[coordination] set in the config; returns set(published=..., member=...) to choose
    what the backend answers (a dict, or an exception it raises) and which node this is."""
    from imagesync import coordination

    state = {"published": PUBLISHED, "asked": []}

    def members(url, *args, **kw):
        state["asked"].append(url)
        if isinstance(state["published"], BaseException):
            raise state["published"]
        return state["published"]

    monkeypatch.setattr(coordination, "members", members)

    def configure(published=PUBLISHED, member="ctl2"):
        state["published"] = published
        text = conf_file.read_text().split("[coordination]")[0]
        conf_file.write_text(f"{text}[coordination]\nbackend_url = {BACKEND}\n"
                             f"member_id = {member}\n")
        return state

    configure()
    return configure


def test_status_on_a_standby_names_the_active_member_and_labels_the_ledger_last_known(
        run, ledger_path, controllers):
    state = controllers(member="ctl2")

    result = run("status")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("coordination: active ctl1 since 2027-01-15T06:00:00Z (2 h ago); "
                        "standby ctl2 (this node), ctl3")
    assert lines[1] == ("last known: this node's ledger, written only while its daemon is "
                        "active (ctl1 is active: imagesync status there shows the current view)")
    assert lines[3].split("|")[1].strip() == "store"  # then the ledger's view, as before
    assert lines[-1].startswith("daemon: not running")
    assert state["asked"] == [BACKEND]
    assert "s3cret" not in result.output


def test_status_on_the_active_member_says_so_without_a_last_known_label(
        run, ledger_path, controllers):
    controllers(member="ctl1")

    lines = run("status").output.splitlines()

    assert lines[0] == ("coordination: active ctl1 (this node) since 2027-01-15T06:00:00Z "
                        "(2 h ago); standby ctl2, ctl3")
    assert lines[2].split("|")[1].strip() == "store"
    assert not any(line.startswith("last known") for line in lines)


def test_status_as_json_carries_who_is_active_and_this_nodes_role(
        run, ledger_path, controllers):
    controllers(member="ctl3")

    result = run("status", "-f", "json")

    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["coordination"] == {
        "backend": SHOWN, "member": "ctl3", "role": "standby", "active_member": "ctl1",
        "active_since": "2027-01-15T06:00:00Z",
        "members": {"ctl1": {"role": "active", "since": "2027-01-15T06:00:00Z"},
                    "ctl2": {"role": "standby", "since": "2027-01-15T07:50:00Z"},
                    "ctl3": {"role": "standby", "since": "2027-01-15T07:59:00Z"}},
        "error": None}
    assert [s["store"] for s in body["stores"]] == ["edge", "slow"]  # the ledger still
    assert "s3cret" not in result.output


def test_status_without_a_member_active_or_with_this_node_absent_says_both(
        run, ledger_path, controllers):
    controllers({"ctl2": {"role": "standby", "since": T0 - 5},
                 "ctl3": {"role": "disconnected", "since": T0 - 5}}, member="ctl4")

    lines = run("status").output.splitlines()

    assert lines[0] == ("coordination: no member is active; standby ctl2; disconnected ctl3; "
                        "this node (ctl4) is not a member: its daemon is stopped or cannot "
                        "reach the backend")
    assert lines[1] == ("last known: this node's ledger, written only while its daemon is "
                        "active (no member is active now)")
    body = json.loads(run("status", "-f", "json").output)["coordination"]
    assert (body["role"], body["active_member"], body["active_since"]) == (None, None, None)


def test_status_with_two_members_saying_active_shows_the_newer_claim_and_the_other(
        run, ledger_path, controllers):
    controllers({**PUBLISHED, "ctl2": {"role": "active", "since": T0 - 30}}, member="ctl1")

    lines = run("status").output.splitlines()

    assert lines[0] == ("coordination: active ctl2 since 2027-01-15T07:59:30Z (30 s ago); "
                        "also saying active: ctl1 (this node); standby ctl3")
    assert lines[1].startswith("last known: ") and "(ctl2 is active: " in lines[1]
    body = json.loads(run("status", "-f", "json").output)["coordination"]
    assert (body["role"], body["active_member"]) == ("active", "ctl2")


def test_status_on_a_backend_no_daemon_joined_yet_lists_no_member(
        run, ledger_path, controllers):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        from tooz.coordination import GroupNotCreated

    controllers(GroupNotCreated(b"imagesync"))

    result = run("status")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "coordination: no member is active; this node (ctl2) is not a member: its daemon is "
        "stopped or cannot reach the backend")


def test_status_with_the_backend_unreachable_says_so_in_one_line_and_shows_the_ledger(
        run, ledger_path, controllers):
    controllers(ConnectionError("Error 111 connecting to ctl1:6379 (password s3cret). "
                                "Connection refused.\nTraceback: more"))

    result = run("status")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (f"coordination: cannot reach {SHOWN} (ConnectionError: Error 111 "
                        "connecting to ctl1:6379 (password ***). Connection refused.); this "
                        "node's role is unknown: the ledger below may be behind the active "
                        "daemon's")
    assert lines[2].split("|")[1].strip() == "store"
    assert lines[-1].startswith("daemon: ")
    assert "s3cret" not in result.output
    body = json.loads(run("status", "-f", "json").output)
    assert body["coordination"]["members"] is None and body["coordination"]["role"] is None
    assert body["coordination"]["error"].startswith("ConnectionError: Error 111")
    assert body["stores"] and "s3cret" not in json.dumps(body)


def test_status_without_a_backend_or_in_value_format_never_asks_one(
        run, ledger_path, conf_file, controllers):
    state = controllers()
    value = run("status", "-f", "value", "-c", "store", "-c", "failed")
    assert value.output == "edge 1\nslow 0\n"  # scripts get rows only
    assert state["asked"] == []

    conf_file.write_text(conf_file.read_text().split("[coordination]")[0])
    table = run("status")
    assert table.output.splitlines()[1].split("|")[1].strip() == "store"
    assert json.loads(run("status", "-f", "json").output)["coordination"] is None
    assert state["asked"] == []


def _coordination_conf(conf_file):
    from imagesync import conf as conf_mod

    return conf_mod.load([], config_files=[str(conf_file)])


def test_doctor_names_the_active_member_and_this_nodes_role(conf_file, controllers):
    controllers(member="ctl2")

    result = doctor.coordination_check(doctor.ask_members(_coordination_conf(conf_file)), T0)

    assert (result.status, result.title) == ("OK", "coordination")
    assert result.detail == "active: ctl1 since 2027-01-15T06:00:00Z (2 h ago); this node " \
                            "(ctl2) standby"


def test_doctor_warns_when_no_member_is_active(conf_file, controllers):
    controllers({"ctl2": {"role": "standby", "since": T0}}, member="ctl2")

    result = doctor.coordination_check(doctor.ask_members(_coordination_conf(conf_file)), T0)

    assert result.status == "WARN"
    assert result.detail == (f"no member is active on {SHOWN} (members: ctl2 standby); "
                             "this node (ctl2) standby")
    assert "start imagesync-daemon" in result.hint


def test_doctor_warns_when_two_members_say_they_are_active(conf_file, controllers):
    controllers({**PUBLISHED, "ctl2": {"role": "active", "since": T0 - 30}}, member="ctl2")

    result = doctor.coordination_check(doctor.ask_members(_coordination_conf(conf_file)), T0)

    assert result.status == "WARN"
    assert result.detail.startswith("active: ctl2 since 2027-01-15T07:59:30Z (30 s ago); "
                                    "this node (ctl2) active; 2 members say they are active")


def test_doctor_fails_an_unreachable_backend_with_the_url_masked(conf_file, controllers):
    controllers(ConnectionError("Error 111 connecting to ctl1:6379. Connection refused.\n"
                                "second line"))

    result = doctor.coordination_check(doctor.ask_members(_coordination_conf(conf_file)), T0)

    assert result.status == "FAIL"
    assert result.detail == (f"cannot reach {SHOWN}: ConnectionError: Error 111 connecting "
                             "to ctl1:6379. Connection refused.")
    assert "backend_url" in result.hint
    assert "s3cret" not in result.detail + result.hint


def test_a_backend_that_does_not_answer_in_time_is_reported_with_what_tooz_last_logged(
        conf_file, controllers, monkeypatch):
    # tooz's redis driver retries a refused connection or a wrong password about a minute.
    import logging
    import threading

    from imagesync import coordination

    controllers(member="ctl2")
    release = threading.Event()

    def retrying(url, *args, **kw):
        logging.getLogger("tooz.drivers.redis").debug(
            "Redis connection error, will retry - invalid username-password pair")
        release.wait(10)
        return PUBLISHED

    monkeypatch.setattr(coordination, "members", retrying)
    monkeypatch.setattr(doctor, "ASK_TIMEOUT", 0.2)
    started = time.monotonic()

    view = doctor.ask_members(_coordination_conf(conf_file))

    release.set()
    assert time.monotonic() - started < 2
    assert view.found is None
    assert view.error == ("no answer within 0.2 s; tooz said: Redis connection error, will "
                          "retry - invalid username-password pair")
    assert logging.getLogger("tooz").handlers == []   # the capture is gone again
    result = doctor.coordination_check(view, T0)
    assert (result.status, result.detail) == ("FAIL", f"cannot reach {SHOWN}: {view.error}")


def test_an_error_without_text_is_told_by_the_error_it_came_from(conf_file, controllers):
    class ConnectionFailedError(Exception):  # tooz's etcd driver raises it without text
        pass

    failed = ConnectionFailedError()
    failed.__context__ = ConnectionError("Failed to establish a new connection: [Errno 111] "
                                         "Connection refused")
    controllers(failed, member="ctl4")

    view = doctor.ask_members(_coordination_conf(conf_file))

    assert view.error == ("ConnectionFailedError: Failed to establish a new connection: "
                          "[Errno 111] Connection refused")


def test_doctor_on_a_node_whose_daemon_is_not_a_member_still_names_the_active_one(
        conf_file, controllers):
    controllers(member="ctl4")

    result = doctor.coordination_check(doctor.ask_members(_coordination_conf(conf_file)), T0)

    assert (result.status, result.detail) == (
        "OK", "active: ctl1 since 2027-01-15T06:00:00Z (2 h ago); this node (ctl4) not a "
              "member: its daemon is stopped or cannot reach the backend")


def test_doctor_on_a_standby_leaves_the_notification_check_to_the_active_member(
        conf_file, ledger_path, controllers):
    controllers(member="ctl2")
    glance = doctor_glance(SETTLED)

    results = {r.title: r for r in doctor.run(
        _coordination_conf(conf_file), T0, glance_factory=lambda: glance,
        queue_probe=lambda conf: ("amqp://guest:**@mq:5672//", 0, 1))}

    assert list(results) == list(doctor.TITLES)
    assert results["coordination"].status == "OK"
    arriving = results["notifications arriving"]
    assert (arriving.status, arriving.detail) == (
        "OK", "not this node's to hear: this node (ctl2) is standby; ctl1 is active and "
              "records them (imagesync doctor there checks them); last one here 30 s ago")
    assert not any("s3cret" in f"{r.detail} {r.hint}" for r in results.values())

    controllers(member="ctl1")  # on the active member: the ledger's own answer
    results = {r.title: r for r in doctor.run(
        _coordination_conf(conf_file), T0, glance_factory=lambda: glance,
        queue_probe=lambda conf: ("amqp://guest:**@mq:5672//", 0, 1))}
    assert results["notifications arriving"].detail == "last one 30 s ago (3 in all)"


def test_doctor_prints_the_coordination_line_masked(run, conf_file, ledger_path, controllers,
                                                    monkeypatch):
    controllers(ConnectionError("Error 111 connecting to ctl1:6379. Connection refused."))
    real_run = doctor.run
    monkeypatch.setattr(doctor, "run", lambda conf, now: [
        r for r in real_run(conf, now, glance_factory=lambda: doctor_glance(SETTLED),
                            queue_probe=lambda conf: ("amqp://guest:**@mq:5672//", 0, 1))])

    result = run("doctor")

    assert result.exit_code == 1
    assert "s3cret" not in result.output
    assert ("FAIL  coordination: cannot reach redis://***@ctl1:6379: ConnectionError: "
            "Error 111 connecting to ctl1:6379. Connection refused.") in result.output
