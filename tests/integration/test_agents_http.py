"""The http and llm agents against a real local HTTP server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from support.http_peers import HttpPeer, PeerRequest, PeerResponse

from services.agents.base import AgentContext, AgentError, AgentInputError
from services.agents.http_transport import ERROR_BODY_CHARS
from services.agents.llm import LlmAgent
from services.agents.registry import AgentRegistry
from services.agents.resilience import AgentExecutor, BreakerSettings, BreakerState, CircuitOpen
from services.agents.webhook import HttpAgent
from services.bench.redis_launcher import free_port

pytestmark = pytest.mark.anyio

CTX = AgentContext(run_id="run-h", step="notify", attempt=3, idempotency_key="run-h/notify/3")
API_KEY = "sk-test-0123456789abcdef"


def _completion(request: PeerRequest) -> PeerResponse:
    """An OpenAI-compatible chat completions endpoint that wants ``API_KEY``."""
    if request.headers.get("authorization") != f"Bearer {API_KEY}":
        return PeerResponse.of_json({"error": {"message": "Incorrect API key"}}, 401)
    body = request.json()
    return PeerResponse.of_json(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"] + "-0613",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "echo: " + body["messages"][-1]["content"],
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    def route(request: PeerRequest) -> PeerResponse:
        path = request.path
        if path == "/hook":
            return PeerResponse.of_json(
                {
                    "method": request.method,
                    "query": request.query,
                    "body": request.json() if request.body else None,
                    "content_type": request.headers.get("content-type"),
                    "custom": request.headers.get("x-custom"),
                }
            )
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
            return PeerResponse.of_text(f"boom {status}", status)
        if path == "/text":
            return PeerResponse.of_text("  plain words \n")
        if path == "/empty":
            return PeerResponse(204)
        if path == "/redirect":
            return PeerResponse(307, headers={"Location": "/hook"})
        if path == "/hang":
            running.released.wait(30)
            return PeerResponse.of_json({})
        if path == "/v1/chat/completions":
            return _completion(request)
        if path == "/bad/chat/completions":
            return PeerResponse.of_json({"not": "a completion"})
        if path.startswith("/leaky/") and path.endswith("/chat/completions"):
            # /leaky/<n>/chat/completions: the credential echoed after n characters of padding
            padding = "." * int(path.split("/")[2]) if path.count("/") == 4 else ""
            echoed = f"denied for {request.headers.get('authorization')}"
            return PeerResponse.of_text(padding + echoed, 403)
        return PeerResponse.of_text("no route", 404)

    with HttpPeer(route) as running:
        yield running


@pytest.fixture
async def http_agent() -> AsyncIterator[HttpAgent]:
    agent = HttpAgent()
    yield agent
    await agent.aclose()


@pytest.fixture
async def llm_agent(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LlmAgent]:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    agent = LlmAgent()
    yield agent
    await agent.aclose()


def _refused_url() -> str:
    """A URL on a local port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


# --- http ------------------------------------------------------------------------------------


async def test_posts_json_with_the_idempotency_key_headers_and_params(
    peer: HttpPeer, http_agent: HttpAgent
) -> None:
    inputs = {
        "url": f"{peer.url}/hook",
        "json": {"order": 7, "items": [1, 2]},
        "headers": {"X-Custom": "yes"},
        "params": {"page": 2, "full": True},
    }
    output = await http_agent.run(inputs, CTX)
    assert output == {
        "method": "POST",
        "query": "page=2&full=true",
        "body": {"order": 7, "items": [1, 2]},
        "content_type": "application/json",
        "custom": "yes",
    }
    (request,) = peer.requests
    assert request.headers["idempotency-key"] == "run-h/notify/3"


async def test_a_json_null_body_is_sent_and_no_body_without_json(
    peer: HttpPeer, http_agent: HttpAgent
) -> None:
    await http_agent.run({"url": f"{peer.url}/hook", "json": None}, CTX)
    output = await http_agent.run({"url": f"{peer.url}/hook", "method": "get"}, CTX)
    assert output["method"] == "GET"
    assert [r.body for r in peer.requests] == [b"null", b""]


async def test_text_and_empty_bodies(peer: HttpPeer, http_agent: HttpAgent) -> None:
    assert await http_agent.run({"url": f"{peer.url}/text", "method": "GET"}, CTX) == (
        "plain words"
    )
    assert await http_agent.run({"url": f"{peer.url}/empty"}, CTX) is None


async def test_redirects_are_followed(peer: HttpPeer, http_agent: HttpAgent) -> None:
    output = await http_agent.run({"url": f"{peer.url}/redirect", "json": {"a": 1}}, CTX)
    assert output["body"] == {"a": 1}
    assert [r.path for r in peer.requests] == ["/redirect", "/hook"]


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (500, "HttpServerError", True),
        (502, "HttpServerError", True),
        (503, "HttpServerError", True),
        (429, "HttpTooManyRequests", True),
        (400, "HttpClientError", False),
        (404, "HttpClientError", False),
        (422, "HttpClientError", False),
    ],
)
async def test_status_retryability(
    peer: HttpPeer, http_agent: HttpAgent, status: int, error_type: str, retryable: bool
) -> None:
    inputs = {"url": f"{peer.url}/status/{status}?token=secret-value"}
    with pytest.raises(AgentError) as caught:
        await http_agent.run(inputs, CTX)
    error = caught.value
    assert (error.error_type, error.retryable) == (error_type, retryable)
    assert f"-> {status}" in error.message
    assert f"boom {status}" in error.message
    assert "secret-value" not in error.message


async def test_a_refused_connection_is_retryable(http_agent: HttpAgent) -> None:
    with pytest.raises(AgentError) as caught:
        await http_agent.run({"url": f"{_refused_url()}/hook"}, CTX)
    assert (caught.value.error_type, caught.value.retryable) == ("HttpConnectError", True)


async def test_a_timeout_is_retryable(peer: HttpPeer, http_agent: HttpAgent) -> None:
    timed = msgspec.structs.replace(CTX, timeout_s=0.3)
    with pytest.raises(AgentError) as caught:
        await http_agent.run({"url": f"{peer.url}/hang"}, timed)
    assert (caught.value.error_type, caught.value.retryable) == ("HttpTimeout", True)


@pytest.mark.parametrize(
    "inputs",
    [
        {"url": "ftp://example.invalid/x"},
        {"url": "not a url"},
        {"url": "http://127.0.0.1:1/", "method": "BREW"},
        {"url": "http://127.0.0.1:1/", "headers": {"X": 1}},
        {"method": "GET"},
    ],
)
async def test_bad_inputs_are_non_retryable(http_agent: HttpAgent, inputs: dict[str, Any]) -> None:
    with pytest.raises(AgentInputError) as caught:
        await http_agent.run(inputs, CTX)
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("header", "named"),
    [("Zoë", "the request cannot be built"), ("a\r\nX-Injected: 1", "not valid HTTP")],
)
async def test_a_header_value_http_cannot_carry_is_an_input_error_not_a_downstream_failure(
    peer: HttpPeer, http_agent: HttpAgent, header: str, named: str
) -> None:
    """The same inputs fail the same way every time: not retryable, and the endpoint's circuit
    stays closed for the calls that are fine."""
    executor = AgentExecutor(
        AgentRegistry([http_agent]), BreakerSettings(failure_threshold=1, reset_timeout_s=60)
    )
    bad = {"url": f"{peer.url}/hook", "headers": {"X-User": header}}
    for _ in range(2):
        with pytest.raises(AgentInputError, match=named) as caught:
            await executor.execute("http", bad, CTX)
        assert not caught.value.retryable
    assert executor.breaker("http", bad).state is BreakerState.CLOSED
    good = {"url": f"{peer.url}/hook", "headers": {"X-Custom": "fine"}}
    assert (await executor.execute("http", good, CTX)).output["custom"] == "fine"
    assert [r.headers.get("x-injected") for r in peer.requests] == [None]


async def test_aclose_closes_the_shared_client() -> None:
    agent = HttpAgent()
    assert not agent.session.is_closed
    await agent.aclose()
    assert agent.session.is_closed


async def test_breakers_are_per_downstream(peer: HttpPeer, http_agent: HttpAgent) -> None:
    executor = AgentExecutor(
        AgentRegistry([http_agent]), BreakerSettings(failure_threshold=1, reset_timeout_s=60)
    )
    down = {"url": f"{_refused_url()}/hook"}
    with pytest.raises(AgentError, match="cannot connect"):
        await executor.execute("http", down, CTX)
    with pytest.raises(CircuitOpen):
        await executor.execute("http", down, CTX)
    up = {"url": f"{peer.url}/hook", "json": 1}
    assert (await executor.execute("http", up, CTX)).output["body"] == 1
    assert executor.breaker("http", down).state is BreakerState.OPEN
    assert executor.breaker("http", up).state is BreakerState.CLOSED


# --- llm -------------------------------------------------------------------------------------


async def test_llm_sends_a_chat_completion_request_with_bearer_auth(
    peer: HttpPeer, llm_agent: LlmAgent
) -> None:
    inputs = {
        "base_url": f"{peer.url}/v1/",
        "model": "gpt-test",
        "prompt": "hello",
        "temperature": 0.2,
        "max_tokens": 16,
    }
    output = await llm_agent.run(inputs, CTX)
    assert output == {
        "content": "echo: hello",
        "model": "gpt-test-0613",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "finish_reason": "stop",
    }
    (request,) = peer.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["idempotency-key"] == "run-h/notify/3"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0.2,
        "max_tokens": 16,
    }


async def test_llm_passes_messages_through_and_omits_unset_options(
    peer: HttpPeer, llm_agent: LlmAgent
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ping"},
    ]
    inputs = {"base_url": f"{peer.url}/v1", "model": "m", "messages": messages}
    assert (await llm_agent.run(inputs, CTX))["content"] == "echo: ping"
    assert peer.requests[0].json() == {"model": "m", "messages": messages}


async def test_llm_reads_the_key_from_the_named_variable(
    peer: HttpPeer, llm_agent: LlmAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWLOG_TEST_PROVIDER_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_API_KEY")
    inputs = {
        "base_url": f"{peer.url}/v1",
        "model": "m",
        "prompt": "x",
        "api_key_env": "FLOWLOG_TEST_PROVIDER_KEY",
    }
    assert (await llm_agent.run(inputs, CTX))["content"] == "echo: x"


async def test_llm_without_its_key_fails_naming_the_variable(
    peer: HttpPeer, llm_agent: LlmAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(AgentError) as caught:
        await llm_agent.run({"base_url": f"{peer.url}/v1", "model": "m", "prompt": "x"}, CTX)
    assert caught.value.error_type == "LlmApiKeyMissing"
    assert not caught.value.retryable
    assert "OPENAI_API_KEY" in caught.value.message
    assert peer.requests == []


async def test_llm_with_no_key_variable_sends_no_authorization(
    peer: HttpPeer, llm_agent: LlmAgent
) -> None:
    inputs = {"base_url": f"{peer.url}/v1", "model": "m", "prompt": "x", "api_key_env": ""}
    with pytest.raises(AgentError) as caught:
        await llm_agent.run(inputs, CTX)
    assert (caught.value.error_type, caught.value.retryable) == ("HttpClientError", False)
    assert "authorization" not in peer.requests[0].headers


@pytest.mark.parametrize(
    ("status", "retryable"), [(429, True), (500, True), (503, True), (400, False), (401, False)]
)
async def test_llm_status_retryability(
    peer: HttpPeer, llm_agent: LlmAgent, status: int, retryable: bool
) -> None:
    inputs = {"base_url": f"{peer.url}/status/{status}", "model": "m", "prompt": "x"}
    with pytest.raises(AgentError) as caught:
        await llm_agent.run(inputs, CTX)
    assert caught.value.retryable is retryable


async def test_llm_never_puts_the_key_in_an_error(peer: HttpPeer, llm_agent: LlmAgent) -> None:
    inputs = {"base_url": f"{peer.url}/leaky", "model": "m", "prompt": "x"}
    with pytest.raises(AgentError) as caught:
        await llm_agent.run(inputs, CTX)
    error = caught.value
    assert error.error_type == "HttpClientError"
    assert "Bearer [redacted]" in error.message
    assert API_KEY not in error.message
    assert API_KEY not in json.dumps(msgspec.to_builtins(error.to_error_info()))
    assert API_KEY not in repr(error)


async def test_llm_a_key_echoed_where_the_quoted_body_is_cut_is_redacted_whole(
    peer: HttpPeer, llm_agent: LlmAgent
) -> None:
    """The key is replaced before the body is cut to the part an error quotes, so no prefix of
    it survives the cut."""
    start = ERROR_BODY_CHARS - len("denied for Bearer ") - len(API_KEY) // 2
    inputs = {"base_url": f"{peer.url}/leaky/{start}", "model": "m", "prompt": "x"}
    with pytest.raises(AgentError) as caught:
        await llm_agent.run(inputs, CTX)
    message = caught.value.message
    assert "Bearer [redac" in message
    assert API_KEY[:8] not in message


async def test_llm_a_body_that_is_not_a_completion_is_retryable(
    peer: HttpPeer, llm_agent: LlmAgent
) -> None:
    inputs = {"base_url": f"{peer.url}/bad", "model": "m", "prompt": "x"}
    with pytest.raises(AgentError) as caught:
        await llm_agent.run(inputs, CTX)
    assert (caught.value.error_type, caught.value.retryable) == ("LlmBadResponse", True)


@pytest.mark.parametrize(
    "inputs",
    [
        {"model": "m"},
        {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": []},
        {"prompt": "x"},
        {"model": "m", "prompt": "x", "max_tokens": "many"},
    ],
)
async def test_llm_bad_inputs_are_non_retryable(
    llm_agent: LlmAgent, inputs: dict[str, Any]
) -> None:
    with pytest.raises(AgentInputError) as caught:
        await llm_agent.run(inputs, CTX)
    assert not caught.value.retryable


async def test_llm_provider_failover_is_not_stopped_by_the_failed_providers_breaker(
    peer: HttpPeer, llm_agent: LlmAgent
) -> None:
    executor = AgentExecutor(
        AgentRegistry([llm_agent]), BreakerSettings(failure_threshold=1, reset_timeout_s=60)
    )
    primary = {"base_url": f"{_refused_url()}/v1", "model": "m", "prompt": "x"}
    with pytest.raises(AgentError) as caught:
        await executor.execute("llm", primary, CTX)
    assert caught.value.retryable
    with pytest.raises(CircuitOpen):
        await executor.execute("llm", primary, CTX)
    fallback = {"base_url": f"{peer.url}/v1", "model": "m", "prompt": "x"}
    assert (await executor.execute("llm", fallback, CTX)).output["content"] == "echo: x"
