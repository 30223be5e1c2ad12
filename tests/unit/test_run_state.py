"""The run state machine: each transition, the indexes kept for the scheduler, and robustness
against repeated, late and out-of-place events; and the run index."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from eventstore.events import (
    CheckpointTaken,
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
from projections.run_index import RunIndex, count_by_status, evolve_index, get_run, query
from projections.run_state import START_GRACE_MS, RunState, evolve, replay

BOOM = ErrorInfo(type="Boom", message="it broke")


class Run:
    """A run's log being written by hand; ``state`` follows every event."""

    def __init__(self, plan: dict[str, tuple[str, ...]] | None = None) -> None:
        self.events: list[Envelope] = []
        self.state: RunState | None = None
        self.add(RunSubmitted(workflow="wf", digest="d1", definition="body", inputs={"n": 1}))
        if plan is not None:
            self.add(RunStarted(plan=plan))

    def envelope(self, data: EventData, ts: int | None = None) -> Envelope:
        seq = len(self.events) + 1
        return Envelope(
            event_id=f"e{seq}",
            run_id="run-1",
            ts=1000 * seq if ts is None else ts,
            producer="test",
            data=data,
            seq=seq,
        )

    def add(self, data: EventData, ts: int | None = None) -> RunState:
        event = self.envelope(data, ts)
        self.events.append(event)
        self.state = evolve(self.state, event)
        return self.state

    @property
    def now(self) -> RunState:
        assert self.state is not None
        return self.state

    def run_unit(self, step: str, output: Any = None, **unit: Any) -> RunState:
        """Schedule, start and succeed attempt 1 of a unit."""
        self.add(StepScheduled(step=step, attempt=1, agent="echo", **unit))
        self.add(StepStarted(step=step, attempt=1, agent="echo", **unit))
        return self.add(StepSucceeded(step=step, attempt=1, agent="echo", output=output, **unit))


def same_but_position(before: RunState, after: RunState) -> bool:
    """Equal apart from what every applied event advances."""
    moved = msgspec.structs.replace(
        after, seq=before.seq, last_event_id=before.last_event_id, updated_ms=before.updated_ms
    )
    return moved == before


def test_submission_records_the_run() -> None:
    state = Run().now
    assert (state.run_id, state.workflow, state.digest, state.definition) == (
        "run-1",
        "wf",
        "d1",
        "body",
    )
    assert (state.status, state.inputs, state.submitted_ms, state.seq) == (
        "submitted",
        {"n": 1},
        1000,
        1,
    )
    assert state.last_event_id == "e1"


def test_start_creates_every_step_of_the_plan_with_readiness() -> None:
    state = Run({"a": (), "b": ("a",), "c": ("a", "b", "a")}).now
    assert state.status == "running"
    assert state.started_ms == 2000
    assert list(state.steps) == ["a", "b", "c"]
    assert all(step.status == "pending" for step in state.steps.values())
    assert state.steps["c"].depends_on == ("a", "b")
    assert state.steps["a"].dependents == ("b", "c")
    assert state.ready == ("a",)
    assert state.unsettled == 3


def test_a_unit_goes_scheduled_running_succeeded_and_readies_dependents() -> None:
    run = Run({"a": (), "b": ("a",)})
    state = run.add(StepScheduled(step="a", attempt=1, agent="echo", idempotency_key="k1"))
    assert state.steps["a"].status == "scheduled"
    assert (state.in_flight, state.ready) == (1, ())
    state = run.add(StepStarted(step="a", attempt=1, agent="echo"))
    assert state.steps["a"].status == "running"
    assert state.steps["a"].started_ms == 4000
    state = run.add(StepSucceeded(step="a", attempt=1, agent="echo", output={"v": 1}))
    step = state.steps["a"]
    assert (step.status, step.output, step.attempts, step.agent) == (
        "succeeded",
        {"v": 1},
        1,
        "echo",
    )
    assert (step.ended_ms, step.duration_ms) == (5000, 1000.0)
    assert step.units[0].idempotency_key == "k1"
    assert (state.in_flight, state.ready, state.unsettled) == (0, ("b",), 1)


def test_timeouts_are_kept_as_timers_until_the_unit_ends() -> None:
    run = Run({"a": ()})
    state = run.add(StepScheduled(step="a", attempt=1, agent="echo", timeout_s=2.5), ts=10_000)
    assert state.timers == ((10_000 + 2500 + START_GRACE_MS, "a", 0),)
    state = run.add(StepStarted(step="a", attempt=1, agent="echo"), ts=11_000)
    assert state.timers == ((13_500, "a", 0),)
    state = run.add(StepSucceeded(step="a", attempt=1, agent="echo"), ts=12_000)
    assert state.timers == ()


def test_an_event_already_applied_changes_nothing() -> None:
    run = Run({"a": ()})
    run.add(StepScheduled(step="a", attempt=1, agent="echo"))
    state = run.now
    for event in run.events:
        assert evolve(state, event) is state


def test_an_event_of_another_run_is_ignored() -> None:
    run = Run({"a": ()})
    other = msgspec.structs.replace(
        run.envelope(StepScheduled(step="a", attempt=1, agent="echo")), run_id="run-2"
    )
    assert evolve(run.now, other) is run.now


def test_evolve_leaves_its_input_untouched() -> None:
    run = Run({"a": (), "b": ("a",)})
    before = run.now
    encoded = msgspec.msgpack.encode(before)
    run.run_unit("a")
    run.add(StepSkipped(step="b", reason="r"))
    assert msgspec.msgpack.encode(before) == encoded


def test_a_late_failure_of_an_old_attempt_is_recorded_nowhere() -> None:
    run = Run({"a": ()})
    run.add(StepScheduled(step="a", attempt=1, agent="echo"))
    run.add(StepFailed(step="a", attempt=1, agent="echo", error=BOOM))
    assert run.now.awaiting == (("a", 0),)
    state = run.add(StepRetryScheduled(step="a", attempt=2, delay_s=1.0, due_ms=9000))
    assert (state.steps["a"].status, state.awaiting, state.timers) == (
        "retry_wait",
        (),
        ((9000, "a", 0),),
    )
    before = run.add(StepScheduled(step="a", attempt=2, agent="echo"))
    after = run.add(StepFailed(step="a", attempt=1, agent="echo", error=BOOM))
    assert same_but_position(before, after)
    assert after.steps["a"].units[0].attempt == 2
    assert after.steps["a"].attempts == 2


def test_a_success_after_the_scheduler_timed_the_attempt_out_changes_nothing() -> None:
    run = Run({"a": ()})
    run.add(StepScheduled(step="a", attempt=1, agent="echo", timeout_s=1.0))
    run.add(StepStarted(step="a", attempt=1, agent="echo"))
    timeout = ErrorInfo(type="StepTimeout", message="slow", retryable=True)
    before = run.add(StepFailed(step="a", attempt=1, agent="echo", error=timeout))
    after = run.add(StepSucceeded(step="a", attempt=1, agent="echo", output="late"))
    assert same_but_position(before, after)
    assert after.steps["a"].units[0].error == timeout


def test_a_fact_with_another_idempotency_key_is_ignored() -> None:
    run = Run({"a": ()})
    before = run.add(StepScheduled(step="a", attempt=1, agent="echo", idempotency_key="run:1"))
    after = run.add(StepStarted(step="a", attempt=1, agent="echo", idempotency_key="run:0"))
    assert same_but_position(before, after)
    assert run.add(StepStarted(step="a", attempt=1, agent="echo")).steps["a"].status == "running"


def test_facts_for_a_cancelled_unit_are_ignored() -> None:
    run = Run({"a": (), "b": ()})
    run.add(StepScheduled(step="a", attempt=1, agent="echo"))
    state = run.add(StepCancelled(step="a", attempt=1, reason="stop"))
    assert (state.steps["a"].status, state.in_flight) == ("cancelled", 0)
    after = run.add(StepSucceeded(step="a", attempt=1, agent="echo", output=1))
    assert same_but_position(state, after)


def test_a_schedule_that_is_not_the_next_attempt_is_ignored() -> None:
    run = Run({"a": (), "b": ("a",)})
    before = run.now
    assert same_but_position(before, run.add(StepScheduled(step="b", attempt=1, agent="x")))
    before = run.add(StepScheduled(step="a", attempt=1, agent="x"))
    assert same_but_position(before, run.add(StepScheduled(step="a", attempt=3, agent="x")))
    assert same_but_position(before, run.add(StepScheduled(step="zz", attempt=1, agent="x")))


def test_fan_out_collects_item_outputs_in_item_order() -> None:
    run = Run({"f": (), "g": ("f",)})
    state = run.add(StepFannedOut(step="f", items=["x", "y", "z"]))
    step = state.steps["f"]
    assert (step.status, step.items, len(step.units), state.fanning, state.ready) == (
        "scheduled",
        ["x", "y", "z"],
        3,
        ("f",),
        (),
    )
    for item in (0, 1, 2):
        state = run.add(StepScheduled(step="f", attempt=1, agent="echo", item=item))
        assert state.steps["f"].next_unit == item + 1
    assert state.fanning == ()
    assert state.in_flight == 3
    for item in (2, 0):
        run.add(StepSucceeded(step="f", attempt=1, agent="echo", output=item * 10, item=item))
    assert run.now.steps["f"].status == "scheduled"
    state = run.add(StepSucceeded(step="f", attempt=1, agent="echo", output=10, item=1))
    assert (state.steps["f"].status, state.steps["f"].output) == ("succeeded", [0, 10, 20])
    assert state.ready == ("g",)


def test_an_empty_fan_out_succeeds_with_an_empty_list() -> None:
    state = Run({"f": (), "g": ("f",)}).add(StepFannedOut(step="f", items=[]))
    assert (state.steps["f"].status, state.steps["f"].output, state.steps["f"].cached) == (
        "succeeded",
        [],
        False,
    )
    assert (state.ready, state.fanning, state.unsettled) == (("g",), (), 1)


def test_a_loop_keeps_the_last_iteration_output_once_completed() -> None:
    run = Run({"l": ()})
    state = run.run_unit("l", output="first", iteration=1)
    assert (state.steps["l"].status, state.awaiting) == ("running", (("l", 0),))
    state = run.run_unit("l", output="second", iteration=2)
    assert state.steps["l"].units[0].iteration == 2
    state = run.add(LoopCompleted(step="l", iteration=1))
    assert state.steps["l"].status == "running"
    state = run.add(LoopCompleted(step="l", iteration=2))
    assert (state.steps["l"].status, state.steps["l"].output, state.awaiting) == (
        "succeeded",
        "second",
        (),
    )
    assert state.steps["l"].attempts == 2


def test_a_skip_for_failure_marks_the_run_degraded_and_satisfies_dependents() -> None:
    run = Run({"a": (), "b": ("a",), "c": ()})
    state = run.add(StepSkipped(step="c", reason="when is false: no"))
    assert (state.steps["c"].status, state.degraded) == ("skipped", False)
    run.add(StepScheduled(step="a", attempt=1, agent="echo"))
    run.add(StepFailed(step="a", attempt=1, agent="echo", error=BOOM))
    state = run.add(StepSkipped(step="a", reason="non-critical failure", error=BOOM))
    step = state.steps["a"]
    assert (step.status, step.error, step.skip_reason, step.output) == (
        "skipped",
        BOOM,
        "non-critical failure",
        None,
    )
    assert (state.degraded, state.ready, state.awaiting, state.unsettled) == (True, ("b",), (), 1)


def test_skipping_a_step_in_flight_cancels_its_units() -> None:
    run = Run({"f": ()})
    run.add(StepFannedOut(step="f", items=[1, 2]))
    run.add(StepScheduled(step="f", attempt=1, agent="echo", item=0))
    state = run.add(StepSkipped(step="f", reason="r", error=BOOM))
    assert [unit.status for unit in state.steps["f"].units] == ["cancelled", "cancelled"]
    assert (state.in_flight, state.fanning, state.timers) == (0, (), ())


def test_run_failed_fails_its_step_and_cancels_the_unsettled_rest() -> None:
    run = Run({"a": (), "b": (), "c": ("a",)})
    run.run_unit("b")
    run.add(StepScheduled(step="a", attempt=1, agent="echo", timeout_s=5.0))
    state = run.add(RunFailed(error=BOOM, step="a"))
    assert (state.status, state.error, state.failed_step, state.ended_ms) == (
        "failed",
        BOOM,
        "a",
        state.updated_ms,
    )
    statuses = {step_id: step.status for step_id, step in state.steps.items()}
    assert statuses == {"a": "failed", "b": "succeeded", "c": "cancelled"}
    assert state.steps["a"].error == BOOM
    assert (state.in_flight, state.timers, state.ready) == (0, (), ())


def test_a_finished_run_ignores_everything_but_retry_and_checkpoints() -> None:
    run = Run({"a": ()})
    run.add(RunCancelRequested(reason="bye"))
    finished = run.add(RunCancelled(reason="bye"))
    assert (finished.status, finished.steps["a"].status) == ("cancelled", "cancelled")
    for data in (RunStarted(plan={"x": ()}), RunCompleted(), RunResumed()):
        assert same_but_position(finished, run.add(data))
    state = run.add(CheckpointTaken(covered_seq=4, snapshot_key="k"))
    assert state.checkpoint_seq == 4


def test_pause_and_resume_and_a_run_paused_before_it_started() -> None:
    run = Run({"a": ()})
    assert run.add(RunPaused(reason="wait")).status == "paused"
    assert run.add(RunResumed()).status == "running"
    early = Run()
    assert early.add(RunPaused()).status == "paused"
    assert early.add(RunResumed()).status == "submitted"


def test_cancel_request_is_recorded_without_ending_the_run() -> None:
    state = Run({"a": ()}).add(RunCancelRequested(reason="enough"))
    assert (state.status, state.cancel_requested, state.cancel_reason) == (
        "running",
        True,
        "enough",
    )


def test_completion_keeps_degradation() -> None:
    run = Run({"a": ()})
    run.add(StepSkipped(step="a", reason="r", error=BOOM))
    state = run.add(RunCompleted(degraded=True))
    assert (state.status, state.degraded) == ("completed", True)


def test_retry_resets_the_named_and_unfinished_steps() -> None:
    run = Run({"a": (), "b": ("a",), "c": ("b",), "d": ()})
    run.run_unit("a", output="A")
    run.run_unit("d", output="D")
    run.add(StepScheduled(step="b", attempt=1, agent="echo"))
    run.add(StepFailed(step="b", attempt=1, agent="echo", error=BOOM))
    run.add(RunFailed(error=BOOM, step="b"))
    state = run.add(RunRetryRequested(reset_steps=("zz",)))
    assert (state.status, state.generation, state.ready) == ("running", 1, ("b",))
    assert same_but_position(state, run.add(RunRetryRequested(reset_steps=("a",))))
    run.add(RunFailed(error=BOOM, step="b"))
    state = run.add(RunRetryRequested(reset_steps=("a",)))
    assert (state.status, state.generation, state.error, state.failed_step) == (
        "running",
        2,
        None,
        "",
    )
    statuses = {step_id: (s.status, s.attempts) for step_id, s in state.steps.items()}
    assert statuses == {
        "a": ("pending", 0),
        "b": ("pending", 0),
        "c": ("pending", 0),
        "d": ("succeeded", 1),
    }
    assert (state.ready, state.unsettled, state.steps["b"].waiting) == (("a",), 3, 1)


def test_retry_of_a_run_cancelled_before_it_started_starts_it_again() -> None:
    run = Run()
    run.add(RunCancelled())
    state = run.add(RunRetryRequested())
    assert (state.status, state.steps) == ("submitted", {})
    assert run.add(RunStarted(plan={"a": ()})).ready == ("a",)


def test_retry_recomputes_degradation_from_the_kept_steps() -> None:
    run = Run({"a": (), "b": ()})
    run.add(StepSkipped(step="a", reason="r", error=BOOM))
    run.add(RunFailed(error=BOOM, step="b"))
    assert run.add(RunRetryRequested()).degraded is True
    run.add(RunFailed(error=BOOM, step="b"))
    assert run.add(RunRetryRequested(reset_steps=("a",))).degraded is False


def test_a_cache_hit_is_a_cached_success() -> None:
    run = Run({"a": ()})
    run.add(StepScheduled(step="a", attempt=1, agent="echo"))
    state = run.add(StepCacheHit(step="a", attempt=1, agent="echo", output=7, cache_key="c"))
    step = state.steps["a"]
    assert (step.status, step.output, step.cached, step.duration_ms) == (
        "succeeded",
        7,
        True,
        0.0,
    )


def test_a_fallback_attempt_follows_a_failed_one() -> None:
    run = Run({"a": ()})
    run.add(StepScheduled(step="a", attempt=1, agent="llm-a"))
    run.add(StepFailed(step="a", attempt=1, agent="llm-a", error=BOOM))
    run.add(FallbackStarted(step="a", attempt=1, fallback_index=1, agent="llm-b", reason=BOOM))
    state = run.add(StepScheduled(step="a", attempt=1, agent="llm-b", fallback_index=1))
    step = state.steps["a"]
    assert (step.status, step.fallback_used, step.fallback_index, step.agent) == (
        "scheduled",
        True,
        1,
        "llm-b",
    )
    before = run.now
    after = run.add(StepSucceeded(step="a", attempt=1, agent="llm-a", output="old"))
    assert same_but_position(before, after)
    state = run.add(StepSucceeded(step="a", attempt=1, agent="llm-b", fallback_index=1, output=2))
    assert (state.steps["a"].status, state.steps["a"].output) == ("succeeded", 2)


def test_a_log_not_starting_with_submission_still_folds() -> None:
    run = Run({"a": ()})
    state = replay(run.events[1:])
    assert state is not None
    assert (state.status, list(state.steps), state.workflow) == ("running", ["a"], "")


@pytest.mark.parametrize("cut", range(1, 12))
def test_snapshot_plus_tail_is_the_full_replay(cut: int) -> None:
    run = Run({"f": (), "g": ("f",)})
    run.add(StepFannedOut(step="f", items=[1, 2]))
    run.run_unit("f", output="a", item=0)
    run.run_unit("f", output="b", item=1)
    run.add(StepSkipped(step="g", reason="r", error=BOOM))
    run.add(RunCompleted(degraded=True))
    snapshot = replay(run.events[:cut])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(snapshot), type=RunState)
    assert decoded == snapshot
    for event in run.events[cut:]:
        decoded = evolve(decoded, event)
    assert decoded == run.now == replay(run.events)


# --- run index --------------------------------------------------------------------------------


def indexed(*runs: tuple[str, str, int, list[EventData]]) -> RunIndex:
    """An index fed each run's events: (run id, workflow, submission ms, later payloads)."""
    index = RunIndex()
    for run_id, workflow_name, submitted_ms, payloads in runs:
        data: list[EventData] = [RunSubmitted(workflow=workflow_name, digest="", definition="")]
        for seq, payload in enumerate([*data, *payloads], start=1):
            event = Envelope(
                event_id=f"{run_id}-{seq}",
                run_id=run_id,
                ts=submitted_ms + seq - 1,
                producer="test",
                data=payload,
                seq=seq,
            )
            index = evolve_index(index, event)
    return index


def test_the_index_follows_each_runs_status() -> None:
    index = indexed(
        ("r1", "etl", 100, [RunStarted(), RunCompleted(degraded=True)]),
        ("r2", "etl", 200, [RunStarted(), RunPaused()]),
        ("r3", "ml", 300, [RunPaused(), RunResumed()]),
        ("r4", "ml", 400, [RunStarted(), StepSkipped(step="a", reason="r", error=BOOM)]),
        ("r5", "ml", 500, [RunStarted(), RunFailed(error=BOOM), RunRetryRequested()]),
        ("r6", "etl", 600, [RunCancelled(), RunStarted()]),
    )
    entries = {entry.run_id: entry for entry in query(index)}
    assert {run_id: (e.status, e.degraded) for run_id, e in entries.items()} == {
        "r1": ("completed", True),
        "r2": ("paused", False),
        "r3": ("submitted", False),
        "r4": ("running", True),
        "r5": ("running", False),
        "r6": ("cancelled", False),
    }
    r1 = get_run(index, "r1")
    assert r1 is not None
    assert (r1.workflow, r1.submitted_ms, r1.updated_ms, r1.seq) == ("etl", 100, 102, 3)
    assert index.size == 6
    assert get_run(index, "nope") is None


def test_the_index_ignores_events_it_already_applied() -> None:
    index = indexed(("r1", "etl", 100, [RunStarted()]))
    replayed = Envelope(event_id="x", run_id="r1", ts=999, producer="t", data=RunCancelled(), seq=2)
    assert evolve_index(index, replayed) is index


def test_index_queries_filter_and_order_deterministically() -> None:
    index = indexed(
        ("b", "etl", 100, [RunStarted()]),
        ("a", "etl", 100, [RunStarted(), RunCompleted()]),
        ("c", "ml", 50, []),
        ("d", "etl", 300, [RunStarted()]),
    )

    def ids(**filters: Any) -> list[str]:
        return [entry.run_id for entry in query(index, **filters)]

    assert ids() == ["c", "a", "b", "d"]
    assert ids(workflow="etl") == ["a", "b", "d"]
    assert ids(status="running") == ["b", "d"]
    assert ids(since_ms=100, until_ms=300) == ["a", "b"]
    assert ids(newest_first=True, limit=2) == ["d", "b"]
    assert count_by_status(index) == {"completed": 1, "running": 2, "submitted": 1}
    assert count_by_status(index, workflow="ml") == {"submitted": 1}


def test_the_index_round_trips_through_msgpack() -> None:
    index = indexed(("r1", "etl", 100, [RunStarted()]), ("r2", "ml", 5, []))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(index), type=RunIndex) == index
