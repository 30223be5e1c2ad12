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


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What went wrong: exception type name, message, and whether a retry may help."""

    type: str
    message: str
    retryable: bool = True


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every payload; the tag is the event type."""


# --- run lifecycle -------------------------------------------------------------------------


class RunSubmitted(_Event, tag="run_submitted"):
    workflow: str
    digest: str
    definition: str
    definition_format: str = "yaml"
    source: str = ""
    inputs: dict[str, Any] = {}
    idempotency_key: str = ""


class RunStarted(_Event, tag="run_started"):
    pass


class RunPaused(_Event, tag="run_paused"):
    reason: str = ""


class RunResumed(_Event, tag="run_resumed"):
    reason: str = ""


class RunCancelRequested(_Event, tag="run_cancel_requested"):
    reason: str = ""


class RunCancelled(_Event, tag="run_cancelled"):
    reason: str = ""


class RunCompleted(_Event, tag="run_completed"):
    degraded: bool = False


class RunFailed(_Event, tag="run_failed"):
    error: ErrorInfo
    step: str = ""


class RunRetryRequested(_Event, tag="run_retry_requested"):
    from_step: str = ""


class CheckpointTaken(_Event, tag="checkpoint_taken"):
    covered_seq: int
    snapshot_key: str


# --- steps -----------------------------------------------------------------------------------


class StepScheduled(_Event, tag="step_scheduled"):
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


class StepStarted(_Event, tag="step_started"):
    step: str
    attempt: int
    agent: str
    runner: str = ""
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0


class StepSucceeded(_Event, tag="step_succeeded"):
    step: str
    attempt: int
    agent: str
    output: Any = None
    duration_ms: float = 0.0
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    cached: bool = False


class StepFailed(_Event, tag="step_failed"):
    step: str
    attempt: int
    agent: str
    error: ErrorInfo
    duration_ms: float = 0.0
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0


class StepRetryScheduled(_Event, tag="step_retry_scheduled"):
    step: str
    attempt: int
    delay_s: float
    due_ms: int
    item: int | None = None
    iteration: int | None = None


class StepSkipped(_Event, tag="step_skipped"):
    step: str
    reason: str


class StepCancelled(_Event, tag="step_cancelled"):
    step: str
    attempt: int = 0
    reason: str = ""
    item: int | None = None
    iteration: int | None = None


class FallbackStarted(_Event, tag="fallback_started"):
    step: str
    attempt: int
    fallback_index: int
    agent: str
    reason: ErrorInfo
    item: int | None = None
    iteration: int | None = None


class StepCacheHit(_Event, tag="step_cache_hit"):
    step: str
    attempt: int
    agent: str
    output: Any = None
    cache_key: str = ""
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0


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
)

EVENT_TYPES: Final[dict[str, type[_Event]]] = {
    str(cls.__struct_config__.tag): cls for cls in EventData.__args__  # type: ignore[attr-defined]
}


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
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
        return str(self.data.__struct_config__.tag)
