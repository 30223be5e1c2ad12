"""Waiting for consumer groups to catch up with the log (a condition, polled with a deadline)."""

from __future__ import annotations

import anyio

from eventstore.store import EventStore


async def caught_up(store: EventStore, *groups: str, timeout_s: float = 30) -> None:
    """Wait until every named group has read and acknowledged every feed entry."""
    with anyio.fail_after(timeout_s):
        while True:
            infos = [g for g in await store.group_info() if g.group in groups]
            seen = {g.group for g in infos}
            if seen == set(groups) and all(g.pending == 0 and g.lag == 0 for g in infos):
                return
            await anyio.sleep(0.02)
