"""Looking after the partition feeds and work streams of the redis backend: group progress,
dead letters, trims."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from eventstore import codec
from eventstore.errors import DecodeError
from eventstore.events import Envelope
from eventstore.keys import Keys
from eventstore.redis_append import entry_payload
from eventstore.redis_conn import command, run_commands, translate_errors
from eventstore.store import Archiver, DeadLetter, GroupInfo, TrimReport

_PAGE: Final = 1000
EntryKey = tuple[int, int]


def _key(entry_id: bytes | str) -> EntryKey:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


def _fields(flat: Sequence[Any]) -> dict[bytes, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class FeedMaintenance:
    """Group info, dead letters and trimming over every partition feed and work stream."""

    def __init__(self, client: aioredis.Redis, keys: Keys, url: str) -> None:
        self._client = client
        self._keys = keys
        self.url = url

    async def group_info(self) -> list[GroupInfo]:
        """Pending and lag of every group on every feed and work stream (lag counted when
        Redis cannot say)."""
        with translate_errors(self.url):
            streams = await self._streams()
            groups = await self._groups([stream for _, stream, _ in streams])
            out = []
            for (partition, stream, _), infos in zip(streams, groups, strict=True):
                for info in infos:
                    lag = info[b"lag"]
                    if lag is None:
                        lag = await self._count(stream, b"(" + info[b"last-delivered-id"], b"+")
                    out.append(
                        GroupInfo(
                            group=info[b"name"].decode(),
                            partition=partition,
                            pending=int(info[b"pending"]),
                            lag=int(lag),
                        )
                    )
        return out

    async def dead_letters(self, partition: int | None = None) -> list[DeadLetter]:
        """Dead letters of one partition, or of all, oldest first per partition."""
        partitions = range(self._keys.partitions) if partition is None else [partition]
        out = []
        with translate_errors(self.url):
            for p in partitions:
                start = b"-"
                while True:
                    page = await command(
                        self._client, "XRANGE", self._keys.dead(p), start, "+", "COUNT", _PAGE
                    )
                    for _, flat in page:
                        fields = _fields(flat)
                        out.append(
                            DeadLetter(
                                partition=p,
                                entry_id=fields[b"entry"].decode(),
                                group=fields[b"group"].decode(),
                                reason=fields[b"reason"].decode(),
                                deliveries=int(fields[b"deliveries"]),
                                raw=fields[b"raw"],
                            )
                        )
                    if len(page) < _PAGE:
                        break
                    start = b"(" + page[-1][0]
        return out

    async def trim(
        self, horizon_ms: int, *, dry_run: bool = False, archive: Archiver | None = None
    ) -> TrimReport:
        """Per partition, drop feed entries below ``MINID`` = the least of ``<horizon_ms>-0``,
        each group's last-delivered id + 1 and each group's oldest pending id; ``archive`` is
        given the decodable ones first, a page at a time. Work streams are trimmed the same
        way (each by its own groups), without archive. A dry run only reports."""
        trimmed: dict[int, int] = {}
        min_ids: dict[int, str] = {}
        work_trimmed = dict.fromkeys(range(self._keys.partitions), 0)
        with translate_errors(self.url):
            streams = await self._streams()
            floors = await self._min_keys([stream for _, stream, _ in streams], max(horizon_ms, 0))
        for (partition, stream, is_feed), (ms, n) in zip(streams, floors, strict=True):
            min_id = f"{ms}-{n}"
            if is_feed:
                min_ids[partition] = min_id
            if (ms, n) == (0, 0):
                count = 0
            elif dry_run:
                with translate_errors(self.url):
                    count = await self._count(stream, b"-", f"({min_id}".encode())
            else:
                if archive is not None and is_feed:
                    await self._archive(partition, min_id, archive)
                with translate_errors(self.url):
                    count = await command(self._client, "XTRIM", stream, "MINID", min_id)
            if is_feed:
                trimmed[partition] = count
            else:
                work_trimmed[partition] += count
        return TrimReport(
            trimmed=trimmed, min_ids=min_ids, dry_run=dry_run, work_trimmed=work_trimmed
        )

    async def _streams(self) -> list[tuple[int, str, bool]]:
        """(partition, stream, whether it is the feed) of every feed and of every work stream
        in the queue sets."""
        partitions = range(self._keys.partitions)
        queues = await run_commands(
            self._client, [["SMEMBERS", self._keys.queues(p)] for p in partitions]
        )
        streams = []
        for partition, names in zip(partitions, queues, strict=True):
            streams.append((partition, self._keys.feed(partition), True))
            streams += (
                (partition, self._keys.work(partition, q.decode()), False) for q in sorted(names)
            )
        return streams

    async def _groups(self, streams: Sequence[str]) -> list[list[dict[bytes, Any]]]:
        pipe = self._client.pipeline(transaction=False)
        for stream in streams:
            pipe.execute_command("XINFO", "GROUPS", stream)
        out: list[list[dict[bytes, Any]]] = []
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, ResponseError):
                if "no such key" not in str(reply):
                    raise reply
                out.append([])
            else:
                out.append([_fields(flat) for flat in reply])
        return out

    async def _min_keys(self, streams: Sequence[str], horizon_ms: int) -> list[EntryKey]:
        groups = await self._groups(streams)
        pipe = self._client.pipeline(transaction=False)
        for stream, infos in zip(streams, groups, strict=True):
            for info in infos:
                pipe.execute_command("XPENDING", stream, info[b"name"])
        summaries = iter(await pipe.execute())
        floors = []
        for infos in groups:
            floor: EntryKey = (horizon_ms, 0)
            for info in infos:
                delivered_ms, delivered_n = _key(info[b"last-delivered-id"])
                floor = min(floor, (delivered_ms, delivered_n + 1))
                oldest_pending = next(summaries)[1]
                if oldest_pending is not None:
                    floor = min(floor, _key(oldest_pending))
            floors.append(floor)
        return floors

    async def _count(self, stream: str, start: bytes, end: bytes) -> int:
        count = 0
        while True:
            page = await command(self._client, "XRANGE", stream, start, end, "COUNT", _PAGE)
            count += len(page)
            if len(page) < _PAGE:
                return count
            start = b"(" + page[-1][0]

    async def _archive(self, partition: int, min_id: str, archive: Archiver) -> None:
        start = b"-"
        while True:
            with translate_errors(self.url):
                page = await command(
                    self._client,
                    "XRANGE",
                    self._keys.feed(partition),
                    start,
                    f"({min_id}",
                    "COUNT",
                    _PAGE,
                )
            if page:
                await archive(partition, _decodable(partition, page))
            if len(page) < _PAGE:
                return
            start = b"(" + page[-1][0]


def _decodable(partition: int, page: Sequence[Any]) -> list[Envelope]:
    envelopes = []
    for entry_id, fields in page:
        payload = entry_payload(fields)
        if payload is None:
            continue
        seq, raw = payload
        try:
            envelopes.append(
                codec.decode(raw, seq=seq, where=f"feed {partition} entry {entry_id.decode()}")
            )
        except DecodeError:
            continue
    return envelopes
