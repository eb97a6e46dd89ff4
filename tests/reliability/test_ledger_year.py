"""The ledger stays small: a simulated year of a busy cloud's churn, written through the
daemon's own ledger operations and pruned with the default retention.

The churn (tests/unit/test_ledger_prune.py, `Churn`): 200 uploads a day copied to two more
stores, 80% deleted after 7 to 60 days, 10% of copies failing once, 5 CLI requests and a
reconcile pass a day. CI simulates 60 days; `tox -e reliability` the whole year.
"""

from __future__ import annotations

from imagesync.ledger import Retention

from unit.test_ledger_prune import Churn, simulate_churn

GOAL_MB = 100


def test_a_year_of_churn_leaves_the_ledger_well_under_100_mb(tmp_path, scale, figures):
    days = 365 if scale["full"] else 60
    got = simulate_churn(tmp_path / "ledger.sqlite", days, Retention(), Churn())

    assert got["file_mb"] < GOAL_MB / 4, got
    assert got["deleted_images"] < got["uploads"], "deleted images' rows are pruned"
    figures("ledger size", f"file after {days} days of churn ({got['uploads']} uploads, default "
            "retention)", f"{got['file_mb']:.1f} MiB ({got['copies']} copies, "
            f"{got['images']} images tracked)", "tox -e reliability -- -k year_of_churn")
