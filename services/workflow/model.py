"""The parsed, validated form of a workflow definition.

Produced by :mod:`services.workflow.loader` from YAML or JSON; consumed by the pure scheduler
(:func:`services.scheduler.decide.decide`). Expressions (``when``, ``loop.until``,
``for_each``) and templates inside ``with`` stay as source strings here and are evaluated by
:mod:`services.workflow.expressions` with the run's scope.
"""

from __future__ import annotations

from typing import Any

import msgspec

#: The agents every runner provides; a definition may name only these (unless told otherwise).
BUILTIN_AGENTS: frozenset[str] = frozenset(
    {"noop", "echo", "sleep", "flaky", "shell", "python", "http", "llm"}
)


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How often a step is attempted and how long to wait between attempts.

    The delay before attempt ``n + 1`` is ``min(max_delay, initial_delay * backoff**(n-1))``
    with +/- ``jitter`` (a fraction) applied. Errors whose type is in ``non_retryable`` (or
    that say they are not retryable) fail the step at once.

    By default a step is attempted up to 3 times, 1 s then 2 s apart (a transient failure
    should not fail a run); ``retry: 1`` or ``retry: {max_attempts: 1}`` turns retries off.
    """

    max_attempts: int = 3
    initial_delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1
    non_retryable: tuple[str, ...] = ()


class LoopSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Repeat a step until ``until`` is true (``iteration`` and ``output`` in scope)."""

    until: str
    max_iterations: int = 10


class FallbackSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An alternative agent tried, in list order, after the step's own agent gives up."""

    agent: str
    with_: dict[str, Any] = msgspec.field(default_factory=dict, name="with")
    timeout: float | None = None


class StepDef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    agent: str
    with_: dict[str, Any] = msgspec.field(default_factory=dict, name="with")
    depends_on: tuple[str, ...] = ()
    when: str | None = None
    loop: LoopSpec | None = None
    for_each: str | None = None
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    fallback: tuple[FallbackSpec, ...] = ()
    critical: bool = True
    cache_ttl: float | None = None
    queue: str = "default"


class WorkflowDef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole workflow. ``digest`` is the sha256 of ``body``, the source text as submitted."""

    name: str
    steps: tuple[StepDef, ...]
    inputs: dict[str, Any] = {}
    max_parallel: int | None = None
    description: str = ""
    digest: str = ""
    body: str = ""
    format: str = "yaml"
    source: str = ""

    def step(self, step_id: str) -> StepDef:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)
