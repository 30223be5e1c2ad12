"""The redis backend of the event log (standalone Redis; see DESIGN.md "The event log").

Run stream entries: ``s`` (seq), ``e`` (the msgpack envelope, stored with seq 0) and ``h``,
the chain hash ``sha1hex(previous h "\\n" s "\\n" sha1hex(e))`` ("" before seq 1; see
:func:`eventstore.codec.chain_hash`), which the head keeps for the last entry; with an audit key
also ``m``, the keyed MAC chain (see :mod:`eventstore.audit`), the head keeping the last one.
Feed entries carry ``s`` and ``e`` (consumers need nothing else). A run stream's entry ids
are ``<seq>-0``, so reading a run after a seq starts right there; the entry id the store
reports (append results, head, deliveries) is the feed entry's time-based id.

Appends run one Lua script call per partition (``append.lua``: each run's batch checked and
written in turn, up to ``RUNS_PER_CALL`` runs); ``append_many`` streams the calls in one round
trip. Entry ids, bytes and scripts stay in here: callers see envelopes and flowlog errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Final

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from eventstore import codec
from eventstore.errors import StoreClosed
from eventstore.events import Envelope
from eventstore.keys import Keys
from eventstore.redis_append import call_results, entry_payload, prepare, script_call
from eventstore.redis_conn import (
    LuaScript,
    blocking_client,
    client_from_url,
    command,
    describe_pool,
    raw_client,
    redact_url,
    run_commands,
    translate_errors,
)
from eventstore.redis_feeds import FeedMaintenance
from eventstore.redis_subscription import FeedScripts, RedisSubscription
from eventstore.store import (
    AppendRequest,
    AppendResult,
    Archiver,
    DeadLetter,
    GroupInfo,
    Head,
    Record,
    Snapshot,
    StoreConfig,
    Timer,
    TrimReport,
)

_DEFAULT_CONFIG: Final = StoreConfig()
_READ_PAGE: Final = 1000
_TIMER_SEPARATOR: Final = "\x1f"
#: Runs appended by one script call at most: calls stay short (a script blocks the server) and
#: the first ones run while later ones are encoded.
RUNS_PER_CALL: Final = 32


class RedisStore:
    """The :class:`~eventstore.store.EventStore` on Redis.

    The store shares ``client``'s connection pool when it speaks RESP2 without decoding (as
    :meth:`from_url` clients do), else it opens its own with the same settings. It closes
    ``client`` only if it made it (:meth:`from_url`).
    """

    def __init__(self, client: aioredis.Redis, config: StoreConfig = _DEFAULT_CONFIG) -> None:
        pool = client.connection_pool
        self.config = config
        self._keys = Keys(config.prefix, config.partitions)
        self._client = client
        self._owns_client = False
        self._url = describe_pool(pool)
        self._raw, self._owns_raw_pool = raw_client(pool)
        # SHA-256 in Lua only when the HMAC chain is on: building its tables costs every call.
        self._append_script = LuaScript(
            self._raw,
            "append.lua",
            includes=("sha256.lua",) if self.config.audit_key else (),
        )
        self._lease_script = LuaScript(self._raw, "lease_timers.lua")
        self._snapshot_script = LuaScript(self._raw, "put_snapshot.lua")
        self._feed_scripts = FeedScripts(self._raw)
        self._feeds = FeedMaintenance(self._raw, self._keys, self._url)
        self._subscriptions: set[RedisSubscription] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, config: StoreConfig = _DEFAULT_CONFIG) -> RedisStore:
        """A store on its own client for ``redis://`` / ``rediss://`` (user, password) URLs."""
        store = cls(client_from_url(url), config)
        store._owns_client = True
        store._url = redact_url(url)
        store._feeds.url = store._url
        return store

    @property
    def url(self) -> str:
        """The server's URL, without a password (for logs and errors)."""
        return self._url

    # --- append -------------------------------------------------------------------------------

    async def append(
        self, run_id: str, events: Sequence[Envelope], expected_seq: int | None = None
    ) -> list[AppendResult]:
        """Append a batch to one run in one script call (see :mod:`eventstore.store`)."""
        self._check_open()
        prepared = prepare(self._keys, self.config, run_id, events, expected_seq)
        if not events:
            return []
        with translate_errors(self._url):
            reply = await self._append_script(*script_call([prepared], self.config))
        return prepared.results(reply)

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        """Append for many runs: every request is validated and encoded first, then one script
        call per partition (up to ``RUNS_PER_CALL`` runs each), all streamed in one round
        trip."""
        self._check_open()
        prepared = [
            prepare(self._keys, self.config, r.run_id, r.events, r.expected_seq) for r in requests
        ]
        by_partition: dict[int, list[int]] = {}
        for i, batch in enumerate(prepared):
            if batch.events:
                by_partition.setdefault(batch.keys.partition, []).append(i)
        calls = [
            indexes[start : start + RUNS_PER_CALL]
            for indexes in by_partition.values()
            for start in range(0, len(indexes), RUNS_PER_CALL)
        ]
        out: list[list[AppendResult]] = [[] for _ in prepared]
        if not calls:
            return out
        with translate_errors(self._url):
            results = await self._append_script.run_many(
                (script_call([prepared[i] for i in call], self.config) for call in calls),
                lambda position, reply: call_results([prepared[i] for i in calls[position]], reply),
            )
        for call, per_call in zip(calls, results, strict=True):
            for i, result in zip(call, per_call, strict=True):
                out[i] = result
        return out

    # --- runs ---------------------------------------------------------------------------------

    async def read_run(self, run_id: str, after_seq: int = 0) -> AsyncIterator[Envelope]:
        """The run's events with seq > ``after_seq``, in order, read in pages."""
        self._check_open()
        key = self._keys.run(run_id)
        start = f"{max(after_seq, 0) + 1}-0"
        while True:
            with translate_errors(self._url):
                page = await command(self._raw, "XRANGE", key, start, "+", "COUNT", _READ_PAGE)
            for entry_id, fields in page:
                seq, raw = entry_payload(fields) or (0, b"")
                yield codec.decode(raw, seq=seq, where=f"run {run_id} entry {entry_id.decode()}")
            if len(page) < _READ_PAGE:
                return
            start = "(" + page[-1][0].decode()

    async def head(self, run_id: str) -> Head | None:
        """Where the run stands, or None for a run the store does not hold."""
        self._check_open()
        with translate_errors(self._url):
            seq, entry, chain, status, mac = await command(
                self._raw, "HMGET", self._keys.head(run_id), "seq", "entry", "hash", "status", "mac"
            )
        if seq is None:
            return None
        return Head(
            run_id=run_id,
            seq=int(seq),
            entry_id=(entry or b"").decode(),
            status=(status or b"").decode(),
            hash=(chain or b"").decode(),
            mac=(mac or b"").decode(),
        )

    async def read_records(self, run_id: str) -> AsyncIterator[Record]:
        """The run stream's entries as stored, in stream order, undecoded, read in pages."""
        self._check_open()
        key = self._keys.run(run_id)
        start = "-"
        while True:
            with translate_errors(self._url):
                page = await command(self._raw, "XRANGE", key, start, "+", "COUNT", _READ_PAGE)
            for entry_id, fields in page:
                found = dict(zip(fields[::2], fields[1::2], strict=False))
                seq = found.get(b"s", b"")
                yield Record(
                    seq=int(seq) if seq.isdigit() else 0,
                    entry_id=entry_id.decode(),
                    raw=found.get(b"e", b""),
                    hash=found.get(b"h", b"").decode(errors="replace"),
                    mac=found.get(b"m", b"").decode(errors="replace"),
                )
            if len(page) < _READ_PAGE:
                return
            start = "(" + page[-1][0].decode()

    async def list_runs(self) -> list[str]:
        """Every run the store holds, by first-append time; runs whose keys expired are
        dropped from the partition indexes on the way."""
        self._check_open()
        with translate_errors(self._url):
            pipe = self._raw.pipeline(transaction=False)
            for partition in range(self._keys.partitions):
                pipe.execute_command("ZRANGE", self._keys.runs(partition), 0, -1, "WITHSCORES")
            indexes = await pipe.execute()
            scored = [
                (float(score), member.decode(), partition)
                for partition, flat in enumerate(indexes)
                for member, score in zip(flat[::2], flat[1::2], strict=True)
            ]
            pipe = self._raw.pipeline(transaction=False)
            for _, run_id, _ in scored:
                pipe.execute_command("EXISTS", self._keys.head(run_id))
            alive = await pipe.execute() if scored else []
            gone = {
                run_id: partition
                for (_, run_id, partition), exists in zip(scored, alive, strict=True)
                if not exists
            }
            if gone:
                pipe = self._raw.pipeline(transaction=False)
                for run_id, partition in gone.items():
                    pipe.execute_command("ZREM", self._keys.runs(partition), run_id)
                await pipe.execute()
        return [run_id for _, run_id, _ in sorted(scored) if run_id not in gone]

    # --- subscriptions ------------------------------------------------------------------------

    async def subscribe(
        self, group: str, consumer: str, *, queue: str | None = None
    ) -> RedisSubscription:
        """Join ``group`` as ``consumer`` on every feed, or with ``queue`` on every work stream
        of that queue (registered in each partition's queue set, for retention and group
        info); a new group starts at the beginning of each stream."""
        self._check_open()
        partitions = range(self._keys.partitions)
        if queue is None:
            streams = [self._keys.feed(p) for p in partitions]
        else:
            streams = [self._keys.work(p, queue) for p in partitions]
        with translate_errors(self._url):
            pipe = self._raw.pipeline(transaction=False)
            for partition, stream in zip(partitions, streams, strict=True):
                if queue is not None:
                    pipe.execute_command("SADD", self._keys.queues(partition), queue)
                pipe.execute_command("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
            for reply in await pipe.execute(raise_on_error=False):
                if isinstance(reply, ResponseError) and not str(reply).startswith("BUSYGROUP"):
                    raise reply
        subscription = RedisSubscription(
            client=self._raw,
            blocking=blocking_client(self._raw.connection_pool),
            scripts=self._feed_scripts,
            keys=self._keys,
            streams=streams,
            config=self.config,
            url=self._url,
            group=group,
            consumer=consumer,
            on_close=self._subscriptions.discard,
        )
        self._subscriptions.add(subscription)
        return subscription

    async def reset_group(self, group: str) -> None:
        """Make ``group`` anew at the end of every partition feed (see the protocol): create
        it (and the feed) if missing, ``XGROUP DESTROY`` it, ``XGROUP CREATE ... $``."""
        self._check_open()
        with translate_errors(self._url):
            pipe = self._raw.pipeline(transaction=False)
            for partition in range(self._keys.partitions):
                stream = self._keys.feed(partition)
                pipe.execute_command("XGROUP", "CREATE", stream, group, "$", "MKSTREAM")
                pipe.execute_command("XGROUP", "DESTROY", stream, group)
                pipe.execute_command("XGROUP", "CREATE", stream, group, "$")
            for reply in await pipe.execute(raise_on_error=False):
                if isinstance(reply, ResponseError) and not str(reply).startswith("BUSYGROUP"):
                    raise reply

    async def group_info(self) -> list[GroupInfo]:
        """Pending entries and lag of every consumer group on every partition feed."""
        self._check_open()
        return await self._feeds.group_info()

    async def dead_letters(self, partition: int | None = None) -> list[DeadLetter]:
        """Dead letters of one partition, or of all, oldest first per partition."""
        self._check_open()
        return await self._feeds.dead_letters(partition)

    async def trim_feeds(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        """Trim each feed below the least of the horizon and every group's progress."""
        self._check_open()
        return await self._feeds.trim(horizon_ms, dry_run=dry_run, archive=archive)

    # --- timers and snapshots -----------------------------------------------------------------

    async def schedule_timer(self, timer: Timer) -> None:
        """Add or move a timer (same run_id and timer_id replaces it)."""
        self._check_open()
        partition = self._keys.partition(timer.run_id)
        member = f"{timer.run_id}{_TIMER_SEPARATOR}{timer.timer_id}"
        with translate_errors(self._url):
            pipe = self._raw.pipeline(transaction=True)
            pipe.execute_command("ZADD", self._keys.timers(partition), timer.due_ms, member)
            pipe.execute_command(
                "HSET", self._keys.timer_payloads(partition), member, timer.payload
            )
            await pipe.execute()

    async def due_timers(
        self, now_ms: int, limit: int = 100, lease_ms: int = 30_000
    ) -> list[Timer]:
        """The ``limit`` earliest timers due at ``now_ms``, each leased to ``now_ms + lease_ms``."""
        self._check_open()
        if limit <= 0:
            return []
        partitions = range(self._keys.partitions)
        with translate_errors(self._url):
            # Polled every few tens of ms by every scheduler: one write, no redis-py pipeline.
            listed = await run_commands(
                self._raw,
                [
                    ["ZRANGE", self._keys.timers(partition), "-inf", now_ms,
                     "BYSCORE", "LIMIT", 0, limit, "WITHSCORES"]
                    for partition in partitions
                ],
            )  # fmt: skip
            due = sorted(
                (float(score), member, partition)
                for partition, flat in zip(partitions, listed, strict=True)
                for member, score in zip(flat[::2], flat[1::2], strict=True)
            )[:limit]
            if not due:
                return []
            chosen: dict[int, list[bytes]] = {}
            for _, member, partition in due:
                chosen.setdefault(partition, []).append(member)
            replies = await self._lease_script.run_many(
                [
                    (
                        [self._keys.timers(partition), self._keys.timer_payloads(partition)],
                        [now_ms, now_ms + lease_ms, *members],
                    )
                    for partition, members in chosen.items()
                ]
            )
        timers = []
        for reply in replies:
            for i in range(0, len(reply), 3):
                run_id, _, timer_id = reply[i].decode().partition(_TIMER_SEPARATOR)
                timers.append(
                    Timer(
                        run_id=run_id,
                        timer_id=timer_id,
                        due_ms=int(float(reply[i + 1])),
                        payload=reply[i + 2],
                    )
                )
        timers.sort(key=lambda t: (t.due_ms, t.run_id, t.timer_id))
        return timers

    async def cancel_timer(self, run_id: str, timer_id: str) -> None:
        """Remove a timer (no-op when there is none)."""
        self._check_open()
        partition = self._keys.partition(run_id)
        member = f"{run_id}{_TIMER_SEPARATOR}{timer_id}"
        with translate_errors(self._url):
            pipe = self._raw.pipeline(transaction=True)
            pipe.execute_command("ZREM", self._keys.timers(partition), member)
            pipe.execute_command("HDEL", self._keys.timer_payloads(partition), member)
            await pipe.execute()

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the run's latest; it expires with the run."""
        self._check_open()
        with translate_errors(self._url):
            await self._snapshot_script(
                [self._keys.snap(snapshot.run_id), self._keys.head(snapshot.run_id)],
                [snapshot.seq, snapshot.version, snapshot.state],
            )

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Several runs' snapshots, all in one round trip."""
        self._check_open()
        if not snapshots:
            return
        with translate_errors(self._url):
            await self._snapshot_script.run_many(
                (
                    [self._keys.snap(s.run_id), self._keys.head(s.run_id)],
                    [s.seq, s.version, s.state],
                )
                for s in snapshots
            )

    async def get_snapshot(self, run_id: str) -> Snapshot | None:
        """The run's latest snapshot, if any."""
        self._check_open()
        with translate_errors(self._url):
            seq, version, state = await command(
                self._raw, "HMGET", self._keys.snap(run_id), "seq", "version", "state"
            )
        if seq is None:
            return None
        return Snapshot(run_id=run_id, seq=int(seq), version=int(version), state=state)

    # --- lifecycle ----------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` if Redis cannot be reached (``StoreClosed`` once closed)."""
        self._check_open()
        with translate_errors(self._url):
            await command(self._raw, "PING")

    async def close(self) -> None:
        """Close every subscription (blocked fetches return) and, if owned, the client."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for subscription in list(self._subscriptions):
                await subscription.close()
            if self._owns_raw_pool:
                await self._raw.aclose(close_connection_pool=True)
            if self._owns_client:
                await self._client.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the redis store for {self._url} is closed")
