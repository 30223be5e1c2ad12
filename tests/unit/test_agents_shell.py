"""The shell agent against real subprocesses."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import pytest

from services.agents.base import AgentContext, AgentError, AgentInputError
from services.agents.registry import AgentRegistry
from services.agents.resilience import AgentExecutor
from services.agents.shell import STDERR_TAIL_BYTES, ShellAgent

pytestmark = pytest.mark.anyio

CTX = AgentContext(run_id="run-7", step="fetch", attempt=2, idempotency_key="run-7/fetch/2")
PY = sys.executable


def _reaped(pid: int) -> bool:
    """Whether ``pid`` is gone entirely (exited and reaped: not even a zombie)."""
    return not Path(f"/proc/{pid}").exists()


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _fifo(tmp_path: Path) -> Path:
    """A named pipe a child process writes its pid(s) to."""
    path = tmp_path / "pids"
    os.mkfifo(path)
    return path


async def _read_pids(fifo: Path) -> list[int]:
    """The pids a child writes to ``fifo`` (waits for the writer to close it)."""
    with anyio.fail_after(10):
        text = await anyio.to_thread.run_sync(fifo.read_text, abandon_on_cancel=True)
    return [int(word) for word in text.split()]


async def _exited(pid: int) -> None:
    """Wait (at most 10 s) until ``pid`` has exited, through a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with anyio.fail_after(10):
            await anyio.wait_readable(fd)
    finally:
        os.close(fd)


async def test_json_stdout_becomes_the_output() -> None:
    argv = [PY, "-c", "print('{\"n\": 3}')"]
    assert await ShellAgent().run({"argv": argv}, CTX) == {"n": 3}


async def test_text_stdout_is_returned_stripped() -> None:
    argv = [PY, "-c", "print('  hello, world  ')"]
    assert await ShellAgent().run({"argv": argv}, CTX) == "hello, world"


async def test_argv_elements_reach_the_program_literally(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    hostile = [
        f"; rm -rf {victim}",
        f"$(touch {tmp_path}/pwned1)",
        f"`touch {tmp_path}/pwned2`",
        f"&& touch {tmp_path}/pwned3",
        f"| touch {tmp_path}/pwned4",
        f"> {tmp_path}/pwned5",
        "$HOME *",
        "'single' \"double\" \\",
    ]
    argv = [PY, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *hostile]
    assert await ShellAgent().run({"argv": argv}, CTX) == hostile
    assert _listing(tmp_path) == ["victim"]
    assert _listing(victim) == []


async def test_a_shell_runs_only_when_asked_for(tmp_path: Path) -> None:
    command = f"echo $((1 + 2)) && touch {tmp_path}/made"
    assert await ShellAgent().run({"shell": True, "command": command}, CTX) == 3
    assert _listing(tmp_path) == ["made"]


async def test_a_command_string_without_shell_true_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AgentInputError, match="argv") as caught:
        await ShellAgent().run({"command": f"touch {tmp_path}/x"}, CTX)
    assert not caught.value.retryable
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"argv": []},
        {"argv": "echo hi"},
        {"argv": ["echo", 1]},
        {"shell": True},
        {"shell": True, "command": "true", "argv": ["true"]},
        {"argv": ["true"], "env": {"N": 3}},
    ],
)
async def test_bad_inputs_are_non_retryable(inputs: dict[str, object]) -> None:
    with pytest.raises(AgentInputError) as caught:
        await ShellAgent().run(dict(inputs), CTX)
    assert not caught.value.retryable


async def test_env_is_merged_over_the_parent_env_with_the_attempt_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWLOG_TEST_PARENT", "from-parent")
    names = [
        "FLOWLOG_TEST_PARENT",
        "GREETING",
        "FLOWLOG_IDEMPOTENCY_KEY",
        "FLOWLOG_RUN_ID",
        "FLOWLOG_STEP",
        "FLOWLOG_ATTEMPT",
    ]
    script = f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))"
    output = await ShellAgent().run({"argv": [PY, "-c", script], "env": {"GREETING": "hi"}}, CTX)
    assert output == {
        "FLOWLOG_TEST_PARENT": "from-parent",
        "GREETING": "hi",
        "FLOWLOG_IDEMPOTENCY_KEY": "run-7/fetch/2",
        "FLOWLOG_RUN_ID": "run-7",
        "FLOWLOG_STEP": "fetch",
        "FLOWLOG_ATTEMPT": "2",
    }


async def test_cwd_sets_the_working_directory(tmp_path: Path) -> None:
    argv = [PY, "-c", "import os; print(os.getcwd())"]
    assert await ShellAgent().run({"argv": argv, "cwd": str(tmp_path)}, CTX) == str(tmp_path)


async def test_input_is_fed_to_stdin() -> None:
    argv = [PY, "-c", "import sys; print(sys.stdin.read().upper())"]
    assert await ShellAgent().run({"argv": argv, "input": "quiet please"}, CTX) == "QUIET PLEASE"


async def test_a_process_that_ignores_a_large_stdin_still_succeeds() -> None:
    argv = [PY, "-c", "print('done')"]
    assert await ShellAgent().run({"argv": argv, "input": "x" * 4_000_000}, CTX) == "done"


async def test_non_zero_exit_is_retryable_with_the_code_and_the_tail_of_stderr() -> None:
    script = "import sys; sys.stderr.write('noise ' * 2000 + 'the real cause'); sys.exit(3)"
    with pytest.raises(AgentError) as caught:
        await ShellAgent().run({"argv": [PY, "-c", script]}, CTX)
    error = caught.value
    assert error.error_type == "ShellExit"
    assert error.retryable
    assert "exited with code 3" in error.message
    assert error.message.endswith("the real cause")
    assert len(error.message) < STDERR_TAIL_BYTES + 200
    assert error.to_error_info().message.endswith("the real cause")


async def test_a_missing_program_is_a_non_retryable_spawn_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError) as caught:
        await ShellAgent().run({"argv": [str(tmp_path / "no-such-program")]}, CTX)
    assert caught.value.error_type == "ShellSpawnError"
    assert not caught.value.retryable


async def test_too_much_stdout_kills_the_process(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path)
    script = (
        f"import os, sys, time; open({str(fifo)!r}, 'w').write(str(os.getpid()));"
        " sys.stdout.write('x' * 5000); sys.stdout.flush(); time.sleep(30)"
    )
    pids: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_collect_pids, fifo, pids)
        with pytest.raises(AgentError) as caught:
            await ShellAgent(max_output_bytes=1000).run({"argv": [PY, "-c", script]}, CTX)
    assert caught.value.error_type == "ShellOutputTooLarge"
    assert not caught.value.retryable
    assert _reaped(pids[0])


async def test_cancellation_kills_and_reaps_the_process(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path)
    script = (
        f"import os; open({str(fifo)!r}, 'w').write(str(os.getpid()));"
        " os.execvp('sleep', ['sleep', '30'])"
    )
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ShellAgent().run, {"argv": [PY, "-c", script]}, CTX)
        (pid,) = await _read_pids(fifo)
        assert not _reaped(pid)
        tg.cancel_scope.cancel()
    assert _reaped(pid)
    assert time.monotonic() - started < 10


async def test_a_step_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    fifo = _fifo(tmp_path)
    command = f"sleep 30 & echo $$ $! > {fifo}; wait"
    executor = AgentExecutor(AgentRegistry([ShellAgent()]))
    timed_ctx = AgentContext(run_id="r", step="s", attempt=1, idempotency_key="k", timeout_s=1.0)
    started = time.monotonic()
    pids: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_collect_pids, fifo, pids)
        with pytest.raises(AgentError) as caught:
            await executor.execute("shell", {"shell": True, "command": command}, timed_ctx)
    assert caught.value.error_type == "StepTimeout"
    assert caught.value.retryable
    shell_pid, sleep_pid = pids
    assert _reaped(shell_pid)
    await _exited(sleep_pid)
    assert time.monotonic() - started < 10


async def _collect_pids(fifo: Path, into: list[int]) -> None:
    into.extend(await _read_pids(fifo))


async def test_env_of_the_runner_is_not_changed() -> None:
    before = dict(os.environ)
    argv = [PY, "-c", "print(1)"]
    await ShellAgent().run({"argv": argv, "env": {"FLOWLOG_TEST_ONLY_CHILD": "1"}}, CTX)
    assert dict(os.environ) == before
