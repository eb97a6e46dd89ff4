"""Stories about the Prometheus metrics: hooks in, registry out, served on loopback only.

Every Metrics has its own CollectorRegistry, so each test reads exactly what it fed.
The endpoint tests bind 127.0.0.1 on a free port and never anything wider.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import socket
import urllib.request

import pytest
from oslo_config import cfg
from structlog.testing import capture_logs

from imagesync import conf as conf_mod
from imagesync import metrics as metrics_mod
from imagesync.events import parse
from imagesync.ledger import Ledger, Ops
from imagesync.metrics import Metrics
from imagesync.model import Image
from imagesync.planner import STATES, Settings

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "glance-notifications"


def value(m: Metrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def real_event(name: str):
    message = json.loads((FIXTURES / name).read_text())
    return parse(message["event_type"], message["payload"], message["metadata"])


@pytest.fixture
def served():
    started: list[Metrics] = []

    def make(*args, **kwargs) -> Metrics:
        m = Metrics(*args, **kwargs)
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


# -- the hooks


def test_accepted_imports_count_once_per_target_store():
    m = Metrics()

    m.import_started(["slow", "edge"])
    m.import_started(["edge"])

    assert value(m, "imagesync_imports_started_total", store="edge") == 2
    assert value(m, "imagesync_imports_started_total", store="slow") == 1


def test_refused_imports_count_by_error_kind_and_every_kind_starts_at_zero():
    m = Metrics()

    m.import_failed("transient")
    m.import_failed("transient")
    m.import_failed("quota")

    assert value(m, "imagesync_imports_failed_total", kind="transient") == 2
    assert value(m, "imagesync_imports_failed_total", kind="quota") == 1
    assert value(m, "imagesync_imports_failed_total", kind="forbidden") == 0


def test_accepted_imports_start_their_stores_succeeded_count_at_zero():
    m = Metrics()

    m.import_started(["edge"])

    assert value(m, "imagesync_imports_succeeded_total", store="edge") == 0
    assert value(m, "imagesync_imports_succeeded_total", store="slow") is None


def test_only_an_in_flight_copy_that_becomes_done_counts_as_a_succeeded_import():
    m = Metrics()

    m.copy_state("slow", "done", "in_flight")
    m.copy_state("slow", "done", "in_flight")
    m.copy_state("edge", "done", None)  # already in the store: never imported
    m.copy_state("edge", "done", "pending")
    m.copy_state("edge", "done", "done")
    m.copy_state("edge", "retrying", "in_flight")

    assert value(m, "imagesync_imports_succeeded_total", store="slow") == 2
    assert value(m, "imagesync_imports_succeeded_total", store="edge") is None
    assert value(m, "imagesync_copy_changes_total", store="edge", state="done") == 2


def test_a_copy_change_counts_per_store_and_new_state_but_a_repeat_does_not():
    m = Metrics()

    m.copy_state("slow", "pending", None)
    m.copy_state("slow", "done", "in_flight")
    m.copy_state("slow", "done", "done")
    m.copy_state("edge", "retrying", "in_flight")

    assert value(m, "imagesync_copy_changes_total", store="slow", state="pending") == 1
    assert value(m, "imagesync_copy_changes_total", store="slow", state="done") == 1
    assert value(m, "imagesync_copy_changes_total", store="edge", state="retrying") == 1


def test_a_batch_of_notifications_counts_messages_ignored_ones_and_the_lag_of_the_newest():
    m = Metrics()
    update, upload = real_event("0002-image.update.json"), real_event("0004-image.upload.json")
    newest = max(update.timestamp, upload.timestamp).timestamp()

    m.notifications(3, [update, upload], newest + 2.5)

    assert value(m, "imagesync_notifications_total") == 3
    assert value(m, "imagesync_notifications_ignored_total") == 1
    assert value(m, "imagesync_notification_lag_seconds") == pytest.approx(2.5)
    assert value(m, "imagesync_last_notification_timestamp_seconds") == newest + 2.5


def test_a_batch_without_timestamps_leaves_the_lag_as_it_was():
    m = Metrics()
    event = real_event("0002-image.update.json")
    m.notifications(1, [event], event.timestamp.timestamp() + 1.0)

    untimed = parse("image.update", json.loads(
        (FIXTURES / "0002-image.update.json").read_text())["payload"], {})
    assert untimed is not None and untimed.timestamp is None
    m.notifications(1, [untimed], event.timestamp.timestamp() + 99.0)

    assert value(m, "imagesync_notification_lag_seconds") == pytest.approx(1.0)
    assert value(m, "imagesync_notifications_total") == 2


def test_a_reconcile_pass_sets_its_duration_and_when_it_ended():
    m = Metrics()
    ended = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC).timestamp()

    m.reconciled(12.5, ended)

    assert value(m, "imagesync_reconcile_duration_seconds") == 12.5
    assert value(m, "imagesync_reconcile_last_run_timestamp_seconds") == ended


def test_two_daemons_metrics_never_share_values():
    a, b = Metrics(), Metrics()

    a.import_failed("gone")

    assert value(a, "imagesync_imports_failed_total", kind="gone") == 1
    assert value(b, "imagesync_imports_failed_total", kind="gone") == 0


# -- copies per store and state: the ledger's own counts, at scrape time


def copies(m: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["store"], s.labels["state"]): s.value
            for family in m.registry.collect() if family.name == "imagesync_copies"
            for s in family.samples}


def test_copies_per_store_and_state_are_read_from_the_ledger_at_every_scrape():
    counts = {("edge", "done"): 3, ("edge", "pending"): 1, ("slow", "done"): 2}
    m = Metrics(counts=lambda: dict(counts))

    assert value(m, "imagesync_copies", store="edge", state="done") == 3
    assert value(m, "imagesync_copies", store="slow", state="done") == 2
    assert value(m, "imagesync_copies", store="edge", state="failed") == 0

    counts[("edge", "done")] = 4
    assert value(m, "imagesync_copies", store="edge", state="done") == 4


def test_every_store_with_a_copy_gets_all_six_states_and_other_stores_none():
    m = Metrics(counts=lambda: {("edge", "in_flight"): 2, ("slow", "failed"): 1})

    assert copies(m) == {**{(store, state): 0 for store in ("edge", "slow") for state in STATES},
                         ("edge", "in_flight"): 2, ("slow", "failed"): 1}
    assert len(STATES) == 6


def test_an_empty_ledger_gives_the_copies_family_without_series():
    m = Metrics(counts=dict)

    assert copies(m) == {}
    assert any(f.name == "imagesync_copies" for f in m.registry.collect())


def test_a_ledger_that_does_not_answer_leaves_copies_out_instead_of_failing_the_scrape():
    def stuck():
        raise TimeoutError

    m = Metrics(counts=stuck)
    m.import_started(["edge"])

    with capture_logs() as logs:
        assert value(m, "imagesync_copies", store="edge", state="done") is None
    assert value(m, "imagesync_imports_started_total", store="edge") == 1
    assert any(e["event"].startswith("copies per state left out") for e in logs)


SETTINGS = Settings(max_attempts=4, backoff=lambda attempt: 100.0 * attempt, poll_interval=2.0,
                    lock_poll=60.0, lock_expiry=3600.0)


def test_copies_come_from_a_real_ledger_through_its_writer_as_the_service_wires_it(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    m = Metrics(counts=lambda: ledger.call(Ops.counts_by_store, timeout=0.5))
    try:
        assert copies(m) == {}
        for n, stores in enumerate([{"fast"}, {"fast", "edge"}]):
            image = Image(f"{n:08x}-0000-4000-8000-000000000000", name=f"image-{n}",
                          status="active", stores=frozenset(stores), size=100, disk_format="raw")
            ledger.call(Ops.record_visit, image.id, image, {"edge": ("r",), "slow": ("r",)}, {},
                        1_800_000_000.0, SETTINGS)
        by_store = ledger.call(Ops.counts_by_store)
        assert by_store == {("edge", "pending"): 1, ("edge", "done"): 1, ("slow", "pending"): 2}
        assert ledger.call(Ops.counts) == {"pending": 3, "done": 1}  # still there, unchanged
        assert copies(m) == {**{(store, state): 0 for store in ("edge", "slow")
                                for state in STATES}, **by_store}
    finally:
        ledger.close()
    with capture_logs():  # closed: left out, quickly
        assert value(m, "imagesync_copies", store="edge", state="done") is None


# -- the endpoint


def test_the_endpoint_serves_the_registry_on_loopback_and_stops(served):
    port = free_port()
    m = served(counts=lambda: {("edge", "in_flight"): 2})
    m.import_started(["edge"])

    assert m.serve("127.0.0.1", port) is True

    assert m.server.server_address[:2] == ("127.0.0.1", port)
    body = scrape(port)
    assert 'imagesync_copies{state="in_flight",store="edge"} 2.0' in body
    assert 'imagesync_copies{state="done",store="edge"} 0.0' in body
    assert 'imagesync_imports_succeeded_total{store="edge"} 0.0' in body
    assert 'imagesync_imports_started_total{store="edge"} 1.0' in body
    assert "process_cpu_seconds_total" not in body  # a private registry: no global collectors
    m.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    again = served()
    assert again.serve("127.0.0.1", port) is True  # as the worker after a reload does
    assert "imagesync_copies" not in scrape(port)  # a new registry, without a ledger


def test_localhost_resolves_to_a_loopback_address_and_is_served(served):
    port = free_port()
    m = served()

    assert m.serve("localhost", port) is True

    assert metrics_mod.bind_address("localhost", port) in ("127.0.0.1", "::1")
    assert m.server.server_address[0] in ("127.0.0.1", "::1")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])
def test_a_non_loopback_host_is_refused_and_nothing_is_bound(monkeypatch, host):
    calls = []
    monkeypatch.setattr(metrics_mod, "start_http_server", lambda *a, **k: calls.append(a))
    m = Metrics()

    with capture_logs() as logs:
        assert m.serve(host, 9393) is False

    assert calls == [] and m.server is None
    assert logs[-1]["log_level"] == "error"
    assert "not a loopback address" in logs[-1]["event"]
    assert "allow_non_loopback" in logs[-1]["event"]


def test_a_non_loopback_host_explicitly_allowed_is_served_with_a_warning(monkeypatch):
    calls = []

    def fake_start(port, addr, registry):
        calls.append((port, addr))

    monkeypatch.setattr(metrics_mod, "start_http_server", fake_start)
    m = Metrics()

    with capture_logs() as logs:
        assert m.serve("0.0.0.0", 9393, allow_non_loopback=True) is True

    assert calls == [(9393, "0.0.0.0")]  # exactly the configured address, nothing wider
    assert any(e["log_level"] == "warning" and "beyond loopback" in e["event"] for e in logs)


def test_a_port_already_taken_logs_an_error_and_the_daemon_goes_on(served):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        m = served()
        with capture_logs() as logs:
            assert m.serve("127.0.0.1", taken.getsockname()[1]) is False
    assert logs[-1]["log_level"] == "error"
    m.import_failed("gone")  # the hooks still work


# -- configuration


def make_conf(**metrics) -> cfg.ConfigOpts:
    conf = conf_mod.register(cfg.ConfigOpts())
    conf([], project="imagesync", default_config_files=[])
    for name, v in metrics.items():
        conf.set_override(name, v, group="metrics")
    return conf


def test_metrics_are_off_by_default_on_loopback_port_9393_when_enabled():
    conf = make_conf()

    assert (conf.metrics.enabled, conf.metrics.host, conf.metrics.port,
            conf.metrics.allow_non_loopback) == (False, "127.0.0.1", 9393, False)
    assert metrics_mod.from_conf(conf) is None


def test_enabled_metrics_serve_on_the_configured_port():
    port = free_port()
    m = metrics_mod.from_conf(make_conf(enabled=True, port=port), counts=dict)
    try:
        assert m is not None and m.server is not None
        assert "imagesync_copies" in scrape(port)
    finally:
        m.stop()
