"""The scheduler service against the memory store: a checkpoint appended while it decides does
not make it decide again, and its cached state stays equal to a full replay."""

from __future__ import annotations

import pytest

from eventstore.events import (
    CheckpointTaken,
    Envelope,
    EventData,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.memory import MemoryStore
from eventstore.store import Subscription
from projections.run_state import replay
from services import commands
from services.producer import Producer
from services.scheduler.service import GROUP, SchedulerService
from services.workflow.loader import parse_definition

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


async def test_a_checkpoint_between_fact_and_decision_causes_no_reload() -> None:
    store = MemoryStore()
    producer = Producer("test")
    scheduler = SchedulerService(store, producer, consumer="s1")
    subscription = await store.subscribe(GROUP, "s1")
    run = await commands.submit(store, producer, CHAIN)
    run_id = run.run_id

    await deliver(scheduler, subscription)
    history = [e async for e in store.read_run(run_id)]
    assert [e.type for e in history] == ["run_submitted", "run_started", "step_scheduled"]

    scheduled = history[-1].data
    assert isinstance(scheduled, StepScheduled)
    key = scheduled.idempotency_key
    facts: list[EventData] = [
        StepStarted(step="a", attempt=1, agent="noop", runner="r", idempotency_key=key),
        StepSucceeded(step="a", attempt=1, agent="noop", output=None, idempotency_key=key),
    ]
    await store.append(run_id, [producer.envelope(run_id, data) for data in facts])
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
