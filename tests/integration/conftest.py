"""Fixtures for tests that run flowlog services as real processes against a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.processes import Cluster, cluster
from support.redis_server import RedisServer, redis_server

from eventstore.redis_store import RedisStore
from eventstore.store import StoreConfig

__all__ = ["redis_server"]


@pytest.fixture
def services(redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    """An empty cluster (no service started yet) with fast claim and heartbeat settings."""
    with cluster(
        redis_server.url,
        tmp_path,
        FLOWLOG_STORE__CLAIM_IDLE_S="1.5",
        FLOWLOG_CHECKPOINT__INTERVAL_S="0.5",
        FLOWLOG_RUNNER__HEARTBEAT_S="0.3",
    ) as c:
        yield c


@pytest.fixture
async def store(services: Cluster) -> AsyncIterator[RedisStore]:
    """A store client on the cluster's keys, for reading what the services wrote."""
    s = RedisStore.from_url(services.redis_url, StoreConfig(prefix=services.prefix, partitions=4))
    try:
        yield s
    finally:
        await s.close()
