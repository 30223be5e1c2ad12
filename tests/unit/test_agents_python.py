"""The python agent calling real functions of a module imported from disk."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from services.agents.base import AgentContext, AgentError, AgentInputError
from services.agents.pyfunc import PythonAgent
from services.agents.registry import AgentRegistry
from services.agents.resilience import AgentExecutor

pytestmark = pytest.mark.anyio

CTX = AgentContext(run_id="run-3", step="score", attempt=1, idempotency_key="run-3/score/1")

TARGETS = """
import argparse
import asyncio
import dataclasses
import threading

from services.agents import current_context


def add(a, b=0):
    return {"sum": a + b, "thread": threading.current_thread().name}


async def add_later(a, b):
    await asyncio.sleep(0)
    return a + b


def context_seen_in_thread():
    ctx = current_context()
    return {"run_id": ctx.run_id, "key": ctx.idempotency_key}


async def context_seen_in_task():
    return current_context().idempotency_key


def charge(amount, idempotency_key):
    return {"amount": amount, "key": idempotency_key}


@dataclasses.dataclass
class Point:
    x: int
    y: int


def point():
    return Point(1, 2)


def tags():
    return {"b", "a"}


def stats():
    return {7: "seven", "mean": float("nan"), "items": (1, 2)}


def opaque():
    return object()


def broken():
    raise LookupError("no such customer")


def cli(argv):
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--count", type=int, required=True)
    return vars(parser.parse_args(argv))


async def exits_later():
    raise SystemExit("stopped")


class Scorer:
    @staticmethod
    def score(text):
        return len(text)


async def _coroutine(value):
    return value


class AwaitableFactory:
    def __call__(self, value):
        return _coroutine(value)


make_awaitable = AwaitableFactory()
not_callable = 42
release = threading.Event()


def blocked():
    release.wait(30)
    return "late"
"""


@pytest.fixture
def targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a fresh module of target functions, importable from ``tmp_path``."""
    name = f"flowlog_targets_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TARGETS))
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_broken", None)


async def test_sync_function_runs_in_a_worker_thread(targets: str) -> None:
    output = await PythonAgent().run({"function": f"{targets}:add", "args": {"a": 2, "b": 3}}, CTX)
    assert output["sum"] == 5
    assert output["thread"] != threading.current_thread().name


async def test_async_function_is_awaited(targets: str) -> None:
    inputs = {"function": f"{targets}:add_later", "args": {"a": 2, "b": 5}}
    assert await PythonAgent().run(inputs, CTX) == 7


async def test_an_awaitable_returned_by_a_callable_object_is_awaited(targets: str) -> None:
    inputs = {"function": f"{targets}:make_awaitable", "args": {"value": "v"}}
    assert await PythonAgent().run(inputs, CTX) == "v"


async def test_dotted_attribute_paths_resolve(targets: str) -> None:
    inputs = {"function": f"{targets}:Scorer.score", "args": {"text": "four"}}
    assert await PythonAgent().run(inputs, CTX) == 4


async def test_current_context_reaches_a_sync_function_in_its_thread(targets: str) -> None:
    output = await PythonAgent().run({"function": f"{targets}:context_seen_in_thread"}, CTX)
    assert output == {"run_id": "run-3", "key": "run-3/score/1"}


async def test_current_context_reaches_an_async_function(targets: str) -> None:
    output = await PythonAgent().run({"function": f"{targets}:context_seen_in_task"}, CTX)
    assert output == "run-3/score/1"


async def test_a_declared_idempotency_key_parameter_receives_the_key(targets: str) -> None:
    inputs = {"function": f"{targets}:charge", "args": {"amount": 10}}
    assert await PythonAgent().run(inputs, CTX) == {"amount": 10, "key": "run-3/score/1"}


async def test_the_idempotency_key_cannot_be_passed_as_an_argument(targets: str) -> None:
    inputs = {"function": f"{targets}:charge", "args": {"amount": 1, "idempotency_key": "x"}}
    with pytest.raises(AgentInputError, match="idempotency_key"):
        await PythonAgent().run(inputs, CTX)


async def test_outputs_become_json_values(targets: str) -> None:
    agent = PythonAgent()
    assert await agent.run({"function": f"{targets}:point"}, CTX) == {"x": 1, "y": 2}
    assert sorted(await agent.run({"function": f"{targets}:tags"}, CTX)) == ["a", "b"]
    # what JSON keeps, so that the log and its JSON lines export hold the same output
    stats = await agent.run({"function": f"{targets}:stats"}, CTX)
    assert stats == {"7": "seven", "mean": None, "items": [1, 2]}


async def test_an_output_that_is_not_json_able_is_a_non_retryable_error(targets: str) -> None:
    with pytest.raises(AgentError) as caught:
        await PythonAgent().run({"function": f"{targets}:opaque"}, CTX)
    assert caught.value.error_type == "AgentOutputError"
    assert not caught.value.retryable


async def test_an_exception_of_the_function_propagates_as_itself(targets: str) -> None:
    with pytest.raises(LookupError, match="no such customer"):
        await PythonAgent().run({"function": f"{targets}:broken"}, CTX)


@pytest.mark.parametrize(
    ("function", "args", "named"),
    [
        ("cli", {"argv": ["--count", "many"]}, "cli called sys.exit(2)"),
        ("exits_later", {}, "exits_later called sys.exit('stopped')"),
    ],
)
async def test_a_function_calling_sys_exit_fails_the_step_and_nothing_else(
    targets: str, function: str, args: dict[str, object], named: str
) -> None:
    """argparse exits on bad arguments: a SystemExit must not reach (and end) the runner."""
    executor = AgentExecutor(AgentRegistry([PythonAgent()]))
    inputs = {"function": f"{targets}:{function}", "args": args}
    with pytest.raises(AgentError, match=re.escape(named)) as caught:
        await executor.execute("python", inputs, CTX)
    assert (caught.value.error_type, caught.value.retryable) == ("SystemExit", False)


@pytest.mark.parametrize(
    ("function", "args", "named"),
    [
        ("{m}", {}, "module:attr"),
        ("{m}:", {}, "module:attr"),
        ("flowlog_no_such_module_at_all:f", {}, "cannot import"),
        ("{m}_broken:f", {}, "import-time failure"),
        ("{m}:missing", {}, "no attribute 'missing'"),
        ("{m}:Scorer.missing", {}, "no attribute 'Scorer.missing'"),
        ("{m}:not_callable", {}, "not callable"),
        ("{m}:add", {"c": 1}, "args do not fit"),
        ("{m}:add", {}, "args do not fit"),
    ],
)
async def test_bad_paths_and_arguments_are_non_retryable_input_errors(
    targets: str, function: str, args: dict[str, object], named: str
) -> None:
    inputs = {"function": function.format(m=targets), "args": args}
    with pytest.raises(AgentInputError, match=named) as caught:
        await PythonAgent().run(inputs, CTX)
    assert not caught.value.retryable


async def test_a_timed_out_sync_function_is_abandoned_at_once(targets: str) -> None:
    executor = AgentExecutor(AgentRegistry([PythonAgent()]))
    timed = msgspec.structs.replace(CTX, timeout_s=0.2)
    started = time.monotonic()
    try:
        with pytest.raises(AgentError) as caught:
            await executor.execute("python", {"function": f"{targets}:blocked"}, timed)
        assert caught.value.error_type == "StepTimeout"
        assert time.monotonic() - started < 10
    finally:
        importlib.import_module(targets).release.set()


async def test_args_must_be_a_mapping(targets: str) -> None:
    with pytest.raises(AgentInputError, match="args"):
        await PythonAgent().run({"function": f"{targets}:add", "args": [1, 2]}, CTX)
