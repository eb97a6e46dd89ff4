"""The owner-quota reader against a scripted Glance and Keystone: which limit applies (unified
limits, legacy user_storage_quota, none), the owner's usage read fresh, limits cached."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from imagesync.glance import GlanceError
from imagesync.limits import OwnerQuota
from imagesync.model import Image
from imagesync.quota import MIB


class Identity:
    def __init__(self, registered, projects, fail=None):
        self.registered, self.projects, self.fail, self.reads = registered, projects, fail, 0

    def services(self, type):
        return [NS(id="glance-svc")] if type == "image" else []

    def registered_limits(self, resource_name):
        self.reads += 1
        if self.fail:
            raise self.fail
        return [NS(service_id="glance-svc", default_limit=self.registered),
                NS(service_id="nova-svc", default_limit=1)]

    def limits(self, resource_name):
        return [NS(service_id="glance-svc", project_id=p, resource_limit=v)
                for p, v in self.projects.items()]


class Glance:
    def __init__(self, unified: bool, identity: Identity | None = None, images=()):
        self.unified, self.images = unified, list(images)
        self.conn = NS(identity=identity)
        self.listed = 0

    def usage_info(self):
        return {"image_size_total": {"limit": 1, "usage": 0}} if self.unified else {}

    def list_pages(self, hidden=False, owner=None):
        self.listed += 1
        yield [i for i in self.images if i.owner == owner and i.hidden == hidden]


def image(owner, mib, stores=("fast",), hidden=False):
    return Image(f"{owner}-{mib}-{hidden}", owner=owner, size=mib * MIB, status="active",
                 stores=frozenset(stores), hidden=hidden)


def test_unified_limits_hold_what_does_not_fit_the_project_limit_counting_hidden_images():
    glance = Glance(True, Identity(100, {"a": 20}),
                    [image("a", 4, ("fast", "slow")), image("a", 4, hidden=True)])
    q = OwnerQuota(glance, headroom_percent=10)
    # a: 12 MiB used, 18 MiB allowed: one 4 MiB copy fits, not two
    d = q.decide("a", ["slow", "edge"], 4 * MIB, in_flight=0)
    assert (d.go, d.held) == (("slow",), ("edge",))
    assert glance.listed == 2   # hidden images listed too
    # b: the registered 100 MiB
    assert q.decide("b", ["slow", "edge"], 4 * MIB, 0).held == ()


def test_legacy_user_storage_quota_applies_to_every_owner_without_unified_limits():
    glance = Glance(False, None, [image("a", 8)])
    q = OwnerQuota(glance, headroom_percent=0, user_storage_quota=10 * MIB)
    assert q.decide("a", ["slow"], 4 * MIB, in_flight=0).held == ("slow",)
    assert q.decide("a", ["slow"], 2 * MIB, in_flight=0).go == ("slow",)
    assert OwnerQuota(glance).decide("a", ["slow"], 4 * MIB, 0).go == ("slow",)   # no quota


def test_limits_are_cached_and_a_keystone_failure_is_an_error_not_a_free_pass():
    now = [0.0]
    identity = Identity(100, {})
    q = OwnerQuota(Glance(True, identity), ttl=60, clock=lambda: now[0])
    q.decide("a", ["slow"], MIB, 0)
    q.decide("a", ["slow"], MIB, 0)
    assert identity.reads == 1
    identity.fail = RuntimeError("Keystone said 503")
    now[0] = 61
    with pytest.raises(GlanceError, match="cannot read image_size_total limits"):
        q.decide("a", ["slow"], MIB, 0)
