"""The agent runner against the memory store: inline agents and cache hits are done as the
step is read (start and outcome in one append, the entry acknowledged with the next fetch);
other agents go through a worker, which appends the start before the agent runs."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from eventstore.events import Envelope, StepCacheHit, StepFailed, StepStarted, StepSucceeded
from eventstore.memory import MemoryStore, MemorySubscription
from eventstore.store import AppendRequest, AppendResult, Delivery
from services import commands
from services.agents.resilience import AgentExecutor
from services.app import running
from services.observability.tracing import format_traceparent
from services.producer import Producer
from services.runner.service import RunnerService, group_for
from services.scheduler.service import SchedulerService
from services.settings import Settings
from services.workflow.loader import parse_definition

pytestmark = pytest.mark.anyio

DEFINITION = parse_definition(
    """\
name: mixed
steps:
  - {id: first, agent: echo, with: {value: 1}, cache_ttl: 60}
  - {id: again, agent: echo, with: {value: 1}, cache_ttl: 60, depends_on: [first]}
  - {id: waits, agent: sleep, with: {seconds: 0}, depends_on: [again]}
  - {id: bad, agent: echo, with: {valu: 2}, depends_on: [waits], critical: false}
"""
)


def _facts(history: list[Envelope], step: str) -> list[Envelope]:
    return [
        e
        for e in history
        if isinstance(e.data, StepStarted | StepSucceeded | StepFailed | StepCacheHit)
        and e.data.step == step
    ]


class RecordingStore(MemoryStore):
    """The memory store, keeping the event types of every append request it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, ...]] = []

    async def append_many(self, requests: Sequence[AppendRequest]) -> list[list[AppendResult]]:
        for request in requests:
            self.requests.append(
                tuple(f"{e.type}:{getattr(e.data, 'step', '')}" for e in request.events)
            )
        return await super().append_many(requests)


async def test_inline_steps_append_start_and_outcome_together() -> None:
    store = RecordingStore()
    settings = Settings(redis_url=None, http_port=0)
    async with running(store, settings, ("scheduler", "runner")):
        run = await commands.submit(store, Producer("test"), DEFINITION)
        state = await commands.wait(store, run.run_id, timeout_s=30)
    assert state.status == "completed"
    assert state.degraded
    history = [e async for e in store.read_run(run.run_id)]

    first = _facts(history, "first")
    assert [e.type for e in first] == ["step_started", "step_succeeded"]
    assert first[1].seq == first[0].seq + 1
    assert state.steps["first"].output == 1
    # The same inputs within the cache TTL: a cache hit, nothing run, nothing started.
    assert [e.type for e in _facts(history, "again")] == ["step_cache_hit"]
    assert state.steps["again"].cached
    assert ("step_started:first", "step_succeeded:first") in store.requests
    # A non-inline agent: its start is appended on its own, before the agent runs.
    assert [e.type for e in _facts(history, "waits")] == ["step_started", "step_succeeded"]
    assert ("step_started:waits",) in store.requests
    assert ("step_succeeded:waits",) in store.requests
    # An inline agent's failure is recorded like any other: a non-retryable input error.
    bad = _facts(history, "bad")
    assert [e.type for e in bad] == ["step_started", "step_failed"]
    assert bad[1].seq == bad[0].seq + 1
    assert isinstance(bad[1].data, StepFailed)
    assert bad[1].data.error.type == "AgentInputError"
    assert state.steps["bad"].status == "skipped"

    # Every entry the runner read was acknowledged once it stopped.
    infos = [i for i in await store.group_info() if i.group == group_for("default")]
    assert infos
    assert all(i.pending == 0 for i in infos)


async def _started(store: MemoryStore, step: str) -> None:
    """Return once the feed shows ``step`` started."""
    watcher = await store.subscribe("watcher", "test")
    with anyio.fail_after(30):
        while not any(
            isinstance(d.envelope.data, StepStarted) and d.envelope.data.step == step
            for d in await watcher.fetch(100, block_ms=1000)
        ):
            pass
    await watcher.close()


def one_worker(heartbeat_s: float) -> Settings:
    """In-memory settings for a runner with a single worker."""
    return Settings.model_validate(
        {
            "redis_url": None,
            "http_port": 0,
            "runner": {"concurrency": 1, "heartbeat_s": heartbeat_s},
        }
    )


async def _step_status(store: MemoryStore, run_id: str, step: str) -> str:
    found = (await commands.load_run(store, run_id)).steps.get(step)
    return found.status if found is not None else ""


async def test_inline_steps_do_not_wait_for_a_worker() -> None:
    store = MemoryStore()
    settings = one_worker(heartbeat_s=0.1)
    producer = Producer("test")
    long = parse_definition(
        "name: long\nsteps:\n  - {id: nap, agent: sleep, with: {seconds: 600}}\n"
    )
    quick = parse_definition("name: quick\nsteps:\n  - {id: now, agent: echo, with: {value: 7}}\n")
    async with running(store, settings, ("scheduler", "runner")):
        busy = await commands.submit(store, producer, long)
        # The only worker is taken once the long step has started.
        await _started(store, "nap")
        done = await commands.wait(
            store, (await commands.submit(store, producer, quick)).run_id, timeout_s=30
        )
        assert done.steps["now"].output == 7
        assert await _step_status(store, busy.run_id, "nap") == "running"
        await commands.cancel(store, producer, busy.run_id)
        cancelled = await commands.wait(store, busy.run_id, timeout_s=30)
    assert cancelled.status == "cancelled"


class TouchWatch(MemoryStore):
    """The memory store, noting the steps whose entries subscribers touch."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: set[str] = set()
        self._changed = anyio.Event()

    async def subscribe(
        self, group: str, consumer: str, *, queue: str | None = None
    ) -> MemorySubscription:
        subscription = await super().subscribe(group, consumer, queue=queue)
        touch = subscription.touch

        async def noting(deliveries: Sequence[Delivery]) -> None:
            await touch(deliveries)
            self.touched |= {getattr(d.envelope.data, "step", "") for d in deliveries}
            self._changed.set()
            self._changed = anyio.Event()

        setattr(subscription, "touch", noting)  # noqa: B010 - wraps the bound method
        return subscription

    async def wait_touched(self, step: str) -> None:
        while step not in self.touched:
            await self._changed.wait()


async def test_steps_waiting_for_a_worker_are_heartbeated() -> None:
    store = TouchWatch()
    settings = one_worker(heartbeat_s=0.05)
    producer = Producer("test")
    pair = parse_definition(
        "name: pair\nsteps:\n  - {id: busy, agent: sleep, with: {seconds: 600}}\n"
        "  - {id: next, agent: sleep, with: {seconds: 0}}\n"
    )
    async with running(store, settings, ("scheduler", "runner")):
        run = await commands.submit(store, producer, pair)
        # Both steps are fetched together; "next" waits for the only worker, and its entry is
        # kept from looking abandoned all the same.
        with anyio.fail_after(30):
            await store.wait_touched("next")
        assert await _step_status(store, run.run_id, "busy") == "running"
        assert await _step_status(store, run.run_id, "next") == "scheduled"
        await commands.cancel(store, producer, run.run_id)
        assert (await commands.wait(store, run.run_id, timeout_s=30)).status == "cancelled"


async def test_inline_steps_and_cache_hits_get_the_same_step_spans_as_worker_steps() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = MemoryStore()
    settings = Settings(redis_url=None, http_port=0)
    scheduler = SchedulerService(store, Producer("scheduler"), consumer="s")
    runner = RunnerService(
        store,
        Producer("runner"),
        AgentExecutor.from_settings(settings.runner),
        consumer="r",
        tracer_provider=provider,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        await tg.start(runner.run)
        run = await commands.submit(store, Producer("test"), DEFINITION)
        state = await commands.wait(store, run.run_id, timeout_s=30)
        runner.stop()
        scheduler.stop()
    assert state.status == "completed"
    history = [e async for e in store.read_run(run.run_id)]
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for step, agent, extra in (
        ("first", "echo", {"flowlog.cached": False}),
        ("again", "echo", {"flowlog.cache_hit": True}),
        ("waits", "sleep", {"flowlog.cached": False}),
        ("bad", "echo", {"error.type": "AgentInputError"}),
    ):
        span = spans[f"step {step}"]
        assert span.kind is SpanKind.CONSUMER
        assert span.attributes is not None
        expected = {"flowlog.step": step, "flowlog.agent": agent, "flowlog.attempt": 1, **extra}
        assert {key: span.attributes.get(key) for key in expected} == expected
        # Every fact of the attempt carries the step span as its parent.
        facts = _facts(history, step)
        assert facts
        context = span.get_span_context()
        assert context is not None
        for fact in facts:
            assert fact.traceparent == format_traceparent(context)
    assert spans["step bad"].status.status_code is StatusCode.ERROR
    provider.shutdown()
    await store.close()
