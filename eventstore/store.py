"""The ``EventStore`` protocol every backend implements, and the values it exchanges.

Backends: ``memory`` (embedded default), ``redis`` (the real one), ``fallback`` (redis with a
local spool for fact appends while Redis is unreachable). All pass one contract test suite.

Semantics shared by every backend:

* ``append(run_id, events, expected_seq=None)`` appends a batch to one run. Each event gets one
  :class:`AppendResult`. Dedup is by ``event_id`` for ``dedup_ttl``: a repeat of a known event
  is a ``duplicate`` (with the original seq); the same ``event_id`` with another payload (see
  :func:`eventstore.codec.payload_digest`) is a ``mismatch`` and is not written. With
  ``expected_seq`` (a *decision*), the new events of the batch are written only if the run is
  at that seq, or has moved past it by *passive* events only (:data:`PASSIVE_EVENT_TYPES`:
  bookkeeping such as ``checkpoint_taken`` that no decision depends on; the batch then gets
  the next seqs after them); otherwise every new event of the batch is a ``conflict``
  carrying the current seq, and nothing is written. Validation happens before the first
  write.
* ``seq`` is 1-based and contiguous within a run.
* Every entry carries the chain hash and, with ``audit_key``, the chain MAC (see
  :mod:`eventstore.audit`); ``read_records`` returns the entries as stored, for verification.
* Subscriptions are consumer groups over the partition feeds: a consumer first gets its own
  pending entries, then entries idle longer than ``claim_idle_ms`` claimed from other
  consumers, then new ones. An entry delivered more than ``max_deliveries`` times, or one that
  cannot be decoded, goes to the dead-letter stream with the reason and is acknowledged.
* Work streams: every ``step_scheduled`` event is also added, in the same atomic append, to
  the *work stream* of its step's queue in the run's partition (:func:`work_queue`). A
  subscription with ``queue`` set reads that queue's work streams instead of the feeds, with
  the same delivery semantics, so a runner reads the steps it may run and nothing else.
  Retention trims work streams as it trims feeds (never past what a group has not read); they
  hold copies, so nothing of them is archived.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

from eventstore.events import Envelope, StepScheduled

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

#: ``DeadLetter.reason`` starts with one of these, then ``": "`` and the details.
REASON_UNDECODABLE = "undecodable"
REASON_MAX_DELIVERIES = "max_deliveries"

#: The run status an event type moves a run's head to (others leave it unchanged).
STATUS_BY_EVENT_TYPE: dict[str, str] = {
    "run_submitted": "submitted",
    "run_started": "running",
    "run_paused": "paused",
    "run_resumed": "running",
    "run_retry_requested": "running",
    "run_completed": "completed",
    "run_failed": "failed",
    "run_cancelled": "cancelled",
}


#: Event types that do not invalidate a decision: an append with ``expected_seq`` still goes
#: through when only events of these types came after that seq. A checkpoint records that a
#: snapshot exists; a scheduler's decision made just before it is as valid as before, so a
#: checkpointer never makes the scheduler decide again.
PASSIVE_EVENT_TYPES: frozenset[str] = frozenset({"checkpoint_taken"})


def work_queue(envelope: Envelope) -> str | None:
    """The queue whose work stream gets ``envelope`` too, if any: a ``step_scheduled``
    event's step queue."""
    data = envelope.data
    return data.queue if type(data) is StepScheduled else None


class StoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What every backend is configured with (services build it from settings)."""

    prefix: str = "flowlog"
    partitions: int = 16
    dedup_ttl_ms: int = 24 * 3600 * 1000
    retention_ms: int = 7 * 24 * 3600 * 1000
    claim_idle_ms: int = 30_000
    #: A subscription looks for entries to claim at most this often (0: on every fetch).
    claim_scan_ms: int = 1_000
    max_deliveries: int = 5
    max_event_bytes: int = 1024 * 1024
    #: Key of the per-run HMAC chain (field ``m``, see :mod:`eventstore.audit`); b"": none.
    audit_key: bytes = b""

    def __repr__(self) -> str:
        """Every setting but the audit key, which is shown only as set or not."""
        shown = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"StoreConfig({shown})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        shown: list[tuple[str, Any]] = [
            (name, getattr(self, name)) for name in self.__struct_fields__ if name != "audit_key"
        ]
        return [*shown, ("audit_key", "<set>" if self.audit_key else "<none>")]


class Outcome(enum.StrEnum):
    APPENDED = "appended"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    MISMATCH = "mismatch"


class AppendResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The outcome of one event of an append.

    ``seq``: the seq given (appended) or the original's seq (duplicate, mismatch); 0 on
    conflict. ``current_seq``: the run's seq in the store, set on conflict.
    """

    event_id: str
    outcome: Outcome
    seq: int = 0
    entry_id: str = ""
    current_seq: int = 0


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One run's part of a batched append across runs."""

    run_id: str
    events: Sequence[Envelope]
    expected_seq: int | None = None


class Head(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Where a run's history stands: last seq, its entry id, status and chain hash."""

    run_id: str
    seq: int
    entry_id: str
    status: str = ""
    hash: str = ""
    mac: str = ""


class Record(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One run stream entry as stored, for verification: ``raw`` is the envelope bytes,
    ``hash`` the chain hash (``h``), ``mac`` the keyed chain MAC (``m``, "" when none).
    ``seq`` is 0 when the entry's seq field is missing or not a number."""

    seq: int
    entry_id: str
    raw: bytes
    hash: str = ""
    mac: str = ""


class Delivery(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One feed entry handed to a consumer; ``deliveries`` counts this delivery."""

    envelope: Envelope
    partition: int
    entry_id: str
    deliveries: int = 1


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A feed entry given up on: its raw bytes, why, and how often it was delivered."""

    partition: int
    entry_id: str
    group: str
    reason: str
    deliveries: int
    raw: bytes


class Timer(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A wake-up for a run at ``due_ms`` (retry backoff, delay, step timeout)."""

    run_id: str
    timer_id: str
    due_ms: int
    payload: bytes = b""


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A run's state as of ``seq``, encoded by the projection that owns it."""

    run_id: str
    seq: int
    version: int
    state: bytes


class GroupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A consumer group on one partition feed: pending entries and entries not yet read."""

    group: str
    partition: int
    pending: int
    lag: int


class TrimReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a feed trim did (or would do, on a dry run), per partition; ``work_trimmed``:
    work stream entries (copies of feed entries) trimmed, per partition."""

    trimmed: dict[int, int]
    min_ids: dict[int, str]
    dry_run: bool = False
    work_trimmed: dict[int, int] = {}


Archiver = Callable[[int, Sequence[Envelope]], Awaitable[None]]


@runtime_checkable
class Subscription(Protocol):
    """A consumer's handle on a consumer group over every partition feed."""

    @property
    def group(self) -> str: ...

    @property
    def consumer(self) -> str: ...

    async def fetch(
        self, max_count: int = 100, block_ms: int = 1000, *, ack: Sequence[Delivery] = ()
    ) -> list[Delivery]:
        """Own pending first, then claimed idle entries, then new entries (blocking).

        Waits up to ``block_ms`` for new entries when there is nothing to hand out;
        ``block_ms <= 0`` returns at once. ``ack``: entries to acknowledge first, as
        :meth:`ack` does (a consumer passes the batch it just finished; the redis backend
        sends the acknowledgement in the same round trip as the read). They are acknowledged
        if fetch returns; if it raises, or :meth:`close` ends it, they may be left pending and
        are delivered again, as after a crash.
        """
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Heartbeat: reset the idle time of in-flight entries so they are not claimed."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class EventStore(Protocol):
    """The log. See the module docstring for the shared semantics."""

    config: StoreConfig

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]: ...

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        """Append for many runs in one round trip (pipelined); one result list per request."""
        ...

    def read_run(self, run_id: str, after_seq: int = 0) -> AsyncIterator[Envelope]:
        """The run's events with seq > ``after_seq``, in order."""
        ...

    async def head(self, run_id: str) -> Head | None: ...

    def read_records(self, run_id: str) -> AsyncIterator[Record]:
        """Every entry of the run's stream as stored, in stream order, undecoded (audit)."""
        ...

    async def list_runs(self) -> list[str]:
        """Every run id the store holds (not expired), oldest first."""
        ...

    async def subscribe(
        self, group: str, consumer: str, *, queue: str | None = None
    ) -> Subscription:
        """Join ``group`` as ``consumer`` on the partition feeds (every event), or with
        ``queue`` on that queue's work streams (its ``step_scheduled`` events)."""
        ...

    async def reset_group(self, group: str) -> None:
        """Make ``group`` anew at the end of every partition feed, its pending entries
        dropped: it is handed only what is appended from now on (a projection rebuilt from the
        run streams starts its feed there). Subscriptions made before are not moved."""
        ...

    async def group_info(self) -> list[GroupInfo]: ...

    async def dead_letters(self, partition: int | None = None) -> list[DeadLetter]: ...

    async def schedule_timer(self, timer: Timer) -> None:
        """Add or move a timer (same run_id and timer_id replaces it)."""
        ...

    async def due_timers(
        self, now_ms: int, limit: int = 100, lease_ms: int = 30_000
    ) -> list[Timer]:
        """Timers due at ``now_ms``; each is leased (moved to ``now_ms + lease_ms``) until
        cancelled, so a crash between taking and handling a timer only delays it."""
        ...

    async def cancel_timer(self, run_id: str, timer_id: str) -> None: ...

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the run's latest, unless the store keeps one of the same state
        version and a later seq (a late writer never takes a run's checkpoint back)."""
        ...

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Several runs' snapshots in one round trip (as ``put_snapshot`` each, in order)."""
        ...

    async def get_snapshot(self, run_id: str) -> Snapshot | None: ...

    async def trim_feeds(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        """Trim feed entries older than ``horizon_ms`` but never one some group has not yet
        delivered or still has pending; ``archive`` is given the entries before they go."""
        ...

    async def ping(self) -> None:
        """Raise :class:`~eventstore.errors.StoreUnavailable` if the store cannot be reached."""
        ...

    async def close(self) -> None: ...
