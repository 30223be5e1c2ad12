"""What the scheduler derives once per workflow definition.

A :class:`Plan` holds the steps by id, the dependency plan recorded in ``run_started``, the
reason the graph cannot run (unknown dependency, cycle, repeated id) if any, ancestry, and the
steps each step's expressions read, so an expression scope is built from what a step reads
rather than from the whole run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

from projections.run_state import SETTLED, RunState
from services.workflow.errors import ExpressionError
from services.workflow.expressions import compile_expression, template_expressions
from services.workflow.model import StepDef, WorkflowDef

_CACHE_SIZE: Final = 256
_PLANS: OrderedDict[int, tuple[WorkflowDef, Plan]] = OrderedDict()


class Plan:
    """The scheduler's view of one :class:`WorkflowDef` (see the module docstring)."""

    __slots__ = ("_ancestors", "_reads", "deps", "position", "problem", "steps")

    def __init__(self, definition: WorkflowDef) -> None:
        self.steps: dict[str, StepDef] = {step.id: step for step in definition.steps}
        self.position = {step_id: index for index, step_id in enumerate(self.steps)}
        self.deps = {step.id: tuple(dict.fromkeys(step.depends_on)) for step in definition.steps}
        self.problem = ""
        self._ancestors: dict[str, int] = {}
        self._reads: dict[str, tuple[str, ...] | None] = {}
        if len(self.steps) != len(definition.steps):
            self.problem = "step ids are not unique"
            return
        for step_id, deps in self.deps.items():
            unknown = [dep for dep in deps if dep not in self.steps]
            if unknown:
                self.problem = f"step {step_id!r} depends on unknown step {unknown[0]!r}"
                return
        order = self._topological_order()
        if order is None:
            self.problem = "the dependencies of the steps form a cycle"
            return
        for step_id in order:
            bits = 0
            for dep in self.deps[step_id]:
                bits |= self._ancestors[dep] | (1 << self.position[dep])
            self._ancestors[step_id] = bits

    def _topological_order(self) -> list[str] | None:
        waiting = {step_id: len(deps) for step_id, deps in self.deps.items()}
        dependents: dict[str, list[str]] = {step_id: [] for step_id in self.deps}
        for step_id, deps in self.deps.items():
            for dep in deps:
                dependents[dep].append(step_id)
        order = [step_id for step_id, count in waiting.items() if count == 0]
        for step_id in order:
            for dependent in dependents[step_id]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    order.append(dependent)
        return order if len(order) == len(self.deps) else None

    def is_ancestor(self, ancestor: str, step_id: str) -> bool:
        """Whether ``step_id`` depends on ``ancestor``, directly or transitively."""
        position = self.position.get(ancestor)
        return position is not None and bool(self._ancestors.get(step_id, 0) >> position & 1)

    def _read_steps(self, step_id: str) -> tuple[str, ...] | None:
        """The step ids ``step_id``'s expressions name, or None when one reads ``steps``
        with a computed key (then every ancestor is in scope)."""
        if step_id in self._reads:
            return self._reads[step_id]
        step = self.steps[step_id]
        sources = [source for source in (step.when, step.for_each) if source]
        if step.loop is not None:
            sources.append(step.loop.until)
        names: dict[str, None] = {}
        dynamic = False
        try:
            for template in (step.with_, *(fallback.with_ for fallback in step.fallback)):
                sources.extend(template_expressions(template))
            for source in sources:
                for path in compile_expression(source).paths:
                    if path[0] != "steps":
                        continue
                    if len(path) > 1 and isinstance(path[1], str):
                        names[path[1]] = None
                    else:
                        dynamic = True
        except ExpressionError:
            dynamic = True
        found = None if dynamic else tuple(names)
        self._reads[step_id] = found
        return found

    def results(self, step_id: str, state: RunState) -> dict[str, dict[str, Any]]:
        """``steps`` of an expression scope for ``step_id``: output and status of the settled
        ancestors its expressions read (a skipped one has output None)."""
        wanted = self._read_steps(step_id)
        if wanted is None:
            wanted = tuple(self.steps)
        scope: dict[str, dict[str, Any]] = {}
        for name in wanted:
            found = state.steps.get(name)
            if found is not None and found.status in SETTLED and self.is_ancestor(name, step_id):
                scope[name] = {"output": found.output, "status": found.status}
        return scope


def plan_for(definition: WorkflowDef) -> Plan:
    """The plan of ``definition``, built once and kept for the last few definitions seen."""
    key = id(definition)
    cached = _PLANS.get(key)
    if cached is not None and cached[0] is definition:
        _PLANS.move_to_end(key)
        return cached[1]
    plan = Plan(definition)
    _PLANS[key] = (definition, plan)
    if len(_PLANS) > _CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan
