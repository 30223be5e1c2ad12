"""A store that forwards every call to another store; wrappers override what they change."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from eventstore.events import Envelope
from eventstore.store import (
    AppendRequest,
    AppendResult,
    Archiver,
    DeadLetter,
    EventStore,
    GroupInfo,
    Head,
    Record,
    Snapshot,
    StoreConfig,
    Subscription,
    Timer,
    TrimReport,
)


class StoreWrapper:
    """An :class:`~eventstore.store.EventStore` that passes everything to ``inner``."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.config: StoreConfig = inner.config

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]:
        return await self.inner.append(run_id, events, expected_seq)

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        return await self.inner.append_many(requests)

    def read_run(self, run_id: str, after_seq: int = 0) -> AsyncIterator[Envelope]:
        return self.inner.read_run(run_id, after_seq)

    def read_records(self, run_id: str) -> AsyncIterator[Record]:
        return self.inner.read_records(run_id)

    async def head(self, run_id: str) -> Head | None:
        return await self.inner.head(run_id)

    async def list_runs(self) -> list[str]:
        return await self.inner.list_runs()

    async def subscribe(
        self, group: str, consumer: str, *, queue: str | None = None
    ) -> Subscription:
        return await self.inner.subscribe(group, consumer, queue=queue)

    async def reset_group(self, group: str) -> None:
        await self.inner.reset_group(group)

    async def group_info(self) -> list[GroupInfo]:
        return await self.inner.group_info()

    async def dead_letters(self, partition: int | None = None) -> list[DeadLetter]:
        return await self.inner.dead_letters(partition)

    async def schedule_timer(self, timer: Timer) -> None:
        await self.inner.schedule_timer(timer)

    async def due_timers(
        self, now_ms: int, limit: int = 100, lease_ms: int = 30_000
    ) -> list[Timer]:
        return await self.inner.due_timers(now_ms, limit, lease_ms)

    async def cancel_timer(self, run_id: str, timer_id: str) -> None:
        await self.inner.cancel_timer(run_id, timer_id)

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        await self.inner.put_snapshot(snapshot)

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        await self.inner.put_snapshots(snapshots)

    async def get_snapshot(self, run_id: str) -> Snapshot | None:
        return await self.inner.get_snapshot(run_id)

    async def trim_feeds(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        return await self.inner.trim_feeds(horizon_ms, dry_run=dry_run, archive=archive)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
