"""Lingering between fetches, for consumers whose work is not on the latency path.

The checkpointer and the metrics projector read every event of the log, but nobody waits for
them. After a partial batch they wait a little before fetching again, so under load they get
fewer, larger batches (one fetch and one acknowledgement per batch instead of per handful of
events), leaving the CPU to the scheduler and the runners.
"""

from __future__ import annotations

import anyio

#: How long a non-latency-critical consumer waits after a partial batch.
LINGER_S = 0.05


async def linger(stop: anyio.Event, fetched: int, batch: int, seconds: float = LINGER_S) -> None:
    """Wait ``seconds`` (or until ``stop``) when the last fetch returned a partial batch."""
    if 0 < fetched < batch and seconds > 0:
        with anyio.move_on_after(seconds):
            await stop.wait()
