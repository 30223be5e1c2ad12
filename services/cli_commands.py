"""The handlers behind ``flowlog`` commands (parsing lives in :mod:`services.cli`)."""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

import anyio
from rich.table import Table

from services import commands
from services.app import serve
from services.cli import Handler, Output, parse_inputs
from services.connect import open_store
from services.observability.logs import configure_logging
from services.observability.tracing import configure_tracing, shutdown_tracing
from services.producer import Producer
from services.settings import Settings
from services.views import run_view
from services.workflow.loader import execution_levels, load_definition

log = logging.getLogger("flowlog.cli")


def _out(args: argparse.Namespace) -> Output:
    out: Output = args.out
    return out


def _traced(handler: Handler) -> Handler:
    """``handler`` with tracing configured for the CLI (service ``flowlog-cli``) and flushed
    when it returns."""

    @functools.wraps(handler)
    async def traced(args: argparse.Namespace, settings: Settings) -> int:
        configure_tracing("flowlog-cli")
        try:
            return await handler(args, settings)
        finally:
            shutdown_tracing()

    return traced


async def demo(args: argparse.Namespace, settings: Settings) -> int:
    from services.demo import run_demo

    return await run_demo(_out(args), settings, examples=args.examples)


async def up(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging("up", settings.log_level)
    configure_tracing("flowlog-up")
    async with open_store(settings, command="up", require_redis=False, spool=True) as store:
        await serve(
            ["scheduler", "runner", "checkpointer", "metrics"],
            store,
            settings,
            duration_s=args.duration,
        )
    return 0


async def service(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(args.name, settings.log_level)
    configure_tracing(f"flowlog-{args.name}")
    async with open_store(
        settings, command=f"service {args.name}", require_redis=True, spool=True
    ) as store:
        await serve([args.name], store, settings)
    return 0


async def validate(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    results: list[dict[str, Any]] = []
    for file in args.files:
        definition = load_definition(Path(file))
        levels = execution_levels(definition)
        results.append({"file": file, "workflow": definition.name, "levels": levels})
        if not out.machine:
            out.console.print(f"[green]valid[/green] {file}: workflow [bold]{definition.name}[/]")
            for i, level in enumerate(levels, 1):
                out.console.print(f"  level {i}: {', '.join(level)}")
    if out.machine:
        out.json(results if len(results) > 1 else results[0])
    return 0


@_traced
async def submit(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    definition = load_definition(Path(args.file))
    inputs = parse_inputs(args.input)
    async with open_store(settings, command="submit", require_redis=True) as store:
        producer = Producer("cli", settings.instance)
        result = await commands.submit(
            store, producer, definition, inputs, idempotency_key=args.idempotency_key
        )
        if not args.wait:
            if out.machine:
                out.json({"run_id": result.run_id, "duplicate": result.duplicate})
            else:
                note = " (already submitted with this idempotency key)" if result.duplicate else ""
                out.console.print(f"submitted [bold]{result.run_id}[/]{note}")
            return 0
        if out.machine:
            state = await commands.wait(store, result.run_id, timeout_s=args.timeout)
        else:
            from services.progress import follow_run

            state = await follow_run(out, store, result.run_id, timeout_s=args.timeout)
        if out.machine:
            out.json({"run_id": state.run_id, "status": state.status})
        else:
            out.console.print(f"run [bold]{state.run_id}[/] {state.status}")
        return 0 if state.status == "completed" else 1


async def runs_list(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    async with open_store(settings, command="runs list", require_redis=True) as store:
        rows: list[dict[str, Any]] = []
        for run_id in await store.list_runs():
            state = await commands.load_run(store, run_id)
            if args.status and state.status != args.status:
                continue
            if args.workflow and state.workflow != args.workflow:
                continue
            rows.append(
                {
                    "run_id": run_id,
                    "workflow": state.workflow,
                    "status": state.status,
                    "degraded": state.degraded,
                    "submitted_ms": state.submitted_ms,
                }
            )
    if out.machine:
        out.json(rows)
        return 0
    table = Table("run", "workflow", "status", "degraded")
    for row in rows:
        table.add_row(row["run_id"], row["workflow"], row["status"], str(row["degraded"]))
    out.console.print(table)
    return 0


async def runs_show(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    async with open_store(settings, command="runs show", require_redis=True) as store:
        state = await commands.load_run(store, args.run_id)
    view = run_view(state)
    if out.machine:
        out.json(view)
        return 0
    out.console.print(
        f"run [bold]{view['run_id']}[/] workflow {view['workflow']}: {view['status']}"
        + (" (degraded)" if view["degraded"] else "")
    )
    table = Table("step", "status", "attempts", "agent", "output / error")
    for step_id, step in view["steps"].items():
        detail = step["error"]["message"] if step["error"] else repr(step["output"])
        table.add_row(step_id, step["status"], str(step["attempts"]), step["agent"], detail[:80])
    out.console.print(table)
    return 0


@_traced
async def runs_control(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    verb = args.runs_command
    action = {"pause": commands.pause, "resume": commands.resume, "cancel": commands.cancel}[verb]
    async with open_store(settings, command=f"runs {verb}", require_redis=True) as store:
        await action(store, Producer("cli", settings.instance), args.run_id, args.reason)
    if out.machine:
        out.json({"run_id": args.run_id, "requested": verb})
    else:
        out.console.print(f"{verb} requested for run [bold]{args.run_id}[/]")
    return 0


@_traced
async def runs_retry(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    async with open_store(settings, command="runs retry", require_redis=True) as store:
        await commands.retry(store, Producer("cli", settings.instance), args.run_id, args.from_step)
    if out.machine:
        out.json({"run_id": args.run_id, "requested": "retry", "from_step": args.from_step})
    else:
        out.console.print(f"retry requested for run [bold]{args.run_id}[/]")
    return 0


async def bench(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    url = settings.redis_url.get_secret_value() if settings.redis_url else None
    if args.what == "append":
        from services.bench.store_bench import bench_append

        result = await anyio.to_thread.run_sync(bench_append, url, args.events, args.batch)
    elif args.what == "replay":
        from services.bench.store_bench import bench_replay

        result = await anyio.to_thread.run_sync(bench_replay, url, args.events, args.batch)
    else:
        from services.bench.e2e_bench import bench_e2e

        result = await bench_e2e(url, args.workflows)
    if out.machine:
        out.json(result)
    else:
        for key, value in result.items():
            out.console.print(f"{key}: {value}")
    return 0
