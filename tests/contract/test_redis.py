"""The contract suite against the redis backend, plus what only the redis backend has to do.

Every test runs against a redis-server the session starts for itself (or a private one, for
the tests that kill it); stores use a fresh key prefix each.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import anyio
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from support.redis_server import RedisServer, admin_client, age_pending, isolated

from eventstore import codec
from eventstore.errors import StoreUnavailable
from eventstore.events import RunCompleted, RunRetryRequested
from eventstore.keys import Keys
from eventstore.redis_conn import Arg, client_from_url, command, redact_url, run_commands
from eventstore.redis_store import RUNS_PER_CALL, RedisStore
from eventstore.store import (
    AppendRequest,
    Delivery,
    EventStore,
    Outcome,
    Snapshot,
    StoreConfig,
    Timer,
)
from services.bench.store_bench import bench_append, bench_replay

from .base import (
    FAR_FUTURE_MS,
    StoreContract,
    envelope,
    history,
    outcomes,
    scheduled,
    step_done,
    stored,
    submitted,
)

FOUR_PARTITIONS = StoreConfig(partitions=4)


def keys_of(store: EventStore) -> Keys:
    return Keys(store.config.prefix, store.config.partitions)


def pairs(flat: Sequence[Any]) -> dict[bytes, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisHarness:
    """A raw admin connection to the test's server, for the hooks and for looking at keys."""

    server: RedisServer
    admin: aioredis.Redis

    @pytest.fixture(autouse=True)
    async def _admin(self, redis_server: RedisServer) -> AsyncIterator[None]:
        self.server = redis_server
        self.admin = admin_client(redis_server.url)
        yield
        with anyio.CancelScope(shield=True):
            await self.admin.aclose()

    async def redis(self, *args: Arg) -> Any:
        """One command on the admin connection; the reply as the server sent it."""
        return await command(self.admin, *args)

    async def open_redis(self, config: StoreConfig = FOUR_PARTITIONS) -> RedisStore:
        return RedisStore.from_url(self.server.url, isolated(config))

    async def pttl(self, key: str) -> int:
        ttl: int = await self.redis("PTTL", key)
        return ttl

    async def stat_calls(self, name: str) -> int:
        """How often the server has run command ``name`` (from INFO commandstats)."""
        info: bytes = await self.redis("INFO", "commandstats")
        for line in info.decode().splitlines():
            if line.startswith(f"cmdstat_{name}:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0


class TestRedisStore(RedisHarness, StoreContract):
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio, pytest.mark.redis]

    async def make_store(self, config: StoreConfig) -> EventStore:
        return RedisStore.from_url(self.server.url, isolated(config))

    async def expire_dedup(self, store: EventStore, run_id: str, event_id: str) -> None:
        key = keys_of(store).dedup(run_id, event_id)
        assert 0 < await self.pttl(key) <= store.config.dedup_ttl_ms
        await self.redis("DEL", key)

    async def age_pending(self, store: EventStore, ms: int) -> None:
        await age_pending(self.admin, keys_of(store), ms)

    async def inject_raw(self, store: EventStore, partition: int, raw: bytes) -> str:
        entry_id: bytes = await self.redis(
            "XADD", keys_of(store).feed(partition), "*", "s", 0, "e", raw
        )
        return entry_id.decode()

    async def expire_retention(self, store: EventStore, run_id: str) -> None:
        keys = keys_of(store)
        for key in (keys.run(run_id), keys.head(run_id), keys.snap(run_id)):
            assert 0 < await self.pttl(key) <= store.config.retention_ms
            await self.redis("DEL", key)


class TestRedisBackend(RedisHarness):
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio, pytest.mark.redis]

    async def test_run_entries_carry_the_chain_hash_and_feed_entries_seq_and_envelope(self) -> None:
        store = await self.open_redis()
        events = [submitted("run-a"), step_done("run-a", 1), step_done("run-a", 2)]
        results = await store.append("run-a", events)
        keys = keys_of(store)
        run_entries = await self.redis("XRANGE", keys.run("run-a"), "-", "+")
        feed_entries = await self.redis("XRANGE", keys.feed(keys.partition("run-a")), "-", "+")
        assert [entry_id for entry_id, _ in run_entries] == [b"1-0", b"2-0", b"3-0"]
        assert [entry_id.decode() for entry_id, _ in feed_entries] == [r.entry_id for r in results]
        chain = ""
        for seq, (event, (_, fields), (_, feed_fields)) in enumerate(
            zip(events, run_entries, feed_entries, strict=True), 1
        ):
            raw = codec.encode(event)
            chain = codec.chain_hash(chain, seq, raw)
            assert fields == [b"s", str(seq).encode(), b"e", raw, b"h", chain.encode()]
            assert feed_fields == [b"s", str(seq).encode(), b"e", raw]
        head = await store.head("run-a")
        assert head is not None
        assert (head.hash, head.entry_id) == (chain, results[-1].entry_id)
        await store.close()

    async def test_a_scheduled_step_is_copied_to_its_work_stream_and_its_queue_registered(
        self,
    ) -> None:
        store = await self.open_redis()
        events = [submitted("run-a"), scheduled("run-a", "a", "gpu"), step_done("run-a", 1)]
        await store.append("run-a", events)
        keys = keys_of(store)
        partition = keys.partition("run-a")
        [(_, fields)] = await self.redis("XRANGE", keys.work(partition, "gpu"), "-", "+")
        assert fields == [b"s", b"2", b"e", codec.encode(events[1])]
        assert await self.redis("SMEMBERS", keys.queues(partition)) == [b"gpu"]
        await store.close()

    async def test_dedup_record_names_entry_seq_and_payload_digest(self) -> None:
        store = await self.open_redis(StoreConfig(partitions=2, dedup_ttl_ms=60_000))
        event = step_done("run-a", 1)
        [result] = await store.append("run-a", [event])
        key = keys_of(store).dedup("run-a", event.event_id)
        value = await self.redis("GET", key)
        assert value == f"{result.entry_id} 1 {codec.payload_digest(event)}".encode()
        assert 50_000 < await self.pttl(key) <= 60_000
        await store.close()

    async def test_terminal_status_expires_the_run_and_a_resume_keeps_it(self) -> None:
        store = await self.open_redis(StoreConfig(partitions=2, retention_ms=3_600_000))
        keys = keys_of(store)
        run_keys = (keys.run("run-a"), keys.head("run-a"), keys.snap("run-a"))
        await store.append("run-a", [submitted("run-a")])
        await store.put_snapshot(Snapshot(run_id="run-a", seq=1, version=1, state=b"s"))
        assert [await self.pttl(k) for k in run_keys] == [-1, -1, -1]
        await store.append("run-a", [envelope("run-a", "done", RunCompleted())])
        assert all(3_500_000 < ttl <= 3_600_000 for ttl in [await self.pttl(k) for k in run_keys])
        await store.put_snapshot(Snapshot(run_id="run-a", seq=2, version=1, state=b"t"))
        assert 3_500_000 < await self.pttl(keys.snap("run-a")) <= 3_600_000
        await store.append("run-a", [step_done("run-a", 9)])
        assert all(ttl > 0 for ttl in [await self.pttl(k) for k in run_keys])
        await store.append("run-a", [envelope("run-a", "retry", RunRetryRequested())])
        assert [await self.pttl(k) for k in run_keys] == [-1, -1, -1]
        await store.close()

    async def test_expired_runs_leave_the_run_index(self, redis_store: RedisStore) -> None:
        store = redis_store
        keys = keys_of(store)
        await store.append("run-a", [submitted("run-a")])
        await store.append("run-b", [submitted("run-b")])
        await self.redis("DEL", keys.head("run-a"), keys.run("run-a"))
        assert await store.list_runs() == ["run-b"]
        index = keys.runs(keys.partition("run-a"))
        assert await self.redis("ZSCORE", index, "run-a") is None

    async def test_append_many_sends_one_script_call_per_partition_and_no_script_checks(
        self,
    ) -> None:
        store = await self.open_redis(StoreConfig(partitions=4))
        await store.ping()
        evalsha, exists = await self.stat_calls("evalsha"), await self.stat_calls("script|exists")
        runs = [f"run-{n}" for n in range(RUNS_PER_CALL + 8)]
        requests = [
            AppendRequest(run_id=run_id, events=[step_done(run_id, k) for k in (1, 2)])
            for run_id in runs
        ]
        results = await store.append_many(requests)
        assert [[r.seq for r in batch] for batch in results] == [[1, 2]] * len(runs)
        per_partition = Counter(keys_of(store).partition(run_id) for run_id in runs)
        calls = sum(-(-count // RUNS_PER_CALL) for count in per_partition.values())
        assert await self.stat_calls("evalsha") - evalsha == calls
        assert await self.stat_calls("script|exists") == exists
        await store.close()

    async def test_runs_in_one_script_call_are_checked_and_written_each_on_its_own(
        self,
    ) -> None:
        store = await self.open_redis(StoreConfig(partitions=1))
        await store.append("run-a", [submitted("run-a")])
        await store.append("run-b", [submitted("run-b")])
        results = await store.append_many(
            [
                AppendRequest(run_id="run-a", events=[step_done("run-a", 1)], expected_seq=0),
                AppendRequest(run_id="run-b", events=[step_done("run-b", 1)], expected_seq=1),
                AppendRequest(run_id="run-c", events=[submitted("run-c"), step_done("run-c", 1)]),
                AppendRequest(run_id="run-a", events=[submitted("run-a")]),
            ]
        )
        assert [outcomes(batch) for batch in results] == [
            [(Outcome.CONFLICT, 0)],
            [(Outcome.APPENDED, 2)],
            [(Outcome.APPENDED, 1), (Outcome.APPENDED, 2)],
            [(Outcome.DUPLICATE, 1)],
        ]
        assert results[0][0].current_seq == 1
        assert [len(await history(store, run)) for run in ("run-a", "run-b", "run-c")] == [1, 2, 2]
        await store.close()

    async def test_lost_script_cache_is_reloaded(self) -> None:
        store = await self.open_redis(StoreConfig(partitions=2, claim_idle_ms=0))
        await store.append("run-a", [step_done("run-a", 1)])
        await self.redis("SCRIPT", "FLUSH")
        [single] = await store.append("run-a", [step_done("run-a", 2)])
        await self.redis("SCRIPT", "FLUSH")
        [[many]] = await store.append_many(
            [AppendRequest(run_id="run-a", events=[step_done("run-a", 3)])]
        )
        assert (single.seq, many.seq) == (2, 3)
        first = await store.subscribe("workers", "c1")
        taken = await first.fetch(block_ms=0)
        await self.redis("SCRIPT", "FLUSH")
        second = await store.subscribe("workers", "c2")
        claimed = await second.fetch(block_ms=0)
        assert sorted((d.entry_id, d.deliveries) for d in claimed) == sorted(
            (d.entry_id, 2) for d in taken
        )
        await store.close()

    async def test_blocked_fetch_does_not_hold_up_other_commands(self) -> None:
        store = await self.open_redis()
        subscription = await store.subscribe("workers", "c1")
        got: list[Delivery] = []
        fetched = anyio.Event()

        async def wait_for_entries() -> None:
            got.extend(await subscription.fetch(block_ms=60_000))
            fetched.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_entries)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(5):
                for n in range(1, 21):
                    await store.ping()
                    await store.head("run-a")
                    await store.schedule_timer(Timer(run_id="run-a", timer_id=f"t{n}", due_ms=n))
                assert not fetched.is_set()
                await store.append("run-a", [step_done("run-a", 1)])
                await fetched.wait()
        assert [d.envelope.event_id for d in got] == ["run-a-1"]
        await store.close()

    async def test_read_ahead_of_a_multi_feed_read_is_handed_out_later(self) -> None:
        store = await self.open_redis()
        runs = [f"run-{n}" for n in range(8)]
        assert len({keys_of(store).partition(r) for r in runs}) > 1
        for run_id in runs:
            await store.append(run_id, [step_done(run_id, k) for k in (1, 2, 3)])
        subscription = await store.subscribe("workers", "c1")
        handed: list[Delivery] = []
        while batch := await subscription.fetch(max_count=2, block_ms=0):
            assert len(batch) <= 2
            handed += batch
        assert sorted(d.envelope.event_id for d in handed) == sorted(
            f"{r}-{k}" for r in runs for k in (1, 2, 3)
        )
        assert {d.deliveries for d in handed} == {1}
        await subscription.ack(handed)
        assert sum(i.pending for i in await store.group_info()) == 0
        await store.close()

    async def test_lag_is_counted_when_redis_cannot_tell(self) -> None:
        store = await self.open_redis(StoreConfig(partitions=1))
        subscription = await store.subscribe("workers", "c1")
        results = await store.append("run-a", [step_done("run-a", n) for n in range(1, 6)])
        feed = keys_of(store).feed(0)
        await self.redis("XGROUP", "SETID", feed, "workers", results[1].entry_id)
        [raw_info] = await self.redis("XINFO", "GROUPS", feed)
        assert pairs(raw_info)[b"lag"] is None
        [info] = await store.group_info()
        assert (info.pending, info.lag) == (0, 3)
        assert [d.envelope.seq for d in await subscription.fetch(block_ms=0)] == [3, 4, 5]
        await store.close()

    async def test_due_timers_leases_only_what_it_returns(self) -> None:
        store = await self.open_redis()
        runs = [f"run-{n}" for n in range(6)]
        assert len({keys_of(store).partition(r) for r in runs}) > 1
        for n, run_id in enumerate(runs):
            await store.schedule_timer(Timer(run_id=run_id, timer_id="t", due_ms=100 + n))
        first = await store.due_timers(1000, limit=2, lease_ms=60_000)
        rest = await store.due_timers(1000, limit=10, lease_ms=60_000)
        assert [t.run_id for t in first] == runs[:2]
        assert [(t.run_id, t.due_ms) for t in rest] == [(r, 100 + n) for n, r in enumerate(runs)][
            2:
        ]
        assert await store.due_timers(FAR_FUTURE_MS, limit=0) == []
        await store.close()

    async def test_client_speaking_resp3_with_decoding_is_accepted(self) -> None:
        client = aioredis.Redis.from_url(self.server.url, protocol=3, decode_responses=True)
        store = RedisStore(client, isolated(StoreConfig(partitions=2)))
        event = step_done("run-a", 1)
        await store.append("run-a", [event])
        assert await history(store, "run-a") == [stored(event, 1)]
        subscription = await store.subscribe("workers", "c1")
        [delivery] = await subscription.fetch(block_ms=0)
        assert delivery.envelope == stored(event, 1)
        await store.close()
        assert await client.ping()
        await client.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_run_commands_reads_every_reply_and_raises_the_first_error(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    key = f"run-commands-{uuid.uuid4().hex}"
    assert await run_commands(client, [["SET", key, 1], ["INCRBY", key, 41], ["GET", key]]) == [
        b"OK",
        42,
        b"42",
    ]
    # The error comes after every reply is read: the commands after it ran, and the
    # connection goes back to the pool in step with the server.
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await run_commands(client, [["LPUSH", key, "x"], ["INCR", key], ["HGET", key, "f"]])
    assert await run_commands(client, [["GET", key], ["DEL", key]]) == [b"43", 1]
    await client.aclose()


async def blocked_reader(admin: aioredis.Redis, timeout_s: float = 10) -> int:
    """The id of the client blocked in XREADGROUP, once there is one (polled)."""
    with anyio.fail_after(timeout_s):
        while True:
            for line in (await command(admin, "CLIENT", "LIST")).decode().splitlines():
                fields = dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
                if fields.get("cmd") == "xreadgroup" and "b" in fields.get("flags", ""):
                    return int(fields["id"])
            await anyio.sleep(0.01)


@pytest.mark.redis
@pytest.mark.anyio
async def test_run_commands_retries_a_read_whose_connection_was_dropped(
    redis_server: RedisServer,
) -> None:
    client = client_from_url(redis_server.url)
    admin = admin_client(redis_server.url)
    stream = f"retried-{uuid.uuid4().hex}"
    await command(admin, "XGROUP", "CREATE", stream, "g", "0", "MKSTREAM")
    read: list[Arg] = ["XREADGROUP", "GROUP", "g", "c", "BLOCK", 30_000, "STREAMS", stream, ">"]
    replies: list[Any] = []

    async def reader() -> None:
        replies.extend(await run_commands(client, [read]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await command(admin, "CLIENT", "KILL", "ID", await blocked_reader(admin))
        entry_id = await command(admin, "XADD", stream, "*", "f", "v")
    # The read went out again on a new connection and got the entry.
    assert replies == [[[stream.encode(), [[entry_id, [b"f", b"v"]]]]]]
    await admin.aclose()
    await client.aclose()


def test_redact_url_hides_the_password_only() -> None:
    assert redact_url("redis://alice:s3cret@db:6380/2") == "redis://alice:***@db:6380/2"
    assert redact_url("rediss://:s3cret@db/0") == "rediss://:***@db/0"
    assert redact_url("redis://db:6379/0") == "redis://db:6379/0"


async def add_user(server: RedisServer) -> None:
    """The ACL user ``flowlog`` (ACL users live in memory: a restart forgets them)."""
    admin = aioredis.Redis.from_url(server.url)
    await admin.acl_setuser(
        "flowlog", enabled=True, passwords=["+s3cret-pw"], keys=["*"], commands=["+@all"]
    )
    await admin.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_outage_raises_store_unavailable_without_the_password(
    durable_redis_server: RedisServer,
) -> None:
    server = durable_redis_server
    await add_user(server)
    url = f"redis://flowlog:s3cret-pw@127.0.0.1:{server.port}/0"
    store = RedisStore.from_url(url, isolated(StoreConfig(partitions=2)))
    assert store.url == f"redis://flowlog:***@127.0.0.1:{server.port}/0"
    await store.append("run-a", [step_done("run-a", 1)])
    server.kill()
    with anyio.fail_after(20), pytest.raises(StoreUnavailable) as raised:
        await store.ping()
    with anyio.fail_after(20), pytest.raises(StoreUnavailable) as raised_on_append:
        await store.append("run-a", [step_done("run-a", 2)])
    for message in (str(raised.value), str(raised_on_append.value)):
        assert store.url in message
        assert "s3cret" not in message
    server.restart()
    await add_user(server)
    with anyio.fail_after(20):
        [result] = await store.append("run-a", [step_done("run-a", 2)])
    assert (result.outcome, result.seq) == (Outcome.APPENDED, 2)
    await store.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_appends_survive_a_server_crash_with_fsync_always(
    durable_redis_server: RedisServer,
) -> None:
    server = durable_redis_server
    config = isolated(StoreConfig(partitions=2))
    store = RedisStore.from_url(server.url, config)
    events = [step_done("run-a", n) for n in range(1, 6)]
    await store.append("run-a", events[:3])
    await store.append("run-a", events[3:], expected_seq=3)
    await store.close()
    server.kill()
    server.restart()
    reopened = RedisStore.from_url(server.url, config)
    assert await history(reopened, "run-a") == [stored(e, n) for n, e in enumerate(events, 1)]
    again = await reopened.append("run-a", events[:1])
    assert [(r.outcome, r.seq) for r in again] == [(Outcome.DUPLICATE, 1)]
    await reopened.close()


def test_run_keys_are_the_keys_of_the_run() -> None:
    keys = Keys("flowlog", 16)
    for run_id in ("run-a", "run-b", "ünïcode-run"):
        run = keys.for_run(run_id)
        partition = keys.partition(run_id)
        assert (run.partition, run.run, run.head, run.snap, run.feed, run.runs) == (
            partition,
            keys.run(run_id),
            keys.head(run_id),
            keys.snap(run_id),
            keys.feed(partition),
            keys.runs(partition),
        )
        assert run.dedup("event-1") == keys.dedup(run_id, "event-1")
        assert (run.queues, run.work("gpu")) == (
            keys.queues(partition),
            keys.work(partition, "gpu"),
        )


@pytest.mark.redis
def test_benchmarks_compare_rates_and_leave_no_keys(redis_server: RedisServer) -> None:
    appended = bench_append(redis_server.url, 1000, 100, events_per_append=5)
    replayed = bench_replay(redis_server.url, 1000, 100)
    for result in (appended, replayed):
        assert result["store_events_per_s"] > 0
        assert result["baseline_events_per_s"] > 0
        assert result["ratio"] == pytest.approx(
            result["store_events_per_s"] / result["baseline_events_per_s"], rel=0.01
        )
        assert result["redis"] == "given"
    assert appended["events"] == replayed["events"] == 1000
    leftovers = redis.Redis.from_url(redis_server.url)
    assert list(leftovers.scan_iter(match="*flowlog-bench-*")) == []
    leftovers.close()
