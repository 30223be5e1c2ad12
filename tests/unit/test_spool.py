"""The fallback spool file: round trip, fsync before acknowledging, torn tails, compaction."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import spool as spool_module
from eventstore.errors import SpoolError
from eventstore.events import Envelope, StepStarted
from eventstore.ids import new_event_id
from eventstore.spool import MAGIC, Spool, SpoolRecord


def _events(run_id: str, count: int, step: str = "fetch") -> list[Envelope]:
    return [
        Envelope(
            event_id=new_event_id(),
            run_id=run_id,
            ts=1_700_000_000_000 + index,
            producer="test-spool",
            data=StepStarted(step=step, attempt=index + 1, agent="noop"),
        )
        for index in range(count)
    ]


def _summary(records: list[SpoolRecord]) -> list[tuple[int, str, tuple[Envelope, ...]]]:
    return [(record.number, record.run_id, record.events) for record in records]


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "facts.spool"


@pytest.fixture
def open_spool(spool_path: Path) -> Iterator[Callable[[], Spool]]:
    opened: list[Spool] = []

    def _open() -> Spool:
        spool = Spool.open(spool_path)
        opened.append(spool)
        return spool

    yield _open
    for spool in opened:
        spool.close()


def test_records_round_trip_through_the_file(
    spool_path: Path, open_spool: Callable[[], Spool]
) -> None:
    spool = open_spool()
    assert spool.records == []
    written = [
        spool.append("run-a", _events("run-a", 3)),
        spool.append("run-b", _events("run-b", 1)),
        spool.append("run-a", _events("run-a", 2, step="parse")),
    ]
    assert [record.number for record in written] == [1, 2, 3]
    spool.close()

    reopened = Spool.open(spool_path)
    try:
        assert _summary(reopened.records) == _summary(written)
        assert [r.frame for r in reopened.records] == [r.frame for r in written]
        assert reopened.append("run-c", _events("run-c", 1)).number == 4
    finally:
        reopened.close()


def test_append_fsyncs_the_spool_before_returning(
    spool_path: Path, open_spool: Callable[[], Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool()
    spool_inode = spool_path.stat().st_ino
    calls: list[tuple[str, int]] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes | memoryview) -> int:
        calls.append(("write", os.fstat(fd).st_ino))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        calls.append(("fsync", os.fstat(fd).st_ino))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    spool.append("run-a", _events("run-a", 2))

    assert calls[-1] == ("fsync", spool_inode)
    assert ("write", spool_inode) in calls
    assert calls.index(("write", spool_inode)) < len(calls) - 1


def _three_records(spool_path: Path) -> list[SpoolRecord]:
    spool = Spool.open(spool_path)
    try:
        return [spool.append(f"run-{n}", _events(f"run-{n}", n)) for n in (1, 2, 3)]
    finally:
        spool.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data, last: data[: len(data) - len(last) + 5], id="cut-in-header"),
        pytest.param(lambda data, last: data[: len(data) - 7], id="cut-in-payload"),
        pytest.param(lambda data, last: data[:-1] + bytes([data[-1] ^ 0xFF]), id="bad-checksum"),
        pytest.param(lambda data, last: data[: len(data) - len(last)] + bytes(64), id="zero-fill"),
    ],
)
def test_a_torn_final_record_is_dropped_with_a_warning(
    spool_path: Path,
    open_spool: Callable[[], Spool],
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes, bytes], bytes],
) -> None:
    written = _three_records(spool_path)
    spool_path.write_bytes(damage(spool_path.read_bytes(), written[-1].frame))

    with caplog.at_level(logging.WARNING, logger="eventstore.spool"):
        spool = open_spool()
    assert _summary(spool.records) == _summary(written[:2])
    assert [r.message for r in caplog.records] == [
        "dropping a torn final record of the spool (never acknowledged)"
    ]
    assert spool_path.stat().st_size == len(MAGIC) + sum(len(r.frame) for r in written[:2])

    added = spool.append("run-9", _events("run-9", 1))
    spool.close()
    reopened = open_spool()
    assert _summary(reopened.records) == _summary([*written[:2], added])


def test_a_bad_record_before_whole_records_is_corruption(spool_path: Path) -> None:
    written = _three_records(spool_path)
    data = bytearray(spool_path.read_bytes())
    data[len(MAGIC) + len(written[0].frame) - 1] ^= 0xFF
    spool_path.write_bytes(bytes(data))

    with pytest.raises(SpoolError, match="corrupt"):
        Spool.open(spool_path)
    assert spool_path.read_bytes() == bytes(data)


def test_a_file_that_is_not_a_spool_is_refused(spool_path: Path) -> None:
    spool_path.parent.mkdir(parents=True)
    spool_path.write_bytes(b"not a spool at all")
    with pytest.raises(SpoolError, match="bad magic"):
        Spool.open(spool_path)


def test_a_torn_new_file_is_reinitialised(
    spool_path: Path, open_spool: Callable[[], Spool]
) -> None:
    spool_path.parent.mkdir(parents=True)
    spool_path.write_bytes(MAGIC[:3])
    assert open_spool().records == []
    assert spool_path.read_bytes() == MAGIC


def test_compaction_keeps_only_the_given_records(
    spool_path: Path, open_spool: Callable[[], Spool]
) -> None:
    spool = open_spool()
    written = [spool.append(f"run-{n}", _events(f"run-{n}", 2)) for n in range(4)]
    spool.compact(written[2:])
    later = spool.append("run-9", _events("run-9", 1))
    spool.close()

    assert [p.name for p in spool_path.parent.iterdir() if p.suffix == ".compact"] == []
    reopened = open_spool()
    assert _summary(reopened.records) == _summary([*written[2:], later])
    assert later.number == 5

    reopened.compact([])
    assert spool_path.read_bytes() == MAGIC
    reopened.append("run-10", _events("run-10", 1))
    reopened.close()
    assert [r.run_id for r in open_spool().records] == ["run-10"]


def test_appends_after_a_compaction_failing_past_its_rename_go_to_the_new_file(
    spool_path: Path, open_spool: Callable[[], Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory fsync after the rename fails (an I/O error the disk reports): the
    compaction raises, and what is appended next is still in the spool on reopening."""
    spool = open_spool()
    written = [spool.append("run-a", _events("run-a", 1)) for _ in range(2)]

    def failing_fsync_dir(directory: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_fsync_dir", failing_fsync_dir)
    with pytest.raises(SpoolError, match="cannot compact"):
        spool.compact(written[1:])
    monkeypatch.undo()
    later = spool.append("run-a", _events("run-a", 1))
    spool.close()
    assert _summary(open_spool().records) == _summary([written[1], later])


def test_a_spool_is_used_by_one_owner_at_a_time(
    spool_path: Path, open_spool: Callable[[], Spool]
) -> None:
    first = open_spool()
    with pytest.raises(SpoolError, match="in use"):
        Spool.open(spool_path)
    first.close()
    assert open_spool().records == []


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6),
    cut=st.integers(min_value=0),
)
def test_any_truncation_loads_the_whole_records_before_it(sizes: list[int], cut: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "facts.spool"
        spool = Spool.open(path)
        written = [spool.append(f"run-{i}", _events(f"run-{i}", n)) for i, n in enumerate(sizes)]
        spool.close()
        data = path.read_bytes()
        cut_at = len(MAGIC) + cut % (len(data) - len(MAGIC) + 1)
        path.write_bytes(data[:cut_at])

        loaded = Spool.open(path)
        loaded.close()
        boundaries = [len(MAGIC)]
        for record in written:
            boundaries.append(boundaries[-1] + len(record.frame))
        whole = sum(1 for end in boundaries[1:] if end <= cut_at)
        assert _summary(loaded.records) == _summary(written[:whole])
        assert path.stat().st_size == boundaries[whole]
