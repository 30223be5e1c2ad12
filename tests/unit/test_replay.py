"""Replay for audit, on histories recorded by the real services on the in-memory store:
state as of a point, verification against head/index/snapshot, divergence under a changed
definition, export and import, rebuild."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from support.processes import REPO
from support.waits import caught_up

from eventstore.events import Envelope
from eventstore.memory import MemoryStore
from eventstore.store import Snapshot, StoreConfig
from projections.metrics_model import decode_model
from projections.run_state import STATE_VERSION
from services import commands
from services.app import running
from services.export import import_events, read_export, run_events, write_export
from services.metrics_projector import SNAPSHOT_ID
from services.producer import Producer
from services.replay import (
    Difference,
    InvalidAsOf,
    diff,
    first_divergence,
    history_until,
    parse_as_of,
    rebuild_projections,
    state_at,
    verify_run_state,
)
from services.runs import snapshot_of
from services.settings import Settings
from services.workflow.loader import load_definition, parse_definition
from services.workflow.model import WorkflowDef

pytestmark = pytest.mark.anyio

EXAMPLES = REPO / "examples"


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    store: MemoryStore
    runs: dict[str, str]
    definitions: dict[str, WorkflowDef]

    async def history(self, workflow: str) -> list[Envelope]:
        return [e async for e in self.store.read_run(self.runs[workflow])]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so the recorded runs are recorded once for the module."""
    return "asyncio"


@pytest.fixture(scope="module")
async def recorded() -> AsyncIterator[Recorded]:
    """The retry and order-pipeline examples run to completion by the four services."""
    settings = Settings(http_port=0, redis_url=None)
    store = MemoryStore(StoreConfig(partitions=4))
    definitions = {
        name: load_definition(EXAMPLES / f"{name}.yaml") for name in ("retry", "order-pipeline")
    }
    runs: dict[str, str] = {}
    async with running(store, settings):
        for name, definition in definitions.items():
            submitted = await commands.submit(store, Producer("cli"), definition)
            runs[name] = submitted.run_id
        for run_id in runs.values():
            state = await commands.wait(store, run_id, timeout_s=30)
            assert state.status == "completed"
        await caught_up(store, "checkpointer", "metrics")
    try:
        yield Recorded(store=store, runs=runs, definitions=definitions)
    finally:
        await store.close()


def changed(definition: WorkflowDef, old: str, new: str) -> WorkflowDef:
    assert old in definition.body
    return parse_definition(definition.body.replace(old, new), format=definition.format)


def test_parse_as_of_tells_seq_from_time() -> None:
    assert parse_as_of("12") == (12, None)
    assert parse_as_of("1700000000000") == (None, 1_700_000_000_000)
    assert parse_as_of("2023-11-14T22:13:20Z") == (None, 1_700_000_000_000)
    assert parse_as_of("2023-11-14T22:13:20") == (None, 1_700_000_000_000)
    with pytest.raises(InvalidAsOf):
        parse_as_of("yesterday")


def test_diff_reports_leaf_paths() -> None:
    expected = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
    found = {"a": 1, "b": {"c": [1, 3], "d": "y"}, "e": True}
    assert diff(expected, found) == [
        Difference(path="b.c[1]", expected=2, found=3),
        Difference(path="b.d", expected="x", found="y"),
        Difference(path="e", expected=None, found=True),
    ]
    assert diff([1], [1, 2], "l") == [Difference(path="l", expected=[1], found=[1, 2])]


async def test_state_as_of_a_seq_and_a_time(recorded: Recorded) -> None:
    events = await recorded.history("retry")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    at_three = state_at(history_until(events, seq=3))
    assert at_three is not None
    assert at_three.seq == 3
    fourth = events[3]
    by_time = history_until(events, ts_ms=fourth.ts)
    assert by_time[-1].ts == fourth.ts
    assert all(e.ts <= fourth.ts for e in by_time)
    assert len(by_time) >= 4
    final = state_at(events)
    assert final is not None
    assert final.status == "completed"


async def test_verify_agrees_then_reports_a_bad_snapshot_field_by_field(
    recorded: Recorded,
) -> None:
    store = recorded.store
    run_id = recorded.runs["order-pipeline"]
    events = await recorded.history("order-pipeline")
    state, differences = await verify_run_state(store, run_id, events)
    assert differences == []
    assert state is not None
    assert state.status == "completed"
    # a forged snapshot of the run's last seq (the store keeps a later one over an earlier)
    wrong = msgspec.structs.replace(state, status="failed", inputs={**state.inputs, "forged": 1})
    await store.put_snapshot(snapshot_of(wrong))
    _, differences = await verify_run_state(store, run_id, events)
    assert {d.path for d in differences} == {
        "snapshot.state.status",
        "snapshot.state.inputs.forged",
    }
    [status] = [d for d in differences if d.path == "snapshot.state.status"]
    assert (status.expected, status.found) == ("completed", "failed")
    old = Snapshot(run_id=run_id, seq=5, version=STATE_VERSION - 1, state=b"old")
    await store.put_snapshot(old)
    _, differences = await verify_run_state(store, run_id, events)
    assert [d.path for d in differences] == ["snapshot.version"]


async def test_verify_reports_a_head_that_disagrees_with_the_stream(recorded: Recorded) -> None:
    run_id = recorded.runs["retry"]
    events = await recorded.history("retry")
    _, differences = await verify_run_state(recorded.store, run_id, events[:-1])
    assert {"head.seq", "head.hash"} <= {d.path for d in differences}


async def test_the_recorded_definition_decides_exactly_what_was_recorded(
    recorded: Recorded,
) -> None:
    for name, definition in recorded.definitions.items():
        assert first_divergence(definition, await recorded.history(name)) is None


async def test_changed_dependency_diverges_at_run_start(recorded: Recorded) -> None:
    events = await recorded.history("retry")
    dependent = (
        "depends_on: unreliable\n"
        '    with: {value: "succeeded on attempt ${{ steps.unreliable.output.attempt }}"}'
    )
    definition = changed(recorded.definitions["retry"], dependent, "with: {value: independent}")
    divergence = first_divergence(definition, events)
    assert divergence is not None
    started = next(e for e in events if e.type == "run_started")
    assert divergence.seq == started.seq
    assert list(divergence.recorded[0]["plan"]["after"]) == ["unreliable"]
    assert list(divergence.new[0]["plan"]["after"]) == []


async def test_changed_retry_policy_diverges_at_the_retry_it_no_longer_allows(
    recorded: Recorded,
) -> None:
    events = await recorded.history("retry")
    definition = changed(recorded.definitions["retry"], "max_attempts: 3", "max_attempts: 2")
    divergence = first_divergence(definition, events)
    assert divergence is not None
    retries = [e for e in events if e.type == "step_retry_scheduled"]
    assert len(retries) == 2
    assert divergence.seq == retries[1].seq
    assert divergence.recorded[0]["type"] == "step_retry_scheduled"
    assert divergence.recorded[0]["attempt"] == 3
    assert divergence.new[0]["type"] == "run_failed"


async def test_export_then_import_twice_adds_nothing_the_second_time(
    recorded: Recorded, tmp_path: Path
) -> None:
    file = tmp_path / "runs.jsonl.gz"
    count = await write_export(file, run_events(recorded.store, recorded.runs.values()))
    originals = [e for name in recorded.runs for e in await recorded.history(name)]
    assert count == len(originals)
    with gzip.open(file, "rb") as lines:
        first = msgspec.json.decode(lines.readline())
    assert list(first)[:5] == ["event_id", "run_id", "ts", "producer", "data"]
    assert first["v"] == 1
    assert first["seq"] == 1
    assert list(read_export(file)) == originals

    target = MemoryStore(StoreConfig(partitions=4))
    report = await import_events(target, read_export(file))
    assert (report.runs, report.appended, report.duplicate, report.refused) == (2, count, 0, {})
    again = await import_events(target, read_export(file))
    assert (again.appended, again.duplicate, again.refused) == (0, count, {})
    copied = [e for run_id in recorded.runs.values() async for e in target.read_run(run_id)]
    assert copied == originals
    for run_id in recorded.runs.values():
        events = [e async for e in target.read_run(run_id)]
        _, differences = await verify_run_state(target, run_id, events)
        assert differences == []


async def test_import_refuses_a_run_the_target_holds_differently(
    recorded: Recorded, tmp_path: Path
) -> None:
    file = tmp_path / "runs.jsonl"
    run_id = recorded.runs["retry"]
    await write_export(file, run_events(recorded.store, [run_id]))
    events = list(read_export(file))
    target = MemoryStore(StoreConfig(partitions=4))
    other = msgspec.structs.replace(events[0], event_id="another", seq=0)
    await target.append(run_id, [other])
    report = await import_events(target, events)
    assert report.appended == 0
    assert list(report.refused) == [run_id]
    assert [e.event_id async for e in target.read_run(run_id)] == ["another"]

    partial = MemoryStore(StoreConfig(partitions=4))
    await partial.append(run_id, [msgspec.structs.replace(e, seq=0) for e in events[:3]])
    report = await import_events(partial, events)
    assert (report.appended, report.duplicate, report.refused) == (len(events) - 3, 3, {})


async def test_export_since_keeps_whole_runs_submitted_from_then(recorded: Recorded) -> None:
    retry = await recorded.history("retry")
    pipeline = await recorded.history("order-pipeline")
    later = max(retry[0].ts, pipeline[0].ts)
    kept = [e async for e in run_events(recorded.store, recorded.runs.values(), since_ms=later)]
    assert {e.run_id for e in kept} <= set(recorded.runs.values())
    assert kept[0].seq == 1
    assert all(e.ts >= later for e in kept if e.seq == 1)


async def test_rebuild_folds_every_run_into_snapshots_and_the_metrics_model(
    recorded: Recorded,
) -> None:
    store = recorded.store
    report = await rebuild_projections(store)
    total = sum([len(await recorded.history(name)) for name in recorded.runs])
    assert (report.runs, report.events, report.by_status) == (2, total, {"completed": 2})
    assert report.events_per_s > 0
    model = await store.get_snapshot(SNAPSHOT_ID)
    assert model is not None
    assert decode_model(model.state).applied == total
    for name, run_id in recorded.runs.items():
        snapshot = await store.get_snapshot(run_id)
        assert snapshot is not None
        assert snapshot.seq == len(await recorded.history(name))
