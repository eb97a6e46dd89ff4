"""The operator's policy: which Glance stores each image should be in, and which rules say so.

Reads and strictly validates the YAML policy file (README "The policy", "Policy version 2")
into frozen rules, then answers "which stores does this image want, and why?": adding rules
contribute stores, deny rules (version 2) then take stores away, and each rule's suitability
says which disk formats a copy is useful for on which store type (the planner applies it).
The YAML shapes and their positions are read by imagesync.policy_yaml; this module is the
language on top. Pure: apart from load_policy reading the file it does no I/O; it never talks
to Glance, never reads a clock (`now` is passed in), never looks at image status (the planner
does) and never configures logging.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from yaml.nodes import Node, ScalarNode

from imagesync.model import (
    CONTAINER_FORMATS,
    CORE_KEYS,
    DISK_FORMATS,
    RESERVED_PROPERTY_PREFIX,
    STORE_TYPES,
    Image,
)
from imagesync.policy_yaml import (
    INT,
    Nodes,
    PolicyError,
    Problem,
    compose,
    in_file_order,
    is_text,
    kind,
    lookup,
)

__all__ = ["DEFAULT_SUITABILITY", "MATCHERS", "MATCHERS_V2", "VERSION", "VERSIONS", "Policy",
           "PolicyError", "Problem", "Rule", "Verdict", "load_policy", "parse_policy"]

VERSIONS = (1, 2)
VERSION = VERSIONS[-1]
VISIBILITIES = ("community", "private", "public", "shared")
MATCHERS = (
    "container_format", "disk_format", "name", "projects", "properties", "tags", "visibility"
)
MATCHERS_V2 = tuple(sorted((*MATCHERS, "age", "hidden", "protected", "shared_with", "size")))
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Alternatives = tuple[str, ...]
Bounds = tuple[int | None, int | None]  # (min, max), inclusive; None: no bound
Suitability = tuple[tuple[str, Alternatives], ...]  # store type -> useful disk formats
DEFAULT_SUITABILITY: Suitability = (("cinder", ("raw",)), ("rbd", ("raw",)))
IGNORE: Suitability = ()

_KEYS = {  # (version, what) -> keys allowed
    (1, "policy"): ("rules", "version"),
    (2, "policy"): ("deny", "rules", "suitability", "version"),
    (1, "rule"): ("description", "exclude_stores", "match", "name", "stores"),
    (2, "rule"): ("description", "exclude_stores", "match", "name", "stores", "suitability"),
    (2, "deny"): ("description", "exclude_stores", "match", "name", "stores"),
    (1, "match"): MATCHERS,
    (2, "match"): MATCHERS_V2,
}
_REQUIRED_RULE_KEYS = ("name", "match", "stores")
_FIELDS = {"name": "name_globs"}  # match key -> Rule field, where they differ
_AMOUNTS = {"size": (SIZE_UNITS, "10GiB"), "age": (AGE_UNITS, "90d")}
# Core image attributes -> the matcher that reads them.
_MATCHER_FOR = {"name": "name", "owner": "projects", "visibility": "visibility", "tags": "tags",
                "disk_format": "disk_format", "container_format": "container_format",
                "os_hidden": "hidden", "protected": "protected", "size": "size",
                "created_at": "age"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """Images matching every matcher want `stores` (None: every live store) minus exclusions.

    A matcher that is None (or empty, for tags and properties) does not constrain the image.
    The same class holds deny rules: there `stores` are the stores taken away.
    """

    name: str
    stores: tuple[str, ...] | None
    exclude_stores: frozenset[str] = frozenset()
    projects: Alternatives | None = None
    visibility: Alternatives | None = None
    name_globs: Alternatives | None = None
    tags: frozenset[str] = frozenset()
    properties: tuple[tuple[str, Alternatives], ...] = ()
    disk_format: Alternatives | None = None
    container_format: Alternatives | None = None
    hidden: bool | None = None
    protected: bool | None = None
    size: Bounds | None = None  # bytes
    age: Bounds | None = None  # seconds since created_at
    shared_with: Alternatives | None = None
    property_globs: bool = False  # version 2: property values are globs
    suitability: Suitability | None = None  # None: the policy's
    description: str | None = None
    line: int = 0

    def matches(self, image: Image, now: float | None = None) -> bool:
        return self.mismatch(image, now) is None

    def mismatch(self, image: Image, now: float | None = None) -> str | None:
        """Why the image does not match, naming the first failing matcher; None if it matches.

        `now` (epoch seconds) is needed by an `age` matcher only."""
        return (
            _one_of("owner", image.owner, self.projects)
            or _one_of("visibility", image.visibility, self.visibility)
            or _flag_mismatch("hidden (os_hidden)", image.hidden, self.hidden)
            or _flag_mismatch("protected", image.protected, self.protected)
            or _glob_mismatch("name", image.name or None, self.name_globs, "a name")
            or _tags_mismatch(image.tags, self.tags)
            or self._properties_mismatch(image.properties)
            or _one_of("disk_format", image.disk_format, self.disk_format)
            or _one_of("container_format", image.container_format, self.container_format)
            or _bounds_mismatch("size", image.size, self.size, SIZE_UNITS)
            or _age_mismatch(image.created_at, now, self.age)
            or _members_mismatch(image.members, self.shared_with)
            or None
        )

    def contribution(self, live_stores: Iterable[str]) -> frozenset[str]:
        """The stores this rule wants (or, for a deny rule, takes away) for an image it matches."""
        wanted = live_stores if self.stores is None else self.stores
        return frozenset(wanted) - self.exclude_stores

    def _properties_mismatch(self, properties: Mapping[str, str]) -> str | None:
        for key, values in self.properties:
            label, actual = f"property {key}", properties.get(key)
            reason = _glob_mismatch(label, actual, values, "a value") if self.property_globs \
                else _one_of(label, actual, values)
            if reason:
                return reason
        return None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one rule says about one image (for explain and status)."""

    rule: str
    matched: bool
    reason: str | None  # why it did not match; None when it matched
    stores: frozenset[str]  # what it contributes (a deny rule: removes); empty if no match
    deny: bool = False


@dataclasses.dataclass(frozen=True)
class Policy:
    """A validated policy, with the exact text it was read from and its warnings."""

    rules: tuple[Rule, ...]
    source: str
    text: str
    warnings: tuple[Problem, ...] = ()
    deny: tuple[Rule, ...] = ()
    version: int = 1
    suitability: Suitability = DEFAULT_SUITABILITY  # the top-level one (or the default)

    def desired(self, image: Image, live_stores: Iterable[str],
                now: float | None = None) -> dict[str, tuple[str, ...]]:
        """Each store the image should be in -> the names of the adding rules wanting it, in
        rule order, without the stores deny rules take away."""
        wanted: dict[str, list[str]] = {}
        for verdict in self.explain(image, live_stores, now):
            for store in sorted(verdict.stores):
                if verdict.deny:
                    wanted.pop(store, None)
                else:
                    wanted.setdefault(store, []).append(verdict.rule)
        return {store: tuple(rules) for store, rules in wanted.items()}

    def explain(self, image: Image, live_stores: Iterable[str],
                now: float | None = None) -> list[Verdict]:
        """A verdict for each adding rule, then for each deny rule (whose stores are those it
        takes away from what the adding rules want)."""
        verdicts = [_verdict(rule, image, frozenset(live_stores), now) for rule in self.rules]
        wanted = frozenset[str]().union(*(verdict.stores for verdict in verdicts))
        return verdicts + [_verdict(rule, image, wanted, now, deny=True) for rule in self.deny]

    def suitability_of(self, rule_name: str) -> Suitability:
        """The suitability in force for an adding rule: its own, else the policy's."""
        return self._own_suitability.get(rule_name, self.suitability)

    @functools.cached_property
    def _own_suitability(self) -> dict[str, Suitability]:
        return {rule.name: rule.suitability for rule in self.rules if rule.suitability is not None}

    @property
    def needs_members(self) -> bool:
        """Whether any rule matches on image members (so they must be read from Glance)."""
        return any(rule.shared_with is not None for rule in (*self.rules, *self.deny))

    def stores_named(self) -> frozenset[str]:
        """Every store the policy names explicitly (in stores or exclude_stores)."""
        return frozenset(store for rule in (*self.rules, *self.deny)
                         for store in (*(rule.stores or ()), *rule.exclude_stores))


def load_policy(path: str | Path, known_stores: Iterable[str] | None = None,
                schema: Mapping[str, Any] | None = None) -> Policy:
    """Read and validate a policy file; raises PolicyError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise PolicyError([Problem(str(path), 1, 1, f"cannot read: {reason or exc}")]) from exc
    return parse_policy(text, str(path), known_stores, schema)


def parse_policy(
    text: str, source: str = "<policy>", known_stores: Iterable[str] | None = None,
    schema: Mapping[str, Any] | None = None,
) -> Policy:
    """Validate policy YAML. Stores are checked against known_stores unless it is None; disk
    and container formats and core attributes against `schema` (Glance's GET
    /v2/schemas/image), else against Glance's defaults."""
    language = _Language(source, None if known_stores is None else frozenset(known_stores),
                         schema)
    fields = language.document(compose(text, source))
    if language.nodes.errors:
        raise PolicyError(in_file_order(language.nodes.errors))
    return Policy(fields.pop("rules", ()), source, text,
                  tuple(in_file_order(language.nodes.warnings)), **fields)


# -- matching ---------------------------------------------------------------------------------


def _verdict(rule: Rule, image: Image, stores: frozenset[str], now: float | None,
             deny: bool = False) -> Verdict:
    reason = rule.mismatch(image, now)
    got = rule.contribution(stores) if reason is None else frozenset()
    return Verdict(rule.name, reason is None, reason, got & stores if deny else got, deny)


def _wanted(values: Alternatives) -> str:
    return values[0] if len(values) == 1 else "one of " + ", ".join(values)


def _one_of(label: str, actual: str | None, wanted: Alternatives | None) -> str | None:
    if wanted is None or actual in wanted:
        return None
    shown = "not set" if actual is None else repr(actual)
    return f"{label} is {shown}, rule wants {_wanted(wanted)}"


def _glob_mismatch(label: str, actual: str | None, globs: Alternatives | None,
                   noun: str) -> str | None:
    if globs is None or (actual is not None and
                         any(fnmatch.fnmatchcase(actual, glob) for glob in globs)):
        return None
    shown = "not set" if actual is None else repr(actual)
    return f"{label} is {shown}, rule wants {noun} matching {_wanted(globs)}"


def _flag_mismatch(label: str, actual: bool, wanted: bool | None) -> str | None:
    if wanted is None or actual == wanted:
        return None
    return f"{label} is {str(actual).lower()}, rule wants {str(wanted).lower()}"


def _tags_mismatch(tags: frozenset[str], wanted: frozenset[str]) -> str | None:
    missing = sorted(wanted - tags)
    if not missing:
        return None
    return f"image lacks tag {', '.join(missing)}, rule wants all of {', '.join(sorted(wanted))}"


def _bounds_mismatch(label: str, actual: float | None, bounds: Bounds | None,
                     units: Mapping[str, int]) -> str | None:
    if bounds is None:
        return None
    low, high = bounds
    if actual is not None and (low is None or actual >= low) and (high is None or actual <= high):
        return None
    shown = "not known" if actual is None else _about(actual, units)
    return f"{label} is {shown}, rule wants {_range(bounds, units)}"


def _age_mismatch(created_at: float | None, now: float | None, bounds: Bounds | None) -> str | None:
    if bounds is None:
        return None
    if now is None:
        return "age unknown (no current time was given)"
    if created_at is None:
        return "age unknown (the image has no created_at)"
    return _bounds_mismatch("age", max(now - created_at, 0.0), bounds, AGE_UNITS)


def _members_mismatch(members: frozenset[str] | None, wanted: Alternatives | None) -> str | None:
    if wanted is None:
        return None
    if members is None:
        return "members unknown (the image's members were not read from Glance)"
    if members & set(wanted):
        return None
    return f"image is not shared with {_wanted(wanted)}"


def _exact(amount: int, units: Mapping[str, int]) -> str:
    """An amount in the largest unit that divides it: 1GiB, 90d, 0s."""
    factor, unit = max((f, u) for u, f in units.items() if amount % f == 0 and (amount or f == 1))
    return f"{amount // factor}{unit}"


def _about(amount: float, units: Mapping[str, int]) -> str:
    """An amount, to one decimal, in the largest unit not above it: 12.7MiB, 3.1h."""
    factor, unit = max((f, u) for u, f in units.items() if f <= max(amount, 1))
    return f"{amount / factor:.1f}".removesuffix(".0") + unit


def _range(bounds: Bounds, units: Mapping[str, int]) -> str:
    low, high = (None if bound is None else _exact(bound, units) for bound in bounds)
    if low is not None and high is not None:
        return f"{low} to {high}"
    return f"at least {low}" if high is None else f"at most {high}"


# -- the language: what each key of the file means, version by version -----------------------


def _schema_properties(schema: Mapping[str, Any] | None) -> Mapping[str, Any]:
    properties = schema.get("properties") if schema is not None else None
    return properties if isinstance(properties, Mapping) else {}


def _core_attributes(schema: Mapping[str, Any] | None) -> frozenset[str]:
    """Glance's base image attributes: the schema's properties but its custom ones (is_base
    false, from schema-image.json, e.g. os_distro), or CORE_KEYS without a schema."""
    properties = _schema_properties(schema)
    if not properties:
        return CORE_KEYS
    return frozenset(key for key, spec in properties.items()
                     if not (isinstance(spec, Mapping) and spec.get("is_base") is False))


def _formats(schema: Mapping[str, Any] | None, key: str,
             default: Alternatives) -> tuple[Alternatives, str]:
    """The values Glance allows for a format attribute, and where that list comes from."""
    spec = _schema_properties(schema).get(key)
    enum = spec.get("enum") if isinstance(spec, Mapping) else None
    if not isinstance(enum, list):
        return tuple(sorted(default)), "Glance's defaults"
    return tuple(sorted(value for value in enum if isinstance(value, str))), "this Glance allows"


class _Language:
    """Reads one policy document; every problem is collected by `nodes` (see Nodes)."""

    def __init__(self, source: str, known_stores: frozenset[str] | None,
                 schema: Mapping[str, Any] | None) -> None:
        self.nodes = Nodes(source)
        self.known_stores = known_stores
        self.core = _core_attributes(schema)
        self.formats = {"disk_format": _formats(schema, "disk_format", DISK_FORMATS),
                        "container_format": _formats(schema, "container_format",
                                                     CONTAINER_FORMATS)}
        self.version = VERSION
        self.suitability = DEFAULT_SUITABILITY
        self.names: dict[str, str] = {}  # rule name -> where it was first used

    def keys(self, what: str) -> tuple[str, ...]:
        return _KEYS[(self.version, what)]

    def hints(self, what: str) -> dict[str, str]:
        """For a version 1 file: the keys only version 2 knows."""
        newer = set(_KEYS.get((VERSION, what), ())) - set(_KEYS.get((self.version, what), ()))
        return {key: "it needs `version: 2`" for key in newer}

    def document(self, root: Node | None) -> dict[str, Any]:
        """Policy's fields, but source, text and warnings."""
        if root is None:
            self.nodes.errors.append(Problem(self.nodes.source, 1, 1, "policy: the file is empty; "
                                             "it needs `version: 1` and `rules:`"))
            return {}
        self.version = self.read_version(lookup(root, "version"))
        shape = "a mapping with `version:` and `rules:`"
        keys = self.nodes.mapping(root, "policy", self.keys("policy"), ("rules", "version"),
                                  shape=shape, hints=self.hints("policy")) or {}
        fields: dict[str, Any] = {"version": self.version}
        if "suitability" in keys:  # first: rules compare their own with it
            own = self.read_suitability(keys["suitability"][1], "suitability")
            fields["suitability"] = self.suitability = DEFAULT_SUITABILITY if own is None else own
        for key in ("rules", "deny"):
            if key in keys:
                fields[key] = self.rule_list(keys[key][1], key)
        return fields

    def read_version(self, node: Node | None) -> int:
        """The version the file says, or the newest (reported) when it says none we read."""
        if node is None or not self.nodes.plain(node, "version"):
            return VERSION
        number = self.nodes.value(node) if node.tag == INT else None
        if number in VERSIONS:
            return int(number)
        if number is None:
            text = str(node.value) if isinstance(node, ScalarNode) else ""
            write = text if is_text(node) and text in map(str, VERSIONS) else str(VERSION)
            shown = kind(node) + (f" ({text!r})" if isinstance(node, ScalarNode) else "")
            self.nodes.report(node, "version", f"expected the integer {write}, got {shown}; "
                              f"write `version: {write}`")
        else:
            self.nodes.report(node, "version", f"unsupported version {node.value}; this "
                              f"imagesync reads versions {' and '.join(map(str, VERSIONS))}")
        return VERSION

    def rule_list(self, node: Node, where: str) -> tuple[Rule, ...]:
        items = self.nodes.sequence(node, where, "a list of rules")
        if items is None:
            return ()
        if not items and where == "rules":
            self.nodes.report(node, where, "the list is empty, so no image will be copied "
                              "anywhere", warning=True)
        elif not items:
            self.nodes.report(node, where, "empty list; give at least one rule or remove the key")
        rules = [self.rule(item, f"{where}[{index}]", where) for index, item in enumerate(items)]
        return tuple(rule for rule in rules if rule is not None)

    def rule(self, node: Node, where: str, what: str) -> Rule | None:
        """The rule, or None when any of its parts had an error (reported)."""
        errors_before = len(self.nodes.errors)
        keys = self.nodes.mapping(node, where, self.keys("rule" if what == "rules" else what),
                                  _REQUIRED_RULE_KEYS, hints=self.hints("rule")) or {}
        fields: dict[str, Any] = {"line": node.start_mark.line + 1,
                                  "property_globs": self.version >= 2}
        for key, (_, value) in keys.items():
            sub = f"{where}.{key}"
            if key == "name":
                fields["name"] = self.rule_name(value, sub, where)
            elif key == "match":
                fields.update(self.match(value, sub))
            elif key == "stores":
                fields["stores"] = self.stores(value, sub)
            elif key == "exclude_stores":
                fields["exclude_stores"] = frozenset(self.store_ids(value, sub, empty_ok=True))
            elif key == "suitability":
                fields["suitability"] = self.rule_suitability(value, sub)
            elif key == "description":
                fields["description"] = self.nodes.string(value, sub, blank_ok=True)
        return Rule(**fields) if len(self.nodes.errors) == errors_before else None

    def rule_name(self, node: Node, where: str, rule: str) -> str | None:
        name = self.nodes.string(node, where)
        if name in self.names:
            self.nodes.report(node, where, f"duplicate rule name {name!r} "
                              f"({self.names[name]} already uses it)")
        elif name is not None:
            self.names[name] = rule
        return name

    def stores(self, node: Node, where: str) -> tuple[str, ...] | None:
        """`all` (returned as None) or a non-empty list of store ids."""
        if is_text(node):
            if node.value != "all":
                self.nodes.report(node, where, f"{node.value!r} is not allowed; write `all` or a "
                                  f"list of store ids, e.g. [{node.value}]")
            return None
        return tuple(self.store_ids(node, where, empty_ok=False))

    def store_ids(self, node: Node, where: str, empty_ok: bool) -> list[str]:
        found = self.nodes.strings(node, where, scalar_ok=False, empty_ok=empty_ok)
        if self.known_stores is not None:
            known = ", ".join(sorted(self.known_stores)) or "no stores"
            for store, item in found:
                if store not in self.known_stores:
                    self.nodes.report(item, where, f"unknown store {store!r} (Glance has: {known})")
        return [store for store, _ in found]

    def match(self, node: Node, where: str) -> dict[str, Any]:
        """The matcher fields of Rule."""
        keys = self.nodes.mapping(node, where, self.keys("match"), noun="matcher",
                                  hints=self.hints("match"))
        if keys is None:
            return {}
        if not node.value:
            self.nodes.report(node, where, "empty, so this rule matches every image", warning=True)
        return {_FIELDS.get(key, key): self.matcher(key, value, f"{where}.{key}")
                for key, (_, value) in keys.items()}

    def matcher(self, key: str, node: Node, where: str) -> Any:
        """One matcher's value, as the Rule field holds it."""
        if key == "properties":
            return self.properties(node, where)
        if key in ("hidden", "protected"):
            return self.nodes.boolean(node, where)
        if key in _AMOUNTS:
            return self.bounds(node, where, *_AMOUNTS[key])
        found = self.nodes.strings(node, where)
        if key == "visibility":
            self.check_visibility(node, found, where)
        if key in self.formats:
            self.check_formats(key, found, where)
        values = tuple(text for text, _ in found)
        return frozenset(values) if key == "tags" else values

    def check_visibility(self, node: Node, found: list[tuple[str, Node]], where: str) -> None:
        for value, item in found:
            if value not in VISIBILITIES:
                self.nodes.report(item, where, f"unknown visibility {value!r} "
                                  f"(allowed: {', '.join(VISIBILITIES)})")
        if {value for value, _ in found} == {"private"}:
            self.nodes.report(node, where, "only private images match; Glance's default "
                              "visibility is 'shared', so images uploaded without --private will "
                              "not match", warning=True)

    def check_formats(self, key: str, found: list[tuple[str, Node]], where: str) -> None:
        """Unknown formats: errors in version 2, warnings in version 1 (such files load)."""
        allowed, origin = self.formats[key]
        for value, item in found:
            if value not in allowed:
                self.nodes.report(item, where, f"unknown {key.replace('_', ' ')} {value!r} "
                                  f"({origin}: {', '.join(allowed)})", warning=self.version < 2)

    def properties(self, node: Node, where: str) -> tuple[tuple[str, Alternatives], ...]:
        entries = self.nodes.entries(node, where, "empty mapping; give at least one property "
                                     "or remove the key")
        wanted = []
        for key, key_node, value, sub in entries or ():
            refused, warning = self.property_refusal(key)
            if refused:
                self.nodes.report(key_node, sub, refused, warning)
            if not refused or warning:
                found = self.nodes.strings(value, sub, blank_ok=True)
                wanted.append((key, tuple(text for text, _ in found)))
        return tuple(wanted)

    def property_refusal(self, key: str) -> tuple[str | None, bool]:
        """Why a rule cannot match on this property, and whether that is only a warning."""
        if key.startswith(RESERVED_PROPERTY_PREFIX):
            return (f"reserved property: Glance manages {RESERVED_PROPERTY_PREFIX}* itself, so a "
                    "rule cannot match on it"), False
        if key == "stores":
            return ("reserved property: it is Glance's list of the image's stores (what this "
                    "policy decides), so a rule cannot match on it"), False
        if key not in self.core:
            return None, False
        matcher = _MATCHER_FOR.get(key)
        instead = "no matcher reads it" if matcher is None else f"use match.{matcher}" + (
            "" if matcher in self.keys("match") else " (version 2)")
        return (f"{key} is a core image attribute, not a property, so it never matches here; "
                f"{instead}"), self.version < 2

    def bounds(self, node: Node, where: str, units: Mapping[str, int],
               example: str) -> Bounds | None:
        keys = self.nodes.mapping(node, where, ("max", "min"),
                                  shape=f"a mapping with min and/or max, e.g. {{min: {example}}}")
        if keys is None:
            return None
        if not node.value:
            self.nodes.report(node, where, "empty mapping; give min and/or max")
        low, high = (self.amount(keys[key][1], f"{where}.{key}", units, example)
                     if key in keys else None for key in ("min", "max"))
        if low is not None and high is not None and low > high:
            self.nodes.report(node, where, f"min {_exact(low, units)} is more than max "
                              f"{_exact(high, units)}, so no image matches")
        return low, high

    def amount(self, node: Node, where: str, units: Mapping[str, int],
               example: str) -> int | None:
        """An integer (bytes, seconds) or a number with a unit: 10GiB, 1.5TB, 90d."""
        value = self.nodes.integer_or_string(
            node, where, f"an integer or a string with a unit, e.g. {example}")
        if not isinstance(value, str):
            return value
        parts = re.fullmatch(r"(\d+(?:\.\d+)?) ?([A-Za-z]*)", value)
        names = ", ".join(units)
        if parts is None:
            self.nodes.report(node, where, f"{value!r} is not a number with a unit, e.g. "
                              f"{example} (units: {names})")
        elif parts[2] not in units:
            unit = f"unknown unit {parts[2]!r}" if parts[2] else "no unit"
            self.nodes.report(node, where, f"{unit} in {value!r} (units: {names})")
        else:
            return int(Fraction(parts[1]) * units[parts[2]])
        return None

    def read_suitability(self, node: Node, where: str) -> Suitability | None:
        """`ignore`, or store type -> the disk formats a copy there is useful for."""
        if is_text(node, "ignore"):
            return IGNORE
        entries = self.nodes.entries(
            node, where, "empty mapping; give store types and their disk formats, or write "
            "`ignore`", shape="`ignore` or a mapping of store type to disk formats, e.g. "
            "{rbd: [raw]}")
        if entries is None:
            return None
        types = []
        for key, key_node, value, sub in entries:
            if key not in STORE_TYPES:
                self.nodes.report(key_node, sub, f"unknown store type {key!r} "
                                  f"(known: {', '.join(sorted(STORE_TYPES))})")
            found = self.nodes.strings(value, sub)
            self.check_formats("disk_format", found, sub)
            types.append((key, tuple(text for text, _ in found)))
        return tuple(sorted(types))

    def rule_suitability(self, node: Node, where: str) -> Suitability | None:
        own = self.read_suitability(node, where)
        left_out = sorted(dict(self.suitability).keys() - dict(own or ()).keys()) if own else []
        if left_out:
            self.nodes.report(node, where, f"leaves out {', '.join(left_out)}: a rule's "
                              "suitability replaces the top-level one as a whole, so this rule "
                              f"copies any disk format to {' and '.join(left_out)} stores",
                              warning=True)
        return own
