"""Encoding of events: msgpack for storage, JSON lines for export, upcasting of old versions.

Encoders and decoders are module-level singletons (creating them is the expensive part).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from eventstore.errors import DecodeError, EventNotEncodable, EventTooLarge, InvalidAppend
from eventstore.events import SCHEMA_VERSION, Envelope

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

#: ``UPCASTERS[n]`` turns the raw mapping of a version ``n`` envelope into version ``n + 1``.
UPCASTERS: Final[dict[int, Upcaster]] = {}

_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder(Envelope)
_MSGPACK_RAW_DECODER: Final = msgspec.msgpack.Decoder(dict[str, Any])
_JSON_ENCODER: Final = msgspec.json.Encoder()
_JSON_DECODER: Final = msgspec.json.Decoder(Envelope)
_JSON_RAW_DECODER: Final = msgspec.json.Decoder(dict[str, Any])


def encode(envelope: Envelope) -> bytes:
    """The msgpack bytes stored in the log; raises :class:`EventNotEncodable` for an event
    holding a value msgpack cannot carry (an integer beyond 64 bits, a non-data object)."""
    try:
        return _MSGPACK_ENCODER.encode(envelope)
    except (msgspec.EncodeError, OverflowError, TypeError) as exc:
        raise EventNotEncodable(envelope.event_id, envelope.run_id, str(exc)) from exc


def encode_value(value: Any) -> bytes:
    """msgpack bytes of any msgspec-encodable value (snapshots, timer payloads)."""
    return _MSGPACK_ENCODER.encode(value)


def _upcast(raw: dict[str, Any], where: str) -> Envelope:
    version = raw.get("v", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise DecodeError(f"{where}: unsupported event schema version {version!r}")
    while version < SCHEMA_VERSION:
        upcaster = UPCASTERS.get(version)
        if upcaster is None:
            raise DecodeError(f"{where}: no upcaster from schema version {version}")
        raw = upcaster(raw)
        version += 1
        raw["v"] = version
    try:
        return msgspec.convert(raw, Envelope)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"{where}: {exc}") from exc


def decode(data: bytes, *, seq: int = 0, where: str = "event") -> Envelope:
    """Decode stored msgpack bytes; ``seq`` (kept beside the bytes) is filled in when given.

    Raises :class:`DecodeError` naming ``where`` for bytes that are not a flowlog event.
    """
    try:
        envelope = _MSGPACK_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        try:
            raw = _MSGPACK_RAW_DECODER.decode(data)
        except msgspec.DecodeError:
            raise DecodeError(f"{where}: not a flowlog event ({exc})") from exc
        envelope = _upcast(raw, where)
    if envelope.v != SCHEMA_VERSION:
        envelope = _upcast(_MSGPACK_RAW_DECODER.decode(data), where)
    if seq:
        envelope = msgspec.structs.replace(envelope, seq=seq)
    return envelope


def encode_append(
    run_id: str, events: Sequence[Envelope], expected_seq: int | None, max_event_bytes: int
) -> list[tuple[Envelope, bytes]]:
    """One run's append checked and encoded as every backend stores it, before anything is
    written: per event, the envelope read back from its bytes (seq 0: the store assigns it;
    what readers get) and the bytes.

    Raises :class:`InvalidAppend` (no run id, a negative expected seq, an event of another
    run, an empty event id), :class:`EventTooLarge` (over ``max_event_bytes``) and
    :class:`EventNotEncodable` (a value msgpack cannot carry, or bytes that do not read back:
    a producer that put a field of the wrong type in an event would otherwise write an entry
    no reader can decode).
    """
    if not run_id:
        raise InvalidAppend("an append needs a run id")
    if expected_seq is not None and expected_seq < 0:
        raise InvalidAppend(f"run {run_id!r}: expected seq {expected_seq} is negative")
    prepared = []
    for envelope in events:
        event_id = envelope.event_id
        if envelope.run_id != run_id:
            raise InvalidAppend(
                f"event {event_id!r} belongs to run {envelope.run_id!r}, not to run {run_id!r}"
            )
        if not event_id:
            raise InvalidAppend(f"an event of run {run_id!r} has an empty event id")
        raw = encode(msgspec.structs.replace(envelope, seq=0) if envelope.seq else envelope)
        if len(raw) > max_event_bytes:
            raise EventTooLarge(event_id, len(raw), max_event_bytes)
        try:
            stored = decode(raw)
        except DecodeError as exc:
            raise EventNotEncodable(event_id, run_id, f"it does not read back ({exc})") from exc
        prepared.append((stored, raw))
    return prepared


def to_json_line(envelope: Envelope) -> bytes:
    """One envelope as a JSON line (stable field order, newline-terminated)."""
    return _JSON_ENCODER.encode(envelope) + b"\n"


def from_json_line(line: bytes | str, *, where: str = "line") -> Envelope:
    """Decode one exported JSON line, upcasting older schema versions."""
    try:
        envelope = _JSON_DECODER.decode(line)
    except msgspec.DecodeError as exc:
        try:
            raw = _JSON_RAW_DECODER.decode(line)
        except msgspec.DecodeError:
            raise DecodeError(f"{where}: not a flowlog event ({exc})") from exc
        return _upcast(raw, where)
    if envelope.v != SCHEMA_VERSION:
        return _upcast(_JSON_RAW_DECODER.decode(line), where)
    return envelope


def entry_digest(raw: bytes) -> str:
    """``sha1_hex(raw)``: the digest of a stored envelope that :func:`chain_hash` links."""
    return hashlib.sha1(raw).hexdigest()


def chain_hash(previous: str, seq: int, raw: bytes) -> str:
    """The tamper-evident hash of a run's entry:
    ``sha1_hex(previous "\\n" seq "\\n" sha1_hex(raw))``.

    ``raw`` is the stored encoding (:func:`encode` of the envelope with ``seq`` 0),
    ``previous`` the hash of entry ``seq - 1`` ("" for seq 1). A run's head keeps the last one.
    The envelope enters through its digest, so the redis backend's append script hashes a
    short string per event while the writer, which has the bytes at hand, digests them.
    """
    return hashlib.sha1(
        b"%s\n%d\n%s" % (previous.encode(), seq, entry_digest(raw).encode())
    ).hexdigest()


class _StoredPayload(msgspec.Struct):
    """What :func:`payload_digest` covers, read from stored bytes without decoding the data."""

    run_id: str
    data: msgspec.Raw


_PAYLOAD_DECODER: Final = msgspec.msgpack.Decoder(_StoredPayload)


def payload_digest(envelope: Envelope) -> str:
    """Digest of what makes two events with one event id "the same": run and payload.

    Time, producer and trace context are left out: a producer that retries an append with a
    fresh timestamp is still sending the same event.
    """
    digest = hashlib.blake2b(envelope.run_id.encode(), digest_size=16)
    digest.update(_MSGPACK_ENCODER.encode(envelope.data))
    return digest.hexdigest()


def stored_payload_digest(raw: bytes) -> str:
    """:func:`payload_digest` of the envelope stored as ``raw`` (:func:`encode` bytes), from its
    bytes: the payload is hashed as it was encoded, not decoded and encoded again."""
    stored = _PAYLOAD_DECODER.decode(raw)
    digest = hashlib.blake2b(stored.run_id.encode(), digest_size=16)
    digest.update(stored.data)
    return digest.hexdigest()
