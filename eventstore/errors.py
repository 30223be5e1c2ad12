"""The one error tree of flowlog.

Every error raised on purpose by flowlog derives from :class:`FlowlogError`, and each is named
for the condition it reports, so callers can catch exactly what they can handle.
"""

from __future__ import annotations


class FlowlogError(Exception):
    """Root of every error flowlog raises on purpose."""


class StoreError(FlowlogError):
    """The event store could not do what was asked."""


class StoreUnavailable(StoreError):
    """The backing server cannot be reached (connection refused, timed out, closed)."""


class StoreClosed(StoreUnavailable):
    """The store or subscription was closed by its owner; it takes no more requests."""


class ConcurrencyConflict(StoreError):
    """An append with an expected seq found the run had moved on.

    ``expected`` is the seq the caller decided on, ``current`` the run's seq in the store.
    """

    def __init__(self, run_id: str, expected: int, current: int) -> None:
        super().__init__(f"run {run_id!r}: expected seq {expected} but the run is at seq {current}")
        self.run_id = run_id
        self.expected = expected
        self.current = current


class InvalidAppend(StoreError):
    """An append request is malformed (wrong run id, empty event id, mixed runs...)."""


class EventRejected(InvalidAppend):
    """One event of an append cannot be stored as it is; nothing of the append was written.
    ``event_id`` names the event."""

    def __init__(self, event_id: str, message: str) -> None:
        super().__init__(message)
        self.event_id = event_id


class EventTooLarge(EventRejected):
    """An encoded event is over ``max_event_bytes``; nothing was written."""

    def __init__(self, event_id: str, size: int, limit: int) -> None:
        super().__init__(
            event_id,
            f"event {event_id!r} is {size} bytes encoded, over the limit of {limit} bytes"
            " (max_event_bytes); nothing was written",
        )
        self.size = size
        self.limit = limit


class EventNotEncodable(EventRejected):
    """An event holds a value the log cannot store (an integer beyond 64 bits, a field of the
    wrong type that would not read back); nothing was written."""

    def __init__(self, event_id: str, run_id: str, reason: str) -> None:
        super().__init__(
            event_id,
            f"event {event_id!r} of run {run_id!r} cannot be stored: {reason}; nothing was written",
        )


class DecodeError(FlowlogError):
    """Bytes read from the log are not a valid flowlog event (a poison entry)."""


class SpoolError(StoreError):
    """The local fallback spool file could not be written or read."""
