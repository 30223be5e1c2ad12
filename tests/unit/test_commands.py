"""User commands as appends: idempotent submission and guarded run controls."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventstore.memory import MemoryStore
from eventstore.store import StoreConfig
from services import commands
from services.producer import Producer
from services.workflow.loader import load_definition, parse_definition

pytestmark = pytest.mark.anyio

DEFINITION = parse_definition(
    "name: one\ninputs: {n: 1}\nsteps:\n  - {id: a, agent: echo, with: {value: 1}}\n"
)


async def test_same_idempotency_key_returns_the_same_run_and_appends_nothing() -> None:
    store = MemoryStore()
    producer = Producer("cli")
    first = await commands.submit(store, producer, DEFINITION, idempotency_key="order-7")
    again = await commands.submit(store, producer, DEFINITION, idempotency_key="order-7")
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.run_id == first.run_id
    assert [e.type async for e in store.read_run(first.run_id)] == ["run_submitted"]
    other = await commands.submit(store, producer, DEFINITION, idempotency_key="order-8")
    assert other.run_id != first.run_id
    await store.close()


async def test_reusing_a_key_with_other_inputs_is_refused() -> None:
    store = MemoryStore()
    producer = Producer("cli")
    await commands.submit(store, producer, DEFINITION, {"n": 1}, idempotency_key="k")
    with pytest.raises(commands.IdempotencyKeyReused, match="'k'"):
        await commands.submit(store, producer, DEFINITION, {"n": 2}, idempotency_key="k")
    await store.close()


async def test_a_key_holds_past_the_dedup_window_for_as_long_as_the_run_is_kept() -> None:
    """The dedup record of the submission expires after a day, the run after a week: a repeat
    in between must still return the run, not append a second submission to it."""
    now = [1_000_000]
    store = MemoryStore(StoreConfig(dedup_ttl_ms=60_000), clock_ms=lambda: now[0])
    producer = Producer("cli")
    first = await commands.submit(store, producer, DEFINITION, idempotency_key="order-7")
    now[0] += 120_000
    again = await commands.submit(store, producer, DEFINITION, idempotency_key="order-7")
    assert (again.run_id, again.duplicate) == (first.run_id, True)
    assert [e.type async for e in store.read_run(first.run_id)] == ["run_submitted"]
    with pytest.raises(commands.IdempotencyKeyReused):
        await commands.submit(store, producer, DEFINITION, {"n": 2}, idempotency_key="order-7")
    await store.close()


async def test_the_same_submission_in_another_order_or_from_another_path_is_a_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "wf.yaml").write_text("name: wf\nsteps:\n  - {id: a, agent: echo}\n")
    monkeypatch.chdir(tmp_path)
    relative, absolute = load_definition(Path("wf.yaml")), load_definition(tmp_path / "wf.yaml")
    store = MemoryStore()
    producer = Producer("cli")
    first = await commands.submit(store, producer, relative, {"a": 1, "b": 2}, idempotency_key="k")
    again = await commands.submit(store, producer, absolute, {"b": 2, "a": 1}, idempotency_key="k")
    assert (again.run_id, again.duplicate) == (first.run_id, True)
    assert [e.type async for e in store.read_run(first.run_id)] == ["run_submitted"]
    await store.close()


async def test_controls_refuse_transitions_the_run_does_not_allow() -> None:
    store = MemoryStore()
    producer = Producer("cli")
    run = await commands.submit(store, producer, DEFINITION)
    with pytest.raises(commands.InvalidTransition, match="cannot resume"):
        await commands.resume(store, producer, run.run_id)
    with pytest.raises(commands.InvalidTransition, match="cannot retry"):
        await commands.retry(store, producer, run.run_id)
    with pytest.raises(commands.RunNotFound):
        await commands.pause(store, producer, "run-missing")
    await commands.pause(store, producer, run.run_id)
    assert (await commands.load_run(store, run.run_id)).status == "paused"
    await store.close()


async def test_a_wait_that_runs_out_says_which_run_and_where_it_stands() -> None:
    """No scheduler runs here: the run stays submitted, and the bounded wait ends with a
    flowlog error (the CLI reports it cleanly) rather than a bare TimeoutError."""
    store = MemoryStore()
    run = await commands.submit(store, Producer("test"), DEFINITION)
    with pytest.raises(commands.WaitTimeout, match=f"run {run.run_id} did not finish") as raised:
        await commands.wait(store, run.run_id, timeout_s=0.1)
    assert "(it is submitted)" in str(raised.value)
    await store.close()
