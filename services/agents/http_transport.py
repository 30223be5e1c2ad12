"""One HTTP client for the web agents (``http``, ``llm``), and the retryability of what it meets.

- 2xx: the response;
- 429 (``HttpTooManyRequests``) and 5xx (``HttpServerError``): retryable;
- any other status (``HttpClientError`` for 4xx, ``HttpUnexpectedStatus`` otherwise): not;
- timeouts (``HttpTimeout``), refused or broken connections (``HttpConnectError``,
  ``HttpTransportError``): retryable; too many redirects, undecodable bodies
  (``HttpRequestError``): not;
- a URL that is not http(s), a request that cannot be built or is not valid HTTP (a header
  value that is not ASCII or holds a line break): non-retryable :class:`AgentInputError`.

Redirects are followed. Error messages name the method and the URL without its query string
(which may carry credentials) and end with the start of the response body, with the
credentials the caller names (``redact``) replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import httpx
import msgspec

from services.agents.base import AgentError, AgentInputError

#: Characters of a failed response's body kept in the error message.
ERROR_BODY_CHARS: Final = 500


class HttpSession:
    """An ``httpx.AsyncClient`` shared by every call of one agent; close it with
    :meth:`aclose`."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(follow_redirects=True, timeout=timeout_s)

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`aclose` has been called."""
        return self._client.is_closed

    async def send(
        self,
        method: str,
        url: str,
        *,
        json: Any = msgspec.UNSET,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        redact: Sequence[str] = (),
    ) -> httpx.Response:
        """Send one request; return a 2xx response or raise :class:`AgentError`. Each of
        ``redact`` (a credential sent with the request) is replaced in error messages, also in
        the part of a response body they quote."""
        where = f"{method} {_without_query(url)}"
        try:
            request = self._client.build_request(
                method,
                url,
                content=None if json is msgspec.UNSET else msgspec.json.encode(json),
                headers=_with_json_type(headers or {}, has_body=json is not msgspec.UNSET),
                params=params,
                timeout=timeout_s or self.timeout_s,
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise AgentInputError(f"bad url {_without_query(url)!r}: {exc}") from exc
        except (UnicodeEncodeError, TypeError, ValueError) as exc:
            # a header that is not ASCII, a body that is not JSON: the same inputs fail again
            raise AgentInputError(
                f"{where}: the request cannot be built ({_scrub(str(exc), redact)})"
            ) from exc
        try:
            response = await self._client.send(request)
        except httpx.UnsupportedProtocol as exc:
            raise AgentInputError(f"bad url {_without_query(url)!r}: {exc}") from exc
        except httpx.LocalProtocolError as exc:
            # the request breaks HTTP itself (a line break in a header value): not retryable
            raise AgentInputError(
                f"{where}: the request is not valid HTTP ({_scrub(str(exc), redact)})"
            ) from exc
        except httpx.TimeoutException as exc:
            raise AgentError("HttpTimeout", f"{where}: timed out ({exc})", retryable=True) from exc
        except httpx.ConnectError as exc:
            raise AgentError(
                "HttpConnectError", f"{where}: cannot connect ({exc})", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            raise AgentError(
                "HttpTransportError",
                f"{where}: {type(exc).__name__} ({_scrub(str(exc), redact)})",
                retryable=True,
            ) from exc
        except httpx.RequestError as exc:
            raise AgentError(
                "HttpRequestError",
                f"{where}: {type(exc).__name__} ({_scrub(str(exc), redact)})",
                retryable=False,
            ) from exc
        if response.is_success:
            return response
        raise _status_error(where, response, redact)

    async def aclose(self) -> None:
        """Close the client and its connections."""
        await self._client.aclose()


def _status_error(where: str, response: httpx.Response, redact: Sequence[str]) -> AgentError:
    status = response.status_code
    body = _scrub(response.text, redact)[:ERROR_BODY_CHARS]
    message = f"{where} -> {status} {response.reason_phrase}: {body}"
    if status == 429:
        return AgentError("HttpTooManyRequests", message, retryable=True)
    if status >= 500:
        return AgentError("HttpServerError", message, retryable=True)
    if status >= 400:
        return AgentError("HttpClientError", message, retryable=False)
    return AgentError("HttpUnexpectedStatus", message, retryable=False)


def _scrub(text: str, redact: Sequence[str]) -> str:
    for secret in redact:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _with_json_type(headers: dict[str, str], *, has_body: bool) -> dict[str, str]:
    if has_body and not any(name.lower() == "content-type" for name in headers):
        return {**headers, "Content-Type": "application/json"}
    return headers


def _without_query(url: str) -> str:
    return url.partition("?")[0]


def origin(url: object) -> str:
    """``scheme://host[:port]`` of ``url``, or "" when it is not an absolute URL."""
    if not isinstance(url, str):
        return ""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return ""
    if not parsed.scheme or not parsed.host:
        return ""
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}"
