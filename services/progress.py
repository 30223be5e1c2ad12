"""Live progress of runs in the terminal (rich)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from eventstore.store import TERMINAL_STATUSES, EventStore
from projections.run_state import RunState
from services.cli import Output
from services.commands import WaitTimeout
from services.runs import RunLoader

DONE_STEP = frozenset({"succeeded", "skipped", "failed", "cancelled"})


def steps_done(state: RunState) -> int:
    return sum(1 for step in state.steps.values() if step.status in DONE_STEP)


async def follow_runs(
    out: Output,
    store: EventStore,
    runs: Sequence[tuple[str, str]],
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.05,
) -> dict[str, RunState]:
    """Show a bar per run (``(run_id, label)``) until every run is terminal; raises
    :class:`~services.commands.WaitTimeout` after ``timeout_s`` (None: no bound)."""
    loader = RunLoader(store)
    final: dict[str, RunState] = {}
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]:<10}"),
        TimeElapsedColumn(),
        console=out.console,
        transient=False,
    ) as progress:
        tasks = {
            run_id: progress.add_task(label, total=None, status="submitted")
            for run_id, label in runs
        }
        with anyio.move_on_after(timeout_s):
            while len(final) < len(runs):
                for run_id, task in tasks.items():
                    if run_id in final:
                        continue
                    state = await loader.load(run_id)
                    if state is None:
                        continue
                    progress.update(
                        task,
                        total=len(state.steps) or None,
                        completed=steps_done(state),
                        status=state.status,
                    )
                    if state.status in TERMINAL_STATUSES:
                        final[run_id] = state
                await anyio.sleep(poll_s)
    if len(final) < len(runs):
        left = ", ".join(label for run_id, label in runs if run_id not in final)
        raise WaitTimeout(f"not finished within {timeout_s:g}s: {left}")
    return final


async def follow_run(
    out: Output, store: EventStore, run_id: str, *, timeout_s: float | None = None
) -> RunState:
    return (await follow_runs(out, store, [(run_id, run_id)], timeout_s=timeout_s))[run_id]
