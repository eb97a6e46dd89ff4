"""A ledger that cannot be opened at start: the daemon's handle keeps trying, never crashes."""

from __future__ import annotations

import pytest

from imagesync.ledger import Ledger, LedgerError

from helpers import wait_for


def test_without_retry_open_an_unopenable_ledger_raises_at_once(tmp_path):
    (tmp_path / "state").write_text("a file where a directory should be")
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger(tmp_path / "state" / "ledger.sqlite")


def test_with_retry_open_calls_fail_fast_until_the_ledger_can_be_opened(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where a directory should be")
    ledger = Ledger(blocker / "ledger.sqlite", retry_open=True)
    try:
        with pytest.raises(LedgerError, match="cannot open ledger"):
            ledger.call(lambda ops: "written", timeout=5)
        blocker.unlink()

        def opened():
            try:
                return ledger.call(lambda ops: "written", timeout=5) == "written"
            except LedgerError:
                return False
        wait_for(opened, timeout=10, message="the ledger opened once its directory could be made")
    finally:
        ledger.close()


def test_the_readers_schema_list_names_the_writers_migrations_in_order():
    from imagesync.ledger.migrate import migrations
    from imagesync.ledger.schema import SCHEMA

    assert SCHEMA == [m.name for m in migrations._migrations]
