"""``flowlog demo``: the shipped example workflows, end to end, in one process on the in-memory
store — scheduler, runner, checkpointer and metrics projector included — with live progress, a
results table and the replayed timeline of one run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.table import Table

from eventstore.errors import FlowlogError
from eventstore.memory import MemoryStore
from projections.run_state import RunState
from services import commands
from services.app import running
from services.cli import Output
from services.observability.logs import configure_logging
from services.producer import Producer
from services.progress import follow_runs
from services.settings import Settings
from services.views import timeline_rows, unit_label
from services.workflow.loader import load_definition
from services.workflow.model import WorkflowDef

TIMELINE_WORKFLOW = "order-pipeline"


def find_examples(explicit: str | None) -> Path:
    """The examples folder: ``--examples``, else ``examples/`` of the source tree."""
    folder = Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "examples"
    if not folder.is_dir() or not any(folder.glob("*.yaml")):
        raise FlowlogError(f"no workflow definitions (*.yaml) in {folder}; pass --examples DIR")
    return folder


def _summary(state: RunState) -> dict[str, Any]:
    steps = state.steps.values()
    return {
        "run_id": state.run_id,
        "workflow": state.workflow,
        "status": state.status,
        "degraded": state.degraded,
        "steps": len(state.steps),
        "attempts": sum(s.attempts for s in steps),
        "retried": sorted(s.id for s in steps if any(u.attempt > 1 for u in s.units)),
        "fallback_used": sorted(s.id for s in steps if s.fallback_used),
        "skipped": sorted(s.id for s in steps if s.status == "skipped"),
        "duration_ms": (state.ended_ms or 0) - state.submitted_ms,
    }


async def run_demo(out: Output, settings: Settings, *, examples: str | None = None) -> int:
    configure_logging("demo", "WARNING")
    folder = find_examples(examples)
    definitions: list[WorkflowDef] = [load_definition(p) for p in sorted(folder.glob("*.yaml"))]
    settings = settings.model_copy(update={"http_port": 0, "redis_url": None})
    store = MemoryStore(settings.store.to_config())
    producer = Producer("demo", settings.instance)
    if not out.machine:
        out.console.rule("[bold]flowlog demo[/] — in-memory store, all services in one process")
    started = time.perf_counter()
    async with running(store, settings):
        runs: list[tuple[str, str]] = []
        for definition in definitions:
            result = await commands.submit(store, producer, definition)
            runs.append((result.run_id, definition.name))
        if out.machine:
            final = {run_id: await commands.wait(store, run_id, timeout_s=60) for run_id, _ in runs}
        else:
            final = await follow_runs(out, store, runs, timeout_s=60)
    elapsed = time.perf_counter() - started
    summaries = [_summary(final[run_id]) for run_id, _ in runs]
    timeline_run = next((run_id for run_id, name in runs if name == TIMELINE_WORKFLOW), runs[0][0])
    timeline = timeline_rows([e async for e in store.read_run(timeline_run)])
    ok = all(s["status"] == "completed" for s in summaries)
    if out.machine:
        out.json(
            {
                "ok": ok,
                "elapsed_s": round(elapsed, 3),
                "runs": summaries,
                "timeline": {"run_id": timeline_run, "events": timeline},
            }
        )
        return 0 if ok else 1
    table = Table(
        "workflow",
        "status",
        "steps",
        "attempts",
        "retried",
        "fallback",
        "skipped",
        "ms",
        title="Results",
    )
    for s in summaries:
        status = s["status"] + (" (degraded)" if s["degraded"] else "")
        colour = "green" if s["status"] == "completed" else "red"
        table.add_row(
            s["workflow"],
            f"[{colour}]{status}[/]",
            str(s["steps"]),
            str(s["attempts"]),
            ", ".join(s["retried"]),
            ", ".join(s["fallback_used"]),
            ", ".join(s["skipped"]),
            str(s["duration_ms"]),
        )
    out.console.print(table)
    tl = Table(
        "seq",
        "+ms",
        "event",
        "step",
        "attempt",
        "agent",
        "producer",
        "caused by",
        title=f"Replayed timeline of {TIMELINE_WORKFLOW} ({timeline_run})",
    )
    for row in timeline:
        step = unit_label(row)
        tl.add_row(
            str(row["seq"]),
            str(row["offset_ms"]),
            row["type"],
            step,
            "" if row["attempt"] is None else str(row["attempt"]),
            row["agent"],
            row["producer"].split(":")[0],
            "" if row["caused_by"] is None else str(row["caused_by"]),
        )
    out.console.print(tl)
    verdict = "[green]all runs completed[/]" if ok else "[red]some runs did not complete[/]"
    out.console.print(f"{verdict} — {len(summaries)} workflows in {elapsed:.2f}s")
    return 0 if ok else 1
