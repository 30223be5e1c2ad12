"""The ``shell`` agent: runs a program as a subprocess and returns what it prints.

Inputs: ``argv`` (a list: the program and its arguments, passed to it literally, no shell
involved), or ``command`` with ``shell: true`` (a string run by ``/bin/sh -c``, only when asked
for); ``env`` (merged over the runner's environment), ``cwd``, ``input`` (text fed to stdin).

The process also gets ``FLOWLOG_IDEMPOTENCY_KEY``, ``FLOWLOG_RUN_ID``, ``FLOWLOG_STEP`` and
``FLOWLOG_ATTEMPT``. It runs in its own session; on timeout or cancellation its whole process
group is killed and the process reaped before the call returns.

stdout becomes the output: its JSON value when it is valid JSON, else the stripped text. A
non-zero exit is a retryable ``ShellExit`` error carrying the exit code and the tail of stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress
from typing import Any, Final

import anyio
import anyio.abc
import msgspec

from services.agents.base import (
    AgentContext,
    AgentError,
    AgentInputError,
    parse_inputs,
    parse_output,
)

#: stderr kept for the error message of a failed command (its last bytes).
STDERR_TAIL_BYTES: Final = 2000


class _ShellInputs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    argv: list[str] | None = None
    command: str | None = None
    shell: bool = False
    env: dict[str, str] = {}
    cwd: str | None = None
    input: str | None = None


class ShellAgent:
    """Runs ``argv`` (or a ``command`` string with ``shell: true``) as a subprocess.

    ``max_output_bytes`` bounds the stdout kept; a process printing more is killed and fails
    with the non-retryable ``ShellOutputTooLarge``.
    """

    name = "shell"
    version = "1"

    def __init__(self, *, max_output_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_output_bytes = max_output_bytes

    async def run(self, inputs: dict[str, Any], ctx: AgentContext) -> Any:
        """Run the process to completion and return its parsed stdout."""
        spec = parse_inputs(self.name, inputs, _ShellInputs)
        argv = _argv(spec)
        env = {
            **os.environ,
            **spec.env,
            "FLOWLOG_IDEMPOTENCY_KEY": ctx.idempotency_key,
            "FLOWLOG_RUN_ID": ctx.run_id,
            "FLOWLOG_STEP": ctx.step,
            "FLOWLOG_ATTEMPT": str(ctx.attempt),
        }
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL if spec.input is None else subprocess.PIPE,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentError(
                "ShellSpawnError", f"cannot start {argv[0]!r}: {exc}", retryable=False
            ) from exc
        stdout, stderr = await self._communicate(process, spec.input)
        if process.returncode != 0:
            message = f"{argv[0]!r} {_exit_description(process.returncode)}"
            tail = stderr.decode(errors="replace").strip()
            raise AgentError(
                "ShellExit", f"{message}; stderr: {tail}" if tail else message, retryable=True
            )
        return parse_output(stdout)

    async def _communicate(
        self, process: anyio.abc.Process, stdin_text: str | None
    ) -> tuple[bytes, bytes]:
        """Feed stdin, collect stdout and the tail of stderr, wait for the exit. Unless that
        completes, the process group is killed and the process reaped before this returns."""
        stdout = bytearray()
        stderr = bytearray()
        too_large = False
        completed = False

        async def read_stdout(stream: anyio.abc.ByteReceiveStream) -> None:
            nonlocal too_large
            async for chunk in stream:
                stdout.extend(chunk)
                if len(stdout) > self.max_output_bytes:
                    too_large = True
                    tg.cancel_scope.cancel()

        async def read_stderr(stream: anyio.abc.ByteReceiveStream) -> None:
            async for chunk in stream:
                stderr.extend(chunk)
                del stderr[:-STDERR_TAIL_BYTES]

        async def write_stdin(stream: anyio.abc.ByteSendStream, text: str) -> None:
            async with stream:
                with suppress(anyio.BrokenResourceError):
                    await stream.send(text.encode())

        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None
                assert process.stderr is not None
                tg.start_soon(read_stdout, process.stdout)
                tg.start_soon(read_stderr, process.stderr)
                if stdin_text is not None:
                    assert process.stdin is not None
                    tg.start_soon(write_stdin, process.stdin, stdin_text)
                await process.wait()
            completed = not too_large
        finally:
            with anyio.CancelScope(shield=True):
                if not completed:
                    with suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                await process.aclose()
        if too_large:
            raise AgentError(
                "ShellOutputTooLarge",
                f"stdout is over the limit of {self.max_output_bytes} bytes",
                retryable=False,
            )
        return bytes(stdout), bytes(stderr)


def _argv(spec: _ShellInputs) -> list[str]:
    """The argv to run: as given, or ``/bin/sh -c command`` when a shell was asked for."""
    if spec.shell:
        if spec.command is None or spec.argv is not None:
            raise AgentInputError(
                "bad inputs for agent 'shell': shell: true takes a 'command' string, not 'argv'"
            )
        return ["/bin/sh", "-c", spec.command]
    if spec.command is not None:
        raise AgentInputError(
            "bad inputs for agent 'shell': 'command' runs in a shell only with shell: true;"
            " pass the program and its arguments as 'argv'"
        )
    if not spec.argv:
        raise AgentInputError("bad inputs for agent 'shell': 'argv' is required and non-empty")
    return spec.argv


def _exit_description(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"
