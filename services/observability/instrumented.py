"""A store wrapper that counts what a process does to the log, for its ``/metrics``.

Telemetry wraps the store instead of tangling with the services: every append's outcomes
(``flowlog_appends_total{outcome}``, where ``duplicate`` is a dedup hit), every trim
(``flowlog_feed_trimmed_entries_total``) and the timers found due at each poll
(``flowlog_timers_due``) are counted here; everything else passes straight through.
"""

from __future__ import annotations

from collections.abc import Sequence

from eventstore.events import Envelope
from eventstore.store import AppendRequest, AppendResult, Archiver, EventStore, Timer, TrimReport
from eventstore.wrapper import StoreWrapper
from services.observability.prometheus import ProcessMetrics


class InstrumentedStore(StoreWrapper):
    """``inner`` with its appends, trims and due timers counted in ``metrics``."""

    def __init__(self, inner: EventStore, metrics: ProcessMetrics) -> None:
        super().__init__(inner)
        self.metrics = metrics

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]:
        results = await self.inner.append(run_id, events, expected_seq)
        self.metrics.count_appends(results)
        return results

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        results = await self.inner.append_many(requests)
        self.metrics.count_appends(result for per_request in results for result in per_request)
        return results

    async def due_timers(
        self, now_ms: int, limit: int = 100, lease_ms: int = 30_000
    ) -> list[Timer]:
        due = await self.inner.due_timers(now_ms, limit, lease_ms)
        self.metrics.timers_due.set(len(due))
        return due

    async def trim_feeds(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        report = await self.inner.trim_feeds(horizon_ms, dry_run=dry_run, archive=archive)
        self.metrics.count_trim(report)
        return report
