"""Properties of the pure engine (run state, run index, decide), on random definitions and
random runner behaviour.

A run is simulated without any store: ``decide`` -> its events folded with ``evolve`` -> a
simulated runner turns scheduled attempts into facts (success, failure, cache hit, a hang the
scheduler times out, duplicates, late results) -> ``decide`` again, moving a fake clock to the
wake-up when nothing else is pending. An operator pauses, resumes and cancels now and then,
and sometimes retries a failed or cancelled run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstore.codec import decode, encode
from eventstore.events import (
    Envelope,
    ErrorInfo,
    EventData,
    RunCancelled,
    RunCancelRequested,
    RunFailed,
    RunPaused,
    RunResumed,
    RunRetryRequested,
    RunSubmitted,
    StepCacheHit,
    StepFailed,
    StepScheduled,
    StepStarted,
    StepSucceeded,
)
from projections.run_index import RunIndex, evolve_index, get_run
from projections.run_state import (
    ACTIVE,
    IN_FLIGHT,
    SETTLED,
    STEP_FINAL,
    TERMINAL,
    RunState,
    evolve,
    replay,
    unit_index,
)
from services.commands import steps_to_reset
from services.scheduler.decide import decide
from services.workflow.model import FallbackSpec, LoopSpec, RetryPolicy, StepDef, WorkflowDef

MAX_ROUNDS = 4000
OUTCOMES = ("ok",) * 6 + ("fail", "fail", "fatal", "circuit", "cached", "hang", "lost", "dup")
ERRORS = {
    "fail": ErrorInfo(type="Flaky", message="try again"),
    "fatal": ErrorInfo(type="Fatal", message="give up", retryable=False),
    "circuit": ErrorInfo(type="CircuitOpen", message="open", retryable=False),
}


@st.composite
def step_defs(draw: st.DrawFn, index: int) -> StepDef:
    deps = draw(st.lists(st.integers(0, index - 1), max_size=3, unique=True)) if index else []
    kind = draw(st.sampled_from(["plain", "plain", "for_each", "loop"]))
    with_: dict[str, Any] = {f"from_{d}": f"${{{{ steps.s{d}.output }}}}" for d in deps}
    if kind == "for_each":
        with_["item"] = "${{ item }}"
    if kind == "loop":
        with_["iteration"] = "${{ iteration }}"
    if draw(st.integers(0, 30)) == 0:
        with_["broken"] = "${{ inputs.missing }}"
    loop = None
    if kind == "loop":
        loop = LoopSpec(
            until=f"iteration >= {draw(st.integers(1, 3))}", max_iterations=draw(st.integers(1, 3))
        )
    return StepDef(
        id=f"s{index}",
        agent="work",
        with_=with_,
        depends_on=tuple(f"s{d}" for d in deps),
        when=draw(st.sampled_from([None] * 6 + ["true", "false", "inputs.flag"])),
        for_each="${{ inputs.items }}" if kind == "for_each" else None,
        loop=loop,
        retry=RetryPolicy(
            max_attempts=draw(st.integers(1, 3)),
            initial_delay=draw(st.sampled_from([0.0, 0.5, 2.0])),
            max_delay=3.0,
            jitter=0.2,
            non_retryable=draw(st.sampled_from([(), ("Flaky",)])),
        ),
        timeout=draw(st.sampled_from([None, 5.0])),
        fallback=tuple(FallbackSpec(agent=f"fb{k}") for k in range(draw(st.integers(0, 2)))),
        critical=draw(st.booleans()),
    )


@st.composite
def definitions(draw: st.DrawFn) -> WorkflowDef:
    count = draw(st.integers(1, 8))
    return WorkflowDef(
        name="prop",
        steps=tuple(draw(step_defs(index)) for index in range(count)),
        max_parallel=draw(st.sampled_from([None, 1, 2, 3])),
    )


@dataclass
class Simulation:
    """One run driven to the end; ``states[k]`` is the state after ``log[:k]``."""

    definition: WorkflowDef
    data: st.DataObject
    now: int = 1_000_000
    log: list[Envelope] = field(default_factory=list)
    states: list[RunState | None] = field(default_factory=lambda: [None])
    work: list[StepScheduled] = field(default_factory=list)
    late: list[StepScheduled] = field(default_factory=list)
    may_cancel: bool = False
    cancel_asked: bool = False

    @property
    def state(self) -> RunState:
        state = self.states[-1]
        assert state is not None
        return state

    def add(self, data: EventData) -> None:
        event = Envelope(
            event_id=f"e{len(self.log) + 1}",
            run_id="run-p",
            ts=self.now,
            producer="sim",
            data=data,
            seq=len(self.log) + 1,
        )
        self.log.append(event)
        self.states.append(evolve(self.states[-1], event))

    def step_decide(self) -> tuple[bool, int | None]:
        before = self.state
        decision = decide(self.definition, before, self.now)
        copy = msgspec.msgpack.decode(msgspec.msgpack.encode(before), type=RunState)
        assert decide(self.definition, copy, self.now) == decision
        for data in decision.events:
            assert not (before.status == "paused" and isinstance(data, StepScheduled))
            if isinstance(data, RunFailed | RunCancelled):
                units = [u for step in self.state.steps.values() for u in step.units]
                assert not [u for u in units if u.status in ACTIVE], "ended with units active"
            self.add(data)
            if isinstance(data, StepScheduled):
                self.work.append(data)
        # The state a decision carries is the one its events lead to.
        after = msgspec.structs.replace(self.state, last_event_id="") if decision.events else before
        assert decision.state == after
        # A decision settles the run: deciding again on the state it leads to, at the same
        # time, decides nothing, unless a timer of that state is already due (the scheduler
        # relies on this to skip its own decisions when the feed brings them back).
        if decision.events and not any(due <= self.now for due, _, _ in after.timers):
            assert decide(self.definition, after, self.now).events == []
        limit = self.definition.max_parallel
        assert limit is None or self.state.in_flight <= limit
        return bool(decision.events), decision.wake_at_ms

    def facts(self, scheduled: StepScheduled) -> dict[str, Any]:
        return {
            "step": scheduled.step,
            "attempt": scheduled.attempt,
            "agent": scheduled.agent,
            "item": scheduled.item,
            "iteration": scheduled.iteration,
            "fallback_index": scheduled.fallback_index,
            "idempotency_key": scheduled.idempotency_key,
        }

    def output(self, s: StepScheduled) -> str:
        return f"{s.step}:{s.item}:{s.iteration}:{s.fallback_index}:{s.attempt}"

    def report(self, data: EventData, scheduled: StepScheduled) -> None:
        """Append a runner fact; one about an attempt no longer current must change nothing."""
        before = self.state
        self.add(data)
        if not is_current(before, scheduled):
            assert self.state == msgspec.structs.replace(
                before,
                seq=self.state.seq,
                last_event_id=self.state.last_event_id,
                updated_ms=self.state.updated_ms,
            )

    def run_one(self) -> None:
        scheduled = self.work.pop(self.data.draw(st.integers(0, len(self.work) - 1)))
        facts = self.facts(scheduled)
        outcome = self.data.draw(st.sampled_from(OUTCOMES))
        if outcome in ("hang", "lost") and scheduled.timeout_s is None:
            outcome = "ok"
        if outcome == "cached":
            self.report(StepCacheHit(output=self.output(scheduled), **facts), scheduled)
            return
        if outcome == "lost":
            self.late.append(scheduled)
            return
        self.report(StepStarted(**facts), scheduled)
        if outcome == "hang":
            self.late.append(scheduled)
        elif outcome in ERRORS:
            self.report(StepFailed(error=ERRORS[outcome], **facts), scheduled)
        else:
            self.report(StepSucceeded(output=self.output(scheduled), **facts), scheduled)
            if outcome == "dup":
                self.report(StepSucceeded(output=self.output(scheduled), **facts), scheduled)

    def operate(self) -> bool:
        """Maybe pause, resume, cancel or let a hung or lost attempt finish late; True if
        something happened."""
        action = self.data.draw(st.integers(0, 40))
        if action == 0 and self.state.status == "running":
            self.add(RunPaused(reason="look"))
        elif action == 1 and self.state.status == "paused":
            self.add(RunResumed())
        elif action == 2 and self.may_cancel and not self.cancel_asked:
            self.cancel_asked = True
            self.add(RunCancelRequested(reason="enough"))
        elif action in (3, 4, 5) and self.late:
            late = self.late.pop(self.data.draw(st.integers(0, len(self.late) - 1)))
            self.report(StepStarted(**self.facts(late)), late)
            self.report(StepSucceeded(output="late", **self.facts(late)), late)
        else:
            return False
        return True

    def drive(self) -> None:
        self.add(RunSubmitted(workflow="prop", digest="", definition="", inputs=self.inputs()))
        self.may_cancel = self.data.draw(st.integers(0, 4)) == 0
        retries = self.data.draw(st.integers(0, 1))
        for _ in range(MAX_ROUNDS):
            check_indexes(self.state)
            if self.state.status in TERMINAL:
                if not retries or self.state.status == "completed":
                    return
                retries -= 1
                self.cancel_asked = False
                reset = steps_to_reset(self.definition, self.state, "")
                self.add(RunRetryRequested(reset_steps=reset))
                continue
            decided, wake = self.step_decide()
            if self.operate() or decided:
                continue
            if self.work:
                self.run_one()
            elif self.state.status == "paused":
                self.add(RunResumed())
            else:
                assert wake is not None, f"run stuck: {self.state}"
                assert wake > self.now
                self.now = wake
        raise AssertionError("run did not finish within the round limit")

    def inputs(self) -> dict[str, Any]:
        items = self.data.draw(st.lists(st.integers(0, 9), max_size=3))
        return {"flag": self.data.draw(st.booleans()), "items": items}


def is_current(state: RunState, scheduled: StepScheduled) -> bool:
    """Whether ``scheduled`` is the attempt in flight of its unit."""
    step = state.steps.get(scheduled.step)
    if state.status in TERMINAL or step is None or step.status in STEP_FINAL:
        return False
    lane = unit_index(step, scheduled.item)
    if lane is None or lane >= len(step.units):
        return False
    unit = step.units[lane]
    return unit.status in IN_FLIGHT and (
        unit.attempt,
        unit.fallback_index,
        unit.iteration,
        unit.idempotency_key,
    ) == (
        scheduled.attempt,
        scheduled.fallback_index,
        scheduled.iteration,
        scheduled.idempotency_key,
    )


def check_indexes(state: RunState) -> None:
    """Every index the state keeps agrees with the steps and units it summarises."""
    units = [
        (step_id, lane, unit)
        for step_id, step in state.steps.items()
        for lane, unit in enumerate(step.units)
    ]
    assert state.in_flight == sum(unit.status in IN_FLIGHT for _, _, unit in units)
    timers = sorted((u.due_ms, s, lane) for s, lane, u in units if u.due_ms is not None)
    assert state.timers == tuple(timers)
    awaiting = {
        (s, lane) for s, lane, u in units if not u.done and u.status in SETTLED | {"failed"}
    }
    assert set(state.awaiting) == awaiting
    assert len(state.awaiting) == len(awaiting)
    settled = {step_id for step_id, step in state.steps.items() if step.status in SETTLED}
    assert state.unsettled == len(state.steps) - len(settled)
    for step in state.steps.values():
        if step.status == "pending":
            assert step.waiting == sum(dep not in settled for dep in step.depends_on)
    if state.status in TERMINAL:
        assert (state.ready, state.fanning, state.timers, state.in_flight) == ((), (), (), 0)
        return
    if state.status == "submitted":
        return
    pending_ready = [s for s, step in state.steps.items() if step.status == "pending"]
    assert set(state.ready) == {s for s in pending_ready if state.steps[s].waiting == 0}
    fanning = {
        s
        for s, step in state.steps.items()
        if step.items is not None
        and step.status not in STEP_FINAL
        and step.next_unit < len(step.items)
    }
    assert set(state.fanning) == fanning


def check_outcome(sim: Simulation) -> None:
    state = sim.state
    steps = {step.id: step for step in sim.definition.steps}
    if state.status == "completed":
        assert all(step.status in SETTLED for step in state.steps.values())
        for step in state.steps.values():
            if step.status == "succeeded" and step.items is not None:
                assert len(step.output) == len(step.items)
                for index, output in enumerate(step.output):
                    assert output == "late" or output.split(":")[1] == str(index)
    elif state.status == "failed":
        assert steps[state.failed_step].critical
        assert state.steps[state.failed_step].status == "failed"
    else:
        assert state.status == "cancelled"
        assert sim.cancel_asked


def check_history(sim: Simulation) -> None:
    """Units start only after their dependencies settled; attempts stay within the policy."""
    steps = {step.id: step for step in sim.definition.steps}
    settled_at: dict[str, int] = {}
    for seq, event in enumerate(sim.log, start=1):
        before, after = sim.states[seq - 1], sim.states[seq]
        assert after is not None
        data = event.data
        if isinstance(data, StepStarted | StepScheduled):
            assert before is not None
            if before.steps[data.step] != after.steps[data.step]:
                for dep in steps[data.step].depends_on:
                    assert settled_at.get(dep, seq) < seq
        if isinstance(data, StepScheduled):
            step = steps[data.step]
            if data.fallback_index == 0:
                assert 1 <= data.attempt <= step.retry.max_attempts
            else:
                assert data.attempt == 1
                assert data.fallback_index <= len(step.fallback)
        for step_id, state in after.steps.items():
            if state.status in SETTLED:
                settled_at.setdefault(step_id, seq)
            else:
                settled_at.pop(step_id, None)


def check_replay(sim: Simulation, cuts: list[int]) -> None:
    stored = [decode(encode(event), seq=event.seq) for event in sim.log]
    assert replay(stored) == sim.state
    index = RunIndex()
    for k in range(1, len(sim.log) + 1):
        state = sim.states[k]
        assert state is not None
        event = sim.log[k - 1]
        assert evolve(state, event) is state
        index = evolve_index(index, event)
        assert evolve_index(index, event) is index
        entry = get_run(index, state.run_id)
        assert entry is not None
        assert (entry.status, entry.workflow) == (state.status, state.workflow)
        if state.generation == 0 or state.status == "completed":
            assert entry.degraded == state.degraded
        again = evolve(state, msgspec.structs.replace(event, seq=k + 1, event_id="dup"))
        assert again == msgspec.structs.replace(state, seq=k + 1, last_event_id="dup")
    for cut in cuts:
        snapshot = sim.states[min(cut, len(sim.log))]
        restored = msgspec.msgpack.decode(msgspec.msgpack.encode(snapshot), type=RunState)
        for event in sim.log[min(cut, len(sim.log)) :]:
            restored = evolve(restored, event)
        assert restored == sim.state


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(definition=definitions(), data=st.data(), cuts=st.lists(st.integers(1, 400), max_size=3))
def test_random_runs_finish_consistently_and_replay_exactly(
    definition: WorkflowDef, data: st.DataObject, cuts: list[int]
) -> None:
    sim = Simulation(definition, data)
    sim.drive()
    check_outcome(sim)
    check_history(sim)
    check_replay(sim, cuts)
