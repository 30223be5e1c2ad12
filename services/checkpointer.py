"""The checkpointer: snapshots run state so rebuilding a long run costs snapshot + tail.

It reads the partition feeds as consumer group ``checkpointer``. A run is snapshotted when
its seq reaches a multiple of ``every``, when a level of its DAG completes (a step settled and
every step of its execution level is final; levels from
:func:`~services.workflow.loader.execution_levels` of the run's definition) and at least
``level_min_events`` events came since the last checkpoint (default 1: every level), and when
it ends. Raising the minimum (``FLOWLOG_CHECKPOINT__LEVEL_MIN_EVENTS``) keeps short levels (a
chain's single steps) from costing a snapshot and an event each while saving little on reload.
Each snapshot is recorded in the log as a ``checkpoint_taken`` event (seq covered, snapshot
key), appended as a fact with an id derived from (run, seq), so a repeated delivery records
nothing twice.

A due snapshot is written about ``interval_s`` after its run became due (default 1 s; 0: as
soon as a batch makes it due), of the run's latest state then, as a stream processor commits
on an interval: it covers every level completed meanwhile (a chain's steps would otherwise
cost a snapshot and an event each). Writes go out in a few rounds per interval as runs come
due, not in one burst. A due run's feed entries are acknowledged only after its snapshot is
written (and the interval must stay under half of ``claim_idle``, so that held entries are not
claimed from a live checkpointer): a stopping checkpointer writes what is due first, and one
that dies leaves them pending, to be folded again, and the snapshot made due again, by its
successor.

Given the scheduler's :class:`~services.runs.RunLoader` (services in one process, ``flowlog
up``), it folds only the events the scheduler has not folded yet, and a snapshot may cover
events its own feed has not delivered yet: still the whole state at its seq (a state with a
passive event moved past unseen is not used). Finished runs are then left to the shared
cache's LRU rather than forgotten.

Every ``retention_interval_s`` (None: never) it also runs feed retention
(:func:`services.retention.run_retention`: archive what is about to go to gzipped JSON lines
in ``archive_dir`` when one is set, then trim below ``now - retention``, never past what a
group has not read), counting trims in ``metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from eventstore.errors import StoreUnavailable
from eventstore.events import CheckpointTaken, Envelope
from eventstore.ids import derived_event_id
from eventstore.store import TERMINAL_STATUSES, AppendRequest, Delivery, EventStore, Subscription
from projections.run_state import STEP_FINAL, RunState
from services.linger import linger
from services.observability.prometheus import ProcessMetrics
from services.producer import Producer, now_ms
from services.retention import ArchiveError, RetentionReport, run_retention
from services.runs import RunLoader, snapshot_of
from services.settings import checkpoint_interval_fits
from services.workflow.errors import DefinitionError
from services.workflow.loader import execution_levels

log = logging.getLogger("flowlog.checkpointer")

GROUP = "checkpointer"
#: A write round also takes the runs due within this share of the interval, so due snapshots
#: go out in a few rounds per interval, not one round trip per run.
WRITE_SLACK = 0.25


class Checkpointer:
    """Snapshots every run every ``every`` events, at its DAG level ends and at its end, each
    due snapshot about ``interval_s`` after its run became due (see the module docs)."""

    def __init__(
        self,
        store: EventStore,
        producer: Producer,
        *,
        consumer: str,
        every: int = 100,
        level_min_events: int = 1,
        batch: int = 256,
        block_ms: int = 500,
        retention_interval_s: float | None = 300.0,
        archive_dir: Path | None = None,
        metrics: ProcessMetrics | None = None,
        clock_ms: Callable[[], int] = now_ms,
        interval_s: float = 1.0,
        loader: RunLoader | None = None,
    ) -> None:
        self.store = store
        self.producer = producer
        self.consumer = consumer
        self.every = every
        self.level_min_events = level_min_events
        self.batch = batch
        self.block_ms = block_ms
        self.retention_interval_s = retention_interval_s
        self.archive_dir = archive_dir
        self.metrics = metrics
        self.clock_ms = clock_ms
        if not checkpoint_interval_fits(interval_s, store.config.claim_idle_ms / 1000):
            raise ValueError(
                f"interval_s ({interval_s:g}) must be under half of the store's claim idle time"
                f" ({store.config.claim_idle_ms} ms): a due run's entries are held that long"
            )
        self.interval_s = interval_s
        self.handled_entries = 0
        self._progress = anyio.Event()
        self.loader = loader or RunLoader(store)
        # A loader shared with other services keeps finished runs until its LRU drops them.
        self._forgets = loader is None
        self.snapshots = 0
        self.retention_passes = 0
        self._retained = anyio.Event()
        self._levels: dict[str, dict[str, list[str]]] = {}
        self._stop = anyio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subscription = await self.store.subscribe(GROUP, self.consumer)
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                if self.retention_interval_s is not None:
                    tg.start_soon(self._retention_loop, self.retention_interval_s)
                await self._consume(subscription)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await subscription.close()

    async def _consume(self, subscription: Subscription) -> None:
        """Fold the feed, writing each due snapshot ``interval_s`` after its run became due
        (see the module docs)."""
        # Entries are acknowledged with the next fetch (one round trip); a due run's entries
        # are held until its snapshot is written.
        handled: list[Delivery] = []
        due: dict[str, _Due] = {}
        while not self._stop.is_set():
            block_ms = self.block_ms
            if due:
                # Runs became due in order: the first one is the first to write.
                first = next(iter(due.values())).write_at
                block_ms = max(0, min(block_ms, round((first - anyio.current_time()) * 1000)))
            deliveries = await subscription.fetch(self.batch, block_ms, ack=handled)
            handled = []
            now = anyio.current_time()
            if deliveries:
                self.handled_entries += len(deliveries)
                for state in await self.due_states(deliveries):
                    found = due.get(state.run_id)
                    if found is None:
                        due[state.run_id] = _Due(now + self.interval_s, state)
                    else:
                        found.state = state
                for delivery in deliveries:
                    held = due.get(delivery.envelope.run_id)
                    if held is None:
                        handled.append(delivery)
                    else:
                        held.deliveries.append(delivery)
            ready = _ready(due, now, self.interval_s * WRITE_SLACK)
            if ready:
                handled += await self._write(ready, due)
            self._progress.set()
            self._progress = anyio.Event()
            await linger(self._stop, len(deliveries), self.batch)
        handled += await self._write(list(due), due)
        await subscription.ack(handled)

    async def _write(self, run_ids: list[str], due: dict[str, _Due]) -> list[Delivery]:
        """Snapshot the latest state of each due run of ``run_ids``; their held entries."""
        await self.checkpoint(*await self._complete(run_ids))
        return [delivery for run_id in run_ids for delivery in due.pop(run_id).deliveries]

    async def _complete(self, run_ids: Iterable[str]) -> list[RunState]:
        """Each run's latest state with every event up to its seq folded in: the loader's, or
        loaded again from the store when the loader has none such. A state another service
        moved past a passive event it had not seen yet (a scheduler's decision landing after
        a checkpoint, with one loader shared in ``flowlog up``) is never snapshotted: it
        would not be the state a replay gives."""
        states = []
        for run_id in run_ids:
            state = self.loader.cached(run_id) or await self.loader.load(run_id)
            if state is not None:
                states.append(state)
        return states

    async def wait_handled(self, count: int) -> None:
        """Wait until at least ``count`` feed entries have been handled."""
        while self.handled_entries < count:
            await self._progress.wait()

    async def retention(self) -> RetentionReport:
        """One feed retention pass at the clock's current time."""
        report = await run_retention(
            self.store,
            now_ms=self.clock_ms(),
            archive_dir=self.archive_dir,
            compress=True,
            metrics=self.metrics,
        )
        self.retention_passes += 1
        self._retained.set()
        self._retained = anyio.Event()
        return report

    async def wait_retention_passes(self, count: int) -> None:
        """Wait until at least ``count`` retention passes have completed."""
        while self.retention_passes < count:
            await self._retained.wait()

    async def _retention_loop(self, interval_s: float) -> None:
        while True:
            await anyio.sleep(interval_s)
            try:
                await self.retention()
            except StoreUnavailable as exc:
                log.warning("feed retention skipped: %s", exc)
            except ArchiveError:
                # the store keeps what could not be archived; snapshots go on
                log.exception("feed retention skipped")

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Fold ``deliveries`` in and snapshot the runs they make due, at once."""
        due = await self.due_states(deliveries)
        await self.checkpoint(*await self._complete(state.run_id for state in due))

    async def due_states(self, deliveries: Sequence[Delivery]) -> list[RunState]:
        """Fold ``deliveries`` in; the states of the runs they make due for a snapshot."""
        by_run: dict[str, list[Envelope]] = {}
        for delivery in deliveries:
            by_run.setdefault(delivery.envelope.run_id, []).append(delivery.envelope)
        due_states: list[RunState] = []
        for run_id, events in by_run.items():
            if self.loader.cached(run_id) is None and all(e.type == _CHECKPOINT for e in events):
                # Checkpoints make nothing due: a run not in hand (one that ended and was
                # forgotten, mostly) is not loaded just to fold its latest checkpoint in.
                continue
            due = any(
                e.type in _ENDING or (e.seq % self.every == 0 and e.type != _CHECKPOINT)
                for e in events
            )
            state = await self.loader.advance(run_id, events)
            level_due = (
                state is not None
                and state.seq - state.checkpoint_seq >= self.level_min_events
                and self.level_completed(state, events)
            )
            if state is not None and (due or level_due):
                due_states.append(state)
        return due_states

    def level_completed(self, state: RunState, events: Sequence[Envelope]) -> bool:
        """Whether one of ``events`` settled a step whose whole execution level is now final."""
        settled = [getattr(e.data, "step", "") for e in events if e.type in _SETTLING]
        if not settled:
            return False
        levels = self._levels.get(state.digest)
        if levels is None:
            try:
                definition = self.loader.definition(state)
                levels = {step: level for level in execution_levels(definition) for step in level}
            except DefinitionError:
                levels = {}
            self._levels[state.digest] = levels
        # Loops and lists rather than any()/all() over generators, which raise GeneratorExit in
        # a generator they leave unfinished (this runs for every batch of every run).
        steps = state.steps
        for step in settled:
            if step in levels and all(
                [
                    (found := steps.get(peer)) is not None and found.status in STEP_FINAL
                    for peer in levels[step]
                ]
            ):
                return True
        return False

    async def checkpoint(self, *states: RunState) -> None:
        """Snapshot each state and record it in the log: all snapshots in one round trip,
        then all ``checkpoint_taken`` events in one more."""
        if not states:
            return
        await self.store.put_snapshots([snapshot_of(state) for state in states])
        self.snapshots += len(states)
        await self.store.append_many(
            [
                AppendRequest(
                    run_id=state.run_id,
                    events=[
                        self.producer.envelope(
                            state.run_id,
                            CheckpointTaken(
                                covered_seq=state.seq, snapshot_key=f"snap:{state.run_id}"
                            ),
                            event_id=derived_event_id("checkpoint", state.run_id, state.seq),
                            causation_id=state.last_event_id,
                        )
                    ],
                )
                for state in states
            ]
        )
        if self._forgets:
            for state in states:
                if state.status in TERMINAL_STATUSES:
                    self.loader.forget(state.run_id)


class _Due:
    """A run due for a snapshot: when to write it, its state when last found due, and its
    entries held until then."""

    __slots__ = ("deliveries", "state", "write_at")

    def __init__(self, write_at: float, state: RunState) -> None:
        self.write_at = write_at
        self.state = state
        self.deliveries: list[Delivery] = []


def _ready(due: dict[str, _Due], now: float, slack: float) -> list[str]:
    """The due runs to write now: none before the first one's time has come, then every
    one due within ``slack`` of ``now`` (runs are in ``due`` in the order they became due)."""
    ready: list[str] = []
    if not due or next(iter(due.values())).write_at > now:
        return ready
    for run_id, found in due.items():
        if found.write_at > now + slack:
            break
        ready.append(run_id)
    return ready


_ENDING = frozenset({"run_completed", "run_failed", "run_cancelled"})
_CHECKPOINT = "checkpoint_taken"
#: Event types after which a step may have settled.
_SETTLING = frozenset({"step_succeeded", "step_cache_hit", "loop_completed", "step_skipped"})
