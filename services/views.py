"""Read-only renderings of runs for people and machines (``runs show``, the demo, replay)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from eventstore.events import Envelope
from projections.run_state import RunState


def run_view(state: RunState) -> dict[str, Any]:
    """The ``runs show -o json`` shape: run, workflow, status, degraded and every step."""
    return {
        "run_id": state.run_id,
        "workflow": state.workflow,
        "status": state.status,
        "degraded": state.degraded,
        "steps": {
            step_id: {
                "status": step.status,
                "attempts": step.attempts,
                "agent": step.agent,
                "output": step.output,
                "error": msgspec.to_builtins(step.error) if step.error else None,
                "cached": step.cached,
                "fallback_used": step.fallback_used,
            }
            for step_id, step in state.steps.items()
        },
    }


def timeline_rows(events: Iterable[Envelope]) -> list[dict[str, Any]]:
    """One row per event: seq, time offset from the first event, type, step, attempt, agent,
    producer and the event that caused it."""
    rows: list[dict[str, Any]] = []
    first_ts: int | None = None
    ids: dict[str, int] = {}
    for event in events:
        first_ts = event.ts if first_ts is None else first_ts
        ids[event.event_id] = event.seq
        data = event.data
        rows.append(
            {
                "seq": event.seq,
                "ts": event.ts,
                "offset_ms": event.ts - first_ts,
                "type": event.type,
                "step": getattr(data, "step", ""),
                "attempt": getattr(data, "attempt", None),
                "item": getattr(data, "item", None),
                "iteration": getattr(data, "iteration", None),
                "agent": getattr(data, "agent", ""),
                "producer": event.producer,
                "caused_by": ids.get(event.causation_id),
                "event_id": event.event_id,
            }
        )
    return rows


def unit_label(row: dict[str, Any]) -> str:
    """A timeline row's unit of work: ``step``, ``step[item]`` (for_each), ``step#iteration``
    (loop)."""
    label = str(row["step"])
    if row["item"] is not None:
        label += f"[{row['item']}]"
    if row["iteration"] is not None:
        label += f"#{row['iteration']}"
    return label
