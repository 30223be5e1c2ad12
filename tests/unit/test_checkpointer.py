"""The checkpointer's snapshots are the replayed state, and a run's checkpoint never goes back."""

from __future__ import annotations

import msgspec
import pytest
from support.definitions import DIAMOND

from eventstore.events import (
    Envelope,
    RunSubmitted,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.memory import MemoryStore
from eventstore.store import StoreConfig
from projections.run_state import replay
from services.checkpointer import Checkpointer
from services.producer import Producer
from services.replay import verify_run_state
from services.runs import RunLoader, state_from_snapshot
from services.scheduler.service import SchedulerService
from services.workflow.loader import parse_definition
from services.workflow.model import WorkflowDef

pytestmark = pytest.mark.anyio

RUN = "run-x"


async def history(store: MemoryStore) -> list[Envelope]:
    return [e async for e in store.read_run(RUN)]


async def submit(store: MemoryStore, definition: WorkflowDef) -> None:
    """``run_submitted`` of RUN, as ``flowlog submit`` appends it."""
    submitted = RunSubmitted(
        workflow=definition.name,
        digest=definition.digest,
        definition=definition.body,
        definition_format=definition.format,
    )
    await store.append(RUN, [Producer("cli").envelope(RUN, submitted)])


async def run_facts(store: MemoryStore, runner: Producer, after_seq: int) -> None:
    """What a runner records for every step scheduled after ``after_seq``: started, succeeded."""
    for event in [e async for e in store.read_run(RUN, after_seq=after_seq)]:
        if isinstance(event.data, StepScheduled):
            s = event.data
            await store.append(
                RUN,
                [
                    runner.envelope(
                        RUN, StepStarted(step=s.step, attempt=s.attempt, agent=s.agent)
                    ),
                    runner.envelope(
                        RUN,
                        StepSucceeded(
                            step=s.step, attempt=s.attempt, agent=s.agent, output=s.inputs
                        ),
                    ),
                ],
            )


async def test_shared_loader_snapshot_of_a_state_with_a_hole_is_not_the_replayed_state() -> None:
    """``flowlog up``: scheduler and checkpointer share one RunLoader. The scheduler's
    decision lands after a checkpoint_taken it had not seen (a hole); the checkpointer then
    snapshots that state, which lacks the checkpoint_taken, so the snapshot differs from the
    replay at its seq and ``replay --verify`` reports a difference on an intact log."""
    store = MemoryStore(StoreConfig(partitions=1))
    definition = parse_definition(DIAMOND)
    loader = RunLoader(store)
    scheduler = SchedulerService(store, Producer("scheduler"), consumer="s1", loader=loader)
    checkpointer = Checkpointer(
        store,
        Producer("checkpointer"),
        consumer="c1",
        every=1_000_000,
        retention_interval_s=None,
        interval_s=0,
        loader=loader,
    )
    runner = Producer("runner")
    try:
        s_sub = await store.subscribe("scheduler", "s1")
        c_sub = await store.subscribe("checkpointer", "c1")
        await submit(store, definition)
        # run_started (2), start scheduled (3)
        await scheduler.handle(await s_sub.fetch(100, block_ms=0))
        await run_facts(store, runner, 1)  # 4, 5: start succeeded (level 0 done)
        await scheduler.handle(await s_sub.fetch(100, block_ms=0))  # schedules a, b, c (6-8)
        await run_facts(store, runner, 5)  # 9..14: a, b, c succeeded (level 1 done)
        assert len(await history(store)) == 14

        # The checkpointer's feed lags: it gets 1..5 (level 0 settled) and snapshots the
        # shared loader's state (seq 8): checkpoint_taken lands at seq 15.
        await checkpointer.handle(await c_sub.fetch(5, block_ms=0))
        assert (await history(store))[14].type == "checkpoint_taken"

        # The scheduler's batch ends at seq 14: it decides on 14, its decision lands at 16,
        # past the checkpoint at 15 (a hole in the shared loader's state).
        await scheduler.handle(await s_sub.fetch(9, block_ms=0))
        assert (await history(store))[15].type == "step_scheduled"

        # The checkpointer's next batch (6..14) settles level 1: it snapshots.
        await checkpointer.handle(await c_sub.fetch(9, block_ms=0))

        events = await history(store)
        snap = await store.get_snapshot(RUN)
        assert snap is not None
        snapped = state_from_snapshot(snap)
        assert snapped is not None
        expected = replay(events[: snap.seq])
        assert expected is not None
        assert snapped.checkpoint_seq == expected.checkpoint_seq, (
            f"snapshot at seq {snap.seq}: checkpoint_seq {snapped.checkpoint_seq},"
            f" replay: {expected.checkpoint_seq}"
        )
        assert msgspec.to_builtins(snapped) == msgspec.to_builtins(expected)
        _, differences = await verify_run_state(store, RUN, events)
        assert differences == []
    finally:
        await store.close()


async def diamond_run(store: MemoryStore) -> list[Envelope]:
    """A finished diamond run, decided by the real scheduler, appended to ``store``."""
    definition = parse_definition(DIAMOND)
    scheduler = SchedulerService(store, Producer("scheduler"), consumer="s1")
    runner = Producer("runner")
    sub = await store.subscribe("scheduler", "s1")
    await submit(store, definition)
    done = 0
    while True:
        deliveries = await sub.fetch(100, block_ms=0)
        if not deliveries:
            break
        await scheduler.handle(deliveries)
        await sub.ack(deliveries)
        before = len(await history(store))
        await run_facts(store, runner, done)
        done = before
    await sub.close()
    events = await history(store)
    assert events[-1].type == "run_completed"
    return events


async def test_a_replica_claiming_a_dead_replicas_entries_overwrites_a_newer_snapshot() -> None:
    """Two checkpointer replicas in the group. Replica A takes the run's first entries and
    dies holding them (a due snapshot not yet written). Replica B handles the rest and
    snapshots the finished run. After claim_idle B claims A's entries, folds them from seq 1
    (the run was forgotten when it ended) and writes a snapshot of seq 5 over the one of the
    final seq: the store keeps an older snapshot than it had, and a checkpoint_taken is
    appended to the completed run."""
    now = [1_700_000_000_000]
    store = MemoryStore(
        StoreConfig(partitions=1, claim_idle_ms=1000, claim_scan_ms=0), clock_ms=lambda: now[0]
    )
    try:
        events = await diamond_run(store)
        final = len(events)
        sub_a = await store.subscribe("checkpointer", "a")
        sub_b = await store.subscribe("checkpointer", "b")
        held = await sub_a.fetch(5, block_ms=0)  # 1..5: level 0 settled; A dies here
        assert [d.envelope.seq for d in held] == [1, 2, 3, 4, 5]
        b = Checkpointer(
            store, Producer("checkpointer", "b"), consumer="b", retention_interval_s=None,
            interval_s=0,
        )  # fmt: skip
        rest = await sub_b.fetch(100, block_ms=0)
        await b.handle(rest)
        await sub_b.ack(rest)
        snap = await store.get_snapshot(RUN)
        assert snap is not None
        assert snap.seq == final
        # B goes on reading: its own checkpoint_taken comes back (the run was forgotten).
        own = await sub_b.fetch(100, block_ms=0)
        assert [d.envelope.type for d in own] == ["checkpoint_taken"]
        await b.handle(own)
        await sub_b.ack(own)

        now[0] += 5_000  # A's entries are idle past claim_idle: B claims them
        claimed = await sub_b.fetch(100, block_ms=0)
        assert [d.envelope.seq for d in claimed] == [1, 2, 3, 4, 5]
        await b.handle(claimed)
        await sub_b.ack(claimed)

        snap = await store.get_snapshot(RUN)
        assert snap is not None
        assert snap.seq >= final, f"snapshot went back from seq {final} to seq {snap.seq}"
    finally:
        await store.close()
