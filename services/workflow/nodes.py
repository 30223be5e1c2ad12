"""Reading composed YAML nodes into plain values and typed fields, collecting every issue.

The loader reads definitions node by node (not as constructed Python objects) so that each
problem can name the line it is on. JSON definitions are composed by the same YAML parser.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Collection, Iterable
from typing import Any, Final

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from services.workflow.errors import DefinitionIssue

TAG: Final = "tag:yaml.org,2002:"
#: The most values one definition may hold once YAML aliases are expanded.
MAX_NODES: Final = 100_000


def join(base: str, key: str) -> str:
    """The field path of ``key`` inside ``base``."""
    return f"{base}.{key}" if base else key


def line_of(node: Node) -> int:
    """The 1-based line a node starts on."""
    return int(node.start_mark.line) + 1


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_KIND_NAMES: Final = {"str": "string", "int": "integer", "bool": "boolean"}


def kind_of(node: Node) -> str:
    """The short YAML tag of a node: ``str``, ``int``, ``map``..."""
    return str(node.tag).removeprefix(TAG)


def describe(node: Node) -> str:
    """A node as messages name it: ``a mapping``, ``integer '3'``, ``null``."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = kind_of(node)
    if kind == "null":
        return "null"
    shown = repr(node.value) if kind in ("str", "timestamp") else node.value
    return f"{_KIND_NAMES.get(kind, kind)} {shown}"


class NodeReader:
    """Reads YAML nodes of one ``file`` into values, collecting every issue in ``issues``.

    Typed readers return None for an explicit null (the field keeps its default) and for a
    bad value (after recording the issue).
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[DefinitionIssue] = []
        self.constructor = SafeConstructor()
        self.budget = MAX_NODES
        self.active: set[int] = set()
        self.entries: dict[int, dict[str, tuple[Node, Node]]] = {}

    def issue(self, where: Node | int, field: str, message: str) -> None:
        """Record a problem at a node's line (or at a line number)."""
        line = where if isinstance(where, int) else line_of(where)
        self.issues.append(DefinitionIssue(self.file, line, field, message))

    def compose(self, text: str, fmt: str) -> Node | None:
        """The document's root node, or None after recording a syntax error."""
        if fmt == "json":
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                self.issue(exc.lineno, "", f"JSON syntax error: {exc.msg} (column {exc.colno})")
                return None
            text = text.replace("\t", " ")  # insignificant in valid JSON; YAML rejects it
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = int(mark.line) + 1 if mark is not None else 0
            problem = " ".join(filter(None, [exc.context, exc.problem]))
            self.issue(line, "", f"{fmt.upper()} syntax error: {problem}")
            return None
        except yaml.YAMLError as exc:
            self.issue(0, "", f"{fmt.upper()} syntax error: {exc}")
            return None
        except RecursionError:
            self.issue(0, "", "nested too deeply")
            return None
        if node is None:
            self.issue(1, "", "the definition is empty")
        return node

    def pairs(self, node: MappingNode, field: str) -> dict[str, tuple[Node, Node]]:
        """The mapping's entries by key text, after merge keys; reports duplicate keys.

        A node reached again through an alias gives the same entries without new reports.
        """
        known = self.entries.get(id(node))
        if known is not None:
            return known
        seen: dict[str, Node] = {}
        for key, _ in node.value:
            if key.tag == TAG + "merge":
                continue
            if not isinstance(key, ScalarNode):
                self.issue(key, field, f"keys must be strings, got {describe(key)}")
            elif key.value in seen:
                first = line_of(seen[key.value])
                self.issue(key, join(field, key.value), f"duplicate key (first on line {first})")
            else:
                seen[key.value] = key
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            self.issue(node, field, f"bad merge key: {exc.problem}")
        entries: dict[str, tuple[Node, Node]] = {
            k.value: (k, v) for k, v in node.value if isinstance(k, ScalarNode)
        }
        self.entries[id(node)] = entries
        return entries

    def fields(
        self, node: Node, field: str, allowed: Collection[str], required: Collection[str] = ()
    ) -> dict[str, Node] | None:
        """A mapping's value nodes by key; reports unknown and missing keys."""
        if not isinstance(node, MappingNode):
            self.issue(node, field, f"expected a mapping, got {describe(node)}")
            return None
        entries = self.pairs(node, field)
        for key, (key_node, _) in entries.items():
            if key not in allowed:
                self.issue(key_node, join(field, key), f"unknown key{suggest(key, allowed)}")
        for key in required:
            if key not in entries:
                self.issue(node, join(field, key), f"missing required key {key!r}")
        return {key: value for key, (_, value) in entries.items() if key in allowed}

    def plain(self, node: Node, field: str, strings: list[tuple[str, Node]] | None = None) -> Any:
        """The node as a JSON-like value; string scalars are also listed in ``strings``."""
        self.budget -= 1
        if self.budget == 0:
            self.issue(node, field, f"more than {MAX_NODES} values (alias expansion?)")
        if self.budget <= 0:
            return None
        if isinstance(node, ScalarNode):
            return self.scalar_value(node, field, strings)
        if id(node) in self.active:
            self.issue(node, field, "an alias refers to a node that contains it")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                entries = self.pairs(node, field).items()
                return {k: self.plain(v, join(field, k), strings) for k, (_, v) in entries}
            items = enumerate(node.value)
            return [self.plain(item, f"{field}[{i}]", strings) for i, item in items]
        finally:
            self.active.discard(id(node))

    def scalar_value(
        self, node: ScalarNode, field: str, strings: list[tuple[str, Node]] | None
    ) -> Any:
        """A scalar by its resolved tag; timestamps stay text, other tags are refused."""
        kind = kind_of(node)
        if kind in ("str", "timestamp"):
            if strings is not None:
                strings.append((field, node))
            return str(node.value)
        construct = {
            "null": self.constructor.construct_yaml_null,
            "bool": self.constructor.construct_yaml_bool,
            "int": self.constructor.construct_yaml_int,
            "float": self.constructor.construct_yaml_float,
        }.get(kind)
        if construct is None:
            self.issue(node, field, f"unsupported YAML tag {node.tag!r}")
            return None
        try:
            return construct(node)
        except (ValueError, yaml.YAMLError) as exc:
            self.issue(node, field, f"bad {kind} value {node.value!r}: {exc}")
            return None

    def scalar(self, node: Node, field: str, kinds: Collection[str], expected: str) -> Any:
        """The scalar's value if its type is one of ``kinds``; null gives None quietly."""
        kind = kind_of(node) if isinstance(node, ScalarNode) else ""
        if kind == "null":
            return None
        if kind not in kinds:
            self.issue(node, field, f"expected {expected}, got {describe(node)}")
            return None
        return self.plain(node, field)

    def text(self, node: Node, field: str) -> str | None:
        value = self.scalar(node, field, ("str", "timestamp"), "a string")
        if value == "":
            self.issue(node, field, "must not be empty")
            return None
        return None if value is None else str(value)

    def positive_int(self, node: Node, field: str) -> int | None:
        value = self.scalar(node, field, ("int",), "an integer")
        if value is not None and value < 1:
            self.issue(node, field, f"must be > 0, got {value}")
            return None
        return None if value is None else int(value)

    def number(
        self, node: Node, field: str, low: float = 0.0, *, strict: bool = True,
        high: float | None = None,
    ) -> float | None:  # fmt: skip
        """A number above ``low`` (or equal to it unless ``strict``) and at most ``high``."""
        value = self.scalar(node, field, ("int", "float"), "a number")
        if value is None:
            return None
        if not math.isfinite(value):
            self.issue(node, field, f"must be a finite number, got {node.value!r}")
            return None
        if value < low or (strict and value == low) or (high is not None and value > high):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            bound += f" and <= {high:g}" if high is not None else ""
            self.issue(node, field, f"must be {bound}, got {value}")
            return None
        return float(value)

    def boolean(self, node: Node, field: str) -> bool | None:
        value = self.scalar(node, field, ("bool",), "true or false")
        return None if value is None else bool(value)

    def names(self, node: Node, field: str) -> list[tuple[str, Node, str]]:
        """One string or a list of strings, each with its node and field path."""
        items = [(node, field)]
        if isinstance(node, SequenceNode):
            items = [(item, f"{field}[{i}]") for i, item in enumerate(node.value)]
        found = []
        for item, item_field in items:
            value = self.text(item, item_field)
            if value is not None:
                found.append((value, item, item_field))
        return found
