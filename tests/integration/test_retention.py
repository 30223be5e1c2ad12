"""Feed retention: archive what is about to go, then trim below the horizon but never past
what a consumer group has not read; on the in-memory store with an injected clock, on a real
Redis with explicit times, and as ``flowlog retention run``."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from support.processes import REPO
from support.redis_server import RedisServer, admin_client, isolated

from eventstore.events import Envelope, StepSucceeded
from eventstore.keys import Keys
from eventstore.memory import MemoryStore
from eventstore.redis_conn import command
from eventstore.redis_store import RedisStore
from eventstore.store import EventStore, StoreConfig
from services.export import read_export
from services.observability.prometheus import ProcessMetrics
from services.retention import ArchiveError, run_retention

pytestmark = pytest.mark.anyio

DAY_MS = 24 * 3600 * 1000
CONFIG = StoreConfig(partitions=2, retention_ms=DAY_MS)
START_MS = 1_700_000_000_000


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now_ms = START_MS

    def __call__(self) -> int:
        return self.now_ms


def done(run_id: str, n: int) -> Envelope:
    data = StepSucceeded(step=f"s{n}", attempt=1, agent="echo", output=n)
    return Envelope(
        event_id=f"{run_id}-{n}", run_id=run_id, ts=START_MS + n, producer="t", data=data
    )


async def read_some(store: EventStore, group: str, count: int) -> None:
    """``group`` reads (and acknowledges) ``count`` entries across the feeds."""
    subscription = await store.subscribe(group, "c1")
    try:
        got = await subscription.fetch(max_count=count, block_ms=0)
        assert len(got) == count
        await subscription.ack(got)
    finally:
        await subscription.close()


def trimmed_counter(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value("flowlog_feed_trimmed_entries_total")
    assert value is not None
    return value


async def test_memory_trims_past_the_horizon_only_what_every_group_has_read(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = MemoryStore(CONFIG, clock_ms=clock)
    try:
        await store.append("run-a", [done("run-a", n) for n in range(1, 6)])
        await read_some(store, "fast", 5)
        await read_some(store, "slow", 2)
        registry = CollectorRegistry()
        metrics = ProcessMetrics(registry)

        early = await run_retention(store, now_ms=clock(), archive_dir=tmp_path, metrics=metrics)
        assert sum(early.trim.trimmed.values()) == 0
        assert early.archived == {}

        clock.now_ms += DAY_MS + 1
        dry = await run_retention(store, now_ms=clock(), dry_run=True, metrics=metrics)
        assert sum(dry.trim.trimmed.values()) == 2
        assert trimmed_counter(registry) == 0

        report = await run_retention(
            store, now_ms=clock(), archive_dir=tmp_path, compress=True, metrics=metrics
        )
        assert report.horizon_ms == clock() - DAY_MS
        assert sum(report.trim.trimmed.values()) == 2
        assert trimmed_counter(registry) == 2
        [(partition, file)] = report.archived.items()
        assert file == str(tmp_path / f"feed-p{partition}-{report.horizon_ms}.jsonl.gz")
        assert [e.event_id for e in read_export(Path(file))] == ["run-a-1", "run-a-2"]
        assert report.archived_events == 2

        await read_some(store, "slow", 3)
        final = await run_retention(store, now_ms=clock(), metrics=metrics)
        assert sum(final.trim.trimmed.values()) == 3
        assert trimmed_counter(registry) == 5
        history = [e.seq async for e in store.read_run("run-a")]
        assert history == [1, 2, 3, 4, 5]
    finally:
        await store.close()


async def test_an_archive_that_cannot_be_written_trims_nothing_and_says_where(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = MemoryStore(CONFIG, clock_ms=clock)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the archive folder should be")
    try:
        await store.append("run-a", [done("run-a", n) for n in range(1, 6)])
        await read_some(store, "fast", 5)
        clock.now_ms += DAY_MS + 1
        with pytest.raises(ArchiveError, match=r"cannot write the feed archive .*not-a-folder"):
            await run_retention(store, now_ms=clock(), archive_dir=blocked)
        report = await run_retention(store, now_ms=clock(), dry_run=True)
        assert sum(report.trim.trimmed.values()) == 5
    finally:
        await store.close()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, isolated(CONFIG))
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


@pytest.mark.redis
async def test_redis_keeps_what_a_group_has_not_read(
    redis_store: RedisStore, tmp_path: Path
) -> None:
    await redis_store.append("run-a", [done("run-a", n) for n in range(1, 6)])
    await read_some(redis_store, "fast", 5)
    await read_some(redis_store, "slow", 3)
    now = 2**42
    report = await run_retention(redis_store, now_ms=now, archive_dir=tmp_path)
    assert sum(report.trim.trimmed.values()) == 3
    [file] = report.archived.values()
    assert file.endswith(".jsonl")
    assert [e.event_id for e in read_export(Path(file))] == ["run-a-1", "run-a-2", "run-a-3"]
    assert sum((await run_retention(redis_store, now_ms=now)).trim.trimmed.values()) == 0
    before = await run_retention(redis_store, now_ms=START_MS)
    assert sum(before.trim.trimmed.values()) == 0


@pytest.mark.redis
async def test_cli_retention_run_dry_run_then_archive(
    redis_server: RedisServer, redis_store: RedisStore, tmp_path: Path
) -> None:
    await redis_store.append("run-a", [done("run-a", n) for n in range(1, 4)])
    await read_some(redis_store, "workers", 3)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLOG_")}
    env = {
        **clean,
        "FLOWLOG_REDIS_URL": redis_server.url,
        "FLOWLOG_STORE__PREFIX": redis_store.config.prefix,
        "FLOWLOG_STORE__PARTITIONS": "2",
        # A retention of 1 ms puts the horizon after every entry just written.
        "FLOWLOG_STORE__RETENTION_S": "0.001",
    }

    def flowlog(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    keys = Keys(redis_store.config.prefix, 2)
    feed = keys.feed(keys.partition("run-a"))
    dry = flowlog("retention", "run", "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    assert sum(json.loads(dry.stdout)["trim"]["trimmed"].values()) == 3
    people = flowlog("retention", "run", "--dry-run")
    assert "would trim 3 feed entries" in people.stdout
    archive = tmp_path / "archive"
    real = flowlog("retention", "run", "--archive", str(archive), "--gzip", "-o", "json")
    assert real.returncode == 0, real.stderr
    report = msgspec.json.decode(real.stdout)
    [file] = report["archived"].values()
    with gzip.open(file, "rt") as lines:
        assert [json.loads(line)["event_id"] for line in lines] == ["run-a-1", "run-a-2", "run-a-3"]
    assert report["archived_events"] == 3
    admin = admin_client(redis_server.url)
    try:
        assert await command(admin, "XLEN", feed) == 0
    finally:
        await admin.aclose()
