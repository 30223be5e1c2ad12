"""Agents by name: the registry an executor looks agents up in, and the built-in set."""

from __future__ import annotations

from collections.abc import Iterable

import anyio

from eventstore.errors import FlowlogError
from services.agents.base import Agent, ClosableAgent, UnknownAgent
from services.agents.builtin import EchoAgent, FlakyAgent, NoopAgent, SleepAgent
from services.agents.llm import LlmAgent
from services.agents.pyfunc import PythonAgent
from services.agents.shell import ShellAgent
from services.agents.webhook import HttpAgent


class AgentAlreadyRegistered(FlowlogError):
    """An agent of that name is already in the registry."""


class AgentRegistry:
    """Maps agent names to agents; :meth:`aclose` releases the agents' resources."""

    def __init__(self, agents: Iterable[Agent] = ()) -> None:
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            self.register(agent)

    def register(self, agent: Agent) -> None:
        """Add ``agent`` under its name; raises :class:`AgentAlreadyRegistered` if taken."""
        if agent.name in self._agents:
            raise AgentAlreadyRegistered(f"an agent named {agent.name!r} is already registered")
        self._agents[agent.name] = agent

    def get(self, name: str) -> Agent:
        """The agent called ``name``; raises :class:`UnknownAgent`."""
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgent(name) from None

    def names(self) -> frozenset[str]:
        """The names of every registered agent."""
        return frozenset(self._agents)

    async def aclose(self) -> None:
        """Close every agent that holds resources (shielded from cancellation)."""
        with anyio.CancelScope(shield=True):
            for agent in self._agents.values():
                if isinstance(agent, ClosableAgent):
                    await agent.aclose()


def default_registry() -> AgentRegistry:
    """A registry of every built-in agent (``BUILTIN_AGENTS``)."""
    return AgentRegistry(
        [
            NoopAgent(),
            EchoAgent(),
            SleepAgent(),
            FlakyAgent(),
            ShellAgent(),
            PythonAgent(),
            HttpAgent(),
            LlmAgent(),
        ]
    )
