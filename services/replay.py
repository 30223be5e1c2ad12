"""Replay of a run's recorded history, for audit.

* :func:`state_at` folds the history up to a seq or a time (``--as-of``);
* :func:`verify_run_state` rebuilds the state from the run's own stream and compares it with
  what the store keeps beside the stream: the head (seq, status, chain hash), the run index
  record and the latest snapshot (against the replayed state at the snapshot's seq); every
  disagreement is a :class:`Difference` (path, expected, found);
* :func:`first_divergence` replays the history against another definition: at each decision
  the scheduler recorded, ``decide(new_definition, state_before, now=event.ts)`` is compared
  with what was recorded, and the first difference is reported (a non-determinism check that
  reads as a report).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from eventstore import codec
from eventstore.audit import accepted_hash
from eventstore.errors import FlowlogError
from eventstore.events import Envelope, EventData
from eventstore.store import STATUS_BY_EVENT_TYPE, EventStore, Snapshot
from projections.metrics_model import MODEL_VERSION, MetricsModel, apply, encode_model
from projections.run_index import RunIndex, count_by_status, evolve_index, get_run
from projections.run_state import RunState, evolve
from services.metrics_projector import SNAPSHOT_ID as METRICS_SNAPSHOT_ID
from services.runs import snapshot_of, state_from_snapshot
from services.scheduler.decide import decide
from services.workflow.model import WorkflowDef

#: A plain number below this is a seq; at or above it, unix milliseconds (1973-03-03).
_MS_THRESHOLD: Final = 100_000_000_000
#: Producer name of the scheduler (``<service>:<instance>``): its events are decisions.
SCHEDULER_PREFIX: Final = "scheduler:"
#: Fields of a decision that must agree for it to be the same decision.
_DECISION_FIELDS: Final = (
    "step", "attempt", "item", "iteration", "agent", "inputs", "delay_s", "plan",
    "fallback_index", "reason", "degraded",
)  # fmt: skip


class InvalidAsOf(FlowlogError):
    """``--as-of`` is neither a seq, unix milliseconds nor an ISO-8601 time."""


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """One field that disagrees: where (a dotted path), the replayed value, the stored one."""

    path: str
    expected: Any
    found: Any


class Divergence(msgspec.Struct, frozen=True, kw_only=True):
    """The first recorded decision another definition would not make: the seq it was
    recorded at, what was recorded there and what the new definition decides instead."""

    seq: int
    recorded: list[dict[str, Any]]
    new: list[dict[str, Any]]


def parse_as_of(text: str) -> tuple[int | None, int | None]:
    """``(seq, None)`` or ``(None, unix ms)`` for an ``--as-of`` value."""
    if text.isdigit():
        value = int(text)
        return (value, None) if value < _MS_THRESHOLD else (None, value)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidAsOf(f"--as-of {text!r}: expected a seq, unix ms or ISO-8601") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return None, int(moment.timestamp() * 1000)


def history_until(
    events: Iterable[Envelope], *, seq: int | None = None, ts_ms: int | None = None
) -> list[Envelope]:
    """The events up to and including ``seq``, or with ``ts`` at or before ``ts_ms``."""
    chosen = []
    for event in events:
        if (seq is not None and event.seq > seq) or (ts_ms is not None and event.ts > ts_ms):
            break
        chosen.append(event)
    return chosen


def state_at(events: Iterable[Envelope]) -> RunState | None:
    """The state the events fold into (None for no events)."""
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def diff(expected: Any, found: Any, path: str = "") -> list[Difference]:
    """Every leaf where two plain values (``msgspec.to_builtins`` shapes) differ."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out: list[Difference] = []
        for key in [*expected, *(k for k in found if k not in expected)]:
            sub = f"{path}.{key}" if path else str(key)
            out += diff(expected.get(key), found.get(key), sub)
        return out
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        out = []
        for i, (a, b) in enumerate(zip(expected, found, strict=True)):
            out += diff(a, b, f"{path}[{i}]")
        return out
    return [] if expected == found else [Difference(path=path, expected=expected, found=found)]


async def verify_run_state(
    store: EventStore, run_id: str, events: Sequence[Envelope]
) -> tuple[RunState | None, list[Difference]]:
    """The state replayed from ``events`` (the run's stream) and every disagreement with the
    head, the run index record and the latest snapshot."""
    state = state_at(events)
    differences: list[Difference] = []
    head = await store.head(run_id)
    # Entries written by earlier builds may carry the earlier chain hash (see eventstore.audit).
    stored = {record.seq: record.hash async for record in store.read_records(run_id)}
    chain = status = ""
    legacy = True
    for event in events:
        raw = codec.encode(msgspec.structs.replace(event, seq=0))
        chain, legacy = accepted_hash(chain, event.seq, raw, stored.get(event.seq, ""), legacy)
        status = STATUS_BY_EVENT_TYPE.get(event.type, status)
    replayed_head = {"seq": len(events), "status": status, "hash": chain}
    stored_head = (
        {"seq": head.seq, "status": head.status, "hash": head.hash} if head is not None else {}
    )
    differences += diff(replayed_head, stored_head, "head")
    index = RunIndex()
    for event in events:
        index = evolve_index(index, event)
    entry = get_run(index, run_id)
    if state is not None and entry is not None:
        for field in ("status", "workflow", "degraded", "submitted_ms", "seq"):
            differences += diff(getattr(state, field), getattr(entry, field), f"index.{field}")
    snapshot = await store.get_snapshot(run_id)
    if snapshot is not None:
        snapped = state_from_snapshot(snapshot)
        if snapped is None:
            differences.append(
                Difference(path="snapshot.version", expected="current", found=snapshot.version)
            )
        else:
            at = state_at(history_until(events, seq=snapshot.seq))
            differences += diff(
                msgspec.to_builtins(at), msgspec.to_builtins(snapped), "snapshot.state"
            )
    return state, differences


def decision_view(data: EventData) -> dict[str, Any]:
    """The type and key fields of a decision (what must agree for two to be the same)."""
    fields = msgspec.to_builtins(data)
    view: dict[str, Any] = {"type": fields.pop("type")}
    for name in _DECISION_FIELDS:
        if name in fields:
            value = fields[name]
            view[name] = round(value, 3) if isinstance(value, float) else value
    return view


def _decision_batch(events: Sequence[Envelope], start: int) -> int:
    """The end of the decision batch starting at ``start``: consecutive scheduler events with
    one cause (one ``decide`` call, appended together)."""
    end = start + 1
    first = events[start]
    while (
        end < len(events)
        and events[end].producer.startswith(SCHEDULER_PREFIX)
        and events[end].causation_id == first.causation_id
    ):
        end += 1
    return end


def first_divergence(definition: WorkflowDef, events: Sequence[Envelope]) -> Divergence | None:
    """The first recorded scheduler decision that ``definition`` would decide differently."""
    state: RunState | None = None
    index = 0
    while index < len(events):
        event = events[index]
        if state is None or not event.producer.startswith(SCHEDULER_PREFIX):
            state = evolve(state, event)
            index += 1
            continue
        end = _decision_batch(events, index)
        recorded = [decision_view(e.data) for e in events[index:end]]
        new = [decision_view(data) for data in decide(definition, state, event.ts).events]
        if recorded != new:
            same = next(
                (i for i, (a, b) in enumerate(zip(recorded, new, strict=False)) if a != b),
                min(len(recorded), len(new)),
            )
            return Divergence(seq=event.seq + same, recorded=recorded[same:], new=new[same:])
        for recorded_event in events[index:end]:
            state = evolve(state, recorded_event)
        index = end
    return None


class RebuildReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``flowlog rebuild`` did: runs and events folded, time taken, runs by status."""

    runs: int
    events: int
    seconds: float
    events_per_s: float
    by_status: dict[str, int]


async def rebuild_projections(
    store: EventStore, on_run: Callable[[int, int], None] | None = None
) -> RebuildReport:
    """Fold every run's full history into its state (saved as its snapshot), the run index and
    the metrics model (saved as the projector's snapshot, which a metrics projector started
    afterwards loads). ``on_run(done, total)`` is called after each run."""
    started = time.perf_counter()
    run_ids = await store.list_runs()
    index = RunIndex()
    model = MetricsModel()
    events = 0
    for done, run_id in enumerate(run_ids, 1):
        state: RunState | None = None
        async for event in store.read_run(run_id):
            state = evolve(state, event)
            index = evolve_index(index, event)
            apply(model, event)
            events += 1
        if state is not None:
            await store.put_snapshot(snapshot_of(state))
        if on_run is not None:
            on_run(done, len(run_ids))
    await store.put_snapshot(
        Snapshot(
            run_id=METRICS_SNAPSHOT_ID,
            seq=model.applied,
            version=MODEL_VERSION,
            state=encode_model(model),
        )
    )
    seconds = time.perf_counter() - started
    return RebuildReport(
        runs=len(run_ids),
        events=events,
        seconds=seconds,
        events_per_s=events / seconds if seconds > 0 else 0.0,
        by_status=count_by_status(index),
    )
