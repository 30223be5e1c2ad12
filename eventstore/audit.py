"""Tamper evidence: the two per-run chains over stored entries, and their verification.

Every entry of a run stream carries ``h = sha1hex(prev_h "\\n" s "\\n" sha1hex(e))`` (see
:func:`eventstore.codec.chain_hash`): it detects accidents and any edit by someone who does not
recompute the chain. Earlier builds hashed the envelope itself (``sha1hex(prev_h "\\n" s "\\n"
e)``); a run they wrote and this build continued carries that older hash on a prefix of its
entries, so verification accepts it up to the first entry with the current hash, never after.
With an audit key configured (``FLOWLOG_AUDIT_KEY``) each entry also carries
``m = hmac_sha256_hex(key, prev_m "\\n" s "\\n" sha256hex(e))``, chained per run like ``h``,
the last one kept in the run's head. ``prev_h`` is "" before seq 1, ``prev_m`` "" before
the first keyed entry. The append script computes both atomically with the seq (one round trip;
the client sends ``sha1hex(e)``, ``sha256hex(e)`` and the key as script arguments; verification
recomputes both digests from the stored ``e``, so a wrong one is caught like an edit). With a
key, every entry must carry a MAC: entries written before the key was configured are reported
(``no mac``), so verify such runs without the key.

Cost: Redis 7.0 scripts have no SHA-256, so ``sha256.lua`` computes it in Lua (four
compressions per event, about 0.2 ms of server time). On a 2-core machine appends went from
about 39,000 events/s without a key to about 4,000 events/s with one (batches of 5 events,
100 runs per round trip).

Threat model. The key is never stored in Redis, but it travels in script arguments: deny
``MONITOR``, ``CLIENT`` and ``SLOWLOG`` to every other ACL user and use TLS (``rediss://``).
A party that can change stored data (raw ``XADD``/``XDEL``, rebuilding a stream, an edited AOF
file or backup) but does not have the key cannot produce a history that verifies: every entry's
MAC binds its seq, its bytes and the MAC before it. What the chains alone cannot show is the
loss of a run's *tail* together with a consistent rewrite of its head: for that, keep the
output of ``flowlog audit anchor`` outside Redis and verify against it (``--anchors``).

:func:`verify_run` is pure: it takes the stored records, the head and optionally an anchor,
and reports every :class:`Finding` with its run, seq and kind.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from eventstore.codec import chain_hash
from eventstore.store import Head, Record

Kind = Literal["modified", "inserted", "deleted", "reordered", "truncated", "head_mismatch"]

MODIFIED: Final = "modified"
INSERTED: Final = "inserted"
DELETED: Final = "deleted"
REORDERED: Final = "reordered"
TRUNCATED: Final = "truncated"
HEAD_MISMATCH: Final = "head_mismatch"


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """One problem found in a run's history: where (run, seq), what kind, and the details."""

    run_id: str
    seq: int
    kind: Kind
    detail: str


class Anchor(msgspec.Struct, frozen=True, kw_only=True):
    """A run's head as recorded outside the store (``flowlog audit anchor``)."""

    seq: int
    hash: str
    mac: str = ""


def legacy_chain_hash(previous: str, seq: int, raw: bytes) -> str:
    """The chain hash of earlier builds, over the envelope bytes themselves:
    ``sha1_hex(previous "\\n" seq "\\n" raw)``."""
    return hashlib.sha1(b"%s\n%d\n%s" % (previous.encode(), seq, raw)).hexdigest()


def accepted_hash(
    previous: str, seq: int, raw: bytes, stored: str, legacy: bool
) -> tuple[str, bool]:
    """The hash entry ``seq`` (bytes ``raw``) must carry after ``previous``, given the one it
    carries (``stored``): the current formula's, or the earlier builds' while ``legacy`` (the
    run's entries so far all carried that one) and ``stored`` is that; and whether the next
    entry may still carry the earlier one."""
    current = chain_hash(previous, seq, raw)
    if stored == current:
        return current, False
    if legacy and stored == legacy_chain_hash(previous, seq, raw):
        return stored, True
    return current, legacy


def content_digest(raw: bytes) -> str:
    """``sha256hex`` of an entry's envelope bytes (what the MAC covers of the content)."""
    return hashlib.sha256(raw).hexdigest()


def chain_mac(key: bytes, previous: str, seq: int, digest: str) -> str:
    """The keyed chain MAC of entry ``seq`` with content digest ``digest``."""
    message = b"%s\n%d\n%s" % (previous.encode(), seq, digest.encode())
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class _Verifier:
    """One run's verification: walks the records keeping the last accepted one."""

    def __init__(self, run_id: str, records: Sequence[Record], key: bytes, head_seq: int) -> None:
        self.run_id = run_id
        self.records = records
        self.key = key
        self.head_seq = head_seq
        self.findings: list[Finding] = []
        self.present = Counter(record.seq for record in records)
        # Entries may carry the older hash until the first one with the current hash.
        self.legacy = True

    def add(self, seq: int, kind: Kind, detail: str) -> None:
        self.findings.append(Finding(run_id=self.run_id, seq=seq, kind=kind, detail=detail))

    def problems(self, record: Record, previous: Record | None) -> list[str]:
        """What is wrong with ``record`` as the successor of ``previous`` (None: first)."""
        prev_hash = previous.hash if previous is not None else ""
        prev_mac = previous.mac if previous is not None else ""
        found = []
        expected, _ = accepted_hash(prev_hash, record.seq, record.raw, record.hash, self.legacy)
        if record.hash != expected:
            found.append(f"hash {record.hash or '(none)'} != expected {expected}")
        if self.key:
            if not record.mac:
                found.append("no mac although an audit key is configured")
            else:
                mac = chain_mac(self.key, prev_mac, record.seq, content_digest(record.raw))
                if not hmac.compare_digest(record.mac, mac):
                    found.append("mac does not verify")
        return found

    def run(self) -> Record | None:
        previous: Record | None = None
        records = self.records
        for index, record in enumerate(records):
            last_seq = previous.seq if previous is not None else 0
            where = f"entry {record.entry_id}"
            if record.seq <= 0:
                self.add(last_seq + 1, INSERTED, f"{where} has no valid seq")
                continue
            if record.seq <= last_seq:
                if record.seq == last_seq:
                    self.add(record.seq, INSERTED, f"{where} repeats seq {record.seq}")
                else:
                    self.add(
                        record.seq, REORDERED, f"{where} (seq {record.seq}) after seq {last_seq}"
                    )
                continue
            if record.seq > last_seq + 1:
                self._gap(last_seq, record, where)
                previous = record
                continue
            problems = self.problems(record, previous)
            if not problems:
                if self.legacy:
                    prev_hash = previous.hash if previous is not None else ""
                    _, self.legacy = accepted_hash(
                        prev_hash, record.seq, record.raw, record.hash, self.legacy
                    )
                previous = record
                continue
            if self._intruder(index, previous):
                self.add(record.seq, INSERTED, f"{where} does not belong: {'; '.join(problems)}")
                continue
            self.add(record.seq, MODIFIED, f"{where}: {'; '.join(problems)}")
            previous = record
        return previous

    def _intruder(self, index: int, previous: Record | None) -> bool:
        """Whether the failing record at ``index`` was added rather than changed: the next
        record has its seq and verifies in its place, or it lies beyond the head."""
        record = self.records[index]
        if index + 1 < len(self.records):
            following = self.records[index + 1]
            return following.seq == record.seq and not self.problems(following, previous)
        return 0 < self.head_seq < record.seq

    def _gap(self, last_seq: int, record: Record, where: str) -> None:
        missing = [seq for seq in range(last_seq + 1, record.seq) if not self.present[seq]]
        for seq in missing:
            self.add(seq, DELETED, f"seq {seq} is missing (before {where})")
        if len(missing) < record.seq - last_seq - 1:
            self.add(
                record.seq, REORDERED, f"{where} (seq {record.seq}) comes before seq {last_seq + 1}"
            )


def verify_run(
    run_id: str,
    records: Sequence[Record],
    head: Head | None,
    *,
    key: bytes = b"",
    anchor: Anchor | None = None,
) -> list[Finding]:
    """Every problem with one run's stored history, in stream order.

    ``records`` are the run stream's entries in stream order; ``key`` (b"": none) also checks
    the MAC chain; ``anchor`` also checks that the anchored head is still in the history.
    """
    verifier = _Verifier(run_id, records, key, head.seq if head is not None else 0)
    last = verifier.run()
    if head is not None and records:
        if last is None or head.seq != last.seq or head.hash != last.hash:
            found = f"seq {last.seq} hash {last.hash}" if last is not None else "no valid entry"
            verifier.add(
                head.seq,
                HEAD_MISMATCH,
                f"head says seq {head.seq} hash {head.hash}, the stream ends with {found}",
            )
        elif key and head.mac != last.mac:
            verifier.add(head.seq, HEAD_MISMATCH, "head mac differs from the last entry's mac")
    elif head is not None:
        verifier.add(head.seq, HEAD_MISMATCH, f"head says seq {head.seq} but the stream is empty")
    if anchor is not None:
        _check_anchor(verifier, anchor)
    return verifier.findings


def _check_anchor(verifier: _Verifier, anchor: Anchor) -> None:
    at = [record for record in verifier.records if record.seq == anchor.seq]
    if not at:
        last = max((record.seq for record in verifier.records), default=0)
        verifier.add(
            anchor.seq,
            TRUNCATED,
            f"the anchor is at seq {anchor.seq} but the history ends at seq {last}",
        )
    elif all(record.hash != anchor.hash for record in at):
        verifier.add(anchor.seq, MODIFIED, f"hash at seq {anchor.seq} differs from the anchor's")
    elif anchor.mac and all(record.mac != anchor.mac for record in at):
        verifier.add(anchor.seq, MODIFIED, f"mac at seq {anchor.seq} differs from the anchor's")
