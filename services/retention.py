"""Retention of the partition feeds: archive what is about to go, then trim.

Run streams, heads and snapshots of finished runs expire by themselves (``retention``), dedup
keys after ``dedup_ttl``; the feeds are trimmed here, below the retention horizon
(``now - retention``) but never past an entry some consumer group has not read or still has
pending (the store guarantees that). With an archive folder, the events about to be trimmed are
first written as JSON lines, one file per partition per retention pass
(``feed-p<partition>-<horizon ms>.jsonl``, ``.gz`` when compressed). Trims are counted in the
process metrics and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import msgspec

from eventstore import codec
from eventstore.errors import FlowlogError
from eventstore.events import Envelope
from eventstore.store import EventStore, TrimReport
from services.export import Lines, open_lines
from services.observability.prometheus import ProcessMetrics

log = logging.getLogger("flowlog.retention")


class RetentionReport(msgspec.Struct, frozen=True, kw_only=True):
    """One retention pass: the horizon, the store's trim report and the archive files."""

    horizon_ms: int
    trim: TrimReport
    archived: dict[int, str] = {}
    archived_events: int = 0


class ArchiveError(FlowlogError):
    """A feed archive file cannot be written (disk full, no permission...); nothing of that
    partition was trimmed."""


class FeedArchive:
    """The archive files of one retention pass, opened on first use, closed by :meth:`close`."""

    def __init__(self, folder: Path, horizon_ms: int, *, compress: bool = False) -> None:
        self.folder = folder
        self.horizon_ms = horizon_ms
        self.compress = compress
        self.files: dict[int, str] = {}
        self.events = 0
        self._open: dict[int, Lines] = {}
        self._stack = ExitStack()

    async def __call__(self, partition: int, envelopes: Sequence[Envelope]) -> None:
        """The :data:`~eventstore.store.Archiver`: append ``envelopes`` to the partition's file.
        Raises :class:`ArchiveError` when the file cannot be written (the partition is then
        not trimmed)."""
        suffix = ".jsonl.gz" if self.compress else ".jsonl"
        path = self.folder / f"feed-p{partition}-{self.horizon_ms}{suffix}"
        try:
            out = self._open.get(partition)
            if out is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                out = self._stack.enter_context(open_lines(path, "ab", compress=self.compress))
                self._open[partition] = out
                self.files[partition] = str(path)
            for envelope in envelopes:
                out.write(codec.to_json_line(envelope))
            out.flush()
        except OSError as exc:
            raise ArchiveError(f"cannot write the feed archive {path}: {exc}") from exc
        self.events += len(envelopes)

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


async def run_retention(
    store: EventStore,
    *,
    now_ms: int,
    archive_dir: Path | None = None,
    compress: bool = False,
    dry_run: bool = False,
    metrics: ProcessMetrics | None = None,
) -> RetentionReport:
    """Archive (optionally) and trim every feed below ``now_ms - retention``."""
    horizon = now_ms - store.config.retention_ms
    archive = (
        FeedArchive(archive_dir, horizon, compress=compress)
        if archive_dir is not None and not dry_run
        else None
    )
    try:
        trim = await store.trim_feeds(horizon, dry_run=dry_run, archive=archive)
    finally:
        if archive is not None:
            archive.close()
    if metrics is not None:
        metrics.count_trim(trim)
    total = sum(trim.trimmed.values())
    work = sum(trim.work_trimmed.values())
    log.info(
        "feed retention %s %d entries below the horizon (and %d work stream entries)",
        "would trim" if dry_run else "trimmed",
        total,
        work,
        extra={"horizon_ms": horizon, "dry_run": dry_run, "trimmed": total, "work": work},
    )
    return RetentionReport(
        horizon_ms=horizon,
        trim=trim,
        archived=dict(archive.files) if archive is not None else {},
        archived_events=archive.events if archive is not None else 0,
    )
