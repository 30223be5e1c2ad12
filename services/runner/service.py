"""The agent runner: takes scheduled steps of its queues and executes them.

It reads the work streams of each queue it serves (the store adds every ``step_scheduled``
event to its queue's work stream) as consumer group ``runner:<queue>``; any number of runner
replicas share a group, and a runner wakes for steps it may run, not for every event of the
log. For each scheduled step a worker waits for a slot of the agent's bulkhead, appends
``step_started`` (so the step's timeout, which the scheduler counts from that event, does not
include time spent queued behind other calls of the agent), runs the agent (timeout, circuit
breaker, result cache — see :mod:`services.agents.resilience`) and appends ``step_succeeded``
or ``step_failed``; a cache hit appends ``step_cache_hit`` and runs nothing. An outcome the
store refuses as it is (an output over ``max_event_bytes``, or a value msgpack cannot carry)
is recorded as the attempt's non-retryable failure (``OutputNotRecorded``, naming why), so a
bad output fails its step, not the runner. A step with a timeout that waited (for a worker, a
slot, or a claim after its runner died) past the time the scheduler times out a unit never
started is acknowledged and not started: the scheduler records that timeout and retries it,
and running it as well would run the step twice.
An inline agent (:class:`~services.agents.base.InlineAgent`: pure, instant) is called by the
reader itself, and its ``step_started`` goes out with the outcome in one append for the whole
batch, as do cache hits. The work entry is acknowledged only after the outcome is appended (by
a worker, or with the reader's next fetch), so a runner that dies mid-step leaves the entry
pending and another runner claims it after ``claim_idle`` and runs the step again.

Facts get event ids derived from the attempt (run, step, item, iteration, fallback, attempt),
so a repeated delivery of the same attempt appends nothing new. While a step runs, or waits
for a free worker, its entry is touched every ``heartbeat_s`` (so it is not claimed from a live
runner); for a running step the run's head is checked too: a run that became terminal
(cancelled, or failed elsewhere) cancels the step.

The reader fetches up to ``prefetch`` steps per idle worker (inline ones are done as they are
read), as Celery's prefetch multiplier: fewer, larger reads under load; with long steps and
several runners, ``prefetch=1`` keeps one runner from holding steps it cannot start yet while
another is idle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from opentelemetry.trace import TracerProvider

from eventstore.errors import EventRejected, StoreError
from eventstore.events import (
    Envelope,
    ErrorInfo,
    StepCacheHit,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from eventstore.ids import derived_event_id
from eventstore.store import (
    TERMINAL_STATUSES,
    AppendRequest,
    AppendResult,
    Delivery,
    EventStore,
    Subscription,
)
from projections.run_state import start_deadline_ms
from services.agents.base import AgentContext, AgentError, error_info
from services.agents.resilience import AgentExecutor, CacheHit, ExecutionResult
from services.group_commit import GroupCommit
from services.observability.logs import trace_field
from services.observability.tracing import RunTracer
from services.producer import Producer, now_ms

log = logging.getLogger("flowlog.runner")


def group_for(queue: str) -> str:
    return f"runner:{queue}"


def attempt_id(run_id: str, s: StepScheduled, what: str) -> str:
    """The id of a fact about one attempt: derived from the attempt's idempotency key (which
    the scheduler makes unique per run generation, step, unit, fallback and attempt), so a
    repeated delivery of the attempt appends nothing new."""
    return derived_event_id(run_id, s.idempotency_key, what)


class _TimedOutUnstarted(Exception):
    """The attempt waited (for a worker, a bulkhead slot, or a claim after its runner died)
    past the time the scheduler times out a unit scheduled and not started: the scheduler has
    recorded that timeout, or will, and decides what comes next; starting it now would run
    the step beside its retry or fallback."""


class _InFlight:
    __slots__ = ("delivery", "scope", "subscription")

    def __init__(self, subscription: Subscription, delivery: Delivery) -> None:
        self.subscription = subscription
        self.delivery = delivery
        self.scope = anyio.CancelScope()


class RunnerService:
    """Executes scheduled steps of ``queues`` with at most ``concurrency`` at a time."""

    def __init__(
        self,
        store: EventStore,
        producer: Producer,
        executor: AgentExecutor,
        *,
        consumer: str,
        queues: Sequence[str] = ("default",),
        concurrency: int = 32,
        heartbeat_s: float = 5.0,
        prefetch: int = 4,
        block_ms: int = 500,
        tracer_provider: TracerProvider | None = None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.clock_ms = clock_ms
        self.producer = producer
        self.executor = executor
        self.consumer = consumer
        self.queues = tuple(queues)
        self.concurrency = concurrency
        self.heartbeat_s = heartbeat_s
        self.block_ms = block_ms
        self.tracer = RunTracer(store.config, tracer_provider)
        self._stop = anyio.Event()
        self.prefetch = prefetch
        self._inflight: dict[int, _InFlight] = {}
        # Steps fetched for a worker that no worker has taken yet.
        self._waiting: dict[int, tuple[Subscription, Delivery]] = {}
        self._idle = concurrency
        # Workers' appends and acks go out in batches: one round trip per batch, not per step.
        self._appends: GroupCommit[AppendRequest, list[AppendResult]] = GroupCommit(
            store.append_many, isolate=(EventRejected,)
        )
        self._acks: dict[int, GroupCommit[Delivery, None]] = {}

    def stop(self) -> None:
        """Stop taking new steps; steps in hand finish and are acknowledged."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subscriptions = [
            await self.store.subscribe(group_for(q), self.consumer, queue=q) for q in self.queues
        ]
        send, receive = anyio.create_memory_object_stream[tuple[Subscription, Delivery]](
            self.concurrency
        )
        task_status.started()
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._heartbeat)
                await outer.start(self._appends.run)
                for sub in subscriptions:
                    await outer.start(self._ack_commit(sub).run)
                async with anyio.create_task_group() as workers:
                    for _ in range(self.concurrency):
                        workers.start_soon(self._worker, receive.clone())
                    receive.close()
                    async with send, anyio.create_task_group() as readers:
                        for queue, sub in zip(self.queues, subscriptions, strict=True):
                            readers.start_soon(self._read, queue, sub, send.clone())
                        await self._stop.wait()
                        readers.cancel_scope.cancel()
                    # Workers finish what was handed to them and end when the stream closes.
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                for sub in subscriptions:
                    await sub.close()
                await self.executor.aclose()

    async def _read(
        self,
        queue: str,
        subscription: Subscription,
        send: anyio.abc.ObjectSendStream[tuple[Subscription, Delivery]],
    ) -> None:
        # Entries done here (run inline once their facts are appended, or anything but a step
        # of this queue, which a work stream holds only if written there by hand) are
        # acknowledged with the next fetch, in the same round trip.
        handled: list[Delivery] = []
        try:
            async with send:
                while True:
                    deliveries = await subscription.fetch(
                        max(1, self._idle) * self.prefetch, self.block_ms, ack=handled
                    )
                    handled = []
                    facts: list[AppendRequest] = []
                    done: list[Delivery] = []
                    for_workers: list[Delivery] = []
                    for delivery in deliveries:
                        data = delivery.envelope.data
                        if not isinstance(data, StepScheduled) or data.queue != queue:
                            handled.append(delivery)
                        elif (events := self._inline(subscription, delivery, data)) is not None:
                            facts.append(AppendRequest(run_id=events[0].run_id, events=events))
                            done.append(delivery)
                        else:
                            for_workers.append(delivery)
                    # Inline facts go out before any hand-over to a worker, which may wait.
                    if facts:
                        with anyio.CancelScope(shield=True):
                            outcomes = await self._append_inline(facts)
                        handled += done
                        for outcome in outcomes:
                            _log_outcome(outcome)
                    self._waiting.update((id(d), (subscription, d)) for d in for_workers)
                    for delivery in for_workers:
                        self._idle -= 1
                        await send.send((subscription, delivery))
        finally:
            if handled:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await subscription.ack(handled)

    def _inline(
        self, subscription: Subscription, delivery: Delivery, s: StepScheduled
    ) -> list[Envelope] | None:
        """The facts of a step done as it is read, or None when it needs a worker: a cache hit
        is recorded at once; an inline agent (:class:`~services.agents.base.InlineAgent`) is
        called here, its ``step_started`` appended with the outcome. The step's span covers
        the lookup or the call, not the append."""
        hit = self.executor.cached(s.agent, s.inputs, s.cache_ttl_s)
        agent = self.executor.inline_agent(s.agent) if hit is None else None
        if hit is None and agent is None:
            return None
        run_id = delivery.envelope.run_id
        with self.tracer.step(delivery, subscription.group):
            if hit is not None:
                return [self._fact(delivery, "cache_hit", _cache_hit(s, hit))]
            assert agent is not None
            started = self._fact(delivery, f"started:{delivery.deliveries}", self._started(s))
            begun = time.perf_counter()
            try:
                result = self.executor.execute_inline(
                    agent, s.inputs, AgentContext.for_step(run_id, s), s.cache_ttl_s
                )
            except Exception as exc:
                outcome: StepSucceeded | StepFailed = _failed(s, exc, begun)
            else:
                outcome = _succeeded(s, result)
            finished = self._fact(delivery, "finished", outcome)
        return [started, finished]

    async def _worker(
        self, receive: MemoryObjectReceiveStream[tuple[Subscription, Delivery]]
    ) -> None:
        async with receive:
            async for subscription, delivery in receive:
                del self._waiting[id(delivery)]
                job = _InFlight(subscription, delivery)
                self._inflight[id(job)] = job
                try:
                    with self.tracer.step(delivery, subscription.group):
                        await self._execute(job)
                    await self._acks[id(subscription)].submit(delivery)
                finally:
                    del self._inflight[id(job)]
                    self._idle += 1

    async def _execute(self, job: _InFlight) -> None:
        envelope = job.delivery.envelope
        run_id = envelope.run_id
        s = envelope.data
        assert isinstance(s, StepScheduled)
        hit = self.executor.cached(s.agent, s.inputs, s.cache_ttl_s)
        if hit is not None:
            await self._append(self._fact(job.delivery, "cache_hit", _cache_hit(s, hit)))
            return
        deadline = start_deadline_ms(envelope.ts, s.timeout_s)

        async def admitted() -> None:
            if deadline is not None and self.clock_ms() > deadline:
                raise _TimedOutUnstarted
            # A claimed re-delivery records its own start: the timeline shows the re-run.
            what = f"started:{job.delivery.deliveries}"
            await self._append(self._fact(job.delivery, what, self._started(s)))

        begun = time.perf_counter()
        outcome: StepSucceeded | StepFailed
        with job.scope:
            try:
                result = await self.executor.execute(
                    s.agent,
                    s.inputs,
                    AgentContext.for_step(run_id, s),
                    s.cache_ttl_s,
                    on_admitted=admitted,
                )
            except _TimedOutUnstarted:
                log.warning(
                    "step not started: its start deadline passed while it waited",
                    extra={"run_id": run_id, "step": s.step, "attempt": s.attempt},
                )
                return
            except StoreError:
                raise
            except Exception as exc:
                if not isinstance(exc, AgentError):
                    log.exception("agent raised", extra={"run_id": run_id, "step": s.step})
                outcome = _failed(s, exc, begun)
            else:
                outcome = _succeeded(s, result)
        if job.scope.cancelled_caught:
            log.info("step cancelled: run ended", extra={"run_id": run_id, "step": s.step})
            return
        _log_outcome(await self._append(self._fact(job.delivery, "finished", outcome)))

    def _started(self, s: StepScheduled) -> StepStarted:
        return StepStarted(**_attempt(s), runner=self.producer.name)

    def _fact(
        self,
        delivery: Delivery,
        what: str,
        data: StepStarted | StepSucceeded | StepFailed | StepCacheHit,
    ) -> Envelope:
        """The envelope of a fact about the attempt ``delivery`` schedules."""
        envelope = delivery.envelope
        assert isinstance(envelope.data, StepScheduled)
        return self.producer.envelope(
            envelope.run_id,
            data,
            event_id=attempt_id(envelope.run_id, envelope.data, what),
            causation_id=envelope.event_id,
            traceparent=self.tracer.fact_traceparent(data, envelope.traceparent),
        )

    async def _append(self, event: Envelope) -> Envelope:
        """Append one fact (batched with other workers' facts) and return what was recorded:
        ``event``, or, for an outcome the store refuses as it is (an output over
        ``max_event_bytes``, or one msgpack cannot carry), the attempt's non-retryable
        failure naming why."""
        try:
            await self._appends.submit(AppendRequest(run_id=event.run_id, events=[event]))
        except EventRejected as exc:
            if not isinstance(event.data, StepSucceeded | StepFailed | StepCacheHit):
                raise
            event = _not_recorded(event, event.data, exc)
            await self._appends.submit(AppendRequest(run_id=event.run_id, events=[event]))
        return event

    async def _append_inline(self, facts: list[AppendRequest]) -> list[Envelope]:
        """Append the facts of steps done inline in one call; the recorded outcomes. When the
        store refuses one event as it is, nothing was written: each fact then goes on its own
        (see :meth:`_append`)."""
        try:
            await self.store.append_many(facts)
        except EventRejected:
            outcomes = []
            for request in facts:
                for event in request.events:
                    recorded = await self._append(event)
                outcomes.append(recorded)
            return outcomes
        return [request.events[-1] for request in facts]

    def _ack_commit(self, subscription: Subscription) -> GroupCommit[Delivery, None]:
        async def ack(deliveries: Sequence[Delivery]) -> list[None]:
            await subscription.ack(deliveries)
            return [None] * len(deliveries)

        commit: GroupCommit[Delivery, None] = GroupCommit(ack)
        self._acks[id(subscription)] = commit
        return commit

    async def _heartbeat(self) -> None:
        """Touch the entries of steps in flight or waiting for a worker, and cancel steps in
        flight whose run has ended."""
        while True:
            await anyio.sleep(self.heartbeat_s)
            jobs = list(self._inflight.values())
            held = [(job.subscription, job.delivery) for job in jobs]
            held += self._waiting.values()
            by_sub: dict[int, tuple[Subscription, list[Delivery]]] = {}
            for subscription, delivery in held:
                by_sub.setdefault(id(subscription), (subscription, []))[1].append(delivery)
            for subscription, deliveries in by_sub.values():
                await subscription.touch(deliveries)
            for job in jobs:
                head = await self.store.head(job.delivery.envelope.run_id)
                if head is None or head.status in TERMINAL_STATUSES:
                    job.scope.cancel()


def _attempt(s: StepScheduled | StepSucceeded | StepFailed | StepCacheHit) -> dict[str, Any]:
    """The fields naming the attempt ``s`` schedules (or a fact is about), shared by every
    fact about it."""
    return {
        "step": s.step,
        "attempt": s.attempt,
        "agent": s.agent,
        "item": s.item,
        "iteration": s.iteration,
        "fallback_index": s.fallback_index,
        "idempotency_key": s.idempotency_key,
    }


def _cache_hit(s: StepScheduled, hit: CacheHit) -> StepCacheHit:
    return StepCacheHit(**_attempt(s), output=hit.output, cache_key=hit.key)


def _succeeded(s: StepScheduled, result: ExecutionResult) -> StepSucceeded:
    return StepSucceeded(
        **_attempt(s), output=result.output, duration_ms=result.duration_ms, cached=result.cached
    )


def _failed(s: StepScheduled, exc: Exception, begun: float) -> StepFailed:
    duration_ms = (time.perf_counter() - begun) * 1000
    return StepFailed(**_attempt(s), error=error_info(exc), duration_ms=duration_ms)


def _not_recorded(
    event: Envelope, fact: StepSucceeded | StepFailed | StepCacheHit, exc: EventRejected
) -> Envelope:
    """The failure recorded, under the same event id, for an attempt whose outcome ``event``
    (with data ``fact``) the store refused as it is: the refused event was not written."""
    error = ErrorInfo(
        type="OutputNotRecorded",
        message=f"the outcome of step {fact.step!r} cannot be recorded: {exc}",
        retryable=False,
    )
    duration_ms = 0.0 if isinstance(fact, StepCacheHit) else fact.duration_ms
    failed = StepFailed(**_attempt(fact), error=error, duration_ms=duration_ms)
    return msgspec.structs.replace(event, data=failed)


def _log_outcome(event: Envelope) -> None:
    """One line for the recorded outcome of a step attempt (none for a cache hit), naming the
    trace of the step from the event (an inline step's span has ended by now)."""
    outcome = event.data
    if not isinstance(outcome, StepSucceeded | StepFailed) or not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "step %s",
        "succeeded" if isinstance(outcome, StepSucceeded) else "failed",
        extra={
            "run_id": event.run_id,
            "step": outcome.step,
            "attempt": outcome.attempt,
            "agent": outcome.agent,
            "event_id": event.event_id,
            "duration_ms": round(outcome.duration_ms, 3),
            **({"error": outcome.error.type} if isinstance(outcome, StepFailed) else {}),
            **trace_field(event.traceparent),
        },
    )
