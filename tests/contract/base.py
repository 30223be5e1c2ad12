"""The contract every EventStore backend passes.

Subclass :class:`StoreContract` as ``Test<Backend>`` and implement its hooks; the tests are
methods of this class, so every backend runs all of them. Each test opens its stores with
:meth:`StoreContract.open_store`; they are closed after the test.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import anyio
import msgspec
import pytest

from eventstore import codec
from eventstore.audit import chain_mac, content_digest, verify_run
from eventstore.errors import EventNotEncodable, EventTooLarge, InvalidAppend, StoreClosed
from eventstore.events import (
    CheckpointTaken,
    Envelope,
    ErrorInfo,
    EventData,
    RunCompleted,
    RunFailed,
    RunRetryRequested,
    RunStarted,
    RunSubmitted,
    StepScheduled,
    StepSucceeded,
)
from eventstore.keys import Keys
from eventstore.store import (
    REASON_MAX_DELIVERIES,
    REASON_UNDECODABLE,
    AppendRequest,
    AppendResult,
    Delivery,
    EventStore,
    Outcome,
    Snapshot,
    StoreConfig,
    Subscription,
    Timer,
)

BASE_TS = 1_700_000_000_000
FAR_FUTURE_MS = 2**53
GARBAGE = b"\xc1 this is not msgpack"


def envelope(run_id: str, event_id: str, data: EventData, *, ts: int = BASE_TS) -> Envelope:
    """An event of ``run_id`` not yet appended."""
    return Envelope(event_id=event_id, run_id=run_id, ts=ts, producer="contract", data=data)


def step_done(run_id: str, n: int, *, output: Any = None, event_id: str = "") -> Envelope:
    """A ``step_succeeded`` event numbered ``n`` (event id ``<run_id>-<n>`` unless given)."""
    data = StepSucceeded(step=f"step-{n}", attempt=1, agent="echo", output=output or n)
    return envelope(run_id, event_id or f"{run_id}-{n}", data, ts=BASE_TS + n)


def scheduled(run_id: str, step: str, queue: str) -> Envelope:
    """A ``step_scheduled`` event of ``step`` on ``queue``."""
    data = StepScheduled(step=step, attempt=1, agent="echo", queue=queue)
    return envelope(run_id, f"{run_id}-scheduled-{step}", data)


def checkpoint(run_id: str, covered_seq: int) -> Envelope:
    """A passive ``checkpoint_taken`` event covering ``covered_seq``."""
    data = CheckpointTaken(covered_seq=covered_seq, snapshot_key=f"snap:{run_id}")
    return envelope(run_id, f"{run_id}-checkpoint-{covered_seq}", data)


def submitted(run_id: str) -> Envelope:
    data = RunSubmitted(workflow="wf", digest="d", definition="steps: []")
    return envelope(run_id, f"{run_id}-submitted", data)


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, n = entry_id.split("-")
    return int(ms), int(n)


def outcomes(results: Sequence[AppendResult]) -> list[tuple[Outcome, int]]:
    return [(result.outcome, result.seq) for result in results]


async def history(store: EventStore, run_id: str, after_seq: int = 0) -> list[Envelope]:
    return [event async for event in store.read_run(run_id, after_seq)]


async def drain(subscription: Subscription, max_count: int = 100) -> list[Delivery]:
    """Fetch without blocking until a fetch hands out nothing."""
    deliveries: list[Delivery] = []
    while batch := await subscription.fetch(max_count=max_count, block_ms=0):
        deliveries.extend(batch)
    return deliveries


def partition_of(store: EventStore, run_id: str) -> int:
    return Keys(store.config.prefix, store.config.partitions).partition(run_id)


def stored(event: Envelope, seq: int) -> Envelope:
    """``event`` as the store gives it back at ``seq``."""
    return msgspec.structs.replace(event, seq=seq)


class StoreContract(abc.ABC):
    """Behaviour shared by every backend (see :mod:`eventstore.store`)."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]
    base_config: ClassVar[StoreConfig] = StoreConfig(partitions=4)
    _stores: list[EventStore]

    # --- backend hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    async def make_store(self, config: StoreConfig) -> EventStore:
        """A fresh, empty store with ``config``."""

    @abc.abstractmethod
    async def expire_dedup(self, store: EventStore, run_id: str, event_id: str) -> None:
        """Make the dedup window of ``event_id`` pass."""

    @abc.abstractmethod
    async def age_pending(self, store: EventStore, ms: int) -> None:
        """Make every pending entry idle for at least ``ms``."""

    @abc.abstractmethod
    async def inject_raw(self, store: EventStore, partition: int, raw: bytes) -> str:
        """Add ``raw`` bytes to a partition feed as an entry; return its entry id."""

    @abc.abstractmethod
    async def expire_retention(self, store: EventStore, run_id: str) -> None:
        """Make the retention period of the finished run ``run_id`` pass."""

    # --- plumbing -----------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    async def _close_stores(self) -> AsyncIterator[None]:
        self._stores = []
        yield
        with anyio.CancelScope(shield=True):
            for store in self._stores:
                await store.close()

    async def open_store(self, **changes: Any) -> EventStore:
        """A store with :attr:`base_config` plus ``changes``, closed after the test."""
        store = await self.make_store(msgspec.structs.replace(self.base_config, **changes))
        self._stores.append(store)
        return store

    # --- append and read ----------------------------------------------------------------------

    async def test_seq_is_contiguous_from_one(self) -> None:
        store = await self.open_store()
        events = [step_done("run-a", n) for n in range(1, 6)]
        first = await store.append("run-a", events[:3])
        second = await store.append("run-a", events[3:])
        assert outcomes(first + second) == [(Outcome.APPENDED, n) for n in range(1, 6)]
        keys = [entry_key(result.entry_id) for result in first + second]
        assert keys == sorted(set(keys))
        assert await history(store, "run-a") == [stored(e, n) for n, e in enumerate(events, 1)]

    async def test_a_large_batch_is_deduplicated_as_a_whole(self) -> None:
        store = await self.open_store()
        events = [step_done("run-a", n) for n in range(1, 1201)]
        first = await store.append("run-a", events[:700])
        assert outcomes(first) == [(Outcome.APPENDED, n) for n in range(1, 701)]
        again = await store.append("run-a", [*events, events[-1]])
        assert outcomes(again) == [
            *[(Outcome.DUPLICATE, n) for n in range(1, 701)],
            *[(Outcome.APPENDED, n) for n in range(701, 1201)],
            (Outcome.DUPLICATE, 1200),
        ]
        assert [e.seq for e in await history(store, "run-a")] == list(range(1, 1201))

    async def test_read_run_after_seq(self) -> None:
        store = await self.open_store()
        events = [step_done("run-a", n) for n in range(1, 6)]
        await store.append("run-a", events)
        assert [e.seq for e in await history(store, "run-a", after_seq=3)] == [4, 5]
        assert await history(store, "run-a", after_seq=5) == []
        assert await history(store, "run-unknown") == []

    async def test_head_tracks_seq_entry_status_and_chain_hash(self) -> None:
        store = await self.open_store()
        assert await store.head("run-a") is None
        [result] = await store.append("run-a", [submitted("run-a")])
        head = await store.head("run-a")
        assert head is not None
        assert (head.seq, head.entry_id, head.status) == (1, result.entry_id, "submitted")
        started = envelope("run-a", "run-a-started", RunStarted())
        results = await store.append("run-a", [started, step_done("run-a", 1)])
        head = await store.head("run-a")
        assert head is not None
        assert (head.seq, head.entry_id, head.status) == (3, results[-1].entry_id, "running")
        chain = ""
        for event in await history(store, "run-a"):
            chain = codec.chain_hash(chain, event.seq, codec.encode(stored(event, 0)))
        assert head.hash == chain

    async def test_stored_events_are_isolated_from_the_caller(self) -> None:
        store = await self.open_store()
        inputs: dict[str, Any] = {"items": [1]}
        data = StepScheduled(step="s", attempt=1, agent="echo", inputs=inputs)
        await store.append("run-a", [envelope("run-a", "e1", data)])
        inputs["items"].append(2)
        [event] = await history(store, "run-a")
        assert isinstance(event.data, StepScheduled)
        assert event.data.inputs == {"items": [1]}

    async def test_list_runs_in_order_of_first_append(self) -> None:
        store = await self.open_store()
        runs = [f"run-{n:02d}" for n in range(6)]
        for run_id in runs:
            await store.append(run_id, [step_done(run_id, 1)])
        await store.append(runs[0], [step_done(runs[0], 2)])
        assert await store.list_runs() == runs

    # --- dedup --------------------------------------------------------------------------------

    async def test_duplicate_within_ttl_reports_original_seq(self) -> None:
        store = await self.open_store()
        first = await store.append("run-a", [step_done("run-a", 1), step_done("run-a", 2)])
        retry = msgspec.structs.replace(
            step_done("run-a", 1), ts=BASE_TS + 999, producer="other", traceparent="00-ab-cd-01"
        )
        [result] = await store.append("run-a", [retry])
        assert (result.outcome, result.seq, result.entry_id) == (
            Outcome.DUPLICATE,
            1,
            first[0].entry_id,
        )
        assert [e.event_id for e in await history(store, "run-a")] == ["run-a-1", "run-a-2"]

    async def test_duplicate_after_dedup_window_is_appended_again(self) -> None:
        store = await self.open_store()
        event = step_done("run-a", 1)
        await store.append("run-a", [event])
        await self.expire_dedup(store, "run-a", event.event_id)
        assert outcomes(await store.append("run-a", [event])) == [(Outcome.APPENDED, 2)]

    async def test_payload_mismatch_is_reported_and_not_written(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", 1, output="original")])
        changed = step_done("run-a", 1, output="changed")
        assert outcomes(await store.append("run-a", [changed])) == [(Outcome.MISMATCH, 1)]
        [event] = await history(store, "run-a")
        assert isinstance(event.data, StepSucceeded)
        assert event.data.output == "original"

    async def test_event_id_repeated_in_one_batch(self) -> None:
        store = await self.open_store()
        a = step_done("run-a", 1)
        b = step_done("run-a", 2)
        b_changed = step_done("run-a", 2, output="changed")
        results = await store.append("run-a", [a, a, b, b_changed])
        assert outcomes(results) == [
            (Outcome.APPENDED, 1),
            (Outcome.DUPLICATE, 1),
            (Outcome.APPENDED, 2),
            (Outcome.MISMATCH, 2),
        ]
        assert [e.event_id for e in await history(store, "run-a")] == [a.event_id, b.event_id]

    # --- expected seq -------------------------------------------------------------------------

    async def test_expected_seq_conflict_writes_nothing(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", 1), step_done("run-a", 2)])
        batch = [step_done("run-a", 3), step_done("run-a", 4)]
        results = await store.append("run-a", batch, expected_seq=1)
        assert [(r.outcome, r.current_seq) for r in results] == [(Outcome.CONFLICT, 2)] * 2
        head = await store.head("run-a")
        assert head is not None
        assert head.seq == 2
        retried = await store.append("run-a", batch, expected_seq=2)
        assert outcomes(retried) == [(Outcome.APPENDED, 3), (Outcome.APPENDED, 4)]

    async def test_expected_seq_zero_means_a_new_run(self) -> None:
        store = await self.open_store()
        first = await store.append("run-a", [step_done("run-a", 1)], expected_seq=0)
        assert outcomes(first) == [(Outcome.APPENDED, 1)]
        [late] = await store.append("run-a", [step_done("run-a", 2)], expected_seq=0)
        assert (late.outcome, late.current_seq) == (Outcome.CONFLICT, 1)

    async def test_expected_seq_is_met_past_passive_events_only(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", 1), step_done("run-a", 2)])
        await store.append("run-a", [checkpoint("run-a", 2), checkpoint("run-a", 3)])
        decided = await store.append("run-a", [step_done("run-a", 3)], expected_seq=2)
        assert outcomes(decided) == [(Outcome.APPENDED, 5)]
        assert [e.seq for e in await history(store, "run-a")] == [1, 2, 3, 4, 5]
        # The decision is not passive: a decision made before it is stale now.
        for stale in (2, 3, 4):
            [late] = await store.append("run-a", [step_done("run-a", 6)], expected_seq=stale)
            assert (late.outcome, late.current_seq) == (Outcome.CONFLICT, 5)
        [ahead] = await store.append("run-a", [step_done("run-a", 6)], expected_seq=6)
        assert (ahead.outcome, ahead.current_seq) == (Outcome.CONFLICT, 5)
        [current] = await store.append("run-a", [step_done("run-a", 6)], expected_seq=5)
        assert outcomes([current]) == [(Outcome.APPENDED, 6)]

    async def test_passive_events_of_a_new_run_still_meet_expected_seq_zero(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [checkpoint("run-a", 0)])
        [decided] = await store.append("run-a", [step_done("run-a", 1)], expected_seq=0)
        assert outcomes([decided]) == [(Outcome.APPENDED, 2)]

    async def test_all_duplicate_batch_with_stale_expected_seq_is_duplicate(self) -> None:
        store = await self.open_store()
        batch = [step_done("run-a", 1), step_done("run-a", 2)]
        await store.append("run-a", batch, expected_seq=0)
        await store.append("run-a", [step_done("run-a", 3)])
        again = await store.append("run-a", batch, expected_seq=0)
        assert outcomes(again) == [(Outcome.DUPLICATE, 1), (Outcome.DUPLICATE, 2)]

    async def test_mixed_batch_with_stale_expected_seq(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", 1)])
        results = await store.append(
            "run-a", [step_done("run-a", 1), step_done("run-a", 2)], expected_seq=0
        )
        assert [(r.outcome, r.seq, r.current_seq) for r in results] == [
            (Outcome.DUPLICATE, 1, 0),
            (Outcome.CONFLICT, 0, 1),
        ]
        assert len(await history(store, "run-a")) == 1

    async def test_concurrent_decisions_each_seq_won_by_one_append(self) -> None:
        store = await self.open_store()
        appenders, per_appender = 20, 5
        won: list[int] = []
        conflicts = 0

        async def decide_and_append(appender: int) -> None:
            nonlocal conflicts
            for k in range(per_appender):
                event = step_done("run-race", k + 1, event_id=f"appender-{appender}-{k}")
                while True:
                    head = await store.head("run-race")
                    seq = head.seq if head is not None else 0
                    [result] = await store.append("run-race", [event], expected_seq=seq)
                    if result.outcome is Outcome.APPENDED:
                        assert result.seq == seq + 1
                        won.append(result.seq)
                        break
                    assert result.outcome is Outcome.CONFLICT
                    assert result.current_seq > seq
                    conflicts += 1

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for appender in range(appenders):
                    tg.start_soon(decide_and_append, appender)
        total = appenders * per_appender
        assert sorted(won) == list(range(1, total + 1))
        events = await history(store, "run-race")
        assert [e.seq for e in events] == list(range(1, total + 1))
        assert sorted(e.event_id for e in events) == sorted(
            f"appender-{a}-{k}" for a in range(appenders) for k in range(per_appender)
        )
        assert conflicts > 0

    # --- validation ---------------------------------------------------------------------------

    async def test_event_too_large_writes_nothing(self) -> None:
        store = await self.open_store(max_event_bytes=2048)
        small = step_done("run-a", 1)
        big = step_done("run-a", 2, output="x" * 4096)
        with pytest.raises(EventTooLarge) as raised:
            await store.append("run-a", [small, big])
        assert raised.value.event_id == big.event_id
        assert raised.value.limit == 2048
        assert await store.head("run-a") is None
        assert outcomes(await store.append("run-a", [small])) == [(Outcome.APPENDED, 1)]

    async def test_event_of_another_run_is_rejected(self) -> None:
        store = await self.open_store()
        with pytest.raises(InvalidAppend):
            await store.append("run-a", [step_done("run-a", 1), step_done("run-b", 1)])
        assert await store.head("run-a") is None

    @pytest.mark.parametrize(
        ("run_id", "expected_seq", "names"),
        [("", None, "needs a run id"), ("run-a", -1, "expected seq -1 is negative")],
    )
    async def test_no_run_id_or_a_negative_expected_seq_is_rejected(
        self, run_id: str, expected_seq: int | None, names: str
    ) -> None:
        store = await self.open_store()
        with pytest.raises(InvalidAppend, match=names):
            await store.append(run_id, [step_done(run_id, 1)], expected_seq=expected_seq)
        assert await store.list_runs() == []

    @pytest.mark.parametrize(
        ("data", "names"),
        [
            (StepSucceeded(step="s", attempt=1, agent="echo", output=2**64), "serialize ints"),
            # a producer's type error: msgspec does not check types when a Struct is built
            (StepSucceeded(step=7, attempt=1, agent="echo"), "does not read back"),  # type: ignore[arg-type]
        ],
    )
    async def test_an_event_that_cannot_be_stored_as_it_is_writes_nothing(
        self, data: EventData, names: str
    ) -> None:
        store = await self.open_store()
        good, bad = step_done("run-a", 1), envelope("run-a", "run-a-bad", data)
        with pytest.raises(EventNotEncodable, match=names) as raised:
            await store.append("run-a", [good, bad])
        assert raised.value.event_id == "run-a-bad"
        assert await store.head("run-a") is None
        subscription = await store.subscribe("g", "c")
        assert await subscription.fetch(block_ms=0) == []
        assert await store.dead_letters() == []

    async def test_append_many_is_append_per_request_in_order(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", 1)])
        results = await store.append_many(
            [
                AppendRequest(
                    run_id="run-a", events=[step_done("run-a", 1), step_done("run-a", 2)]
                ),
                AppendRequest(run_id="run-b", events=[step_done("run-b", 1)], expected_seq=0),
                AppendRequest(run_id="run-c", events=[step_done("run-c", 1)], expected_seq=3),
                AppendRequest(run_id="run-b", events=[step_done("run-b", 2)], expected_seq=1),
            ]
        )
        assert [outcomes(r) for r in results] == [
            [(Outcome.DUPLICATE, 1), (Outcome.APPENDED, 2)],
            [(Outcome.APPENDED, 1)],
            [(Outcome.CONFLICT, 0)],
            [(Outcome.APPENDED, 2)],
        ]
        assert [len(await history(store, run)) for run in ("run-a", "run-b", "run-c")] == [2, 2, 0]

    async def test_append_many_with_a_too_large_event_writes_nothing(self) -> None:
        store = await self.open_store(max_event_bytes=2048)
        with pytest.raises(EventTooLarge):
            await store.append_many(
                [
                    AppendRequest(run_id="run-a", events=[step_done("run-a", 1)]),
                    AppendRequest(
                        run_id="run-b", events=[step_done("run-b", 1, output="x" * 4096)]
                    ),
                ]
            )
        assert await store.list_runs() == []

    # --- subscriptions ------------------------------------------------------------------------

    async def test_group_hands_each_entry_to_exactly_one_consumer(self) -> None:
        store = await self.open_store()
        runs = [[step_done(f"run-{r}", n) for n in range(1, 5)] for r in range(5)]
        events = {event.event_id: event for run in runs for event in run}
        for event in events.values():
            await store.append(event.run_id, [event])
        first = await store.subscribe("workers", "c1")
        second = await store.subscribe("workers", "c2")
        handed: dict[str, list[Delivery]] = {"c1": [], "c2": []}
        while True:
            got_first = await first.fetch(max_count=3, block_ms=0)
            got_second = await second.fetch(max_count=3, block_ms=0)
            handed["c1"] += got_first
            handed["c2"] += got_second
            if not got_first and not got_second:
                break
        assert handed["c1"]
        assert handed["c2"]
        deliveries = handed["c1"] + handed["c2"]
        assert sorted(d.envelope.event_id for d in deliveries) == sorted(events)
        for delivery in deliveries:
            original = events[delivery.envelope.event_id]
            n = int(delivery.envelope.event_id.rsplit("-", 1)[1])
            assert delivery.envelope == stored(original, n)
            assert delivery.partition == partition_of(store, original.run_id)
            assert delivery.deliveries == 1
        info = [i for i in await store.group_info() if i.group == "workers"]
        assert sum(i.pending for i in info) == len(events)
        assert sum(i.lag for i in info) == 0
        await first.ack(handed["c1"])
        await second.ack(handed["c2"])
        assert sum(i.pending for i in await store.group_info()) == 0

    async def test_every_group_gets_every_entry(self) -> None:
        store = await self.open_store()
        events = [step_done(f"run-{r}", 1) for r in range(6)]
        for event in events:
            await store.append(event.run_id, [event])
        for group in ("projector", "scheduler"):
            subscription = await store.subscribe(group, "c1")
            got = await drain(subscription)
            assert sorted(d.envelope.event_id for d in got) == sorted(e.event_id for e in events)

    async def test_one_ack_covers_a_large_batch_across_partitions(self) -> None:
        store = await self.open_store()
        runs = [f"run-{i}" for i in range(6)]
        for run_id in runs:
            await store.append(run_id, [step_done(run_id, n) for n in range(1, 201)])
        consumer = await store.subscribe("workers", "c")
        taken: list[Delivery] = []
        while len(taken) < 1200:
            batch = await consumer.fetch(2000, block_ms=0)
            assert batch
            taken.extend(batch)
        assert len({d.partition for d in taken}) > 1
        await consumer.ack(taken)
        assert sum(i.pending for i in await store.group_info()) == 0
        assert await consumer.fetch(10, block_ms=0) == []

    async def test_a_reset_group_gets_only_what_is_appended_after(self) -> None:
        store = await self.open_store()
        await store.reset_group("fresh")  # a group made at the end of feeds that are empty
        runs = [f"run-{n}" for n in range(6)]
        for run_id in runs[:3]:
            await store.append(run_id, [step_done(run_id, 1)])
        old = await store.subscribe("projector", "p")
        pending = await old.fetch(2, block_ms=0)
        assert len(pending) == 2
        await old.close()
        await store.reset_group("projector")
        for run_id in runs[3:]:
            await store.append(run_id, [step_done(run_id, 1)])
        # the entries the old consumer held are dropped with the group, not handed out again
        again = await store.subscribe("projector", "p")
        delivered = await drain(again)
        assert sorted(d.envelope.run_id for d in delivered) == runs[3:]
        await again.ack(delivered)
        infos = [i for i in await store.group_info() if i.group == "projector"]
        assert infos
        assert all((i.pending, i.lag) == (0, 0) for i in infos)
        fresh = await store.subscribe("fresh", "f")
        assert sorted(d.envelope.run_id for d in await drain(fresh)) == runs

    async def test_lag_counts_entries_not_yet_delivered(self) -> None:
        store = await self.open_store()
        subscription = await store.subscribe("workers", "c1")
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 6)])
        partition = partition_of(store, "run-a")

        async def info() -> tuple[int, int]:
            [mine] = [
                i
                for i in await store.group_info()
                if i.group == "workers" and i.partition == partition
            ]
            return mine.pending, mine.lag

        assert await info() == (0, 5)
        got = await subscription.fetch(max_count=2, block_ms=0)
        assert await info() == (2, 3)
        await subscription.ack(got)
        assert await info() == (0, 3)

    async def test_restarted_consumer_gets_its_own_pending_first(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 6)])
        before = await store.subscribe("workers", "c1")
        first = await before.fetch(max_count=3, block_ms=0)
        assert [d.envelope.seq for d in first] == [1, 2, 3]
        await before.close()
        await store.append("run-a", [step_done("run-a", 6)])
        after = await store.subscribe("workers", "c1")
        again = await after.fetch(max_count=3, block_ms=0)
        assert [(d.entry_id, d.deliveries) for d in again] == [(d.entry_id, 2) for d in first]
        rest = await drain(after)
        assert [(d.envelope.seq, d.deliveries) for d in rest] == [(4, 1), (5, 1), (6, 1)]

    async def test_pending_of_a_dead_consumer_is_claimed_after_idle(self) -> None:
        store = await self.open_store(claim_scan_ms=0)
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        dead = await store.subscribe("workers", "dead")
        taken = await dead.fetch(block_ms=0)
        assert len(taken) == 3
        alive = await store.subscribe("workers", "alive")
        assert await alive.fetch(block_ms=0) == []
        await self.age_pending(store, store.config.claim_idle_ms)
        claimed = await alive.fetch(block_ms=0)
        assert sorted((d.entry_id, d.deliveries) for d in claimed) == sorted(
            (d.entry_id, 2) for d in taken
        )
        await alive.ack(claimed)
        assert sum(i.pending for i in await store.group_info()) == 0

    async def test_fetch_acknowledges_the_entries_it_is_given_first(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        consumer = await store.subscribe("workers", "c1")
        first = await consumer.fetch(max_count=2, block_ms=0)
        rest = await consumer.fetch(max_count=10, block_ms=0, ack=first)
        assert [d.envelope.seq for d in rest] == [3]
        assert sum(i.pending for i in await store.group_info()) == 1
        await store.append("run-a", [step_done("run-a", 4)])
        # Nothing else to hand out: the acknowledgement goes with the blocking read.
        latest = await consumer.fetch(max_count=10, block_ms=5_000, ack=rest)
        assert [d.envelope.seq for d in latest] == [4]
        assert sum(i.pending for i in await store.group_info()) == 1

    async def test_entries_acknowledged_by_a_fetch_are_not_claimed_by_it(self) -> None:
        store = await self.open_store(claim_scan_ms=0)
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        consumer = await store.subscribe("workers", "slow")
        taken = await consumer.fetch(block_ms=0)
        await self.age_pending(store, store.config.claim_idle_ms)
        assert await consumer.fetch(block_ms=0, ack=taken) == []
        assert sum(i.pending for i in await store.group_info()) == 0

    async def test_claims_are_looked_for_at_most_every_claim_scan_ms(self) -> None:
        store = await self.open_store(claim_scan_ms=3_600_000)
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        dead = await store.subscribe("workers", "dead")
        taken = await dead.fetch(block_ms=0)
        alive = await store.subscribe("workers", "alive")
        assert await alive.fetch(block_ms=0) == []
        await self.age_pending(store, store.config.claim_idle_ms)
        # alive looked at its first fetch, when nothing was idle; it looks again in an hour.
        assert await alive.fetch(block_ms=0) == []
        fresh = await store.subscribe("workers", "fresh")
        claimed = await fresh.fetch(block_ms=0)
        assert sorted((d.entry_id, d.deliveries) for d in claimed) == sorted(
            (d.entry_id, 2) for d in taken
        )

    async def test_touch_keeps_an_entry_from_being_claimed(self) -> None:
        store = await self.open_store(claim_scan_ms=0)
        await store.append("run-a", [step_done("run-a", 1), step_done("run-a", 2)])
        busy = await store.subscribe("workers", "busy")
        taken = await busy.fetch(block_ms=0)
        other = await store.subscribe("workers", "other")
        await self.age_pending(store, store.config.claim_idle_ms)
        await busy.touch(taken[:1])
        claimed = await other.fetch(block_ms=0)
        assert [d.entry_id for d in claimed] == [taken[1].entry_id]

    async def test_entry_never_acked_goes_to_dead_letters_after_max_deliveries(self) -> None:
        store = await self.open_store(max_deliveries=3, claim_scan_ms=0)
        event = step_done("run-a", 1)
        await store.append("run-a", [event])
        consumers = [await store.subscribe("workers", name) for name in ("c1", "c2")]
        counts: list[int] = []
        for turn in range(8):
            counts += [d.deliveries for d in await consumers[turn % 2].fetch(block_ms=0)]
            if await store.dead_letters():
                break
            await self.age_pending(store, store.config.claim_idle_ms)
        assert counts == [1, 2, 3]
        [letter] = await store.dead_letters(partition_of(store, "run-a"))
        assert letter.reason.startswith(REASON_MAX_DELIVERIES)
        assert (letter.group, letter.deliveries) == ("workers", 3)
        assert codec.decode(letter.raw).event_id == event.event_id
        assert sum(i.pending for i in await store.group_info()) == 0

    async def test_undecodable_entry_goes_to_dead_letters_and_consumer_carries_on(self) -> None:
        store = await self.open_store()
        partition = partition_of(store, "run-a")
        await store.append("run-a", [step_done("run-a", 1)])
        raw_id = await self.inject_raw(store, partition, GARBAGE)
        await store.append("run-a", [step_done("run-a", 2)])
        subscription = await store.subscribe("workers", "c1")
        got = await drain(subscription)
        assert [d.envelope.event_id for d in got] == ["run-a-1", "run-a-2"]
        [letter] = await store.dead_letters(partition)
        assert (letter.entry_id, letter.raw, letter.group) == (raw_id, GARBAGE, "workers")
        assert letter.reason.startswith(REASON_UNDECODABLE)
        assert letter.deliveries == 1
        assert await store.dead_letters() == [letter]
        await subscription.ack(got)
        assert sum(i.pending for i in await store.group_info()) == 0

    @staticmethod
    async def fetch_woken_by(
        subscription: Subscription, wake: Callable[[], Awaitable[Any]]
    ) -> list[Delivery]:
        """What a fetch blocked for up to a minute returns once ``wake()`` has run (it must
        still be blocked when ``wake`` starts)."""
        got: list[list[Delivery]] = []
        fetched = anyio.Event()

        async def wait_for_entries() -> None:
            got.append(await subscription.fetch(block_ms=60_000))
            fetched.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_entries)
                await anyio.wait_all_tasks_blocked()
                assert not fetched.is_set()
                await wake()
                await fetched.wait()
        [deliveries] = got
        return deliveries

    async def test_blocking_fetch_wakes_on_append(self) -> None:
        store = await self.open_store()
        subscription = await store.subscribe("workers", "c1")
        got = await self.fetch_woken_by(
            subscription, lambda: store.append("run-a", [step_done("run-a", 1)])
        )
        assert [d.envelope.event_id for d in got] == ["run-a-1"]

    @pytest.mark.parametrize("closing", ["store", "subscription"])
    async def test_close_wakes_a_blocked_fetch(self, closing: str) -> None:
        store = await self.open_store()
        subscription = await store.subscribe("workers", "c1")
        got = await self.fetch_woken_by(
            subscription, store.close if closing == "store" else subscription.close
        )
        assert got == []
        with pytest.raises(StoreClosed):
            await subscription.fetch(block_ms=0)
        await store.close()
        with pytest.raises(StoreClosed):
            await store.ping()

    async def test_blocking_fetch_returns_empty_after_block(self) -> None:
        store = await self.open_store()
        subscription = await store.subscribe("workers", "c1")
        with anyio.fail_after(10):
            assert await subscription.fetch(block_ms=50) == []

    # --- timers and snapshots -----------------------------------------------------------------

    async def test_due_timers_oldest_first_and_leased(self) -> None:
        store = await self.open_store()
        timers = [
            Timer(run_id="run-a", timer_id="late", due_ms=300),
            Timer(run_id="run-b", timer_id="first", due_ms=100, payload=b"p"),
            Timer(run_id="run-a", timer_id="middle", due_ms=200),
            Timer(run_id="run-c", timer_id="future", due_ms=10_000),
        ]
        for timer in timers:
            await store.schedule_timer(timer)
        due = await store.due_timers(1000, lease_ms=5000)
        assert due == [timers[1], timers[2], timers[0]]
        assert await store.due_timers(1000, lease_ms=5000) == []
        again = await store.due_timers(6000, lease_ms=5000)
        assert sorted((t.timer_id, t.due_ms, t.payload) for t in again) == [
            ("first", 6000, b"p"),
            ("late", 6000, b""),
            ("middle", 6000, b""),
        ]

    async def test_due_timers_respects_limit(self) -> None:
        store = await self.open_store()
        for n in range(5):
            await store.schedule_timer(Timer(run_id="run-a", timer_id=f"t{n}", due_ms=100 + n))
        first = await store.due_timers(1000, limit=2)
        second = await store.due_timers(1000, limit=2)
        assert [t.timer_id for t in first + second] == ["t0", "t1", "t2", "t3"]

    async def test_timer_replace_and_cancel(self) -> None:
        store = await self.open_store()
        await store.schedule_timer(Timer(run_id="run-a", timer_id="retry", due_ms=100))
        await store.schedule_timer(Timer(run_id="run-a", timer_id="retry", due_ms=5000))
        assert await store.due_timers(1000) == []
        [moved] = await store.due_timers(5000)
        assert moved.due_ms == 5000
        await store.cancel_timer("run-a", "retry")
        await store.cancel_timer("run-a", "unknown")
        assert await store.due_timers(FAR_FUTURE_MS) == []

    async def test_snapshot_latest_wins(self) -> None:
        store = await self.open_store()
        assert await store.get_snapshot("run-a") is None
        older = Snapshot(run_id="run-a", seq=3, version=1, state=b"three")
        newer = Snapshot(run_id="run-a", seq=7, version=1, state=b"seven")
        await store.put_snapshot(older)
        assert await store.get_snapshot("run-a") == older
        await store.put_snapshot(newer)
        assert await store.get_snapshot("run-a") == newer

    async def test_an_older_snapshot_does_not_replace_a_later_one(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", 1)])
        later = Snapshot(run_id="run-a", seq=18, version=1, state=b"eighteen")
        await store.put_snapshot(later)
        await store.put_snapshot(Snapshot(run_id="run-a", seq=5, version=1, state=b"five"))
        await store.put_snapshots([Snapshot(run_id="run-a", seq=7, version=1, state=b"seven")])
        assert await store.get_snapshot("run-a") == later
        # another state version replaces it whatever its seq (the old one is unreadable now)
        upgraded = Snapshot(run_id="run-a", seq=3, version=2, state=b"v2")
        await store.put_snapshot(upgraded)
        assert await store.get_snapshot("run-a") == upgraded

    async def test_snapshots_of_many_runs_in_one_call(self) -> None:
        store = await self.open_store()
        snaps = [
            Snapshot(run_id=f"run-{i}", seq=i, version=1, state=f"state {i}".encode())
            for i in range(1, 9)
        ]
        later = Snapshot(run_id="run-1", seq=9, version=1, state=b"later")
        await store.put_snapshots([*snaps, later])
        for snap in snaps[1:]:
            assert await store.get_snapshot(snap.run_id) == snap
        assert await store.get_snapshot("run-1") == later
        await store.put_snapshots([])

    # --- work streams -------------------------------------------------------------------------

    async def test_scheduled_steps_also_go_to_their_queues_work_stream(self) -> None:
        store = await self.open_store()
        events = {
            run_id: [
                submitted(run_id),
                scheduled(run_id, "a", "default"),
                step_done(run_id, 1),
                scheduled(run_id, "b", "gpu"),
            ]
            for run_id in ("run-a", "run-b", "run-c")
        }
        for run_id, batch in events.items():
            await store.append(run_id, batch)
        gpu = await drain(await store.subscribe("runner:gpu", "c1", queue="gpu"))
        default = await drain(await store.subscribe("runner:default", "c1", queue="default"))
        every = await drain(await store.subscribe("projector", "c1"))
        for deliveries, seq in ((gpu, 4), (default, 2)):
            assert sorted((d.envelope.run_id, d.partition) for d in deliveries) == sorted(
                (run_id, partition_of(store, run_id)) for run_id in events
            )
            for delivery in deliveries:
                event = events[delivery.envelope.run_id][seq - 1]
                assert (delivery.envelope, delivery.deliveries) == (stored(event, seq), 1)
        assert len(every) == 12
        assert await drain(await store.subscribe("runner:batch", "c1", queue="batch")) == []

    async def test_a_work_entry_stays_pending_until_acknowledged(self) -> None:
        store = await self.open_store(claim_scan_ms=0)
        await store.append("run-a", [scheduled("run-a", "a", "default")])
        await store.append("run-a", [scheduled("run-a", "b", "default")])
        dead = await store.subscribe("runner:default", "dead", queue="default")
        taken = await dead.fetch(max_count=1, block_ms=0)
        assert [d.envelope.seq for d in taken] == [1]

        async def info() -> tuple[int, int]:
            found = [i for i in await store.group_info() if i.group == "runner:default"]
            return sum(i.pending for i in found), sum(i.lag for i in found)

        assert await info() == (1, 1)
        alive = await store.subscribe("runner:default", "alive", queue="default")
        got = await alive.fetch(block_ms=0)
        assert [d.envelope.seq for d in got] == [2]
        await alive.ack(got)
        await self.age_pending(store, store.config.claim_idle_ms)
        claimed = await alive.fetch(block_ms=0)
        assert [(d.entry_id, d.deliveries) for d in claimed] == [(taken[0].entry_id, 2)]
        await alive.ack(claimed)
        assert await info() == (0, 0)

    async def test_trim_trims_work_streams_below_what_their_groups_read(self) -> None:
        store = await self.open_store()
        partition = partition_of(store, "run-a")
        await store.append("run-a", [scheduled("run-a", step, "default") for step in "abc"])
        runner = await store.subscribe("runner:default", "c1", queue="default")
        first = await runner.fetch(max_count=2, block_ms=0)
        await runner.ack(first[:1])
        report = await store.trim_feeds(FAR_FUTURE_MS)
        # The feed has no group: it goes up to the horizon. The work stream keeps what its
        # group has pending or not read.
        assert report.trimmed[partition] == 3
        assert sum(report.work_trimmed.values()) == report.work_trimmed[partition] == 1
        assert [d.envelope.seq for d in await drain(runner)] == [3]
        dry = await store.trim_feeds(FAR_FUTURE_MS, dry_run=True)
        assert dry.work_trimmed[partition] == 0

    # --- retention ----------------------------------------------------------------------------

    async def test_trim_keeps_undelivered_and_pending_entries(self) -> None:
        store = await self.open_store()
        partition = partition_of(store, "run-a")
        events = [step_done("run-a", n) for n in range(1, 11)]
        await store.append("run-a", events)
        subscription = await store.subscribe("workers", "c1")
        first = await subscription.fetch(max_count=6, block_ms=0)
        await subscription.ack(first[:3])
        archived: list[tuple[int, list[Envelope]]] = []

        async def archive(partition: int, envelopes: Sequence[Envelope]) -> None:
            archived.append((partition, list(envelopes)))

        report = await store.trim_feeds(FAR_FUTURE_MS, archive=archive)
        assert sum(report.trimmed.values()) == report.trimmed[partition] == 3
        assert report.min_ids[partition] == first[3].entry_id
        assert archived == [(partition, [stored(e, n) for n, e in enumerate(events[:3], 1)])]
        rest = await drain(subscription)
        assert [d.envelope.seq for d in rest] == [7, 8, 9, 10]
        await subscription.ack(first[3:] + rest)
        report = await store.trim_feeds(FAR_FUTURE_MS, archive=archive)
        assert report.trimmed[partition] == 7
        await store.append("run-a", [step_done("run-a", 11)])
        assert [d.envelope.seq for d in await drain(subscription)] == [11]

    async def test_trim_never_drops_what_a_group_has_not_read(self) -> None:
        store = await self.open_store()
        await store.subscribe("idle-group", "c1")
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        busy = await store.subscribe("busy-group", "c1")
        await busy.ack(await drain(busy))
        report = await store.trim_feeds(FAR_FUTURE_MS)
        assert sum(report.trimmed.values()) == 0
        assert len(await drain(await store.subscribe("idle-group", "c1"))) == 3

    async def test_trim_stops_at_the_horizon(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        subscription = await store.subscribe("workers", "c1")
        await subscription.ack(await drain(subscription))
        assert sum((await store.trim_feeds(0)).trimmed.values()) == 0
        assert sum((await store.trim_feeds(FAR_FUTURE_MS)).trimmed.values()) == 3

    async def test_trim_dry_run_trims_nothing(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [step_done("run-a", n) for n in range(1, 4)])
        subscription = await store.subscribe("workers", "c1")
        await subscription.ack(await drain(subscription))
        archived: list[int] = []

        async def archive(partition: int, envelopes: Sequence[Envelope]) -> None:
            archived.append(len(envelopes))

        report = await store.trim_feeds(FAR_FUTURE_MS, dry_run=True, archive=archive)
        assert report.dry_run
        assert report.trimmed[partition_of(store, "run-a")] == 3
        assert archived == []
        late = await store.subscribe("late-group", "c1")
        assert len(await drain(late)) == 3

    async def test_trim_counts_undecodable_entries_but_archives_events_only(self) -> None:
        store = await self.open_store()
        partition = partition_of(store, "run-a")
        await store.append("run-a", [step_done("run-a", 1)])
        await self.inject_raw(store, partition, GARBAGE)
        await store.append("run-a", [step_done("run-a", 2)])
        subscription = await store.subscribe("workers", "c1")
        await subscription.ack(await drain(subscription))
        archived: list[str] = []

        async def archive(partition: int, envelopes: Sequence[Envelope]) -> None:
            archived.extend(e.event_id for e in envelopes)

        report = await store.trim_feeds(FAR_FUTURE_MS, archive=archive)
        assert report.trimmed[partition] == 3
        assert archived == ["run-a-1", "run-a-2"]

    async def test_finished_run_expires_after_retention(self) -> None:
        store = await self.open_store()
        failure = RunFailed(error=ErrorInfo(type="Boom", message="boom"))
        await store.append("run-done", [submitted("run-done")])
        await store.put_snapshot(Snapshot(run_id="run-done", seq=1, version=1, state=b"s"))
        await store.append("run-done", [envelope("run-done", "done", RunCompleted())])
        reopened = [
            submitted("run-reopened"),
            envelope("run-reopened", "failed", failure),
            envelope("run-reopened", "retry", RunRetryRequested()),
        ]
        await store.append("run-reopened", reopened)
        await store.append("run-live", [submitted("run-live")])
        head = await store.head("run-done")
        assert head is not None
        assert head.status == "completed"
        await self.expire_retention(store, "run-done")
        assert await store.head("run-done") is None
        assert await history(store, "run-done") == []
        assert await store.get_snapshot("run-done") is None
        assert await store.list_runs() == ["run-reopened", "run-live"]
        reopened_head = await store.head("run-reopened")
        assert reopened_head is not None
        assert (reopened_head.seq, reopened_head.status) == (3, "running")

    async def test_a_run_id_used_again_after_expiry_is_listed_as_a_new_run(self) -> None:
        store = await self.open_store()
        await store.append("run-a", [submitted("run-a")])
        await store.put_snapshot(Snapshot(run_id="run-a", seq=1, version=1, state=b"s"))
        await store.append("run-a", [envelope("run-a", "run-a-done", RunCompleted())])
        await self.expire_retention(store, "run-a")
        await store.append("run-b", [step_done("run-b", 1)])
        await store.append("run-a", [step_done("run-a", 1, event_id="run-a-again")])
        assert await store.list_runs() == ["run-b", "run-a"]

    # --- tamper evidence ----------------------------------------------------------------------

    async def test_records_are_the_stored_entries_with_their_hash_chain(self) -> None:
        store = await self.open_store()
        events = [submitted("run-a"), step_done("run-a", 1), step_done("run-a", 2)]
        results = await store.append("run-a", events)
        await store.append("run-b", [submitted("run-b")])
        records = [record async for record in store.read_records("run-a")]
        assert [r.seq for r in records] == [1, 2, 3]
        assert [codec.decode(r.raw, seq=r.seq) for r in records] == await history(store, "run-a")
        chain = ""
        for record in records:
            chain = codec.chain_hash(chain, record.seq, record.raw)
            assert (record.hash, record.mac) == (chain, "")
        head = await store.head("run-a")
        assert head is not None
        assert (head.hash, head.mac) == (records[-1].hash, "")
        assert verify_run("run-a", records, head) == []
        assert [record async for record in store.read_records("run-unknown")] == []
        assert results[-1].seq == 3

    async def test_audit_key_adds_a_mac_chain_in_entries_and_head(self) -> None:
        key = b"the audit key"
        store = await self.open_store(audit_key=key)
        await store.append("run-a", [submitted("run-a"), step_done("run-a", 1)])
        await store.append("run-a", [step_done("run-a", 2)])
        records = [record async for record in store.read_records("run-a")]
        mac = ""
        for record in records:
            mac = chain_mac(key, mac, record.seq, content_digest(record.raw))
            assert record.mac == mac
        head = await store.head("run-a")
        assert head is not None
        assert head.mac == mac
        assert verify_run("run-a", records, head, key=key) == []
        wrong = verify_run("run-a", records, head, key=b"another key")
        assert [(f.seq, f.kind) for f in wrong][:3] == [
            (1, "modified"),
            (2, "modified"),
            (3, "modified"),
        ]
