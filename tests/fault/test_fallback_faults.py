"""The fallback store when Redis dies: nothing acknowledged is lost, nothing is doubled.

Each test runs its own redis-server with the AOF fsync'd on every write
(``durable_redis_server``), kills it with SIGKILL and restarts it on the same port and
directory.
"""

from __future__ import annotations

import signal
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream
from support.redis_server import RedisServer

from eventstore.errors import StoreUnavailable
from eventstore.events import Envelope, RunStarted, StepStarted
from eventstore.fallback import FallbackStore, is_spooled
from eventstore.ids import new_event_id
from eventstore.redis_store import RedisStore
from eventstore.spool import MAGIC
from eventstore.store import AppendRequest, Outcome, StoreConfig

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.anyio]

CONFIG = StoreConfig(partitions=4)
APPENDER = Path(__file__).with_name("spool_appender.py")
RUNS = [f"fault-run-{n}" for n in range(4)]


@pytest.fixture
async def fallback(
    durable_redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[FallbackStore]:
    store = FallbackStore(
        RedisStore.from_url(durable_redis_server.url, CONFIG), tmp_path / "facts.spool"
    )
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


def fact(run_id: str, number: int) -> Envelope:
    return Envelope(
        event_id=new_event_id(),
        run_id=run_id,
        ts=number,
        producer="fault-test",
        data=StepStarted(step=f"step-{number}", attempt=1, agent="noop"),
    )


async def event_ids(server: RedisServer, run_id: str) -> list[str]:
    store = RedisStore.from_url(server.url, CONFIG)
    try:
        return [event.event_id async for event in store.read_run(run_id)]
    finally:
        await store.close()


class Progress:
    """Acknowledged events by run, and a way to wait until enough have been acknowledged."""

    def __init__(self) -> None:
        self.acked: dict[str, list[str]] = defaultdict(list)
        self.counts = {"stored": 0, "spooled": 0}
        self._changed = anyio.Condition()

    async def record(self, run_id: str, event_id: str, spooled: bool) -> None:
        self.acked[run_id].append(event_id)
        self.counts["spooled" if spooled else "stored"] += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with self._changed:
            while not condition():
                await self._changed.wait()


async def test_facts_appended_across_a_redis_crash_land_once_and_in_order(
    durable_redis_server: RedisServer, fallback: FallbackStore, tmp_path: Path
) -> None:
    server = durable_redis_server
    progress = Progress()
    stop = anyio.Event()

    async def append_facts() -> None:
        number = 0
        while not stop.is_set():
            run_id = RUNS[number % len(RUNS)]
            batch = [fact(run_id, number + k) for k in range(1 + number % 2)]
            for result in await fallback.append(run_id, batch):
                await progress.record(run_id, result.event_id, is_spooled(result))
            number += 1

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(append_facts)
            await progress.wait_until(lambda: progress.counts["stored"] >= 60)
            server.kill()
            await progress.wait_until(lambda: progress.counts["spooled"] >= 60)
            await anyio.to_thread.run_sync(server.restart)
            spooled_at_restart = progress.counts["spooled"]
            await progress.wait_until(lambda: progress.counts["spooled"] >= spooled_at_restart + 20)
            stop.set()
        report = await fallback.drain()

    assert report.records > 0
    assert report.remaining == 0
    assert (tmp_path / "facts.spool").read_bytes() == MAGIC
    for run_id in RUNS:
        assert await event_ids(server, run_id) == progress.acked[run_id]
        head = await fallback.head(run_id)
        assert head is not None
        assert head.seq == len(progress.acked[run_id])


class AppenderOutput:
    """The ``ack`` lines an appender process printed, by run and by where they went."""

    def __init__(self, stdout: ByteReceiveStream) -> None:
        self.by_run: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self._lines = BufferedByteReceiveStream(stdout)

    async def read_until(self, where: str, count: int) -> None:
        while self.counts[where] < count:
            self._take(await self._lines.receive_until(b"\n", 4096))

    async def read_to_end(self) -> None:
        """Take the whole lines left once the process is dead (a torn last line is not one)."""
        while True:
            try:
                line = await self._lines.receive_until(b"\n", 4096)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            self._take(line)

    def _take(self, line: bytes) -> None:
        _, run_id, event_id, where = line.decode().split()
        self.by_run[run_id].append(event_id)
        self.counts[where] += 1


async def test_facts_acknowledged_by_a_killed_process_are_drained_by_the_next(
    durable_redis_server: RedisServer, tmp_path: Path
) -> None:
    server = durable_redis_server
    spool = tmp_path / "facts.spool"
    command = [sys.executable, str(APPENDER), "--redis-url", server.url, "--spool", str(spool)]
    with anyio.fail_after(120), (tmp_path / "appender.err").open("wb") as stderr:
        process: Process = await anyio.open_process(command, stderr=stderr)
        try:
            assert process.stdout is not None
            output = AppenderOutput(process.stdout)
            await output.read_until("stored", 40)
            server.kill()
            await output.read_until("spooled", 40)
            process.kill()
            await process.wait()
            await output.read_to_end()
        finally:
            with anyio.CancelScope(shield=True):
                await process.aclose()
        assert process.returncode == -signal.SIGKILL
        await anyio.to_thread.run_sync(server.restart)
        drained = await anyio.run_process([*command, "--drain-only"], check=False)

    assert drained.returncode == 0, drained.stderr.decode()
    _, records, remaining = drained.stdout.decode().split()
    assert int(records) > 0
    assert remaining == "0"
    assert sorted(output.by_run) == [f"fault-run-{n}" for n in range(3)]
    for run_id, printed in output.by_run.items():
        in_redis = await event_ids(server, run_id)
        assert len(in_redis) == len(set(in_redis))
        assert [event_id for event_id in in_redis if event_id in set(printed)] == printed


async def test_a_decision_while_redis_is_down_raises_and_spools_nothing(
    durable_redis_server: RedisServer, fallback: FallbackStore, tmp_path: Path
) -> None:
    server = durable_redis_server
    started = Envelope(
        event_id=new_event_id(), run_id="run-d", ts=1, producer="fault-test", data=RunStarted()
    )
    assert [r.seq for r in await fallback.append("run-d", [fact("run-d", 1)])] == [1]
    server.kill()

    with pytest.raises(StoreUnavailable):
        await fallback.append("run-d", [started], expected_seq=1)
    with pytest.raises(StoreUnavailable):
        await fallback.append_many(
            [
                AppendRequest(run_id="run-e", events=[fact("run-e", 1)]),
                AppendRequest(run_id="run-d", events=[started], expected_seq=1),
            ]
        )
    assert not fallback.spooled
    assert (tmp_path / "facts.spool").read_bytes() == MAGIC

    [spooled] = await fallback.append("run-d", [fact("run-d", 2)])
    assert is_spooled(spooled)
    with pytest.raises(StoreUnavailable):
        await fallback.append("run-d", [started], expected_seq=1)
    with pytest.raises(StoreUnavailable):
        await fallback.append_many(
            [
                AppendRequest(run_id="run-e", events=[fact("run-e", 1)]),
                AppendRequest(run_id="run-d", events=[started], expected_seq=1),
            ]
        )
    assert [record.run_id for record in fallback.spooled] == ["run-d"]

    await anyio.to_thread.run_sync(server.restart)
    assert (await fallback.drain()).appended == 1
    [decided] = await fallback.append("run-d", [started], expected_seq=2)
    assert (decided.outcome, decided.seq) == (Outcome.APPENDED, 3)
