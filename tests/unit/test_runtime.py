"""The entry point's garbage-collector tuning and the values kept out of the collector's reach."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from eventstore.events import RunStarted, RunSubmitted, StepScheduled
from eventstore.memory import MemoryStore
from projections.run_state import replay
from services.producer import Producer
from services.runtime import YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    _, middle, old = gc.get_threshold()
    start_up: list[int] = []
    tune_gc()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)
    assert gc.get_freeze_count() > 0
    assert not any(obj is start_up for obj in gc.get_objects())


@pytest.mark.anyio
async def test_the_log_and_run_states_are_out_of_the_cycle_collectors_reach() -> None:
    """Stored events, their store records and folded states are never scanned by a
    collection, however long the log grows (their types are ``gc=False``)."""
    store = MemoryStore()
    run_id = "r-gc"
    events = [
        Producer("test").envelope(run_id, data)
        for data in (
            RunSubmitted(workflow="w", digest="d", definition="{}", inputs={"items": [1, 2]}),
            RunStarted(plan={"a": ()}),
            StepScheduled(step="a", attempt=1, agent="echo", inputs={"value": [1]}),
        )
    ]
    await store.append(run_id, events)
    stored = [event async for event in store.read_run(run_id)]
    state = replay(stored)
    assert state is not None
    tracked = [gc.is_tracked(event) or gc.is_tracked(event.data) for event in stored]
    assert tracked == [False, False, False]
    assert not gc.is_tracked(state)
    assert not any(gc.is_tracked(step) for step in state.steps.values())
    assert not any(gc.is_tracked(unit) for step in state.steps.values() for unit in step.units)
    subscription = await store.subscribe("g", "c")
    deliveries = await subscription.fetch(10, 0)
    assert len(deliveries) == 3
    assert not any(gc.is_tracked(delivery) for delivery in deliveries)
    store_objects = {type(obj).__name__ for obj in gc.get_objects()}
    assert not store_objects & {"_Entry", "_Dedup", "_Pending", "Envelope", "RunState"}
    await store.close()
