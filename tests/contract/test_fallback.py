"""The contract suite against the fallback backend while Redis is up, plus its spool rules.

The contract runs through a :class:`FallbackStore` over a :class:`RedisStore` on the session's
redis-server (the redis contract's hooks apply unchanged: the fallback store has its primary's
config and keys) and checks that nothing was spooled. The other tests kill a private server
to make the fallback store spool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio as aioredis
from support.redis_server import RedisServer, isolated
from support.waits import LogSeen

from eventstore import codec
from eventstore.errors import EventNotEncodable, SpoolError, StoreClosed, StoreError
from eventstore.events import StepSucceeded
from eventstore.fallback import FallbackStore, is_spooled
from eventstore.redis_store import RedisStore
from eventstore.spool import MAGIC, Spool
from eventstore.store import EventStore, Outcome, StoreConfig

from . import test_redis
from .base import envelope, history, outcomes, step_done, stored

CONFIG = StoreConfig(partitions=4)


class TestFallbackStore(test_redis.TestRedisStore):
    """The whole contract, through a fallback store whose Redis is up."""

    spool_dir: Path

    @pytest.fixture(autouse=True)
    def _spool_dir(self, tmp_path: Path) -> Iterator[None]:
        self.spool_dir = tmp_path
        yield
        for store in self._stores:
            assert isinstance(store, FallbackStore)
            assert not store.spooled

    async def make_store(self, config: StoreConfig) -> EventStore:
        primary = RedisStore.from_url(self.server.url, isolated(config))
        return FallbackStore(primary, self.spool_dir / f"{primary.config.prefix}.spool")


def records_of(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    """The attributes (``extra`` included) of the log records with ``message``."""
    return [vars(record) for record in caplog.records if record.getMessage() == message]


@pytest.mark.redis
@pytest.mark.anyio
class TestSpooling:
    """What the fallback store does when Redis goes away and comes back."""

    @pytest.fixture(autouse=True)
    def _paths(self, tmp_path: Path, durable_redis_server: RedisServer) -> None:
        self.server = durable_redis_server
        self.config = isolated(CONFIG)
        self.spool = tmp_path / "facts.spool"

    def fallback(self, **options: int) -> FallbackStore:
        return FallbackStore(
            RedisStore.from_url(self.server.url, self.config), self.spool, **options
        )

    async def ids_in_redis(self, run_id: str) -> list[str]:
        store = RedisStore.from_url(self.server.url, self.config)
        try:
            return [event.event_id for event in await history(store, run_id)]
        finally:
            await store.close()

    async def test_facts_of_a_spooled_run_queue_behind_it_until_drained(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        first = self.fallback()
        await first.append("run-a", [step_done("run-a", 1)])
        self.server.kill()
        spooled = await first.append("run-a", [step_done("run-a", 2), step_done("run-a", 3)])
        assert [(r.outcome, r.seq, is_spooled(r)) for r in spooled] == [
            (Outcome.APPENDED, 0, True)
        ] * 2
        assert spooled[0].entry_id != spooled[1].entry_id
        await first.close()
        self.server.restart()

        with caplog.at_level(logging.INFO, logger="eventstore.fallback"):
            second = self.fallback()
        [loaded] = records_of(caplog, "loaded spooled fact appends left by an earlier process")
        assert (loaded["spooled_records"], loaded["spooled_events"]) == (1, 2)
        try:
            [behind] = await second.append("run-a", [step_done("run-a", 4)])
            assert is_spooled(behind)
            [other] = await second.append("run-b", [step_done("run-b", 1)])
            assert (other.outcome, other.seq, is_spooled(other)) == (Outcome.APPENDED, 1, False)
            assert [e.seq for e in await history(second, "run-a")] == [1]

            report = await second.drain()
            assert (report.records, report.appended, report.duplicates) == (2, 3, 0)
            assert (report.rejected, report.remaining) == (0, 0)
            assert await self.ids_in_redis("run-a") == [f"run-a-{n}" for n in range(1, 5)]
            [after] = await second.append("run-a", [step_done("run-a", 5)])
            assert (after.seq, is_spooled(after)) == (5, False)
            assert self.spool.read_bytes() == MAGIC
        finally:
            await second.close()

    async def test_background_drain_empties_the_spool_when_redis_returns(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        events = [step_done("run-a", n) for n in (1, 2, 3)]
        with caplog.at_level(logging.INFO, logger="eventstore.fallback"):
            async with self.fallback(retry_interval_ms=20) as store:
                await store.append("run-a", events[:1])
                self.server.kill()
                results = await store.append("run-a", events[1:])
                results += await store.append("run-b", [step_done("run-b", 1)])
                assert all(is_spooled(r) for r in results)
                await anyio.to_thread.run_sync(self.server.restart)
                with anyio.fail_after(30):
                    await store.wait_drained()
                assert await history(store, "run-a") == [
                    stored(e, n) for n, e in enumerate(events, 1)
                ]
                assert await self.ids_in_redis("run-b") == ["run-b-1"]

        [down] = records_of(caplog, "primary store unavailable; spooling fact appends")
        assert down["levelname"] == "WARNING"
        assert down["spool_path"] == str(self.spool)
        [drained] = records_of(caplog, "drained spooled fact appends into the primary store")
        assert (drained["drained_records"], drained["drained_appended"]) == (2, 3)
        assert (drained["spooled_records"], drained["spooled_events"]) == (0, 0)

    async def test_leaving_the_context_drains_then_closes(self) -> None:
        store = self.fallback(retry_interval_ms=600_000)
        async with store:
            self.server.kill()
            [result] = await store.append("run-a", [step_done("run-a", 1)])
            assert is_spooled(result)
            await anyio.to_thread.run_sync(self.server.restart)
        assert await self.ids_in_redis("run-a") == ["run-a-1"]
        assert self.spool.read_bytes() == MAGIC
        with pytest.raises(StoreClosed):
            await store.append("run-a", [step_done("run-a", 2)])

    async def test_events_redis_refuses_go_to_the_rejected_file(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        store = self.fallback()
        try:
            self.server.kill()
            spooled = step_done("run-a", 1, output="spooled")
            await store.append("run-a", [spooled, step_done("run-a", 2)])
            self.server.restart()
            direct = RedisStore.from_url(self.server.url, self.config)
            await direct.append("run-a", [step_done("run-a", 1, output="direct")])
            await direct.close()

            with caplog.at_level(logging.ERROR, logger="eventstore.fallback"):
                report = await store.drain()
            assert (report.records, report.appended, report.rejected) == (1, 1, 1)
            lines = store.rejected_path.read_bytes().splitlines(keepends=True)
            assert [codec.from_json_line(line) for line in lines] == [spooled]
            [error] = records_of(
                caplog, "the primary store refused a spooled event; kept in the rejected file"
            )
            assert (error["event_id"], error["reason"]) == ("run-a-1", "mismatch (seq 1)")
            [first, second] = await history(store, "run-a")
            assert (first.data, second.event_id) == (
                step_done("run-a", 1, output="direct").data,
                "run-a-2",
            )
        finally:
            await store.close()

    async def test_a_record_redis_refuses_outright_does_not_hold_up_the_rest(self) -> None:
        self.config = isolated(StoreConfig(partitions=4, max_event_bytes=2048))
        too_large = step_done("run-a", 1, output="x" * 4096)
        writer = Spool.open(self.spool)
        writer.append("run-a", [too_large])
        writer.append("run-a", [step_done("run-a", 2)])
        writer.close()

        store = self.fallback()
        try:
            report = await store.drain()
            assert (report.records, report.appended, report.rejected) == (2, 1, 1)
            lines = store.rejected_path.read_bytes().splitlines(keepends=True)
            assert [codec.from_json_line(line) for line in lines] == [too_large]
            assert outcomes(await store.append("run-a", [step_done("run-a", 3)])) == [
                (Outcome.APPENDED, 2)
            ]
        finally:
            await store.close()

    async def test_an_event_that_cannot_be_stored_is_refused_before_it_is_spooled(
        self,
    ) -> None:
        store = self.fallback()
        await store.append("run-a", [step_done("run-a", 1)])
        self.server.kill()
        [spooled] = await store.append("run-a", [step_done("run-a", 2)])
        assert is_spooled(spooled)
        # a producer's type error: it would encode, but no reader could decode it
        poison = envelope("run-a", "run-a-poison", StepSucceeded(step=7, attempt=1, agent="x"))  # type: ignore[arg-type]
        with pytest.raises(EventNotEncodable, match="does not read back"):
            await store.append("run-a", [poison])
        await store.close()
        self.server.restart()
        reopened = self.fallback()
        try:
            assert [r.run_id for r in reopened.spooled] == ["run-a"]
            report = await reopened.drain()
            assert (report.appended, report.rejected, report.remaining) == (1, 0, 0)
            assert await self.ids_in_redis("run-a") == ["run-a-1", "run-a-2"]
        finally:
            await reopened.close()

    async def test_a_failing_drain_keeps_the_spool_and_is_retried(self) -> None:
        writer = Spool.open(self.spool)
        writer.append("run-a", [step_done("run-a", 1)])
        writer.close()
        admin = aioredis.Redis.from_url(self.server.url)
        await admin.config_set("maxmemory", 1)
        failed = LogSeen("draining the spool failed; retrying")
        logger = logging.getLogger("eventstore.fallback")
        logger.addHandler(failed)
        try:
            async with self.fallback(retry_interval_ms=20) as store:
                with anyio.fail_after(30):
                    await failed.seen.wait()
                assert [r.run_id for r in store.spooled] == ["run-a"]
                with pytest.raises(StoreError, match="maxmemory"):
                    await store.drain()
                await admin.config_set("maxmemory", 0)
                with anyio.fail_after(30):
                    await store.wait_drained()
                assert await self.ids_in_redis("run-a") == ["run-a-1"]
        finally:
            logger.removeHandler(failed)
            await admin.aclose()

    async def test_a_spool_belongs_to_one_open_store(self) -> None:
        store = self.fallback()
        second_primary = RedisStore.from_url(self.server.url, self.config)
        with pytest.raises(SpoolError, match="in use"):
            FallbackStore(second_primary, self.spool)
        await second_primary.close()
        await store.close()
        with pytest.raises(StoreClosed):
            await store.append("run-a", [step_done("run-a", 1)])
        with pytest.raises(StoreClosed):
            await store.drain()
        reopened = self.fallback()
        assert not reopened.spooled
        await reopened.close()
