"""The operator's policy: which Glance stores each image should be in, and which rules say so.

Reads and strictly validates the YAML policy file (DESIGN.md section 4) into frozen rules, then
answers "which stores does this image want, and why?". Pure: apart from load_policy reading
the file it does no I/O; it never talks to Glance, never looks at image status (the planner
does) and never configures logging.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from imagesync.model import RESERVED_PROPERTY_PREFIX, Image

VERSION = 1
VISIBILITIES = ("community", "private", "public", "shared")
MATCHERS = (
    "container_format", "disk_format", "name", "projects", "properties", "tags", "visibility"
)
_TOP_KEYS = ("rules", "version")
_RULE_KEYS = ("description", "exclude_stores", "match", "name", "stores")
_REQUIRED_RULE_KEYS = ("name", "match", "stores")

_Y = "tag:yaml.org,2002:"
_STR, _INT, _MAP, _SEQ = _Y + "str", _Y + "int", _Y + "map", _Y + "seq"
_NUMBERS = (_Y + "int", _Y + "float", _Y + "bool")
_SAFE_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag)
_FIELDS = {"name": "name_globs"}  # match key -> Rule field, where they differ
_KINDS = {"str": "a string", "int": "an integer", "float": "a float", "bool": "a boolean",
          "null": "null", "map": "a mapping", "seq": "a list", "timestamp": "a date"}

Alternatives = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One validation error or warning, at a 1-based line and column of the policy file."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class PolicyError(ValueError):
    """The policy cannot be used; `problems` holds every error found, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclasses.dataclass(frozen=True)
class Rule:
    """Images matching every matcher want `stores` (None: every live store) minus exclusions.

    A matcher that is None (or empty, for tags and properties) does not constrain the image.
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
    description: str | None = None
    line: int = 0

    def matches(self, image: Image) -> bool:
        return self.mismatch(image) is None

    def mismatch(self, image: Image) -> str | None:
        """Why the image does not match, naming the first failing matcher; None if it matches."""
        return (
            _one_of("owner", image.owner, self.projects)
            or _one_of("visibility", image.visibility, self.visibility)
            or _name_mismatch(image.name, self.name_globs)
            or _tags_mismatch(image.tags, self.tags)
            or _properties_mismatch(image.properties, self.properties)
            or _one_of("disk_format", image.disk_format, self.disk_format)
            or _one_of("container_format", image.container_format, self.container_format)
            or None
        )

    def contribution(self, live_stores: Iterable[str]) -> frozenset[str]:
        """The stores this rule wants for an image it matches."""
        wanted = live_stores if self.stores is None else self.stores
        return frozenset(wanted) - self.exclude_stores


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one rule says about one image (for explain and status)."""

    rule: str
    matched: bool
    reason: str | None  # why it did not match; None when it matched
    stores: frozenset[str]  # what it contributes; empty when it did not match


@dataclasses.dataclass(frozen=True)
class Policy:
    """A validated policy, with the exact text it was read from and its warnings."""

    rules: tuple[Rule, ...]
    source: str
    text: str
    warnings: tuple[Problem, ...] = ()

    def desired(self, image: Image, live_stores: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Each store the image should be in -> the names of the rules wanting it, in rule order."""
        wanted: dict[str, list[str]] = {}
        for verdict in self.explain(image, live_stores):
            for store in sorted(verdict.stores):
                wanted.setdefault(store, []).append(verdict.rule)
        return {store: tuple(rules) for store, rules in wanted.items()}

    def explain(self, image: Image, live_stores: Iterable[str]) -> list[Verdict]:
        live = tuple(live_stores)
        verdicts = []
        for rule in self.rules:
            reason = rule.mismatch(image)
            stores = rule.contribution(live) if reason is None else frozenset()
            verdicts.append(Verdict(rule.name, reason is None, reason, stores))
        return verdicts

    def stores_named(self) -> frozenset[str]:
        """Every store the policy names explicitly (in stores or exclude_stores)."""
        return frozenset(
            store for rule in self.rules for store in (*(rule.stores or ()), *rule.exclude_stores)
        )


def load_policy(path: str | Path, known_stores: Iterable[str] | None = None) -> Policy:
    """Read and validate a policy file; raises PolicyError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise PolicyError([Problem(str(path), 1, 1, f"cannot read: {reason or exc}")]) from exc
    return parse_policy(text, str(path), known_stores)


def parse_policy(
    text: str, source: str = "<policy>", known_stores: Iterable[str] | None = None
) -> Policy:
    """Validate policy YAML. Stores are checked against known_stores unless it is None."""
    reader = _Reader(source, None if known_stores is None else frozenset(known_stores))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise PolicyError([_syntax_problem(source, text, exc)]) from exc
    except RecursionError as exc:  # PyYAML composes recursively: ~300 nested levels
        raise PolicyError([Problem(source, 1, 1, "invalid YAML: nested too deeply")]) from exc
    rules = reader.document(root)
    if reader.errors:
        raise PolicyError(sorted(reader.errors, key=_position))
    return Policy(rules, source, text, tuple(sorted(reader.warnings, key=_position)))


# -- matching ---------------------------------------------------------------------------------


def _wanted(values: Alternatives) -> str:
    return values[0] if len(values) == 1 else "one of " + ", ".join(values)


def _one_of(label: str, actual: str | None, wanted: Alternatives | None) -> str | None:
    if wanted is None or actual in wanted:
        return None
    shown = "not set" if actual is None else repr(actual)
    return f"{label} is {shown}, rule wants {_wanted(wanted)}"


def _name_mismatch(name: str | None, globs: Alternatives | None) -> str | None:
    if globs is None or (name and any(fnmatch.fnmatchcase(name, glob) for glob in globs)):
        return None
    shown = repr(name) if name else "not set"
    return f"name is {shown}, rule wants a name matching {_wanted(globs)}"


def _tags_mismatch(tags: frozenset[str], wanted: frozenset[str]) -> str | None:
    missing = sorted(wanted - tags)
    if not missing:
        return None
    return f"image lacks tag {', '.join(missing)}, rule wants all of {', '.join(sorted(wanted))}"


def _properties_mismatch(
    properties: Mapping[str, str], wanted: tuple[tuple[str, Alternatives], ...]
) -> str | None:
    for key, values in wanted:
        reason = _one_of(f"property {key}", properties.get(key), values)
        if reason:
            return reason
    return None


# -- validation: walk the composed YAML nodes (they carry line and column marks) -------------


def _position(problem: Problem) -> tuple[int, int]:
    return problem.line, problem.column


def _short(tag: str) -> str:
    return tag.replace(_Y, "!!")


def _kind(node: Node) -> str:
    return _KINDS.get(node.tag.removeprefix(_Y), _short(node.tag))


def _syntax_problem(source: str, text: str, exc: yaml.YAMLError) -> Problem:
    """A YAML error (syntax, forbidden character, several documents) as one Problem."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = "invalid YAML: " + ", ".join(part for part in (exc.context, exc.problem) if part)
        if "'\\t'" in message:
            message += "; indent with spaces (YAML does not allow tabs)"
        return Problem(source, line, column, message)
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        message = f"invalid YAML: character #x{exc.character:04x} is not allowed ({exc.reason})"
        return Problem(source, line, column, message)
    return Problem(source, 1, 1, f"invalid YAML: {exc}")


class _Reader:
    """Collects every problem of one policy; a method that finds one reports it and goes on."""

    def __init__(self, source: str, known_stores: frozenset[str] | None) -> None:
        self.source = source
        self.known_stores = known_stores
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def report(self, node: Node, where: str, message: str, warning: bool = False) -> None:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        problem = Problem(self.source, line, column, f"{where}: {message}")
        (self.warnings if warning else self.errors).append(problem)

    # Shapes of values.

    def plain(self, node: Node, where: str) -> bool:
        """False (reported) for tags that would construct objects, e.g. !!python/object."""
        if node.tag not in _SAFE_TAGS:
            self.report(node, where, f"YAML tag {_short(node.tag)} is not allowed (the policy "
                        "is loaded safely: plain mappings, lists and strings only)")
        return node.tag in _SAFE_TAGS

    def mapping(
        self, node: Node, where: str, known: tuple[str, ...] | None, required: tuple[str, ...] = (),
        noun: str = "key", shape: str = "a mapping",
    ) -> dict[str, tuple[Node, Node]] | None:
        """key -> (key node, value node), or None when node is not a mapping.

        Duplicate keys (which YAML silently resolves to the last), keys outside `known`
        (unless it is None) and missing `required` keys are reported.
        """
        if not self.plain(node, where):
            return None
        if not isinstance(node, MappingNode) or node.tag != _MAP:
            self.report(node, where, f"expected {shape}, got {_kind(node)}")
            return None
        keys: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if not self.plain(key_node, where):
                continue
            if key is None:
                self.report(key_node, where, f"a key must be a plain name, not {_kind(key_node)}")
            elif key in keys:
                self.report(key_node, where, f"duplicate key {key!r} (only one is allowed)")
            elif known is not None and key not in known:
                self.report(key_node, where, f"unknown {noun} {key!r} (known: {', '.join(known)})")
            else:
                keys[key] = (key_node, value_node)
        for key in required:
            if key not in keys:
                self.report(node, where, f"missing required key {key!r}")
        return keys

    def string(self, node: Node, where: str, blank_ok: bool = False) -> str | None:
        if not self.plain(node, where):
            return None
        if isinstance(node, ScalarNode) and node.tag == _STR and (node.value or blank_ok):
            return str(node.value)
        if node.tag == _STR:
            self.report(node, where, "empty string; give a value")
        elif node.tag in _NUMBERS:
            value = self._constructor.construct_object(node)
            self.report(node, where, f"value {value!r} is {_kind(node)}; "
                        f"quote it ({json.dumps(node.value)}) so it stays a string")
        else:
            self.report(node, where, f"expected a string, got {_kind(node)}")
        return None

    def strings(self, node: Node, where: str, *, scalar_ok: bool = True, empty_ok: bool = False,
                blank_ok: bool = False) -> list[tuple[str, Node]]:
        """The strings of a list (or one string, when scalar_ok), each with its node."""
        if not self.plain(node, where):
            return []
        if scalar_ok and isinstance(node, ScalarNode):
            items = [node]
        elif isinstance(node, SequenceNode) and node.tag == _SEQ:
            items = node.value
        else:
            shape = "a string or a list of strings" if scalar_ok else "a list of strings"
            self.report(node, where, f"expected {shape}, got {_kind(node)}")
            return []
        if not items and not empty_ok:
            self.report(node, where, "empty list; give at least one value or remove the key")
        found = [(self.string(item, where, blank_ok), item) for item in items]
        return [(value, item) for value, item in found if value is not None]

    # The policy, top down.

    def document(self, root: Node | None) -> tuple[Rule, ...]:
        if root is None:
            self.errors.append(Problem(self.source, 1, 1, "policy: the file is empty; "
                                       "it needs `version: 1` and `rules:`"))
            return ()
        shape = "a mapping with `version: 1` and `rules:`"
        keys = self.mapping(root, "policy", _TOP_KEYS, _TOP_KEYS, shape=shape)
        if keys and "version" in keys:
            self.version(keys["version"][1])
        return self.rules(keys["rules"][1]) if keys and "rules" in keys else ()

    def version(self, node: Node) -> None:
        if not self.plain(node, "version"):
            return
        if node.tag != _INT:
            shown = _kind(node) + (f" ({node.value!r})" if isinstance(node, ScalarNode) else "")
            self.report(node, "version", f"expected the integer {VERSION}, got {shown}; "
                        f"write `version: {VERSION}`")
        elif self._constructor.construct_object(node) != VERSION:
            self.report(node, "version", f"unsupported version {node.value}; "
                        f"this imagesync reads version {VERSION}")

    def rules(self, node: Node) -> tuple[Rule, ...]:
        if not self.plain(node, "rules"):
            return ()
        if not isinstance(node, SequenceNode) or node.tag != _SEQ:
            self.report(node, "rules", f"expected a list of rules, got {_kind(node)}")
            return ()
        if not node.value:
            self.report(node, "rules", "the list is empty, so no image will be copied anywhere",
                        warning=True)
        seen: dict[str, int] = {}
        rules = [self.rule(item, index, seen) for index, item in enumerate(node.value)]
        return tuple(rule for rule in rules if rule is not None)

    def rule(self, node: Node, index: int, seen: dict[str, int]) -> Rule | None:
        """The rule, or None when any of its parts had an error (reported)."""
        errors_before = len(self.errors)
        where = f"rules[{index}]"
        keys = self.mapping(node, where, _RULE_KEYS, _REQUIRED_RULE_KEYS) or {}
        fields: dict[str, Any] = {"line": node.start_mark.line + 1}
        for key, (_, value) in keys.items():
            sub = f"{where}.{key}"
            if key == "name":
                fields["name"] = name = self.string(value, sub)
                if name in seen:
                    self.report(value, sub, f"duplicate rule name {name!r} "
                                f"(rules[{seen[name]}] already uses it)")
                elif name is not None:
                    seen[name] = index
            elif key == "match":
                fields.update(self.match(value, sub))
            elif key == "stores":
                fields["stores"] = self.stores(value, sub)
            elif key == "exclude_stores":
                fields["exclude_stores"] = frozenset(self.store_ids(value, sub, empty_ok=True))
            elif key == "description":
                fields["description"] = self.string(value, sub, blank_ok=True)
        return Rule(**fields) if len(self.errors) == errors_before else None

    def stores(self, node: Node, where: str) -> tuple[str, ...] | None:
        """`all` (returned as None) or a non-empty list of store ids."""
        if isinstance(node, ScalarNode) and node.tag == _STR:
            if node.value != "all":
                self.report(node, where, f"{node.value!r} is not allowed; write `all` or a list "
                            f"of store ids, e.g. [{node.value}]")
            return None
        return tuple(self.store_ids(node, where, empty_ok=False))

    def store_ids(self, node: Node, where: str, empty_ok: bool) -> list[str]:
        found = self.strings(node, where, scalar_ok=False, empty_ok=empty_ok)
        if self.known_stores is not None:
            known = ", ".join(sorted(self.known_stores)) or "no stores"
            for store, item in found:
                if store not in self.known_stores:
                    self.report(item, where, f"unknown store {store!r} (Glance has: {known})")
        return [store for store, _ in found]

    def match(self, node: Node, where: str) -> dict[str, Any]:
        """The matcher fields of Rule."""
        keys = self.mapping(node, where, MATCHERS, noun="matcher")
        if keys is None:
            return {}
        if not node.value:
            self.report(node, where, "empty, so this rule matches every image", warning=True)
        fields: dict[str, Any] = {}
        for key, (_, value) in keys.items():
            sub = f"{where}.{key}"
            if key == "properties":
                fields["properties"] = self.properties(value, sub)
                continue
            found = self.strings(value, sub)
            if key == "visibility":
                self.check_visibility(value, found, sub)
            values = tuple(text for text, _ in found)
            fields[_FIELDS.get(key, key)] = frozenset(values) if key == "tags" else values
        return fields

    def check_visibility(self, node: Node, found: list[tuple[str, Node]], where: str) -> None:
        for value, item in found:
            if value not in VISIBILITIES:
                self.report(item, where, f"unknown visibility {value!r} "
                            f"(allowed: {', '.join(VISIBILITIES)})")
        if {value for value, _ in found} == {"private"}:
            self.report(node, where, "only private images match; Glance's default visibility is "
                        "'shared', so images uploaded without --private will not match",
                        warning=True)

    def properties(self, node: Node, where: str) -> tuple[tuple[str, Alternatives], ...]:
        keys = self.mapping(node, where, known=None)
        if keys is None:
            return ()
        if not node.value:
            self.report(node, where, "empty mapping; give at least one property or remove the key")
        wanted = []
        for key, (key_node, value) in keys.items():
            sub = f"{where}.{key}"
            if key.startswith(RESERVED_PROPERTY_PREFIX):
                self.report(key_node, sub, f"reserved property: Glance manages "
                            f"{RESERVED_PROPERTY_PREFIX}* itself, so a rule cannot match on it")
            elif key == "stores":
                self.report(key_node, sub, "reserved property: it is Glance's list of the image's "
                            "stores (what this policy decides), so a rule cannot match on it")
            else:
                found = self.strings(value, sub, blank_ok=True)
                wanted.append((key, tuple(text for text, _ in found)))
        return tuple(wanted)
