"""The ``python`` agent: calls a Python function in the runner's process.

Inputs: ``function`` (``"package.module:attr"``; ``attr`` may be dotted, ``Class.method``) and
``args`` (a mapping passed as keyword arguments). A coroutine function is awaited (so is an
awaitable a plain callable returns); a plain function runs in a worker thread
(``anyio.to_thread.run_sync``). A thread cannot be stopped: on timeout or cancellation the call
returns at once and the thread finishes on its own, its result discarded.

The idempotency key reaches an in-process function in two ways, because an environment variable
cannot differ per call inside one shared process:

- :func:`services.agents.base.current_context` returns the current :class:`AgentContext`
  (a context variable, copied into the worker thread), whose ``idempotency_key`` it carries;
- a function whose signature declares an ``idempotency_key`` parameter receives it as that
  keyword argument.

The return value is converted to JSON values (as ``msgspec.json`` encodes Structs,
dataclasses, sets, datetimes...; map keys become strings, NaN and infinities null), the values
every other agent's output has: the log then holds what its JSON export gives back. A function
that cannot be imported, or ``args`` that do not fit its signature, are non-retryable
:class:`AgentInputError`. Modules are imported in a worker thread, so a slow first import does
not stall the runner's other work.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any, Final

import anyio.to_thread
import msgspec

from services.agents.base import (
    AgentContext,
    AgentError,
    AgentInputError,
    bound_context,
    parse_inputs,
)

#: The keyword argument that carries the idempotency key into functions that declare it.
IDEMPOTENCY_PARAMETER: Final = "idempotency_key"
_JSON_ENCODER: Final = msgspec.json.Encoder()
_JSON_DECODER: Final = msgspec.json.Decoder()


class _PythonInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    function: str
    args: dict[str, Any] = {}


class PythonAgent:
    """Calls ``function`` with ``args`` as keyword arguments."""

    name = "python"
    version = "1"

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Import the function, call it, return its result as JSON-able builtins."""
        spec = parse_inputs(self.name, inputs, _PythonInputs)
        function = await anyio.to_thread.run_sync(_resolve_function, spec.function)
        kwargs = _keyword_arguments(function, spec.function, spec.args, ctx)
        with bound_context(ctx):
            try:
                if inspect.iscoroutinefunction(function):
                    result = await function(**kwargs)
                else:
                    result = await anyio.to_thread.run_sync(
                        functools.partial(function, **kwargs), abandon_on_cancel=True
                    )
                    if inspect.isawaitable(result):
                        result = await result
            except SystemExit as exc:
                # argparse and CLI entry points exit on bad arguments: that fails the step,
                # not the runner (the same arguments exit the same way: not retryable)
                raise AgentError(
                    "SystemExit", f"{spec.function} called sys.exit({exc.code!r})", retryable=False
                ) from exc
        try:
            return _JSON_DECODER.decode(_JSON_ENCODER.encode(result))
        except (TypeError, msgspec.EncodeError) as exc:
            raise AgentError(
                "AgentOutputError",
                f"{spec.function} returned a value that is not JSON-able: {exc}",
                retryable=False,
            ) from exc


def _resolve_function(path: str) -> Callable[..., Any]:
    """The callable named by ``"module:attr"``; raises :class:`AgentInputError` when it cannot
    be imported or is not callable."""
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise AgentInputError(
            f"bad inputs for agent 'python': function {path!r} is not 'module:attr'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise AgentInputError(
            f"bad inputs for agent 'python': function {path!r}: cannot import"
            f" {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError as exc:
            raise AgentInputError(
                f"bad inputs for agent 'python': function {path!r}: {module_name!r} has no"
                f" attribute {attr_path!r}"
            ) from exc
    if not callable(target):
        raise AgentInputError(f"bad inputs for agent 'python': function {path!r} is not callable")
    return target  # type: ignore[no-any-return]


def _keyword_arguments(
    function: Callable[..., Any], path: str, args: dict[str, Any], ctx: AgentContext
) -> dict[str, Any]:
    """``args``, plus the idempotency key when the function declares that parameter; checked
    against the signature when it can be read."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return args
    kwargs = dict(args)
    if IDEMPOTENCY_PARAMETER in signature.parameters:
        if IDEMPOTENCY_PARAMETER in args:
            raise AgentInputError(
                f"bad inputs for agent 'python': args.{IDEMPOTENCY_PARAMETER} is set by flowlog"
            )
        kwargs[IDEMPOTENCY_PARAMETER] = ctx.idempotency_key
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise AgentInputError(
            f"bad inputs for agent 'python': args do not fit {path}: {exc}"
        ) from exc
    return kwargs
