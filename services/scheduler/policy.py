"""Deterministic pieces of scheduling policy: retry delays with jitter, idempotency keys and
the errors the scheduler itself records."""

from __future__ import annotations

import hashlib
import math

from eventstore.events import ErrorInfo
from services.workflow.errors import ExpressionError
from services.workflow.model import LoopSpec, RetryPolicy


def _part(value: int | None) -> str:
    return "-" if value is None else str(value)


def idempotency_key(
    run_id: str,
    step: str,
    *,
    generation: int,
    item: int | None,
    iteration: int | None,
    fallback_index: int,
    attempt: int,
) -> str:
    """``run:generation:step:item:iteration:fallback:attempt`` (``-`` for no item/iteration).

    ``generation`` counts the run's retries, so an attempt re-run after a run retry gets a
    new key.
    """
    return ":".join(
        (run_id, str(generation), step, _part(item), _part(iteration), str(fallback_index),
         str(attempt))
    )  # fmt: skip


def jitter_fraction(
    run_id: str, step: str, item: int | None, iteration: int | None, attempt: int
) -> float:
    """A number in [0, 1) derived from the unit and attempt: jitter without randomness."""
    text = "\x1f".join((run_id, step, _part(item), _part(iteration), str(attempt)))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def retry_delay(policy: RetryPolicy, failed_attempt: int, fraction: float) -> float:
    """Seconds to wait after attempt ``failed_attempt`` failed.

    ``min(max_delay, initial_delay * backoff**(failed_attempt - 1))``, then scaled by
    ``1 + jitter * (2 * fraction - 1)``, never negative.
    """
    try:
        grown = policy.initial_delay * policy.backoff ** (failed_attempt - 1)
    except OverflowError:
        grown = math.inf
    base = min(policy.max_delay, grown)
    return max(0.0, base * (1.0 + policy.jitter * (2.0 * fraction - 1.0)))


def timeout_error(timeout_s: float, started: bool) -> ErrorInfo:
    """The error of a unit the scheduler timed out (retryable)."""
    if started:
        message = f"no result within the step timeout of {timeout_s:g}s"
    else:
        message = f"not started within the step timeout of {timeout_s:g}s plus the start grace"
    return ErrorInfo(type="StepTimeout", message=message, retryable=True)


def expression_error(exc: ExpressionError) -> ErrorInfo:
    """A run-time expression or template error: fails the step, never retried."""
    return ErrorInfo(type="ExpressionError", message=str(exc), retryable=False)


def not_a_list_error(source: str, value: object) -> ErrorInfo:
    """A ``for_each`` expression that gave something other than a list (never retried)."""
    kind = "null" if value is None else type(value).__name__
    message = f"for_each must give a list, {source!r} gave a {kind}"
    return ErrorInfo(type="ExpressionError", message=message, retryable=False)


def loop_exhausted_error(loop: LoopSpec) -> ErrorInfo:
    """A loop whose ``until`` stayed false for ``max_iterations`` iterations (never retried)."""
    message = f"until ({loop.until}) still false after {loop.max_iterations} iterations"
    return ErrorInfo(type="LoopExhausted", message=message, retryable=False)


def definition_error(problem: str) -> ErrorInfo:
    """A definition whose step graph cannot run."""
    return ErrorInfo(type="DefinitionError", message=problem, retryable=False)


def too_large_error(what: str, size: int, limit: int) -> ErrorInfo:
    """A step's rendered inputs or fanned-out items over what one event may hold: the step
    fails, never retried (the same outputs render the same way)."""
    message = (
        f"{what} are {size} bytes encoded, over the {limit} bytes an event leaves for them"
        " (max_event_bytes less room for the rest of the event)"
    )
    return ErrorInfo(type="ValueTooLarge", message=message, retryable=False)


def not_encodable_error(what: str, exc: Exception) -> ErrorInfo:
    """A step's rendered inputs or fanned-out items holding a value msgpack cannot carry (an
    integer beyond 64 bits): the step fails, never retried."""
    return ErrorInfo(type="ValueNotEncodable", message=f"{what}: {exc}", retryable=False)
