"""The metrics model (a pure fold) and the metrics projector that keeps it with its snapshot."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.prometheus import synthetic_runs
from support.waits import caught_up

from eventstore.errors import StoreUnavailable
from eventstore.events import (
    Envelope,
    ErrorInfo,
    EventData,
    RunFailed,
    RunRetryRequested,
    RunStarted,
    RunSubmitted,
    StepCacheHit,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.ids import new_event_id
from eventstore.memory import MemoryStore, MemorySubscription
from eventstore.store import Delivery, Snapshot, StoreConfig
from projections.metrics_model import (
    DURATION_BUCKETS,
    KEEP_FINISHED_RUNS,
    MODEL_VERSION,
    UNKNOWN_WORKFLOW,
    Histogram,
    MetricsModel,
    apply,
    decode_model,
    encode_model,
    fold,
)
from services.metrics_projector import GROUP, SNAPSHOT_ID, MetricsProjector
from services.producer import Producer

T0 = 1_700_000_000_000


def numbered(events: Sequence[Envelope]) -> list[Envelope]:
    """The events with the seq the store would give them (1-based, in order)."""
    return [msgspec.structs.replace(e, seq=i + 1) for i, e in enumerate(events)]


def history() -> dict[str, list[Envelope]]:
    return {run: numbered(events) for run, events in synthetic_runs("r", T0).items()}


def interleaved(runs: dict[str, list[Envelope]]) -> list[Envelope]:
    """All events, round-robin over runs (each run's order kept), like a feed."""
    queues = [list(events) for events in runs.values()]
    out: list[Envelope] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def envelope(run_id: str, seq: int, ts: int, data: EventData) -> Envelope:
    return Envelope(
        event_id=new_event_id(), run_id=run_id, seq=seq, ts=ts, producer="test", data=data
    )


# --- the pure model ----------------------------------------------------------------------------


def test_fold_counts_every_metric_of_the_synthetic_history() -> None:
    model = fold(interleaved(history()))

    assert model.runs_submitted == {"ingest": 4, "report": 3}
    assert model.runs_finished == {
        ("ingest", "cancelled"): 0,
        ("ingest", "completed"): 2,
        ("ingest", "failed"): 0,
        ("report", "cancelled"): 1,
        ("report", "completed"): 0,
        ("report", "failed"): 1,
    }
    assert model.runs_active() == {"submitted": 1, "running": 1, "paused": 1}
    assert model.step_attempts == {
        ("ingest", "fetch", "http"): 1,
        ("ingest", "parse", "python"): 3,
        ("ingest", "parse", "llm"): 1,
        ("report", "render", "shell"): 2,
    }
    assert model.step_retries == {("ingest", "parse"): 1}
    assert model.step_fallbacks == {("ingest", "parse", "llm"): 1}
    assert model.step_skips == {("ingest", "notify"): 1}
    assert model.cache_hits == {("ingest", "fetch", "http"): 1}
    assert model.cache_misses == {("ingest", "fetch", "http"): 1}
    assert model.events["run_submitted"] == 7
    assert model.events["step_started"] == 7
    assert model.applied == sum(len(events) for events in history().values())


def test_durations_come_from_event_timestamps() -> None:
    model = fold(interleaved(history()))

    completed = model.run_duration[("ingest", "completed")]
    assert completed.count == 2
    assert completed.sum_ms == 2_840 + 4_570
    assert completed.sum_seconds == pytest.approx(7.41)
    assert model.run_duration[("report", "failed")].sum_ms == 80
    steps = model.step_duration
    # started -> end: fetch 250 ms; parse failed after 1 s and 500 ms, then succeeded in 500 ms;
    assert steps[("ingest", "fetch", "http", "succeeded")].sum_ms == 250
    assert steps[("ingest", "parse", "python", "failed")].sum_ms == 1_000 + 500
    assert steps[("ingest", "parse", "python", "succeeded")].sum_ms == 500
    assert steps[("ingest", "parse", "llm", "succeeded")].sum_ms == 4_000
    # ...and a cached success, which never started, counts from its scheduling
    assert steps[("ingest", "fetch", "http", "cached")].sum_ms == 6


def test_histogram_buckets_are_inclusive_upper_bounds_then_inf() -> None:
    histogram = Histogram()
    for millis in (0, 5, 6, 1_000, 3_600_000, 3_600_001, 86_400_000):
        histogram.observe(millis)

    assert len(histogram.counts) == len(DURATION_BUCKETS) + 1
    assert histogram.counts[0] == 2
    assert histogram.counts[1] == 1
    assert histogram.counts[DURATION_BUCKETS.index(1.0)] == 1
    assert histogram.counts[DURATION_BUCKETS.index(3600.0)] == 1
    assert histogram.counts[-1] == 2
    assert histogram.count == 7
    assert histogram.sum_ms == 5 + 6 + 1_000 + 3_600_000 + 3_600_001 + 86_400_000


def test_clock_skew_between_producers_counts_as_zero_duration() -> None:
    events = [
        envelope("r", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")),
        envelope("r", 2, T0, StepScheduled(step="s", attempt=1, agent="a")),
        envelope("r", 3, T0 + 50, StepStarted(step="s", attempt=1, agent="a")),
        envelope("r", 4, T0 + 10, StepSucceeded(step="s", attempt=1, agent="a")),
    ]
    histogram = fold(events).step_duration[("w", "s", "a", "succeeded")]
    assert histogram.sum_ms == 0
    assert histogram.counts[0] == 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_redelivered_events_do_not_change_the_model(data: st.DataObject) -> None:
    runs = history()
    feed = interleaved(runs)
    # a consumer that crashed re-reads a suffix of what it had already seen, possibly more
    # than once, before going on
    redelivered: list[Envelope] = []
    position = 0
    while position < len(feed):
        step = data.draw(st.integers(min_value=1, max_value=8))
        chunk = feed[position : position + step]
        redelivered.extend(chunk)
        if data.draw(st.booleans()):
            back = data.draw(st.integers(min_value=1, max_value=len(chunk)))
            redelivered.extend(chunk[-back:])
        position += step

    assert encode_model(fold(redelivered)) == encode_model(fold(feed))


@settings(max_examples=60, deadline=None)
@given(split=st.integers(min_value=0, max_value=61))
def test_snapshot_plus_tail_equals_full_replay(split: int) -> None:
    feed = interleaved(history())
    split = min(split, len(feed))
    restored = decode_model(encode_model(fold(feed[:split])))

    assert encode_model(fold(feed[split:], restored)) == encode_model(fold(feed))


def test_events_not_from_the_log_are_ignored() -> None:
    unnumbered = synthetic_runs("r", T0)["r-completed"]
    model = fold(unnumbered)
    assert model.applied == 0
    assert model.events == {}


def test_cache_hit_event_and_cached_success_count_one_hit() -> None:
    hit_then_success = [
        envelope("a", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")),
        envelope("a", 2, T0, StepScheduled(step="s", attempt=1, agent="x", cache_ttl_s=5.0)),
        envelope("a", 3, T0, StepCacheHit(step="s", attempt=1, agent="x")),
        envelope("a", 4, T0, StepSucceeded(step="s", attempt=1, agent="x", cached=True)),
    ]
    success_only = [
        envelope("b", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")),
        envelope("b", 2, T0, StepScheduled(step="s", attempt=1, agent="x", cache_ttl_s=5.0)),
        envelope("b", 3, T0, StepSucceeded(step="s", attempt=1, agent="x", cached=True)),
    ]
    assert fold(hit_then_success).cache_hits == {("w", "s", "x"): 1}
    assert fold(success_only).cache_hits == {("w", "s", "x"): 1}
    assert fold([*hit_then_success, *success_only]).cache_misses == {("w", "s", "x"): 0}


def test_uncacheable_step_success_is_not_a_cache_miss() -> None:
    events = [
        envelope("a", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")),
        envelope("a", 2, T0, StepScheduled(step="s", attempt=1, agent="x")),
        envelope("a", 3, T0, StepSucceeded(step="s", attempt=1, agent="x")),
    ]
    model = fold(events)
    assert model.cache_misses == {}
    assert model.cache_hits == {}


def test_finished_runs_are_pruned_to_the_most_recent() -> None:
    model = MetricsModel(keep_finished=2)
    for index in range(5):
        run = f"run-{index}"
        apply(model, envelope(run, 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")))
        apply(model, envelope(run, 2, T0 + 1000, RunFailed(error=ErrorInfo(type="E", message=""))))
    apply(model, envelope("open", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")))

    assert list(model.finished_runs) == ["run-3", "run-4"]
    assert list(model.open_runs) == ["open"]
    assert model.runs_finished[("w", "failed")] == 5
    # a redelivery of a remembered run's event is still recognised
    apply(model, envelope("run-4", 2, T0 + 1000, RunFailed(error=ErrorInfo(type="E", message=""))))
    assert model.runs_finished[("w", "failed")] == 5


def test_late_event_of_a_forgotten_run_counts_under_unknown_workflow() -> None:
    model = MetricsModel(keep_finished=0)
    apply(model, envelope("r", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")))
    apply(model, envelope("r", 2, T0, RunFailed(error=ErrorInfo(type="E", message=""))))
    apply(model, envelope("r", 3, T0 + 5, StepSucceeded(step="s", attempt=1, agent="x")))

    assert model.finished_runs == {}
    assert model.open_runs == {}
    histogram = model.step_duration[(UNKNOWN_WORKFLOW, "s", "x", "succeeded")]
    assert histogram.count == 1


def test_retried_failed_run_is_active_again_and_finishes_again() -> None:
    events = [
        envelope("r", 1, T0, RunSubmitted(workflow="w", digest="d", definition="{}")),
        envelope("r", 2, T0 + 1, RunStarted()),
        envelope("r", 3, T0 + 2, RunFailed(error=ErrorInfo(type="E", message=""))),
        envelope("r", 4, T0 + 3, RunRetryRequested()),
    ]
    model = fold(events)
    assert model.runs_active() == {"submitted": 0, "running": 1, "paused": 0}

    apply(model, envelope("r", 5, T0 + 4, RunFailed(error=ErrorInfo(type="E", message=""))))
    assert model.runs_active()["running"] == 0
    assert model.runs_finished[("w", "failed")] == 2
    assert model.run_duration[("w", "failed")].sum_ms == 2 + 4


# --- the projector -----------------------------------------------------------------------------


class Crash(Exception):
    """Stands for the process dying at a chosen point."""


class CrashingStore(MemoryStore):
    """A memory store that raises ``error`` (:class:`Crash` unless set) once at ``crash_at``
    ("snapshot" or "ack")."""

    crash_at = ""
    error: Exception = Crash()

    async def put_snapshot(self, snapshot: Snapshot) -> None:
        if self.crash_at == "snapshot":
            self.crash_at = ""
            raise self.error
        await super().put_snapshot(snapshot)

    async def subscribe(
        self, group: str, consumer: str, *, queue: str | None = None
    ) -> MemorySubscription:
        await super().subscribe(group, consumer, queue=queue)
        return CrashingSubscription(self, group, consumer, queue)


class CrashingSubscription(MemorySubscription):
    def __init__(
        self, store: CrashingStore, group: str, consumer: str, queue: str | None = None
    ) -> None:
        super().__init__(store, group, consumer, queue)
        self._crashing = store

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if self._crashing.crash_at == "ack":
            self._crashing.crash_at = ""
            raise self._crashing.error
        await super().ack(deliveries)


async def append_history(store: MemoryStore, prefix: str) -> int:
    runs = synthetic_runs(prefix, T0)
    for run_id, events in runs.items():
        await store.append(run_id, events)
    return sum(len(events) for events in runs.values())


async def ground_truth(store: MemoryStore) -> MetricsModel:
    """The whole log folded with the pure model, run by run."""
    model = MetricsModel()
    for run_id in await store.list_runs():
        async for event in store.read_run(run_id):
            apply(model, event)
    return model


def counters(model: MetricsModel) -> MetricsModel:
    """Everything the model exports, without its per-run bookkeeping."""
    return msgspec.structs.replace(model, open_runs={}, finished_runs={})


async def pending(store: MemoryStore) -> int:
    return sum(info.pending for info in await store.group_info() if info.group == GROUP)


def projector(store: MemoryStore) -> MetricsProjector:
    return MetricsProjector(store, registry=CollectorRegistry(), consumer="metrics-1", block_ms=20)


@pytest.mark.anyio
async def test_projector_folds_the_feeds_saves_then_acknowledges() -> None:
    store = MemoryStore(StoreConfig(partitions=4))
    subject = projector(store)
    async with anyio.create_task_group() as tg:
        await tg.start(subject.run)
        total = await append_history(store, "a")
        with anyio.fail_after(10):
            await subject.wait_applied(total)
        assert await pending(store) == 0
        subject.stop()

    snapshot = await store.get_snapshot(SNAPSHOT_ID)
    assert snapshot is not None
    assert snapshot.version == MODEL_VERSION
    assert snapshot.seq == total
    assert counters(decode_model(snapshot.state)) == counters(await ground_truth(store))
    assert counters(subject.model) == counters(await ground_truth(store))


@pytest.mark.anyio
@pytest.mark.parametrize("crash_at", ["snapshot", "ack"])
async def test_restart_after_a_crash_neither_loses_nor_double_counts(crash_at: str) -> None:
    store = CrashingStore(StoreConfig(partitions=4))
    await store.put_snapshot(
        Snapshot(
            run_id=SNAPSHOT_ID, seq=0, version=MODEL_VERSION, state=encode_model(MetricsModel())
        )
    )
    await append_history(store, "a")
    store.crash_at = crash_at
    with pytest.raises(ExceptionGroup) as crashed:
        async with anyio.create_task_group() as tg:
            await tg.start(projector(store).run)
    assert crashed.group_contains(Crash)
    assert await pending(store) > 0

    total = await append_history(store, "b") * 2
    restarted = projector(store)
    async with anyio.create_task_group() as tg:
        await tg.start(restarted.run)
        with anyio.fail_after(10):
            await restarted.wait_applied(total)
        assert await pending(store) == 0
        restarted.stop()

    assert restarted.model.applied == total
    assert counters(restarted.model) == counters(await ground_truth(store))


@pytest.mark.anyio
async def test_events_applied_counts_each_event_once_across_a_failed_ack() -> None:
    store = CrashingStore(StoreConfig(partitions=4))
    store.error = StoreUnavailable("the store went away during the ack")
    registry = CollectorRegistry()
    subject = MetricsProjector(
        store, registry=registry, consumer="metrics-1", block_ms=20, retry_s=0.01
    )
    async with anyio.create_task_group() as tg:
        await tg.start(subject.run)
        store.crash_at = "ack"
        total = await append_history(store, "a")
        await caught_up(store, GROUP)
        subject.stop()
    assert store.crash_at == ""
    assert registry.get_sample_value("flowlog_projector_events_applied_total") == total


@pytest.mark.anyio
async def test_snapshot_of_another_version_is_rebuilt_from_the_run_streams() -> None:
    store = MemoryStore(StoreConfig(partitions=4))
    total = await append_history(store, "a")
    # the group has consumed every entry already: only the run streams can rebuild the model
    drained = await store.subscribe(GROUP, "old")
    await drained.ack(await drained.fetch(max_count=1000, block_ms=0))
    await store.put_snapshot(
        Snapshot(run_id=SNAPSHOT_ID, seq=1, version=MODEL_VERSION + 1, state=b"\x00")
    )

    model = await projector(store).load()

    assert model.applied == total
    assert counters(model) == counters(await ground_truth(store))
    snapshot = await store.get_snapshot(SNAPSHOT_ID)
    assert snapshot is not None
    assert snapshot.version == MODEL_VERSION


@pytest.mark.anyio
async def test_a_first_start_on_a_long_history_counts_every_run_once() -> None:
    """No snapshot: the model is rebuilt from the run streams, and it keeps no seq of the
    finished runs beyond ``keep_finished``; the projector's feed must start after what the
    rebuild folded, or those runs are counted twice."""
    store = MemoryStore(StoreConfig(partitions=4))
    producer = Producer("test")
    runs = KEEP_FINISHED_RUNS + 10
    for n in range(runs):
        run_id = f"run-{n:06d}"
        submitted = RunSubmitted(workflow="w", digest="d", definition="")
        failed = RunFailed(error=ErrorInfo(type="E", message="m"))
        await store.append(
            run_id, [producer.envelope(run_id, submitted), producer.envelope(run_id, failed)]
        )
    subject = projector(store)
    async with anyio.create_task_group() as tg:
        await tg.start(subject.run)
        later = "run-later"
        again = RunSubmitted(workflow="w", digest="d", definition="")
        await store.append(later, [producer.envelope(later, again)])
        with anyio.fail_after(30):
            await subject.wait_applied(2 * runs + 1)
        subject.stop()
    assert subject.model.applied == 2 * runs + 1
    assert subject.model.runs_submitted == {"w": runs + 1}
    assert counters(subject.model) == counters(await ground_truth(store))
    assert await pending(store) == 0


@pytest.mark.anyio
async def test_store_gauges_show_lag_pending_and_dead_letters() -> None:
    store = MemoryStore(StoreConfig(partitions=2))
    registry = CollectorRegistry()
    subject = MetricsProjector(store, registry=registry, consumer="metrics-1", block_ms=20)
    laggard = await store.subscribe("scheduler", "s1")
    async with anyio.create_task_group() as tg:
        await tg.start(subject.run)
        total = await append_history(store, "a")
        store.add_raw_feed_entry(1, b"not an event")
        with anyio.fail_after(10):
            await subject.wait_applied(total)
        await laggard.fetch(max_count=5, block_ms=0)
        await subject.refresh_store_gauges()
        subject.stop()

    def gauge(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert gauge("flowlog_consumer_group_lag", group="scheduler") == total + 1 - 5
    assert gauge("flowlog_consumer_group_pending", group="scheduler") == 5
    assert gauge("flowlog_consumer_group_lag", group=GROUP) == 0
    assert gauge("flowlog_consumer_group_pending", group=GROUP) == 0
    assert gauge("flowlog_dead_letters", partition="0") == 0
    assert gauge("flowlog_dead_letters", partition="1") == 1
    assert gauge("flowlog_projector_events_applied_total") == total
