"""A store wrapper that counts what a process does to the log, for its ``/metrics``.

Telemetry wraps the store instead of tangling with the services: every append's outcomes
(``flowlog_appends_total{outcome}``, where ``duplicate`` is a dedup hit), every trim
(``flowlog_feed_trimmed_entries_total``) and the timers found due at each poll
(``flowlog_timers_due``) are counted here; everything else passes straight through.
"""

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
from services.observability.prometheus import ProcessMetrics


class InstrumentedStore:
    """``store`` with its appends, trims and due timers counted in ``metrics``."""

    def __init__(self, store: EventStore, metrics: ProcessMetrics) -> None:
        self.inner = store
        self.metrics = metrics
        self.config: StoreConfig = store.config

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]:
        results = await self.inner.append(run_id, events, expected_seq)
        self.metrics.count_appends(results)
        return results

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        results = await self.inner.append_many(requests)
        for per_request in results:
            self.metrics.count_appends(per_request)
        return results

    def read_run(self, run_id: str, after_seq: int = 0) -> AsyncIterator[Envelope]:
        return self.inner.read_run(run_id, after_seq)

    def read_records(self, run_id: str) -> AsyncIterator[Record]:
        return self.inner.read_records(run_id)

    async def head(self, run_id: str) -> Head | None:
        return await self.inner.head(run_id)

    async def list_runs(self) -> list[str]:
        return await self.inner.list_runs()

    async def subscribe(self, group: str, consumer: str) -> Subscription:
        return await self.inner.subscribe(group, consumer)

    async def group_info(self) -> list[GroupInfo]:
        return await self.inner.group_info()

    async def dead_letters(self, partition: int | None = None) -> list[DeadLetter]:
        return await self.inner.dead_letters(partition)

    async def schedule_timer(self, timer: Timer) -> None:
        await self.inner.schedule_timer(timer)

    async def due_timers(
        self, now_ms: int, limit: int = 100, lease_ms: int = 30_000
    ) -> list[Timer]:
        due = await self.inner.due_timers(now_ms, limit, lease_ms)
        self.metrics.timers_due.set(len(due))
        return due

    async def cancel_timer(self, run_id: str, timer_id: str) -> None:
        await self.inner.cancel_timer(run_id, timer_id)

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        await self.inner.put_snapshot(snapshot)

    async def get_snapshot(self, run_id: str) -> Snapshot | None:
        return await self.inner.get_snapshot(run_id)

    async def trim_feeds(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        report = await self.inner.trim_feeds(horizon_ms, dry_run=dry_run, archive=archive)
        self.metrics.count_trim(report)
        return report

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
