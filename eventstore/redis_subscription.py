"""Consumer-group subscriptions over the partition feeds (or one queue's work streams) of the
redis backend.

A fetch fills up to ``max_count`` deliveries, in this order:

1. entries read but not yet handed out (a multi-feed read can return more than asked for; the
   surplus is kept here and is already in this consumer's pending list);
2. this consumer's own pending entries as they were at its first fetch (a restarted consumer
   picks up what it had in flight), each handed out again once;
3. entries of any consumer idle for ``claim_idle_ms`` or longer (claimed), looked for at the
   first fetch and then at most every ``claim_scan_ms`` (a scan asks every feed's pending list:
   on every fetch it cost a busy service about a quarter of its CPU, and a claim only needs to
   happen some time after ``claim_idle_ms``);
4. new entries: one ``XREADGROUP ... >`` over every feed, blocking up to ``block_ms`` only if
   nothing else was found.

Entries due a delivery beyond ``max_deliveries``, and entries that do not decode, go to the
partition's dead-letter stream and are acknowledged; the consumer carries on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

from eventstore import codec
from eventstore.errors import DecodeError, StoreClosed, StoreUnavailable
from eventstore.events import Envelope
from eventstore.keys import Keys
from eventstore.redis_append import entry_payload
from eventstore.redis_conn import Key, LuaScript, run_commands, translate_errors
from eventstore.store import REASON_MAX_DELIVERIES, REASON_UNDECODABLE, Delivery, StoreConfig

_PENDING_PAGE: Final = 1000
#: How much longer than ``block_ms`` a blocking read may take before the server counts as gone.
_BLOCK_GRACE_S: Final = 10.0


class FeedScripts:
    """The Lua scripts a subscription runs (loaded once per store)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redeliver = LuaScript(client, "redeliver.lua")
        self.dead_letter = LuaScript(client, "dead_letter.lua")
        self.claimable = LuaScript(client, "claimable.lua")
        self.ack = LuaScript(client, "ack.lua")


class RedisSubscription:
    """One consumer of a consumer group over every partition feed (see the module doc)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        blocking: aioredis.Redis,
        scripts: FeedScripts,
        keys: Keys,
        streams: Sequence[str],
        config: StoreConfig,
        url: str,
        group: str,
        consumer: str,
        on_close: Callable[[RedisSubscription], None],
    ) -> None:
        """``streams``: the stream the group reads in each partition, in partition order (the
        feeds, or one queue's work streams)."""
        self._client = client
        self._blocking = blocking
        self._scripts = scripts
        self._keys = keys
        self._config = config
        self._url = url
        self._group = group
        self._consumer = consumer
        self._streams = list(streams)
        self._partition_of = {feed.encode(): p for p, feed in enumerate(self._streams)}
        self._surplus: deque[Delivery] = deque()
        self._own: deque[tuple[int, bytes]] | None = None
        self._read_scope: anyio.CancelScope | None = None
        self._scanned_s: float | None = None
        self._on_close = on_close
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
        """Own pending first, then claimed idle entries, then new entries (see module doc).
        ``ack`` goes out first: in the same round trip as the read of new entries when that
        read is the fetch's first round trip, else on its own before any redelivery or claim
        scan."""
        self._check_open()
        out: list[Delivery] = []
        while self._surplus and len(out) < max_count:
            out.append(self._surplus.popleft())
        acks = _by_partition(ack)
        scan = self._scan_due()
        with translate_errors(self._url):
            # Acknowledged entries must not come back as own pending or claimed entries: they
            # ride with the read only when nothing else goes to the server before it.
            read_first = (
                len(out) < max_count and self._own is not None and not self._own and not scan
            )
            if acks and not read_first:
                await self._ack(acks)
                acks = {}
            if len(out) < max_count:
                await self._own_pending(max_count, out)
            if len(out) < max_count and scan:
                await self._claim_idle(max_count, out)
            # close() may have come during an earlier round trip of this fetch: no read then.
            if len(out) < max_count and not self._closed:
                await self._read_new(max_count, 0 if out else block_ms, out, acks)
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge the entries: they leave the group's pending list."""
        self._check_open()
        if not deliveries:
            return
        with translate_errors(self._url):
            await self._ack(_by_partition(deliveries))

    async def _ack(self, by_partition: dict[int, list[str]]) -> None:
        args: list[Any] = [self._group]
        for ids in by_partition.values():
            args.append(len(ids))
            args.extend(ids)
        await self._scripts.ack([self._streams[p] for p in by_partition], args)

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of the entries (and of read-ahead ones) and own them."""
        self._check_open()
        by_partition = _by_partition([*deliveries, *self._surplus])
        if not by_partition:
            return
        pipe = self._client.pipeline(transaction=False)
        for partition, ids in by_partition.items():
            pipe.execute_command(
                "XCLAIM", self._streams[partition], self._group, self._consumer, 0, *ids, "JUSTID"
            )
        with translate_errors(self._url):
            await pipe.execute()

    async def close(self) -> None:
        """Stop this consumer: a blocked fetch returns; pending entries stay with the group."""
        if self._closed:
            return
        self._closed = True
        if self._read_scope is not None:
            self._read_scope.cancel()
        self._on_close(self)
        with anyio.CancelScope(shield=True):
            await self._blocking.aclose(close_connection_pool=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"subscription {self._group}/{self._consumer} is closed")

    async def _own_pending(self, max_count: int, out: list[Delivery]) -> None:
        if self._own is None:
            self._own = await self._own_snapshot()
        while self._own and len(out) < max_count:
            batch: dict[int, list[bytes]] = {}
            for _ in range(min(max_count - len(out), len(self._own))):
                partition, entry_id = self._own.popleft()
                batch.setdefault(partition, []).append(entry_id)
            await self._redeliver(batch, min_idle_ms=0, own_only=True, out=out)

    async def _own_snapshot(self) -> deque[tuple[int, bytes]]:
        own: deque[tuple[int, bytes]] = deque()
        starts: dict[int, bytes] = dict.fromkeys(range(len(self._streams)), b"-")
        while starts:
            pipe = self._client.pipeline(transaction=False)
            for partition, start in starts.items():
                pipe.execute_command(
                    "XPENDING", self._streams[partition], self._group,
                    start, "+", _PENDING_PAGE, self._consumer,
                )  # fmt: skip
            replies = await pipe.execute()
            next_starts: dict[int, bytes] = {}
            for partition, reply in zip(starts, replies, strict=True):
                own.extend((partition, row[0]) for row in reply)
                if len(reply) == _PENDING_PAGE:
                    next_starts[partition] = b"(" + reply[-1][0]
            starts = next_starts
        return own

    def _scan_due(self) -> bool:
        """Whether it is time to look for claimable entries (see :meth:`_claim_idle`)."""
        last = self._scanned_s
        return last is None or (time.monotonic() - last) * 1000 >= self._config.claim_scan_ms

    async def _claim_idle(self, max_count: int, out: list[Delivery]) -> None:
        self._scanned_s = time.monotonic()
        room = max_count - len(out)
        found = await self._scripts.claimable(
            self._streams, [self._group, self._config.claim_idle_ms, room]
        )
        batch: dict[int, list[bytes]] = {}
        for i in range(0, len(found), 2):
            batch.setdefault(int(found[i]), []).append(found[i + 1])
        if batch:
            await self._redeliver(
                batch, min_idle_ms=self._config.claim_idle_ms, own_only=False, out=out
            )

    async def _redeliver(
        self,
        batch: dict[int, list[bytes]],
        *,
        min_idle_ms: int,
        own_only: bool,
        out: list[Delivery],
    ) -> None:
        calls: list[tuple[Sequence[Key], Sequence[Any]]] = [
            (
                [self._streams[partition], self._keys.dead(partition)],
                [
                    self._group,
                    self._consumer,
                    min_idle_ms,
                    self._config.max_deliveries,
                    "1" if own_only else "0",
                    REASON_MAX_DELIVERIES,
                    *ids,
                ],
            )
            for partition, ids in batch.items()
        ]
        replies = await self._scripts.redeliver.run_many(calls)
        for partition, reply in zip(batch, replies, strict=True):
            for i in range(0, len(reply), 3):
                await self._hand(partition, reply[i], reply[i + 1], reply[i + 2], out)

    async def _read_new(
        self, max_count: int, block_ms: int, out: list[Delivery], acks: dict[int, list[str]]
    ) -> None:
        """XREADGROUP over every feed, preceded in the same round trip by an XACK per
        partition of ``acks``."""
        room = max_count - len(out)
        args: list[Any] = ["XREADGROUP", "GROUP", self._group, self._consumer, "COUNT", room]
        if block_ms > 0:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *self._streams, *[">"] * len(self._streams)]
        client = self._blocking if block_ms > 0 else self._client
        commands: list[list[Any]] = [
            ["XACK", self._streams[partition], self._group, *ids] for partition, ids in acks.items()
        ]
        commands.append(args)
        read = _last(run_commands(client, commands))
        reply = await (self._blocking_read(read, block_ms) if block_ms > 0 else read)
        for feed, entries in reply or ():
            partition = self._partition_of[feed]
            for entry_id, fields in entries:
                target = out if len(out) < max_count else None
                await self._hand(partition, entry_id, 1, fields, target)

    async def _blocking_read(self, read: Awaitable[Any], block_ms: int) -> Any:
        with anyio.CancelScope() as scope:
            self._read_scope = scope
            try:
                with anyio.fail_after(block_ms / 1000 + _BLOCK_GRACE_S):
                    return await read
            except TimeoutError as exc:
                raise StoreUnavailable(
                    f"redis at {self._url} did not answer a {block_ms} ms blocking read"
                    f" within {_BLOCK_GRACE_S} s more"
                ) from exc
            finally:
                self._read_scope = None
        return None

    async def _hand(
        self,
        partition: int,
        entry_id: bytes,
        deliveries: int,
        fields: Sequence[bytes] | None,
        out: list[Delivery] | None,
    ) -> None:
        """Decode one entry into ``out`` (or the surplus when ``out`` is None); an entry that
        does not decode is dead-lettered and acknowledged instead."""
        entry = entry_id.decode()
        where = f"feed {partition} entry {entry}"
        payload = entry_payload(fields)
        raw = b"" if payload is None else payload[1]
        try:
            envelope = _decode(payload, where)
        except DecodeError as exc:
            await self._scripts.dead_letter(
                [self._streams[partition], self._keys.dead(partition)],
                [self._group, entry_id, f"{REASON_UNDECODABLE}: {exc}", deliveries, raw],
            )
            return
        delivery = Delivery(
            envelope=envelope, partition=partition, entry_id=entry, deliveries=deliveries
        )
        if out is None:
            self._surplus.append(delivery)
        else:
            out.append(delivery)


def _decode(payload: tuple[int, bytes] | None, where: str) -> Envelope:
    if payload is None:
        raise DecodeError(f"{where}: the entry holds no event bytes")
    seq, raw = payload
    return codec.decode(raw, seq=seq, where=where)


async def _last(replies: Awaitable[list[Any]]) -> Any:
    return (await replies)[-1]


def _by_partition(deliveries: Sequence[Delivery]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.partition, []).append(delivery.entry_id)
    return grouped
