"""Load workflow definitions from YAML or JSON and validate them completely.

The text is composed into YAML nodes (JSON is read the same way, after a strict JSON syntax
check), so every problem carries the line of the offending field. Validation does not stop at
the first problem: :class:`DefinitionError` lists all of them, each as ``file:line: field:
message``, where ``field`` is a path such as ``steps[1].retry.max_attempts`` (indexes count from
0).

Accepted shapes beyond the model's own: ``depends_on`` as one string or a list, ``retry`` as an
integer (``max_attempts``), ``when`` as a boolean, ``non_retryable`` as one string or a list, and
YAML anchors and merge keys (``<<: *defaults``). ``for_each`` is stored as one ``${{ expr }}``
template whether it was written bare or as a template, so :func:`render` and
:func:`compile_expression` both evaluate it; ``when`` and ``loop.until`` are stored as written
(either form) and are evaluated with :func:`compile_expression`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final

import msgspec
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from services.workflow.errors import DefinitionError, DefinitionIssue, ExpressionError
from services.workflow.expressions import compile_expression, template_expressions
from services.workflow.model import (
    BUILTIN_AGENTS,
    FallbackSpec,
    LoopSpec,
    RetryPolicy,
    StepDef,
    WorkflowDef,
)
from services.workflow.nodes import TAG, NodeReader, describe, line_of, suggest

__all__ = [
    "BUILTIN_AGENTS",
    "DefinitionError",
    "DefinitionIssue",
    "execution_levels",
    "load_definition",
    "parse_definition",
]

_SUFFIXES: Final = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
_STEP_ID: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

_DEFINITION_KEYS: Final = ("name", "description", "inputs", "max_parallel", "steps")
_STEP_KEYS: Final = (
    "id", "agent", "with", "depends_on", "when", "loop", "for_each", "retry", "timeout",
    "fallback", "critical", "cache_ttl", "queue",
)  # fmt: skip
_RETRY_KEYS: Final = (
    "max_attempts", "initial_delay", "backoff", "max_delay", "jitter", "non_retryable",
)  # fmt: skip
#: Numeric retry fields with their inclusive lower and upper bounds.
_RETRY_BOUNDS: Final = (
    ("initial_delay", 0.0, None), ("backoff", 1.0, None), ("max_delay", 0.0, None),
    ("jitter", 0.0, 1.0),
)  # fmt: skip

#: Names every expression may read; the others depend on where the expression is.
_RUN_NAMES: Final = frozenset({"inputs", "steps", "run"})
_STEP_FIELDS: Final = frozenset({"output", "status"})


class _Use(msgspec.Struct, frozen=True):
    """One expression in a step: where it is, its source and the names in its scope."""

    field: str
    node: Node
    source: str
    names: frozenset[str]


class _Step(msgspec.Struct, kw_only=True):
    """A step as read, before the checks that need the whole graph."""

    index: int
    node: Node
    id: str | None = None
    id_line: int = 0
    agent: str | None = None
    deps: list[tuple[str, Node, str]] = msgspec.field(default_factory=list)
    uses: list[_Use] = msgspec.field(default_factory=list)
    values: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def field(self) -> str:
        return f"steps[{self.index}]"


class _DefinitionReader:
    """Reads the document into steps and a definition, then checks the graph and expressions."""

    def __init__(self, reader: NodeReader, agents: Collection[str]) -> None:
        self.r = reader
        self.agents = agents

    def read(self, root: Node) -> WorkflowDef | None:
        r = self.r
        top = r.fields(root, "", _DEFINITION_KEYS, ("name", "steps"))
        if top is None:
            return None
        values: dict[str, Any] = {}
        for key, read in (("name", r.text), ("description", r.text)):
            if key in top and (value := read(top[key], key)) is not None:
                values[key] = value
        if "max_parallel" in top:
            values["max_parallel"] = r.positive_int(top["max_parallel"], "max_parallel")
        if "inputs" in top and (inputs := self.mapping(top["inputs"], "inputs")) is not None:
            values["inputs"] = inputs
        steps: list[_Step] = []
        if "steps" in top:
            node = top["steps"]
            if not isinstance(node, SequenceNode):
                r.issue(node, "steps", f"expected a list, got {describe(node)}")
            elif not node.value:
                r.issue(node, "steps", "must list at least one step")
            else:
                steps = [self.step(i, item) for i, item in enumerate(node.value)]
        self.check_steps(steps)
        if r.issues:
            return None
        built = tuple(StepDef(id=s.id or "", agent=s.agent or "", **s.values) for s in steps)
        return WorkflowDef(steps=built, **values)

    def mapping(
        self, node: Node, field: str, strings: list[tuple[str, Node]] | None = None
    ) -> dict[str, Any] | None:
        if not isinstance(node, MappingNode):
            if not (isinstance(node, ScalarNode) and node.tag == TAG + "null"):
                self.r.issue(node, field, f"expected a mapping, got {describe(node)}")
            return None
        value: dict[str, Any] = self.r.plain(node, field, strings)
        return value

    def templates(self, strings: list[tuple[str, Node]], names: frozenset[str]) -> list[_Use]:
        uses = []
        for field, node in strings:
            try:
                sources = template_expressions(node.value)
            except ExpressionError as exc:
                self.r.issue(node, field, str(exc))
                continue
            uses += [_Use(field, node, source, names) for source in sources]
        return uses

    def step(self, index: int, node: Node) -> _Step:
        r = self.r
        step = _Step(index=index, node=node)
        base = step.field
        given = r.fields(node, base, _STEP_KEYS, ("id", "agent"))
        if given is None:
            return step
        if "id" in given and (step_id := r.text(given["id"], f"{base}.id")) is not None:
            if _STEP_ID.fullmatch(step_id):
                step.id, step.id_line = step_id, line_of(given["id"])
            else:
                message = "must start with a letter or '_' and hold only letters, digits, '_', '-'"
                r.issue(given["id"], f"{base}.id", message)
        if "agent" in given:
            step.agent = self.agent(given["agent"], f"{base}.agent")
        if "depends_on" in given:
            step.deps = r.names(given["depends_on"], f"{base}.depends_on")
            step.values["depends_on"] = tuple(dep for dep, _, _ in step.deps)
        names = _RUN_NAMES
        if "for_each" in given and "loop" in given:
            r.issue(given["loop"], f"{base}.loop", "a step cannot have both for_each and loop")
        if "for_each" in given:
            names |= {"item"}
            self.for_each(step, given["for_each"])
        if "loop" in given:
            names |= {"iteration"}
            self.loop(step, given["loop"])
        if "when" in given:
            self.when(step, given["when"])
        if "with" in given:
            strings: list[tuple[str, Node]] = []
            step.values["with_"] = self.mapping(given["with"], f"{base}.with", strings) or {}
            step.uses += self.templates(strings, names)
        if "retry" in given:
            step.values["retry"] = self.retry(given["retry"], f"{base}.retry")
        if "fallback" in given:
            step.values["fallback"] = self.fallback(step, given["fallback"], names)
        for key in ("timeout", "cache_ttl"):
            if key in given:
                step.values[key] = r.number(given[key], f"{base}.{key}")
        for key, read in (("critical", r.boolean), ("queue", r.text)):
            if key in given and (value := read(given[key], f"{base}.{key}")) is not None:
                step.values[key] = value
        return step

    def agent(self, node: Node, field: str) -> str | None:
        agent = self.r.text(node, field)
        if agent is not None and agent not in self.agents:
            known = ", ".join(sorted(self.agents))
            hint = suggest(agent, self.agents) or f" (known: {known})"
            self.r.issue(node, field, f"unknown agent {agent!r}{hint}")
            return None
        return agent

    def expression(self, step: _Step, node: Node, field: str, names: frozenset[str]) -> str | None:
        """A bare expression or one whole template, recorded for the expression checks."""
        source = self.r.scalar(node, field, ("str",), "an expression string")
        if source is None:
            return None
        step.uses.append(_Use(field, node, str(source), names))
        return str(source)

    def for_each(self, step: _Step, node: Node) -> None:
        """Recorded as written, a bare expression or one whole template, as ``when`` is (its
        problems are reported with the expressions)."""
        source = self.expression(step, node, f"{step.field}.for_each", _RUN_NAMES)
        if source is not None:
            step.values["for_each"] = source

    def loop(self, step: _Step, node: Node) -> None:
        field = f"{step.field}.loop"
        given = self.r.fields(node, field, ("until", "max_iterations"), ("until",))
        if given is None or "until" not in given:
            return
        names = _RUN_NAMES | {"iteration", "output"}
        until = self.expression(step, given["until"], f"{field}.until", names)
        limits = {}
        if "max_iterations" in given:
            limit = self.r.positive_int(given["max_iterations"], f"{field}.max_iterations")
            limits = {} if limit is None else {"max_iterations": limit}
        if until is not None:
            step.values["loop"] = LoopSpec(until=until, **limits)

    def when(self, step: _Step, node: Node) -> None:
        field = f"{step.field}.when"
        if isinstance(node, ScalarNode) and node.tag == TAG + "bool":
            step.values["when"] = "true" if self.r.plain(node, field) else "false"
            return
        step.values["when"] = self.expression(step, node, field, _RUN_NAMES)

    def retry(self, node: Node, field: str) -> RetryPolicy:
        r = self.r
        if isinstance(node, ScalarNode) and node.tag == TAG + "int":
            return RetryPolicy(max_attempts=r.positive_int(node, field) or 1)
        given = r.fields(node, field, _RETRY_KEYS)
        if given is None:
            return RetryPolicy()
        values: dict[str, Any] = {}
        if "max_attempts" in given:
            values["max_attempts"] = r.positive_int(given["max_attempts"], f"{field}.max_attempts")
        if "non_retryable" in given:
            names = r.names(given["non_retryable"], f"{field}.non_retryable")
            values["non_retryable"] = tuple(name for name, _, _ in names)
        for key, low, high in _RETRY_BOUNDS:
            if key in given:
                values[key] = r.number(given[key], f"{field}.{key}", low, strict=False, high=high)
        return RetryPolicy(**{k: v for k, v in values.items() if v is not None})

    def fallback(self, step: _Step, node: Node, names: frozenset[str]) -> tuple[FallbackSpec, ...]:
        base = f"{step.field}.fallback"
        if not isinstance(node, SequenceNode):
            self.r.issue(node, base, f"expected a list, got {describe(node)}")
            return ()
        specs = []
        for i, item in enumerate(node.value):
            field = f"{base}[{i}]"
            given = self.r.fields(item, field, ("agent", "with", "timeout"), ("agent",))
            if given is None:
                continue
            agent = self.agent(given["agent"], f"{field}.agent") if "agent" in given else None
            strings: list[tuple[str, Node]] = []
            with_ = None
            if "with" in given:
                with_ = self.mapping(given["with"], f"{field}.with", strings)
                step.uses += self.templates(strings, names)
            timeout = None
            if "timeout" in given:
                timeout = self.r.number(given["timeout"], f"{field}.timeout")
            if agent is not None:
                specs.append(FallbackSpec(agent=agent, with_=with_ or {}, timeout=timeout))
        return tuple(specs)

    def check_steps(self, steps: list[_Step]) -> None:
        """Duplicate ids, bad dependencies, cycles, then every expression of every step."""
        r = self.r
        by_id: dict[str, _Step] = {}
        for step in steps:
            if step.id is None:
                continue
            first = by_id.get(step.id)
            if first is not None:
                message = f"duplicate step id {step.id!r} (first on line {first.id_line})"
                r.issue(step.id_line, f"{step.field}.id", message)
                step.id = None
            else:
                by_id[step.id] = step
        graph: dict[str, list[tuple[str, Node, str]]] = {}
        for step in steps:
            if step.id is None:
                continue
            graph[step.id] = []
            listed: set[str] = set()
            for dep, node, field in step.deps:
                if dep == step.id:
                    r.issue(node, field, f"step {dep!r} depends on itself")
                elif dep not in by_id:
                    r.issue(node, field, f"unknown step {dep!r}{suggest(dep, by_id)}")
                elif dep in listed:
                    r.issue(node, field, f"{dep!r} is listed twice")
                else:
                    graph[step.id].append((dep, node, field))
                listed.add(dep)
        for cycle, node, field in _cycles(graph):
            r.issue(node, field, "dependency cycle: " + " -> ".join(cycle))
        for step in steps:
            for use in step.uses:
                self.check_expression(step, use, graph)

    def check_expression(
        self, step: _Step, use: _Use, graph: dict[str, list[tuple[str, Node, str]]]
    ) -> None:
        try:
            expression = compile_expression(use.source)
        except ExpressionError as exc:
            self.r.issue(use.node, use.field, str(exc))
            return
        available = ", ".join(sorted(use.names))
        for name in sorted(expression.names - use.names):
            message = f"unknown name {name!r} in {use.source!r} (available here: {available})"
            self.r.issue(use.node, use.field, message)
        ancestors: set[str] | None = None
        for path in sorted(expression.paths, key=str):
            if path[0] != "steps" or len(path) < 2 or step.id is None:
                continue
            ref = str(path[1])
            if len(path) > 2 and path[2] not in _STEP_FIELDS:
                message = f"steps.{ref} has only 'output' and 'status', not {path[2]!r}"
                self.r.issue(use.node, use.field, message)
            if ancestors is None:
                ancestors = _ancestors(graph, step.id)
            if ref == step.id:
                message = f"step {ref!r} cannot read its own result (loop.until has 'output')"
            elif ref not in graph:
                message = f"unknown step {ref!r} in {use.source!r}{suggest(ref, graph)}"
            elif ref not in ancestors:
                message = f"step {ref!r} is not a dependency of {step.id!r}; add it to depends_on"
            else:
                continue
            self.r.issue(use.node, use.field, message)


def _ancestors(graph: dict[str, list[tuple[str, Node, str]]], step_id: str) -> set[str]:
    """Every step ``step_id`` depends on, directly or not."""
    found: set[str] = set()
    todo = [dep for dep, _, _ in graph.get(step_id, [])]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += [dep for dep, _, _ in graph.get(current, [])]
    return found


def _cycles(
    graph: dict[str, list[tuple[str, Node, str]]],
) -> list[tuple[list[str], Node, str]]:
    """Each cycle a depth-first walk (in definition order) closes: path, closing entry node
    and field. The path reads ``a -> b``: ``a`` depends on ``b``."""
    state: dict[str, int] = {}  # 1: on the walk's path, 2: done
    found = []
    for root, entries in graph.items():
        if root in state:
            continue
        state[root] = 1
        path = [root]
        stack = [iter(entries)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            dep, node, field = entry
            if state.get(dep) == 1:
                found.append(([*path[path.index(dep) :], dep], node, field))
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                stack.append(iter(graph[dep]))
    return found


def _sniff(text: str) -> str:
    if text.lstrip().startswith(("{", "[")):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return "yaml"
        return "json"
    return "yaml"


def parse_definition(
    text: str,
    *,
    source: str = "<string>",
    format: str | None = None,
    agents: Collection[str] = BUILTIN_AGENTS,
) -> WorkflowDef:
    """Parse and validate a definition; ``format`` is ``yaml`` or ``json`` (None: sniffed).

    Raises :class:`DefinitionError` listing every problem found, each naming ``source``, the
    line and the field.
    """
    fmt = _sniff(text) if format is None else {"yml": "yaml"}.get(format, format)
    reader = NodeReader(source)
    if fmt not in ("yaml", "json"):
        reader.issue(0, "", f"unsupported format {format!r} (use yaml or json)")
        raise DefinitionError(reader.issues)
    root = reader.compose(text, fmt)
    definition = None if root is None else _DefinitionReader(reader, agents).read(root)
    if definition is None or reader.issues:
        raise DefinitionError(reader.issues)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return msgspec.structs.replace(definition, digest=digest, body=text, format=fmt, source=source)


def load_definition(path: str | Path, agents: Collection[str] = BUILTIN_AGENTS) -> WorkflowDef:
    """Read and validate the definition in ``path`` (format from the suffix)."""
    file = Path(path)
    fmt = _SUFFIXES.get(file.suffix.lower())
    if fmt is None:
        issue = DefinitionIssue(str(file), 0, "", "expected a .yaml, .yml or .json file")
        raise DefinitionError([issue])
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError([DefinitionIssue(str(file), 0, "", f"cannot read: {exc}")]) from exc
    return parse_definition(text, source=str(file), format=fmt, agents=agents)


def execution_levels(definition: WorkflowDef) -> list[list[str]]:
    """Steps grouped in dependency order: each level needs only steps of earlier levels.

    Within a level, steps keep definition order. Raises :class:`DefinitionError` for an
    unknown dependency or a cycle (neither passes :func:`parse_definition`).
    """
    order = {step.id: i for i, step in enumerate(definition.steps)}
    waiting = {step.id: len(set(step.depends_on)) for step in definition.steps}
    dependents: dict[str, list[str]] = {step.id: [] for step in definition.steps}
    for step in definition.steps:
        for dep in set(step.depends_on):
            if dep not in dependents:
                issue = DefinitionIssue(definition.source, 0, "steps", f"unknown step {dep!r}")
                raise DefinitionError([issue])
            dependents[dep].append(step.id)
    levels: list[list[str]] = []
    level = [step.id for step in definition.steps if waiting[step.id] == 0]
    while level:
        levels.append(level)
        following = []
        for step_id in level:
            for child in dependents[step_id]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    following.append(child)
        level = sorted(following, key=order.__getitem__)
    stuck = [step_id for step_id, count in waiting.items() if count > 0]
    if stuck:
        message = f"dependency cycle among {', '.join(stuck)}"
        raise DefinitionError([DefinitionIssue(definition.source, 0, "steps", message)])
    return levels
