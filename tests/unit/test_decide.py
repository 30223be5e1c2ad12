"""``decide``: every scheduling rule, on small definitions with the runner's facts written by
hand and the clock moved by the test."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from eventstore.events import (
    Envelope,
    ErrorInfo,
    EventData,
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
    StepCancelled,
    StepFailed,
    StepFannedOut,
    StepRetryScheduled,
    StepScheduled,
    StepSkipped,
    StepStarted,
    StepSucceeded,
)
from projections.run_state import START_GRACE_MS, RunState, UnitState, evolve
from services.scheduler.decide import Decision, decide
from services.scheduler.policy import retry_delay
from services.workflow.loader import parse_definition
from services.workflow.model import FallbackSpec, LoopSpec, RetryPolicy, StepDef, WorkflowDef

T0 = 1_000_000
BOOM = ErrorInfo(type="Boom", message="it broke")
FATAL = ErrorInfo(type="Fatal", message="no way", retryable=False)


def workflow(*steps: StepDef, max_parallel: int | None = None, **inputs: Any) -> WorkflowDef:
    return WorkflowDef(name="wf", steps=steps, max_parallel=max_parallel, inputs=inputs)


class Sim:
    """One run: decisions and hand-written runner facts applied in order at ``now``."""

    def __init__(
        self, definition: WorkflowDef, *, value_limit: int | None = None, **inputs: Any
    ) -> None:
        self.definition = definition
        self.value_limit = value_limit
        self.now = T0
        self.events: list[Envelope] = []
        self.state: RunState | None = None
        self.add(RunSubmitted(workflow="wf", digest="", definition="", inputs=inputs))

    @property
    def run(self) -> RunState:
        assert self.state is not None
        return self.state

    def add(self, data: EventData) -> RunState:
        event = Envelope(
            event_id=f"e{len(self.events) + 1}",
            run_id="run-1",
            ts=self.now,
            producer="test",
            data=data,
            seq=len(self.events) + 1,
        )
        self.events.append(event)
        self.state = evolve(self.state, event)
        return self.state

    def decide(self) -> Decision:
        """The decision, its events added; checks the state it carries is the one they lead
        to, and leaves that state out so decisions compare by events and wake time."""
        before = self.run
        decision = decide(self.definition, before, self.now, value_limit=self.value_limit)
        for data in decision.events:
            self.add(data)
        after = msgspec.structs.replace(self.run, last_event_id="") if decision.events else before
        assert decision.state == after
        return msgspec.structs.replace(decision, state=None)

    def unit(self, step: str, item: int | None = None) -> UnitState:
        return self.run.steps[step].units[0 if item is None else item]

    def fact(self, step: str, item: int | None = None) -> dict[str, Any]:
        unit = self.unit(step, item)
        return {
            "step": step,
            "attempt": unit.attempt,
            "agent": unit.agent,
            "item": unit.item,
            "iteration": unit.iteration,
            "fallback_index": unit.fallback_index,
        }

    def start(self, step: str, item: int | None = None) -> None:
        self.add(StepStarted(**self.fact(step, item)))

    def succeed(self, step: str, output: Any = None, item: int | None = None) -> None:
        self.add(StepSucceeded(output=output, **self.fact(step, item)))

    def fail(self, step: str, error: ErrorInfo = BOOM, item: int | None = None) -> None:
        self.add(StepFailed(error=error, **self.fact(step, item)))

    def finish(self, step: str, output: Any = None, item: int | None = None) -> None:
        self.start(step, item)
        self.succeed(step, output, item)


def kinds(decision: Decision) -> list[str]:
    return [type(event).__name__ for event in decision.events]


def scheduled(decision: Decision) -> list[StepScheduled]:
    return [event for event in decision.events if isinstance(event, StepScheduled)]


def test_a_submitted_run_starts_and_schedules_its_roots_with_rendered_inputs() -> None:
    sim = Sim(
        workflow(
            StepDef(
                id="a",
                agent="echo",
                with_={"x": "${{ inputs.x }}", "who": "run ${{ run.id }}"},
                queue="gpu",
                timeout=3.0,
                cache_ttl=60.0,
            ),
            StepDef(id="b", agent="echo", depends_on=("a",)),
        ),
        x=[1, 2],
    )
    decision = sim.decide()
    assert kinds(decision) == ["RunStarted", "StepScheduled"]
    start = decision.events[0]
    assert isinstance(start, RunStarted)
    assert start.plan == {"a": (), "b": ("a",)}
    assert scheduled(decision)[0] == StepScheduled(
        step="a",
        attempt=1,
        agent="echo",
        inputs={"x": [1, 2], "who": "run run-1"},
        queue="gpu",
        timeout_s=3.0,
        cache_ttl_s=60.0,
        idempotency_key="run-1:0:a:-:-:0:1",
    )
    assert decision.wake_at_ms == T0 + 3000 + START_GRACE_MS


def test_a_step_waits_for_its_dependencies_and_reads_their_outputs() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo"),
            StepDef(id="b", agent="echo"),
            StepDef(id="d", agent="echo"),
            StepDef(
                id="c",
                agent="echo",
                depends_on=("a", "b", "d"),
                with_={
                    "a": "${{ steps.a.output }}",
                    "b": "${{ steps.b.status }}",
                    # a computed key beside a fixed one: every ancestor is in scope
                    "chosen": "${{ [steps.a.output, steps[inputs.which].output] }}",
                },
            ),
            which="d",
        )
    )
    sim.decide()
    sim.finish("a", {"n": 1})
    sim.finish("d", "D")
    assert sim.decide().events == []
    sim.finish("b", "B")
    (c,) = scheduled(sim.decide())
    assert c.inputs == {"a": {"n": 1}, "b": "succeeded", "chosen": [{"n": 1}, "D"]}


def test_a_false_when_skips_and_a_skipped_dependency_counts_as_satisfied_with_null_output() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", when="inputs.go"),
            StepDef(id="b", agent="echo", depends_on=("a",), with_={"a": "${{ steps.a.output }}"}),
        ),
        go=False,
    )
    decision = sim.decide()
    assert kinds(decision) == ["RunStarted", "StepSkipped", "StepScheduled"]
    assert decision.events[1] == StepSkipped(step="a", reason="when is false: inputs.go")
    assert scheduled(decision)[0].inputs == {"a": None}
    assert sim.run.degraded is False


def test_a_true_when_runs_the_step() -> None:
    sim = Sim(workflow(StepDef(id="a", agent="echo", when="inputs.go == 1")), go=1)
    assert kinds(sim.decide()) == ["RunStarted", "StepScheduled"]


def test_an_expression_error_fails_a_critical_step_and_the_run() -> None:
    sim = Sim(workflow(StepDef(id="a", agent="echo", with_={"v": "${{ inputs.missing }}"})))
    decision = sim.decide()
    assert kinds(decision) == ["RunStarted", "RunFailed"]
    failed = decision.events[1]
    assert isinstance(failed, RunFailed)
    assert (failed.step, failed.error.type, failed.error.retryable) == (
        "a",
        "ExpressionError",
        False,
    )
    assert "missing" in failed.error.message
    assert sim.run.status == "failed"


def test_an_expression_error_in_a_non_critical_step_skips_it_and_degrades_the_run() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", when="inputs.nope > 1", critical=False),
            StepDef(id="b", agent="echo", depends_on=("a",)),
        )
    )
    decision = sim.decide()
    assert kinds(decision) == ["RunStarted", "StepSkipped", "StepScheduled"]
    skipped = decision.events[1]
    assert isinstance(skipped, StepSkipped)
    assert skipped.reason.startswith("non-critical failure: ExpressionError: ")
    assert skipped.error is not None
    assert sim.run.degraded is True
    sim.finish("b")
    assert sim.decide().events == [RunCompleted(degraded=True)]
    assert (sim.run.status, sim.run.degraded) == ("completed", True)


def test_max_parallel_bounds_units_in_flight() -> None:
    steps = [StepDef(id=f"s{i}", agent="echo") for i in range(5)]
    sim = Sim(workflow(*steps, max_parallel=2))
    assert [s.step for s in scheduled(sim.decide())] == ["s0", "s1"]
    assert sim.decide().events == []
    sim.start("s0")
    assert sim.decide().events == []
    sim.succeed("s0")
    assert [s.step for s in scheduled(sim.decide())] == ["s2"]
    assert sim.run.in_flight == 2


def test_for_each_fans_out_once_and_collects_outputs_in_item_order() -> None:
    sim = Sim(
        workflow(
            StepDef(id="f", agent="echo", for_each="${{ inputs.xs }}", with_={"v": "${{ item }}"}),
            StepDef(
                id="g", agent="echo", depends_on=("f",), with_={"all": "${{ steps.f.output }}"}
            ),
            max_parallel=2,
        ),
        xs=["p", "q", "r"],
    )
    decision = sim.decide()
    assert kinds(decision) == ["RunStarted", "StepFannedOut", "StepScheduled", "StepScheduled"]
    assert decision.events[1] == StepFannedOut(step="f", items=["p", "q", "r"])
    assert [(s.item, s.inputs) for s in scheduled(decision)] == [(0, {"v": "p"}), (1, {"v": "q"})]
    assert scheduled(decision)[1].idempotency_key == "run-1:0:f:1:-:0:1"
    sim.finish("f", "Q", item=1)
    assert [(s.item, s.inputs) for s in scheduled(sim.decide())] == [(2, {"v": "r"})]
    sim.finish("f", "R", item=2)
    assert sim.decide().events == []
    sim.finish("f", "P", item=0)
    (g,) = scheduled(sim.decide())
    assert g.inputs == {"all": ["P", "Q", "R"]}


def test_an_empty_for_each_succeeds_with_an_empty_list() -> None:
    sim = Sim(workflow(StepDef(id="f", agent="echo", for_each="inputs.xs")), xs=[])
    decision = sim.decide()
    assert kinds(decision) == ["RunStarted", "StepFannedOut", "RunCompleted"]
    assert sim.run.steps["f"].output == []


def test_for_each_that_is_not_a_list_fails_the_step() -> None:
    sim = Sim(workflow(StepDef(id="f", agent="echo", for_each="inputs.xs")), xs=5)
    failed = sim.decide().events[-1]
    assert isinstance(failed, RunFailed)
    assert failed.error.type == "ExpressionError"
    assert "must give a list" in failed.error.message


def test_a_failed_item_fails_the_for_each_step_and_cancels_the_others() -> None:
    sim = Sim(
        workflow(
            StepDef(id="f", agent="echo", for_each="inputs.xs"),
            StepDef(id="other", agent="echo"),
        ),
        xs=[1, 2, 3],
    )
    sim.decide()
    sim.finish("f", 1, item=0)
    sim.start("f", item=1)
    sim.fail("f", FATAL, item=2)
    decision = sim.decide()
    assert kinds(decision) == ["StepCancelled", "StepCancelled", "RunFailed"]
    assert decision.events[:2] == [
        StepCancelled(step="f", attempt=1, reason="run failed: step 'f' failed", item=1),
        StepCancelled(step="other", attempt=1, reason="run failed: step 'f' failed"),
    ]
    assert decision.events[2] == RunFailed(error=FATAL, step="f")


def test_a_loop_runs_until_its_condition_holds() -> None:
    sim = Sim(
        workflow(
            StepDef(
                id="l",
                agent="echo",
                with_={"i": "${{ iteration }}"},
                loop=LoopSpec(until="output >= 3", max_iterations=5),
            )
        )
    )
    (first,) = scheduled(sim.decide())
    assert (first.iteration, first.inputs) == (1, {"i": 1})
    sim.finish("l", 1)
    (second,) = scheduled(sim.decide())
    assert (second.iteration, second.attempt, second.inputs) == (2, 1, {"i": 2})
    assert second.idempotency_key == "run-1:0:l:-:2:0:1"
    sim.finish("l", 3)
    decision = sim.decide()
    assert decision.events == [LoopCompleted(step="l", iteration=2), RunCompleted()]
    assert sim.run.steps["l"].output == 3


def test_a_loop_that_never_meets_its_condition_fails_with_loop_exhausted() -> None:
    sim = Sim(
        workflow(
            StepDef(
                id="l",
                agent="echo",
                loop=LoopSpec(until="iteration > 5", max_iterations=2),
                retry=RetryPolicy(max_attempts=3),
                fallback=(FallbackSpec(agent="noop"),),
            )
        )
    )
    sim.decide()
    sim.finish("l")
    sim.decide()
    sim.finish("l")
    decision = sim.decide()
    assert kinds(decision) == ["RunFailed"]
    failed = decision.events[0]
    assert isinstance(failed, RunFailed)
    assert (failed.error.type, failed.error.retryable) == ("LoopExhausted", False)


def test_a_retryable_failure_waits_with_backoff_then_runs_the_next_attempt() -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay=2.0, backoff=3.0, max_delay=5.0)
    sim = Sim(workflow(StepDef(id="a", agent="echo", retry=policy)))
    sim.decide()
    sim.start("a")
    sim.fail("a")
    decision = sim.decide()
    (retry,) = decision.events
    assert isinstance(retry, StepRetryScheduled)
    assert (retry.step, retry.attempt) == ("a", 2)
    assert 1.8 <= retry.delay_s <= 2.2
    assert retry.due_ms == T0 + round(retry.delay_s * 1000)
    assert decision.wake_at_ms == retry.due_ms
    assert sim.run.steps["a"].status == "retry_wait"
    sim.now = retry.due_ms - 1
    assert sim.decide() == Decision(wake_at_ms=retry.due_ms)
    sim.now = retry.due_ms
    (again,) = scheduled(sim.decide())
    assert (again.attempt, again.idempotency_key) == (2, "run-1:0:a:-:-:0:2")
    sim.fail("a")
    second = sim.decide().events[0]
    assert isinstance(second, StepRetryScheduled)
    assert (second.attempt, 4.5 <= second.delay_s <= 5.5) == (3, True)
    sim.now = second.due_ms
    sim.decide()
    sim.fail("a")
    assert kinds(sim.decide()) == ["RunFailed"]
    assert sim.run.steps["a"].attempts == 3


def test_retry_delay_follows_the_formula_and_the_jitter_bounds() -> None:
    policy = RetryPolicy(initial_delay=1.0, backoff=2.0, max_delay=10.0, jitter=0.5)
    assert retry_delay(policy, 1, 0.5) == 1.0
    assert retry_delay(policy, 3, 0.5) == 4.0
    assert retry_delay(policy, 9, 0.5) == 10.0
    assert retry_delay(policy, 3, 0.0) == 2.0
    assert retry_delay(policy, 3, 0.999) == pytest.approx(5.996)
    assert retry_delay(policy, 5000, 0.5) == 10.0


@pytest.mark.parametrize(
    "error",
    [ErrorInfo(type="Bad", message="m"), ErrorInfo(type="Other", message="m", retryable=False)],
)
def test_non_retryable_errors_skip_the_retries(error: ErrorInfo) -> None:
    retry = RetryPolicy(max_attempts=5, non_retryable=("Bad",))
    sim = Sim(workflow(StepDef(id="a", agent="echo", retry=retry)))
    sim.decide()
    sim.fail("a", error)
    assert sim.decide().events == [RunFailed(error=error, step="a")]


def test_decisions_are_deterministic() -> None:
    definition = workflow(StepDef(id="a", agent="echo", retry=RetryPolicy(max_attempts=4)))
    sim = Sim(definition)
    sim.decide()
    sim.fail("a")
    assert decide(definition, sim.run, sim.now) == decide(definition, sim.run, sim.now)
    other = Sim(definition)
    other.decide()
    other.fail("a")
    assert decide(definition, other.run, other.now) == decide(definition, sim.run, sim.now)


def test_exhausted_retries_move_to_the_fallbacks_one_attempt_each() -> None:
    sim = Sim(
        workflow(
            StepDef(
                id="a",
                agent="llm-main",
                with_={"p": "main"},
                timeout=9.0,
                retry=RetryPolicy(max_attempts=1),
                fallback=(
                    FallbackSpec(agent="llm-b", with_={"p": "${{ inputs.p }}"}, timeout=4.0),
                    FallbackSpec(agent="llm-c"),
                ),
            )
        ),
        p="fb",
    )
    sim.decide()
    sim.fail("a")
    decision = sim.decide()
    assert decision.events[0] == FallbackStarted(
        step="a", attempt=1, fallback_index=1, agent="llm-b", reason=BOOM
    )
    (first,) = scheduled(decision)
    assert (first.agent, first.inputs, first.timeout_s, first.attempt, first.fallback_index) == (
        "llm-b",
        {"p": "fb"},
        4.0,
        1,
        1,
    )
    assert first.idempotency_key == "run-1:0:a:-:-:1:1"
    sim.fail("a")
    (second,) = scheduled(sim.decide())
    assert (second.agent, second.timeout_s, second.fallback_index) == ("llm-c", 9.0, 2)
    sim.succeed("a", "from c")
    assert kinds(sim.decide()) == ["RunCompleted"]
    step = sim.run.steps["a"]
    assert (step.output, step.fallback_used, step.attempts) == ("from c", True, 3)


def test_an_open_circuit_goes_straight_to_the_fallback() -> None:
    sim = Sim(
        workflow(
            StepDef(
                id="a",
                agent="http",
                retry=RetryPolicy(max_attempts=5),
                fallback=(FallbackSpec(agent="noop"),),
            )
        )
    )
    sim.decide()
    sim.fail("a", ErrorInfo(type="CircuitOpen", message="open", retryable=False))
    assert kinds(sim.decide()) == ["FallbackStarted", "StepScheduled"]


def test_a_running_unit_past_its_timeout_fails_and_is_retried() -> None:
    sim = Sim(
        workflow(StepDef(id="a", agent="echo", timeout=2.0, retry=RetryPolicy(max_attempts=2)))
    )
    sim.decide()
    sim.now += 100
    sim.start("a")
    assert sim.decide() == Decision(wake_at_ms=T0 + 2100)
    sim.now = T0 + 2099
    assert sim.decide().events == []
    sim.now = T0 + 2100
    decision = sim.decide()
    assert kinds(decision) == ["StepFailed", "StepRetryScheduled"]
    failed = decision.events[0]
    assert isinstance(failed, StepFailed)
    assert (failed.error.type, failed.error.retryable, failed.attempt) == ("StepTimeout", True, 1)
    before = sim.run
    sim.succeed("a", "too late")
    assert sim.run.steps["a"] == before.steps["a"]


def test_a_unit_never_started_times_out_after_the_grace() -> None:
    sim = Sim(
        workflow(StepDef(id="a", agent="echo", timeout=1.0, retry=RetryPolicy(max_attempts=1)))
    )
    sim.decide()
    sim.now = T0 + 1000 + START_GRACE_MS - 1
    assert sim.decide().events == []
    sim.now += 1
    decision = sim.decide()
    assert kinds(decision) == ["StepFailed", "RunFailed"]
    failed = decision.events[1]
    assert isinstance(failed, RunFailed)
    assert failed.error.type == "StepTimeout"


def test_a_non_critical_step_that_fails_is_skipped_and_the_run_goes_on() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", critical=False),
            StepDef(id="b", agent="echo", depends_on=("a",)),
        )
    )
    sim.decide()
    sim.fail("a", FATAL)
    decision = sim.decide()
    assert decision.events[0] == StepSkipped(
        step="a", reason="non-critical failure: Fatal: no way", error=FATAL
    )
    assert [s.step for s in scheduled(decision)] == ["b"]
    sim.finish("b")
    assert sim.decide().events == [RunCompleted(degraded=True)]


def test_a_critical_failure_cancels_in_flight_and_retrying_units_and_fails_the_run() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo"),
            StepDef(id="b", agent="echo", retry=RetryPolicy(max_attempts=3)),
            StepDef(id="c", agent="echo"),
            StepDef(id="d", agent="echo", depends_on=("a",)),
        )
    )
    sim.decide()
    sim.fail("b")
    sim.decide()
    sim.start("c")
    sim.fail("a", FATAL)
    decision = sim.decide()
    reason = "run failed: step 'a' failed"
    assert decision.events == [
        StepCancelled(step="b", attempt=1, reason=reason),
        StepCancelled(step="c", attempt=1, reason=reason),
        RunFailed(error=FATAL, step="a"),
    ]
    statuses = {step_id: step.status for step_id, step in sim.run.steps.items()}
    assert statuses == {"a": "failed", "b": "cancelled", "c": "cancelled", "d": "cancelled"}


def test_a_paused_run_schedules_nothing_new_until_resumed() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", retry=RetryPolicy(max_attempts=2, initial_delay=1.0)),
            StepDef(id="b", agent="echo", timeout=1.0),
            StepDef(id="c", agent="echo", depends_on=("b",)),
        )
    )
    sim.decide()
    sim.fail("a")
    sim.decide()
    sim.start("b")
    sim.add(RunPaused(reason="look"))
    sim.succeed("b")
    sim.now += 60_000
    assert sim.decide() == Decision()
    sim.add(RunResumed())
    assert sorted(s.step for s in scheduled(sim.decide())) == ["a", "c"]


def test_timeouts_are_recorded_while_paused_and_handled_after_resume() -> None:
    sim = Sim(
        workflow(StepDef(id="a", agent="echo", timeout=1.0, retry=RetryPolicy(max_attempts=2)))
    )
    sim.decide()
    sim.start("a")
    sim.add(RunPaused())
    assert sim.decide() == Decision(wake_at_ms=T0 + 1000)
    sim.now = T0 + 1000
    assert kinds(sim.decide()) == ["StepFailed"]
    assert sim.decide() == Decision()
    sim.add(RunResumed())
    assert kinds(sim.decide()) == ["StepRetryScheduled"]


def test_a_cancel_request_cancels_every_active_unit_then_the_run() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", retry=RetryPolicy(max_attempts=2)),
            StepDef(id="b", agent="echo"),
            StepDef(id="c", agent="echo", depends_on=("b",)),
        )
    )
    sim.decide()
    sim.fail("a")
    sim.decide()
    sim.start("b")
    sim.add(RunCancelRequested(reason="user"))
    decision = sim.decide()
    assert decision.events == [
        StepCancelled(step="a", attempt=1, reason="run cancelled: user"),
        StepCancelled(step="b", attempt=1, reason="run cancelled: user"),
        RunCancelled(reason="user"),
    ]
    assert sim.run.status == "cancelled"
    assert {s.status for s in sim.run.steps.values()} == {"cancelled"}


def test_a_cancel_request_before_start_just_cancels_the_run() -> None:
    sim = Sim(workflow(StepDef(id="a", agent="echo")))
    sim.add(RunCancelRequested())
    assert sim.decide().events == [RunCancelled()]


def test_a_finished_run_gets_no_decisions() -> None:
    sim = Sim(workflow(StepDef(id="a", agent="echo")))
    sim.decide()
    sim.finish("a")
    assert kinds(sim.decide()) == ["RunCompleted"]
    assert sim.decide() == Decision()


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ((StepDef(id="a", agent="x", depends_on=("zz",)),), "unknown step 'zz'"),
        (
            (
                StepDef(id="a", agent="x", depends_on=("b",)),
                StepDef(id="b", agent="x", depends_on=("a",)),
            ),
            "cycle",
        ),
        ((StepDef(id="a", agent="x"), StepDef(id="a", agent="y")), "not unique"),
    ],
)
def test_a_graph_that_cannot_run_fails_the_run_at_start(
    steps: tuple[StepDef, ...], problem: str
) -> None:
    sim = Sim(workflow(*steps))
    (failed,) = sim.decide().events
    assert isinstance(failed, RunFailed)
    assert failed.error.type == "DefinitionError"
    assert problem in failed.error.message


def test_a_retried_run_reschedules_with_new_idempotency_keys() -> None:
    sim = Sim(workflow(StepDef(id="a", agent="echo"), StepDef(id="b", agent="echo")))
    sim.decide()
    sim.finish("b")
    sim.fail("a", FATAL)
    sim.decide()
    assert sim.run.status == "failed"
    sim.add(RunRetryRequested(reset_steps=("a",)))
    (again,) = scheduled(sim.decide())
    assert (again.step, again.attempt, again.idempotency_key) == ("a", 1, "run-1:1:a:-:-:0:1")
    sim.finish("a")
    assert kinds(sim.decide()) == ["RunCompleted"]


def test_a_skipped_chain_completes_in_one_decision() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", when="false"),
            StepDef(id="b", agent="echo", depends_on=("a",), when="false"),
            StepDef(id="c", agent="echo", depends_on=("b",), when="false"),
        )
    )
    assert kinds(sim.decide()) == [
        "RunStarted",
        "StepSkipped",
        "StepSkipped",
        "StepSkipped",
        "RunCompleted",
    ]


def test_the_wake_up_is_the_earliest_deadline_ahead() -> None:
    sim = Sim(
        workflow(
            StepDef(id="a", agent="echo", timeout=5.0),
            StepDef(id="b", agent="echo", retry=RetryPolicy(max_attempts=2, initial_delay=1.0)),
        )
    )
    sim.decide()
    sim.start("a")
    decision = sim.decide()
    assert decision.wake_at_ms == T0 + 5000
    sim.fail("b")
    decision = sim.decide()
    retry = decision.events[0]
    assert isinstance(retry, StepRetryScheduled)
    assert retry.due_ms < T0 + 5000
    assert decision.wake_at_ms == retry.due_ms


def test_a_fallback_passed_over_for_want_of_a_slot_is_scheduled_when_a_skip_frees_one() -> None:
    """The scheduler decides again only on a new event or a due timer: a unit passed over for
    lack of a slot must not be left waiting when the same decision frees the slots (here a
    non-critical step's skip cancels its units), or the run stalls for good."""
    sim = Sim(
        workflow(
            StepDef(
                id="a",
                agent="echo",
                retry=RetryPolicy(max_attempts=1),
                fallback=(FallbackSpec(agent="noop"),),
            ),
            StepDef(
                id="b",
                agent="echo",
                for_each="${{ [1, 2, 3] }}",
                critical=False,
                retry=RetryPolicy(max_attempts=2, jitter=0.0),
            ),
            max_parallel=2,
        )
    )
    sim.decide()  # a and b[0]
    for item in (0, 1):
        sim.start("b", item=item)
        sim.fail("b", item=item)
        sim.decide()  # b[item] waits for its retry, b[item + 1] takes its slot
    sim.start("a")
    sim.start("b", item=2)
    sim.now += 10_000  # both retries of b are due
    sim.fail("a", FATAL)  # a's fallback needs a slot: both are taken
    sim.fail("b", FATAL, item=2)  # b fails for good: skipped, its units cancelled
    decision = sim.decide()
    # b's due retries took the two slots, then b's skip cancelled them
    assert sim.run.steps["b"].status == "skipped"
    assert [(e.step, e.fallback_index) for e in scheduled(decision)][-1] == ("a", 1)
    assert sim.unit("a").status == "scheduled"
    assert kinds(sim.decide()) == []


def test_a_bare_for_each_with_nested_braces_that_validates_also_runs() -> None:
    """A bare for_each is kept as written: wrapped in ``${{ }}``, its own ``}}`` would end
    the template early."""
    for_each = "[{'n': 1, 'tags': {'x': 1}}, {'n': 2, 'tags': {}}]"
    definition = parse_definition(
        "name: wf\nsteps:\n  - id: a\n    agent: echo\n"
        f"    for_each: {json.dumps(for_each)}\n    with: {{n: '${{{{ item.n }}}}'}}\n"
    )
    decision = Sim(definition).decide()
    assert [e.inputs for e in scheduled(decision)] == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("critical", [True, False])
def test_inputs_or_items_too_large_for_an_event_fail_the_step_instead_of_being_scheduled(
    critical: bool,
) -> None:
    """The store would refuse the event; the run must not wait for it. A critical step fails
    the run, another one is skipped: either way the error names the sizes."""
    sim = Sim(
        workflow(
            StepDef(id="big", agent="echo"),
            StepDef(
                id="copy",
                agent="echo",
                depends_on=("big",),
                with_={"value": "${{ [steps.big.output, steps.big.output] }}"},
                critical=critical,
            ),
            StepDef(
                id="each", agent="echo", depends_on=("big",), for_each="${{ steps.big.output }}"
            ),
            StepDef(id="fine", agent="echo", depends_on=("big",), with_={"value": "${{ 1 }}"}),
        ),
        value_limit=1000,
    )
    sim.decide()
    sim.finish("big", ["x" * 300, "y" * 300])
    decision = sim.decide()
    kinds_made = kinds(decision)
    if critical:
        assert kinds_made[-1] == "RunFailed"
        assert sim.run.error is not None
        assert sim.run.error.type == "ValueTooLarge"
        assert "the rendered inputs are 1" in sim.run.error.message
    else:
        assert sim.run.steps["copy"].status == "skipped"
        assert sim.run.steps["each"].items == ["x" * 300, "y" * 300]
        assert [e.step for e in scheduled(decision)] == ["each", "each", "fine"]
    small = Sim(
        workflow(StepDef(id="each", agent="echo", for_each="${{ inputs.items }}")),
        value_limit=100,
        items=list(range(100)),
    )
    small.decide()
    assert small.run.status == "failed"
    assert small.run.error is not None
    assert "the for_each items are" in small.run.error.message
