"""The metrics projector: folds the partition feeds into the metrics model Prometheus scrapes.

It reads every feed as consumer group ``metrics`` and, per batch: applies the events to the
:class:`~projections.metrics_model.MetricsModel`, saves the model as the snapshot
``__metrics__``, and only then acknowledges the batch. Entries are acknowledged only once a
saved snapshot contains them, so a crash at any point neither loses an event (unacknowledged
entries are delivered again and folded into the reloaded snapshot) nor counts one twice (the
model ignores a seq it has already applied). A snapshot of another
:data:`~projections.metrics_model.MODEL_VERSION` (or a missing one) makes the projector rebuild
the model by folding every run stream the store still holds; feed entries already folded that
way are then ignored as repeats.

Run one projector per store: the model is one snapshot, and a second replica in the group would
fold half the events into a model of its own and overwrite the first one's snapshot.

Every ``refresh_s`` it also reads the consumer groups' pending and lag and the dead-letter
counts from the store into gauges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from eventstore.errors import StoreClosed, StoreUnavailable
from eventstore.store import Delivery, EventStore, Snapshot, Subscription
from projections.metrics_model import (
    MODEL_VERSION,
    MetricsModel,
    apply,
    decode_model,
    encode_model,
)
from services.linger import linger
from services.observability.prometheus import ProjectorMetrics

log = logging.getLogger("flowlog.metrics")

GROUP: Final = "metrics"
SNAPSHOT_ID: Final = "__metrics__"
#: How long a batch in hand may take to be saved and acknowledged, even while stopping.
_COMMIT_TIMEOUT_S: Final = 10.0
#: Deliveries folded but not yet saved and acknowledged, at most (then a commit is forced).
_MAX_UNACKED: Final = 5000


class _Published:
    """The model as last saved: its snapshot bytes, decoded into the copy scrapes read only when
    one is read (once per save), so saving does not pay for a copy nobody looks at."""

    __slots__ = ("_model", "applied", "state")

    def __init__(self, state: bytes, applied: int) -> None:
        self.state = state
        self.applied = applied
        self._model: MetricsModel | None = None

    @property
    def model(self) -> MetricsModel:
        if self._model is None:
            self._model = decode_model(self.state)
        return self._model


class MetricsProjector:
    """Keeps the metrics model of ``store`` up to date and exposes it on ``registry``."""

    def __init__(
        self,
        store: EventStore,
        *,
        registry: CollectorRegistry,
        consumer: str,
        batch: int = 500,
        block_ms: int = 1000,
        refresh_s: float = 5.0,
        retry_s: float = 1.0,
        commit_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.commit_interval_s = commit_interval_s
        self._saved = _Published(encode_model(MetricsModel()), 0)
        self._metrics = ProjectorMetrics(registry, lambda: self._saved.model)
        self._stop = anyio.Event()
        self._committed = anyio.Event()

    @property
    def model(self) -> MetricsModel:
        """The model as last saved (what ``/metrics`` shows); do not mutate it."""
        return self._saved.model

    async def wait_applied(self, count: int) -> None:
        """Wait until the saved and acknowledged model has folded at least ``count`` events."""
        while self._saved.applied < count:
            await self._committed.wait()

    def stop(self) -> None:
        """Stop reading; the batch in hand is saved and acknowledged first."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load (or rebuild) the model, subscribe, then fold batches until :meth:`stop`."""
        model = await self.load()
        subscription = await self.store.subscribe(GROUP, self.consumer)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresh_loop)
                task_status.started()
                await self._consume(model, subscription)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await subscription.close()

    async def load(self) -> MetricsModel:
        """The model of the saved snapshot; without a usable one, a model rebuilt by folding
        every run's stream, the projector's group first made anew at the end of the feeds: it
        gets only what is appended after (or during) the rebuild. Replaying the whole feed
        into the rebuilt model would count again the runs it keeps no seq of (finished runs
        beyond ``keep_finished``)."""
        snapshot = await self.store.get_snapshot(SNAPSHOT_ID)
        if snapshot is not None and snapshot.version == MODEL_VERSION:
            model = decode_model(snapshot.state)
            self._saved = _Published(snapshot.state, model.applied)
            return model
        if snapshot is not None:
            log.warning(
                "metrics snapshot has model version %d, not %d: rebuilding",
                snapshot.version,
                MODEL_VERSION,
            )
        await self.store.reset_group(GROUP)
        model = MetricsModel()
        for run_id in await self.store.list_runs():
            async for envelope in self.store.read_run(run_id):
                apply(model, envelope)
        await self._save(model)
        return model

    async def refresh_store_gauges(self) -> None:
        """Read consumer-group pending and lag and dead-letter counts into the gauges."""
        groups = await self.store.group_info()
        dead = await self.store.dead_letters()
        self._metrics.update_store_gauges(groups, dead, self.store.config.partitions)

    async def _consume(self, model: MetricsModel, subscription: Subscription) -> None:
        """Fold every batch as it comes; save and acknowledge at most every
        ``commit_interval_s`` (and whenever the feed goes quiet or the service stops), so a
        busy log does not pay for a snapshot per batch."""
        unacked: list[Delivery] = []
        applied_before = model.applied
        last_commit = anyio.current_time()
        while not self._stop.is_set():
            try:
                deliveries = await subscription.fetch(self.batch, self.block_ms)
                for delivery in deliveries:
                    apply(model, delivery.envelope)
                unacked.extend(deliveries)
                due = (
                    not deliveries
                    or len(unacked) >= _MAX_UNACKED
                    or anyio.current_time() - last_commit >= self.commit_interval_s
                )
                if unacked and due:
                    with anyio.move_on_after(_COMMIT_TIMEOUT_S, shield=True) as scope:
                        await self._commit(model, unacked, subscription, applied_before)
                    if scope.cancelled_caught:
                        log.warning(
                            "saving the metrics snapshot took over %.0fs; the batch is left"
                            " unacknowledged and will be delivered again",
                            _COMMIT_TIMEOUT_S,
                        )
                    else:
                        unacked = []
                        applied_before = model.applied
                        last_commit = anyio.current_time()
                await linger(self._stop, len(deliveries), self.batch)
            except StoreClosed:
                raise
            except StoreUnavailable as exc:
                log.warning("store unavailable, retrying in %.1fs: %s", self.retry_s, exc)
                await anyio.sleep(self.retry_s)
        if unacked:
            with anyio.move_on_after(_COMMIT_TIMEOUT_S, shield=True):
                await self._commit(model, unacked, subscription, applied_before)

    async def _commit(
        self,
        model: MetricsModel,
        deliveries: Sequence[Delivery],
        subscription: Subscription,
        applied_before: int,
    ) -> None:
        """Save, then acknowledge. If saving fails the deliveries stay unacknowledged and
        ``model`` keeps them: the next save covers them, or a restart folds them again."""
        await self._save(model)
        await subscription.ack(deliveries)
        # counted once acknowledged: a failed ack leaves them to the next commit, counted there
        self._metrics.events_applied.inc(model.applied - applied_before)
        self._committed.set()
        self._committed = anyio.Event()

    async def _save(self, model: MetricsModel) -> None:
        """Save ``model`` as the snapshot, then publish a copy of it for scrapes."""
        state = encode_model(model)
        await self.store.put_snapshot(
            Snapshot(run_id=SNAPSHOT_ID, seq=model.applied, version=MODEL_VERSION, state=state)
        )
        self._saved = _Published(state, model.applied)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_store_gauges()
            except StoreUnavailable as exc:
                log.warning("cannot refresh consumer-group and dead-letter gauges: %s", exc)
            await anyio.sleep(self.refresh_s)
