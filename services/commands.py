"""What a user does to runs — submit, wait, pause, resume, cancel, retry, inspect — as appends
and reads on the store. The CLI and the demo call these; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio
import msgspec
from opentelemetry.trace import TracerProvider

from eventstore.errors import FlowlogError
from eventstore.events import (
    RunCancelRequested,
    RunPaused,
    RunResumed,
    RunRetryRequested,
    RunSubmitted,
)
from eventstore.ids import derived_event_id, new_event_id
from eventstore.store import TERMINAL_STATUSES, EventStore, Outcome
from projections.run_state import RunState
from services.observability.tracing import RunTracer
from services.producer import Producer
from services.runs import RunLoader
from services.workflow.model import WorkflowDef

#: Inputs compared as canonical JSON (keys sorted): the same submission in any order.
_CANONICAL: Final = msgspec.json.Encoder(order="sorted")


class RunNotFound(FlowlogError):
    """No run with that id is in the store (never submitted, or expired by retention)."""


class InvalidTransition(FlowlogError):
    """The run's status does not allow the command (e.g. pausing a completed run)."""


class IdempotencyKeyReused(FlowlogError):
    """The idempotency key was already used for a submission with other content."""


class WaitTimeout(FlowlogError):
    """The run did not reach a terminal status in time."""


class SubmitResult(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    duplicate: bool


def run_id_for(workflow: str, idempotency_key: str) -> str:
    """The run id a submission gets: derived from the key when there is one, else fresh."""
    if idempotency_key:
        return "run-" + derived_event_id("run", workflow, idempotency_key)
    return "run-" + new_event_id()


async def submit(
    store: EventStore,
    producer: Producer,
    definition: WorkflowDef,
    inputs: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str = "",
    tracer_provider: TracerProvider | None = None,
) -> SubmitResult:
    """Append ``run_submitted`` as the run's first event. Keys are per workflow: the same
    idempotency key for the same workflow returns the same run, appending nothing, for as long
    as the run is kept (retention), also past the dedup window; with a different definition or
    inputs it raises IdempotencyKeyReused. The same submission is the same definition digest
    and inputs, whatever their order or the path the file was read from. The submission opens
    the run's trace (its root span is ``run <workflow>``)."""
    run_id = run_id_for(definition.name, idempotency_key)
    submitted = RunSubmitted(
        workflow=definition.name,
        digest=definition.digest,
        definition=definition.body,
        definition_format=definition.format,
        source=definition.source,
        inputs={**definition.inputs, **(inputs or {})},
        idempotency_key=idempotency_key,
    )
    event = producer.envelope(run_id, submitted, event_id=derived_event_id("submitted", run_id))
    tracer = RunTracer(store.config, tracer_provider)
    with tracer.sending(f"run {definition.name}", event) as event:
        # expected seq 0: only a run that does not exist yet is submitted
        (result,) = await store.append(run_id, [event], expected_seq=0)
    if result.outcome is Outcome.APPENDED:
        return SubmitResult(run_id=run_id, duplicate=False)
    if result.outcome is Outcome.DUPLICATE or await _submitted_as(store, run_id, submitted):
        return SubmitResult(run_id=run_id, duplicate=True)
    raise IdempotencyKeyReused(
        f"idempotency key {idempotency_key!r} was already used for run {run_id} with a"
        " different definition or inputs"
    )


async def _submitted_as(store: EventStore, run_id: str, submitted: RunSubmitted) -> bool:
    """Whether the run was submitted with the same workflow, definition and inputs."""
    first = await anext(aiter(store.read_run(run_id)), None)
    if first is None or not isinstance(first.data, RunSubmitted):
        return False
    stored = first.data
    return (stored.workflow, stored.digest) == (submitted.workflow, submitted.digest) and (
        _CANONICAL.encode(stored.inputs) == _CANONICAL.encode(submitted.inputs)
    )


async def load_run(store: EventStore, run_id: str) -> RunState:
    state = await RunLoader(store).load(run_id)
    if state is None:
        raise RunNotFound(f"no run {run_id!r} in the store")
    return state


async def wait(
    store: EventStore,
    run_id: str,
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.05,
    on_progress: Callable[[RunState], None] | None = None,
) -> RunState:
    """Follow the run until it is terminal; ``on_progress`` sees every new state. Raises
    :class:`WaitTimeout` after ``timeout_s`` (None: no bound)."""
    loader = RunLoader(store)
    seen = -1
    status = "not submitted"
    with anyio.move_on_after(timeout_s):
        while True:
            state = await loader.load(run_id)
            if state is not None:
                if state.seq != seen and on_progress is not None:
                    on_progress(state)
                seen, status = state.seq, state.status
                if state.status in TERMINAL_STATUSES:
                    return state
            await anyio.sleep(poll_s)
    raise WaitTimeout(f"run {run_id} did not finish within {timeout_s:g}s (it is {status})")


async def _control(
    store: EventStore,
    producer: Producer,
    run_id: str,
    allowed: frozenset[str],
    make: Callable[[RunState], Any],
    verb: str,
) -> RunState:
    """Append a user command with the seq it was decided on; retry if the run moved. The
    command's span is a child of the run's root span."""
    loader = RunLoader(store)
    tracer = RunTracer(store.config)
    root = await _root_traceparent(store, run_id) if tracer.enabled else ""
    while True:
        state = await loader.load(run_id)
        if state is None:
            raise RunNotFound(f"no run {run_id!r} in the store")
        if state.status not in allowed:
            raise InvalidTransition(
                f"cannot {verb} run {run_id}: it is {state.status}"
                f" ({verb} applies to {', '.join(sorted(allowed))} runs)"
            )
        event = producer.envelope(run_id, make(state), causation_id=state.last_event_id)
        with tracer.sending(f"{verb} {state.workflow}", event, root) as event:
            (result,) = await store.append(run_id, [event], expected_seq=state.seq)
        if result.outcome is Outcome.APPENDED:
            return state
        loader.forget(run_id)


async def _root_traceparent(store: EventStore, run_id: str) -> str:
    """The traceparent of the run's first event (its submission: the root of its trace)."""
    async for event in store.read_run(run_id):
        return event.traceparent
    return ""


async def pause(store: EventStore, producer: Producer, run_id: str, reason: str = "") -> RunState:
    return await _control(
        store,
        producer,
        run_id,
        frozenset({"submitted", "running"}),
        lambda _: RunPaused(reason=reason),
        "pause",
    )


async def resume(store: EventStore, producer: Producer, run_id: str, reason: str = "") -> RunState:
    return await _control(
        store,
        producer,
        run_id,
        frozenset({"paused"}),
        lambda _: RunResumed(reason=reason),
        "resume",
    )


async def cancel(store: EventStore, producer: Producer, run_id: str, reason: str = "") -> RunState:
    return await _control(
        store,
        producer,
        run_id,
        frozenset({"submitted", "running", "paused"}),
        lambda _: RunCancelRequested(reason=reason),
        "cancel",
    )


def steps_to_reset(definition: WorkflowDef, state: RunState, from_step: str) -> tuple[str, ...]:
    """The steps a retry re-runs: ``from_step`` (or every failed/cancelled step) and
    everything downstream of them, in definition order."""
    if from_step:
        definition.step(from_step)
        roots = {from_step}
    else:
        roots = {sid for sid, step in state.steps.items() if step.status in ("failed", "cancelled")}
    dependents: dict[str, set[str]] = {s.id: set() for s in definition.steps}
    for step in definition.steps:
        for dep in step.depends_on:
            dependents[dep].add(step.id)
    reset = set()
    todo = list(roots)
    while todo:
        sid = todo.pop()
        if sid not in reset:
            reset.add(sid)
            todo.extend(dependents.get(sid, ()))
    return tuple(s.id for s in definition.steps if s.id in reset)


async def retry(
    store: EventStore, producer: Producer, run_id: str, from_step: str = ""
) -> RunState:
    """Re-run a failed or cancelled run from ``from_step`` (default: its failed steps)."""
    loader = RunLoader(store)

    def make(state: RunState) -> RunRetryRequested:
        try:
            reset = steps_to_reset(loader.definition(state), state, from_step)
        except KeyError:
            raise InvalidTransition(f"run {run_id} has no step {from_step!r}") from None
        return RunRetryRequested(from_step=from_step, reset_steps=reset)

    return await _control(
        store, producer, run_id, frozenset({"failed", "cancelled"}), make, "retry"
    )
