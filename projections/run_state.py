"""The run state machine: a pure fold of one run's events into a :class:`RunState`.

``evolve(state, event)`` never changes ``state``: it returns a new state sharing every unchanged
part with the old one (copy on write), so callers may keep old states. No I/O and no clock:
every time comes from event timestamps.

Run: ``submitted -> running -> (paused <-> running) -> completed | failed | cancelled``. A run
paused before it started resumes to ``submitted``; ``run_retry_requested`` takes a finished run
back to running (``submitted`` if it never started) with its ``reset_steps`` and every step that
did not succeed or get skipped back to pending, and bumps ``generation``.

Steps: ``pending -> scheduled -> running -> succeeded | failed | retry_wait | skipped |
cancelled``. ``run_started`` carries the plan (each step's ``depends_on``); from it the state
knows every step and which are ready. A step's work is done in *units*: one for a plain step,
one per item after ``step_fanned_out`` (a ``for_each`` step; output = the items' outputs in item
order), and for a ``loop`` step one unit whose ``iteration`` advances (output = the last
iteration's, made final by ``loop_completed``). A unit's ``attempt`` counts per agent:
``fallback_index`` 0 is the step's own agent, ``k`` the k-th fallback.

A step *settles* when it succeeds or is skipped; settled steps satisfy their dependents. It
fails only with ``run_failed`` naming it; ``run_failed`` and ``run_cancelled`` cancel every
other unsettled step. A step skipped with an ``error`` (a non-critical failure) marks the run
``degraded``.

Robustness: an event whose ``seq`` is not above ``state.seq`` is ignored, so applying one twice
is a no-op. A fact about an attempt that is not its unit's current one (an older attempt, another
fallback or iteration or idempotency key, an attempt already failed by a timeout, a cancelled
unit) changes nothing; neither does any event that does not fit the current status. Such events
only advance ``seq``, ``last_event_id`` and ``updated_ms``. Nothing here raises.

Indexes kept for the scheduler, so deciding costs what changed rather than the run's size:
``ready`` (pending steps whose dependencies all settled), ``fanning`` (fanned-out steps with
items not yet scheduled), ``awaiting`` (units whose last result needs a decision: a failed
attempt, a loop iteration that succeeded), ``timers`` (sorted ``(due_ms, step, unit)``: retry due
times and timeout deadlines), ``in_flight`` (units scheduled or running) and ``unsettled``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec

from eventstore.events import (
    CheckpointTaken,
    Envelope,
    ErrorInfo,
    FallbackStarted,
    LoopCompleted,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunRetryRequested,
    RunStarted,
    RunSubmitted,
    StepCacheHit,
    StepCancelled,
    StepFailed,
    StepFannedOut,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)
from eventstore.store import PASSIVE_EVENT_TYPES

#: Version of the encoded state; snapshots of another version are not used.
STATE_VERSION: Final = 1
#: A unit scheduled but never started times out ``timeout + START_GRACE_MS`` after scheduling.
START_GRACE_MS: Final = 30_000

TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
#: Step statuses that satisfy dependents.
SETTLED: Final = frozenset({"succeeded", "skipped"})
#: Step statuses after which nothing happens to the step (until a run retry).
STEP_FINAL: Final = frozenset({"succeeded", "skipped", "failed", "cancelled"})
IN_FLIGHT: Final = frozenset({"scheduled", "running"})
#: Unit statuses with work outstanding or planned.
ACTIVE: Final = frozenset({"scheduled", "running", "retry_wait"})

_replace = msgspec.structs.replace


class UnitState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One unit of a step's work and its current attempt.

    ``due_ms`` is the retry due time (``retry_wait``) or the timeout deadline (scheduled,
    running). ``done`` means no decision about the unit is left to make.
    """

    item: int | None = None
    iteration: int | None = None
    status: str = "pending"
    attempt: int = 0
    fallback_index: int = 0
    agent: str = ""
    idempotency_key: str = ""
    timeout_s: float | None = None
    due_ms: int | None = None
    output: Any = None
    error: ErrorInfo | None = None
    cached: bool = False
    scheduled_ms: int | None = None
    started_ms: int | None = None
    ended_ms: int | None = None
    duration_ms: float = 0.0
    done: bool = False


class StepState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One step: status, result and its units.

    ``waiting`` counts unsettled dependencies; ``attempts`` every attempt scheduled for the step
    (all units, all agents); ``error`` is the last failure (cleared on success);
    ``started_ms`` is the first unit's start; ``items`` the ``for_each`` list once fanned out,
    ``next_unit`` the first item not yet scheduled.
    """

    id: str
    depends_on: tuple[str, ...] = ()
    dependents: tuple[str, ...] = ()
    waiting: int = 0
    status: str = "pending"
    attempts: int = 0
    agent: str = ""
    output: Any = None
    error: ErrorInfo | None = None
    skip_reason: str = ""
    cached: bool = False
    fallback_index: int = 0
    fallback_used: bool = False
    started_ms: int | None = None
    ended_ms: int | None = None
    duration_ms: float | None = None
    items: list[Any] | None = None
    units: tuple[UnitState, ...] = ()
    next_unit: int = 0
    done_units: int = 0


class RunState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Everything known about one run as of event ``seq`` (see the module docstring)."""

    run_id: str
    workflow: str = ""
    digest: str = ""
    definition: str = ""
    definition_format: str = "yaml"
    source: str = ""
    inputs: dict[str, Any] = {}
    status: str = "submitted"
    degraded: bool = False
    cancel_requested: bool = False
    cancel_reason: str = ""
    error: ErrorInfo | None = None
    failed_step: str = ""
    seq: int = 0
    last_event_id: str = ""
    submitted_ms: int = 0
    started_ms: int | None = None
    ended_ms: int | None = None
    updated_ms: int = 0
    generation: int = 0
    checkpoint_seq: int = 0
    steps: dict[str, StepState] = {}
    ready: tuple[str, ...] = ()
    fanning: tuple[str, ...] = ()
    awaiting: tuple[tuple[str, int], ...] = ()
    timers: tuple[tuple[int, str, int], ...] = ()
    in_flight: int = 0
    unsettled: int = 0


def unit_index(step: StepState, item: int | None) -> int | None:
    """The position in ``step.units`` of the unit for ``item``, or None if there is none."""
    if step.items is None:
        return 0 if item is None else None
    if item is None or not 0 <= item < len(step.items):
        return None
    return item


class _Next:
    """The state being built from ``base``: ``fields`` holds what changed; containers are
    copied on their first change (``edit``, ``put``), so ``base`` is never touched."""

    __slots__ = ("base", "fields", "owned", "steps")

    def __init__(self, base: RunState) -> None:
        self.base = base
        self.fields: dict[str, Any] = {}
        self.owned: set[str] = set()
        self.steps = base.steps

    def get(self, name: str) -> Any:
        fields = self.fields
        return fields[name] if name in fields else getattr(self.base, name)

    def edit(self, name: str) -> Any:
        """A copy of the container ``name`` to change in place: a dict for ``steps``, a list
        for the sequences (made tuples again by :meth:`changes`)."""
        if name not in self.owned:
            self.owned.add(name)
            value = self.get(name)
            self.fields[name] = dict(value) if name == "steps" else list(value)
        return self.fields[name]

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)
        self.owned.difference_update(fields)
        self.steps = self.get("steps")

    def add(self, name: str, delta: int) -> None:
        self.fields[name] = self.get(name) + delta

    def step(self, step_id: str) -> StepState | None:
        return self.steps.get(step_id)

    def put(self, step: StepState) -> StepState:
        if "steps" not in self.owned:
            self.steps = self.edit("steps")
        self.steps[step.id] = step
        return step

    def discard(self, name: str, value: Any) -> None:
        if value in self.get(name):
            self.edit(name).remove(value)

    def changes(self) -> dict[str, Any]:
        """The changed fields, sequences edited in place frozen into tuples."""
        fields = self.fields
        for name in self.owned:
            value = fields[name]
            if type(value) is list:
                fields[name] = tuple(value)
        return fields

    def build(self) -> RunState:
        return _replace(self.base, **self.changes())


def _awaits(unit: UnitState) -> bool:
    return not unit.done and unit.status in ("failed", "succeeded")


def _reindex(n: _Next, step_id: str, lane: int, old: UnitState | None, new: UnitState) -> None:
    """Keep ``in_flight``, ``timers`` and ``awaiting`` in line with one unit's change."""
    was_flying = old is not None and old.status in IN_FLIGHT
    if was_flying != (new.status in IN_FLIGHT):
        n.add("in_flight", -1 if was_flying else 1)
    old_due = None if old is None else old.due_ms
    if old_due != new.due_ms:
        timers: list[tuple[int, str, int]] = n.edit("timers")
        if old_due is not None:
            at = bisect_left(timers, (old_due, step_id, lane))
            if at < len(timers) and timers[at] == (old_due, step_id, lane):
                del timers[at]
        if new.due_ms is not None:
            insort(timers, (new.due_ms, step_id, lane))
    was_awaiting = old is not None and _awaits(old)
    if was_awaiting != _awaits(new):
        if was_awaiting:
            n.discard("awaiting", (step_id, lane))
        else:
            n.edit("awaiting").append((step_id, lane))


def _put_unit(n: _Next, step: StepState, lane: int, unit: UnitState, **changes: Any) -> StepState:
    units = list(step.units)
    old = units[lane] if lane < len(units) else None
    if old is None:
        units.append(unit)
    else:
        units[lane] = unit
    _reindex(n, step.id, lane, old, unit)
    if unit.status in ACTIVE and step.items is None:
        changes.setdefault("status", unit.status)
    elif unit.status == "running":
        changes.setdefault("status", "running")
    return n.put(_replace(step, units=tuple(units), **changes))


def _duration(started_ms: int | None, ended_ms: int) -> float | None:
    return None if started_ms is None else float(ended_ms - started_ms)


def _settle(n: _Next, step: StepState) -> None:
    n.add("unsettled", -1)
    for dependent_id in step.dependents:
        dependent = n.step(dependent_id)
        if dependent is None:
            continue
        waiting = dependent.waiting - 1
        n.put(_replace(dependent, waiting=waiting))
        if waiting == 0 and dependent.status == "pending":
            n.edit("ready").append(dependent_id)


def _end_step(n: _Next, step: StepState, status: str, ts: int, **changes: Any) -> StepState:
    """Finish ``step`` with ``status``: units with work left are cancelled."""
    units = list(step.units)
    for lane, unit in enumerate(units):
        if not unit.done:
            cancel = unit.status in ACTIVE or unit.status == "pending"
            ended = _replace(
                unit,
                done=True,
                due_ms=None,
                status="cancelled" if cancel else unit.status,
                ended_ms=ts if cancel else unit.ended_ms,
            )
            _reindex(n, step.id, lane, unit, ended)
            units[lane] = ended
    if step.status == "pending" and not step.waiting:
        n.discard("ready", step.id)
    if step.items is not None and step.next_unit < len(step.items):
        n.discard("fanning", step.id)
    return n.put(
        _replace(
            step,
            status=status,
            units=tuple(units),
            ended_ms=ts,
            duration_ms=_duration(step.started_ms, ts),
            **changes,
        )
    )


def _unit_done(n: _Next, step: StepState, ts: int) -> None:
    step = n.put(_replace(step, done_units=step.done_units + 1))
    if step.items is None or step.done_units == len(step.items):
        _succeed(n, step, ts)


def _succeed(n: _Next, step: StepState, ts: int) -> None:
    if step.items is None:
        output: Any = step.units[0].output
    else:
        output = [unit.output for unit in step.units]
    # all() over a list, not a generator: a generator it leaves unfinished is closed by raising
    # GeneratorExit in it, an exception per step succeeded.
    step = n.put(
        _replace(
            step,
            status="succeeded",
            output=output,
            error=None,
            cached=bool(step.units) and all([unit.cached for unit in step.units]),
            ended_ms=ts,
            duration_ms=_duration(step.started_ms, ts),
        )
    )
    _settle(n, step)


def _current(n: _Next, step_id: str, item: int | None) -> tuple[StepState, int, UnitState] | None:
    step = n.step(step_id)
    if step is None or step.status in STEP_FINAL:
        return None
    lane = unit_index(step, item)
    if lane is None:
        return None
    unit = step.units[lane] if lane < len(step.units) else UnitState()
    return step, lane, unit


def _attempt(
    n: _Next, e: StepStarted | StepSucceeded | StepFailed | StepCacheHit
) -> tuple[StepState, int, UnitState] | None:
    """The unit a runner fact is about, if the fact is about its current attempt in flight."""
    found = _current(n, e.step, e.item)
    if found is None:
        return None
    unit = found[2]
    current = (
        unit.status in IN_FLIGHT
        and unit.iteration == e.iteration
        and unit.attempt == e.attempt
        and unit.fallback_index == e.fallback_index
        and not (e.idempotency_key and unit.idempotency_key != e.idempotency_key)
    )
    return found if current else None


# --- run events --------------------------------------------------------------------------------


def _run_submitted(n: _Next, ts: int, e: RunSubmitted) -> None:
    if n.base.seq == 0:
        n.set(
            workflow=e.workflow,
            digest=e.digest,
            definition=e.definition,
            definition_format=e.definition_format,
            source=e.source,
            inputs=e.inputs,
            submitted_ms=ts,
        )


def _run_started(n: _Next, ts: int, e: RunStarted) -> None:
    if n.base.status != "submitted":
        return
    plan = {step_id: tuple(dict.fromkeys(deps)) for step_id, deps in e.plan.items()}
    dependents: dict[str, list[str]] = {step_id: [] for step_id in plan}
    for step_id, deps in plan.items():
        for dep in deps:
            if dep in dependents:
                dependents[dep].append(step_id)
    steps = {
        step_id: StepState(
            id=step_id,
            depends_on=deps,
            dependents=tuple(dependents[step_id]),
            waiting=len(deps),
        )
        for step_id, deps in plan.items()
    }
    n.set(
        status="running",
        started_ms=ts,
        steps=steps,
        ready=tuple(step_id for step_id, deps in plan.items() if not deps),
        unsettled=len(steps),
    )


def _run_paused(n: _Next, ts: int, e: RunPaused) -> None:
    if n.base.status in ("submitted", "running"):
        n.set(status="paused")


def _run_resumed(n: _Next, ts: int, e: RunResumed) -> None:
    if n.base.status == "paused":
        n.set(status="submitted" if n.base.started_ms is None else "running")


def _run_cancel_requested(n: _Next, ts: int, e: RunCancelRequested) -> None:
    n.set(cancel_requested=True, cancel_reason=e.reason)


def _finish(n: _Next, ts: int, status: str, failed_step: str = "", **fields: Any) -> None:
    for step in list(n.steps.values()):
        if step.status not in SETTLED:
            _end_step(n, step, "failed" if step.id == failed_step else "cancelled", ts)
    n.set(status=status, ended_ms=ts, failed_step=failed_step, **fields)
    n.set(ready=(), fanning=(), awaiting=(), timers=(), in_flight=0)


def _run_cancelled(n: _Next, ts: int, e: RunCancelled) -> None:
    _finish(n, ts, "cancelled")


def _run_failed(n: _Next, ts: int, e: RunFailed) -> None:
    step = n.step(e.step)
    if step is not None and step.status not in SETTLED:
        n.put(_replace(step, error=e.error))
    _finish(n, ts, "failed", e.step, error=e.error)


def _run_completed(n: _Next, ts: int, e: RunCompleted) -> None:
    n.set(status="completed", ended_ms=ts, degraded=n.base.degraded or e.degraded)


def _run_retry_requested(n: _Next, ts: int, e: RunRetryRequested) -> None:
    if n.base.status not in TERMINAL:
        return
    reset = frozenset(e.reset_steps)
    steps: dict[str, StepState] = {}
    for step_id, old in n.base.steps.items():
        keep = step_id not in reset and old.status in SETTLED
        steps[step_id] = (
            old
            if keep
            else StepState(id=step_id, depends_on=old.depends_on, dependents=old.dependents)
        )
    settled = {step_id for step_id, step in steps.items() if step.status in SETTLED}
    for step_id, step in steps.items():
        waiting = sum(dep not in settled for dep in step.depends_on)
        if waiting != step.waiting:
            steps[step_id] = _replace(step, waiting=waiting)
    n.set(
        status="submitted" if n.base.started_ms is None else "running",
        degraded=any(s.status == "skipped" and s.error is not None for s in steps.values()),
        cancel_requested=False,
        cancel_reason="",
        error=None,
        failed_step="",
        ended_ms=None,
        generation=n.base.generation + 1,
        steps=steps,
        ready=tuple(i for i, s in steps.items() if s.status == "pending" and s.waiting == 0),
        fanning=(),
        awaiting=(),
        timers=(),
        in_flight=0,
        unsettled=len(steps) - len(settled),
    )


def _checkpoint_taken(n: _Next, ts: int, e: CheckpointTaken) -> None:
    n.set(checkpoint_seq=max(n.base.checkpoint_seq, e.covered_seq))


# --- step events -------------------------------------------------------------------------------


def _accepts(unit: UnitState, e: StepScheduled) -> bool:
    """Whether ``e`` is the next attempt of ``unit``."""
    if unit.status == "pending":
        return e.attempt == 1 and e.fallback_index == 0 and e.iteration in (None, 1)
    if unit.done or unit.status in IN_FLIGHT:
        return False
    if unit.status == "retry_wait":
        return (e.iteration, e.fallback_index, e.attempt) == (
            unit.iteration,
            unit.fallback_index,
            unit.attempt + 1,
        )
    if unit.status == "failed":
        same_iteration = e.iteration == unit.iteration
        return same_iteration and e.fallback_index > unit.fallback_index and e.attempt == 1
    next_iteration = unit.iteration is not None and e.iteration == unit.iteration + 1
    return next_iteration and e.attempt == 1 and e.fallback_index == 0


def start_deadline_ms(scheduled_ms: int, timeout_s: float | None) -> int | None:
    """When a unit scheduled at ``scheduled_ms`` and not started by then times out (None: it
    has no timeout)."""
    return None if timeout_s is None else scheduled_ms + round(timeout_s * 1000) + START_GRACE_MS


def _step_scheduled(n: _Next, ts: int, e: StepScheduled) -> None:
    found = _current(n, e.step, e.item)
    if found is None or not _accepts(found[2], e):
        return
    step, lane, _ = found
    if step.status == "pending" and step.waiting:
        return
    deadline = start_deadline_ms(ts, e.timeout_s)
    unit = UnitState(
        item=e.item,
        iteration=e.iteration,
        status="scheduled",
        attempt=e.attempt,
        fallback_index=e.fallback_index,
        agent=e.agent,
        idempotency_key=e.idempotency_key,
        timeout_s=e.timeout_s,
        due_ms=deadline,
        scheduled_ms=ts,
    )
    if step.status == "pending":
        n.discard("ready", step.id)
    step = _put_unit(
        n,
        step,
        lane,
        unit,
        attempts=step.attempts + 1,
        agent=e.agent,
        fallback_index=max(step.fallback_index, e.fallback_index),
        fallback_used=step.fallback_used or e.fallback_index > 0,
    )
    if step.items is not None and lane == step.next_unit:
        following = lane + 1
        while following < len(step.units) and step.units[following].status != "pending":
            following += 1
        n.put(_replace(step, next_unit=following))
        if following == len(step.units):
            n.discard("fanning", step.id)


def _step_fanned_out(n: _Next, ts: int, e: StepFannedOut) -> None:
    step = n.step(e.step)
    if step is None or step.status != "pending" or step.waiting or step.items is not None:
        return
    n.discard("ready", step.id)
    items = list(e.items)
    units = tuple(UnitState(item=index) for index in range(len(items)))
    step = n.put(_replace(step, items=items, units=units, status="scheduled"))
    if items:
        n.edit("fanning").append(step.id)
    else:
        _succeed(n, n.put(_replace(step, started_ms=ts)), ts)


def _step_started(n: _Next, ts: int, e: StepStarted) -> None:
    found = _attempt(n, e)
    if found is None or found[2].status != "scheduled":
        return
    step, lane, unit = found
    deadline = None if unit.timeout_s is None else ts + round(unit.timeout_s * 1000)
    unit = _replace(unit, status="running", started_ms=ts, due_ms=deadline)
    started = ts if step.started_ms is None else step.started_ms
    _put_unit(n, step, lane, unit, started_ms=started)


def _step_succeeded(n: _Next, ts: int, e: StepSucceeded | StepCacheHit) -> None:
    found = _attempt(n, e)
    if found is None:
        return
    step, lane, unit = found
    cached = e.cached if isinstance(e, StepSucceeded) else True
    duration = e.duration_ms if isinstance(e, StepSucceeded) else 0.0
    unit = _replace(
        unit,
        status="succeeded",
        output=e.output,
        cached=cached,
        duration_ms=duration,
        ended_ms=ts,
        due_ms=None,
        done=unit.iteration is None,
    )
    started = ts if step.started_ms is None else step.started_ms
    step = _put_unit(n, step, lane, unit, started_ms=started)
    if unit.done:
        _unit_done(n, step, ts)


def _step_failed(n: _Next, ts: int, e: StepFailed) -> None:
    found = _attempt(n, e)
    if found is None:
        return
    step, lane, unit = found
    unit = _replace(
        unit, status="failed", error=e.error, duration_ms=e.duration_ms, ended_ms=ts, due_ms=None
    )
    _put_unit(n, step, lane, unit, error=e.error)


def _step_retry_scheduled(n: _Next, ts: int, e: StepRetryScheduled) -> None:
    found = _current(n, e.step, e.item)
    if found is None:
        return
    step, lane, unit = found
    next_attempt = unit.iteration == e.iteration and e.attempt == unit.attempt + 1
    if _awaits(unit) and unit.status == "failed" and unit.fallback_index == 0 and next_attempt:
        _put_unit(n, step, lane, _replace(unit, status="retry_wait", due_ms=e.due_ms))


def _fallback_started(n: _Next, ts: int, e: FallbackStarted) -> None:
    found = _current(n, e.step, e.item)
    if found is None:
        return
    step, _, unit = found
    if _awaits(unit) and unit.status == "failed" and e.fallback_index > unit.fallback_index:
        n.put(_replace(step, fallback_used=True))


def _step_skipped(n: _Next, ts: int, e: StepSkipped) -> None:
    step = n.step(e.step)
    if step is None or step.status in STEP_FINAL:
        return
    step = _end_step(n, step, "skipped", ts, skip_reason=e.reason, error=e.error, output=None)
    if e.error is not None:
        n.set(degraded=True)
    _settle(n, step)


def _step_cancelled(n: _Next, ts: int, e: StepCancelled) -> None:
    step = n.step(e.step)
    if step is None or step.status in STEP_FINAL:
        return
    if step.items is None:
        unit = step.units[0] if step.units else None
        if unit is not None and unit.status in ACTIVE and e.attempt in (0, unit.attempt):
            _end_step(n, step, "cancelled", ts)
        return
    lanes = range(len(step.units)) if e.item is None else [unit_index(step, e.item)]
    for lane in lanes:
        if lane is None:
            continue
        unit = step.units[lane]
        if unit.status in ACTIVE and e.attempt in (0, unit.attempt):
            cancelled = _replace(unit, status="cancelled", done=True, due_ms=None, ended_ms=ts)
            step = _put_unit(n, step, lane, cancelled)


def _loop_completed(n: _Next, ts: int, e: LoopCompleted) -> None:
    found = _current(n, e.step, e.item)
    if found is None:
        return
    step, lane, unit = found
    if _awaits(unit) and unit.status == "succeeded" and unit.iteration == e.iteration:
        _unit_done(n, _put_unit(n, step, lane, _replace(unit, done=True)), ts)


_Handler = Callable[[_Next, int, Any], None]

_HANDLERS: Final[dict[type, _Handler]] = {
    StepScheduled: _step_scheduled,
    StepStarted: _step_started,
    StepSucceeded: _step_succeeded,
    StepCacheHit: _step_succeeded,
    StepFailed: _step_failed,
    StepRetryScheduled: _step_retry_scheduled,
    FallbackStarted: _fallback_started,
    StepSkipped: _step_skipped,
    StepCancelled: _step_cancelled,
    StepFannedOut: _step_fanned_out,
    LoopCompleted: _loop_completed,
    RunSubmitted: _run_submitted,
    RunStarted: _run_started,
    RunPaused: _run_paused,
    RunResumed: _run_resumed,
    RunCancelRequested: _run_cancel_requested,
    RunCancelled: _run_cancelled,
    RunFailed: _run_failed,
    RunCompleted: _run_completed,
    RunRetryRequested: _run_retry_requested,
    CheckpointTaken: _checkpoint_taken,
}
#: The only events that change a finished run.
_AFTER_FINISH: Final = frozenset({RunRetryRequested, CheckpointTaken})


def evolve(state: RunState | None, event: Envelope) -> RunState:
    """The state after ``event`` (``state`` None: before the run's first event)."""
    if state is None:
        state = RunState(run_id=event.run_id)
    elif event.seq <= state.seq or event.run_id != state.run_id:
        return state
    kind = type(event.data)
    if state.status in TERMINAL and kind not in _AFTER_FINISH:
        return _replace(state, seq=event.seq, last_event_id=event.event_id, updated_ms=event.ts)
    n = _Next(state)
    _HANDLERS[kind](n, event.ts, event.data)
    return _replace(
        state, **n.changes(), seq=event.seq, last_event_id=event.event_id, updated_ms=event.ts
    )


def evolve_passed(state: RunState, event: Envelope) -> RunState:
    """``state`` with a passive event (:data:`PASSIVE_EVENT_TYPES`) folded in
    that it was already moved past: a decision appended with an expected seq lands after any
    passive events that came in between, and whoever folded the decision locally gets those
    events afterwards. Only the event's own field changes; the result equals folding it in
    order, as every later event sets ``seq``, ``last_event_id`` and ``updated_ms`` itself."""
    if event.type not in PASSIVE_EVENT_TYPES:
        raise TypeError(f"{event.type} at seq {event.seq} of run {event.run_id} is not passive")
    n = _Next(state)
    _HANDLERS[type(event.data)](n, event.ts, event.data)
    return n.build()


def replay(events: Iterable[Envelope]) -> RunState | None:
    """The state after every event of ``events`` (None if there are none)."""
    state: RunState | None = None
    for event in events:
        state = evolve(state, event)
    return state
