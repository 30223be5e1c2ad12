"""The ``fallback`` backend: a primary store (Redis) plus a local spool for facts.

:class:`FallbackStore` wraps an :class:`~eventstore.store.EventStore` and passes everything
through while the primary answers. When a *fact* append (no ``expected_seq``) fails with
:class:`~eventstore.errors.StoreUnavailable`, or the primary is known to be down, the batch is
written to the spool (:mod:`eventstore.spool`, fsync'd before the call returns) and kept in an
in-memory buffer, in order. Its events are acknowledged as ``appended`` with ``seq`` 0 (the
seq is unknown until the drain) and an ``entry_id`` of the form ``spool:<record>-<index>``
(see :func:`is_spooled`).

Rules:

* A *decision* (``expected_seq`` given) always goes to the primary and raises
  ``StoreUnavailable`` while it is down; it is never spooled.
* While the spool holds events of a run, later facts of that run are spooled too, even if the
  primary is back, so the run's events keep their order. A decision on such a run goes to the
  primary, which does not yet hold the spooled facts (the same as a decision racing a fact
  from another process).
* :meth:`FallbackStore.drain` pushes spooled records into the primary in spool order; a record
  leaves the spool (compaction) only after the primary confirmed it. A record drained twice
  (crash after the push, before compaction) comes back ``duplicate``, which is fine. Events
  the primary refuses for good (``mismatch``, or ``InvalidAppend``/``EventTooLarge`` after a
  config change) are written as JSON lines to ``<spool>.rejected`` and logged as errors;
  other errors leave the spool as it is for the next attempt.
* Reads, subscriptions, timers and snapshots pass through and raise ``StoreUnavailable``
  while the primary is down: spooled events are not readable until drained (no
  read-your-spooled-writes).
* A spool left by a killed process is loaded on construction and drained by the next drain.

Run the background drain with ``async with store:`` — it retries every ``retry_interval_ms``
while anything is spooled, and on exit tries a last drain (at most ``shutdown_drain_ms``)
before closing the store.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter, deque
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Final

import anyio
import anyio.to_thread
import msgspec
from anyio.abc import TaskGroup

from eventstore import codec
from eventstore.errors import (
    EventTooLarge,
    InvalidAppend,
    SpoolError,
    StoreClosed,
    StoreError,
    StoreUnavailable,
)
from eventstore.events import Envelope
from eventstore.spool import Spool, SpoolRecord
from eventstore.store import (
    AppendRequest,
    AppendResult,
    EventStore,
    Outcome,
)
from eventstore.wrapper import StoreWrapper

#: ``entry_id`` prefix of an event acknowledged from the spool (its seq is not known yet).
SPOOLED_ENTRY_PREFIX: Final = "spool:"

logger = logging.getLogger(__name__)


def is_spooled(result: AppendResult) -> bool:
    """Whether an append result acknowledges a spooled event (seq 0, not yet in the primary)."""
    return result.entry_id.startswith(SPOOLED_ENTRY_PREFIX)


class DrainReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one :meth:`FallbackStore.drain` did.

    ``records``: spool records confirmed and removed; ``appended``, ``duplicates`` and
    ``rejected`` count their events by outcome; ``remaining``: records still spooled.
    """

    records: int = 0
    appended: int = 0
    duplicates: int = 0
    rejected: int = 0
    remaining: int = 0


class FallbackStore(StoreWrapper):
    """An :class:`~eventstore.store.EventStore` that spools facts while ``primary`` is down.

    See the module docstring for the rules. ``drain_batch`` is how many spool records one
    pipelined push to the primary carries. Construction opens and loads the spool (blocking
    file I/O, once) and raises :class:`~eventstore.errors.SpoolError` if it cannot.
    """

    def __init__(
        self,
        primary: EventStore,
        spool_path: Path,
        *,
        retry_interval_ms: int = 1000,
        drain_batch: int = 100,
        shutdown_drain_ms: int = 5000,
    ) -> None:
        if drain_batch < 1:
            raise ValueError(f"drain_batch must be >= 1, got {drain_batch}")
        super().__init__(primary)
        self.primary = primary
        self.spool_path = spool_path
        self.rejected_path = spool_path.with_name(f"{spool_path.name}.rejected")
        self._retry_interval_s = retry_interval_ms / 1000
        self._drain_batch = drain_batch
        self._shutdown_drain_s = shutdown_drain_ms / 1000
        self._spool = Spool.open(spool_path)
        self._buffer: deque[SpoolRecord] = deque(self._spool.records)
        self._spooled_runs: Counter[str] = Counter(record.run_id for record in self._buffer)
        self._down = False
        self._closed = False
        self._spool_lock = anyio.Lock()
        self._drain_lock = anyio.Lock()
        self._task_group: TaskGroup | None = None
        self._drained = anyio.Event()
        if self._buffer:
            logger.info(
                "loaded spooled fact appends left by an earlier process",
                extra=self._counts(),
            )
        else:
            self._drained.set()

    # --- spool state -------------------------------------------------------------------------

    @property
    def spooled(self) -> tuple[SpoolRecord, ...]:
        """The records waiting in the spool, in drain order."""
        return tuple(self._buffer)

    async def wait_drained(self) -> None:
        """Return once nothing is spooled (at once if the spool is empty)."""
        while self._buffer:
            await self._drained.wait()

    def _counts(self) -> dict[str, object]:
        return {
            "spool_path": str(self.spool_path),
            "spooled_records": len(self._buffer),
            "spooled_events": sum(len(record.events) for record in self._buffer),
        }

    def _mark_down(self, exc: StoreUnavailable) -> None:
        if not self._down:
            self._down = True
            logger.warning(
                "primary store unavailable; spooling fact appends",
                extra={**self._counts(), "error": str(exc)},
            )

    # --- appends -----------------------------------------------------------------------------

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]:
        """Append to the primary; spool a fact when the primary is down or the run is spooled."""
        self._check_open()
        if expected_seq is not None or not events:
            return await self.primary.append(run_id, events, expected_seq)
        if not self._down and run_id not in self._spooled_runs:
            try:
                return await self.primary.append(run_id, events)
            except StoreClosed:
                raise
            except StoreUnavailable as exc:
                self._mark_down(exc)
        return await self._spool_append(run_id, events)

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        """Pipelined to the primary while it is up and none of the runs is spooled; else one
        :meth:`append` per request, in order.

        With the primary down, a batch holding a decision raises ``StoreUnavailable`` before
        anything is spooled. If the primary goes down in the middle of the per-request path,
        facts before the failing decision may already be spooled (a retry of the batch makes
        them duplicates, which the drain reports and drops).
        """
        self._check_open()
        has_decision = any(request.expected_seq is not None for request in requests)
        if not self._down and not any(r.run_id in self._spooled_runs for r in requests):
            try:
                return await self.primary.append_many(requests)
            except StoreClosed:
                raise
            except StoreUnavailable as exc:
                if has_decision:
                    raise
                self._mark_down(exc)
        if self._down and has_decision:
            raise StoreUnavailable("the primary store is down; decisions are not spooled")
        return [await self.append(r.run_id, r.events, r.expected_seq) for r in requests]

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the fallback store is closed")

    def _validate(self, run_id: str, events: Sequence[Envelope]) -> None:
        """The primary's checks, made before spooling (the drain must not find them later)."""
        codec.encode_append(run_id, events, None, self.config.max_event_bytes)

    async def _spool_append(self, run_id: str, events: Sequence[Envelope]) -> list[AppendResult]:
        self._validate(run_id, events)
        with anyio.CancelScope(shield=True):
            async with self._spool_lock:
                record = await anyio.to_thread.run_sync(self._spool.append, run_id, events)
                self._buffer.append(record)
                self._spooled_runs[run_id] += 1
                if self._drained.is_set():
                    self._drained = anyio.Event()
        return [
            AppendResult(
                event_id=event.event_id,
                outcome=Outcome.APPENDED,
                entry_id=f"{SPOOLED_ENTRY_PREFIX}{record.number}-{index}",
            )
            for index, event in enumerate(events)
        ]

    # --- drain -------------------------------------------------------------------------------

    async def drain(self) -> DrainReport:
        """Push every spooled record into the primary, in order, removing each once confirmed.

        Raises ``StoreUnavailable`` if the primary goes (or stays) down; what was confirmed
        until then has left the spool.
        """
        self._check_open()
        async with self._drain_lock:
            if self._down:
                try:
                    await self.primary.ping()
                except StoreUnavailable as exc:
                    self._mark_down(exc)
                    raise
                self._down = False
            report = DrainReport()
            try:
                while self._buffer:
                    chunk = list(itertools.islice(self._buffer, self._drain_batch))
                    try:
                        results = await self._push(chunk)
                    except StoreUnavailable as exc:
                        self._mark_down(exc)
                        raise
                    report = await self._confirm(chunk, results, report)
            finally:
                if report.records:
                    logger.info(
                        "drained spooled fact appends into the primary store",
                        extra={
                            **self._counts(),
                            "drained_records": report.records,
                            "drained_appended": report.appended,
                            "drained_duplicates": report.duplicates,
                            "drained_rejected": report.rejected,
                        },
                    )
            return msgspec.structs.replace(report, remaining=len(self._buffer))

    async def _push(self, chunk: Sequence[SpoolRecord]) -> list[list[AppendResult] | str]:
        """The primary's results per record, or the reason it refused a record outright.

        A refusal (``InvalidAppend``, ``EventTooLarge``: the primary's config changed since
        the record was spooled) is final; any other error is raised and the drain retried.
        """
        requests = [AppendRequest(run_id=r.run_id, events=r.events) for r in chunk]
        try:
            return list(await self.primary.append_many(requests))
        except (InvalidAppend, EventTooLarge):
            pass
        outcomes: list[list[AppendResult] | str] = []
        for record in chunk:
            try:
                outcomes.append(await self.primary.append(record.run_id, record.events))
            except (InvalidAppend, EventTooLarge) as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
        return outcomes

    async def _confirm(
        self,
        chunk: Sequence[SpoolRecord],
        results: Sequence[list[AppendResult] | str],
        report: DrainReport,
    ) -> DrainReport:
        appended = duplicates = 0
        rejected: list[tuple[Envelope, str]] = []
        for record, outcome in zip(chunk, results, strict=True):
            if isinstance(outcome, str):
                rejected.extend((event, outcome) for event in record.events)
                continue
            for event, result in zip(record.events, outcome, strict=True):
                if result.outcome is Outcome.APPENDED:
                    appended += 1
                elif result.outcome is Outcome.DUPLICATE:
                    duplicates += 1
                else:
                    rejected.append((event, f"{result.outcome.value} (seq {result.seq})"))
        with anyio.CancelScope(shield=True):
            if rejected:
                await anyio.to_thread.run_sync(self._write_rejected, rejected)
            async with self._spool_lock:
                keep = list(itertools.islice(self._buffer, len(chunk), None))
                await anyio.to_thread.run_sync(self._spool.compact, keep)
                for record in chunk:
                    self._buffer.popleft()
                    self._spooled_runs[record.run_id] -= 1
                    if not self._spooled_runs[record.run_id]:
                        del self._spooled_runs[record.run_id]
                if not self._buffer:
                    self._drained.set()
        return DrainReport(
            records=report.records + len(chunk),
            appended=report.appended + appended,
            duplicates=report.duplicates + duplicates,
            rejected=report.rejected + len(rejected),
        )

    def _write_rejected(self, rejected: Sequence[tuple[Envelope, str]]) -> None:
        for event, reason in rejected:
            logger.error(
                "the primary store refused a spooled event; kept in the rejected file",
                extra={
                    "event_id": event.event_id,
                    "run_id": event.run_id,
                    "reason": reason,
                    "rejected_path": str(self.rejected_path),
                },
            )
        try:
            with open(self.rejected_path, "ab") as file:
                file.write(b"".join(codec.to_json_line(event) for event, _ in rejected))
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise SpoolError(f"{self.rejected_path}: cannot write rejected events ({exc})") from exc

    # --- background drain --------------------------------------------------------------------

    async def __aenter__(self) -> FallbackStore:
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        task_group.start_soon(self._drain_loop)
        self._task_group = task_group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        try:
            if task_group is not None:
                task_group.cancel_scope.cancel()
                await task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.move_on_after(self._shutdown_drain_s), suppress(StoreUnavailable):
                        await self.drain()
                finally:
                    await self.close()

    async def _drain_loop(self) -> None:
        while True:
            if self._buffer or self._down:
                try:
                    await self.drain()
                except StoreUnavailable:
                    pass
                except StoreError as exc:
                    logger.warning(
                        "draining the spool failed; retrying",
                        extra={**self._counts(), "error": str(exc)},
                    )
            await anyio.sleep(self._retry_interval_s)

    # --- pass-through (StoreWrapper): reads, groups, timers and snapshots need the primary,
    # and raise StoreUnavailable while it is down; spooled events are not visible until drained.

    async def close(self) -> None:
        """Close the spool (records stay on disk for the next process) and the primary."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with self._spool_lock:
                self._spool.close()
            await self.primary.close()
