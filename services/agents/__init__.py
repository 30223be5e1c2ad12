"""Agents: what steps run (built-ins, shell, python, http, llm) and the executor that runs them
behind cache, bulkhead, circuit breaker and timeout."""

from services.agents.base import (
    Agent,
    AgentContext,
    AgentError,
    AgentInputError,
    UnknownAgent,
    current_context,
    error_info,
)
from services.agents.registry import AgentRegistry, default_registry
from services.agents.resilience import (
    AgentExecutor,
    BreakerSettings,
    BulkheadSettings,
    CircuitOpen,
    ExecutionResult,
    ResultCache,
)

__all__ = [
    "Agent",
    "AgentContext",
    "AgentError",
    "AgentExecutor",
    "AgentInputError",
    "AgentRegistry",
    "BreakerSettings",
    "BulkheadSettings",
    "CircuitOpen",
    "ExecutionResult",
    "ResultCache",
    "UnknownAgent",
    "current_context",
    "default_registry",
    "error_info",
]
