"""``flowlog bench append|replay``: the redis event store against plain redis-py.

Both sides start from the same envelopes of realistic runs (a submit, 16 steps scheduled,
started and succeeded, a completion: 50 events per run) and move them in round trips of
``batch`` events.

* append: the store's ``append_many`` (one append script per run batch of
  ``events_per_append`` events, default 5, all streamed in one round trip) against a redis-py
  pipeline of one ``XADD`` per event of the msgpack bytes to a stream per run. Both sides
  encode the envelopes inside the timed section.
* replay: the store's ``read_run`` of every run against redis-py ``XRANGE`` of the same run
  streams (pages of 1000) and a msgspec decode of each event.

``ratio`` is store / baseline events per second. Without a Redis URL a private redis-server
is started for the run; with one, every key the benchmark wrote is deleted afterwards.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, TypeVar, cast

import anyio
import msgspec
import redis.asyncio as aioredis

from eventstore import codec
from eventstore.errors import FlowlogError
from eventstore.events import (
    Envelope,
    EventData,
    RunCompleted,
    RunSubmitted,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.keys import Keys
from eventstore.redis_store import RedisStore
from eventstore.store import AppendRequest, StoreConfig
from services.bench.redis_launcher import RedisServer

RUN_LENGTH: Final = 50
_STEPS_PER_RUN: Final = (RUN_LENGTH - 2) // 3
_READ_PAGE: Final = 1000
_DECODER: Final = msgspec.msgpack.Decoder(Envelope)

T = TypeVar("T")


class BenchmarkInconsistent(FlowlogError):
    """The two sides of a benchmark did not handle the same events."""


def run_events(run_id: str, ts: int) -> list[Envelope]:
    """The 50 events of one finished run of 16 steps."""
    datas: list[EventData] = [
        RunSubmitted(workflow="bench", digest="0" * 64, definition="steps: []", inputs={"n": 1})
    ]
    for step in range(_STEPS_PER_RUN):
        name = f"step-{step:02d}"
        inputs = {"url": f"https://example.org/items/{step}", "retries": 3}
        datas += [
            StepScheduled(step=name, attempt=1, agent="http", inputs=inputs),
            StepStarted(step=name, attempt=1, agent="http", runner="runner-1"),
            StepSucceeded(
                step=name, attempt=1, agent="http", output={"status": 200, "items": [1, 2, 3]}
            ),
        ]
    datas.append(RunCompleted())
    return [
        Envelope(
            event_id=str(uuid.uuid4()),
            run_id=run_id,
            ts=ts + n,
            producer="bench/1",
            data=data,
            causation_id=f"{run_id}-{n - 1}" if n else "",
        )
        for n, data in enumerate(datas)
    ]


def waves(
    prefix: str, events: int, batch: int, events_per_append: int
) -> Iterator[list[list[AppendRequest]]]:
    """The appends of ``events // 50`` runs, wave after wave, in round trips of ``batch``.

    Runs advance side by side, as in a busy system: a round trip carries the next
    ``events_per_append`` events of each of ``batch // events_per_append`` runs; a wave is
    the round trips that take those runs from their first event to their last.
    """
    runs = max(1, events // RUN_LENGTH)
    per_trip = max(1, batch // events_per_append)
    now = time.time_ns() // 1_000_000
    for first in range(0, runs, per_trip):
        wave = [
            run_events(f"{prefix}-run-{n}", now) for n in range(first, min(runs, first + per_trip))
        ]
        yield [
            [
                AppendRequest(run_id=run[0].run_id, events=run[start : start + events_per_append])
                for run in wave
            ]
            for start in range(0, RUN_LENGTH, events_per_append)
        ]


def bench_append(
    redis_url: str | None, events: int, batch: int, *, events_per_append: int = 5
) -> dict[str, Any]:
    """Append throughput of the store against pipelined ``XADD`` (see the module doc)."""
    with _server(redis_url) as url:
        result = anyio.run(_bench_append, url, events, batch, events_per_append)
    return {**result, "redis": "given" if redis_url else "private"}


def bench_replay(redis_url: str | None, events: int, batch: int) -> dict[str, Any]:
    """Replay throughput of ``read_run`` against ``XRANGE`` + decode (see the module doc)."""
    with _server(redis_url) as url:
        result = anyio.run(_bench_replay, url, events, batch)
    return {**result, "redis": "given" if redis_url else "private"}


async def _bench_append(
    url: str, events: int, batch: int, events_per_append: int
) -> dict[str, Any]:
    async with _session(url) as (store, client, prefix):
        for warmup in waves(f"{prefix}-warm", RUN_LENGTH, batch, events_per_append):
            for trip in warmup:
                await store.append_many(trip)
                await _xadd_trip(client, prefix, trip)
        total = 0

        async def store_part(wave: Sequence[list[AppendRequest]]) -> None:
            nonlocal total
            for trip in wave:
                await store.append_many(trip)
                total += sum(len(request.events) for request in trip)

        async def baseline_part(wave: Sequence[list[AppendRequest]]) -> None:
            for trip in wave:
                await _xadd_trip(client, prefix, trip)

        store_s, baseline_s = await _interleaved(
            waves(prefix, events, batch, events_per_append), store_part, baseline_part
        )
    return _report(total, store_s, baseline_s, batch=batch, events_per_append=events_per_append)


async def _xadd_trip(client: aioredis.Redis, prefix: str, trip: Sequence[AppendRequest]) -> None:
    pipe = client.pipeline(transaction=False)
    for request in trip:
        key = f"{prefix}:baseline:{request.run_id}"
        for event in request.events:
            pipe.xadd(key, {"e": codec.encode(event)})
    await pipe.execute()


async def _bench_replay(url: str, events: int, batch: int) -> dict[str, Any]:
    async with _session(url) as (store, client, prefix):
        for wave in waves(prefix, events, batch, RUN_LENGTH):
            for trip in wave:
                await store.append_many(trip)
        keys = Keys(store.config.prefix, store.config.partitions)
        run_ids = await store.list_runs()
        counts = {"store": 0, "baseline": 0}

        async def store_part(part: Sequence[str]) -> None:
            for run_id in part:
                async for _ in store.read_run(run_id):
                    counts["store"] += 1

        async def baseline_part(part: Sequence[str]) -> None:
            for run_id in part:
                counts["baseline"] += await _xrange_decode(client, keys.run(run_id))

        await store_part(run_ids[:1])
        await baseline_part(run_ids[:1])
        counts.update(store=0, baseline=0)
        size = max(1, batch // RUN_LENGTH)
        parts = (run_ids[start : start + size] for start in range(0, len(run_ids), size))
        store_s, baseline_s = await _interleaved(parts, store_part, baseline_part)
    if counts["store"] != counts["baseline"]:
        raise BenchmarkInconsistent(
            f"the store replayed {counts['store']} events, XRANGE {counts['baseline']}"
        )
    return _report(counts["store"], store_s, baseline_s, batch=batch)


async def _xrange_decode(client: aioredis.Redis, stream: str) -> int:
    count = 0
    start = "-"
    while True:
        page = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            await client.xrange(stream, start, "+", count=_READ_PAGE),
        )
        for _, fields in page:
            _DECODER.decode(fields[b"e"])
            count += 1
        if len(page) < _READ_PAGE:
            return count
        start = "(" + page[-1][0].decode()


async def _interleaved(
    parts: Iterable[T],
    store_part: Callable[[T], Awaitable[None]],
    baseline_part: Callable[[T], Awaitable[None]],
) -> tuple[float, float]:
    """Seconds each side spends on every part, the two taking turns going first, so that
    both see the same machine (other processes come and go). Parts are built outside the
    timed sections, and the collector leaves them alone while the clock runs."""
    elapsed = {"store": 0.0, "baseline": 0.0}
    for n, part in enumerate(parts):
        order = [("store", store_part), ("baseline", baseline_part)]
        gc.freeze()
        try:
            for side, run in order if n % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                await run(part)
                elapsed[side] += time.perf_counter() - started
        finally:
            gc.unfreeze()
    return elapsed["store"], elapsed["baseline"]


def _report(events: int, store_s: float, baseline_s: float, **details: Any) -> dict[str, Any]:
    store_rate = events / store_s
    baseline_rate = events / baseline_s
    return {
        "store_events_per_s": round(store_rate),
        "baseline_events_per_s": round(baseline_rate),
        "ratio": round(store_rate / baseline_rate, 3),
        "events": events,
        "store_seconds": round(store_s, 3),
        "baseline_seconds": round(baseline_s, 3),
        **details,
    }


@contextmanager
def _server(redis_url: str | None) -> Iterator[str]:
    if redis_url is not None:
        yield redis_url
        return
    with RedisServer() as server:
        yield server.url


@asynccontextmanager
async def _session(url: str) -> AsyncIterator[tuple[RedisStore, aioredis.Redis, str]]:
    """A store and a plain client on a fresh key prefix; the prefix's keys go afterwards."""
    prefix = f"flowlog-bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(url, StoreConfig(prefix=prefix))
    client = aioredis.Redis.from_url(url, protocol=2)
    try:
        yield store, client, prefix
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
            async for keys in _batched(client.scan_iter(match=f"*{prefix}*", count=1000)):
                await client.unlink(*keys)
            await client.aclose()


async def _batched(keys: AsyncIterator[bytes], size: int = 500) -> AsyncIterator[list[bytes]]:
    chunk: list[bytes] = []
    async for key in keys:
        chunk.append(key)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
