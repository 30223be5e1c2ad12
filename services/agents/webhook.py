"""The ``http`` agent: one JSON web call (a webhook).

Inputs: ``url``, ``method`` (default ``POST``), ``json`` (the request body, sent as JSON when
given), ``headers``, ``params`` (query parameters). Every request carries the attempt's
``Idempotency-Key`` header. A 2xx response's body is the output (its JSON value, else its
text; ``None`` when empty). Retryability follows :mod:`services.agents.http_transport`.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from services.agents.base import AgentContext, AgentInputError, parse_inputs, parse_output
from services.agents.http_transport import HttpSession, origin

METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class _HttpInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str
    method: str = "POST"
    json: Any | msgspec.UnsetType = msgspec.UNSET
    headers: dict[str, str] = {}
    params: dict[str, str | int | float | bool] = {}


class HttpAgent:
    """Calls a URL; one shared client per instance, closed by :meth:`aclose`."""

    name = "http"
    version = "1"

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self.session = HttpSession(timeout_s=timeout_s)

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Send the request and return the parsed response body."""
        spec = parse_inputs(self.name, inputs, _HttpInputs)
        method = spec.method.upper()
        if method not in METHODS:
            raise AgentInputError(
                f"bad inputs for agent 'http': method {spec.method!r} is not one of"
                f" {', '.join(sorted(METHODS))}"
            )
        headers = dict(spec.headers)
        if ctx.idempotency_key:
            headers["Idempotency-Key"] = ctx.idempotency_key
        response = await self.session.send(
            method,
            spec.url,
            json=spec.json,
            headers=headers,
            params=dict(spec.params),
            timeout_s=ctx.timeout_s,
        )
        return parse_output(response.content) if response.content else None

    def downstream(self, inputs: dict[str, Any]) -> str:
        """The scheme, host and port of ``inputs["url"]`` ("" when it is not a URL)."""
        return origin(inputs.get("url"))

    async def aclose(self) -> None:
        """Close the shared client."""
        await self.session.aclose()
