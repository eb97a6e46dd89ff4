"""Stories about the placement policy: which stores an image wants; how a bad file is refused."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from imagesync.model import Image
from imagesync.policy import (
    Policy,
    PolicyError,
    Problem,
    Rule,
    Verdict,
    load_policy,
    parse_policy,
)

TENANT_A = "6f9ddcf4d9f148789b03a20447a39f8c"
LIVE = ("edge-small", "fast", "slow")

DESIGN_EXAMPLE = f"""\
version: 1
rules:
  - name: public-everywhere
    match:
      visibility: [public, community]
    stores: all
    exclude_stores: [edge-small]
  - name: tenant-a
    match:
      projects: [{TENANT_A}]
    stores: [netapp-a]
  - name: golden-ubuntu
    match:
      name: "ubuntu-*"
      tags: [golden]
      properties: {{os_distro: ubuntu}}
      disk_format: [raw]
    stores: [pure1, pure2]
"""


def image(**fields: object) -> Image:
    """An active, shared qcow2 image nobody's policy cares about, unless the test says so."""
    defaults: dict[str, object] = {
        "id": "img-1", "name": "debian-12", "owner": "someone-else", "visibility": "shared",
        "status": "active", "disk_format": "qcow2", "container_format": "bare",
    }
    return Image(**{**defaults, **fields})  # type: ignore[arg-type]


def policy(text: str, known_stores: tuple[str, ...] | None = None) -> Policy:
    return parse_policy(textwrap.dedent(text), "policy.yaml", known_stores)


def one_rule(match: str, stores: str = "[fast]") -> Policy:
    """A policy whose single rule 'r' has the given flow-style match."""
    return policy(f"version: 1\nrules:\n  - name: r\n    match: {match}\n    stores: {stores}\n")


# -- which stores an image wants ----------------------------------------------------------------


def test_public_image_matching_two_rules_gets_the_union_of_their_stores() -> None:
    given_policy = policy(DESIGN_EXAMPLE)
    golden = image(name="ubuntu-24.04", visibility="public", tags={"golden"},
                   properties={"os_distro": "ubuntu"}, disk_format="raw")

    wanted = given_policy.desired(golden, LIVE)

    assert wanted == {
        "fast": ("public-everywhere",), "slow": ("public-everywhere",),
        "pure1": ("golden-ubuntu",), "pure2": ("golden-ubuntu",),
    }


def test_a_rules_exclude_stores_only_removes_stores_from_its_own_contribution() -> None:
    given_policy = policy(f"""\
        version: 1
        rules:
          - name: public-everywhere-but-edge
            match: {{visibility: public}}
            stores: all
            exclude_stores: [edge-small]
          - name: tenant-a-on-edge
            match: {{projects: [{TENANT_A}]}}
            stores: [edge-small]
        """)

    public_of_tenant_a = image(visibility="public", owner=TENANT_A)
    public_of_someone_else = image(visibility="public")

    assert given_policy.desired(public_of_tenant_a, LIVE) == {
        "edge-small": ("tenant-a-on-edge",),
        "fast": ("public-everywhere-but-edge",),
        "slow": ("public-everywhere-but-edge",),
    }
    assert set(given_policy.desired(public_of_someone_else, LIVE)) == {"fast", "slow"}


def test_stores_all_follows_the_live_store_list_the_caller_passes() -> None:
    everywhere = one_rule("{}", stores="all")

    assert set(everywhere.desired(image(), ["fast"])) == {"fast"}
    assert set(everywhere.desired(image(), ["fast", "new-store"])) == {"fast", "new-store"}
    assert everywhere.desired(image(), []) == {}


def test_explicit_stores_are_wanted_as_written_even_when_not_live() -> None:
    pinned = one_rule("{}", stores="[netapp-a, fast]")

    assert pinned.desired(image(), live_stores=["fast"]) == {"fast": ("r",), "netapp-a": ("r",)}


def test_every_rule_wanting_a_store_is_recorded_in_rule_order() -> None:
    given_policy = policy("""\
        version: 1
        rules:
          - {name: second-opinion, match: {disk_format: qcow2}, stores: [fast]}
          - {name: catch-all, match: {}, stores: all}
          - {name: never, match: {disk_format: raw}, stores: [fast]}
        """)

    assert given_policy.desired(image(), ["fast"]) == {"fast": ("second-opinion", "catch-all")}


def test_an_image_no_rule_matches_wants_no_store() -> None:
    assert policy(DESIGN_EXAMPLE).desired(image(), LIVE) == {}


def test_policy_does_not_filter_by_image_status_the_planner_does() -> None:
    queued = image(status="queued", visibility="public")

    assert "fast" in policy(DESIGN_EXAMPLE).desired(queued, LIVE)


def test_a_rule_whose_exclusions_cover_all_its_stores_matches_but_contributes_nothing() -> None:
    given_policy = policy("""\
        version: 1
        rules:
          - {name: r, match: {}, stores: all, exclude_stores: [fast]}
        """)

    [verdict] = given_policy.explain(image(), ["fast"])

    assert verdict == Verdict(rule="r", matched=True, reason=None, stores=frozenset())
    assert given_policy.desired(image(), ["fast"]) == {}


# -- matchers -----------------------------------------------------------------------------------

MATCHER_STORIES = [
    # (match, image fields, expected reason or None when it matches)
    ("{projects: [p1, p2]}", {"owner": "p2"}, None),
    ("{projects: p1}", {"owner": "p1"}, None),
    ("{projects: [p1]}", {"owner": "p3"}, "owner is 'p3', rule wants p1"),
    ("{projects: [p1]}", {"owner": None}, "owner is not set, rule wants p1"),
    ("{visibility: [public, community]}", {"visibility": "community"}, None),
    ("{visibility: [public, community]}", {"visibility": "private"},
     "visibility is 'private', rule wants one of public, community"),
    ("{name: 'ubuntu-*'}", {"name": "ubuntu-24.04"}, None),
    ("{name: ['centos-*', 'ubuntu-2?.04']}", {"name": "ubuntu-24.04"}, None),
    ("{name: 'ubuntu-*'}", {"name": "Ubuntu-24.04"},
     "name is 'Ubuntu-24.04', rule wants a name matching ubuntu-*"),
    ("{name: '*'}", {"name": None}, "name is not set, rule wants a name matching *"),
    ("{name: '*'}", {"name": ""}, "name is not set, rule wants a name matching *"),
    ("{tags: [golden, lts]}", {"tags": {"golden", "lts", "extra"}}, None),
    ("{tags: golden}", {"tags": {"golden"}}, None),
    ("{tags: [golden, lts]}", {"tags": {"golden"}},
     "image lacks tag lts, rule wants all of golden, lts"),
    ("{properties: {os_distro: ubuntu}}", {"properties": {"os_distro": "ubuntu"}}, None),
    ("{properties: {os_version: ['22.04', '24.04']}}", {"properties": {"os_version": "24.04"}},
     None),
    ("{properties: {os_distro: ubuntu}}", {"properties": {"os_distro": "debian"}},
     "property os_distro is 'debian', rule wants ubuntu"),
    ("{properties: {os_distro: ubuntu}}", {"properties": {}},
     "property os_distro is not set, rule wants ubuntu"),
    ("{properties: {hw_note: ''}}", {"properties": {"hw_note": ""}}, None),
    ("{disk_format: [raw, qcow2]}", {"disk_format": "raw"}, None),
    ("{disk_format: raw}", {"disk_format": "qcow2"}, "disk_format is 'qcow2', rule wants raw"),
    ("{container_format: bare}", {"container_format": "bare"}, None),
    ("{container_format: [ovf, ova]}", {"container_format": "bare"},
     "container_format is 'bare', rule wants one of ovf, ova"),
    ("{container_format: bare}", {"container_format": None},
     "container_format is not set, rule wants bare"),
]


@pytest.mark.parametrize(("match", "fields", "reason"), MATCHER_STORIES,
                         ids=[f"{m} vs {f}" for m, f, _ in MATCHER_STORIES])
def test_each_matcher_matches_or_explains_why_not(
    match: str, fields: dict[str, object], reason: str | None
) -> None:
    rule = one_rule(match).rules[0]

    assert rule.matches(image(**fields)) is (reason is None)
    assert rule.mismatch(image(**fields)) == reason


def test_all_matchers_of_a_rule_must_hold() -> None:
    rule = one_rule("{visibility: public, disk_format: raw, tags: [golden]}").rules[0]

    assert rule.matches(image(visibility="public", disk_format="raw", tags={"golden"}))
    assert not rule.matches(image(visibility="public", disk_format="raw"))
    assert not rule.matches(image(visibility="private", disk_format="raw", tags={"golden"}))


def test_the_reason_names_the_first_failing_matcher() -> None:
    rule = one_rule("{visibility: public, disk_format: raw}").rules[0]

    reason = rule.mismatch(image(visibility="private", disk_format="qcow2"))

    assert reason == "visibility is 'private', rule wants public"


def test_an_empty_match_matches_every_image_and_warns() -> None:
    given_policy = one_rule("{}")

    assert given_policy.rules[0].matches(Image(id="bare-minimum"))
    [warning] = given_policy.warnings
    assert str(warning) == (
        "policy.yaml:4:12: rules[0].match: empty, so this rule matches every image"
    )


# -- explain, warnings and the rest of the API --------------------------------------------------


def test_explain_gives_one_verdict_per_rule_in_order_with_reasons() -> None:
    private_ubuntu = image(name="ubuntu-24.04", visibility="private", tags={"golden"},
                           properties={"os_distro": "ubuntu"}, disk_format="raw")

    verdicts = policy(DESIGN_EXAMPLE).explain(private_ubuntu, LIVE)

    assert verdicts == [
        Verdict("public-everywhere", False,
                "visibility is 'private', rule wants one of public, community", frozenset()),
        Verdict("tenant-a", False, f"owner is 'someone-else', rule wants {TENANT_A}", frozenset()),
        Verdict("golden-ubuntu", True, None, frozenset({"pure1", "pure2"})),
    ]


def test_private_alone_warns_that_glance_defaults_to_shared() -> None:
    [warning] = one_rule("{visibility: [private]}").warnings

    assert (warning.line, warning.column) == (4, 25)
    assert "default visibility is 'shared'" in warning.message
    assert one_rule("{visibility: [private, shared]}").warnings == ()


def test_a_policy_without_rules_is_valid_but_warns() -> None:
    given_policy = policy("version: 1\nrules: []\n")

    assert given_policy.rules == ()
    assert [str(w) for w in given_policy.warnings] == [
        "policy.yaml:2:8: rules: the list is empty, so no image will be copied anywhere"
    ]


def test_the_design_example_is_valid_and_keeps_its_text_source_and_lines() -> None:
    given_policy = parse_policy(DESIGN_EXAMPLE, "/etc/imagesync/policy.yaml")

    assert given_policy.text == DESIGN_EXAMPLE
    assert given_policy.source == "/etc/imagesync/policy.yaml"
    assert given_policy.warnings == ()
    assert [rule.line for rule in given_policy.rules] == [3, 8, 12]
    assert given_policy.rules[0] == Rule(
        name="public-everywhere", stores=None, exclude_stores=frozenset({"edge-small"}),
        visibility=("public", "community"), line=3,
    )
    assert given_policy.stores_named() == {"edge-small", "netapp-a", "pure1", "pure2"}


def test_rules_and_policies_are_frozen() -> None:
    given_policy = policy(DESIGN_EXAMPLE)

    with pytest.raises(dataclasses.FrozenInstanceError):
        given_policy.rules[0].stores = ("x",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        given_policy.text = ""  # type: ignore[misc]


def test_stores_known_to_glance_pass_and_stores_all_needs_no_check() -> None:
    given_policy = policy(DESIGN_EXAMPLE, known_stores=("edge-small", "netapp-a", "pure1", "pure2"))

    assert len(given_policy.rules) == 3


def test_without_known_stores_unknown_store_names_are_not_checked() -> None:
    assert one_rule("{}", stores="[does-not-exist]").rules[0].stores == ("does-not-exist",)


def test_load_policy_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(DESIGN_EXAMPLE)

    loaded = load_policy(path)

    assert loaded.source == str(path)
    assert loaded.text == DESIGN_EXAMPLE


def test_load_policy_on_a_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"

    with pytest.raises(PolicyError) as caught:
        load_policy(missing)

    assert caught.value.problems == (
        Problem(str(missing), 1, 1, "cannot read: No such file or directory"),
    )
    assert str(caught.value) == f"{missing}:1:1: cannot read: No such file or directory"


def test_every_error_of_a_file_is_reported_at_once_in_file_order() -> None:
    text = """\
        version: 1
        rules:
          - name: a
            match: {project: x}
            stores: [slwo]
          - name: a
            match: {visibility: publik}
            stores: some
        """

    with pytest.raises(PolicyError) as caught:
        policy(text, known_stores=("edge", "fast", "slow"))

    assert isinstance(caught.value, ValueError)
    assert str(caught.value).splitlines() == [
        ("policy.yaml:4:13: rules[0].match: unknown matcher 'project' (known: container_format, "
         "disk_format, name, projects, properties, tags, visibility)"),
        "policy.yaml:5:14: rules[0].stores: unknown store 'slwo' (Glance has: edge, fast, slow)",
        "policy.yaml:6:11: rules[1].name: duplicate rule name 'a' (rules[0] already uses it)",
        ("policy.yaml:7:25: rules[1].match.visibility: unknown visibility 'publik' "
         "(allowed: community, private, public, shared)"),
        ("policy.yaml:8:13: rules[1].stores: 'some' is not allowed; write `all` or a list of "
         "store ids, e.g. [some]"),
    ]


# -- broken policy files ------------------------------------------------------------------------

KNOWN = ("edge", "fast", "slow")


def rule_file(*lines: str, version: int = 1) -> str:
    """A policy with one rule made of the given lines (each indented under `- `)."""
    return f"version: {version}\nrules:\n  - " + "\n    ".join(lines) + "\n"


def with_match(match: str, version: int = 1) -> str:
    return rule_file("name: r", f"match: {match}", "stores: [fast]", version=version)


def assert_refused_at(path: Path, text: str, line: int, column: int, words: str) -> None:
    """Loading `text` from `path` fails with exactly one problem, there, naming it."""
    path.write_text(text)

    with pytest.raises(PolicyError) as caught:
        load_policy(path, known_stores=KNOWN)

    problems = caught.value.problems
    assert problems, "PolicyError without problems"
    for problem in problems:
        assert re.match(rf"{re.escape(str(path))}:\d+:\d+: \S", str(problem)), str(problem)
    [problem] = problems  # each file is broken in exactly one place
    assert str(problem).startswith(f"{path}:{line}:{column}: "), str(problem)
    assert words in problem.message


# (id, text, line, column, words the message must contain)
BROKEN = [
    ("yaml syntax error", with_match("{visibility: [public}"), 4, 32, "invalid YAML"),
    ("tab indentation", "version: 1\nrules:\n\t- name: r\n", 3, 1, "tabs"),
    ("two documents", "version: 1\nrules: []\n---\nversion: 1\n", 3, 1, "single document"),
    ("control character", "version: 1\nrules: []\nx: \x07\n", 3, 4, "#x0007"),
    ("empty file", "", 1, 1, "empty"),
    ("only comments", "# TODO write the policy\n", 1, 1, "empty"),
    ("a list at top level", "- name: r\n  stores: all\n", 1, 1, "expected a mapping"),
    ("a string at top level", "copy everything everywhere\n", 1, 1, "expected a mapping"),
    ("version missing", "rules: []\n", 1, 1, "missing required key 'version'"),
    ("version 3", "version: 3\nrules: []\n", 1, 10, "unsupported version 3"),
    ("version quoted", "version: '1'\nrules: []\n", 1, 10, "expected the integer 1, got a string"),
    ("rules missing", "version: 1\n", 1, 1, "missing required key 'rules'"),
    ("rules a mapping", "version: 1\nrules: {name: r}\n", 2, 8, "expected a list of rules"),
    ("unknown top-level key", "version: 1\nrules: []\nrule: []\n", 3, 1, "unknown key 'rule'"),
    ("duplicate top-level key", "version: 1\nversion: 1\nrules: []\n", 2, 1,
     "duplicate key 'version'"),
    ("rule is a string", "version: 1\nrules:\n  - public-everywhere\n", 3, 5,
     "rules[0]: expected a mapping, got a string"),
    ("unknown rule key", rule_file("name: r", "match: {}", "stores: [fast]", "store: [slow]"),
     6, 5, "unknown key 'store'"),
    ("rule without name", rule_file("match: {}", "stores: all"), 3, 5,
     "missing required key 'name'"),
    ("rule without match", rule_file("name: r", "stores: all"), 3, 5,
     "missing required key 'match'"),
    ("rule without stores", rule_file("name: r", "match: {}"), 3, 5,
     "missing required key 'stores'"),
    ("rule name empty", rule_file("name: ''", "match: {}", "stores: all"), 3, 11, "empty string"),
    ("rule name a number", rule_file("name: 5", "match: {}", "stores: all"), 3, 11,
     "rules[0].name: value 5 is an integer"),
    ("duplicate rule names",
     ("version: 1\nrules:\n  - {name: r, match: {}, stores: all}\n"
      "  - {name: r, match: {}, stores: all}\n"),
     4, 12, "duplicate rule name 'r'"),
    ("duplicate key in a rule", rule_file("name: r", "match: {}", "stores: all", "stores: [fast]"),
     6, 5, "duplicate key 'stores'"),
    ("match a list", with_match("[visibility, public]"), 4, 12, "expected a mapping, got a list"),
    ("match without value", rule_file("name: r", "match:", "stores: all"), 4, 11,
     "expected a mapping, got null"),
    ("unknown matcher", with_match("{project: [p1]}"), 4, 13, "unknown matcher 'project'"),
    ("duplicate matcher", with_match("{name: a, name: b}"), 4, 22, "duplicate key 'name'"),
    ("projects a number", with_match("{projects: 5}"), 4, 23, "value 5 is an integer"),
    ("projects empty list", with_match("{projects: []}"), 4, 23, "empty list"),
    ("tags a mapping", with_match("{tags: {a: b}}"), 4, 19,
     "expected a string or a list of strings"),
    ("visibility unknown", with_match("{visibility: [public, publik]}"), 4, 34,
     "unknown visibility 'publik'"),
    ("name glob a number", with_match("{name: [ubuntu-*, 7]}"), 4, 30, "value 7 is an integer"),
    ("disk_format a mapping", with_match("{disk_format: {raw: true}}"), 4, 26,
     "disk_format: expected a string or a list of strings, got a mapping"),
    ("properties a list", with_match("{properties: [os_distro]}"), 4, 25,
     "properties: expected a mapping, got a list"),
    ("property value yes", with_match("{properties: {needs_uefi: yes}}"), 4, 38,
     'value True is a boolean; quote it ("yes")'),
    ("property value 20.10", with_match("{properties: {os_version: 20.10}}"), 4, 38,
     'rules[0].match.properties.os_version: value 20.1 is a float; quote it ("20.10") so it stays'),
    ("property value 5", with_match("{properties: {hw_cores: 5}}"), 4, 36,
     'value 5 is an integer; quote it ("5")'),
    ("property value null", with_match("{properties: {os_distro: null}}"), 4, 37,
     "os_distro: expected a string, got null"),
    ("property os_glance_*", with_match("{properties: {os_glance_import_task: x}}"), 4, 26,
     "os_glance_import_task: reserved property"),
    ("property stores", with_match("{properties: {stores: fast}}"), 4, 26,
     "properties.stores: reserved property"),
    ("duplicate property", with_match("{properties: {a: x, a: y}}"), 4, 32, "duplicate key 'a'"),
    ("python object tag",
     "version: 1\nrules: !!python/object/apply:os.system ['touch /tmp/pwned']\n", 2, 8,
     "YAML tag !!python/object/apply:os.system is not allowed"),
    ("local tag", rule_file("name: r", "match: {}", "stores: !secret fast"), 5, 13,
     "YAML tag !secret is not allowed"),
    ("stores empty list", rule_file("name: r", "match: {}", "stores: []"), 5, 13, "empty list"),
    ("stores some", rule_file("name: r", "match: {}", "stores: some"), 5, 13,
     "'some' is not allowed; write `all` or a list"),
    ("stores a mapping", rule_file("name: r", "match: {}", "stores: {fast: 1}"), 5, 13,
     "expected a list of strings, got a mapping"),
    ("stores with an empty id", rule_file("name: r", "match: {}", "stores: [fast, '']"), 5, 20,
     "empty string"),
    ("unknown store", rule_file("name: r", "match: {}", "stores: [fast, slwo]"), 5, 20,
     "rules[0].stores: unknown store 'slwo' (Glance has: edge, fast, slow)"),
    ("unknown excluded store",
     rule_file("name: r", "match: {}", "stores: all", "exclude_stores: [egde]"), 6, 22,
     "rules[0].exclude_stores: unknown store 'egde'"),
    ("exclude_stores a string",
     rule_file("name: r", "match: {}", "stores: all", "exclude_stores: edge"), 6, 21,
     "exclude_stores: expected a list of strings, got a string"),
    ("exclude_stores a mapping",
     rule_file("name: r", "match: {}", "stores: all", "exclude_stores: {edge: true}"), 6, 21,
     "exclude_stores: expected a list of strings, got a mapping"),
    ("description a list", rule_file("name: r", "description: [a]", "match: {}", "stores: all"),
     4, 18, "description: expected a string, got a list"),
]


@pytest.mark.parametrize(("text", "line", "column", "words"),
                         [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_a_broken_policy_file_is_refused_with_file_line_and_column(
    tmp_path: Path, text: str, line: int, column: int, words: str
) -> None:
    assert_refused_at(tmp_path / "policy.yaml", text, line, column, words)


def test_there_are_at_least_thirty_distinct_broken_files() -> None:
    assert len({text for _, text, *_ in BROKEN}) >= 30


# -- property: desired() is the union of matched rules' contributions --------------------------

STORES = ("a", "b", "c", "d")
PROJECTS = ("p1", "p2")
NAMES = ("ubuntu-24.04", "Ubuntu-22.04", "debian-12", "", None)



def one_or_more(values: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True)


match_strategy = st.fixed_dictionaries({}, optional={
    "projects": one_or_more(PROJECTS),
    "visibility": one_or_more(("public", "private", "shared", "community")),
    "name": one_or_more(("ubuntu-*", "*-12", "*")),
    "tags": one_or_more(("golden", "lts")),
    "properties": st.dictionaries(st.sampled_from(("os_distro", "os_version")),
                                  one_or_more(("ubuntu", "24.04", "yes")), min_size=1),
    "disk_format": one_or_more(("raw", "qcow2")),
    "container_format": one_or_more(("bare", "ovf")),
})
rules_strategy = st.lists(
    st.fixed_dictionaries(
        {"match": match_strategy, "stores": st.just("all") | one_or_more(STORES)},
        optional={"exclude_stores": st.lists(st.sampled_from(STORES), unique=True)},
    ),
    max_size=4,
)
image_strategy = st.builds(
    Image,
    id=st.just("img"),
    name=st.sampled_from(NAMES),
    owner=st.sampled_from((*PROJECTS, None)),
    visibility=st.sampled_from(("public", "private", "shared", "community")),
    tags=st.frozensets(st.sampled_from(("golden", "lts", "old"))),
    properties=st.dictionaries(st.sampled_from(("os_distro", "os_version")),
                               st.sampled_from(("ubuntu", "debian", "24.04", "yes"))),
    disk_format=st.sampled_from(("raw", "qcow2", None)),
    container_format=st.sampled_from(("bare", "ovf", None)),
)


def oracle_matches(match: dict[str, Any], img: Image) -> bool:
    """DESIGN.md section 4, said again as plainly as possible."""
    name = img.name or ""
    checks = {
        "projects": lambda wanted: img.owner in wanted,
        "visibility": lambda wanted: img.visibility in wanted,
        "name": lambda wanted: any(name and fnmatch.fnmatchcase(name, g) for g in wanted),
        "tags": lambda wanted: set(wanted) <= img.tags,
        "properties": lambda wanted: all(img.properties.get(k) in v for k, v in wanted.items()),
        "disk_format": lambda wanted: img.disk_format in wanted,
        "container_format": lambda wanted: img.container_format in wanted,
    }
    return all(checks[key](wanted) for key, wanted in match.items())


@settings(max_examples=300, deadline=None)
@given(rules_strategy, image_strategy, st.lists(st.sampled_from(STORES), unique=True))
def test_desired_stores_are_exactly_the_union_of_matched_rules_contributions(
    rules: list[dict[str, Any]], img: Image, live: list[str]
) -> None:
    named = [{"name": f"rule-{i}", **rule} for i, rule in enumerate(rules)]
    document = {"version": 1, "rules": named}
    given_policy = parse_policy(yaml.safe_dump(document))

    expected: dict[str, list[str]] = {}
    for rule in named:
        if oracle_matches(rule["match"], img):
            stores = set(live if rule["stores"] == "all" else rule["stores"])
            for store in stores - set(rule.get("exclude_stores", ())):
                expected.setdefault(store, []).append(rule["name"])

    assert given_policy.desired(img, live) == {s: tuple(names) for s, names in expected.items()}
    assert [verdict.matched for verdict in given_policy.explain(img, live)] == [
        oracle_matches(rule["match"], img) for rule in named
    ]
