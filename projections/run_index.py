"""The run index: a pure fold of every run's events into one small record per run, queried by
workflow, status and submission time.

``evolve_index(index, event)`` never changes ``index``. Records are kept in :data:`BUCKETS`
buckets by a stable hash of the run id, so an event copies one bucket, not the whole index.
Per run, an event whose seq is not above the record's is ignored (replays and redeliveries
change nothing). Statuses follow :mod:`projections.run_state`: a run paused before it started
resumes to ``submitted``; only a retry request changes a finished run. ``degraded`` is set by a
step skipped for a failure, cleared by a retry request, and ``run_completed`` has the last word.
Queries order by submission time, then run id.
"""

from __future__ import annotations

import zlib
from typing import Final

import msgspec

from eventstore.events import (
    Envelope,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunRetryRequested,
    RunStarted,
    RunSubmitted,
    StepSkipped,
)

BUCKETS: Final = 64
_TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})


class RunEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What the index knows about one run."""

    run_id: str
    workflow: str = ""
    status: str = "submitted"
    degraded: bool = False
    started: bool = False
    submitted_ms: int = 0
    updated_ms: int = 0
    seq: int = 0


def _empty_buckets() -> list[dict[str, RunEntry]]:
    return [{} for _ in range(BUCKETS)]


class RunIndex(msgspec.Struct, frozen=True, kw_only=True):
    """Every run's :class:`RunEntry`, bucketed by :func:`bucket_of` the run id."""

    buckets: list[dict[str, RunEntry]] = msgspec.field(default_factory=_empty_buckets)
    size: int = 0


def bucket_of(run_id: str) -> int:
    """The bucket of a run: crc32 of its id mod :data:`BUCKETS` (stable across processes)."""
    return zlib.crc32(run_id.encode()) % BUCKETS


def _apply(entry: RunEntry, event: Envelope) -> RunEntry:
    data = event.data
    status, finished = entry.status, entry.status in _TERMINAL
    changes: dict[str, object] = {"seq": event.seq, "updated_ms": event.ts}
    if isinstance(data, RunSubmitted) and not entry.workflow:
        changes.update(workflow=data.workflow, submitted_ms=event.ts)
    elif isinstance(data, RunStarted) and status == "submitted":
        changes.update(status="running", started=True)
    elif isinstance(data, RunPaused) and status in ("submitted", "running"):
        changes.update(status="paused")
    elif isinstance(data, RunResumed) and status == "paused":
        changes.update(status="running" if entry.started else "submitted")
    elif isinstance(data, RunCompleted) and not finished:
        changes.update(status="completed", degraded=data.degraded)
    elif isinstance(data, RunFailed) and not finished:
        changes.update(status="failed")
    elif isinstance(data, RunCancelled) and not finished:
        changes.update(status="cancelled")
    elif isinstance(data, RunRetryRequested) and finished:
        changes.update(status="running" if entry.started else "submitted", degraded=False)
    elif isinstance(data, StepSkipped) and data.error is not None and not finished:
        changes.update(degraded=True)
    return msgspec.structs.replace(entry, **changes)


def evolve_index(index: RunIndex, event: Envelope) -> RunIndex:
    """The index after ``event``."""
    number = bucket_of(event.run_id)
    bucket = index.buckets[number]
    entry = bucket.get(event.run_id)
    if entry is not None and event.seq <= entry.seq:
        return index
    new_bucket = dict(bucket)
    new_bucket[event.run_id] = _apply(entry or RunEntry(run_id=event.run_id), event)
    buckets = list(index.buckets)
    buckets[number] = new_bucket
    return RunIndex(buckets=buckets, size=index.size + (entry is None))


def get_run(index: RunIndex, run_id: str) -> RunEntry | None:
    """The record of ``run_id``, if the index has seen it."""
    return index.buckets[bucket_of(run_id)].get(run_id)


def query(
    index: RunIndex,
    *,
    workflow: str | None = None,
    status: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    newest_first: bool = False,
    limit: int | None = None,
) -> list[RunEntry]:
    """Runs matching every given filter, submitted in ``[since_ms, until_ms)``, ordered by
    submission time then run id (reversed with ``newest_first``), at most ``limit``."""
    found = [
        entry
        for bucket in index.buckets
        for entry in bucket.values()
        if (workflow is None or entry.workflow == workflow)
        and (status is None or entry.status == status)
        and (since_ms is None or entry.submitted_ms >= since_ms)
        and (until_ms is None or entry.submitted_ms < until_ms)
    ]
    found.sort(key=lambda entry: (entry.submitted_ms, entry.run_id), reverse=newest_first)
    return found if limit is None else found[:limit]


def count_by_status(index: RunIndex, *, workflow: str | None = None) -> dict[str, int]:
    """How many runs (of ``workflow``, if given) have each status, statuses sorted by name."""
    counts: dict[str, int] = {}
    for bucket in index.buckets:
        for entry in bucket.values():
            if workflow is None or entry.workflow == workflow:
                counts[entry.status] = counts.get(entry.status, 0) + 1
    return dict(sorted(counts.items()))
