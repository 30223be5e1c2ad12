"""The agent runner against the memory store: inline agents and cache hits are done as the
step is read (start and outcome in one append, the entry acknowledged with the next fetch);
other agents go through a worker, which appends the start before the agent runs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.waits import LogSeen

from eventstore.events import (
    Envelope,
    StepCacheHit,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.memory import MemoryStore, MemorySubscription
from eventstore.store import AppendRequest, AppendResult, Delivery, StoreConfig
from projections.run_state import START_GRACE_MS
from services import commands
from services.agents.base import AgentContext
from services.agents.registry import default_registry
from services.agents.resilience import AgentExecutor
from services.app import running
from services.observability.tracing import format_traceparent
from services.producer import Producer
from services.runner.service import RunnerService, group_for
from services.scheduler.service import SchedulerService
from services.settings import Settings
from services.workflow.loader import parse_definition
from services.workflow.model import WorkflowDef

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


async def _started(store: MemoryStore, *steps: str) -> None:
    """Return once the feed shows one of ``steps`` started."""
    watcher = await store.subscribe("watcher", "test")
    with anyio.fail_after(30):
        while not any(
            isinstance(d.envelope.data, StepStarted) and d.envelope.data.step in steps
            for d in await watcher.fetch(100, block_ms=1000)
        ):
            pass
    await watcher.close()


def runner_settings(**runner: Any) -> Settings:
    """In-memory settings with these runner settings."""
    return Settings.model_validate({"redis_url": None, "http_port": 0, "runner": runner})


def one_worker(heartbeat_s: float) -> Settings:
    """In-memory settings for a runner with a single worker."""
    return runner_settings(concurrency=1, heartbeat_s=heartbeat_s)


def sleepers(first_s: float, second_s: float) -> WorkflowDef:
    """Two independent ``sleep`` steps, ``one`` and ``two``."""
    return parse_definition(
        f"name: pair\nsteps:\n  - {{id: one, agent: sleep, with: {{seconds: {first_s}}}}}\n"
        f"  - {{id: two, agent: sleep, with: {{seconds: {second_s}}}}}\n"
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
    async with running(store, settings, ("scheduler", "runner")):
        run = await commands.submit(store, producer, sleepers(600, 0))
        # Both steps are fetched together; "two" waits for the only worker, and its entry is
        # kept from looking abandoned all the same.
        with anyio.fail_after(30):
            await store.wait_touched("two")
        assert await _step_status(store, run.run_id, "one") == "running"
        assert await _step_status(store, run.run_id, "two") == "scheduled"
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


async def test_an_outcome_the_store_cannot_record_fails_its_step_and_the_runner_goes_on() -> None:
    """Outputs too large for the log, or that msgpack cannot carry: each step fails naming
    why (not retryable), and the runner keeps running the next runs."""
    store = MemoryStore(StoreConfig(max_event_bytes=4096))
    definition = parse_definition(
        f"""\
name: unrecordable
steps:
  - id: big
    agent: shell
    critical: false
    with: {{argv: ["{sys.executable}", "-c", "print('x' * 10000)"]}}
  - {{id: huge, agent: shell, critical: false, with: {{argv: [echo, "18446744073709551616"]}}}}
  - {{id: fine, agent: echo, with: {{value: 1}}}}
"""
    )
    producer = Producer("test")
    async with running(store, Settings(redis_url=None, http_port=0), ("scheduler", "runner")):
        first = await commands.submit(store, producer, definition)
        state = await commands.wait(store, first.run_id, timeout_s=30)
        second = await commands.submit(store, producer, definition, idempotency_key="again")
        again = await commands.wait(store, second.run_id, timeout_s=30)
    assert (state.status, state.degraded, again.status) == ("completed", True, "completed")
    assert state.steps["fine"].output == 1
    for step, named in (("big", "max_event_bytes"), ("huge", "serialize ints")):
        error = state.steps[step].error
        assert error is not None, step
        assert (error.type, error.retryable) == ("OutputNotRecorded", False)
        assert f"the outcome of step {step!r} cannot be recorded" in error.message
        assert named in error.message
    history = [e async for e in store.read_run(first.run_id)]
    assert [e.type for e in _facts(history, "big")] == ["step_started", "step_failed"]


class Unstorable:
    """An inline agent whose output msgpack cannot carry (an integer beyond 64 bits)."""

    name = "unstorable"
    version = "1"
    inline = True

    def call(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        return 2**64

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        return self.call(inputs, ctx)


async def test_an_inline_outcome_the_store_cannot_record_fails_only_its_own_step() -> None:
    """Inline steps read together are appended in one call; when the store refuses one
    outcome, nothing of the call was written, and each step is then recorded on its own."""
    store = MemoryStore()
    registry = default_registry()
    registry.register(Unstorable())
    producer = Producer("scheduler")
    scheduled = [
        producer.envelope(
            f"run-{agent}",
            StepScheduled(step="s", attempt=1, agent=agent, inputs={"value": 1}),
        )
        for agent in ("unstorable", "echo")
    ]
    for event in scheduled:
        await store.append(event.run_id, [event])
    runner = RunnerService(store, Producer("runner"), AgentExecutor(registry), consumer="r")
    watcher = await store.subscribe("watcher", "test")
    outcomes = 0
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        with anyio.fail_after(30):
            while outcomes < len(scheduled):
                deliveries = await watcher.fetch(100, block_ms=1000)
                outcomes += sum(
                    isinstance(d.envelope.data, StepFailed | StepSucceeded) for d in deliveries
                )
        runner.stop()
    [started, failed] = [e async for e in store.read_run("run-unstorable")][1:]
    assert isinstance(started.data, StepStarted)
    assert isinstance(failed.data, StepFailed)
    assert failed.data.error.type == "OutputNotRecorded"
    assert "serialize ints" in failed.data.error.message
    [_, succeeded] = [e async for e in store.read_run("run-echo")][1:]
    assert isinstance(succeeded.data, StepSucceeded)
    assert succeeded.data.output == 1


async def test_a_step_queued_for_its_agents_bulkhead_is_not_started_yet() -> None:
    """A step's start is recorded when it gets a bulkhead slot, not while it waits for one:
    its timeout counts from there, and the timeline shows when it really began."""
    store = TouchWatch()
    settings = runner_settings(heartbeat_s=0.05, bulkhead={"sleep": 1})
    producer = Producer("test")
    async with running(store, settings, ("scheduler", "runner")):
        run = await commands.submit(store, producer, sleepers(600, 600))
        # one of them has started, and both are in the runner's hands (heartbeated)
        await _started(store, "one", "two")
        with anyio.fail_after(30):
            await store.wait_touched("one")
            await store.wait_touched("two")
        statuses = sorted([await _step_status(store, run.run_id, s) for s in ("one", "two")])
        assert statuses == ["running", "scheduled"]
        await commands.cancel(store, producer, run.run_id)
        assert (await commands.wait(store, run.run_id, timeout_s=30)).status == "cancelled"


async def test_an_attempt_past_its_start_deadline_is_not_started() -> None:
    """A step that waited (for a worker, a bulkhead slot, a claim) past the time the
    scheduler times out a unit never started is left to the scheduler, which has recorded that
    timeout or will: the runner acknowledges it and runs nothing."""
    store = MemoryStore()
    producer = Producer("scheduler")
    scheduled_at = 1_700_000_000_000
    late, fresh = (
        producer.envelope(
            f"run-{name}",
            StepScheduled(step="s", attempt=1, agent="sleep", inputs={"seconds": 0}, timeout_s=1),
            ts=scheduled_at,
        )
        for name in ("late", "fresh")
    )
    clock = [scheduled_at + 1_000 + START_GRACE_MS + 1]
    runner = RunnerService(
        store,
        Producer("runner"),
        AgentExecutor(default_registry()),
        consumer="r",
        clock_ms=lambda: clock[0],
    )
    noted = LogSeen("step not started: its start deadline passed while it waited")
    runner_log = logging.getLogger("flowlog.runner")
    runner_log.addHandler(noted)
    watcher = await store.subscribe("watcher", "test")
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await store.append(late.run_id, [late])
            with anyio.fail_after(30):
                await noted.seen.wait()
            clock[0] = scheduled_at
            await store.append(fresh.run_id, [fresh])
            with anyio.fail_after(30):
                while not any(
                    isinstance(d.envelope.data, StepSucceeded)
                    for d in await watcher.fetch(100, block_ms=1000)
                ):
                    pass
            runner.stop()
    finally:
        runner_log.removeHandler(noted)
    assert [e.type async for e in store.read_run(late.run_id)] == ["step_scheduled"]
    assert [e.type async for e in store.read_run(fresh.run_id)] == [
        "step_scheduled",
        "step_started",
        "step_succeeded",
    ]
    infos = [i for i in await store.group_info() if i.group == group_for("default")]
    assert infos
    assert all((info.pending, info.lag) == (0, 0) for info in infos)
