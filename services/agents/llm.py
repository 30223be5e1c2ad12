"""The ``llm`` agent: one chat completion from any OpenAI-compatible API.

Inputs: ``model``; ``messages`` (chat messages as the API takes them) or ``prompt`` (sent as one
user message); optional ``temperature`` and ``max_tokens``; ``base_url`` (default
``https://api.openai.com/v1``; the request goes to ``{base_url}/chat/completions``) and
``api_key_env``, the name of the environment variable holding the API key (default
``OPENAI_API_KEY``; an empty name sends no ``Authorization`` header, for local servers).

The key is read at each call, sent only as a bearer token, and never logged or put in an error
(a server that echoes it back has it replaced by ``[redacted]``). A step's ``fallback`` list with
another ``base_url`` gives provider failover; each provider has its own circuit breaker.

Output: ``{"content", "model", "usage", "finish_reason"}``. Retryability is the ``http``
agent's (:mod:`services.agents.http_transport`); a 2xx body that is not a chat completion is a
retryable ``LlmBadResponse``.
"""

from __future__ import annotations

import os
from typing import Any, Final

import msgspec

from services.agents.base import AgentContext, AgentError, AgentInputError, parse_inputs
from services.agents.http_transport import HttpSession, origin

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV: Final = "OPENAI_API_KEY"


class _LlmInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_API_KEY_ENV


class _Message(msgspec.Struct, frozen=True):
    content: str | None = None


class _Choice(msgspec.Struct, frozen=True):
    message: _Message
    finish_reason: str | None = None


class _Completion(msgspec.Struct, frozen=True):
    choices: list[_Choice]
    model: str = ""
    usage: dict[str, Any] = {}


_COMPLETION_DECODER: Final = msgspec.json.Decoder(_Completion)


class LlmAgent:
    """Asks an OpenAI-compatible chat completions endpoint; one shared client per instance,
    closed by :meth:`aclose`."""

    name = "llm"
    version = "1"

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self.session = HttpSession(timeout_s=timeout_s)

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Send the chat completion request and return the first choice."""
        spec = parse_inputs(self.name, inputs, _LlmInputs)
        body: dict[str, Any] = {"model": spec.model, "messages": _messages(spec)}
        if spec.temperature is not None:
            body["temperature"] = spec.temperature
        if spec.max_tokens is not None:
            body["max_tokens"] = spec.max_tokens
        headers = {"Idempotency-Key": ctx.idempotency_key} if ctx.idempotency_key else {}
        api_key = _api_key(spec.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        response = await self.session.send(
            "POST",
            spec.base_url.rstrip("/") + "/chat/completions",
            json=body,
            headers=headers,
            timeout_s=ctx.timeout_s,
            redact=(api_key,),
        )
        try:
            completion = _COMPLETION_DECODER.decode(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AgentError(
                "LlmBadResponse", f"{spec.base_url}: not a chat completion ({exc})", retryable=True
            ) from exc
        if not completion.choices:
            raise AgentError(
                "LlmBadResponse", f"{spec.base_url}: the completion has no choices", retryable=True
            )
        choice = completion.choices[0]
        return {
            "content": choice.message.content,
            "model": completion.model or spec.model,
            "usage": completion.usage,
            "finish_reason": choice.finish_reason,
        }

    def downstream(self, inputs: dict[str, Any]) -> str:
        """The scheme, host and port of the provider's ``base_url``."""
        return origin(inputs.get("base_url", DEFAULT_BASE_URL))

    async def aclose(self) -> None:
        """Close the shared client."""
        await self.session.aclose()


def _messages(spec: _LlmInputs) -> list[dict[str, Any]]:
    if (spec.messages is None) == (spec.prompt is None):
        raise AgentInputError(
            "bad inputs for agent 'llm': give exactly one of 'messages', 'prompt'"
        )
    if spec.prompt is not None:
        return [{"role": "user", "content": spec.prompt}]
    if not spec.messages:
        raise AgentInputError("bad inputs for agent 'llm': 'messages' is empty")
    return spec.messages


def _api_key(variable: str) -> str:
    """The API key from the environment variable ``variable``; "" when no variable is named."""
    if not variable:
        return ""
    key = os.environ.get(variable, "")
    if not key:
        raise AgentError(
            "LlmApiKeyMissing",
            f"the API key variable {variable} is not set in the environment",
            retryable=False,
        )
    return key
