"""The in-process built-in agents: ``noop``, ``echo``, ``sleep`` and ``flaky``."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec

from services.agents.base import AgentContext, AgentError, AgentInputError, parse_inputs


class NoopAgent:
    """Does nothing; returns ``None``. Inline (:class:`~services.agents.base.InlineAgent`)."""

    name = "noop"
    version = "1"
    inline = True

    def call(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Return ``None``."""
        return None

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Return ``None``."""
        return self.call(inputs, ctx)


class _EchoInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    value: Any


class EchoAgent:
    """Returns its ``value`` input unchanged. Inline
    (:class:`~services.agents.base.InlineAgent`)."""

    name = "echo"
    version = "1"
    inline = True

    def call(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Return ``inputs["value"]``."""
        return parse_inputs(self.name, inputs, _EchoInputs).value

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Return ``inputs["value"]``."""
        return self.call(inputs, ctx)


class _SleepInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seconds: float


class SleepAgent:
    """Sleeps ``seconds`` (cancellable) and returns ``{"slept": seconds}``."""

    name = "sleep"
    version = "1"

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Sleep, then report how long."""
        seconds = parse_inputs(self.name, inputs, _SleepInputs).seconds
        if seconds < 0:
            raise AgentInputError(f"bad inputs for agent 'sleep': seconds is negative ({seconds})")
        await anyio.sleep(seconds)
        return {"slept": seconds}


class FlakyFailure(AgentError):
    """A planned, retryable failure of the ``flaky`` agent."""

    def __init__(self, attempt: int, fail_times: int) -> None:
        super().__init__(
            "FlakyFailure",
            f"planned failure of attempt {attempt} (fails the first {fail_times})",
            retryable=True,
        )


class _FlakyInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    fail_times: int = 1


class FlakyAgent:
    """Fails attempts ``1..fail_times`` with :class:`FlakyFailure`, then returns
    ``{"attempt": n}``. It decides from ``ctx.attempt`` alone, so every process agrees."""

    name = "flaky"
    version = "1"

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Fail or succeed according to the attempt number."""
        fail_times = parse_inputs(self.name, inputs, _FlakyInputs).fail_times
        if ctx.attempt <= fail_times:
            raise FlakyFailure(ctx.attempt, fail_times)
        return {"attempt": ctx.attempt}
