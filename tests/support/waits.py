"""Waiting on conditions of the log with a deadline (polled, never a fixed sleep)."""

from __future__ import annotations

import logging

import anyio

from eventstore.events import Envelope
from eventstore.store import EventStore


async def events_of(store: EventStore, run_id: str) -> list[Envelope]:
    """The run's whole history."""
    return [e async for e in store.read_run(run_id)]


async def wait_for_event(
    store: EventStore, run_id: str, kind: type, timeout_s: float = 30
) -> Envelope:
    """The first event of ``kind`` in the run's stream, once there is one."""
    with anyio.fail_after(timeout_s):
        while True:
            for event in await events_of(store, run_id):
                if isinstance(event.data, kind):
                    return event
            await anyio.sleep(0.05)


async def wait_status(store: EventStore, run_id: str, status: str, timeout_s: float = 30) -> None:
    """Wait until the run's head has ``status``."""
    with anyio.fail_after(timeout_s):
        while True:
            head = await store.head(run_id)
            if head is not None and head.status == status:
                return
            await anyio.sleep(0.05)


async def caught_up(store: EventStore, *groups: str, timeout_s: float = 30) -> None:
    """Wait until every named group has read and acknowledged every feed entry."""
    with anyio.fail_after(timeout_s):
        while True:
            infos = [g for g in await store.group_info() if g.group in groups]
            seen = {g.group for g in infos}
            if seen == set(groups) and all(g.pending == 0 and g.lag == 0 for g in infos):
                return
            await anyio.sleep(0.02)


class LogSeen(logging.Handler):
    """Sets :attr:`seen` when a record with ``message`` is logged (add it to the logger)."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.message:
            self.seen.set()
