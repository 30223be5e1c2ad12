"""The embedded in-memory event store: the Redis backend's semantics in one process.

Used when no Redis URL is configured and by fast tests. It keeps what Redis would keep: the
encoded bytes of every event (each is decoded once, at append, into the frozen envelope every
reader is handed: readers share it and must not change its payload's containers), entry ids in the
Redis ``"<ms>-<n>"`` format, strictly increasing per partition feed (a run's entries carry the
id of their feed entry), the queues' work streams, dedup records with a TTL, per-run heads
with the chain hash, consumer groups with pending entries, claims and dead letters, timers and
snapshots. Expiry (dedup,
retention of finished runs) follows the injected ``clock_ms``, so tests can move time. As with
the Redis keys, dedup records are per partition, and a finished run's stream, head and snapshot
expire together ``retention_ms`` after its last terminal status (a later non-terminal status
keeps them).

Every async method passes a checkpoint first, like a round trip to a server, so concurrent
tasks interleave between calls; each call is then atomic, like a Lua script.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import anyio
import anyio.lowlevel
import msgspec

from eventstore import codec
from eventstore.audit import chain_mac, content_digest
from eventstore.errors import DecodeError, InvalidAppend, StoreClosed
from eventstore.events import EVENT_TYPES, Envelope
from eventstore.keys import Keys
from eventstore.store import (
    PASSIVE_EVENT_TYPES,
    REASON_MAX_DELIVERIES,
    REASON_UNDECODABLE,
    STATUS_BY_EVENT_TYPE,
    TERMINAL_STATUSES,
    AppendRequest,
    AppendResult,
    Archiver,
    DeadLetter,
    Delivery,
    GroupInfo,
    Head,
    Outcome,
    Record,
    Snapshot,
    StoreConfig,
    Timer,
    TrimReport,
    work_queue,
)

EntryKey = tuple[int, int]

_DEFAULT_CONFIG: Final = StoreConfig()
#: The head status and passive event types by payload class (looked up per append).
_STATUS_BY_KIND: Final = {
    EVENT_TYPES[name]: status for name, status in STATUS_BY_EVENT_TYPE.items()
}
_PASSIVE: Final = frozenset(EVENT_TYPES[name] for name in PASSIVE_EVENT_TYPES)
_READ_PAGE: Final = 1000


def wall_clock_ms() -> int:
    """Unix time in milliseconds (the default clock)."""
    return time.time_ns() // 1_000_000


class _Entry(msgspec.Struct, gc=False):
    """One stored event: feed entry and run stream entry at once. ``envelope`` is the decoded
    event (None for raw feed entries, which are decoded, or dead-lettered, when delivered).

    Stored entries, dedup records and pending entries are by far the most numerous objects of
    a long-running store; none can be part of a reference cycle, so the cycle collector does
    not track them (``gc=False``), and its full collections do not grow with the log."""

    key: EntryKey
    entry_id: str
    seq: int
    raw: bytes
    hash: str = ""
    mac: str = ""
    envelope: Envelope | None = None
    #: The entry's first delivery to a group, the same for every group (made once).
    first: Delivery | None = None
    #: Until when (ms) the entry is its event id's dedup record. A repeat is compared with it
    #: by the payload digest of its bytes, computed only when a repeat comes.
    dedup_until: int = 0

    def decoded(self, where: str) -> Envelope:
        """The entry's envelope; raises :class:`DecodeError` naming ``where``."""
        envelope = self.envelope
        if envelope is None:
            envelope = codec.decode(self.raw, seq=self.seq, where=where)
        return envelope


class _Run:
    """``ver`` is the seq of the run's last non-passive event (what expected seqs are met by)."""

    __slots__ = ("entries", "expires_at", "hash", "mac", "status", "ver")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.ver = 0
        self.status = ""
        self.hash = ""
        self.mac = ""
        self.expires_at: int | None = None


class _Feed:
    """A partition feed; ``offset`` is the absolute index of ``entries[0]`` (after trims)."""

    __slots__ = ("entries", "last_key", "offset")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.offset = 0
        self.last_key: EntryKey = (0, 0)

    @property
    def end(self) -> int:
        return self.offset + len(self.entries)

    def add(self, now_ms: int, seq: int, raw: bytes) -> _Entry:
        ms, n = self.last_key
        key = self.last_key = (now_ms, 0) if now_ms > ms else (ms, n + 1)
        entry = _Entry(key, f"{key[0]}-{key[1]}", seq, raw)
        self.entries.append(entry)
        return entry

    def count_below(self, key: EntryKey) -> int:
        """How many entries have an id below ``key`` (what ``XTRIM MINID`` would drop)."""
        return bisect.bisect_left(self.entries, key, key=lambda e: e.key)

    def drop(self, count: int) -> None:
        """Trim the first ``count`` entries."""
        del self.entries[:count]
        self.offset += count


class _Pending(msgspec.Struct, gc=False):
    consumer: str
    delivered_ms: int
    entry: _Entry
    deliveries: int = 1


class _Group:
    """One consumer group on one partition feed, or on one partition's work stream of a queue.

    ``pending`` is in entry id order (new deliveries always have the highest ids); ``idle`` holds
    the same entries least recently delivered first, so claiming looks only at its front.
    """

    __slots__ = ("cursor", "feed", "idle", "last_key", "name", "partition", "pending")

    def __init__(self, name: str, partition: int, feed: _Feed) -> None:
        self.name = name
        self.partition = partition
        self.feed = feed
        self.cursor = 0
        self.last_key: EntryKey = (0, 0)
        self.pending: dict[str, _Pending] = {}
        self.idle: dict[str, _Pending] = {}

    def touch(self, pending: _Pending, consumer: str, now_ms: int) -> None:
        pending.consumer = consumer
        pending.delivered_ms = now_ms
        entry_id = pending.entry.entry_id
        del self.idle[entry_id]
        self.idle[entry_id] = pending

    def remove(self, entry_id: str) -> _Pending | None:
        pending = self.pending.pop(entry_id, None)
        if pending is not None:
            del self.idle[entry_id]
        return pending


class MemorySubscription:
    """A consumer of a group over every partition feed of a :class:`MemoryStore`, or over
    every partition's work stream of a queue."""

    def __init__(
        self, store: MemoryStore, group: str, consumer: str, queue: str | None = None
    ) -> None:
        self._store = store
        self._group = group
        self._consumer = consumer
        self._groups = store._groups[group, queue]
        self._own: deque[tuple[_Group, _Pending]] | None = None
        self._next_partition = 0
        self._scanned_ms: int | None = None
        self._closed = False

    @property
    def group(self) -> str:
        return self._group

    @property
    def consumer(self) -> str:
        return self._consumer

    async def fetch(
        self, max_count: int = 100, block_ms: int = 1000, *, ack: Sequence[Delivery] = ()
    ) -> list[Delivery]:
        """At most ``max_count`` deliveries: this consumer's pending entries not yet handed out
        since it subscribed, then pending entries idle for ``claim_idle_ms`` (claimed from any
        consumer, as ``XAUTOCLAIM`` does; looked for at the first fetch and then at most every
        ``claim_scan_ms``), then new entries, fairly across partitions. Waits up to
        ``block_ms`` for an append when there is nothing; ``block_ms <= 0`` returns at once.
        ``ack`` is acknowledged first.

        An entry that would be handed out more than ``max_deliveries`` times, or that cannot be
        decoded, goes to the dead letters (``deliveries`` = times it was handed out) and is
        acknowledged instead.
        """
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._ack(ack)
        deliveries = self._collect(max_count)
        if deliveries or block_ms <= 0:
            return deliveries
        with anyio.move_on_after(block_ms / 1000):
            while not deliveries:
                await self._store._appended().wait()
                if self._closed or self._store._closed:
                    break
                deliveries = self._collect(max_count)
        return deliveries

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove the entries from the group's pending entries."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._ack(deliveries)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._groups[delivery.partition].remove(delivery.entry_id)

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of pending entries (and own them) so they are not claimed."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        now = self._store._tick()
        for delivery in deliveries:
            group = self._groups[delivery.partition]
            pending = group.pending.get(delivery.entry_id)
            if pending is not None:
                group.touch(pending, self._consumer, now)

    async def close(self) -> None:
        """Stop this consumer; its pending entries stay with the group for a restart or claim."""
        self._closed = True
        self._store._wake()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"subscription {self._group}/{self._consumer} is closed")
        self._store._check_open()

    def _collect(self, max_count: int) -> list[Delivery]:
        now = self._store._tick()
        out: list[Delivery] = []
        if self._own is None:
            self._own = deque(
                (group, pending)
                for group in self._groups
                for pending in group.pending.values()
                if pending.consumer == self._consumer
            )
        own = self._own
        while own and len(out) < max_count:
            group, pending = own.popleft()
            still_own = pending.consumer == self._consumer
            if still_own and group.pending.get(pending.entry.entry_id) is pending:
                self._redeliver(group, pending, now, out)
        start = self._next_partition
        self._next_partition = (start + 1) % len(self._groups)
        rotated = self._groups[start:] + self._groups[:start]
        if len(out) < max_count and self._scan_due(now):
            self._claim(now, max_count, out)
        for group in rotated:
            if len(out) >= max_count:
                break
            if group.cursor < group.feed.end:
                self._deliver_new(group, now, max_count - len(out), out)
        return out

    def _scan_due(self, now: int) -> bool:
        """Whether it is time to look for claimable entries (see :meth:`_claim`)."""
        last = self._scanned_ms
        return last is None or now - last >= self._store.config.claim_scan_ms

    def _claim(self, now: int, max_count: int, out: list[Delivery]) -> None:
        self._scanned_ms = now
        threshold = now - self._store.config.claim_idle_ms
        # Claims scan partitions in order and take the lowest entry ids first, up to the room
        # left when the scan starts (entries dead-lettered instead still use it up), exactly
        # as the Redis backend's XPENDING-based scan does.
        room = max_count - len(out)
        for group in self._groups:
            if room <= 0:
                break
            claimable: list[_Pending] = []
            for pending in group.idle.values():
                if pending.delivered_ms > threshold:
                    break
                claimable.append(pending)
            claimable.sort(key=lambda pending: pending.entry.key)
            for pending in claimable[:room]:
                self._redeliver(group, pending, now, out)
            room -= min(room, len(claimable))

    def _redeliver(self, group: _Group, pending: _Pending, now: int, out: list[Delivery]) -> None:
        limit = self._store.config.max_deliveries
        if pending.deliveries >= limit:
            self._store._dead_letter(
                group,
                pending,
                f"{REASON_MAX_DELIVERIES}: delivered {pending.deliveries} times"
                f" (max_deliveries is {limit})",
            )
            return
        pending.deliveries += 1
        group.touch(pending, self._consumer, now)
        self._hand(group, pending, out)

    def _deliver_new(self, group: _Group, now: int, room: int, out: list[Delivery]) -> None:
        feed = group.feed
        start = max(group.cursor, feed.offset)
        stop = min(feed.end, start + room)
        if start >= stop:
            return
        consumer, pendings, idle = self._consumer, group.pending, group.idle
        for entry in feed.entries[start - feed.offset : stop - feed.offset]:
            pending = _Pending(consumer, now, entry)
            pendings[entry.entry_id] = pending
            idle[entry.entry_id] = pending
            first = entry.first
            if first is None:
                self._hand(group, pending, out)
            else:
                out.append(first)
        group.cursor = stop
        group.last_key = feed.entries[stop - 1 - feed.offset].key

    def _hand(self, group: _Group, pending: _Pending, out: list[Delivery]) -> None:
        entry = pending.entry
        try:
            # The place is only formatted for an entry that still has to be decoded.
            envelope = entry.envelope or entry.decoded(
                f"feed {group.partition} entry {entry.entry_id}"
            )
        except DecodeError as exc:
            self._store._dead_letter(group, pending, f"{REASON_UNDECODABLE}: {exc}")
            return
        delivery = Delivery(
            envelope=envelope,
            partition=group.partition,
            entry_id=entry.entry_id,
            deliveries=pending.deliveries,
        )
        if pending.deliveries == 1:
            entry.first = delivery
        out.append(delivery)


class MemoryStore:
    """The in-memory :class:`~eventstore.store.EventStore`.

    ``clock_ms`` (default: wall clock) drives entry ids, dedup expiry, retention and idle times;
    ``block_ms`` waits use real time.
    """

    def __init__(
        self, config: StoreConfig = _DEFAULT_CONFIG, *, clock_ms: Callable[[], int] | None = None
    ) -> None:
        self.config = config
        self._keys = Keys(config.prefix, config.partitions)
        self.clock_ms = clock_ms or wall_clock_ms
        self._runs: dict[str, _Run] = {}
        self._run_expiry: list[tuple[int, str]] = []
        self._snapshots: dict[str, Snapshot] = {}
        self._feeds = [_Feed() for _ in range(config.partitions)]
        self._dedup: list[dict[str, _Entry]] = [{} for _ in range(config.partitions)]
        self._dedup_expiry: deque[tuple[int, int, str]] = deque()
        #: Groups by (name, queue): queue None for groups on the feeds.
        self._groups: dict[tuple[str, str | None], list[_Group]] = {}
        self._work: dict[str, list[_Feed]] = {}
        self._dead: list[list[DeadLetter]] = [[] for _ in range(config.partitions)]
        self._timers: dict[tuple[str, str], Timer] = {}
        self._timer_heap: list[tuple[int, str, str]] = []
        self._trim_lock = anyio.Lock()
        self._waiters: anyio.Event | None = None
        self._closed = False

    # --- append -------------------------------------------------------------------------------

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]:
        """Append a batch to one run (see :mod:`eventstore.store` for the semantics)."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        prepared = codec.encode_append(run_id, events, expected_seq, self.config.max_event_bytes)
        results = self._apply(run_id, prepared, expected_seq, self._tick())
        self._wake()
        return results

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        """Append for many runs, in order; every request is validated before the first write."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        limit = self.config.max_event_bytes
        prepared = [
            codec.encode_append(request.run_id, request.events, request.expected_seq, limit)
            for request in requests
        ]
        now = self._tick()
        results = [
            self._apply(request.run_id, batch, request.expected_seq, now)
            for request, batch in zip(requests, prepared, strict=True)
        ]
        self._wake()
        return results

    def add_raw_feed_entry(self, partition: int, raw: bytes) -> str:
        """Put arbitrary bytes on a partition feed and return the entry id.

        The memory equivalent of a raw ``XADD`` to the feed: tooling and tests use it to add
        entries no producer would write (e.g. undecodable ones).
        """
        self._check_open()
        if not 0 <= partition < self.config.partitions:
            raise InvalidAppend(f"partition {partition} is outside 0..{self.config.partitions - 1}")
        entry = self._feeds[partition].add(self._tick(), 0, raw)
        self._wake()
        return entry.entry_id

    def _apply(
        self,
        run_id: str,
        prepared: list[tuple[Envelope, bytes]],
        expected_seq: int | None,
        now: int,
    ) -> list[AppendResult]:
        partition = self._keys.partition(run_id)
        dedup = self._dedup[partition]
        run = self._runs.get(run_id)
        current = len(run.entries) if run is not None else 0
        ver = run.ver if run is not None else 0
        results: list[AppendResult | None] = [None] * len(prepared)
        fresh: list[tuple[int, Envelope, bytes]] = []
        first_in_batch: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []
        for index, (envelope, raw) in enumerate(prepared):
            event_id = envelope.event_id
            known = dedup.get(event_id)
            if known is not None and known.dedup_until > now:
                same = codec.stored_payload_digest(known.raw) == codec.stored_payload_digest(raw)
                results[index] = AppendResult(
                    event_id=event_id,
                    outcome=Outcome.DUPLICATE if same else Outcome.MISMATCH,
                    seq=known.seq,
                    entry_id=known.entry_id,
                )
            elif event_id in first_in_batch:
                repeats.append((index, first_in_batch[event_id]))
            else:
                first_in_batch[event_id] = index
                fresh.append((index, envelope, raw))
        if fresh and expected_seq is not None and not ver <= expected_seq <= current:
            for index, envelope, _ in fresh:
                results[index] = AppendResult(
                    event_id=envelope.event_id, outcome=Outcome.CONFLICT, current_seq=current
                )
        elif fresh:
            if run is None:
                run = self._runs[run_id] = _Run()
            self._write(run_id, run, partition, fresh, now, results)
        for index, first in repeats:
            original = results[first]
            assert original is not None
            raw, first_raw = prepared[index][1], prepared[first][1]
            same = codec.stored_payload_digest(raw) == codec.stored_payload_digest(first_raw)
            if original.outcome is Outcome.APPENDED:
                outcome = Outcome.DUPLICATE if same else Outcome.MISMATCH
            else:
                outcome = Outcome.CONFLICT if same else Outcome.MISMATCH
            results[index] = msgspec.structs.replace(
                original, event_id=prepared[index][0].event_id, outcome=outcome
            )
        return [result for result in results if result is not None]

    def _write(
        self,
        run_id: str,
        run: _Run,
        partition: int,
        fresh: list[tuple[int, Envelope, bytes]],
        now: int,
        results: list[AppendResult | None],
    ) -> None:
        """Write the ``fresh`` events, putting each one's result at its index in ``results``."""
        feed = self._feeds[partition]
        dedup = self._dedup[partition]
        dedup_expires = now + self.config.dedup_ttl_ms
        expiry = self._dedup_expiry
        key = self.config.audit_key
        entries = run.entries
        for index, envelope, raw in fresh:
            seq = len(entries) + 1
            entry = feed.add(now, seq, raw)
            entry.envelope = decoded = msgspec.structs.replace(envelope, seq=seq)
            entries.append(entry)
            queue = work_queue(envelope)
            if queue is not None:
                self._work_feeds(queue)[partition].add(now, seq, raw).envelope = decoded
            run.hash = entry.hash = codec.chain_hash(run.hash, seq, raw)
            if key:
                run.mac = entry.mac = chain_mac(key, run.mac, seq, content_digest(raw))
            event_id = envelope.event_id
            entry.dedup_until = dedup_expires
            dedup[event_id] = entry
            expiry.append((dedup_expires, partition, event_id))
            kind = type(envelope.data)
            if kind not in _PASSIVE:
                run.ver = seq
            status = _STATUS_BY_KIND.get(kind)
            if status is not None:
                run.status = status
                if status in TERMINAL_STATUSES:
                    run.expires_at = now + self.config.retention_ms
                    heapq.heappush(self._run_expiry, (run.expires_at, run_id))
                else:
                    run.expires_at = None
            results[index] = AppendResult(
                event_id=event_id, outcome=Outcome.APPENDED, seq=seq, entry_id=entry.entry_id
            )

    # --- runs ---------------------------------------------------------------------------------

    async def read_run(self, run_id: str, after_seq: int = 0) -> AsyncIterator[Envelope]:
        """The run's events with seq > ``after_seq``, in order."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._tick()
        run = self._runs.get(run_id)
        if run is None:
            return
        position = max(after_seq, 0)
        while True:
            page = run.entries[position : position + _READ_PAGE]
            for entry in page:
                yield entry.envelope or entry.decoded(f"run {run_id} seq {entry.seq}")
            if len(page) < _READ_PAGE:
                return
            position += len(page)
            await anyio.lowlevel.checkpoint()

    async def head(self, run_id: str) -> Head | None:
        """Where the run stands, or None for a run the store does not hold."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._tick()
        run = self._runs.get(run_id)
        if run is None:
            return None
        return Head(
            run_id=run_id,
            seq=len(run.entries),
            entry_id=run.entries[-1].entry_id,
            status=run.status,
            hash=run.hash,
            mac=run.mac,
        )

    async def read_records(self, run_id: str) -> AsyncIterator[Record]:
        """The run's entries as stored, in order, undecoded."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._tick()
        run = self._runs.get(run_id)
        for entry in list(run.entries) if run is not None else []:
            yield Record(
                seq=entry.seq,
                entry_id=entry.entry_id,
                raw=entry.raw,
                hash=entry.hash,
                mac=entry.mac,
            )

    async def list_runs(self) -> list[str]:
        """Every run id held, in order of first append."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._tick()
        return list(self._runs)

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(
        self, group: str, consumer: str, *, queue: str | None = None
    ) -> MemorySubscription:
        """Join ``group`` as ``consumer`` on every feed, or with ``queue`` on every work stream
        of that queue; a new group starts at the beginning of each."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if (group, queue) not in self._groups:
            feeds = self._feeds if queue is None else self._work_feeds(queue)
            self._groups[group, queue] = [_Group(group, p, feed) for p, feed in enumerate(feeds)]
        return MemorySubscription(self, group, consumer, queue)

    def _work_feeds(self, queue: str) -> list[_Feed]:
        """The work streams of ``queue``, one per partition (made at first use)."""
        feeds = self._work.get(queue)
        if feeds is None:
            feeds = self._work[queue] = [_Feed() for _ in range(self.config.partitions)]
        return feeds

    async def reset_group(self, group: str) -> None:
        """Make ``group`` anew at the end of every partition feed (see the protocol)."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        groups = [_Group(group, p, feed) for p, feed in enumerate(self._feeds)]
        for fresh in groups:
            fresh.cursor = fresh.feed.end
            fresh.last_key = fresh.feed.last_key
        self._groups[group, None] = groups

    async def group_info(self) -> list[GroupInfo]:
        """Pending and lag of every group on every partition feed or work stream."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        return [
            GroupInfo(
                group=group.name,
                partition=group.partition,
                pending=len(group.pending),
                lag=group.feed.end - max(group.cursor, group.feed.offset),
            )
            for groups in self._groups.values()
            for group in groups
        ]

    async def dead_letters(self, partition: int | None = None) -> list[DeadLetter]:
        """Dead letters of one partition, or of all of them, oldest first per partition."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if partition is not None:
            return list(self._dead[partition])
        return [letter for letters in self._dead for letter in letters]

    def _dead_letter(self, group: _Group, pending: _Pending, reason: str) -> None:
        entry = pending.entry
        group.remove(entry.entry_id)
        self._dead[group.partition].append(
            DeadLetter(
                partition=group.partition,
                entry_id=entry.entry_id,
                group=group.name,
                reason=reason,
                deliveries=pending.deliveries,
                raw=entry.raw,
            )
        )

    # --- timers and snapshots -----------------------------------------------------------------

    async def schedule_timer(self, timer: Timer) -> None:
        """Add or move a timer (same run_id and timer_id replaces it)."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._timers[(timer.run_id, timer.timer_id)] = timer
        heapq.heappush(self._timer_heap, (timer.due_ms, timer.run_id, timer.timer_id))
        if len(self._timer_heap) > 2 * len(self._timers) + 64:
            self._timer_heap = [(t.due_ms, t.run_id, t.timer_id) for t in self._timers.values()]
            heapq.heapify(self._timer_heap)

    async def due_timers(
        self, now_ms: int, limit: int = 100, lease_ms: int = 30_000
    ) -> list[Timer]:
        """Due timers, oldest first, each leased until ``now_ms + lease_ms``."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        taken: dict[tuple[str, str], Timer] = {}
        heap = self._timer_heap
        while heap and len(taken) < limit and heap[0][0] <= now_ms:
            due_ms, run_id, timer_id = heapq.heappop(heap)
            timer = self._timers.get((run_id, timer_id))
            if timer is not None and timer.due_ms == due_ms:
                taken.setdefault((run_id, timer_id), timer)
        for key, timer in taken.items():
            self._timers[key] = msgspec.structs.replace(timer, due_ms=now_ms + lease_ms)
            heapq.heappush(heap, (now_ms + lease_ms, timer.run_id, timer.timer_id))
        return list(taken.values())

    async def cancel_timer(self, run_id: str, timer_id: str) -> None:
        """Remove a timer (no-op when there is none)."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._timers.pop((run_id, timer_id), None)

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the run's latest, unless the one kept is of the same version
        and a later seq."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._keep_snapshot(snapshot)

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Keep each snapshot as its run's latest, in order (as :meth:`put_snapshot`)."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        for snapshot in snapshots:
            self._keep_snapshot(snapshot)

    def _keep_snapshot(self, snapshot: Snapshot) -> None:
        kept = self._snapshots.get(snapshot.run_id)
        if kept is None or kept.version != snapshot.version or kept.seq <= snapshot.seq:
            self._snapshots[snapshot.run_id] = snapshot

    async def get_snapshot(self, run_id: str) -> Snapshot | None:
        """The run's latest snapshot, if any."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        self._tick()
        return self._snapshots.get(run_id)

    # --- retention ----------------------------------------------------------------------------

    async def trim_feeds(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        """Per partition, drop feed entries below ``MINID`` = the least of ``<horizon_ms>-0``,
        each group's last-delivered id + 1 and each group's oldest pending id; ``archive`` is
        given the decodable ones first. Work streams are trimmed the same way (each by its own
        groups), without archive. A dry run only reports."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        trimmed: dict[int, int] = {}
        min_ids: dict[int, str] = {}
        work_trimmed = dict.fromkeys(range(self.config.partitions), 0)
        async with self._trim_lock:
            for partition, feed in enumerate(self._feeds):
                min_key = self._min_key(partition, feed, horizon_ms)
                count = feed.count_below(min_key)
                trimmed[partition] = count
                min_ids[partition] = f"{min_key[0]}-{min_key[1]}"
                if dry_run or not count:
                    continue
                if archive is not None:
                    await archive(partition, self._decodable(partition, feed.entries[:count]))
                feed.drop(count)
            for feeds in self._work.values():
                for partition, feed in enumerate(feeds):
                    count = feed.count_below(self._min_key(partition, feed, horizon_ms))
                    work_trimmed[partition] += count
                    if not dry_run:
                        feed.drop(count)
        return TrimReport(
            trimmed=trimmed, min_ids=min_ids, dry_run=dry_run, work_trimmed=work_trimmed
        )

    def _min_key(self, partition: int, feed: _Feed, horizon_ms: int) -> EntryKey:
        """The least of the horizon and the progress of every group reading ``feed`` (the
        partition's feed or one of its work streams)."""
        min_key: EntryKey = (horizon_ms, 0)
        for groups in self._groups.values():
            group = groups[partition]
            if group.feed is not feed:
                continue
            min_key = min(min_key, (group.last_key[0], group.last_key[1] + 1))
            if group.pending:
                min_key = min(min_key, next(iter(group.pending.values())).entry.key)
        return min_key

    @staticmethod
    def _decodable(partition: int, entries: list[_Entry]) -> list[Envelope]:
        envelopes = []
        for entry in entries:
            try:
                envelopes.append(entry.decoded(f"feed {partition} entry {entry.entry_id}"))
            except DecodeError:
                continue
        return envelopes

    def _tick(self) -> int:
        """Read the clock and drop what has expired by then."""
        now = self.clock_ms()
        expiry = self._dedup_expiry
        while expiry and expiry[0][0] <= now:
            _, partition, event_id = expiry.popleft()
            record = self._dedup[partition].get(event_id)
            if record is not None and record.dedup_until <= now:
                del self._dedup[partition][event_id]
        runs = self._run_expiry
        while runs and runs[0][0] <= now:
            _, run_id = heapq.heappop(runs)
            run = self._runs.get(run_id)
            if run is not None and run.expires_at is not None and run.expires_at <= now:
                del self._runs[run_id]
                self._snapshots.pop(run_id, None)
        return now

    # --- lifecycle ----------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`~eventstore.errors.StoreClosed` once the store is closed."""
        await anyio.lowlevel.checkpoint()
        self._check_open()

    async def close(self) -> None:
        """Close the store; blocked fetches return, later calls raise ``StoreClosed``."""
        self._closed = True
        self._wake()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the memory store is closed")

    def _appended(self) -> anyio.Event:
        if self._waiters is None:
            self._waiters = anyio.Event()
        return self._waiters

    def _wake(self) -> None:
        if self._waiters is not None:
            self._waiters.set()
            self._waiters = None
