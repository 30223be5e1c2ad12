"""The scheduler service: on each event of a run, decide what happens next and append it.

It reads the partition feeds as consumer group ``scheduler``. For each run touched by a batch it
loads the state (cache, else snapshot + tail), runs the pure
:func:`services.scheduler.decide.decide`, and appends the decisions with ``expected_seq`` set to
the seq they were decided on; all runs of a batch are appended in one round trip. A conflict
means the run moved: it is reloaded and decided again. Event ids of decisions are derived from
(run, seq, position, type), so two replicas that reach the same decision produce the same
event and the store reports the second as a duplicate. Any number of replicas is safe.

Retry backoff and step timeouts are wake-up timers in the store (one per run, ``wake``): when a
timer is due the run is decided again with the current time.

A decision settles its run: deciding again on the state it leads to decides nothing, unless a
timer of that state is already due (a retry without delay). So when the feed brings back only
events this replica decided (or a state it already decided on), nothing is decided again; the
replica remembers, per run, the state it last decided on or led to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import anyio
import msgspec
from anyio.abc import TaskStatus
from opentelemetry.trace import TracerProvider

from eventstore.errors import StoreUnavailable
from eventstore.events import Envelope
from eventstore.ids import derived_event_id
from eventstore.store import (
    PASSIVE_EVENT_TYPES,
    AppendRequest,
    AppendResult,
    Delivery,
    EventStore,
    Outcome,
    Timer,
)
from projections.run_state import TERMINAL, RunState, evolve
from services.observability.logs import trace_field
from services.observability.tracing import Cause, RunTracer
from services.producer import Producer, now_ms
from services.runs import RunLoader
from services.scheduler.decide import EVENT_ALLOWANCE, decide
from services.workflow.errors import DefinitionError

log = logging.getLogger("flowlog.scheduler")

GROUP = "scheduler"
WAKE_TIMER = "wake"
MAX_REDECIDE = 50


class SchedulerService:
    """Decides for every run whose events reach this replica."""

    def __init__(
        self,
        store: EventStore,
        producer: Producer,
        *,
        consumer: str,
        clock_ms: Callable[[], int] = now_ms,
        batch: int = 256,
        block_ms: int = 500,
        timer_poll_s: float = 0.05,
        tracer_provider: TracerProvider | None = None,
        loader: RunLoader | None = None,
    ) -> None:
        self.store = store
        self.producer = producer
        self.consumer = consumer
        self.clock_ms = clock_ms
        self.batch = batch
        self.block_ms = block_ms
        self.timer_poll_s = timer_poll_s
        self.loader = loader or RunLoader(store)
        self.tracer = RunTracer(store.config, tracer_provider)
        # What a step's inputs may take of an event the store accepts (see decide()).
        self._value_limit = max(store.config.max_event_bytes - EVENT_ALLOWANCE, 0)
        self._stop = anyio.Event()
        self._armed: dict[str, int] = {}
        self._settled: dict[str, RunState] = {}

    def stop(self) -> None:
        """Stop reading; the batch in hand is finished and acknowledged."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subscription = await self.store.subscribe(GROUP, self.consumer)
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._timer_loop)
                # A handled batch is acknowledged with the next fetch (one round trip).
                handled: list[Delivery] = []
                while not self._stop.is_set():
                    deliveries = await subscription.fetch(self.batch, self.block_ms, ack=handled)
                    handled = []
                    if deliveries:
                        await self.handle(deliveries)
                        handled = deliveries
                await subscription.ack(handled)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await subscription.close()

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Bring every run of the batch up to date and append its decisions."""
        by_run: dict[str, list[Envelope]] = {}
        for delivery in deliveries:
            by_run.setdefault(delivery.envelope.run_id, []).append(delivery.envelope)
        states: dict[str, RunState] = {}
        for run_id, events in by_run.items():
            state = await self.loader.advance(run_id, events)
            # Passive events (checkpoints) change nothing a decision depends on: only keep the
            # state current. (A list, not a generator any() would leave unfinished, to be closed
            # by raising GeneratorExit in it.)
            if (
                state is not None
                and state is not self._settled.get(run_id)
                and not PASSIVE_EVENT_TYPES.issuperset([e.type for e in events])
            ):
                states[run_id] = state
        await self._decide_and_append(states, causes=by_run)

    async def _decide_and_append(
        self,
        states: dict[str, RunState],
        *,
        causes: Mapping[str, Sequence[Cause]],
        woken: frozenset[str] = frozenset(),
    ) -> None:
        pending = states
        for _ in range(MAX_REDECIDE):
            spans = self.tracer.decisions(GROUP, causes)
            now = self.clock_ms()
            requests: list[AppendRequest] = []
            decided: dict[str, RunState] = {}
            wakes: dict[str, int | None] = {}
            for run_id, state in pending.items():
                try:
                    definition = self.loader.definition(state)
                except DefinitionError:
                    log.exception("run definition no longer parses", extra={"run_id": run_id})
                    continue
                decision = decide(definition, state, now, value_limit=self._value_limit)
                wakes[run_id] = decision.wake_at_ms
                if not decision.events:
                    self._settle(state, now)
                    continue
                assert decision.state is not None  # decide() always sets it
                decided[run_id] = decision.state
                traceparent = spans.start(run_id, definition.name, state.seq, decision.events)
                requests.append(
                    AppendRequest(
                        run_id=run_id,
                        events=[
                            self.producer.envelope(
                                run_id,
                                data,
                                event_id=derived_event_id(
                                    run_id, state.seq, i, type(data).__name__
                                ),
                                causation_id=state.last_event_id,
                                traceparent=traceparent,
                                ts=now,
                            )
                            for i, data in enumerate(decision.events)
                        ],
                        expected_seq=state.seq,
                    )
                )
            await self._arm_timers(wakes, woken, spans.traceparent)
            if not requests:
                return
            results = await self.store.append_many(requests)
            retry: dict[str, RunState] = {}
            for request, outcome in zip(requests, results, strict=True):
                spans.end(request, outcome)
                run_id = request.run_id
                if _moved(outcome):
                    reloaded = await self.loader.load(run_id)
                    if reloaded is not None:
                        retry[run_id] = reloaded
                    continue
                state, passed, whole = _after(
                    pending[run_id], decided[run_id], request.events, outcome
                )
                self.loader.remember(state, passed=passed)
                # Decisions that all went in settle the run: when they come back through the
                # feed nothing is decided again. Otherwise the feed brings what another
                # replica appended, and the run is decided again (conflicted runs are retried
                # below, reloaded).
                if whole:
                    self._settle(state, now)
            pending = retry
            causes = spans.next_causes()
        log.warning("decisions still moving after %d rounds", MAX_REDECIDE)

    def _settle(self, state: RunState, now: int) -> None:
        """Remember that deciding on ``state`` again gives nothing new until one of its timers
        is due (the timer loop decides the run then); not when one is due already at ``now``
        (see the module docstring). Finished runs are dropped."""
        run_id = state.run_id
        self._settled.pop(run_id, None)
        if state.status in TERMINAL or any(due <= now for due, _, _ in state.timers):
            return
        self._settled[run_id] = state
        if len(self._settled) > self.loader.cache_size:
            del self._settled[next(iter(self._settled))]

    async def _arm_timers(
        self,
        wakes: dict[str, int | None],
        woken: frozenset[str],
        traceparent: Callable[[str], str],
    ) -> None:
        """Keep one wake-up timer per run at the time decide asked for.

        Timers this replica armed are remembered, so unchanged ones cost no round trip; a
        timer that fired here is always settled (moved or cancelled), whoever armed it. A
        timer carries the run's ``traceparent`` as its payload, the parent of the decision it
        wakes.
        """
        for run_id, due in wakes.items():
            armed = self._armed.get(run_id)
            if due is None:
                if armed is not None or run_id in woken:
                    self._armed.pop(run_id, None)
                    await self.store.cancel_timer(run_id, WAKE_TIMER)
            elif due != armed or run_id in woken:
                self._armed[run_id] = due
                await self.store.schedule_timer(
                    Timer(
                        run_id=run_id,
                        timer_id=WAKE_TIMER,
                        due_ms=due,
                        payload=traceparent(run_id).encode(),
                    )
                )

    async def _timer_loop(self) -> None:
        while not self._stop.is_set():
            try:
                due = await self.store.due_timers(self.clock_ms(), limit=self.batch)
            except StoreUnavailable:
                due = []
            if due:
                states: dict[str, RunState] = {}
                for timer in due:
                    state = await self.loader.load(timer.run_id)
                    if state is not None:
                        states[timer.run_id] = state
                causes: dict[str, Sequence[Cause]] = {timer.run_id: [timer] for timer in due}
                await self._decide_and_append(states, causes=causes, woken=frozenset(states))
            else:
                with anyio.move_on_after(self.timer_poll_s):
                    await self._stop.wait()


_RUN_LEVEL = frozenset({"run_started", "run_completed", "run_failed", "run_cancelled"})


def _log_decision(event: Envelope, seq: int) -> None:
    """Run transitions at INFO, step decisions at DEBUG (one line per event)."""
    level = logging.INFO if event.type in _RUN_LEVEL else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(
            level,
            "decided %s",
            event.type,
            extra={
                "run_id": event.run_id,
                "step": getattr(event.data, "step", ""),
                "event_id": event.event_id,
                "seq": seq,
                # The decision's span has ended by now: name its trace from the event.
                **trace_field(event.traceparent),
            },
        )


def _moved(results: Sequence[AppendResult]) -> bool:
    return any(r.outcome in (Outcome.CONFLICT, Outcome.MISMATCH) for r in results)


def _after(
    state: RunState,
    decided: RunState,
    events: Sequence[Envelope],
    results: Sequence[AppendResult],
) -> tuple[RunState, range, bool]:
    """The run's state once ``events`` (decided on ``state``, leading to ``decided``) were
    appended with ``results``, the seqs of passive events they were moved past, and whether
    every one of them was appended here."""
    appended = [
        (event, result)
        for event, result in zip(events, results, strict=True)
        if result.outcome is Outcome.APPENDED
    ]
    for event, result in appended:
        _log_decision(event, result.seq)
    # Passive events (checkpoints) may have come after the decided-on seq.
    passed = range(state.seq + 1, appended[0][1].seq if appended else state.seq + 1)
    if len(appended) == len(events):
        # The events were stamped with the decision's time: they lead to ``decided``.
        last = events[-1].event_id
        state = msgspec.structs.replace(decided, seq=results[-1].seq, last_event_id=last)
        return state, passed, True
    # Some were appended already (by another replica): fold in only the ones written here;
    # the feed brings the others.
    for event, result in appended:
        state = evolve(state, msgspec.structs.replace(event, seq=result.seq))
    return state, passed, False
