"""The handlers of the audit commands: ``audit verify``, ``audit anchor``, ``replay``,
``export``, ``import``, ``retention run`` and ``rebuild`` (parsing lives in :mod:`services.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from rich.progress import Progress
from rich.table import Table

from eventstore.audit import Anchor, Finding, verify_run
from eventstore.errors import FlowlogError
from eventstore.events import Envelope
from eventstore.store import EventStore
from services.cli import Output
from services.commands import RunNotFound
from services.connect import open_store
from services.export import import_events, read_export, run_events, write_export
from services.producer import now_ms
from services.replay import (
    Difference,
    Divergence,
    InvalidAsOf,
    first_divergence,
    history_until,
    parse_as_of,
    rebuild_projections,
    state_at,
    verify_run_state,
)
from services.retention import run_retention
from services.settings import Settings
from services.views import run_view, timeline_rows, unit_label
from services.workflow.loader import load_definition

_ANCHORS = msgspec.json.Decoder(dict[str, Anchor])


class AnchorsUnreadable(FlowlogError):
    """The ``--anchors`` file cannot be read or is not what ``audit anchor`` prints."""


class IncompatibleOptions(FlowlogError):
    """Two options were given that cannot be used together."""


def _out(args: argparse.Namespace) -> Output:
    out: Output = args.out
    return out


def _key(settings: Settings) -> bytes:
    return settings.audit_key.get_secret_value().encode() if settings.audit_key else b""


def read_anchors(path: str) -> dict[str, Anchor]:
    """The anchors in ``path`` (the JSON ``flowlog audit anchor`` prints)."""
    try:
        return _ANCHORS.decode(Path(path).read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise AnchorsUnreadable(f"--anchors {path}: {exc}") from exc


async def verify_runs(
    store: EventStore, run_ids: Sequence[str], *, key: bytes, anchors: dict[str, Anchor]
) -> list[Finding]:
    """Every finding of every run in ``run_ids``, in order."""
    findings: list[Finding] = []
    for run_id in run_ids:
        records = [record async for record in store.read_records(run_id)]
        head = await store.head(run_id)
        findings += verify_run(run_id, records, head, key=key, anchor=anchors.get(run_id))
    return findings


async def _require_runs(store: EventStore, run_ids: Sequence[str]) -> None:
    """Raise :class:`RunNotFound` naming the runs of ``run_ids`` the store does not hold."""
    missing = [run_id for run_id in run_ids if await store.head(run_id) is None]
    if missing:
        raise RunNotFound(f"no such run (never submitted, or expired): {', '.join(missing)}")


async def audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    anchors = read_anchors(args.anchors) if args.anchors else {}
    key = _key(settings)
    async with open_store(settings, command="audit verify", require_redis=True) as store:
        if args.all or not args.runs:
            known = await store.list_runs()
            held = set(known)
            run_ids = known + [run_id for run_id in anchors if run_id not in held]
        else:
            run_ids = list(args.runs)
            # a run named but not held is checked against its anchor; without one it is a
            # mistyped or expired id, not an intact run
            await _require_runs(store, [r for r in run_ids if r not in anchors])
        findings = await verify_runs(store, run_ids, key=key, anchors=anchors)
    if out.machine:
        out.json(
            {
                "runs": len(run_ids),
                "mac_checked": bool(key),
                "findings": [msgspec.to_builtins(f) for f in findings],
            }
        )
    elif findings:
        table = Table("run", "seq", "kind", "detail")
        for f in findings:
            table.add_row(f.run_id, str(f.seq), f.kind, f.detail)
        out.console.print(table)
        out.console.print(f"[red]{len(findings)} finding(s)[/] in {len(run_ids)} run(s)")
    else:
        macs = "hash and mac chains" if key else "hash chains (no audit key: macs not checked)"
        out.console.print(f"[green]ok[/green]: {len(run_ids)} run(s), {macs} intact")
    return 1 if findings else 0


async def audit_anchor(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    anchors: dict[str, Any] = {}
    async with open_store(settings, command="audit anchor", require_redis=True) as store:
        for run_id in await store.list_runs():
            head = await store.head(run_id)
            if head is not None:
                anchors[run_id] = {"seq": head.seq, "hash": head.hash, "mac": head.mac}
    out.json(anchors)
    return 0


def _time_ms(text: str, option: str) -> int:
    _, ts_ms = parse_as_of(text)
    if ts_ms is None:
        raise InvalidAsOf(f"{option} {text!r}: expected unix ms or an ISO-8601 time")
    return ts_ms


def _numbered(events: list[Envelope]) -> list[Envelope]:
    """Events of an export file with seqs as stored; 1, 2, ... in file order where absent."""
    return [
        event if event.seq else msgspec.structs.replace(event, seq=number)
        for number, event in enumerate(events, 1)
    ]


async def replay(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    run_id: str = args.run_id
    differences: list[Difference] = []
    if args.from_file:
        if args.verify:
            raise IncompatibleOptions("--verify compares with the store; not with --from")
        events = _numbered([e for e in read_export(Path(args.from_file)) if e.run_id == run_id])
    else:
        async with open_store(settings, command="replay", require_redis=True) as store:
            events = [event async for event in store.read_run(run_id)]
            if args.verify:
                _, differences = await verify_run_state(store, run_id, events)
    if not events:
        where = args.from_file or "the store"
        raise RunNotFound(f"no events of run {run_id!r} in {where}")
    divergence = None
    if args.definition:
        divergence = first_divergence(load_definition(Path(args.definition)), events)
    if args.as_of:
        seq, ts_ms = parse_as_of(args.as_of)
        events = history_until(events, seq=seq, ts_ms=ts_ms)
    state = state_at(events)
    rows = timeline_rows(events)
    view = run_view(state) if state is not None else None
    report: dict[str, Any] = {"run_id": run_id, "seq": state.seq if state else 0}
    if args.verify:
        report["differences"] = [msgspec.to_builtins(d) for d in differences]
    if args.definition:
        report["divergence"] = msgspec.to_builtins(divergence)
    if out.mode == "jsonl":
        for row in rows:
            out.json(row)
        out.json({**report, "state": view})
    elif out.machine:
        out.json({**report, "timeline": rows, "state": view})
    else:
        show_replay(out, rows, view, differences if args.verify else None, args, divergence)
    return 1 if differences or divergence is not None else 0


def show_replay(
    out: Output,
    rows: list[dict[str, Any]],
    view: dict[str, Any] | None,
    differences: list[Difference] | None,
    args: argparse.Namespace,
    divergence: Divergence | None,
) -> None:
    """The replay report for people: timeline, state, and verification or divergence."""
    table = Table("seq", "time", "event", "step", "attempt", "agent", "producer", "caused by")
    for row in rows:
        when = datetime.fromtimestamp(row["ts"] / 1000, UTC).isoformat(timespec="milliseconds")
        attempt = "" if row["attempt"] is None else str(row["attempt"])
        caused = "" if row["caused_by"] is None else str(row["caused_by"])
        table.add_row(
            str(row["seq"]), when, row["type"], unit_label(row), attempt, row["agent"],
            row["producer"], caused,
        )  # fmt: skip
    out.console.print(table)
    if view is not None:
        out.console.print(
            f"state as of seq {rows[-1]['seq']}: run [bold]{view['run_id']}[/] {view['status']}"
        )
        for step_id, step in view["steps"].items():
            out.console.print(f"  {step_id}: {step['status']} (attempts {step['attempts']})")
    if differences is not None:
        if not differences:
            out.console.print("[green]verified[/green]: head, run index and snapshot agree")
        for d in differences:
            out.console.print(
                f"[red]differs[/red] {d.path}: expected {d.expected!r}, found {d.found!r}"
            )
    if args.definition:
        if divergence is None:
            out.console.print(f"[green]same decisions[/green] under {args.definition}")
        else:
            out.console.print(f"[red]first different decision at seq {divergence.seq}[/red]")
            out.console.print(f"  recorded: {divergence.recorded}")
            out.console.print(f"  new:      {divergence.new}")


async def export(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    since = _time_ms(args.since, "--since") if args.since else None
    async with open_store(settings, command="export", require_redis=True) as store:
        if args.runs and not args.all:
            run_ids = list(args.runs)
            await _require_runs(store, run_ids)
        else:
            run_ids = await store.list_runs()
        count = await write_export(Path(args.out_file), run_events(store, run_ids, since_ms=since))
    if out.machine:
        out.json({"file": args.out_file, "events": count})
    else:
        out.console.print(f"exported {count} events to {args.out_file}")
    return 0


async def import_file(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    async with open_store(settings, command="import", require_redis=True) as store:
        report = await import_events(store, read_export(Path(args.file)))
    if out.machine:
        out.json(report)
    else:
        out.console.print(
            f"{report.runs} run(s): {report.appended} appended, {report.duplicate} duplicate"
        )
        for run_id, why in report.refused.items():
            out.console.print(f"[red]refused[/red] run {run_id}: {why}")
    return 1 if report.refused else 0


async def retention_run(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    archive = Path(args.archive) if args.archive else None
    async with open_store(settings, command="retention run", require_redis=True) as store:
        report = await run_retention(
            store,
            now_ms=now_ms(),
            archive_dir=archive,
            compress=args.gzip,
            dry_run=args.dry_run,
        )
    if out.machine:
        out.json(report)
        return 0
    verb = "would trim" if args.dry_run else "trimmed"
    table = Table("partition", verb, "below id", "archive")
    for partition, count in report.trim.trimmed.items():
        table.add_row(
            str(partition),
            str(count),
            report.trim.min_ids.get(partition, ""),
            report.archived.get(partition, ""),
        )
    out.console.print(table)
    total = sum(report.trim.trimmed.values())
    out.console.print(f"{verb} {total} feed entries below {report.horizon_ms} (horizon ms)")
    return 0


async def rebuild(args: argparse.Namespace, settings: Settings) -> int:
    out = _out(args)
    async with open_store(settings, command="rebuild", require_redis=True) as store:
        if out.machine:
            result = await rebuild_projections(store)
        else:
            with Progress(console=out.err) as progress:
                task = progress.add_task("rebuilding projections", total=None)
                result = await rebuild_projections(
                    store, lambda done, total: progress.update(task, completed=done, total=total)
                )
    if out.machine:
        out.json(result)
    else:
        out.console.print(
            f"rebuilt {result.runs} run(s) from {result.events} events in"
            f" {result.seconds:.2f}s ({result.events_per_s:,.0f} events/s);"
            f" runs by status: {result.by_status}"
        )
    return 0
