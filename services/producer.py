"""Wrapping payloads into envelopes: who produced them, when, and what caused them."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from eventstore.events import Envelope, EventData
from eventstore.ids import new_event_id


def now_ms() -> int:
    """Wall-clock unix time in milliseconds (the producer's timestamp)."""
    return time.time_ns() // 1_000_000


def default_instance() -> str:
    """``<hostname>-<pid>``: unique per process, readable in logs and ``producer`` fields."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Producer:
    """Stamps events with the producing service and instance, a timestamp and causation."""

    __slots__ = ("clock_ms", "name")

    def __init__(self, service: str, instance: str = "", clock_ms: Callable[[], int] = now_ms):
        self.name = f"{service}:{instance or default_instance()}"
        self.clock_ms = clock_ms

    def envelope(
        self,
        run_id: str,
        data: EventData,
        *,
        event_id: str = "",
        causation_id: str = "",
        traceparent: str = "",
        ts: int | None = None,
    ) -> Envelope:
        """An event from this producer, stamped ``ts`` (default: the producer's clock now)."""
        return Envelope(
            event_id=event_id or new_event_id(),
            run_id=run_id,
            ts=self.clock_ms() if ts is None else ts,
            producer=self.name,
            data=data,
            causation_id=causation_id,
            traceparent=traceparent,
        )
