"""The scheduler service against the memory store: a checkpoint appended while it decides does
not make it decide again, and its cached state stays equal to a full replay; its own decisions
coming back through the feed are not decided again, unless a retry in them is due at once."""

from __future__ import annotations

import sys
from typing import NamedTuple

import pytest

from eventstore.events import (
    CheckpointTaken,
    Envelope,
    ErrorInfo,
    EventData,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.memory import MemoryStore
from eventstore.store import StoreConfig, Subscription
from projections.run_state import RunState, replay
from services import commands
from services.app import running
from services.producer import Producer
from services.scheduler import service as scheduler_service
from services.scheduler.decide import Decision, decide
from services.scheduler.service import GROUP, SchedulerService
from services.settings import Settings
from services.workflow.loader import parse_definition
from services.workflow.model import WorkflowDef

pytestmark = pytest.mark.anyio

CHAIN = parse_definition(
    "name: pair\nsteps:\n  - {id: a, agent: noop}\n  - {id: b, agent: noop, depends_on: [a]}\n"
)


async def deliver(
    scheduler: SchedulerService, subscription: Subscription, meanwhile: Envelope | None = None
) -> None:
    """Hand the scheduler what the feed has; ``meanwhile`` is appended after the fetch."""
    deliveries = await subscription.fetch(100, block_ms=0)
    assert deliveries
    if meanwhile is not None:
        await scheduler.store.append(meanwhile.run_id, [meanwhile])
    await scheduler.handle(deliveries)
    await subscription.ack(deliveries)


def counting_decide(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the run of every decision the scheduler service makes."""
    decided: list[str] = []

    def spy(
        definition: WorkflowDef, state: RunState, now_ms: int, *, value_limit: int | None = None
    ) -> Decision:
        decided.append(state.run_id)
        return decide(definition, state, now_ms, value_limit=value_limit)

    monkeypatch.setattr(scheduler_service, "decide", spy)
    return decided


def finished(run_id: str, scheduled: Envelope, producer: Producer) -> list[Envelope]:
    """A runner's start and success of the attempt ``scheduled`` schedules."""
    s = scheduled.data
    assert isinstance(s, StepScheduled)
    key = s.idempotency_key
    facts: list[EventData] = [
        StepStarted(step=s.step, attempt=s.attempt, agent=s.agent, runner="r", idempotency_key=key),
        StepSucceeded(
            step=s.step, attempt=s.attempt, agent=s.agent, output=None, idempotency_key=key
        ),
    ]
    return [producer.envelope(run_id, fact) for fact in facts]


class Submitted(NamedTuple):
    store: MemoryStore
    producer: Producer
    scheduler: SchedulerService
    subscription: Subscription
    run_id: str


async def submitted(definition: WorkflowDef) -> Submitted:
    """A memory store with a run of ``definition`` submitted and one scheduler replica."""
    store = MemoryStore()
    producer = Producer("test")
    scheduler = SchedulerService(store, producer, consumer="s1")
    subscription = await store.subscribe(GROUP, "s1")
    run = await commands.submit(store, producer, definition)
    return Submitted(store, producer, scheduler, subscription, run.run_id)


async def test_a_checkpoint_between_fact_and_decision_causes_no_reload() -> None:
    store, producer, scheduler, subscription, run_id = await submitted(CHAIN)

    await deliver(scheduler, subscription)
    history = [e async for e in store.read_run(run_id)]
    assert [e.type for e in history] == ["run_submitted", "run_started", "step_scheduled"]

    await store.append(run_id, finished(run_id, history[-1], producer))
    # The checkpointer records a checkpoint of seq 5 while the scheduler decides on seq 5.
    checkpoint = CheckpointTaken(covered_seq=5, snapshot_key=f"snap:{run_id}")
    await deliver(scheduler, subscription, meanwhile=producer.envelope(run_id, checkpoint))
    history = [e async for e in store.read_run(run_id)]
    assert [e.type for e in history][5:] == ["checkpoint_taken", "step_scheduled"]
    assert history[-1].seq == 7
    # Decided once on the state at seq 5, appended past the checkpoint: nothing was reloaded.
    assert scheduler.loader.events_read == 0

    await deliver(scheduler, subscription)
    cached = await scheduler.loader.advance(run_id, [])
    assert cached == replay(history)
    assert cached is not None
    assert cached.checkpoint_seq == 5
    await store.close()


async def test_own_decisions_coming_back_are_not_decided_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decided = counting_decide(monkeypatch)
    store, producer, scheduler, subscription, run_id = await submitted(CHAIN)

    await deliver(scheduler, subscription)
    assert decided == [run_id]
    # The feed brings back run_started and step_scheduled, which this replica decided.
    await deliver(scheduler, subscription)
    assert decided == [run_id]

    history = [e async for e in store.read_run(run_id)]
    await store.append(run_id, finished(run_id, history[-1], producer))
    await deliver(scheduler, subscription)
    assert decided == [run_id, run_id]
    assert [e.type async for e in store.read_run(run_id)][-1] == "step_scheduled"

    # Another replica gets the decisions this one appended: it has not decided them.
    other = SchedulerService(store, producer, consumer="s2")
    await other.handle(await subscription.fetch(100, block_ms=0))
    assert decided == [run_id, run_id, run_id]
    await store.close()


async def test_a_retry_due_at_once_is_scheduled_when_its_decision_comes_back() -> None:
    flaky = parse_definition(
        "name: retry-now\nsteps:\n"
        "  - {id: a, agent: noop, retry: {max_attempts: 2, initial_delay: 0, jitter: 0}}\n"
    )
    store, producer, scheduler, subscription, run_id = await submitted(flaky)
    await deliver(scheduler, subscription)
    scheduled = [e async for e in store.read_run(run_id)][-1].data
    assert isinstance(scheduled, StepScheduled)
    failed = StepFailed(
        step="a",
        attempt=1,
        agent="noop",
        error=ErrorInfo(type="Boom", message="boom", retryable=True),
        idempotency_key=scheduled.idempotency_key,
    )
    await store.append(run_id, [producer.envelope(run_id, failed)])
    await deliver(scheduler, subscription)
    assert [e.type async for e in store.read_run(run_id)][-1] == "step_retry_scheduled"

    # No timer fires here: the retry's own decision, coming back, schedules attempt 2.
    await deliver(scheduler, subscription)
    last = [e async for e in store.read_run(run_id)][-1].data
    assert isinstance(last, StepScheduled)
    assert last.attempt == 2
    await store.close()


async def test_a_decision_the_store_could_not_hold_fails_the_step_instead_of_the_scheduler() -> (
    None
):
    """Inputs rendered from outputs can outgrow an event: the scheduler (and the run) must go
    on, with the step failed naming the sizes."""
    store = MemoryStore(StoreConfig(max_event_bytes=4096))
    definition = parse_definition(
        f"""\
name: outgrown
steps:
  - id: a
    agent: shell
    with: {{argv: ["{sys.executable}", "-c", "print('x' * 3000)"]}}
  - id: b
    agent: echo
    depends_on: [a]
    with: {{value: ["${{{{ steps.a.output }}}}", "${{{{ steps.a.output }}}}"]}}
"""
    )
    async with running(store, Settings(redis_url=None, http_port=0), ("scheduler", "runner")):
        run = await commands.submit(store, Producer("test"), definition)
        state = await commands.wait(store, run.run_id, timeout_s=30)
    assert (state.status, state.steps["a"].status, state.steps["b"].status) == (
        "failed",
        "succeeded",
        "failed",
    )
    assert state.error is not None
    assert state.error.type == "ValueTooLarge"
    assert "the rendered inputs are" in state.error.message
