"""Export of run histories to JSON lines, and import of them back through the append path.

Format: one envelope per line (:func:`eventstore.codec.to_json_line`: stable field order,
schema version ``v``, ``seq`` filled in), each run's events together and in seq order. A file
whose name ends in ``.gz`` is gzip-compressed; reading also recognises gzip by its magic bytes.

Import appends each run's events in file order, so the target store assigns seqs 1, 2, ... in
that order. Per run:

* a run the target does not hold is appended whole (in batches, each with the expected seq, so
  a writer racing the import makes the run ``refused`` rather than interleaved);
* a run the target holds whose history is a prefix of the file's (same event ids, same order)
  gets the rest appended; events already there count as ``duplicate`` (so importing a file
  twice adds nothing, also after the dedup window);
* a run whose stored history differs from the file's is ``refused`` and left untouched.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Protocol

import msgspec

from eventstore import codec
from eventstore.errors import FlowlogError
from eventstore.events import Envelope
from eventstore.store import EventStore, Outcome

_GZIP_MAGIC: Final = b"\x1f\x8b"
_BATCH: Final = 500


class ExportUnreadable(FlowlogError):
    """An export file cannot be read, or a line of it is not an event."""


class ImportReport(msgspec.Struct, kw_only=True):
    """What an import did: events appended and already present, runs refused (with why)."""

    runs: int = 0
    appended: int = 0
    duplicate: int = 0
    refused: dict[str, str] = {}


class Lines(Protocol):
    """A binary file of lines, plain or gzip."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...

    def __iter__(self) -> Iterator[bytes]: ...


@contextmanager
def open_lines(path: Path, mode: str, *, compress: bool) -> Iterator[Lines]:
    """``path`` opened in binary ``mode`` ("rb", "wb", "ab"), through gzip when ``compress``."""
    with path.open(mode) as raw:
        if compress:
            with gzip.GzipFile(fileobj=raw, mode=mode, mtime=0) as zipped:
                yield zipped
        else:
            yield raw


async def write_export(path: Path, events: AsyncIterator[Envelope]) -> int:
    """Write ``events`` to ``path`` as JSON lines (gzip for ``.gz``); the count written."""
    count = 0
    with open_lines(path, "wb", compress=path.suffix == ".gz") as out:
        async for event in events:
            out.write(codec.to_json_line(event))
            count += 1
    return count


async def run_events(
    store: EventStore, run_ids: Iterable[str], *, since_ms: int | None = None
) -> AsyncIterator[Envelope]:
    """Every event of each run, in seq order; with ``since_ms`` only runs whose first event
    (the submission) is at or after it, always whole."""
    for run_id in run_ids:
        events = store.read_run(run_id)
        first = await anext(aiter(events), None)
        if first is None or (since_ms is not None and first.ts < since_ms):
            continue
        yield first
        async for event in events:
            yield event


def read_export(path: Path) -> Iterator[Envelope]:
    """The events of an export file, in file order (upcast to the current schema)."""
    try:
        with path.open("rb") as raw:
            zipped = raw.read(2) == _GZIP_MAGIC
        with open_lines(path, "rb", compress=zipped) as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield codec.from_json_line(line, where=f"{path}:{number}")
    except (OSError, EOFError) as exc:
        raise ExportUnreadable(f"{path}: {exc}") from exc


def events_by_run(events: Iterable[Envelope]) -> dict[str, list[Envelope]]:
    """``events`` grouped by run, in order of first appearance, file order within a run."""
    runs: dict[str, list[Envelope]] = {}
    for event in events:
        runs.setdefault(event.run_id, []).append(event)
    return runs


async def import_events(store: EventStore, events: Iterable[Envelope]) -> ImportReport:
    """Append ``events`` run by run (see the module docstring); the report of what happened."""
    report = ImportReport()
    for run_id, history in events_by_run(events).items():
        report.runs += 1
        stored = [event.event_id async for event in store.read_run(run_id)]
        if stored != [event.event_id for event in history[: len(stored)]]:
            report.refused[run_id] = (
                f"the store holds {len(stored)} events of this run that are not the file's first"
            )
            continue
        report.duplicate += len(stored)
        refusal = await _append_run(store, run_id, history[len(stored) :], len(stored), report)
        if refusal:
            report.refused[run_id] = refusal
    return report


async def _append_run(
    store: EventStore, run_id: str, events: Sequence[Envelope], seq: int, report: ImportReport
) -> str:
    for start in range(0, len(events), _BATCH):
        batch = [msgspec.structs.replace(e, seq=0) for e in events[start : start + _BATCH]]
        results = await store.append(run_id, batch, expected_seq=seq)
        for result in results:
            if result.outcome is Outcome.APPENDED:
                report.appended += 1
                seq = result.seq
            elif result.outcome is Outcome.DUPLICATE:
                report.duplicate += 1
            else:
                return f"event {result.event_id}: {result.outcome.value} at seq {seq}"
    return ""
