"""Stories about policy version 2: deny rules, the new matchers, globs, suitability as policy.

Version 1 files keep their meaning (the last section and test_policy.py say so); `version: 2`
opts in. The planner's side of suitability (which copies are skipped) is told here too, with
planner.targets, because that is where an operator sees it.
"""

from __future__ import annotations

import fnmatch
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from imagesync.model import Image
from imagesync.planner import StoreInfo, targets
from imagesync.policy import (
    DEFAULT_SUITABILITY,
    Policy,
    PolicyError,
    Verdict,
    load_policy,
    parse_policy,
)

from unit import test_policy

NOW = 1_800_000_000.0
HOUR, DAY = 3600, 86400
GiB = 2**30
PROJECT_X = "0c3f9f4a5b6d4e7f8a9b0c1d2e3f4a5b"
EDGE_PROJECT = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
LIVE = ("edge", "fast", "slow")


def image(**fields: object) -> Image:
    """An active, shared, raw image of 2 GiB made a day ago, unless the test says otherwise."""
    defaults: dict[str, object] = {
        "id": "img-1", "name": "debian-12", "owner": "someone-else", "visibility": "shared",
        "status": "active", "disk_format": "raw", "container_format": "bare",
        "size": 2 * GiB, "created_at": NOW - DAY,
    }
    return Image(**{**defaults, **fields})  # type: ignore[arg-type]


def policy(text: str, **kwargs: Any) -> Policy:
    return parse_policy(textwrap.dedent(text), "policy.yaml", **kwargs)


def v2_rule(match: str, stores: str = "[fast]", version: int = 2) -> Policy:
    """A policy whose single adding rule 'r' has the given flow-style match."""
    return policy(f"version: {version}\nrules:\n  - name: r\n    match: {match}\n"
                  f"    stores: {stores}\n")


# -- deny ---------------------------------------------------------------------------------------

PUBLIC_BUT_NOT_X = f"""\
    version: 2
    deny:                      # before the rules in the file: still applied after them all
      - name: never-project-x
        match: {{projects: [{PROJECT_X}]}}
        stores: all
    rules:
      - name: public-everywhere
        match: {{visibility: public}}
        stores: all
      - name: pinned-to-edge
        match: {{tags: [edge]}}
        stores: [edge]
"""


def test_a_deny_rule_with_stores_all_keeps_a_project_off_every_store() -> None:
    given_policy = policy(PUBLIC_BUT_NOT_X)

    assert given_policy.desired(image(visibility="public"), LIVE) == {
        "edge": ("public-everywhere",), "fast": ("public-everywhere",),
        "slow": ("public-everywhere",)}
    assert given_policy.desired(image(visibility="public", owner=PROJECT_X, tags={"edge"}),
                                LIVE) == {}


def test_explain_lists_deny_verdicts_after_the_adding_ones_with_the_stores_they_remove() -> None:
    given_policy = policy(PUBLIC_BUT_NOT_X)

    verdicts = given_policy.explain(image(visibility="public", owner=PROJECT_X), LIVE)

    assert verdicts == [
        Verdict("public-everywhere", True, None, frozenset(LIVE)),
        Verdict("pinned-to-edge", False, "image lacks tag edge, rule wants all of edge",
                frozenset()),
        Verdict("never-project-x", True, None, frozenset(LIVE), deny=True),
    ]
    [deny] = given_policy.explain(image(), LIVE)[2:]
    assert deny == Verdict("never-project-x", False,
                           f"owner is 'someone-else', rule wants {PROJECT_X}", frozenset(),
                           deny=True)


def test_a_deny_rule_naming_stores_removes_only_those_and_only_what_was_wanted() -> None:
    given_policy = policy("""\
        version: 2
        rules:
          - {name: everywhere, match: {}, stores: all}
          - {name: also-archive, match: {}, stores: [archive]}
        deny:
          - {name: big-not-on-edge, match: {size: {min: 1GiB}}, stores: [edge, elsewhere]}
          - {name: not-on-slow-but-archive, match: {}, stores: all, exclude_stores: [archive]}
        """)

    verdicts = given_policy.explain(image(size=5 * GiB), LIVE)

    assert [(v.rule, sorted(v.stores)) for v in verdicts if v.deny] == [
        ("big-not-on-edge", ["edge"]), ("not-on-slow-but-archive", ["edge", "fast", "slow"])]
    assert given_policy.desired(image(size=5 * GiB), LIVE) == {"archive": ("also-archive",)}
    assert given_policy.stores_named() == {"archive", "edge", "elsewhere"}


def test_deny_rule_names_share_one_namespace_with_the_adding_rules() -> None:
    with pytest.raises(PolicyError, match=r"deny\[0\]\.name: duplicate rule name 'r' "
                                          r"\(rules\[0\] already uses it\)"):
        policy("""\
            version: 2
            rules: [{name: r, match: {}, stores: all}]
            deny: [{name: r, match: {}, stores: all}]
            """)


# -- the new matchers ---------------------------------------------------------------------------

V2_MATCHER_STORIES = [
    # (match, image fields, expected reason or None when it matches)
    ("{hidden: false}", {"hidden": False}, None),
    ("{hidden: false}", {"hidden": True}, "hidden (os_hidden) is true, rule wants false"),
    ("{hidden: true}", {"hidden": True}, None),
    ("{protected: true}", {"protected": True}, None),
    ("{protected: true}", {"protected": False}, "protected is false, rule wants true"),
    ("{size: {min: 1GiB, max: 100GiB}}", {"size": GiB}, None),            # inclusive
    ("{size: {min: 1GiB, max: 100GiB}}", {"size": 100 * GiB}, None),      # inclusive
    ("{size: {min: 1GiB}}", {"size": 13_287_936},
     "size is 12.7MiB, rule wants at least 1GiB"),
    ("{size: {max: 1GB}}", {"size": 2 * GiB}, "size is 2GiB, rule wants at most 1GB"),
    ("{size: {min: 1073741824}}", {"size": GiB}, None),                   # bytes as an integer
    ("{size: {min: 1.5TB}}", {"size": 2 * 10**12}, None),
    ("{size: {min: 1 KiB, max: 2KiB}}", {"size": 4096}, "size is 4KiB, rule wants 1KiB to 2KiB"),
    ("{size: {min: 0}}", {"size": None}, "size is not known, rule wants at least 0B"),
    ("{age: {min: 1h, max: 90d}}", {"created_at": NOW - HOUR}, None),
    ("{age: {max: 90d}}", {"created_at": NOW - 91 * DAY}, "age is 13w, rule wants at most 90d"),
    ("{age: {min: 2w}}", {"created_at": NOW - 3 * HOUR}, "age is 3h, rule wants at least 2w"),
    ("{age: {min: 3600}}", {"created_at": NOW - HOUR}, None),             # seconds as an integer
    ("{age: {min: 1h}}", {"created_at": None}, "age unknown (the image has no created_at)"),
    ("{shared_with: [a, b]}", {"members": {"b", "c"}}, None),
    ("{shared_with: a}", {"members": set()}, "image is not shared with a"),
    ("{shared_with: [a, b]}", {"members": {"c"}}, "image is not shared with one of a, b"),
    ("{shared_with: [a]}", {"members": None},
     "members unknown (the image's members were not read from Glance)"),
    ("{name: ['centos-*', 'debian-1?']}", {"name": "debian-12"}, None),
    ("{properties: {os_distro: 'ubuntu*'}}", {"properties": {"os_distro": "ubuntu-core"}}, None),
    ("{properties: {os_version: ['22.*', '24.*']}}", {"properties": {"os_version": "24.04"}},
     None),
    ("{properties: {os_distro: 'ubuntu*'}}", {"properties": {"os_distro": "Ubuntu"}},
     "property os_distro is 'Ubuntu', rule wants a value matching ubuntu*"),
    ("{properties: {os_distro: '*'}}", {"properties": {}},
     "property os_distro is not set, rule wants a value matching *"),
]


@pytest.mark.parametrize(("match", "fields", "reason"), V2_MATCHER_STORIES,
                         ids=[f"{m} vs {f}" for m, f, _ in V2_MATCHER_STORIES])
def test_each_version_2_matcher_matches_or_explains_why_not(
    match: str, fields: dict[str, object], reason: str | None
) -> None:
    rule = v2_rule(match).rules[0]

    assert rule.mismatch(image(**fields), NOW) == reason
    assert rule.matches(image(**fields), NOW) is (reason is None)


def test_an_age_rule_does_not_match_without_the_current_time() -> None:
    given_policy = v2_rule("{age: {max: 90d}}")

    [verdict] = given_policy.explain(image(), LIVE)

    assert verdict.matched is False
    assert verdict.reason == "age unknown (no current time was given)"
    assert given_policy.desired(image(), LIVE, now=NOW) == {"fast": ("r",)}


def test_the_policy_says_when_image_members_must_be_read() -> None:
    assert not v2_rule("{visibility: shared}").needs_members
    assert v2_rule("{shared_with: [p]}").needs_members
    assert policy("""\
        version: 2
        rules: []
        deny: [{name: d, match: {shared_with: [p]}, stores: all}]
        """).needs_members


def test_an_image_shared_with_a_project_goes_to_that_projects_edge_store() -> None:
    given_policy = v2_rule(f"{{shared_with: [{EDGE_PROJECT}]}}", stores="[edge]")

    shared = image(visibility="shared", members={EDGE_PROJECT, "another"})

    assert given_policy.desired(shared, LIVE) == {"edge": ("r",)}
    assert given_policy.desired(image(members=frozenset()), LIVE) == {}


# -- Image: the facts the new matchers read -----------------------------------------------------


def test_image_from_api_reads_created_at_protected_and_leaves_members_unread() -> None:
    body = {"id": "i", "created_at": "2026-11-30T12:00:00Z", "protected": True,
            "os_hidden": False, "status": "active", "os_distro": "ubuntu"}

    read = Image.from_api(body)

    assert read.created_at == 1_796_040_000.0
    assert read.protected is True and read.hidden is False
    assert read.members is None
    assert dict(read.properties) == {"os_distro": "ubuntu"}
    assert Image.from_api({"id": "i", "created_at": "yesterday"}).created_at is None
    assert Image.from_api({"id": "i", "created_at": "2026-11-30T12:00:00"}).created_at == \
        1_796_040_000.0
    assert Image.from_api({"id": "i", "protected": "false"}).protected is False


# -- suitability: which copies are useful, by store type ----------------------------------------

STORES = {
    "files": StoreInfo("files", "file"),
    "ceph": StoreInfo("ceph", "rbd"),
    "array": StoreInfo("array", "cinder"),
}
CLONE_SKIP = "qcow2 image on {} store {} cannot be cloned there (copy-image does not convert)"


def everywhere(extra: str = "", top: str = "") -> Policy:
    return policy(f"version: 2\n{top}rules:\n  - name: all\n    match: {{}}\n    stores: all\n"
                  f"{extra}")


def test_by_default_a_non_raw_image_skips_rbd_and_cinder_stores_as_in_version_1() -> None:
    desired, skipped = targets(everywhere(), image(disk_format="qcow2"), STORES)

    assert set(desired) == {"files"}
    assert skipped == {"ceph": (("all",), CLONE_SKIP.format("rbd", "ceph")),
                       "array": (("all",), CLONE_SKIP.format("cinder", "array"))}
    assert everywhere().suitability == DEFAULT_SUITABILITY


def test_a_top_level_suitability_replaces_the_default() -> None:
    given_policy = everywhere(top="suitability: {rbd: [raw, qcow2], file: [raw]}\n")

    desired, skipped = targets(given_policy, image(disk_format="qcow2"), STORES)

    assert set(desired) == {"ceph", "array"}   # cinder is not listed: no longer restricted
    assert set(skipped) == {"files"}


def test_a_rules_suitability_overrides_the_top_level_one_for_that_rule_only() -> None:
    given_policy = policy("""\
        version: 2
        rules:
          - name: qcow2-on-ceph
            match: {tags: [ceph-qcow2]}
            stores: [ceph]
            suitability: {rbd: [raw, qcow2], cinder: [raw]}
          - {name: others-on-ceph, match: {}, stores: [ceph]}
        """)
    tagged = image(disk_format="qcow2", tags={"ceph-qcow2"})

    assert targets(given_policy, tagged, STORES) == (
        {"ceph": ("qcow2-on-ceph", "others-on-ceph")}, {})
    assert targets(given_policy, image(disk_format="qcow2"), STORES) == (
        {}, {"ceph": (("others-on-ceph",), CLONE_SKIP.format("rbd", "ceph"))})


def test_a_store_is_skipped_only_when_every_rule_wanting_it_says_so() -> None:
    given_policy = everywhere("  - {name: raw-only, match: {}, stores: [ceph, array]}\n"
                              "  - name: anything\n    match: {}\n    stores: [array]\n"
                              "    suitability: ignore\n")

    desired, skipped = targets(given_policy, image(disk_format="qcow2"), STORES)

    assert desired == {"files": ("all",), "array": ("all", "raw-only", "anything")}
    assert skipped == {"ceph": (("all", "raw-only"), CLONE_SKIP.format("rbd", "ceph"))}


def test_suitability_ignore_copies_any_format_even_when_store_types_are_unknown() -> None:
    given_policy = everywhere(top="suitability: ignore\n")

    assert targets(given_policy, image(disk_format="qcow2"), STORES)[1] == {}
    pinned = policy("version: 2\nrules:\n  - {name: p, match: {}, stores: [ceph], "
                    "suitability: ignore}\n")
    assert targets(pinned, image(disk_format="iso"), None) == ({"ceph": ("p",)}, {})


UNKNOWN_TYPES = [
    # (stores as Glance gave them, the reason's words)
    (None, "Glance's store list could not be read"),
    ({"ceph": StoreInfo("ceph", None)}, "Glance did not say the type of store ceph"),
    ({"ceph": StoreInfo("ceph", "ceph-rbd")},
     "store ceph has type 'ceph-rbd', which imagesync does not know"),
    ({"files": StoreInfo("files", "file")}, "Glance does not list store ceph"),
]


@pytest.mark.parametrize(("stores", "why"), UNKNOWN_TYPES, ids=[w for _, w in UNKNOWN_TYPES])
def test_suitability_is_never_silently_off_when_store_types_cannot_be_read(
    stores: dict[str, StoreInfo] | None, why: str
) -> None:
    pinned = policy("version: 2\nrules:\n  - {name: p, match: {}, stores: [ceph]}\n")

    desired, skipped = targets(pinned, image(disk_format="qcow2"), stores)

    assert desired == {}
    assert skipped == {"ceph": (("p",), (
        f"the store types could not be read ({why}), so suitability could not be checked: "
        "a qcow2 image is useless on cinder or rbd stores"))}
    assert targets(pinned, image(disk_format="raw"), stores) == ({"ceph": ("p",)}, {})


def test_a_version_1_policy_still_copies_when_store_types_are_unknown() -> None:
    pinned = policy("version: 1\nrules:\n  - {name: p, match: {}, stores: [ceph]}\n")

    for stores, _ in UNKNOWN_TYPES:
        assert targets(pinned, image(disk_format="qcow2"), stores) == ({"ceph": ("p",)}, {})


def test_a_rule_suitability_that_leaves_out_a_restricted_type_warns() -> None:
    given_policy = everywhere("    suitability: {rbd: [raw, qcow2]}\n")

    assert [str(w) for w in given_policy.warnings] == [
        "policy.yaml:4:12: rules[0].match: empty, so this rule matches every image",
        "policy.yaml:6:18: rules[0].suitability: leaves out cinder: a rule's suitability "
        "replaces the top-level one as a whole, so this rule copies any disk format to cinder "
        "stores"]
    assert given_policy.suitability_of("all") == (("rbd", ("raw", "qcow2")),)


def test_targets_passes_now_to_age_rules() -> None:
    young = policy("version: 2\nrules:\n  - {name: young, match: {age: {max: 1d}}, "
                   "stores: [files]}\n")

    assert targets(young, image(created_at=NOW - HOUR), STORES, now=NOW)[0] == {
        "files": ("young",)}
    assert targets(young, image(created_at=NOW - HOUR), STORES)[0] == {}


# -- validation against Glance's schema ----------------------------------------------------------

SCHEMA = {"properties": {
    "disk_format": {"type": ["null", "string"], "enum": [None, "raw", "qcow2", "ploop2"]},
    "container_format": {"type": ["null", "string"], "enum": [None, "bare"]},
    "name": {"type": ["null", "string"]},
    "min_ram": {"type": "integer"},
    "os_distro": {"type": "string", "is_base": False},   # from schema-image.json
}}


def test_formats_and_core_attributes_are_checked_against_glances_schema_when_given() -> None:
    allowed = ("version: 2\nrules:\n  - {name: r, match: {disk_format: ploop2, "
               "properties: {os_distro: ubuntu}}, stores: all}\n")
    with pytest.raises(PolicyError, match="unknown disk format 'ploop2'"):
        parse_policy(allowed)

    assert parse_policy(allowed, schema=SCHEMA).rules[0].disk_format == ("ploop2",)
    refused = "version: 2\nrules:\n  - name: r\n    match: {disk_format: vmdk, " \
        "properties: {min_ram: '512'}}\n    stores: all\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(refused, "p.yaml", schema=SCHEMA)
    assert [str(p) for p in caught.value.problems] == [
        "p.yaml:4:26: rules[0].match.disk_format: unknown disk format 'vmdk' "
        "(this Glance allows: ploop2, qcow2, raw)",
        "p.yaml:4:45: rules[0].match.properties.min_ram: min_ram is a core image attribute, "
        "not a property, so it never matches here; no matcher reads it",
    ]


def test_load_policy_takes_the_schema_too(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 2\nsuitability: {rbd: [ploop2]}\nrules: []\n")

    assert load_policy(path, schema=SCHEMA).suitability == (("rbd", ("ploop2",)),)


# -- version 1 keeps its meaning ----------------------------------------------------------------


def test_version_1_matches_hidden_images_and_property_values_literally() -> None:
    rule = v2_rule("{properties: {os_distro: 'ubuntu*'}}", version=1).rules[0]

    assert rule.matches(image(hidden=True, properties={"os_distro": "ubuntu*"}))
    assert not rule.matches(image(properties={"os_distro": "ubuntu-core"}))


def test_version_1_only_warns_about_unknown_formats_and_core_attribute_properties() -> None:
    given_policy = v2_rule("{disk_format: rawr, properties: {size: '5'}}", version=1)

    assert [str(w) for w in given_policy.warnings] == [
        "policy.yaml:4:26: rules[0].match.disk_format: unknown disk format 'rawr' "
        "(Glance's defaults: aki, ami, ari, iso, ploop, qcow2, raw, vdi, vhd, vhdx, vmdk)",
        "policy.yaml:4:45: rules[0].match.properties.size: size is a core image attribute, "
        "not a property, so it never matches here; use match.size (version 2)",
    ]
    assert given_policy.rules[0].disk_format == ("rawr",)


# -- broken version 2 files -----------------------------------------------------------------------

def rule_file(*lines: str) -> str:
    return test_policy.rule_file(*lines, version=2)


def with_match(match: str) -> str:
    return test_policy.with_match(match, version=2)


def top(*lines: str) -> str:
    return "version: 2\n" + "\n".join(lines) + "\n"


# (id, text, line, column, words the message must contain)
BROKEN_V2 = [
    ("hidden a string", with_match("{hidden: 'no'}"), 4, 21,
     "rules[0].match.hidden: expected true or false, got a string ('no')"),
    ("protected a number", with_match("{protected: 1}"), 4, 24,
     "expected true or false, got an integer"),
    ("hidden a list", with_match("{hidden: [false]}"), 4, 21, "expected true or false, got a list"),
    ("size a bare string", with_match("{size: 10GiB}"), 4, 19,
     "rules[0].match.size: expected a mapping with min and/or max, e.g. {min: 10GiB}"),
    ("size lower-case unit", with_match("{size: {min: 10gb}}"), 4, 25,
     "rules[0].match.size.min: unknown unit 'gb' in '10gb' (units: B, KB, MB, GB, TB, KiB"),
    ("size without unit", with_match("{size: {max: '1024'}}"), 4, 25, "no unit in '1024'"),
    ("size negative", with_match("{size: {min: -1}}"), 4, 25, "size.min: -1 is negative"),
    ("size a float", with_match("{size: {min: 1.5}}"), 4, 25,
     "expected an integer or a string with a unit, e.g. 10GiB, got a float"),
    ("size a boolean", with_match("{size: {min: yes}}"), 4, 25, "got a boolean"),
    ("size min above max", with_match("{size: {min: 2GiB, max: 1GiB}}"), 4, 19,
     "rules[0].match.size: min 2GiB is more than max 1GiB, so no image matches"),
    ("size empty", with_match("{size: {}}"), 4, 19, "empty mapping; give min and/or max"),
    ("size unknown bound", with_match("{size: {minimum: 1}}"), 4, 20,
     "unknown key 'minimum' (known: max, min)"),
    ("age unknown unit", with_match("{age: {max: 3mo}}"), 4, 24,
     "rules[0].match.age.max: unknown unit 'mo' in '3mo' (units: s, m, h, d, w)"),
    ("age min above max", with_match("{age: {min: 2d, max: 36h}}"), 4, 18,
     "min 2d is more than max 36h"),
    ("age not a number", with_match("{age: {min: old}}"), 4, 24,
     "'old' is not a number with a unit, e.g. 90d"),
    ("shared_with empty", with_match("{shared_with: []}"), 4, 26, "empty list"),
    ("shared_with a number", with_match("{shared_with: [5]}"), 4, 27, "value 5 is an integer"),
    ("disk_format typo", with_match("{disk_format: rawr}"), 4, 26,
     "rules[0].match.disk_format: unknown disk format 'rawr' (Glance's defaults: aki, ami"),
    ("disk_format typo in a list", with_match("{disk_format: [raw, qcow]}"), 4, 32,
     "unknown disk format 'qcow'"),
    ("container_format typo", with_match("{container_format: bear}"), 4, 31,
     "unknown container format 'bear' (Glance's defaults: aki, ami, ari, bare, compressed"),
    ("property disk_format", with_match("{properties: {disk_format: raw}}"), 4, 26,
     "properties.disk_format: disk_format is a core image attribute, not a property, so it "
     "never matches here; use match.disk_format"),
    ("property os_hidden", with_match("{properties: {os_hidden: 'true'}}"), 4, 26,
     "use match.hidden"),
    ("property owner", with_match("{properties: {owner: p1}}"), 4, 26, "use match.projects"),
    ("property created_at", with_match("{properties: {created_at: '2026*'}}"), 4, 26,
     "use match.age"),
    ("property id", with_match("{properties: {id: x}}"), 4, 26, "no matcher reads it"),
    ("property os_glance_*", with_match("{properties: {os_glance_failed_import: x}}"), 4, 26,
     "reserved property: Glance manages os_glance_* itself"),
    ("unknown matcher", with_match("{hiden: false}"), 4, 13,
     "unknown matcher 'hiden' (known: age, container_format, disk_format, hidden, name, "
     "projects, properties, protected, shared_with, size, tags, visibility)"),
    ("suitability unknown store type", top("suitability: {rdb: [raw]}", "rules: []"), 2, 15,
     "suitability.rdb: unknown store type 'rdb' (known: cinder, file, http, rbd, s3, swift, "
     "vmware)"),
    ("suitability format typo", top("suitability: {rbd: [rawr]}", "rules: []"), 2, 21,
     "suitability.rbd: unknown disk format 'rawr'"),
    ("suitability empty list", top("suitability: {rbd: []}", "rules: []"), 2, 20, "empty list"),
    ("suitability empty mapping", top("suitability: {}", "rules: []"), 2, 14,
     "suitability: empty mapping; give store types and their disk formats, or write `ignore`"),
    ("suitability a list", top("suitability: [rbd]", "rules: []"), 2, 14,
     "expected `ignore` or a mapping of store type to disk formats, e.g. {rbd: [raw]}, "
     "got a list"),
    ("suitability off", top("suitability: off", "rules: []"), 2, 14,
     "suitability: expected `ignore` or a mapping of store type to disk formats, e.g. "
     "{rbd: [raw]}, got a boolean"),
    ("rule suitability typo", rule_file("name: r", "match: {}", "stores: all",
                                        "suitability: ignroe"), 6, 18,
     "rules[0].suitability: expected `ignore` or a mapping"),
    ("rule suitability type null", rule_file("name: r", "match: {}", "stores: all",
                                             "suitability: {rbd: [raw], cinder: }"), 6, 38,
     "rules[0].suitability.cinder: expected a string, got null"),
    ("deny without stores", top("rules: []", "deny:", "  - {name: d, match: {}}"), 4, 5,
     "deny[0]: missing required key 'stores'"),
    ("deny with suitability",
     top("rules: []", "deny:", "  - {name: d, match: {}, stores: all, suitability: ignore}"),
     4, 39, "deny[0]: unknown key 'suitability' (known: description, exclude_stores, match, "
     "name, stores)"),
    ("deny empty", top("rules: []", "deny: []"), 3, 7,
     "deny: empty list; give at least one rule or remove the key"),
    ("deny a mapping", top("rules: []", "deny: {name: d}"), 3, 7,
     "deny: expected a list of rules, got a mapping"),
    ("deny stores some", top("rules: []", "deny: [{name: d, match: {}, stores: some}]"), 3, 37,
     "deny[0].stores: 'some' is not allowed; write `all` or a list"),
    ("deny unknown store", top("rules: []", "deny: [{name: d, match: {}, stores: [egde]}]"),
     3, 38, "deny[0].stores: unknown store 'egde' (Glance has: edge, fast, slow)"),
    ("deny unknown matcher",
     top("rules: []", "deny: [{name: d, match: {project: p}, stores: all}]"), 3, 26,
     "deny[0].match: unknown matcher 'project'"),
    ("deny names a rule's name",
     top("rules: [{name: r, match: {}, stores: all}]", "deny: [{name: r, match: {}, stores: all}]"),
     3, 15, "deny[0].name: duplicate rule name 'r' (rules[0] already uses it)"),
    ("deny in a version 1 file", "version: 1\nrules: []\ndeny: []\n", 3, 1,
     "unknown key 'deny' (known: rules, version); it needs `version: 2`"),
    ("version 2 matcher in a version 1 file",
     "version: 1\nrules:\n  - {name: r, match: {hidden: false}, stores: all}\n", 3, 23,
     "unknown matcher 'hidden' (known: container_format, disk_format, name, projects, "
     "properties, tags, visibility); it needs `version: 2`"),
    ("version 2 quoted", "version: '2'\nrules: []\n", 1, 10,
     "expected the integer 2, got a string ('2'); write `version: 2`"),
    ("version 3", "version: 3\nrules: []\n", 1, 10,
     "unsupported version 3; this imagesync reads versions 1 and 2"),
]


@pytest.mark.parametrize(("text", "line", "column", "words"),
                         [case[1:] for case in BROKEN_V2], ids=[case[0] for case in BROKEN_V2])
def test_a_broken_version_2_file_is_refused_with_file_line_and_column(
    tmp_path: Path, text: str, line: int, column: int, words: str
) -> None:
    test_policy.assert_refused_at(tmp_path / "policy.yaml", text, line, column, words)


def test_there_are_at_least_thirty_distinct_broken_version_2_files() -> None:
    assert len({text for _, text, *_ in BROKEN_V2}) >= 30


# -- property: desired() is matched additions minus matched denials -----------------------------

STORE_IDS = ("a", "b", "c", "d")
PROJECTS = ("p1", "p2")

match_strategy = st.fixed_dictionaries({}, optional={
    "projects": st.lists(st.sampled_from(PROJECTS), min_size=1, max_size=2, unique=True),
    "hidden": st.booleans(),
    "protected": st.booleans(),
    "size": st.sampled_from(({"min": "1KiB"}, {"max": 2048}, {"min": 1024, "max": "1KiB"})),
    "age": st.sampled_from(({"min": "1h"}, {"max": "1d"})),
    "shared_with": st.lists(st.sampled_from(PROJECTS), min_size=1, max_size=2, unique=True),
    "properties": st.fixed_dictionaries({"os_distro": st.sampled_from(("ubu*", "*", "debian"))}),
})
rule_strategy = st.fixed_dictionaries(
    {"match": match_strategy, "stores": st.just("all") | st.lists(
        st.sampled_from(STORE_IDS), min_size=1, max_size=3, unique=True)},
    optional={"exclude_stores": st.lists(st.sampled_from(STORE_IDS), unique=True)},
)
image_strategy = st.builds(
    Image, id=st.just("img"), owner=st.sampled_from((*PROJECTS, None)),
    hidden=st.booleans(), protected=st.booleans(),
    size=st.sampled_from((None, 512, 1024, 4096)),
    created_at=st.sampled_from((None, NOW - 60, NOW - 2 * HOUR, NOW - 2 * DAY)),
    members=st.none() | st.frozensets(st.sampled_from(PROJECTS)),
    properties=st.dictionaries(st.just("os_distro"), st.sampled_from(("ubuntu", "debian"))),
)
AMOUNTS = {"1KiB": 1024, "1h": HOUR, "1d": DAY}


def oracle_matches(match: dict[str, Any], img: Image) -> bool:
    """README "Policy version 2", said again as plainly as possible."""
    def within(actual: float | None, bounds: dict[str, Any]) -> bool:
        low, high = (AMOUNTS.get(bounds.get(k), bounds.get(k)) for k in ("min", "max"))
        return actual is not None and (low is None or actual >= low) and \
            (high is None or actual <= high)

    age = None if img.created_at is None else NOW - img.created_at
    checks = {
        "projects": lambda wanted: img.owner in wanted,
        "hidden": lambda wanted: img.hidden == wanted,
        "protected": lambda wanted: img.protected == wanted,
        "size": lambda wanted: within(img.size, wanted),
        "age": lambda wanted: within(age, wanted),
        "shared_with": lambda wanted: bool(img.members and set(wanted) & img.members),
        "properties": lambda wanted: all(
            k in img.properties and fnmatch.fnmatchcase(img.properties[k], v)
            for k, v in wanted.items()),
    }
    return all(checks[key](wanted) for key, wanted in match.items())


def oracle_stores(rule: dict[str, Any], universe: list[str]) -> set[str]:
    stores = set(universe if rule["stores"] == "all" else rule["stores"])
    return stores - set(rule.get("exclude_stores", ()))


@settings(max_examples=200, deadline=None)
@given(st.lists(rule_strategy, max_size=3), st.lists(rule_strategy, max_size=2), image_strategy,
       st.lists(st.sampled_from(STORE_IDS), unique=True))
def test_desired_stores_are_the_matched_additions_minus_the_matched_denials(
    adding: list[dict[str, Any]], deny: list[dict[str, Any]], img: Image, live: list[str]
) -> None:
    named = [{"name": f"add-{i}", **rule} for i, rule in enumerate(adding)]
    denials = [{"name": f"deny-{i}", **rule} for i, rule in enumerate(deny)]
    document = {"version": 2, "rules": named, **({"deny": denials} if denials else {})}
    given_policy = parse_policy(yaml.safe_dump(document))

    expected: dict[str, list[str]] = {}
    for rule in named:
        if oracle_matches(rule["match"], img):
            for store in sorted(oracle_stores(rule, live)):
                expected.setdefault(store, []).append(rule["name"])
    for rule in denials:
        if oracle_matches(rule["match"], img):
            for store in oracle_stores(rule, list(expected)):
                expected.pop(store, None)

    assert given_policy.desired(img, live, NOW) == {s: tuple(n) for s, n in expected.items()}
    assert [(v.rule, v.matched, v.deny) for v in given_policy.explain(img, live, NOW)] == [
        (rule["name"], oracle_matches(rule["match"], img), rule in denials)
        for rule in (*named, *denials)]
