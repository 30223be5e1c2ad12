"""The event codec: round trips for every event type, poison bytes, upcasting, digests."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import codec
from eventstore.errors import DecodeError
from eventstore.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    Envelope,
    RunStarted,
    StepSucceeded,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | FLOATS | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def strategy_for(info: mi.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec type that survive both msgpack and JSON."""
    match info:
        case mi.AnyType():
            return JSON_VALUES
        case mi.NoneType():
            return st.none()
        case mi.BoolType():
            return st.booleans()
        case mi.IntType(ge=ge, le=le):
            return st.integers(
                min_value=-(2**63) if ge is None else ge, max_value=2**63 - 1 if le is None else le
            )
        case mi.FloatType():
            return FLOATS
        case mi.StrType():
            return st.text()
        case mi.LiteralType(values=values):
            return st.sampled_from(values)
        case mi.UnionType(types=types):
            return st.one_of([strategy_for(t) for t in types])
        case mi.ListType(item_type=item):
            return st.lists(strategy_for(item), max_size=4)
        case mi.VarTupleType(item_type=item):
            return st.lists(strategy_for(item), max_size=4).map(tuple)
        case mi.TupleType(item_types=items):
            return st.tuples(*(strategy_for(t) for t in items))
        case mi.DictType(key_type=mi.StrType(), value_type=value):
            return st.dictionaries(st.text(max_size=8), strategy_for(value), max_size=4)
        case mi.StructType(cls=cls, fields=fields):
            return st.builds(cls, **{f.name: strategy_for(f.type) for f in fields})
    raise NotImplementedError(f"no strategy for {info!r}: extend strategy_for")


def envelopes(event_type: str) -> st.SearchStrategy[Envelope]:
    """Envelopes of the current schema version carrying an ``event_type`` payload."""
    envelope_info = mi.type_info(Envelope)
    assert isinstance(envelope_info, mi.StructType)
    fields = {f.name: strategy_for(f.type) for f in envelope_info.fields}
    fields["data"] = strategy_for(mi.type_info(EVENT_TYPES[event_type]))
    fields["v"] = st.just(SCHEMA_VERSION)
    return st.builds(Envelope, **fields)


def example(**changes: Any) -> Envelope:
    envelope = Envelope(
        event_id="e1",
        run_id="run-1",
        ts=1_700_000_000_000,
        producer="scheduler/1",
        data=StepSucceeded(step="fetch", attempt=1, agent="echo", output={"n": 1}),
    )
    return msgspec.structs.replace(envelope, **changes)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_event_type_round_trips(event_type: str, data: st.DataObject) -> None:
    envelope = data.draw(envelopes(event_type))
    assert envelope.type == event_type
    assert codec.decode(codec.encode(envelope)) == envelope
    assert codec.from_json_line(codec.to_json_line(envelope)) == envelope


def test_decode_fills_in_the_seq_kept_beside_the_bytes() -> None:
    assert codec.decode(codec.encode(example()), seq=42).seq == 42


def test_json_line_is_one_newline_terminated_line() -> None:
    line = codec.to_json_line(example(data=StepSucceeded(step="a\nb", attempt=1, agent="x")))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1",
        b"\x92\x01",
        codec.encode_value({"event_id": "e1"}),
        codec.encode_value([1, 2, 3]),
        codec.encode_value(
            {"event_id": "e", "run_id": "r", "ts": 1, "producer": "p", "data": {"type": "nope"}}
        ),
    ],
)
def test_garbage_raises_decode_error_naming_where(garbage: bytes) -> None:
    with pytest.raises(DecodeError, match="feed 3 entry 17-0"):
        codec.decode(garbage, where="feed 3 entry 17-0")


@pytest.mark.parametrize("line", [b"{oops", b"[]", b'{"event_id": 1}', b""])
def test_bad_json_line_raises_decode_error_naming_where(line: bytes) -> None:
    with pytest.raises(DecodeError, match=r"archive\.jsonl:7"):
        codec.from_json_line(line, where="archive.jsonl:7")


def test_newer_schema_version_is_refused() -> None:
    raw = msgspec.to_builtins(example())
    raw["v"] = SCHEMA_VERSION + 1
    with pytest.raises(DecodeError, match="unsupported event schema version"):
        codec.decode(codec.encode_value(raw))


def test_upcaster_turns_an_older_version_into_the_current_one() -> None:
    older = SCHEMA_VERSION - 1
    old_event = {
        "event_id": "e1",
        "run_id": "run-1",
        "when": 123,
        "producer": "scheduler/1",
        "data": {"type": "run_started"},
        "v": older,
    }

    def rename_when_to_ts(raw: dict[str, Any]) -> dict[str, Any]:
        upcast = dict(raw)
        upcast["ts"] = upcast.pop("when")
        return upcast

    stored = codec.encode_value(old_event)
    expected = Envelope(
        event_id="e1", run_id="run-1", ts=123, producer="scheduler/1", data=RunStarted()
    )
    assert older not in codec.UPCASTERS
    codec.UPCASTERS[older] = rename_when_to_ts
    try:
        assert codec.decode(stored) == expected
        assert codec.from_json_line(json.dumps(old_event)) == expected
    finally:
        del codec.UPCASTERS[older]
    with pytest.raises(DecodeError, match=f"no upcaster from schema version {older}"):
        codec.decode(stored)


def test_payload_digest_ignores_time_producer_and_trace_but_not_data() -> None:
    original = example()
    retried = example(ts=1, producer="scheduler/2", traceparent="00-aa-bb-01", seq=9)
    assert codec.payload_digest(retried) == codec.payload_digest(original)
    changed = example(data=StepSucceeded(step="fetch", attempt=1, agent="echo", output={"n": 2}))
    assert codec.payload_digest(changed) != codec.payload_digest(original)
    assert codec.payload_digest(example(run_id="run-2")) != codec.payload_digest(original)


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_the_payload_digest_of_stored_bytes_is_the_envelopes(
    event_type: str, data: st.DataObject
) -> None:
    envelope = data.draw(envelopes(event_type))
    stored = codec.encode(msgspec.structs.replace(envelope, seq=0))
    assert codec.stored_payload_digest(stored) == codec.payload_digest(envelope)


def test_chain_hash_links_each_entry_to_the_previous() -> None:
    first = codec.chain_hash("", 1, b"abc")
    abc, def_ = (hashlib.sha1(raw).hexdigest().encode() for raw in (b"abc", b"def"))
    assert first == hashlib.sha1(b"\n1\n" + abc).hexdigest()
    second = codec.chain_hash(first, 2, b"def")
    assert second == hashlib.sha1(first.encode() + b"\n2\n" + def_).hexdigest()
