"""Circuit breaker, bulkhead, result cache and the executor that applies them."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from services.agents.base import AgentContext, AgentError, UnknownAgent
from services.agents.builtin import EchoAgent, NoopAgent, SleepAgent
from services.agents.registry import AgentRegistry
from services.agents.resilience import (
    AgentExecutor,
    BreakerSettings,
    BreakerState,
    Bulkhead,
    BulkheadSettings,
    CircuitBreaker,
    CircuitOpen,
    ResultCache,
    cache_key,
)
from services.settings import RunnerSettings

pytestmark = pytest.mark.anyio

CTX = AgentContext(run_id="run-5", step="s", attempt=1, idempotency_key="run-5/s/1")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingAgent:
    """Returns how many times it has run; fails while ``failure`` is set."""

    name = "counting"
    version = "1"

    def __init__(self) -> None:
        self.calls = 0
        self.failure: Exception | None = None

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return {"call": self.calls, "inputs": inputs}


class GateAgent:
    """Holds every call until ``gate`` opens, recording how many are inside at once."""

    name = "gate"
    version = "1"

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.inside = 0
        self.most_inside = 0

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await self.gate.wait()
        finally:
            self.inside -= 1
        return None


RETRYABLE = AgentError("HttpServerError", "503", retryable=True)
NON_RETRYABLE = AgentError("HttpClientError", "404", retryable=False)


def _fail(breaker: CircuitBreaker, error: Exception = RETRYABLE) -> None:
    with pytest.raises(type(error)), breaker.guard():
        raise error


def _state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh (a call, so type checkers do not narrow it)."""
    return breaker.state


def _succeed(breaker: CircuitBreaker) -> None:
    with breaker.guard():
        pass


# --- circuit breaker -------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_retryable_failures_and_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock, name="http api")
    for _ in range(3):
        assert _state(breaker) is BreakerState.CLOSED
        _fail(breaker)
    assert _state(breaker) is BreakerState.OPEN
    ran = False
    with pytest.raises(CircuitOpen) as caught, breaker.guard():
        ran = True
    assert not ran
    assert caught.value.error_type == "CircuitOpen"
    assert not caught.value.retryable
    assert "http api" in caught.value.message


def test_a_success_resets_the_consecutive_failure_count() -> None:
    breaker = CircuitBreaker(2, 10.0, FakeClock())
    _fail(breaker)
    _succeed(breaker)
    _fail(breaker)
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 1


def test_non_retryable_failures_do_not_count() -> None:
    breaker = CircuitBreaker(2, 10.0, FakeClock())
    _fail(breaker)
    for _ in range(5):
        _fail(breaker, NON_RETRYABLE)
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_any_other_exception_counts_as_a_retryable_failure() -> None:
    breaker = CircuitBreaker(1, 10.0, FakeClock())
    _fail(breaker, ConnectionResetError("reset by peer"))
    assert _state(breaker) is BreakerState.OPEN


def test_half_open_after_the_reset_timeout_lets_one_probe_through_and_success_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    _fail(breaker)
    clock.advance(9.9)
    assert _state(breaker) is BreakerState.OPEN
    clock.advance(0.1)
    assert _state(breaker) is BreakerState.HALF_OPEN
    with breaker.guard(), pytest.raises(CircuitOpen), breaker.guard():
        pass
    assert _state(breaker) is BreakerState.CLOSED
    _succeed(breaker)


def test_a_failed_probe_opens_the_circuit_again_for_a_full_reset_timeout() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    _fail(breaker)
    clock.advance(10)
    _fail(breaker)
    assert _state(breaker) is BreakerState.OPEN
    clock.advance(9.9)
    with pytest.raises(CircuitOpen), breaker.guard():
        pass
    clock.advance(0.1)
    _succeed(breaker)
    assert _state(breaker) is BreakerState.CLOSED


def test_a_non_retryable_probe_failure_closes_the_circuit() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    _fail(breaker)
    clock.advance(10)
    _fail(breaker, NON_RETRYABLE)
    assert _state(breaker) is BreakerState.CLOSED


async def test_a_cancelled_probe_frees_the_probe_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    _fail(breaker)
    clock.advance(10)
    with anyio.CancelScope() as scope, breaker.guard():
        scope.cancel()
        await anyio.sleep_forever()
    assert _state(breaker) is BreakerState.HALF_OPEN
    _succeed(breaker)
    assert _state(breaker) is BreakerState.CLOSED


def _fail_late(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A call admitted while closed that fails 5 s after another call opened the circuit."""
    with breaker.guard():
        _fail(breaker)
        clock.advance(5)
        raise RETRYABLE


def test_late_results_of_calls_admitted_before_opening_do_not_move_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    with breaker.guard():
        _fail(breaker)
    assert _state(breaker) is BreakerState.OPEN
    breaker = CircuitBreaker(1, 10.0, clock)
    with pytest.raises(AgentError):
        _fail_late(breaker, clock)
    clock.advance(5)
    assert _state(breaker) is BreakerState.HALF_OPEN


# --- bulkhead --------------------------------------------------------------------------------


async def test_bulkhead_lets_at_most_max_concurrent_in() -> None:
    bulkhead = Bulkhead(2)
    gate = anyio.Event()
    inside = 0
    most_inside = 0

    async def call() -> None:
        nonlocal inside, most_inside
        async with bulkhead.slot():
            inside += 1
            most_inside = max(most_inside, inside)
            await gate.wait()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        assert inside == 2
        assert bulkhead.in_use == 2
        gate.set()
    assert most_inside == 2
    assert bulkhead.in_use == 0
    assert bulkhead.max_concurrent == 2


async def test_bulkhead_slots_nest_within_one_task() -> None:
    bulkhead = Bulkhead(2)
    async with bulkhead.slot(), bulkhead.slot():
        assert bulkhead.in_use == 2


# --- result cache ----------------------------------------------------------------------------


def test_cache_key_is_the_sha256_of_canonical_json() -> None:
    key = cache_key("echo", "1", {"b": 1, "a": {"y": 2, "x": [1, 2]}})
    assert key == cache_key("echo", "1", {"a": {"x": [1, 2], "y": 2}, "b": 1})
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert key != cache_key("echo", "2", {"b": 1, "a": {"y": 2, "x": [1, 2]}})
    assert key != cache_key("noop", "1", {"b": 1, "a": {"y": 2, "x": [1, 2]}})
    assert key != cache_key("echo", "1", {"b": 2, "a": {"y": 2, "x": [1, 2]}})


def test_cache_hit_then_expiry_with_the_entry_ttl() -> None:
    clock = FakeClock()
    cache = ResultCache(clock)
    assert cache.get("k") is None
    cache.put("k", {"v": [1]}, ttl_s=30)
    cache.put("short", "s", ttl_s=5)
    clock.advance(29.9)
    hit = cache.get("k")
    assert hit is not None
    assert hit.output == {"v": [1]}
    assert hit.key == "k"
    assert cache.get("short") is None
    clock.advance(0.1)
    assert cache.get("k") is None
    assert len(cache) == 0


def test_cache_keeps_nothing_for_a_non_positive_ttl() -> None:
    cache = ResultCache(FakeClock())
    cache.put("k", 1, ttl_s=0)
    cache.put("j", 1, ttl_s=-5)
    assert len(cache) == 0


def test_cache_evicts_the_least_recently_used_beyond_max_entries() -> None:
    cache = ResultCache(FakeClock(), max_entries=2)
    cache.put("a", 1, ttl_s=60)
    cache.put("b", 2, ttl_s=60)
    assert cache.get("a") is not None
    cache.put("c", 3, ttl_s=60)
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None


def test_cached_outputs_are_copies() -> None:
    cache = ResultCache(FakeClock())
    output = {"items": [1, 2]}
    cache.put("k", output, ttl_s=60)
    output["items"].append(3)
    first = cache.get("k")
    assert first is not None
    first.output["items"].append(4)
    second = cache.get("k")
    assert second is not None
    assert second.output == {"items": [1, 2]}


def test_a_reader_takes_only_an_entry_younger_than_its_own_max_age() -> None:
    clock = FakeClock()
    cache = ResultCache(clock)
    cache.put("k", "day-long", ttl_s=86_400)
    clock.advance(3_600)
    assert cache.get("k", max_age_s=60) is None
    hit = cache.get("k", max_age_s=7_200)
    assert hit is not None
    assert hit.output == "day-long"
    assert len(cache) == 1


def test_outputs_too_large_or_not_encodable_are_not_kept() -> None:
    cache = ResultCache(FakeClock(), max_entry_bytes=1024)
    cache.put("big", "x" * 2048, ttl_s=60)
    cache.put("huge", 2**64, ttl_s=60)
    cache.put("fits", "x" * 512, ttl_s=60)
    assert [key for key in ("big", "huge", "fits") if cache.get(key)] == ["fits"]


# --- executor --------------------------------------------------------------------------------


async def test_a_cache_hit_runs_nothing_until_the_ttl_expires() -> None:
    clock = FakeClock()
    agent = CountingAgent()
    executor = AgentExecutor(AgentRegistry([agent]), clock=clock)
    first = await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=60)
    assert (first.output["call"], first.cached) == (1, False)
    assert first.cache_key == cache_key("counting", "1", {"q": 1})
    clock.advance(59)
    second = await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=60)
    assert (second.output["call"], second.cached, second.cache_key) == (1, True, first.cache_key)
    assert agent.calls == 1
    other = await executor.execute("counting", {"q": 2}, CTX, cache_ttl_s=60)
    assert (other.output["call"], other.cached) == (2, False)
    clock.advance(1)
    third = await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=60)
    assert (third.output["call"], third.cached) == (3, False)


async def test_a_step_never_gets_an_output_older_than_its_own_cache_ttl() -> None:
    """Another step (or an older definition) cached the output for a day: a step asking for
    at most a minute runs the agent again."""
    clock = FakeClock()
    agent = CountingAgent()
    executor = AgentExecutor(AgentRegistry([agent]), clock=clock)
    await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=86_400)
    clock.advance(3_600)
    assert executor.cached("counting", {"q": 1}, 60) is None
    fresh = await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=60)
    assert (fresh.output["call"], fresh.cached) == (2, False)
    hit = await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=60)
    assert (hit.output["call"], hit.cached) == (2, True)


async def test_on_admitted_runs_once_the_bulkhead_has_a_slot() -> None:
    gate = anyio.Event()
    admitted: list[str] = []

    class Gated:
        name = "gated"
        version = "1"

        async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
            await gate.wait()
            return inputs["n"]

    executor = AgentExecutor(
        AgentRegistry([Gated()]), bulkhead_settings=BulkheadSettings(max_concurrent={"gated": 1})
    )

    async def call(name: str) -> None:
        async def on_admitted() -> None:
            admitted.append(name)

        await executor.execute("gated", {"n": name}, CTX, on_admitted=on_admitted)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(call, "second")
        await anyio.wait_all_tasks_blocked()
        assert admitted == ["first"]
        gate.set()
    assert admitted == ["first", "second"]


async def test_without_a_cache_ttl_every_call_runs() -> None:
    agent = CountingAgent()
    executor = AgentExecutor(AgentRegistry([agent]), clock=FakeClock())
    for ttl in (None, 0, -1):
        result = await executor.execute("counting", {}, CTX, cache_ttl_s=ttl)
        assert (result.cached, result.cache_key) == (False, "")
    assert agent.calls == 3
    assert executor.cached("counting", {}, None) is None


async def test_cached_looks_up_without_running() -> None:
    agent = CountingAgent()
    executor = AgentExecutor(AgentRegistry([agent]), clock=FakeClock())
    assert executor.cached("counting", {"q": 1}, 60) is None
    await executor.execute("counting", {"q": 1}, CTX, cache_ttl_s=60)
    hit = executor.cached("counting", {"q": 1}, 60)
    assert hit is not None
    assert hit.output["call"] == 1
    assert hit.key == cache_key("counting", "1", {"q": 1})
    assert executor.cached("no-such-agent", {"q": 1}, 60) is None
    assert agent.calls == 1


async def test_failures_are_not_cached() -> None:
    agent = CountingAgent()
    agent.failure = RETRYABLE
    executor = AgentExecutor(AgentRegistry([agent]), clock=FakeClock())
    with pytest.raises(AgentError):
        await executor.execute("counting", {}, CTX, cache_ttl_s=60)
    agent.failure = None
    result = await executor.execute("counting", {}, CTX, cache_ttl_s=60)
    assert (result.output["call"], result.cached) == (2, False)


async def test_duration_is_measured_with_the_clock() -> None:
    clock = FakeClock()

    class Slow(CountingAgent):
        async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
            clock.advance(0.25)
            return await super().run(inputs, ctx)

    executor = AgentExecutor(AgentRegistry([Slow()]), clock=clock)
    result = await executor.execute("counting", {}, CTX)
    assert result.duration_ms == pytest.approx(250.0)


async def test_a_step_timeout_is_a_retryable_step_timeout() -> None:
    executor = AgentExecutor(AgentRegistry([SleepAgent()]))
    timed = AgentContext(run_id="r", step="s", attempt=1, idempotency_key="k", timeout_s=0.05)
    with pytest.raises(AgentError) as caught:
        await executor.execute("sleep", {"seconds": 30}, timed)
    assert caught.value.error_type == "StepTimeout"
    assert caught.value.retryable
    assert "'sleep'" in caught.value.message


async def test_an_agent_finishing_within_its_timeout_succeeds() -> None:
    executor = AgentExecutor(AgentRegistry([EchoAgent()]))
    timed = AgentContext(run_id="r", step="s", attempt=1, idempotency_key="k", timeout_s=5)
    assert (await executor.execute("echo", {"value": 1}, timed)).output == 1


async def test_other_exceptions_come_out_as_agent_errors() -> None:
    agent = CountingAgent()
    agent.failure = KeyError("customer")
    executor = AgentExecutor(AgentRegistry([agent]))
    with pytest.raises(AgentError) as caught:
        await executor.execute("counting", {}, CTX)
    assert (caught.value.error_type, caught.value.retryable) == ("KeyError", True)
    assert isinstance(caught.value.__cause__, KeyError)


async def test_an_unknown_agent_is_reported() -> None:
    with pytest.raises(UnknownAgent):
        await AgentExecutor(AgentRegistry()).execute("nope", {}, CTX)


async def test_the_breaker_opens_fails_fast_and_probes_after_the_reset_timeout() -> None:
    clock = FakeClock()
    agent = CountingAgent()
    agent.failure = RETRYABLE
    executor = AgentExecutor(
        AgentRegistry([agent]),
        BreakerSettings(failure_threshold=2, reset_timeout_s=30),
        clock=clock,
    )
    for _ in range(2):
        with pytest.raises(AgentError, match="503"):
            await executor.execute("counting", {}, CTX)
    with pytest.raises(CircuitOpen):
        await executor.execute("counting", {}, CTX)
    assert agent.calls == 2
    assert _state(executor.breaker("counting", {})) is BreakerState.OPEN
    clock.advance(30)
    agent.failure = None
    assert (await executor.execute("counting", {}, CTX)).output["call"] == 3
    assert _state(executor.breaker("counting", {})) is BreakerState.CLOSED


async def test_the_bulkhead_limits_concurrent_calls_of_one_agent() -> None:
    gate = GateAgent()
    executor = AgentExecutor(
        AgentRegistry([gate, EchoAgent()]),
        bulkhead_settings=BulkheadSettings(max_concurrent={"gate": 2}),
    )
    assert executor.bulkhead("echo") is None
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(executor.execute, "gate", {}, CTX)
        await anyio.wait_all_tasks_blocked()
        assert gate.inside == 2
        assert (await executor.execute("echo", {"value": "not held up"}, CTX)).output
        gate.gate.set()
    assert gate.most_inside == 2


async def test_a_default_bulkhead_applies_to_unlisted_agents() -> None:
    executor = AgentExecutor(
        AgentRegistry([EchoAgent()]),
        bulkhead_settings=BulkheadSettings(max_concurrent={"http": 4}, default_max_concurrent=3),
    )
    bulkhead = executor.bulkhead("echo")
    assert bulkhead is not None
    assert bulkhead.max_concurrent == 3
    assert executor.bulkhead("echo") is bulkhead


async def test_executor_from_runner_settings() -> None:
    settings = RunnerSettings(breaker_failures=7, breaker_reset_s=12.5, bulkhead={"llm": 2})
    executor = AgentExecutor.from_settings(settings)
    try:
        assert executor.breaker_settings == BreakerSettings(
            failure_threshold=7, reset_timeout_s=12.5
        )
        bulkhead = executor.bulkhead("llm")
        assert bulkhead is not None
        assert bulkhead.max_concurrent == 2
        assert executor.bulkhead("shell") is None
        assert "shell" in executor.registry.names()
    finally:
        await executor.aclose()


# --- inline calls ------------------------------------------------------------------------------


class CountingInlineAgent(CountingAgent):
    """:class:`CountingAgent` that may run inline (``call`` does the work)."""

    name = "counting-inline"
    inline = True

    def call(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return {"call": self.calls, "inputs": inputs}

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        return self.call(inputs, ctx)


class NotOptedIn(CountingInlineAgent):
    name = "not-opted-in"
    inline = False


class AsyncCall(CountingInlineAgent):
    name = "async-call"

    async def call(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        return None


def test_only_inline_agents_without_a_bulkhead_run_inline() -> None:
    inline = CountingInlineAgent()
    executor = AgentExecutor(
        AgentRegistry(
            [
                inline,
                CountingAgent(),
                EchoAgent(),
                NoopAgent(),
                SleepAgent(),
                NotOptedIn(),
                AsyncCall(),
            ]
        ),
        bulkhead_settings=BulkheadSettings(max_concurrent={"echo": 2}),
    )
    assert executor.inline_agent("not-opted-in") is None
    assert executor.inline_agent("async-call") is None
    assert executor.inline_agent("counting-inline") is inline
    noop = executor.inline_agent("noop")
    assert noop is not None
    assert noop.name == "noop"
    assert executor.inline_agent("echo") is None  # it may have to wait for a bulkhead slot
    assert executor.inline_agent("counting") is None
    assert executor.inline_agent("sleep") is None
    assert executor.inline_agent("no-such-agent") is None


def test_an_inline_call_is_cached_like_an_executed_one() -> None:
    clock = FakeClock()
    agent = CountingInlineAgent()
    executor = AgentExecutor(AgentRegistry([agent]), clock=clock)
    result = executor.execute_inline(agent, {"q": 1}, CTX, cache_ttl_s=60)
    assert (result.output["call"], result.cached) == (1, False)
    assert result.cache_key == cache_key("counting-inline", "1", {"q": 1})
    hit = executor.cached("counting-inline", {"q": 1}, 60)
    assert hit is not None
    assert hit.output == result.output
    uncached = executor.execute_inline(agent, {"q": 2}, CTX)
    assert (uncached.output["call"], uncached.cache_key) == (2, "")


def test_inline_failures_are_agent_errors_and_count_on_the_breaker() -> None:
    clock = FakeClock()
    agent = CountingInlineAgent()
    executor = AgentExecutor(
        AgentRegistry([agent]),
        BreakerSettings(failure_threshold=2, reset_timeout_s=30),
        clock=clock,
    )
    agent.failure = KeyError("customer")
    for _ in range(2):
        with pytest.raises(AgentError) as caught:
            executor.execute_inline(agent, {}, CTX, cache_ttl_s=60)
        assert (caught.value.error_type, caught.value.retryable) == ("KeyError", True)
    assert executor.cached("counting-inline", {}, 60) is None
    with pytest.raises(CircuitOpen):
        executor.execute_inline(agent, {}, CTX)
    assert agent.calls == 2
    with pytest.raises(AgentError) as bad:
        executor.execute_inline(EchoAgent(), {"valu": 1}, CTX)
    assert (bad.value.error_type, bad.value.retryable) == ("AgentInputError", False)
