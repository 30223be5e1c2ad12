"""Checkpoints: loading a run costs snapshot + tail, snapshot + tail equals a full replay, and
unusable snapshots are ignored; the checkpointer snapshots every N events, at DAG level
boundaries and at the end, and runs feed retention periodically.

Histories are made by :func:`simulate`: the real ``decide`` plays the scheduler and a scripted
runner starts each scheduled attempt and lets it succeed or fail as told.
"""

from __future__ import annotations

import gzip
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.definitions import DIAMOND
from support.processes import REPO
from support.redis_server import RedisServer, isolated

from eventstore import codec
from eventstore.events import (
    CheckpointTaken,
    Envelope,
    ErrorInfo,
    EventData,
    RunSubmitted,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.memory import MemoryStore
from eventstore.redis_store import RedisStore
from eventstore.store import EventStore, Snapshot, StoreConfig
from projections.run_state import STATE_VERSION, TERMINAL, RunState, evolve
from services.checkpointer import Checkpointer
from services.observability.prometheus import ProcessMetrics
from services.producer import Producer
from services.runs import RunLoader, snapshot_of, state_from_snapshot
from services.scheduler.decide import decide
from services.workflow.loader import execution_levels, load_definition, parse_definition
from services.workflow.model import WorkflowDef

pytestmark = pytest.mark.anyio

START_MS = 1_700_000_000_000
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
LONG_LOOP = """
name: long-loop
steps:
  - id: first
    agent: echo
    with: {value: 1}
  - id: spin
    agent: echo
    depends_on: [first]
    with: {value: "${{ iteration }}"}
    loop: {until: "output >= 1000000", max_iterations: 100000}
"""

#: What a simulated agent without a ``value`` input returns (fields the examples refer to).
OUTPUT = {"n": 3, "slept": 0.1, "status": 200, "items": [1, 2]}


def runner_facts(scheduled: StepScheduled, success: bool) -> list[EventData]:
    """What a runner records for a scheduled attempt: started, then succeeded or failed."""
    started = StepStarted(
        step=scheduled.step,
        attempt=scheduled.attempt,
        agent=scheduled.agent,
        item=scheduled.item,
        iteration=scheduled.iteration,
        fallback_index=scheduled.fallback_index,
        idempotency_key=scheduled.idempotency_key,
    )
    if success:
        output = scheduled.inputs.get("value", {"attempt": scheduled.attempt, **OUTPUT})
        return [
            started,
            StepSucceeded(
                step=scheduled.step,
                attempt=scheduled.attempt,
                agent=scheduled.agent,
                output=output,
                item=scheduled.item,
                iteration=scheduled.iteration,
                fallback_index=scheduled.fallback_index,
                idempotency_key=scheduled.idempotency_key,
            ),
        ]
    return [
        started,
        StepFailed(
            step=scheduled.step,
            attempt=scheduled.attempt,
            agent=scheduled.agent,
            error=ErrorInfo(type="Boom", message="planned"),
            item=scheduled.item,
            iteration=scheduled.iteration,
            fallback_index=scheduled.fallback_index,
            idempotency_key=scheduled.idempotency_key,
        ),
    ]


def simulate(
    definition: WorkflowDef, run_id: str, succeeds: Iterator[bool], max_events: int
) -> list[Envelope]:
    """A run's history: ``decide`` for the scheduler, a runner whose attempts succeed or fail
    as ``succeeds`` says; stops when the run ends or after about ``max_events`` events."""
    events: list[Envelope] = []
    state: RunState | None = None
    now = START_MS

    def add(data: EventData, producer: str) -> RunState:
        nonlocal state
        seq = len(events) + 1
        event = Envelope(
            event_id=f"{run_id}-{seq}", run_id=run_id, ts=now, producer=producer, data=data, seq=seq
        )
        events.append(event)
        state = evolve(state, event)
        return state

    current = add(
        RunSubmitted(
            workflow=definition.name,
            digest=definition.digest,
            definition=definition.body,
            definition_format=definition.format,
        ),
        "cli:sim",
    )
    while len(events) < max_events and current.status not in TERMINAL:
        decision = decide(definition, current, now)
        for data in decision.events:
            current = add(data, "scheduler:sim")
        for data in decision.events:
            if isinstance(data, StepScheduled):
                for fact in runner_facts(data, next(succeeds)):
                    current = add(fact, "runner:sim")
        if decision.events:
            now += 1
        elif decision.wake_at_ms is not None:
            now = max(now + 1, decision.wake_at_ms)
        else:
            break
    return events


def fresh(events: list[Envelope]) -> list[Envelope]:
    """The events as a producer hands them to the store (seq not yet assigned)."""
    return [msgspec.structs.replace(e, seq=0) for e in events]


def replay(events: list[Envelope]) -> RunState | None:
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def always() -> Iterator[bool]:
    """Every attempt succeeds."""
    return iter(lambda: True, False)


async def consume(store: EventStore, checkpointer: Checkpointer) -> None:
    """Hand the checkpointer every feed entry (its own ``checkpoint_taken`` too), in batches
    as its service loop does, until nothing is left."""
    subscription = await store.subscribe("checkpointer", checkpointer.consumer)
    try:
        while deliveries := await subscription.fetch(checkpointer.batch, block_ms=0):
            await checkpointer.handle(deliveries)
            await subscription.ack(deliveries)
    finally:
        await subscription.close()


async def append_all(store: EventStore, run_id: str, events: list[Envelope]) -> None:
    batch = fresh(events)
    for start in range(0, len(batch), 1000):
        await store.append(run_id, batch[start : start + 1000])


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, isolated(StoreConfig(partitions=4)))
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


@pytest.mark.redis
async def test_loading_a_10000_event_run_after_a_checkpoint_reads_only_the_tail(
    redis_store: RedisStore,
) -> None:
    definition = parse_definition(LONG_LOOP)
    history = simulate(definition, "run-long", always(), 10_050)
    await append_all(redis_store, "run-long", history[:10_000])

    full = RunLoader(redis_store)
    state = await full.load("run-long")
    assert full.events_read == 10_000
    assert state == replay(history[:10_000])

    checkpointer = Checkpointer(
        redis_store, Producer("checkpointer"), consumer="c1", every=1000, retention_interval_s=None
    )
    await consume(redis_store, checkpointer)
    snap = await redis_store.get_snapshot("run-long")
    assert snap is not None
    # The last batch handed over ends at seq 10,000 or just after (a checkpoint_taken of an
    # earlier batch was appended behind the history).
    assert 10_000 <= snap.seq < 10_020
    recorded = [e async for e in redis_store.read_run("run-long", after_seq=10_000)]
    assert recorded
    assert all(isinstance(e.data, CheckpointTaken) for e in recorded)
    assert isinstance(recorded[-1].data, CheckpointTaken)
    assert recorded[-1].data.covered_seq == snap.seq

    await redis_store.append("run-long", fresh(history[10_000:]))
    head = await redis_store.head("run-long")
    assert head is not None
    loader = RunLoader(redis_store)
    loaded = await loader.load("run-long")
    assert loader.events_read == head.seq - snap.seq
    assert loader.events_read < 100
    everything = [e async for e in redis_store.read_run("run-long")]
    assert loaded == replay(everything)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    example=st.sampled_from(EXAMPLES),
    seed=st.integers(0, 2**32 - 1),
    success_rate=st.floats(0.3, 1.0),
    cut=st.floats(0.0, 1.0),
)
async def test_snapshot_plus_tail_equals_full_replay(
    example: Path, seed: int, success_rate: float, cut: float
) -> None:
    rng = random.Random(seed)
    succeeds = iter(lambda: rng.random() < success_rate, None)
    history = simulate(load_definition(example), "run-h", succeeds, 400)
    store = MemoryStore(StoreConfig(partitions=2))
    try:
        await append_all(store, "run-h", history)
        point = int(cut * len(history))
        snapped = replay(history[:point])
        if snapped is not None:
            await store.put_snapshot(snapshot_of(snapped))
        loader = RunLoader(store)
        assert await loader.load("run-h") == replay(history)
        assert loader.events_read == len(history) - point
    finally:
        await store.close()


@pytest.mark.parametrize(
    "snapshot",
    [
        Snapshot(run_id="run-s", seq=5, version=STATE_VERSION - 1, state=b"from an older state"),
        Snapshot(run_id="run-s", seq=5, version=STATE_VERSION, state=b"\xc1 not a state"),
    ],
    ids=["older-version", "garbage"],
)
async def test_unusable_snapshot_is_ignored_and_the_run_rebuilt(snapshot: Snapshot) -> None:
    history = simulate(
        load_definition(REPO / "examples" / "pipeline.yaml"),
        "run-s",
        always(),
        200,
    )
    store = MemoryStore(StoreConfig(partitions=2))
    try:
        await append_all(store, "run-s", history)
        await store.put_snapshot(snapshot)
        loader = RunLoader(store)
        assert await loader.load("run-s") == replay(history)
        assert loader.events_read == len(history)
    finally:
        await store.close()


async def checkpoints_taken(
    checkpointer: Checkpointer, store: MemoryStore, history: list[Envelope]
) -> list[int]:
    """Feed ``history`` to ``checkpointer`` event by event; the seqs it snapshotted at."""
    subscription = await store.subscribe("checkpointer", "c1")
    taken: list[int] = []
    for event in fresh(history):
        await store.append(event.run_id, [event])
        deliveries = await subscription.fetch(100, block_ms=0)
        before = checkpointer.snapshots
        await checkpointer.handle([d for d in deliveries if d.envelope.type != "checkpoint_taken"])
        await subscription.ack(deliveries)
        if checkpointer.snapshots > before:
            snap = await store.get_snapshot(event.run_id)
            assert snap is not None
            taken.append(snap.seq)
    return taken


async def test_short_levels_are_not_snapshotted_below_the_minimum_gap() -> None:
    definition = parse_definition(DIAMOND)
    history = simulate(definition, "run-q", always(), 500)
    store = MemoryStore(StoreConfig(partitions=2))
    checkpointer = Checkpointer(
        store, Producer("checkpointer"), consumer="c1", every=1_000_000, level_min_events=1_000
    )
    try:
        taken = await checkpoints_taken(checkpointer, store, history)
        stored = [e async for e in store.read_run("run-q")]
        assert len(taken) == 1
        assert stored[taken[0] - 1].type == "run_completed"
    finally:
        await store.close()


async def test_checkpointer_snapshots_at_level_boundaries_every_n_and_at_the_end() -> None:
    definition = parse_definition(DIAMOND)
    history = simulate(definition, "run-p", always(), 500)
    store = MemoryStore(StoreConfig(partitions=2))
    checkpointer = Checkpointer(
        store, Producer("checkpointer"), consumer="c1", every=1_000_000, level_min_events=1
    )
    try:
        taken = await checkpoints_taken(checkpointer, store, history)
        stored = [e async for e in store.read_run("run-p")]
        final = replay(stored)
        assert final is not None
        assert final.status == "completed"
        levels = execution_levels(definition)
        assert [len(level) for level in levels] == [1, 3, 1]
        # One snapshot per completed level, then one at the end of the run.
        assert len(taken) == len(levels) + 1
        for seq, level in zip(taken, levels, strict=False):
            last = stored[seq - 1]
            assert isinstance(last.data, StepSucceeded)
            assert last.data.step in level
            at = replay(stored[:seq])
            assert at is not None
            assert all(at.steps[step].status == "succeeded" for step in level)
        assert stored[taken[-1] - 1].type == "run_completed"
    finally:
        await store.close()


async def appended_diamond(store: EventStore, run_id: str) -> list[Envelope]:
    """A finished run of the diamond workflow (three levels), appended to ``store``."""
    history = simulate(parse_definition(DIAMOND), run_id, always(), 500)
    await append_all(store, run_id, history)
    return history


def service_checkpointer(store: EventStore, interval_s: float) -> Checkpointer:
    """A checkpointer as its service loop runs it, without retention."""
    return Checkpointer(
        store,
        Producer("checkpointer"),
        consumer="c1",
        retention_interval_s=None,
        interval_s=interval_s,
    )


async def checkpointer_pending(store: EventStore) -> int:
    """Entries delivered to the checkpointer group and not acknowledged."""
    return sum(i.pending for i in await store.group_info() if i.group == "checkpointer")


@pytest.mark.redis
@pytest.mark.parametrize("interval_s", [0, 10])
async def test_due_snapshots_are_written_every_interval_covering_every_level_since(
    redis_store: RedisStore, interval_s: float
) -> None:
    history = await appended_diamond(redis_store, "run-i")
    checkpointer = service_checkpointer(redis_store, interval_s)
    async with anyio.create_task_group() as tg:
        await tg.start(checkpointer.run)
        with anyio.fail_after(30):
            await checkpointer.wait_handled(len(history))
        snap = await redis_store.get_snapshot("run-i")
        if interval_s:
            # Every level has completed, but the interval has not passed: nothing is written
            # yet, and the entries that made the snapshot due are not acknowledged.
            assert snap is None
            assert await checkpointer_pending(redis_store) == len(history)
        else:
            assert snap is not None
            # Its checkpoint comes back through the feed once the run has ended and been
            # forgotten: nothing is loaded to fold it in.
            with anyio.fail_after(30):
                await checkpointer.wait_handled(len(history) + 1)
            assert checkpointer.loader.events_read == 0
        checkpointer.stop()
    # One snapshot of the run's final state covers all its levels; stopping wrote it and
    # acknowledged everything.
    snap = await redis_store.get_snapshot("run-i")
    assert snap is not None
    assert snap.seq == len(history)
    assert state_from_snapshot(snap) == replay(history)
    recorded = [e async for e in redis_store.read_run("run-i", after_seq=len(history))]
    assert [e.data for e in recorded] == [
        CheckpointTaken(covered_seq=len(history), snapshot_key="snap:run-i")
    ]
    assert await checkpointer_pending(redis_store) == 0


@pytest.mark.redis
async def test_entries_held_by_a_checkpointer_that_died_are_snapshotted_by_its_successor(
    redis_store: RedisStore,
) -> None:
    history = await appended_diamond(redis_store, "run-d")
    dying = service_checkpointer(redis_store, 10)
    async with anyio.create_task_group() as tg:
        await tg.start(dying.run)
        with anyio.fail_after(30):
            await dying.wait_handled(len(history))
        tg.cancel_scope.cancel()  # dies holding every entry, nothing written
    assert await redis_store.get_snapshot("run-d") is None
    successor = service_checkpointer(redis_store, 0)
    async with anyio.create_task_group() as tg:
        await tg.start(successor.run)
        with anyio.fail_after(30):
            await successor.wait_handled(len(history))
        successor.stop()
    snap = await redis_store.get_snapshot("run-d")
    assert snap is not None
    assert snap.seq == len(history)
    assert state_from_snapshot(snap) == replay(history)


def archived_events(folder: Path) -> list[Envelope]:
    """Every event in the gzipped JSON-lines archive files of ``folder``."""
    return [
        codec.from_json_line(line)
        for path in sorted(folder.glob("*.jsonl.gz"))
        for line in gzip.decompress(path.read_bytes()).splitlines()
    ]


async def test_checkpointer_runs_retention_periodically_and_counts_trims(tmp_path: Path) -> None:
    now = [START_MS]
    store = MemoryStore(StoreConfig(partitions=2, retention_ms=1000), clock_ms=lambda: now[0])
    registry = CollectorRegistry()
    checkpointer = Checkpointer(
        store,
        Producer("checkpointer"),
        consumer="c1",
        retention_interval_s=0.01,
        archive_dir=tmp_path,
        metrics=ProcessMetrics(registry),
        clock_ms=lambda: now[0],
    )
    history = simulate(
        load_definition(REPO / "examples" / "sequential.yaml"), "run-r", always(), 100
    )
    try:
        await append_all(store, "run-r", history)
        await consume(store, checkpointer)
        report = await checkpointer.retention()
        assert sum(report.trim.trimmed.values()) == 0
        now[0] += 10_000
        async with anyio.create_task_group() as tg:
            await tg.start(checkpointer.run)
            with anyio.fail_after(10):
                await checkpointer.wait_retention_passes(2)
            checkpointer.stop()
        trimmed = registry.get_sample_value("flowlog_feed_trimmed_entries_total")
        assert trimmed == len(history) + checkpointer.snapshots
        archived = archived_events(tmp_path)
        assert sorted(e.seq for e in archived) == list(range(1, int(trimmed) + 1))
    finally:
        await store.close()
