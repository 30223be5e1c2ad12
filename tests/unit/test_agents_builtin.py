"""The agent interface, the registry and the in-process built-in agents."""

from __future__ import annotations

import time

import anyio
import msgspec
import pytest

from eventstore.events import ErrorInfo, StepScheduled
from services.agents.base import (
    MAX_ERROR_MESSAGE,
    AgentContext,
    AgentError,
    AgentInputError,
    NoAgentContext,
    UnknownAgent,
    bound_context,
    current_context,
    error_info,
    parse_output,
)
from services.agents.builtin import EchoAgent, FlakyAgent, FlakyFailure, NoopAgent, SleepAgent
from services.agents.registry import AgentAlreadyRegistered, AgentRegistry, default_registry
from services.agents.webhook import HttpAgent
from services.workflow.model import BUILTIN_AGENTS

pytestmark = pytest.mark.anyio

CTX = AgentContext(run_id="run-1", step="build", attempt=1, idempotency_key="run-1/build/1")


async def test_default_registry_has_exactly_the_builtin_agents() -> None:
    registry = default_registry()
    try:
        assert registry.names() == BUILTIN_AGENTS
        for name in BUILTIN_AGENTS:
            agent = registry.get(name)
            assert agent.name == name
            assert agent.version
    finally:
        await registry.aclose()


async def test_registry_aclose_closes_the_http_clients() -> None:
    registry = default_registry()
    http = registry.get("http")
    assert isinstance(http, HttpAgent)
    assert not http.session.is_closed
    await registry.aclose()
    assert http.session.is_closed


def test_unknown_agent_is_a_non_retryable_error() -> None:
    with pytest.raises(UnknownAgent, match="'nope'") as caught:
        AgentRegistry([NoopAgent()]).get("nope")
    assert caught.value.error_type == "UnknownAgent"
    assert not caught.value.retryable


def test_registering_a_taken_name_fails() -> None:
    registry = AgentRegistry([EchoAgent()])
    with pytest.raises(AgentAlreadyRegistered, match="'echo'"):
        registry.register(EchoAgent())


async def test_noop_returns_none() -> None:
    assert await NoopAgent().run({}, CTX) is None


async def test_echo_returns_its_value_unchanged() -> None:
    value = {"a": [1, 2.5, None, "x"], "b": {"c": True}}
    assert await EchoAgent().run({"value": value}, CTX) == value


async def test_echo_without_value_names_the_missing_field() -> None:
    with pytest.raises(AgentInputError, match="value") as caught:
        await EchoAgent().run({}, CTX)
    assert not caught.value.retryable
    assert caught.value.error_type == "AgentInputError"


async def test_unknown_input_fields_are_rejected_by_name() -> None:
    with pytest.raises(AgentInputError, match="valeu"):
        await EchoAgent().run({"valeu": 1}, CTX)


async def test_sleep_reports_the_seconds_slept() -> None:
    assert await SleepAgent().run({"seconds": 0}, CTX) == {"slept": 0.0}
    assert await SleepAgent().run({"seconds": 0.01}, CTX) == {"slept": 0.01}


@pytest.mark.parametrize("seconds", ["soon", -1, None])
async def test_sleep_rejects_bad_seconds(seconds: object) -> None:
    with pytest.raises(AgentInputError, match="seconds"):
        await SleepAgent().run({"seconds": seconds}, CTX)


async def test_sleep_is_cancellable() -> None:
    started = time.monotonic()
    with anyio.move_on_after(0.05) as scope:
        await SleepAgent().run({"seconds": 30}, CTX)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 5


async def test_flaky_fails_the_planned_attempts_then_succeeds() -> None:
    agent = FlakyAgent()
    for attempt in (1, 2):
        with pytest.raises(FlakyFailure) as caught:
            await agent.run({"fail_times": 2}, msgspec.structs.replace(CTX, attempt=attempt))
        assert caught.value.retryable
        assert caught.value.error_type == "FlakyFailure"
    assert await agent.run({"fail_times": 2}, msgspec.structs.replace(CTX, attempt=3)) == {
        "attempt": 3
    }


async def test_flaky_with_no_planned_failures_succeeds_at_once() -> None:
    assert await FlakyAgent().run({"fail_times": 0}, CTX) == {"attempt": 1}


def test_error_info_of_an_agent_error_keeps_type_and_retryability() -> None:
    info = error_info(AgentError("ShellExit", "exit 3", retryable=False))
    assert info == ErrorInfo(type="ShellExit", message="exit 3", retryable=False)


def test_error_info_of_any_exception_is_retryable_and_named_by_its_type() -> None:
    assert error_info(KeyError("k")) == ErrorInfo(type="KeyError", message="'k'", retryable=True)
    assert error_info(RuntimeError()).message == "RuntimeError()"


def test_error_info_shortens_long_messages_keeping_start_and_end() -> None:
    info = error_info(ValueError("start " + "x" * 10_000 + " the cause"))
    assert len(info.message) <= MAX_ERROR_MESSAGE
    assert info.message.startswith("start x")
    assert info.message.endswith("x the cause")
    assert " ... " in info.message


def test_context_for_a_scheduled_step() -> None:
    scheduled = StepScheduled(
        step="fetch",
        attempt=2,
        agent="shell",
        timeout_s=5.0,
        item=3,
        iteration=1,
        fallback_index=1,
        idempotency_key="key-1",
    )
    assert AgentContext.for_step("run-9", scheduled) == AgentContext(
        run_id="run-9",
        step="fetch",
        attempt=2,
        idempotency_key="key-1",
        item=3,
        iteration=1,
        fallback_index=1,
        timeout_s=5.0,
    )


def test_current_context_is_bound_only_inside_a_call() -> None:
    with pytest.raises(NoAgentContext):
        current_context()
    with bound_context(CTX):
        assert current_context() is CTX
    with pytest.raises(NoAgentContext):
        current_context()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"n": 3}\n', {"n": 3}),
        (b" 42 ", 42),
        (b"  hello world\n", "hello world"),
        (b"", ""),
        (b"\xff\xfeoops", "\ufffd\ufffdoops"),
        ("[1, 2]", [1, 2]),
    ],
)
def test_parse_output_is_json_when_valid_else_stripped_text(
    raw: bytes | str, expected: object
) -> None:
    assert parse_output(raw) == expected
