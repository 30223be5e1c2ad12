"""Pure verification of stored run histories (``eventstore.audit``)."""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from eventstore import codec
from eventstore.audit import Anchor, chain_mac, content_digest, verify_run
from eventstore.store import Head, Record

KEY = b"k"


def chain(count: int, *, key: bytes = KEY) -> list[Record]:
    """A well-formed history of ``count`` entries with both chains."""
    records: list[Record] = []
    h = m = ""
    for seq in range(1, count + 1):
        raw = b"event %d" % seq
        h = codec.chain_hash(h, seq, raw)
        m = chain_mac(key, m, seq, content_digest(raw)) if key else ""
        records.append(Record(seq=seq, entry_id=f"{seq}-0", raw=raw, hash=h, mac=m))
    return records


def head_of(records: list[Record]) -> Head:
    last = records[-1]
    return Head(run_id="r", seq=last.seq, entry_id="x", hash=last.hash, mac=last.mac)


def kinds(
    records: list[Record], head: Head | None, anchor: Anchor | None = None
) -> list[tuple[int, str]]:
    found = verify_run("r", records, head, key=KEY, anchor=anchor)
    assert all(f.run_id == "r" and f.detail for f in found)
    return [(f.seq, f.kind) for f in found]


def test_intact_history_has_no_findings() -> None:
    records = chain(5)
    assert kinds(records, head_of(records)) == []
    assert verify_run("r", [], None) == []


def test_mac_is_hmac_sha256_over_previous_seq_and_content_digest() -> None:
    expected = hmac.new(KEY, b"prev\n7\n" + b"d" * 64, hashlib.sha256).hexdigest()
    assert chain_mac(KEY, "prev", 7, "d" * 64) == expected


def test_modified_content_is_located_and_the_rest_verifies() -> None:
    records = chain(5)
    records[2] = msgspec.structs.replace(records[2], raw=b"changed")
    assert kinds(records, head_of(records)) == [(3, "modified")]


def test_stripped_mac_with_a_key_is_a_modification() -> None:
    records = chain(3)
    records[1] = msgspec.structs.replace(records[1], mac="")
    # The next entry's mac chains on the stripped one, so it no longer verifies either.
    assert kinds(records, head_of(records)) == [(2, "modified"), (3, "modified")]


def test_deleted_range_reports_each_missing_seq() -> None:
    records = chain(6)
    del records[1:4]
    assert kinds(records, head_of(records)) == [(2, "deleted"), (3, "deleted"), (4, "deleted")]


def test_swapped_entries_are_reordered() -> None:
    records = chain(5)
    records[1], records[2] = records[2], records[1]
    assert kinds(records, head_of(records)) == [(3, "reordered"), (2, "reordered")]


def test_repeated_seq_is_an_insertion() -> None:
    records = chain(4)
    copy = msgspec.structs.replace(records[1], entry_id="2-1")
    records.insert(2, copy)
    assert kinds(records, head_of(records)) == [(2, "inserted")]


def test_entry_without_seq_is_an_insertion() -> None:
    records = chain(3)
    records.append(Record(seq=0, entry_id="9-9", raw=b"junk"))
    assert kinds(records, head_of(records[:3])) == [(4, "inserted")]


def test_head_disagreeing_with_the_stream() -> None:
    records = chain(4)
    head = msgspec.structs.replace(head_of(records), seq=5)
    assert kinds(records, head) == [(5, "head_mismatch")]
    wrong_mac = msgspec.structs.replace(head_of(records), mac="0" * 64)
    assert kinds(records, wrong_mac) == [(4, "head_mismatch")]
    assert kinds([], head_of(records)) == [(4, "head_mismatch")]


def test_anchor_detects_truncation_and_a_changed_anchored_entry() -> None:
    records = chain(6)
    anchor = Anchor(seq=6, hash=records[-1].hash, mac=records[-1].mac)
    assert kinds(records, head_of(records), anchor=anchor) == []
    short = records[:4]
    assert kinds(short, head_of(short), anchor=anchor) == [(6, "truncated")]
    other = Anchor(seq=6, hash="f" * 40)
    assert kinds(records, head_of(records), anchor=other) == [(6, "modified")]


def test_without_a_key_only_the_hash_chain_is_checked() -> None:
    records = chain(3, key=b"")
    assert verify_run("r", records, head_of(records)) == []
    assert [f.kind for f in verify_run("r", records, head_of(records), key=KEY)] == ["modified"] * 3


def legacy_then_current(legacy: int, current: int) -> list[Record]:
    """A history whose first ``legacy`` entries carry the earlier builds' hash (over the
    envelope bytes) and whose next ``current`` entries continue it with today's."""
    records: list[Record] = []
    h = ""
    for seq in range(1, legacy + current + 1):
        raw = b"event %d" % seq
        if seq <= legacy:
            h = hashlib.sha1(b"%s\n%d\n%s" % (h.encode(), seq, raw)).hexdigest()
        else:
            h = codec.chain_hash(h, seq, raw)
        records.append(Record(seq=seq, entry_id=f"{seq}-0", raw=raw, hash=h))
    return records


def test_a_history_begun_by_an_earlier_build_verifies() -> None:
    for legacy, current in ((3, 0), (3, 2), (0, 4)):
        records = legacy_then_current(legacy, current)
        assert verify_run("r", records, head_of(records)) == []


def test_the_earlier_hash_is_not_accepted_after_the_current_one() -> None:
    records = legacy_then_current(2, 2)
    h = records[1].hash
    tail = []
    for seq in (5, 6):
        raw = b"event %d" % seq
        h = hashlib.sha1(b"%s\n%d\n%s" % (h.encode(), seq, raw)).hexdigest()
        tail.append(Record(seq=seq, entry_id=f"{seq}-0", raw=raw, hash=h))
    found = verify_run("r", records + tail, head_of(records + tail))
    assert [(f.seq, f.kind) for f in found] == [(5, "modified"), (6, "modified")]


def test_an_edited_entry_under_the_earlier_hash_is_caught() -> None:
    records = legacy_then_current(3, 2)
    records[1] = msgspec.structs.replace(records[1], raw=b"changed")
    assert [(f.seq, f.kind) for f in verify_run("r", records, head_of(records))] == [
        (2, "modified")
    ]
