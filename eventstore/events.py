"""The event envelope and every event payload type.

Rules for persisted types (they are decoded from history forever):
- new fields get defaults, fields are never reordered, renamed or retyped;
- a breaking change bumps :data:`SCHEMA_VERSION` and registers an upcaster in
  :mod:`eventstore.codec`.

Payloads are frozen msgspec Structs tagged by ``type``; the envelope's ``type`` is that tag.
Step events identify the unit of work by ``step`` plus ``item`` (the ``for_each`` index) and
``iteration`` (the ``loop`` iteration); ``attempt`` counts from 1 per unit.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

SCHEMA_VERSION: Final = 1


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What went wrong: exception type name, message, and whether a retry may help."""

    type: str
    message: str
    retryable: bool = True


class _Event(msgspec.Struct, frozen=True, kw_only=True, gc=False, tag_field="type"):
    """Base of every payload; the tag is the event type."""


# --- run lifecycle -------------------------------------------------------------------------


class RunSubmitted(_Event, frozen=True, kw_only=True, tag="run_submitted"):
    workflow: str
    digest: str
    definition: str
    definition_format: str = "yaml"
    source: str = ""
    inputs: dict[str, Any] = {}
    idempotency_key: str = ""


class RunStarted(_Event, frozen=True, kw_only=True, tag="run_started"):
    """The scheduler started the run; ``plan`` maps each step id to its ``depends_on``, in
    definition order, so the run state can track readiness without the definition."""

    plan: dict[str, tuple[str, ...]] = {}


class RunPaused(_Event, frozen=True, kw_only=True, tag="run_paused"):
    reason: str = ""


class RunResumed(_Event, frozen=True, kw_only=True, tag="run_resumed"):
    reason: str = ""


class RunCancelRequested(_Event, frozen=True, kw_only=True, tag="run_cancel_requested"):
    reason: str = ""


class RunCancelled(_Event, frozen=True, kw_only=True, tag="run_cancelled"):
    reason: str = ""


class RunCompleted(_Event, frozen=True, kw_only=True, tag="run_completed"):
    degraded: bool = False


class RunFailed(_Event, frozen=True, kw_only=True, tag="run_failed"):
    error: ErrorInfo
    step: str = ""


class RunRetryRequested(_Event, frozen=True, kw_only=True, tag="run_retry_requested"):
    """Re-run a finished run: ``reset_steps`` (filled in by whoever knows the graph: the failed
    steps or ``from_step``, and everything downstream) go back to pending."""

    from_step: str = ""
    reset_steps: tuple[str, ...] = ()


class CheckpointTaken(_Event, frozen=True, kw_only=True, tag="checkpoint_taken"):
    covered_seq: int
    snapshot_key: str


# --- steps -----------------------------------------------------------------------------------


class StepScheduled(_Event, frozen=True, kw_only=True, tag="step_scheduled"):
    step: str
    attempt: int
    agent: str
    inputs: dict[str, Any] = {}
    queue: str = "default"
    timeout_s: float | None = None
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    cache_ttl_s: float | None = None
    idempotency_key: str = ""


class StepStarted(_Event, frozen=True, kw_only=True, tag="step_started"):
    step: str
    attempt: int
    agent: str
    runner: str = ""
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    idempotency_key: str = ""


class StepSucceeded(_Event, frozen=True, kw_only=True, tag="step_succeeded"):
    step: str
    attempt: int
    agent: str
    output: Any = None
    duration_ms: float = 0.0
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    cached: bool = False
    idempotency_key: str = ""


class StepFailed(_Event, frozen=True, kw_only=True, tag="step_failed"):
    step: str
    attempt: int
    agent: str
    error: ErrorInfo
    duration_ms: float = 0.0
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    idempotency_key: str = ""


class StepRetryScheduled(_Event, frozen=True, kw_only=True, tag="step_retry_scheduled"):
    step: str
    attempt: int
    delay_s: float
    due_ms: int
    item: int | None = None
    iteration: int | None = None


class StepSkipped(_Event, frozen=True, kw_only=True, tag="step_skipped"):
    """A step will not run (``when`` false) or gave up without failing the run (non-critical);
    ``error`` is set in the second case."""

    step: str
    reason: str
    error: ErrorInfo | None = None


class StepCancelled(_Event, frozen=True, kw_only=True, tag="step_cancelled"):
    step: str
    attempt: int = 0
    reason: str = ""
    item: int | None = None
    iteration: int | None = None


class FallbackStarted(_Event, frozen=True, kw_only=True, tag="fallback_started"):
    step: str
    attempt: int
    fallback_index: int
    agent: str
    reason: ErrorInfo
    item: int | None = None
    iteration: int | None = None


class StepCacheHit(_Event, frozen=True, kw_only=True, tag="step_cache_hit"):
    step: str
    attempt: int
    agent: str
    output: Any = None
    cache_key: str = ""
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    idempotency_key: str = ""


class StepFannedOut(_Event, frozen=True, kw_only=True, tag="step_fanned_out"):
    """A ``for_each`` step's list, evaluated once: one unit per item, ``item`` = its index."""

    step: str
    items: list[Any] = []


class LoopCompleted(_Event, frozen=True, kw_only=True, tag="loop_completed"):
    """A ``loop`` step's ``until`` held after ``iteration`` succeeded: that output is final."""

    step: str
    iteration: int
    item: int | None = None


EventData = (
    RunSubmitted
    | RunStarted
    | RunPaused
    | RunResumed
    | RunCancelRequested
    | RunCancelled
    | RunCompleted
    | RunFailed
    | RunRetryRequested
    | CheckpointTaken
    | StepScheduled
    | StepStarted
    | StepSucceeded
    | StepFailed
    | StepRetryScheduled
    | StepSkipped
    | StepCancelled
    | FallbackStarted
    | StepCacheHit
    | StepFannedOut
    | LoopCompleted
)

EVENT_TYPES: Final[dict[str, type[_Event]]] = {
    str(cls.__struct_config__.tag): cls for cls in EventData.__args__
}
_TYPE_OF: Final[dict[type[_Event], str]] = {cls: tag for tag, cls in EVENT_TYPES.items()}


class Envelope(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One immutable event as stored in the log.

    ``seq`` is assigned by the store at append (it is 0 on an event not yet appended);
    ``event_id`` is the dedup key; ``causation_id`` names the event that led to this one.
    """

    event_id: str
    run_id: str
    ts: int
    producer: str
    data: EventData
    seq: int = 0
    causation_id: str = ""
    traceparent: str = ""
    v: int = SCHEMA_VERSION

    @property
    def type(self) -> str:
        """The event type (the payload's tag)."""
        return _TYPE_OF[type(self.data)]
