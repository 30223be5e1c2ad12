"""The contract suite against the in-memory store, plus what only the memory store offers."""

from __future__ import annotations

import time

import pytest

from eventstore.errors import InvalidAppend, StoreClosed
from eventstore.memory import MemoryStore
from eventstore.store import EventStore, StoreConfig

from .base import BASE_TS, StoreContract, step_done


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, now_ms: int = BASE_TS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def clock_of(store: EventStore) -> ManualClock:
    assert isinstance(store, MemoryStore)
    assert isinstance(store.clock_ms, ManualClock)
    return store.clock_ms


class TestMemoryStore(StoreContract):
    async def make_store(self, config: StoreConfig) -> EventStore:
        return MemoryStore(config, clock_ms=ManualClock())

    async def expire_dedup(self, store: EventStore, run_id: str, event_id: str) -> None:
        clock_of(store).advance(store.config.dedup_ttl_ms)

    async def age_pending(self, store: EventStore, ms: int) -> None:
        clock_of(store).advance(ms)

    async def inject_raw(self, store: EventStore, partition: int, raw: bytes) -> str:
        assert isinstance(store, MemoryStore)
        return store.add_raw_feed_entry(partition, raw)

    async def expire_retention(self, store: EventStore, run_id: str) -> None:
        clock_of(store).advance(store.config.retention_ms)

    async def test_entry_ids_increase_when_the_clock_stalls_or_goes_back(self) -> None:
        store = await self.open_store(partitions=1)
        clock = clock_of(store)
        results = await store.append("run-a", [step_done("run-a", n) for n in (1, 2)])
        clock.advance(-5)
        results += await store.append("run-a", [step_done("run-a", 3)])
        clock.advance(10)
        results += await store.append("run-a", [step_done("run-a", 4)])
        assert [r.entry_id for r in results] == [
            f"{BASE_TS}-0",
            f"{BASE_TS}-1",
            f"{BASE_TS}-2",
            f"{BASE_TS + 5}-0",
        ]

    async def test_default_clock_is_wall_time(self) -> None:
        store = MemoryStore(StoreConfig(partitions=1))
        before = time.time_ns() // 1_000_000
        [result] = await store.append("run-a", [step_done("run-a", 1)])
        after = time.time_ns() // 1_000_000
        ms, n = result.entry_id.split("-")
        assert before <= int(ms) <= after
        assert n == "0"

    async def test_dedup_lasts_until_the_ttl_has_passed(self) -> None:
        store = await self.open_store(dedup_ttl_ms=1000)
        event = step_done("run-a", 1)
        await store.append("run-a", [event])
        clock_of(store).advance(999)
        [duplicate] = await store.append("run-a", [event])
        clock_of(store).advance(1)
        [again] = await store.append("run-a", [event])
        assert (duplicate.outcome, again.outcome, again.seq) == ("duplicate", "appended", 2)

    async def test_raw_entry_outside_the_partitions_is_rejected(self) -> None:
        store = await self.open_store(partitions=2)
        assert isinstance(store, MemoryStore)
        with pytest.raises(InvalidAppend):
            store.add_raw_feed_entry(2, b"x")

    async def test_closed_store_refuses_requests(self) -> None:
        store = await self.open_store()
        await store.close()
        with pytest.raises(StoreClosed):
            await store.append("run-a", [step_done("run-a", 1)])
        with pytest.raises(StoreClosed):
            await store.ping()
