"""The append script's calling convention (one run batch in, per-event results out) and the
layout of the stream entries it writes.

Python validates, encodes and size-checks every event before anything is sent; the script
(``append.lua``) does the dedup lookups, the expected-seq check and the writes atomically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from eventstore import codec
from eventstore.events import Envelope
from eventstore.keys import Keys, RunKeys
from eventstore.store import (
    PASSIVE_EVENT_TYPES,
    STATUS_BY_EVENT_TYPE,
    TERMINAL_STATUSES,
    AppendResult,
    Outcome,
    StoreConfig,
    work_queue,
)

_TERMINAL: Final = " ".join(sorted(TERMINAL_STATUSES)).encode()
_STATUS: Final = {
    event_type: status.encode() for event_type, status in STATUS_BY_EVENT_TYPE.items()
}
_OUTCOMES: Final = {
    b"a": Outcome.APPENDED,
    b"d": Outcome.DUPLICATE,
    b"m": Outcome.MISMATCH,
    b"c": Outcome.CONFLICT,
}
_REPLY_WIDTH: Final = 4


class PreparedAppend:
    """One run batch, validated and encoded, ready to become part of an ``append.lua`` call."""

    __slots__ = ("events", "expected_seq", "keys", "raws", "run_id")

    def __init__(
        self,
        keys: RunKeys,
        run_id: str,
        events: Sequence[Envelope],
        raws: list[bytes],
        expected_seq: int | None,
    ) -> None:
        self.keys = keys
        self.run_id = run_id
        self.events = events
        self.raws = raws
        self.expected_seq = expected_seq

    def segment(self, config: StoreConfig, call_keys: list[bytes], args: list[bytes]) -> None:
        """Add this batch's part of an ``append.lua`` call to ``call_keys`` and ``args`` (payload
        digests and key names are computed here, so a caller can do it while earlier calls
        already run on the server)."""
        keys = self.keys
        # The work streams of the batch, after its dedup keys; an event names its own by
        # position (1-based, 0: none).
        event_queues = [work_queue(envelope) for envelope in self.events]
        queues: dict[str, int] = {}
        for queue in event_queues:
            if queue is not None:
                queues.setdefault(queue, len(queues) + 1)
        call_keys += (keys.run.encode(), keys.head.encode(), keys.snap.encode())
        args += (
            self.run_id.encode(),
            b"-1" if self.expected_seq is None else b"%d" % self.expected_seq,
            b"%d" % len(self.events),
            b"%d" % len(queues),
        )
        audit = bool(config.audit_key)
        for envelope, raw, queue in zip(self.events, self.raws, event_queues, strict=True):
            call_keys.append(keys.dedup(envelope.event_id).encode())
            event_type = envelope.type
            args += (
                codec.payload_digest(envelope).encode(),
                raw,
                _STATUS.get(event_type, b""),
                codec.entry_digest(raw).encode(),
                hashlib.sha256(raw).hexdigest().encode() if audit else b"",
                b"1" if event_type in PASSIVE_EVENT_TYPES else b"",
                b"0" if queue is None else b"%d" % queues[queue],
            )
        call_keys += (keys.work(queue).encode() for queue in queues)
        args += (queue.encode() for queue in queues)

    def results(self, reply: Sequence[Any], offset: int = 0) -> list[AppendResult]:
        """Turn this batch's part of the script's flat reply (outcome, seq, entry id, current
        seq per event, from ``offset``) into :class:`AppendResult` values."""
        out = []
        for index, envelope in enumerate(self.events):
            at = offset + index * _REPLY_WIDTH
            code, seq, entry_id, current = reply[at : at + _REPLY_WIDTH]
            out.append(
                AppendResult(
                    event_id=envelope.event_id,
                    outcome=_OUTCOMES[code],
                    seq=seq,
                    entry_id=entry_id.decode(),
                    current_seq=current,
                )
            )
        return out


def script_call(
    batches: Sequence[PreparedAppend], config: StoreConfig
) -> tuple[list[bytes], list[bytes]]:
    """KEYS and ARGV of one ``append.lua`` call appending ``batches`` (runs of one partition,
    each batch non-empty)."""
    keys = batches[0].keys
    call_keys = [keys.feed.encode(), keys.runs.encode(), keys.queues.encode()]
    args = [
        b"%d" % config.dedup_ttl_ms,
        b"%d" % config.retention_ms,
        _TERMINAL,
        config.audit_key,
    ]
    for batch in batches:
        batch.segment(config, call_keys, args)
    return call_keys, args


def call_results(
    batches: Sequence[PreparedAppend], reply: Sequence[Any]
) -> list[list[AppendResult]]:
    """The results of each of ``batches`` from the reply of their ``append.lua`` call."""
    out = []
    offset = 0
    for batch in batches:
        out.append(batch.results(reply, offset))
        offset += len(batch.events) * _REPLY_WIDTH
    return out


def prepare(
    keys: Keys,
    config: StoreConfig,
    run_id: str,
    events: Sequence[Envelope],
    expected_seq: int | None,
) -> PreparedAppend:
    """Validate and encode one run batch; raises before anything is sent (see
    :func:`eventstore.codec.encode_append`)."""
    prepared = codec.encode_append(run_id, events, expected_seq, config.max_event_bytes)
    raws = [raw for _, raw in prepared]
    return PreparedAppend(keys.for_run(run_id), run_id, events, raws, expected_seq)


def entry_payload(fields: Sequence[bytes] | None) -> tuple[int, bytes] | None:
    """``(seq, envelope bytes)`` of a stream entry's field list, or None if it has none."""
    if not fields:
        return None
    if len(fields) >= 4 and fields[0] == b"s" and fields[2] == b"e":
        seq_field, raw = fields[1], fields[3]
    else:
        found = dict(zip(fields[::2], fields[1::2], strict=False))
        if b"e" not in found:
            return None
        seq_field, raw = found.get(b"s", b"0"), found[b"e"]
    return (int(seq_field) if seq_field.isdigit() else 0), raw
