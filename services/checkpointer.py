"""The checkpointer: snapshots run state so rebuilding a long run costs snapshot + tail.

It reads the partition feeds as consumer group ``checkpointer``. A run is snapshotted when
``every`` events have been appended since its last snapshot, and when it ends. Each snapshot
is recorded in the log as a ``checkpoint_taken`` event (seq covered, snapshot key), appended as
a fact with an id derived from (run, seq), so a repeated delivery records nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from eventstore.events import CheckpointTaken, Envelope
from eventstore.ids import derived_event_id
from eventstore.store import TERMINAL_STATUSES, Delivery, EventStore
from projections.run_state import RunState
from services.producer import Producer
from services.runs import RunLoader, snapshot_of

log = logging.getLogger("flowlog.checkpointer")

GROUP = "checkpointer"


class Checkpointer:
    """Snapshots every run every ``every`` events and at its end."""

    def __init__(
        self,
        store: EventStore,
        producer: Producer,
        *,
        consumer: str,
        every: int = 100,
        batch: int = 256,
        block_ms: int = 500,
    ) -> None:
        self.store = store
        self.producer = producer
        self.consumer = consumer
        self.every = every
        self.batch = batch
        self.block_ms = block_ms
        self.loader = RunLoader(store)
        self.snapshots = 0
        self._stop = anyio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subscription = await self.store.subscribe(GROUP, self.consumer)
        task_status.started()
        try:
            while not self._stop.is_set():
                deliveries = await subscription.fetch(self.batch, self.block_ms)
                if deliveries:
                    await self.handle(deliveries)
                    await subscription.ack(deliveries)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await subscription.close()

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        by_run: dict[str, list[Envelope]] = {}
        for delivery in deliveries:
            by_run.setdefault(delivery.envelope.run_id, []).append(delivery.envelope)
        for run_id, events in by_run.items():
            due = any(
                e.type in _ENDING or (e.seq % self.every == 0 and e.type != "checkpoint_taken")
                for e in events
            )
            state = await self.loader.advance(run_id, events)
            if state is not None and due:
                await self.checkpoint(state)

    async def checkpoint(self, state: RunState) -> None:
        """Snapshot ``state`` and record it in the log."""
        run_id = state.run_id
        await self.store.put_snapshot(snapshot_of(state))
        self.snapshots += 1
        event = self.producer.envelope(
            run_id,
            CheckpointTaken(covered_seq=state.seq, snapshot_key=f"snap:{run_id}"),
            event_id=derived_event_id("checkpoint", run_id, state.seq),
            causation_id=state.last_event_id,
        )
        await self.store.append(run_id, [event])
        if state.status in TERMINAL_STATUSES:
            self.loader.forget(run_id)


_ENDING = frozenset({"run_completed", "run_failed", "run_cancelled"})
