"""Opening the event store a process is configured for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from eventstore.errors import FlowlogError
from eventstore.fallback import FallbackStore
from eventstore.memory import MemoryStore
from eventstore.redis_store import RedisStore
from eventstore.store import EventStore, StoreConfig
from services.settings import Settings


class RedisNotConfigured(FlowlogError):
    """A command that works on shared state was run with no Redis URL configured."""

    def __init__(self, command: str) -> None:
        super().__init__(
            f"`flowlog {command}` needs Redis, and none is configured: pass --redis-url or set"
            " FLOWLOG_REDIS_URL (e.g. redis://127.0.0.1:6379/0). To try flowlog without Redis,"
            " run `flowlog demo` (everything in one process on the in-memory store)."
        )


def store_config(settings: Settings) -> StoreConfig:
    """The store settings with the audit key (``FLOWLOG_AUDIT_KEY``) threaded in."""
    config = settings.store.to_config()
    if settings.audit_key is None:
        return config
    return msgspec.structs.replace(config, audit_key=settings.audit_key.get_secret_value().encode())


@asynccontextmanager
async def open_store(
    settings: Settings, *, command: str, require_redis: bool, spool: bool = False
) -> AsyncIterator[EventStore]:
    """The configured store: Redis (wrapped with the local spool when ``spool``), or the
    in-memory store when no Redis URL is set and the command can run without one."""
    config = store_config(settings)
    if settings.redis_url is None:
        if require_redis:
            raise RedisNotConfigured(command)
        memory = MemoryStore(config)
        try:
            yield memory
        finally:
            await memory.close()
        return
    redis_store = RedisStore.from_url(settings.redis_url.get_secret_value(), config)
    store: EventStore = redis_store
    if spool:
        fallback = FallbackStore(redis_store, settings.store.spool_path)
        async with fallback:
            yield fallback
        return
    try:
        yield store
    finally:
        await store.close()
