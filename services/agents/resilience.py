"""Running agents safely: circuit breaker, bulkhead, result cache, and the executor that applies
them around every agent call.

:meth:`AgentExecutor.execute` does, in order: cache lookup (a hit runs nothing), the agent's
bulkhead (waits for a free slot), its circuit breaker (fails fast while open), the step timeout
(``StepTimeout``, retryable), and stores a success in the cache. Every failure leaves it as an
:class:`~services.agents.base.AgentError`.

Breakers are kept per agent and, for agents that call out (:class:`DownstreamAgent`), per
downstream service: one failing provider does not open the circuit of its fallback. Only
retryable failures (timeouts, refused connections, 5xx, ...) count; a non-retryable failure
shows the downstream answered and counts as a success. Bulkheads are per agent name.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from enum import StrEnum
from typing import Any, Final, cast

import anyio
import msgspec

from services.agents.base import (
    Agent,
    AgentContext,
    AgentError,
    DownstreamAgent,
    InlineAgent,
    UnknownAgent,
    as_agent_error,
)
from services.agents.registry import AgentRegistry, default_registry
from services.settings import RunnerSettings

Clock = Callable[[], float]

_CANONICAL_JSON: Final = msgspec.json.Encoder(order="sorted")
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder()


class CircuitOpen(AgentError):
    """The circuit breaker of an agent (or its downstream) is open: the call was not made."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(
            "CircuitOpen",
            f"circuit of {name} is open; next probe in {max(retry_in_s, 0.0):.1f}s",
            retryable=False,
        )


class BreakerState(StrEnum):
    """Where a circuit breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive counted failures; while open every
    call fails fast with :class:`CircuitOpen`; after ``reset_timeout_s`` it is half-open and
    lets one probe through: the probe's success closes it, its failure opens it again.

    Results of calls admitted before the circuit opened do not move an open or half-open
    breaker; only the probe does.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        clock: Clock = time.monotonic,
        *,
        name: str = "agent",
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.name = name
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose reset timeout has passed is half-open)."""
        if self._state is BreakerState.OPEN and self._reset_due():
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Counted failures since the last success."""
        return self._failures

    def guard(self) -> _Guard:
        """Admit one call (or raise :class:`CircuitOpen`) and record how the block ends: an
        exception that is retryable counts as a failure, anything else that returns or raises
        as a success; a cancelled call records nothing."""
        return _Guard(self)

    def _reset_due(self) -> bool:
        return self._clock() >= self._opened_at + self.reset_timeout_s

    def _admit(self) -> bool:
        """Let a call through; returns whether it is the half-open probe."""
        if self._state is BreakerState.OPEN:
            if not self._reset_due():
                raise CircuitOpen(self.name, self._opened_at + self.reset_timeout_s - self._clock())
            self._state = BreakerState.HALF_OPEN
        if self._state is BreakerState.HALF_OPEN:
            if self._probing:
                raise CircuitOpen(self.name, 0.0)
            self._probing = True
            return True
        return False

    def _record(self, *, probe: bool, failed: bool | None) -> None:
        if probe:
            self._probing = False
            if failed:
                self._open()
            elif failed is False:
                self._state = BreakerState.CLOSED
                self._failures = 0
        elif self._state is BreakerState.CLOSED and failed is not None:
            self._failures = self._failures + 1 if failed else 0
            if self._failures >= self.failure_threshold:
                self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()


class _Guard:
    """One call through a :class:`CircuitBreaker` (see :meth:`CircuitBreaker.guard`); a class
    rather than a generator context manager, for the reason :class:`_AgentErrors` gives."""

    __slots__ = ("_breaker", "_probe")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._probe = False

    def __enter__(self) -> None:
        self._probe = self._breaker._admit()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        failed: bool | None = None
        if exc is None:
            failed = False
        elif isinstance(exc, Exception):
            failed = as_agent_error(exc).retryable
        self._breaker._record(probe=self._probe, failed=failed)


class Bulkhead:
    """At most ``max_concurrent`` calls inside :meth:`slot` at once; others wait their turn."""

    def __init__(self, max_concurrent: int) -> None:
        self._limiter = anyio.CapacityLimiter(max_concurrent)

    @property
    def max_concurrent(self) -> int:
        """How many calls may be inside at once."""
        return int(self._limiter.total_tokens)

    @property
    def in_use(self) -> int:
        """How many calls are inside now."""
        return self._limiter.borrowed_tokens

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot and hold it for the block (re-entrant across nested calls)."""
        borrower = object()
        await self._limiter.acquire_on_behalf_of(borrower)
        try:
            yield
        finally:
            self._limiter.release_on_behalf_of(borrower)


def cache_key(agent_name: str, agent_version: str, inputs: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces) of agent, version and inputs."""
    return hashlib.sha256(_CANONICAL_JSON.encode([agent_name, agent_version, inputs])).hexdigest()


class CacheHit(msgspec.Struct, frozen=True):
    """A cached output (a fresh copy: changing it does not change the cache) and its key."""

    output: Any
    key: str


class ResultCache:
    """In-memory outputs by :func:`cache_key`, each with its own time to live; at most
    ``max_entries``, the least recently used evicted first. An output whose encoding is over
    ``max_entry_bytes`` is not kept (nor one msgpack cannot encode): a runner's cache would
    otherwise hold outputs too large for the log to record."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        *,
        max_entries: int = 1024,
        max_entry_bytes: int = 1024 * 1024,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, max_age_s: float | None = None) -> CacheHit | None:
        """The live entry for ``key``, or ``None``. An entry lives for the time to live it was
        put with, and a reader giving ``max_age_s`` takes only an entry younger than that too:
        a step with ``cache_ttl: 60`` never gets an output older than a minute, whichever step
        cached it. An expired entry is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, expires_at, encoded = entry
        now = self._clock()
        if now >= expires_at:
            del self._entries[key]
            return None
        if max_age_s is not None and now - stored_at >= max_age_s:
            return None
        self._entries.move_to_end(key)
        return CacheHit(_MSGPACK_DECODER.decode(encoded), key)

    def put(self, key: str, output: Any, ttl_s: float) -> None:
        """Keep ``output`` under ``key`` for ``ttl_s`` seconds (nothing is kept for
        ``ttl_s <= 0``, or for an output over ``max_entry_bytes`` or not encodable)."""
        if ttl_s <= 0:
            return
        try:
            encoded = _MSGPACK_ENCODER.encode(output)
        except (msgspec.EncodeError, OverflowError, TypeError):
            return
        if len(encoded) > self.max_entry_bytes:
            return
        now = self._clock()
        self._entries[key] = (now, now + ttl_s, encoded)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class BreakerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of every circuit breaker an executor creates."""

    failure_threshold: int = 5
    reset_timeout_s: float = 30.0


class BulkheadSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Concurrency limits by agent name; agents not listed get ``default_max_concurrent``
    (``None``: no limit)."""

    max_concurrent: dict[str, int] = {}
    default_max_concurrent: int | None = None


DEFAULT_BREAKER_SETTINGS: Final = BreakerSettings()
DEFAULT_BULKHEAD_SETTINGS: Final = BulkheadSettings()


class ExecutionResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one :meth:`AgentExecutor.execute` produced. ``cache_key`` is "" when the call was
    not cacheable (no positive ``cache_ttl_s``)."""

    output: Any
    cached: bool
    cache_key: str
    duration_ms: float


class AgentExecutor:
    """Runs registered agents behind cache, bulkhead, circuit breaker and timeout."""

    def __init__(
        self,
        registry: AgentRegistry,
        breaker_settings: BreakerSettings = DEFAULT_BREAKER_SETTINGS,
        bulkhead_settings: BulkheadSettings = DEFAULT_BULKHEAD_SETTINGS,
        cache: ResultCache | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.registry = registry
        self.breaker_settings = breaker_settings
        self.bulkhead_settings = bulkhead_settings
        self.cache = cache if cache is not None else ResultCache(clock)
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._downstream: dict[str, bool] = {}
        self._inline: dict[str, InlineAgent | None] = {}
        self._bulkheads: dict[str, Bulkhead] = {}

    @classmethod
    def from_settings(
        cls,
        settings: RunnerSettings,
        *,
        registry: AgentRegistry | None = None,
        clock: Clock = time.monotonic,
        max_output_bytes: int = 1024 * 1024,
    ) -> AgentExecutor:
        """An executor configured by the runner settings, over ``registry`` (default: the
        built-in agents, closed by :meth:`aclose`); outputs over ``max_output_bytes`` (the
        store's ``max_event_bytes``: they cannot be recorded) are not cached."""
        return cls(
            registry if registry is not None else default_registry(),
            BreakerSettings(
                failure_threshold=settings.breaker_failures,
                reset_timeout_s=settings.breaker_reset_s,
            ),
            BulkheadSettings(max_concurrent=dict(settings.bulkhead)),
            ResultCache(clock, max_entry_bytes=max_output_bytes),
            clock=clock,
        )

    async def execute(
        self,
        agent_name: str,
        inputs: dict[str, Any],
        ctx: AgentContext,
        cache_ttl_s: float | None = None,
        *,
        on_admitted: Callable[[], Awaitable[None]] | None = None,
    ) -> ExecutionResult:
        """Run ``agent_name`` on ``inputs``, or return its cached output; raises
        :class:`AgentError` (``UnknownAgent``, ``CircuitOpen``, ``StepTimeout``, or the
        agent's own).

        ``on_admitted`` is awaited once the call may go ahead, before the agent starts: after
        the wait for a bulkhead slot (the runner records the step's start there, so the step's
        timeout does not count time spent queued behind other calls of the agent), or on a
        cache hit. What it raises comes out as it is."""
        started = self._clock()
        agent = self.registry.get(agent_name)
        key = _cache_key(agent, inputs, cache_ttl_s)
        hit = self.cache.get(key, _ttl(cache_ttl_s)) if key else None
        if hit is not None:
            if on_admitted is not None:
                await on_admitted()
            return ExecutionResult(
                output=hit.output, cached=True, cache_key=key, duration_ms=self._ms(started)
            )
        async with self._slot(agent_name):
            if on_admitted is not None:
                await on_admitted()
            with self._breaker(agent, inputs).guard():
                output = await _run_with_timeout(agent, inputs, ctx)
        return self._done(started, key, output, cache_ttl_s)

    def inline_agent(self, agent_name: str) -> InlineAgent | None:
        """The agent called ``agent_name`` when it can run inline: an :class:`InlineAgent`
        with ``inline = True`` and a plain ``call``, that no bulkhead limits (a call that may
        have to wait for a slot goes through :meth:`execute`)."""
        if agent_name not in self._inline:
            try:
                agent = self.registry.get(agent_name)
            except UnknownAgent:
                return None
            # isinstance on a runtime Protocol inspects the class each time: once per agent.
            inline = (
                isinstance(agent, InlineAgent)
                and agent.inline is True
                and not inspect.iscoroutinefunction(agent.call)
                and self.bulkhead(agent_name) is None
            )
            self._inline[agent_name] = cast(InlineAgent, agent) if inline else None
        return self._inline[agent_name]

    def execute_inline(
        self,
        agent: InlineAgent,
        inputs: dict[str, Any],
        ctx: AgentContext,
        cache_ttl_s: float | None = None,
    ) -> ExecutionResult:
        """:meth:`execute` for an agent from :meth:`inline_agent`, synchronously: the same
        cache and circuit breaker; no timeout (the call is instant). The caller has checked the
        cache (:meth:`cached`)."""
        started = self._clock()
        key = _cache_key(agent, inputs, cache_ttl_s)
        with self._breaker(agent, inputs).guard(), _agent_errors:
            output = agent.call(inputs, ctx)
        return self._done(started, key, output, cache_ttl_s)

    def _done(
        self, started: float, key: str, output: Any, cache_ttl_s: float | None
    ) -> ExecutionResult:
        """The result of a call that ran: its output cached when the call is cacheable."""
        if key:
            self.cache.put(key, output, _ttl(cache_ttl_s))
        return ExecutionResult(
            output=output, cached=False, cache_key=key, duration_ms=self._ms(started)
        )

    def cached(
        self, agent_name: str, inputs: dict[str, Any], cache_ttl_s: float | None = None
    ) -> CacheHit | None:
        """The live cached output :meth:`execute` would return for this call, without running
        anything; ``None`` when there is none, the call is not cacheable (no positive
        ``cache_ttl_s``) or the agent is unknown."""
        if not _ttl(cache_ttl_s):
            return None
        try:
            agent = self.registry.get(agent_name)
        except UnknownAgent:
            return None
        return self.cache.get(_cache_key(agent, inputs, cache_ttl_s), _ttl(cache_ttl_s))

    async def aclose(self) -> None:
        """Close the agents of the registry (their HTTP clients)."""
        await self.registry.aclose()

    def breaker(self, agent_name: str, inputs: dict[str, Any]) -> CircuitBreaker:
        """The circuit breaker guarding this call: per agent, and per downstream service for
        agents that call out."""
        return self._breaker(self.registry.get(agent_name), inputs)

    def _breaker(self, agent: Agent, inputs: dict[str, Any]) -> CircuitBreaker:
        name = agent.name
        downstream = self._downstream.get(name)
        if downstream is None:
            # isinstance on a runtime Protocol inspects the class each time: once per agent.
            downstream = self._downstream[name] = isinstance(agent, DownstreamAgent)
        if downstream:
            name = f"{agent.name} {cast(DownstreamAgent, agent).downstream(inputs)}".rstrip()
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(
                self.breaker_settings.failure_threshold,
                self.breaker_settings.reset_timeout_s,
                self._clock,
                name=name,
            )
            self._breakers[name] = breaker
        return breaker

    def bulkhead(self, agent_name: str) -> Bulkhead | None:
        """The bulkhead of ``agent_name``, or ``None`` when it has no concurrency limit."""
        limit = self.bulkhead_settings.max_concurrent.get(
            agent_name, self.bulkhead_settings.default_max_concurrent
        )
        if limit is None:
            return None
        bulkhead = self._bulkheads.get(agent_name)
        if bulkhead is None:
            bulkhead = self._bulkheads[agent_name] = Bulkhead(limit)
        return bulkhead

    def _slot(self, agent_name: str) -> AbstractAsyncContextManager[None]:
        bulkhead = self.bulkhead(agent_name)
        return bulkhead.slot() if bulkhead is not None else nullcontext()

    def _ms(self, started: float) -> float:
        return (self._clock() - started) * 1000.0


def _ttl(cache_ttl_s: float | None) -> float:
    """The time to live to cache with; 0 for "do not cache"."""
    return cache_ttl_s if cache_ttl_s is not None and cache_ttl_s > 0 else 0.0


def _cache_key(agent: Agent, inputs: dict[str, Any], cache_ttl_s: float | None) -> str:
    """The cache key of this call, or "" when it is not cacheable."""
    return cache_key(agent.name, agent.version, inputs) if _ttl(cache_ttl_s) else ""


class _AgentErrors:
    """Any exception of an agent's own code comes out as an :class:`AgentError`.

    A class rather than a generator context manager: it wraps every step's call, and leaving
    a generator raises ``StopIteration`` inside it, an exception per call."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, AgentError):
            raise as_agent_error(exc) from exc


_agent_errors: Final = _AgentErrors()


async def _run_with_timeout(agent: Agent, inputs: dict[str, Any], ctx: AgentContext) -> Any:
    """Run the agent within ``ctx.timeout_s``; any exception comes out as an AgentError."""
    with anyio.move_on_after(ctx.timeout_s), _agent_errors:
        return await agent.run(inputs, ctx)
    raise AgentError(
        "StepTimeout",
        f"agent {agent.name!r} did not finish within {ctx.timeout_s}s",
        retryable=True,
    )
