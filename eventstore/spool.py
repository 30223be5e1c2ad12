"""The local spool of the fallback backend: an append-only, fsync'd file of fact batches.

File layout: the 8-byte magic :data:`MAGIC`, then one frame per record::

    length: uint32 big-endian | crc32 of (length bytes + payload): uint32 big-endian | payload

The payload is a msgpack ``[number, run_id, [event bytes...]]``; each event is the codec's
msgpack encoding of an :class:`~eventstore.events.Envelope`. One record is one acknowledged
fact append (a batch of one run), so a batch is recovered whole or not at all.

:meth:`Spool.append` returns only after ``os.fsync``, so an acknowledged record survives a
crash of the process or the machine. A crash mid-write can leave a torn final frame: it was
never acknowledged, so loading drops it (with a logged warning) and truncates the file back
to the last whole record. A bad frame with whole records after it is corruption of
acknowledged data and raises :class:`~eventstore.errors.SpoolError` instead.

Compaction (:meth:`Spool.compact`) keeps the records not yet confirmed by the primary store:
it writes them to a temporary file, fsyncs it and renames it over the spool (or truncates
the spool when nothing is kept), then fsyncs the directory.

A spool file is used by one process at a time: an exclusive ``flock`` on ``<path>.lock`` is
taken on open and released on close (or when the process dies).

The class does blocking file I/O and is not thread-safe: async callers run its methods in a
worker thread, one at a time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Final

import msgspec

from eventstore import codec
from eventstore.errors import DecodeError, SpoolError
from eventstore.events import Envelope

MAGIC: Final = b"FLSPOOL\x01"

_FRAME_HEADER: Final = struct.Struct(">II")

logger = logging.getLogger(__name__)


class _Body(msgspec.Struct, frozen=True, array_like=True):
    number: int
    run_id: str
    events: list[bytes]


_BODY_ENCODER: Final = msgspec.msgpack.Encoder()
_BODY_DECODER: Final = msgspec.msgpack.Decoder(_Body)


class SpoolRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One spooled fact append: its number in the spool, its run, and its events in order.

    ``number`` grows by one per record while records are spooled; a spool that is emptied
    and reopened starts again at 1.
    ``frame`` is the record's bytes on disk (kept so compaction can rewrite it unchanged).
    """

    number: int
    run_id: str
    events: tuple[Envelope, ...]
    frame: bytes


def _checksum(length_bytes: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(length_bytes))


def _encode_frame(number: int, run_id: str, events: Sequence[Envelope]) -> bytes:
    payload = _BODY_ENCODER.encode(_Body(number, run_id, [codec.encode(e) for e in events]))
    length_bytes = struct.pack(">I", len(payload))
    return length_bytes + struct.pack(">I", _checksum(length_bytes, payload)) + payload


def _decode_frame(frame: bytes, where: str) -> SpoolRecord:
    try:
        body = _BODY_DECODER.decode(frame[_FRAME_HEADER.size :])
    except msgspec.DecodeError as exc:
        raise SpoolError(f"{where}: not a spool record ({exc})") from exc
    try:
        events = tuple(codec.decode(raw, where=where) for raw in body.events)
    except DecodeError as exc:
        raise SpoolError(str(exc)) from exc
    return SpoolRecord(number=body.number, run_id=body.run_id, events=events, frame=frame)


def _parse(data: bytes, path: Path) -> tuple[list[SpoolRecord], int]:
    """The whole records in ``data`` (a spool file's bytes after the magic) and how many
    bytes they span. Bytes after that span are a torn final frame.

    Raises :class:`SpoolError` when a bad frame is followed by more data that is not all
    zero bytes (corruption of acknowledged records, not a torn write).
    """
    records: list[SpoolRecord] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _FRAME_HEADER.size:
            break
        length, checksum = _FRAME_HEADER.unpack_from(data, offset)
        end = offset + _FRAME_HEADER.size + length
        if end > len(data):
            break
        payload = data[offset + _FRAME_HEADER.size : end]
        if _checksum(data[offset : offset + 4], payload) != checksum:
            if end == len(data) or not data[offset:].strip(b"\0"):
                break
            raise SpoolError(
                f"{path}: bad checksum in the record at byte {len(MAGIC) + offset} with"
                " whole records after it; the spool is corrupt (move it aside to start)"
            )
        where = f"{path} at byte {len(MAGIC) + offset}"
        records.append(_decode_frame(data[offset:end], where))
        offset = end
    return records, offset


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover(path: Path, fd: int) -> list[SpoolRecord]:
    """Read the spool open as ``fd``: write the magic into a new (or torn new) file, or load
    its records and truncate a torn final frame away."""
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        os.ftruncate(fd, 0)
        _write_all(fd, MAGIC)
        os.fsync(fd)
        _fsync_dir(path.parent)
        return []
    if not data.startswith(MAGIC):
        raise SpoolError(f"{path}: not a flowlog spool file (bad magic)")
    body = data[len(MAGIC) :]
    records, span = _parse(body, path)
    if span < len(body):
        logger.warning(
            "dropping a torn final record of the spool (never acknowledged)",
            extra={"spool_path": str(path), "dropped_bytes": len(body) - span},
        )
        os.ftruncate(fd, len(MAGIC) + span)
        os.fsync(fd)
    return records


class Spool:
    """An open spool file. Use :meth:`open`; :attr:`records` are the records loaded at open."""

    def __init__(self, path: Path, fd: int, lock_fd: int, records: list[SpoolRecord]) -> None:
        self.path = path
        self.records = records
        self._fd = fd
        self._lock_fd = lock_fd
        self._size = len(MAGIC) + sum(len(record.frame) for record in records)
        self._next_number = records[-1].number + 1 if records else 1

    @classmethod
    def open(cls, path: Path) -> Spool:
        """Open (or create) the spool at ``path``, load its records, drop a torn tail.

        Raises :class:`SpoolError` if another process holds the spool, if the file is not a
        spool or cannot be opened, or if it is corrupt before its final record.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"{path}: cannot open the spool ({exc})") from exc
        fd = -1
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            records = _recover(path, fd)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            os.close(lock_fd)
            if isinstance(exc, BlockingIOError):
                raise SpoolError(f"{path}: the spool is in use by another process") from exc
            if isinstance(exc, OSError):
                raise SpoolError(f"{path}: cannot open the spool ({exc})") from exc
            raise
        return cls(path, fd, lock_fd, records)

    def append(self, run_id: str, events: Sequence[Envelope]) -> SpoolRecord:
        """Write one record and fsync it; the record is durable when this returns.

        A failed write is truncated away, so the file still ends with a whole record.
        """
        number = self._next_number
        frame = _encode_frame(number, run_id, events)
        try:
            _write_all(self._fd, frame)
            os.fsync(self._fd)
        except OSError as exc:
            with suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise SpoolError(f"{self.path}: cannot write the spool ({exc})") from exc
        self._size += len(frame)
        self._next_number = number + 1
        return SpoolRecord(number=number, run_id=run_id, events=tuple(events), frame=frame)

    def compact(self, keep: Sequence[SpoolRecord]) -> None:
        """Replace the spool's records with ``keep`` (atomically, durably)."""
        content = MAGIC + b"".join(record.frame for record in keep)
        try:
            if not keep:
                os.ftruncate(self._fd, len(MAGIC))
                os.fsync(self._fd)
                self._size = len(MAGIC)
                return
            temp = self.path.with_name(f"{self.path.name}.compact")
            # The new file's descriptor is the spool's from the rename on, whatever fails
            # after it: appends must never go to the file the rename unlinked.
            new_fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            try:
                _write_all(new_fd, content)
                os.fsync(new_fd)
                os.replace(temp, self.path)
            except OSError:
                os.close(new_fd)
                raise
            os.close(self._fd)
            self._fd = new_fd
            self._size = len(content)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise SpoolError(f"{self.path}: cannot compact the spool ({exc})") from exc

    def close(self) -> None:
        """Close the file and release the lock (a second close does nothing)."""
        if self._lock_fd < 0:
            return
        os.close(self._fd)
        os.close(self._lock_fd)
        self._fd = self._lock_fd = -1
