"""Connections for the redis backend: clients, error translation, Lua scripts.

The adapter talks to Redis through a *raw* client: RESP2, no decoding, no response callbacks.
Replies arrive as hiredis builds them (lists of bytes) and the adapter decodes them itself,
once, at the edge.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from eventstore.errors import StoreError, StoreUnavailable

Key = str | bytes
Arg = str | bytes | int | float
ScriptCall = tuple[Sequence[Key], Sequence[Arg]]

_POOL_BOUND_SETTINGS = ("maint_notifications", "orig_", "himport_registry")
#: Commands encoded per write when streaming script calls.
_STREAM_CHUNK = 32
#: Time allowed per streamed script call on top of the socket timeout when reading replies.
_REPLY_ALLOWANCE_S = 0.05


def redact_url(url: str) -> str:
    """``url`` without its password (the user name stays: it helps and is not secret)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def describe_pool(pool: ConnectionPool) -> str:
    """A password-free URL naming the server a pool connects to."""
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if "ssl" in pool.connection_class.__name__.lower() else "redis"
    user = f"{kwargs['username']}@" if kwargs.get("username") else ""
    host = kwargs.get("host", "localhost")
    return f"{scheme}://{user}{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn redis-py errors into flowlog's: unreachable -> ``StoreUnavailable``."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"redis at {url} is unavailable: {exc}") from exc
    except RedisError as exc:
        raise StoreError(f"redis at {url} failed: {exc}") from exc


def client_from_url(url: str, *, socket_timeout_s: float = 5.0) -> aioredis.Redis:
    """A client for ``redis://`` or ``rediss://`` URLs (ACL user and password allowed).

    Retries are few and short, so an outage surfaces quickly as ``StoreUnavailable``.
    """
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2)
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 2.0),
        retry=retry,
        health_check_interval=30,
    )


def _resp2_kwargs(pool: ConnectionPool, **changes: Any) -> dict[str, Any]:
    """``pool``'s connection settings for a RESP2, non-decoding pool of our own (settings
    that only exist for RESP3 connections, or belong to the original pool, are left out)."""
    kwargs = {
        key: value
        for key, value in pool.connection_kwargs.items()
        if not key.startswith(_POOL_BOUND_SETTINGS)
    }
    return {**kwargs, "protocol": 2, "decode_responses": False, **changes}


def raw_client(pool: ConnectionPool) -> tuple[aioredis.Redis, bool]:
    """A client whose replies are not post-processed by redis-py: RESP2, bytes, no callbacks.

    It shares ``pool`` when that already speaks RESP2 without decoding, else it gets a pool of
    its own with the same connection settings; the flag says whether the pool is its own.
    """
    kwargs = pool.connection_kwargs
    own = str(kwargs.get("protocol")) != "2" or bool(kwargs.get("decode_responses"))
    if own:
        pool = ConnectionPool(connection_class=pool.connection_class, **_resp2_kwargs(pool))
    client = aioredis.Redis(connection_pool=pool)
    client.response_callbacks = {}
    return client, own


def blocking_client(pool: ConnectionPool) -> aioredis.Redis:
    """A raw client with its own pool for blocking reads: no socket timeout (callers bound
    the wait themselves), and no sharing, so a blocked read never holds up other commands."""
    own_pool = ConnectionPool(
        connection_class=pool.connection_class, **_resp2_kwargs(pool, socket_timeout=None)
    )
    client = aioredis.Redis(connection_pool=own_pool)
    client.response_callbacks = {}
    return client


async def command(client: aioredis.Redis, *args: Arg) -> Any:
    """Send one command and return the reply as parsed by hiredis (typed entry point)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def run_commands(client: aioredis.Redis, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    """Send ``commands`` in one write on one connection of ``client``'s pool and return their
    replies as hiredis parses them; raises the first error reply once every reply is read.

    The hot path of a subscription (acknowledge, then read, on every fetch) goes through here
    rather than through a redis-py pipeline, whose bookkeeping cost a consumer about a third of
    the CPU of each fetch. A lost connection is retried as the client's retry policy says, as
    redis-py retries its own commands: acknowledgements are idempotent, and entries a lost
    reply carried stay pending for the consumer, to be claimed.
    """
    retry = client.get_retry()
    if retry is None:
        return await _exchange(client, commands)
    replies: list[Any] = await retry.call_with_retry(
        functools.partial(_exchange, client, commands), _connection_dropped
    )
    return replies


async def _exchange(client: aioredis.Redis, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    replies: list[Any] = []
    failure: ResponseError | None = None
    async with _connection(client) as connection:
        await connection.send_packed_command([pack(args) for args in commands])
        for _ in commands:
            try:
                replies.append(
                    await connection.read_response(disable_decoding=True, timeout=math.inf)
                )
            except ResponseError as exc:
                failure = failure or exc
                replies.append(exc)
    if failure is not None:
        raise failure
    return replies


async def _connection_dropped(error: Exception) -> None:
    """Nothing to do before a retry: the failed connection was disconnected already."""


@asynccontextmanager
async def _connection(client: aioredis.Redis) -> AsyncIterator[AbstractConnection]:
    """A connection of ``client``'s pool to stream commands on, back to the pool afterwards;
    disconnected first if anything went wrong (replies may be left unread on it)."""
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield connection
    except BaseException:
        with anyio.CancelScope(shield=True):
            await connection.disconnect()
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await pool.release(connection)


def _script_source(name: str) -> str:
    return resources.files("eventstore").joinpath(name).read_text(encoding="utf-8")


def pack(args: Sequence[Arg]) -> bytes:
    """One command in the Redis protocol (RESP), encoded by hiredis (in C)."""
    # hiredis's stub declares a one-item tuple; any number of arguments is taken.
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]
    return packed


def _reply_deadline_s(connection: AbstractConnection, calls: int) -> float:
    """How long the replies to ``calls`` streamed script calls may take in all: the socket
    timeout for the first, and a generous allowance per further call."""
    timeout = connection.socket_timeout
    return math.inf if timeout is None else timeout + calls * _REPLY_ALLOWANCE_S


class LuaScript:
    """A Lua script shipped with the package, run by EVALSHA (loaded again on NOSCRIPT).

    Calls go out as one stream of commands on one connection: the first commands are on the
    wire, and running on the server, while the next ones are still being encoded.
    """

    def __init__(self, client: aioredis.Redis, name: str, includes: Sequence[str] = ()) -> None:
        """``includes`` name chunks (e.g. ``sha256.lua``) placed in front of ``name``'s source."""
        self.name = name
        source = "\n".join(_script_source(part) for part in (*includes, name))
        self._script = client.register_script(source)
        self._client = client

    async def __call__(self, keys: Sequence[Key], args: Sequence[Arg]) -> Any:
        [reply] = await self.run_many([(keys, args)])
        return reply

    async def run_many(
        self, calls: Iterable[ScriptCall], parse: Callable[[int, Any], Any] | None = None
    ) -> list[Any]:
        """Run the script once per ``(keys, args)``, all in one round trip, in order.

        ``calls`` is consumed while the first calls are already on their way. Calls are
        independent (no transaction). If the server lost the script, the calls that failed
        with NOSCRIPT are sent again, in order, after loading it. ``parse(position, reply)``,
        if given, turns each reply into the result as soon as it is read, while the server
        is still running later calls.
        """
        sent: list[ScriptCall] = []
        results = await self._stream(calls, sent, parse, itertools.count())
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await self._client.script_load(self._script.script)
            retried = await self._stream([sent[i] for i in missing], [], parse, iter(missing))
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _stream(
        self,
        calls: Iterable[ScriptCall],
        sent: list[ScriptCall],
        parse: Callable[[int, Any], Any] | None,
        positions: Iterator[int],
    ) -> list[Any]:
        sha = self._script.sha
        replies: list[Any] = []
        async with _connection(self._client) as connection:
            chunk: list[bytes] = []
            # The first call goes out alone, so the server starts while the next are encoded;
            # then chunks double up to _STREAM_CHUNK calls per write.
            size = 1
            for call in calls:
                sent.append(call)
                keys, args = call
                chunk.append(pack(["EVALSHA", sha, len(keys), *keys, *args]))
                if len(chunk) == size:
                    # Only the first write may check the connection's health (a PING).
                    await connection.send_packed_command(chunk, check_health=len(sent) == 1)
                    chunk = []
                    size = min(size * 2, _STREAM_CHUNK)
            if chunk:
                await connection.send_packed_command(chunk, check_health=len(sent) == len(chunk))
            with anyio.fail_after(_reply_deadline_s(connection, len(sent))):
                for position in itertools.islice(positions, len(sent)):
                    try:
                        reply = await connection.read_response(
                            disable_decoding=True, timeout=math.inf
                        )
                    except ResponseError as exc:
                        replies.append(exc)
                    else:
                        replies.append(reply if parse is None else parse(position, reply))
        return replies
