"""The policy file's YAML shapes, with positions: what a value is, not what it means.

PyYAML composes a document into nodes that carry their line and column. `Nodes` walks
them for the policy language (imagesync.policy): it checks each value's shape (a mapping
with known keys, a list, a string, a boolean, an integer), refuses YAML tags that would
construct objects, and collects every Problem instead of stopping at the first, so that
one check reports all of a file's mistakes at FILE:LINE:COL. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_Y = "tag:yaml.org,2002:"
STR, INT, BOOL, MAP, SEQ = (_Y + kind for kind in ("str", "int", "bool", "map", "seq"))
_NUMBERS = (_Y + "int", _Y + "float", _Y + "bool")
_SAFE_TAGS = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag)
_KINDS = {"str": "a string", "int": "an integer", "float": "a float", "bool": "a boolean",
          "null": "null", "map": "a mapping", "seq": "a list", "timestamp": "a date"}


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


def compose(text: str, source: str) -> Node | None:
    """The document's root node (None for an empty one); PolicyError when it is not YAML."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise PolicyError([_syntax_problem(source, text, exc)]) from exc
    except RecursionError as exc:  # PyYAML composes recursively: ~300 nested levels
        raise PolicyError([Problem(source, 1, 1, "invalid YAML: nested too deeply")]) from exc


def in_file_order(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda problem: (problem.line, problem.column))


def short(tag: str) -> str:
    return tag.replace(_Y, "!!")


def kind(node: Node) -> str:
    return _KINDS.get(node.tag.removeprefix(_Y), short(node.tag))


def is_text(node: Node, value: str | None = None) -> bool:
    """A plain string scalar (equal to `value`, when given)."""
    return isinstance(node, ScalarNode) and node.tag == STR and value in (None, node.value)


def lookup(node: Node, key: str) -> Node | None:
    """The value of `key` in a mapping node (the first, if repeated), without any check."""
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if is_text(key_node, key):
                return value_node
    return None


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


class Nodes:
    """Reads values off composed nodes; a method that finds a problem reports it and goes on.

    `where` names the value for the reader (e.g. `rules[0].match.size`); every message
    starts with it.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def report(self, node: Node, where: str, message: str, warning: bool = False) -> None:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        problem = Problem(self.source, line, column, f"{where}: {message}")
        (self.warnings if warning else self.errors).append(problem)

    def value(self, node: Node) -> Any:
        """The Python value of a plain scalar (an int for 5, True for yes)."""
        return self._constructor.construct_object(node)

    def plain(self, node: Node, where: str) -> bool:
        """False (reported) for tags that would construct objects, e.g. !!python/object."""
        if node.tag not in _SAFE_TAGS:
            self.report(node, where, f"YAML tag {short(node.tag)} is not allowed (the policy "
                        "is loaded safely: plain mappings, lists and strings only)")
        return node.tag in _SAFE_TAGS

    def mapping(
        self, node: Node, where: str, known: Iterable[str] | None, required: Iterable[str] = (),
        noun: str = "key", shape: str = "a mapping", hints: Mapping[str, str] | None = None,
    ) -> dict[str, tuple[Node, Node]] | None:
        """key -> (key node, value node), or None when node is not a mapping.

        Duplicate keys (which YAML silently resolves to the last), keys outside `known`
        (unless it is None; `hints` may say more about one) and missing `required` keys
        are reported.
        """
        if not self.plain(node, where):
            return None
        if not isinstance(node, MappingNode) or node.tag != MAP:
            self.report(node, where, f"expected {shape}, got {kind(node)}")
            return None
        names = None if known is None else tuple(sorted(known))
        keys: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if not self.plain(key_node, where):
                continue
            if key is None:
                self.report(key_node, where, f"a key must be a plain name, not {kind(key_node)}")
            elif key in keys:
                self.report(key_node, where, f"duplicate key {key!r} (only one is allowed)")
            elif names is not None and key not in names:
                hint = (hints or {}).get(key)
                self.report(key_node, where, f"unknown {noun} {key!r} (known: {', '.join(names)})"
                            + (f"; {hint}" if hint else ""))
            else:
                keys[key] = (key_node, value_node)
        for key in required:
            if key not in keys:
                self.report(node, where, f"missing required key {key!r}")
        return keys

    def entries(self, node: Node, where: str, empty: str, shape: str = "a mapping"
                ) -> list[tuple[str, Node, Node, str]] | None:
        """A mapping whose keys are the writer's names (properties, store types): (key, key
        node, value node, where) for each, or None when node is not a mapping. An empty
        mapping is reported with the `empty` message."""
        keys = self.mapping(node, where, known=None, shape=shape)
        if keys is None:
            return None
        if not node.value:
            self.report(node, where, empty)
        return [(key, key_node, value, f"{where}.{key}") for key, (key_node, value) in keys.items()]

    def sequence(self, node: Node, where: str, shape: str) -> list[Node] | None:
        """The items of a list, or None (reported) when node is not one."""
        if not self.plain(node, where):
            return None
        if not isinstance(node, SequenceNode) or node.tag != SEQ:
            self.report(node, where, f"expected {shape}, got {kind(node)}")
            return None
        return list(node.value)

    def string(self, node: Node, where: str, blank_ok: bool = False) -> str | None:
        if not self.plain(node, where):
            return None
        if is_text(node) and (node.value or blank_ok):
            return str(node.value)
        if node.tag == STR:
            self.report(node, where, "empty string; give a value")
        elif node.tag in _NUMBERS:
            self.report(node, where, f"value {self.value(node)!r} is {kind(node)}; "
                        f"quote it ({json.dumps(node.value)}) so it stays a string")
        else:
            self.report(node, where, f"expected a string, got {kind(node)}")
        return None

    def strings(self, node: Node, where: str, *, scalar_ok: bool = True, empty_ok: bool = False,
                blank_ok: bool = False) -> list[tuple[str, Node]]:
        """The strings of a list (or one string, when scalar_ok), each with its node."""
        if not self.plain(node, where):
            return []
        if scalar_ok and isinstance(node, ScalarNode):
            items = [node]
        elif isinstance(node, SequenceNode) and node.tag == SEQ:
            items = node.value
        else:
            shape = "a string or a list of strings" if scalar_ok else "a list of strings"
            self.report(node, where, f"expected {shape}, got {kind(node)}")
            return []
        if not items and not empty_ok:
            self.report(node, where, "empty list; give at least one value or remove the key")
        found = [(self.string(item, where, blank_ok), item) for item in items]
        return [(value, item) for value, item in found if value is not None]

    def boolean(self, node: Node, where: str) -> bool | None:
        if self.plain(node, where) and node.tag == BOOL:
            return bool(self.value(node))
        if node.tag in _SAFE_TAGS:
            shown = f" ({node.value!r})" if isinstance(node, ScalarNode) and node.value else ""
            self.report(node, where, f"expected true or false, got {kind(node)}{shown}")
        return None

    def integer_or_string(self, node: Node, where: str, shape: str) -> int | str | None:
        """A non-negative integer or a non-empty string (e.g. a number with its unit)."""
        if not self.plain(node, where):
            return None
        if node.tag == INT:
            number = self.value(node)
            if number >= 0:
                return int(number)
            self.report(node, where, f"{number} is negative")
        elif is_text(node) and node.value.strip():
            return str(node.value).strip()
        else:
            self.report(node, where, f"expected {shape}, got {kind(node)}")
        return None
