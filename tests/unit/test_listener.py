"""The listener's pure parts: which transports it accepts, and how a batch is recorded."""

from __future__ import annotations

import oslo_messaging
import pytest

from imagesync import conf as conf_mod
from imagesync.ledger import LedgerError
from imagesync.listener import Endpoint, Listener, ListenerError


def test_a_notification_transport_that_is_not_rabbitmq_is_refused_by_name(tmp_path):
    path = tmp_path / "imagesync.conf"
    path.write_text("[oslo_messaging_notifications]\ntransport_url = fake://\n")
    conf = conf_mod.Config(conf_mod.daemon_cli_opts)
    conf(["--config-file", str(path)], project="imagesync", default_config_files=[])
    with pytest.raises(ListenerError, match="RabbitMQ only: .* FakeDriver driver, not rabbit:"):
        Listener(conf, Endpoint(ledger=None))


class _Ledger:
    def __init__(self, fail: int = 0):
        self.fail, self.batches = fail, []

    def note_events(self, parsed, now):
        if self.fail:
            self.fail -= 1
            raise LedgerError("disk I/O error")
        self.batches.append(parsed)


def _message(event_type="image.update", priority="INFO", image_id="1d818d51-f1d8-4f02-a97d"
             "-aeedcba99c00"):
    return {"event_type": event_type, "priority": priority,
            "payload": {"id": image_id, "status": "active"},
            "metadata": {"message_id": "m", "timestamp": "2026-11-25 00:53:53.197930"}}


def test_a_batch_is_recorded_in_one_commit_and_garbage_in_it_is_dropped():
    ledger = _Ledger()
    result = Endpoint(ledger).handle_batch(
        [_message(), _message(priority=7), _message(event_type=None), _message()])
    assert result == oslo_messaging.NotificationResult.HANDLED
    assert [len(b) for b in ledger.batches] == [2]


def test_a_batch_the_ledger_never_takes_is_requeued_after_bounded_tries():
    ledger = _Ledger(fail=99)
    slept = []
    endpoint = Endpoint(ledger, sleep=lambda s: slept.append(s) and False, max_write_tries=3)
    assert endpoint.handle_batch([_message()]) == oslo_messaging.NotificationResult.REQUEUE
    assert len(slept) == 3 and not endpoint.healthy.is_set()
