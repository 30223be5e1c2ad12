"""A private redis-server for tests, and fixtures that hand out isolated redis stores.

Tests never use a shared Redis: the session starts its own server on a free port in a temp
dir. Every store gets a fresh key prefix, so tests do not see each other's keys and nothing is
ever flushed.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from eventstore.keys import Keys
from eventstore.redis_conn import command
from eventstore.redis_store import RedisStore
from eventstore.store import StoreConfig
from services.bench.redis_launcher import RedisLaunchFailed, RedisServer

__all__ = [
    "RedisLaunchFailed",
    "RedisServer",
    "admin_client",
    "age_pending",
    "durable_redis_server",
    "isolated",
    "redis_server",
    "redis_store",
]


def isolated(config: StoreConfig) -> StoreConfig:
    """``config`` with a key prefix no other test uses."""
    return msgspec.structs.replace(config, prefix=f"t{uuid.uuid4().hex[:12]}")


def admin_client(url: str) -> aioredis.Redis:
    """A client whose replies come back as the server sent them (RESP2, bytes)."""
    client = aioredis.Redis.from_url(url, protocol=2)
    client.response_callbacks = {}
    return client


def _pairs(flat: Sequence[Any]) -> dict[bytes, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def age_pending(admin: aioredis.Redis, keys: Keys, ms: int) -> None:
    """Make every pending entry of every group on every feed and work stream ``ms`` more idle,
    keeping its owner and delivery count (``XCLAIM ... IDLE ... JUSTID`` to the owner)."""
    for partition in range(keys.partitions):
        queues = await command(admin, "SMEMBERS", keys.queues(partition))
        for stream in [keys.feed(partition), *(keys.work(partition, q.decode()) for q in queues)]:
            if not await command(admin, "EXISTS", stream):
                continue
            for group in await command(admin, "XINFO", "GROUPS", stream):
                name = _pairs(group)[b"name"]
                pending = await command(admin, "XPENDING", stream, name, "-", "+", 100_000)
                for entry_id, owner, idle, _ in pending:
                    await command(
                        admin, "XCLAIM", stream, name, owner, 0, entry_id,
                        "IDLE", idle + ms, "JUSTID",
                    )  # fmt: skip


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests that kill a server start their own)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A store on the session server with a unique key prefix and 4 partitions."""
    store = RedisStore.from_url(redis_server.url, isolated(StoreConfig(partitions=4)))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def durable_redis_server() -> Iterator[RedisServer]:
    """A private server for one test, with every write fsync'd to the AOF before it is
    acknowledged: the test may kill and restart it."""
    with RedisServer(appendonly=True, fsync_always=True) as server:
        yield server
