"""``decide(definition, state, now_ms)``: what the scheduler appends next for one run. Pure.

The result is a :class:`Decision`: the payloads to append (with ``expected_seq=state.seq``) and
when to wake the run up if no event arrives first. The same arguments always give the same
decision (jitter comes from a hash of run, step, unit and attempt). Decisions are projected
through :func:`~projections.run_state.evolve` as they are made, so later rules of one call see
earlier ones (a skipped step readies its dependents in the same call).

Rules, in the order they are applied:

1. A finished run gets nothing. A cancel request cancels every unit in flight or waiting for a
   retry (``step_cancelled``), then ``run_cancelled``.
2. A submitted run gets ``run_started`` with the plan, then continues below. A graph that cannot
   run (unknown dependency, cycle, repeated id) fails the run with ``DefinitionError`` instead.
3. Paused: nothing new is scheduled; units in flight finish, due retries wait. Only timeouts
   are recorded (``step_failed``); the failures are handled after the resume.
4. Timeouts: a unit running past ``started + timeout``, or scheduled and not started by
   ``scheduled + timeout + START_GRACE_MS``, gets ``step_failed`` (``StepTimeout``, retryable),
   then the failure path (5). A retry whose time has come gets ``step_scheduled`` with the next
   attempt.
5. A failed attempt: with a retryable error (``retryable`` and its type not in
   ``retry.non_retryable``) and ``attempt < retry.max_attempts`` on the step's own agent,
   ``step_retry_scheduled`` with ``delay = min(max_delay, initial_delay * backoff**(n-1))``
   +/- ``jitter``. Otherwise the next fallback: ``fallback_started`` + ``step_scheduled``
   (attempt 1, its own ``with``, its timeout or the step's). Each fallback gets exactly one
   attempt, whatever its error; ``CircuitOpen`` from the runner is not retryable, so it goes
   straight to the fallback. With no fallback left the step has failed (6).
6. A step fails (after retries and fallbacks, an expression or template error, an exhausted
   loop): a non-critical one has its other units cancelled and gets ``step_skipped`` with the
   error (``non-critical failure: ...``; the run becomes degraded and continues). A critical one
   fails the run: every unit in flight or waiting for a retry is cancelled, then ``run_failed``;
   other decisions of the call are dropped.
7. A loop iteration succeeded: ``until`` is evaluated with ``iteration`` and ``output``. True:
   ``loop_completed`` (the step's output is that iteration's). False: the next iteration is
   scheduled, unless it was the ``max_iterations``-th: the step fails with ``LoopExhausted``,
   not retryable and without fallbacks (the agent did not fail; the condition did).
8. Fanned-out steps get their next items scheduled, in item order.
9. Ready steps (every dependency succeeded or skipped; a skipped one's output is null), in the
   order they became ready: ``when`` false gives ``step_skipped``; a ``for_each`` step has its
   list evaluated once (``step_fanned_out``; an empty list succeeds with ``[]``), then one unit
   per item; a ``loop`` step starts iteration 1; others attempt 1.
10. Every step succeeded or skipped: ``run_completed`` (``degraded`` if a step was skipped for
    a failure).

With ``value_limit`` (the scheduler gives the store's ``max_event_bytes`` less
:data:`EVENT_ALLOWANCE`), a step whose rendered ``with`` or ``for_each`` list is larger than
that once encoded fails with ``ValueTooLarge`` (not retryable) instead of being scheduled: the
event would be refused by the store, and the run would wait forever for a decision that cannot
be recorded.

``max_parallel`` bounds the units scheduled or running at once; work that would exceed it waits
(earlier work first: retries, fallbacks, next iterations, fanned-out items, then ready steps).
When a later rule of the same call frees slots (a non-critical step's skip cancels its units),
the rules are applied again to the state reached, so work passed over gets them: the scheduler
decides again only on a new event or a wake-up, and neither may come.
Expression and template errors fail the step at once, without retries or fallbacks.

``step_scheduled`` carries the rendered ``with``, agent, queue, timeout, cache TTL, item,
iteration, fallback index and an idempotency key per attempt
(:func:`~services.scheduler.policy.idempotency_key`). The wake-up is the earliest retry due
time or timeout deadline still ahead.

The definition must be the one the run was submitted with.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from eventstore.codec import encode_value
from eventstore.events import (
    Envelope,
    ErrorInfo,
    EventData,
    FallbackStarted,
    LoopCompleted,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCancelled,
    StepFailed,
    StepFannedOut,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
)
from projections.run_state import ACTIVE, IN_FLIGHT, STEP_FINAL, TERMINAL, RunState, evolve
from services.scheduler import policy
from services.scheduler.plan import Plan, plan_for
from services.workflow.errors import ExpressionError
from services.workflow.expressions import compile_expression, render
from services.workflow.model import StepDef, WorkflowDef


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Payloads to append in order, and when to decide again if nothing happens first.

    ``state`` is the run's state with ``events`` folded in as events stamped ``now_ms`` (its
    ``last_event_id`` is empty: the events have no ids yet). Appended with that timestamp and
    no other event in between, they lead to exactly this state, apart from ``seq`` and
    ``last_event_id``.
    """

    events: list[EventData] = []
    wake_at_ms: int | None = None
    state: RunState | None = None


#: Bytes of an event left for everything but a step's inputs or a fan-out's items (ids,
#: producer, trace context and the other fields take well under this).
EVENT_ALLOWANCE: Final = 2048


def decide(
    definition: WorkflowDef, state: RunState, now_ms: int, *, value_limit: int | None = None
) -> Decision:
    """The next decisions for ``state`` at ``now_ms`` (see the module docstring)."""
    if state.status in TERMINAL:
        return Decision(state=state)
    decider = _Decider(plan_for(definition), definition, state, now_ms, value_limit)
    return msgspec.structs.replace(decider.run(), state=decider.state)


class _Decider:
    """One call of :func:`decide`: the decisions so far and the state they lead to."""

    def __init__(
        self,
        plan: Plan,
        definition: WorkflowDef,
        state: RunState,
        now: int,
        value_limit: int | None,
    ) -> None:
        self.plan = plan
        self.value_limit = value_limit
        self.definition = definition
        self.origin = state
        self.state = state
        self.now = now
        self.events: list[EventData] = []
        self.failure: tuple[str, ErrorInfo] | None = None
        #: Whether this pass found no free slot for something it would have scheduled.
        self.blocked = False
        self._inputs: dict[str, Any] | None = None

    def emit(self, data: EventData) -> None:
        self.events.append(data)
        envelope = Envelope(
            event_id="",
            run_id=self.state.run_id,
            ts=self.now,
            producer="",
            data=data,
            seq=self.state.seq + 1,
        )
        self.state = evolve(self.state, envelope)

    def run(self) -> Decision:
        if self.state.cancel_requested:
            self.cancel_units(f"run cancelled: {self.state.cancel_reason or 'requested'}")
            self.emit(RunCancelled(reason=self.state.cancel_reason))
            return Decision(events=self.events)
        if self.state.status == "submitted":
            if self.plan.problem:
                self.emit(RunFailed(error=policy.definition_error(self.plan.problem)))
                return Decision(events=self.events)
            self.emit(RunStarted(plan=self.plan.deps))
        if self.state.status == "paused":
            self.due_timers(self.origin, paused=True)
            return Decision(events=self.events, wake_at_ms=self.wake(paused=True))
        source = self.origin
        while True:
            self.blocked = False
            emitted = len(self.events)
            self.due_timers(source, paused=False)
            if not self.failure:
                self.awaiting(source)
            if not self.failure and self.fanning(source):
                self.ready()
            # Something was passed over for want of a slot, and a slot came free later in the
            # same pass (a non-critical step's skip cancels its units, a timeout ends an
            # attempt): decide again on the state reached. Nothing else would: no event is
            # coming and no timer is armed for it.
            if self.failure or not self.blocked or len(self.events) == emitted:
                break
            if not self.has_slot():
                break
            source = self.state
        if self.failure:
            return self.fail_run(*self.failure)
        if self.state.unsettled == 0:
            self.emit(RunCompleted(degraded=self.state.degraded))
            return Decision(events=self.events)
        return Decision(events=self.events, wake_at_ms=self.wake(paused=False))

    # --- helpers -------------------------------------------------------------------------------

    def has_slot(self) -> bool:
        """Whether ``max_parallel`` leaves room for one more unit; when not, the pass is
        marked :attr:`blocked` (see :meth:`run`)."""
        limit = self.definition.max_parallel
        if limit is None or self.state.in_flight < limit:
            return True
        self.blocked = True
        return False

    def scope(self, step_id: str, item: int | None, iteration: int | None) -> dict[str, Any]:
        if self._inputs is None:
            self._inputs = {**self.definition.inputs, **self.state.inputs}
        scope: dict[str, Any] = {
            "inputs": self._inputs,
            "run": {"id": self.state.run_id, "workflow": self.state.workflow},
            "steps": self.plan.results(step_id, self.state),
        }
        items = self.state.steps[step_id].items
        if item is not None and items is not None:
            scope["item"] = items[item]
        if iteration is not None:
            scope["iteration"] = iteration
        return scope

    def evaluate(self, step_id: str, source: str, scope: dict[str, Any]) -> tuple[bool, Any]:
        """``(True, value)``, or ``(False, None)`` after failing the step for an error."""
        try:
            return True, compile_expression(source).evaluate(scope)
        except ExpressionError as exc:
            self.step_fails(step_id, policy.expression_error(exc))
            return False, None

    def cancel_units(self, reason: str, only: str | None = None) -> None:
        """``step_cancelled`` for every unit in flight or waiting for a retry."""
        steps = self.state.steps
        for step_id in [only] if only is not None else list(steps):
            for unit in steps[step_id].units:
                if unit.status in ACTIVE:
                    self.emit(
                        StepCancelled(
                            step=step_id,
                            attempt=unit.attempt,
                            reason=reason,
                            item=unit.item,
                            iteration=unit.iteration,
                        )
                    )

    def fail_run(self, step_id: str, error: ErrorInfo) -> Decision:
        """Drop this call's decisions except the run start and timeouts; cancel; fail the run."""
        kept = [e for e in self.events if isinstance(e, RunStarted | StepFailed)]
        self.state, self.events = self.origin, []
        for event in kept:
            self.emit(event)
        self.cancel_units(f"run failed: step {step_id!r} failed")
        self.emit(RunFailed(error=error, step=step_id))
        return Decision(events=self.events)

    def wake(self, *, paused: bool) -> int | None:
        for due, step_id, lane in self.state.timers:
            if due <= self.now:
                continue
            if paused and self.state.steps[step_id].units[lane].status == "retry_wait":
                continue
            return due
        return None

    # --- rules ---------------------------------------------------------------------------------

    def due_timers(self, source: RunState, *, paused: bool) -> None:
        for due, step_id, lane in source.timers:
            if due > self.now or self.failure:
                return
            unit = self.state.steps[step_id].units[lane]
            if unit.due_ms != due:
                continue
            if unit.status in IN_FLIGHT:
                timeout = unit.timeout_s or 0.0
                self.emit(
                    StepFailed(
                        step=step_id,
                        attempt=unit.attempt,
                        agent=unit.agent,
                        error=policy.timeout_error(timeout, unit.status == "running"),
                        item=unit.item,
                        iteration=unit.iteration,
                        fallback_index=unit.fallback_index,
                        idempotency_key=unit.idempotency_key,
                    )
                )
                if not paused:
                    self.after_failure(step_id, lane)
            elif unit.status == "retry_wait" and not paused and self.has_slot():
                self.schedule(
                    step_id,
                    lane,
                    attempt=unit.attempt + 1,
                    fallback_index=0,
                    iteration=unit.iteration,
                )

    def awaiting(self, source: RunState) -> None:
        for step_id, lane in source.awaiting:
            if self.failure:
                return
            step = self.state.steps[step_id]
            unit = step.units[lane]
            if step.status in STEP_FINAL or unit.done:
                continue
            if unit.status == "failed":
                self.after_failure(step_id, lane)
            elif unit.status == "succeeded":
                self.next_iteration(step_id, lane)

    def after_failure(self, step_id: str, lane: int) -> None:
        step_def = self.plan.steps[step_id]
        unit = self.state.steps[step_id].units[lane]
        error = unit.error or ErrorInfo(type="UnknownError", message="", retryable=False)
        retry = step_def.retry
        retryable = error.retryable and error.type not in retry.non_retryable
        if unit.fallback_index == 0 and retryable and unit.attempt < retry.max_attempts:
            fraction = policy.jitter_fraction(
                self.state.run_id, step_id, unit.item, unit.iteration, unit.attempt
            )
            delay = policy.retry_delay(retry, unit.attempt, fraction)
            self.emit(
                StepRetryScheduled(
                    step=step_id,
                    attempt=unit.attempt + 1,
                    delay_s=delay,
                    due_ms=self.now + round(delay * 1000),
                    item=unit.item,
                    iteration=unit.iteration,
                )
            )
        elif unit.fallback_index < len(step_def.fallback):
            if self.has_slot():
                self.schedule(
                    step_id,
                    lane,
                    attempt=1,
                    fallback_index=unit.fallback_index + 1,
                    iteration=unit.iteration,
                    reason=error,
                )
        else:
            self.step_fails(step_id, error)

    def next_iteration(self, step_id: str, lane: int) -> None:
        loop = self.plan.steps[step_id].loop
        unit = self.state.steps[step_id].units[lane]
        iteration = unit.iteration or 1
        if loop is not None:
            scope = self.scope(step_id, unit.item, iteration)
            scope["output"] = unit.output
            ok, done = self.evaluate(step_id, loop.until, scope)
            if not ok:
                return
            if not done:
                if iteration >= loop.max_iterations:
                    self.step_fails(step_id, policy.loop_exhausted_error(loop))
                elif self.has_slot():
                    self.schedule(
                        step_id, lane, attempt=1, fallback_index=0, iteration=iteration + 1
                    )
                return
        self.emit(LoopCompleted(step=step_id, iteration=iteration, item=unit.item))

    def fanning(self, source: RunState) -> bool:
        """Schedule items of fanned-out steps; False when ``max_parallel`` stopped it."""
        return all(self.fan_out(step_id) for step_id in source.fanning)

    def fan_out(self, step_id: str) -> bool:
        iteration = 1 if self.plan.steps[step_id].loop is not None else None
        while not self.failure:
            step = self.state.steps[step_id]
            if step.status in STEP_FINAL or step.items is None:
                return True
            lane = step.next_unit
            if lane >= len(step.items):
                return True
            if not self.has_slot():
                return False
            self.schedule(step_id, lane, attempt=1, fallback_index=0, iteration=iteration)
            if self.state.steps[step_id].next_unit == lane:
                return True
        return True

    def ready(self) -> None:
        seen: set[str] = set()
        ready = self.state.ready
        index = 0
        while index < len(ready):
            step_id = ready[index]
            index += 1
            if step_id not in seen and self.state.steps[step_id].status == "pending":
                seen.add(step_id)
                if not self.start_step(step_id) or self.failure:
                    return
            if index == len(ready) and self.state.ready is not ready:
                ready, index = self.state.ready, 0

    def start_step(self, step_id: str) -> bool:
        """Skip, fan out or schedule a ready step; False when ``max_parallel`` stopped it."""
        step_def = self.plan.steps[step_id]
        if step_def.when is not None:
            ok, value = self.evaluate(step_id, step_def.when, self.scope(step_id, None, None))
            if not ok:
                return True
            if not value:
                self.emit(StepSkipped(step=step_id, reason=f"when is false: {step_def.when}"))
                return True
        if not self.has_slot():
            return False
        if step_def.for_each is not None:
            ok, items = self.evaluate(step_id, step_def.for_each, self.scope(step_id, None, None))
            if not ok:
                return True
            if not isinstance(items, list | tuple):
                self.step_fails(step_id, policy.not_a_list_error(step_def.for_each, items))
                return True
            if not self.fits(step_id, "the for_each items", items):
                return True
            self.emit(StepFannedOut(step=step_id, items=list(items)))
            return self.fan_out(step_id)
        iteration = 1 if step_def.loop is not None else None
        self.schedule(step_id, 0, attempt=1, fallback_index=0, iteration=iteration)
        return True

    def schedule(
        self,
        step_id: str,
        lane: int,
        *,
        attempt: int,
        fallback_index: int,
        iteration: int | None,
        reason: ErrorInfo | None = None,
    ) -> None:
        """``step_scheduled`` for one attempt (``fallback_started`` first for a fallback)."""
        step_def: StepDef = self.plan.steps[step_id]
        item = lane if self.state.steps[step_id].items is not None else None
        agent, template, timeout = step_def.agent, step_def.with_, step_def.timeout
        if fallback_index:
            fallback = step_def.fallback[fallback_index - 1]
            agent, template = fallback.agent, fallback.with_
            timeout = fallback.timeout if fallback.timeout is not None else timeout
        try:
            inputs = render(template, self.scope(step_id, item, iteration))
        except ExpressionError as exc:
            self.step_fails(step_id, policy.expression_error(exc))
            return
        if not self.fits(step_id, "the rendered inputs", inputs):
            return
        if reason is not None:
            self.emit(
                FallbackStarted(
                    step=step_id,
                    attempt=1,
                    fallback_index=fallback_index,
                    agent=agent,
                    reason=reason,
                    item=item,
                    iteration=iteration,
                )
            )
        key = policy.idempotency_key(
            self.state.run_id,
            step_id,
            generation=self.state.generation,
            item=item,
            iteration=iteration,
            fallback_index=fallback_index,
            attempt=attempt,
        )
        self.emit(
            StepScheduled(
                step=step_id,
                attempt=attempt,
                agent=agent,
                inputs=inputs,
                queue=step_def.queue,
                timeout_s=timeout,
                item=item,
                iteration=iteration,
                fallback_index=fallback_index,
                cache_ttl_s=step_def.cache_ttl,
                idempotency_key=key,
            )
        )

    def fits(self, step_id: str, what: str, value: Any) -> bool:
        """Whether ``value`` fits in an event; else the step fails, naming ``what``."""
        limit = self.value_limit
        if limit is None:
            return True
        try:
            size = len(encode_value(value))
        except (msgspec.EncodeError, OverflowError, TypeError) as exc:
            self.step_fails(step_id, policy.not_encodable_error(what, exc))
            return False
        if size <= limit:
            return True
        self.step_fails(step_id, policy.too_large_error(what, size, limit))
        return False

    def step_fails(self, step_id: str, error: ErrorInfo) -> None:
        if self.plan.steps[step_id].critical:
            self.failure = (step_id, error)
            return
        self.cancel_units(f"step {step_id!r} failed (not critical)", only=step_id)
        reason = f"non-critical failure: {error.type}: {error.message}"
        self.emit(StepSkipped(step=step_id, reason=reason, error=error))
