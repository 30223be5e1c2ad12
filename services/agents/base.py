"""What every agent shares: the call context, the ``Agent`` protocol and the agent error tree.

An agent turns ``inputs`` (the rendered ``with`` of a step) into a JSON-able output. Failures are
:class:`AgentError` with an ``error_type`` and a ``retryable`` flag; the runner records them as
:class:`~eventstore.events.ErrorInfo` (see :func:`error_info`).

The context of the call in progress is also available to code running inside an agent through
:func:`current_context` (a context variable, so it follows tasks and worker threads).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import msgspec

from eventstore.errors import FlowlogError
from eventstore.events import ErrorInfo, StepScheduled

#: Error messages recorded in events are cut to this many characters (middle dropped).
MAX_ERROR_MESSAGE: Final = 2000
_CUT: Final = " ... "

_InputsT = TypeVar("_InputsT", bound=msgspec.Struct)
_JSON_DECODER: Final = msgspec.json.Decoder()


class AgentContext(msgspec.Struct, frozen=True, kw_only=True):
    """Which unit of work an agent call is for, and how long it may take.

    ``idempotency_key`` is stable for one attempt of one unit: an agent passes it to whatever it
    calls so a repeated delivery of the same attempt can be recognised downstream.
    """

    run_id: str
    step: str
    attempt: int
    idempotency_key: str
    item: int | None = None
    iteration: int | None = None
    fallback_index: int = 0
    timeout_s: float | None = None

    @classmethod
    def for_step(cls, run_id: str, scheduled: StepScheduled) -> AgentContext:
        """The context of the attempt a ``StepScheduled`` event asks for."""
        return cls(
            run_id=run_id,
            step=scheduled.step,
            attempt=scheduled.attempt,
            idempotency_key=scheduled.idempotency_key,
            item=scheduled.item,
            iteration=scheduled.iteration,
            fallback_index=scheduled.fallback_index,
            timeout_s=scheduled.timeout_s,
        )


class Agent(Protocol):
    """Something that does the work of a step. ``version`` is part of every cache key."""

    name: str
    version: str

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Do the work and return a JSON-able output, or raise :class:`AgentError`."""
        ...


@runtime_checkable
class InlineAgent(Agent, Protocol):
    """An agent whose work is a pure, instant computation in this process (no I/O, no waiting).

    The runner calls :meth:`call` as it reads the step, without a worker, a timeout or a slot,
    and appends ``step_started`` together with the outcome in one append, as a local activity
    is recorded. An agent opts in with ``inline = True`` and a plain (not ``async``) ``call``;
    anything slow in ``call`` holds up the runner's whole event loop. ``run`` must do the same
    as ``call``.
    """

    inline: bool

    def call(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Do the work at once and return a JSON-able output, or raise :class:`AgentError`."""
        ...


@runtime_checkable
class DownstreamAgent(Protocol):
    """An agent that calls a service outside the process, named per call.

    The executor keeps one circuit breaker per agent and downstream, so a failing endpoint does
    not stop calls (a fallback provider, say) to another one.
    """

    def downstream(self, inputs: dict[str, Any]) -> str:
        """The service these inputs call (scheme, host and port); never raises."""
        ...


@runtime_checkable
class ClosableAgent(Protocol):
    """An agent that holds resources (connections) to release at shutdown."""

    async def aclose(self) -> None:
        """Release the agent's resources."""
        ...


class AgentError(FlowlogError):
    """An agent call failed. ``error_type`` names the condition; ``retryable`` says if a later
    attempt may succeed."""

    def __init__(self, error_type: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable

    def to_error_info(self) -> ErrorInfo:
        """This error as recorded in a ``StepFailed`` event."""
        return ErrorInfo(
            type=self.error_type, message=_shorten(self.message), retryable=self.retryable
        )


class AgentInputError(AgentError):
    """The inputs of a step are missing, ill-typed or inconsistent; the message names the
    field. Never retryable: the same inputs fail the same way."""

    def __init__(self, message: str) -> None:
        super().__init__("AgentInputError", message, retryable=False)


class UnknownAgent(AgentError):
    """No agent of that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__("UnknownAgent", f"no agent named {name!r}", retryable=False)
        self.name = name


class NoAgentContext(FlowlogError):
    """:func:`current_context` was called outside an agent call."""


def as_agent_error(exc: BaseException) -> AgentError:
    """``exc`` as an :class:`AgentError`; any other exception is retryable and keeps its type
    name (a workflow's ``retry.non_retryable`` can still list it)."""
    if isinstance(exc, AgentError):
        return exc
    return AgentError(type(exc).__name__, str(exc) or repr(exc), retryable=True)


def error_info(exc: BaseException) -> ErrorInfo:
    """Any exception as the :class:`ErrorInfo` recorded in events."""
    return as_agent_error(exc).to_error_info()


def parse_inputs(agent: str, inputs: dict[str, Any], schema: type[_InputsT]) -> _InputsT:
    """``inputs`` checked against ``schema`` (a Struct); raises :class:`AgentInputError`
    naming the field that is missing, ill-typed or unknown."""
    try:
        return msgspec.convert(inputs, schema)
    except msgspec.ValidationError as exc:
        raise AgentInputError(f"bad inputs for agent {agent!r}: {exc}") from exc


def parse_output(raw: bytes | str) -> Any:
    """Text output of a process or a web call: its JSON value when it is valid JSON, else the
    text, stripped."""
    try:
        return _JSON_DECODER.decode(raw)
    except msgspec.DecodeError:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return text.strip()


def _shorten(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """``text`` within ``limit`` characters, keeping its start (what failed) and its end (often
    the final cause)."""
    if len(text) <= limit:
        return text
    keep = (limit - len(_CUT)) // 2
    return text[:keep] + _CUT + text[-keep:]


_CURRENT: Final[contextvars.ContextVar[AgentContext]] = contextvars.ContextVar(
    "flowlog_agent_context"
)


def current_context() -> AgentContext:
    """The context of the agent call this code runs in; raises :class:`NoAgentContext`
    outside one."""
    try:
        return _CURRENT.get()
    except LookupError:
        raise NoAgentContext("current_context() called outside an agent call") from None


@contextmanager
def bound_context(ctx: AgentContext) -> Iterator[None]:
    """Make ``ctx`` the :func:`current_context` for the duration of the block."""
    token = _CURRENT.set(ctx)
    try:
        yield
    finally:
        _CURRENT.reset(token)
