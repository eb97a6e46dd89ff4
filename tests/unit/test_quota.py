"""The owner-quota arithmetic: usage as Glance counts it, limits as Keystone gives them, and
which copies of an image fit under an owner's limit with imagesync's headroom."""

from __future__ import annotations

import pytest

from imagesync.model import Image
from imagesync.quota import MIB, Limits, parse_storage_quota, room, usage


def image(n: int, size, stores=("fast",), status="active") -> Image:
    return Image(f"{n:08x}-0000-4000-8000-000000000000", owner="p", size=size,
                 stores=frozenset(stores), status=status)


def test_usage_is_size_times_stores_over_the_images_glance_counts():
    images = [image(1, 10 * MIB, ("fast", "slow")), image(2, 5 * MIB),
              image(3, 7 * MIB, status="killed"), image(4, 7 * MIB, status="pending_delete"),
              image(5, None), image(6, 0), image(7, 3 * MIB, (), status="queued")]
    assert usage(images) == 25 * MIB


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("1048576", MIB), ("500MB", 500 * MIB), ("10 gb", 10 << 30), ("1TB", 1 << 40),
    ("2KB", 2048), ("7B", 7)])
def test_glance_s_legacy_quota_syntax(text, expected):
    assert parse_storage_quota(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "-1", "1.5GB", "10PB", "GB"])
def test_a_bad_legacy_quota_is_refused_by_name(text):
    with pytest.raises(ValueError, match="not a storage quota"):
        parse_storage_quota(text)


def test_a_project_limit_overrides_the_registered_one_and_minus_one_means_none():
    limits = Limits.from_keystone(100, {"a": 10, "b": -1})
    assert (limits.of("a"), limits.of("b"), limits.of("c")) == (10 * MIB, None, 100 * MIB)
    assert Limits.from_keystone(None, {}).of("a") is None
    assert Limits.from_keystone(-1, {"a": 5}).of("c") is None


def test_copies_go_while_they_fit_under_the_limit_less_the_headroom():
    # 100 MiB limit, 10 % headroom: 90 MiB for the owner's images and imagesync's copies
    def fits(used, in_flight, n=2, size=20 * MIB):
        return room(["slow", "edge"][:n], size, "p", used, in_flight, 100 * MIB, 10.0)

    assert fits(40 * MIB, 0).go == ("slow", "edge") and not fits(40 * MIB, 0).held
    assert fits(40 * MIB, 20 * MIB).go == ("slow",) and fits(40 * MIB, 20 * MIB).held == ("edge",)
    held = fits(60 * MIB, 20 * MIB)
    assert held.go == () and held.held == ("slow", "edge")
    assert held.reason is not None and "owner quota" in held.reason and "project p" in held.reason
    assert "100 MiB" in held.reason and "10% headroom" in held.reason


def test_without_a_limit_or_a_size_nothing_is_held():
    assert room(["slow"], 20 * MIB, "p", 10**15, 0, None, 10.0).go == ("slow",)
    assert room(["slow"], None, "p", 10**15, 0, MIB, 10.0).go == ("slow",)
