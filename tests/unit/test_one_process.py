"""The four services in one process, as ``flowlog up`` runs them, on the in-memory store."""

from __future__ import annotations

import pytest

from eventstore.memory import MemoryStore
from projections.run_state import replay
from services import commands
from services.app import running
from services.bench.e2e_bench import chain_definition
from services.checkpointer import Checkpointer
from services.producer import Producer
from services.runs import state_from_snapshot
from services.scheduler.service import SchedulerService
from services.settings import CheckpointSettings, Settings

pytestmark = pytest.mark.anyio


async def test_the_scheduler_and_checkpointer_fold_each_event_once_between_them() -> None:
    settings = Settings(http_port=0, redis_url=None, checkpoint=CheckpointSettings(interval_s=0))
    store = MemoryStore()
    async with running(store, settings) as services:
        (scheduler,) = [s for s in services if isinstance(s, SchedulerService)]
        (checkpointer,) = [s for s in services if isinstance(s, Checkpointer)]
        run_id = (await commands.submit(store, Producer("test"), chain_definition())).run_id
        final = await commands.wait(store, run_id, timeout_s=30)
        await checkpointer.wait_handled(final.seq)
    events = [event async for event in store.read_run(run_id)]
    assert final.status == "completed"
    loaders = {id(service.loader): service.loader for service in (scheduler, checkpointer)}
    assert 0 < sum(loader.events_folded for loader in loaders.values()) <= len(events)
    # Snapshots are still of whole states: the last one is the replayed state at its seq.
    snapshot = await store.get_snapshot(run_id)
    assert snapshot is not None
    state = state_from_snapshot(snapshot)
    assert state is not None
    assert state.status == "completed"
    assert state == replay(events[: snapshot.seq])
    await store.close()
