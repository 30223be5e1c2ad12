"""The memory and redis backends, driven by the same random operations, behave the same.

A hypothesis state machine appends (fresh ids, repeated ids, repeated ids with another payload,
with and without an expected seq, right or stale), reads, and consumes a group (fetch, ack,
touch, claim after idle, consumer restarts) on both stores at once, and asserts that every
observable result matches; only entry ids, which each backend makes its own way, are left out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio.from_thread
import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test
from support.redis_server import RedisServer, admin_client, age_pending, isolated

from eventstore.events import (
    Envelope,
    EventData,
    RunCompleted,
    RunRetryRequested,
    RunStarted,
    StepSucceeded,
)
from eventstore.keys import Keys
from eventstore.memory import MemoryStore
from eventstore.redis_store import RedisStore
from eventstore.store import Delivery, EventStore, StoreConfig, Subscription

pytestmark = pytest.mark.redis

T = TypeVar("T")

RUNS = ("run-a", "run-b", "run-c", "run-d")
CONSUMERS = ("c1", "c2")
GROUP = "workers"
CLAIM_IDLE_MS = 60_000
# Both stores look for claimable entries on every fetch, so their fetches stay comparable.
CONFIG = StoreConfig(partitions=2, claim_idle_ms=CLAIM_IDLE_MS, claim_scan_ms=0, max_deliveries=3)
BASE_TS = 1_700_000_000_000

DeliveryKey = tuple[str, int]


class ManualClock:
    """The memory store's clock; it moves only when the machine ages pending entries."""

    def __init__(self) -> None:
        self.now_ms = BASE_TS

    def __call__(self) -> int:
        return self.now_ms


payloads: st.SearchStrategy[EventData] = st.one_of(
    st.builds(
        StepSucceeded,
        step=st.sampled_from(["fetch", "parse", "store"]),
        attempt=st.integers(1, 3),
        agent=st.just("echo"),
        output=st.integers(0, 5),
    ),
    st.sampled_from([RunStarted(), RunCompleted(), RunRetryRequested()]),
)


def delivery_view(deliveries: list[Delivery]) -> list[tuple[str, int, int, int]]:
    return sorted(
        (d.envelope.event_id, d.envelope.seq, d.deliveries, d.partition) for d in deliveries
    )


class BackendComparison(RuleBasedStateMachine):
    """Applies each operation to a MemoryStore and a RedisStore and compares the outcomes."""

    portal: anyio.from_thread.BlockingPortal
    url: str

    def __init__(self) -> None:
        super().__init__()
        config = isolated(CONFIG)
        self.keys = Keys(config.prefix, config.partitions)
        self.clock = ManualClock()
        self.memory = MemoryStore(config, clock_ms=self.clock)
        self.redis = self.call(self._open_redis, config)
        self.admin: aioredis.Redis = self.call(self._open_admin)
        self.sent: dict[str, list[Envelope]] = {run: [] for run in RUNS}
        self.next_id = 0
        self.subscriptions: dict[str, tuple[Subscription, Subscription]] = {}
        self.in_flight: dict[DeliveryKey, tuple[str, Delivery, Delivery]] = {}

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self.portal.call(func, *args)

    async def _open_redis(self, config: StoreConfig) -> RedisStore:
        return RedisStore.from_url(self.url, config)

    async def _open_admin(self) -> aioredis.Redis:
        return admin_client(self.url)

    def both(self, operation: Callable[[EventStore], Awaitable[T]]) -> tuple[T, T]:
        return self.call(operation, self.memory), self.call(operation, self.redis)

    def teardown(self) -> None:
        self.call(self.memory.close)
        self.call(self.redis.close)
        self.call(self.admin.aclose)

    # --- appends and reads --------------------------------------------------------------------

    def _event(self, run_id: str, data: EventData) -> Envelope:
        """A new event with a fresh id."""
        self.next_id += 1
        return Envelope(
            event_id=f"{run_id}-e{self.next_id}",
            run_id=run_id,
            ts=BASE_TS + self.next_id,
            producer="p",
            data=data,
        )

    @rule(
        run_id=st.sampled_from(RUNS),
        plan=st.lists(st.sampled_from(["fresh", "repeat", "changed"]), min_size=1, max_size=4),
        expectation=st.sampled_from(["none", "right", "stale"]),
        data=st.data(),
    )
    def append(self, run_id: str, plan: list[str], expectation: str, data: st.DataObject) -> None:
        batch: list[Envelope] = []
        for kind in plan:
            sent = self.sent[run_id] + batch
            if kind == "fresh" or not sent:
                batch.append(self._event(run_id, data.draw(payloads)))
                continue
            earlier = data.draw(st.sampled_from(sent))
            if kind == "repeat":
                batch.append(msgspec.structs.replace(earlier, ts=earlier.ts + 1, producer="q"))
            else:
                other = StepSucceeded(step="other", attempt=1, agent="echo", output=self.next_id)
                batch.append(msgspec.structs.replace(earlier, data=other))
        head = self.call(self.memory.head, run_id)
        current = head.seq if head is not None else 0
        expected = {"none": None, "right": current, "stale": current + 1}[expectation]

        async def append(store: EventStore) -> list[tuple[str, str, int, int, bool]]:
            results = await store.append(run_id, batch, expected)
            return [
                (r.event_id, r.outcome, r.seq, r.current_seq, bool(r.entry_id)) for r in results
            ]

        from_memory, from_redis = self.both(append)
        assert from_memory == from_redis
        self.sent[run_id] += batch

    @rule(run_id=st.sampled_from(RUNS), after_seq=st.integers(0, 10))
    def read_run(self, run_id: str, after_seq: int) -> None:
        async def read(store: EventStore) -> list[Envelope]:
            return [event async for event in store.read_run(run_id, after_seq)]

        from_memory, from_redis = self.both(read)
        assert from_memory == from_redis

    @rule()
    def heads_and_runs(self) -> None:
        async def heads(store: EventStore) -> list[tuple[int, str, str] | None]:
            found = [await store.head(run_id) for run_id in RUNS]
            return [None if h is None else (h.seq, h.status, h.hash) for h in found]

        from_memory_heads, from_redis_heads = self.both(heads)
        assert from_memory_heads == from_redis_heads
        from_memory, from_redis = self.both(lambda store: store.list_runs())
        assert from_memory == from_redis

    # --- the consumer group -------------------------------------------------------------------

    def _subscriptions(self, consumer: str) -> tuple[Subscription, Subscription]:
        if consumer not in self.subscriptions:
            self.subscriptions[consumer] = self.both(lambda store: store.subscribe(GROUP, consumer))
        return self.subscriptions[consumer]

    @rule(consumer=st.sampled_from(CONSUMERS))
    def fetch(self, consumer: str) -> None:
        memory_sub, redis_sub = self._subscriptions(consumer)
        from_memory = self.call(memory_sub.fetch, 100, 0)
        from_redis = self.call(redis_sub.fetch, 100, 0)
        assert delivery_view(from_memory) == delivery_view(from_redis)
        by_key = {(d.envelope.event_id, d.envelope.seq): d for d in from_redis}
        for delivery in from_memory:
            key = (delivery.envelope.event_id, delivery.envelope.seq)
            self.in_flight[key] = (consumer, delivery, by_key[key])

    def _own(self, consumer: str) -> list[DeliveryKey]:
        return sorted(key for key, (owner, _, _) in self.in_flight.items() if owner == consumer)

    @precondition(lambda self: bool(self.in_flight))
    @rule(consumer=st.sampled_from(CONSUMERS), data=st.data())
    def ack(self, consumer: str, data: st.DataObject) -> None:
        own = self._own(consumer)
        chosen = data.draw(st.lists(st.sampled_from(own), unique=True)) if own else []
        memory_sub, redis_sub = self._subscriptions(consumer)
        self.call(memory_sub.ack, [self.in_flight[key][1] for key in chosen])
        self.call(redis_sub.ack, [self.in_flight[key][2] for key in chosen])
        for key in chosen:
            del self.in_flight[key]

    @rule(consumer=st.sampled_from(CONSUMERS))
    def touch(self, consumer: str) -> None:
        own = self._own(consumer)
        memory_sub, redis_sub = self._subscriptions(consumer)
        self.call(memory_sub.touch, [self.in_flight[key][1] for key in own])
        self.call(redis_sub.touch, [self.in_flight[key][2] for key in own])

    @rule()
    def age_pending(self) -> None:
        self.clock.now_ms += CLAIM_IDLE_MS
        self.call(age_pending, self.admin, self.keys, CLAIM_IDLE_MS)

    @rule(consumer=st.sampled_from(CONSUMERS))
    def claim(self, consumer: str) -> None:
        """Let every pending entry go idle, then fetch: claims and dead letters."""
        self.age_pending()
        self.fetch(consumer)

    @precondition(lambda self: bool(self.subscriptions))
    @rule(consumer=st.sampled_from(CONSUMERS))
    def restart_consumer(self, consumer: str) -> None:
        if consumer in self.subscriptions:
            memory_sub, redis_sub = self.subscriptions.pop(consumer)
            self.call(memory_sub.close)
            self.call(redis_sub.close)

    @rule()
    def group_state(self) -> None:
        async def groups(store: EventStore) -> list[tuple[str, int, int, int]]:
            infos = await store.group_info()
            return sorted((i.group, i.partition, i.pending, i.lag) for i in infos)

        async def dead(store: EventStore) -> list[tuple[int, str, str, int, bytes]]:
            return [
                (d.partition, d.group, d.reason.split(":")[0], d.deliveries, d.raw)
                for d in await store.dead_letters()
            ]

        from_memory, from_redis = self.both(groups)
        assert from_memory == from_redis
        from_memory_dead, from_redis_dead = self.both(dead)
        assert from_memory_dead == from_redis_dead


@pytest.fixture
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal("asyncio") as blocking_portal:
        yield blocking_portal


def test_memory_and_redis_backends_agree(
    redis_server: RedisServer, portal: anyio.from_thread.BlockingPortal
) -> None:
    class Machine(BackendComparison):
        pass

    Machine.portal = portal
    Machine.url = redis_server.url
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
