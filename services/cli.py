"""The ``flowlog`` command line.

Every command takes ``-o json`` (and where it makes sense ``-o jsonl``) for machines; the
default output is for people (rich tables and progress). Redis comes from ``--redis-url`` or
``FLOWLOG_REDIS_URL``; commands that need shared state say so when neither is set.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import anyio
import msgspec
import pydantic
from pydantic_settings import SettingsError
from rich.console import Console

from eventstore.errors import FlowlogError
from services.runtime import tune_gc
from services.settings import Settings
from services.workflow.errors import DefinitionError

OUTPUTS = ("text", "json", "jsonl")
SERVICES = ("scheduler", "runner", "checkpointer", "metrics")
_INPUT_DECODER: Final = msgspec.json.Decoder()

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]


class InvalidSettings(FlowlogError):
    """A ``FLOWLOG_`` environment variable (or ``.env`` entry) has a value flowlog refuses."""


class Output:
    """Where results go: people get rich renderings on stdout, machines get JSON."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        width = None if sys.stdout.isatty() else 140
        self.console = Console(highlight=False, width=width)
        self.err = Console(stderr=True, highlight=False, width=width)

    @property
    def machine(self) -> bool:
        return self.mode != "text"

    def json(self, value: Any) -> None:
        sys.stdout.buffer.write(msgspec.json.encode(value) + b"\n")
        sys.stdout.flush()


def parse_inputs(pairs: Sequence[str]) -> dict[str, Any]:
    """``k=v`` pairs. A value that is JSON is read as JSON (``3``, ``true``, ``null``,
    ``[1, 2]``, ``{"a": 1}``, ``"007"``); anything else is the string as typed (``#general``,
    ``01234``, ``NO``, ``12:30`` stay strings)."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise FlowlogError(f"--input {pair!r}: expected KEY=VALUE")
        try:
            inputs[key] = _INPUT_DECODER.decode(raw)
        except msgspec.DecodeError:
            inputs[key] = raw
    return inputs


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="text", help="output format")
    parser.add_argument("--redis-url", default=None, help="Redis URL (else FLOWLOG_REDIS_URL)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _common(common)
    parser = argparse.ArgumentParser(
        prog="flowlog", description="Event-sourced workflow engine on Redis Streams."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", parents=[common], help="run the example workflows in memory")
    demo.add_argument("--examples", default=None, help="folder of workflow definitions")

    up = sub.add_parser("up", parents=[common], help="run all four services in one process")
    up.add_argument("--for", dest="duration", type=float, default=None, help="seconds to run")

    service = sub.add_parser("service", parents=[common], help="run one service process")
    service.add_argument("name", choices=SERVICES)

    validate = sub.add_parser("validate", parents=[common], help="check workflow definitions")
    validate.add_argument("files", nargs="+")

    submit = sub.add_parser("submit", parents=[common], help="submit a run")
    submit.add_argument("file")
    submit.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--wait", action="store_true", help="follow the run until it ends")
    submit.add_argument("--timeout", type=float, default=None, help="seconds to wait")

    runs = sub.add_parser("runs", help="list, inspect and control runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = runs_sub.add_parser("list", parents=[common], help="list runs")
    listing.add_argument("--status", default=None)
    listing.add_argument("--workflow", default=None)
    show = runs_sub.add_parser("show", parents=[common], help="one run's state")
    show.add_argument("run_id")
    for verb in ("pause", "resume", "cancel"):
        control = runs_sub.add_parser(verb, parents=[common], help=f"{verb} a run")
        control.add_argument("run_id")
        control.add_argument("--reason", default="")
    retry = runs_sub.add_parser("retry", parents=[common], help="re-run a failed run")
    retry.add_argument("run_id")
    retry.add_argument("--from-step", default="")

    bench = sub.add_parser("bench", parents=[common], help="measure throughput")
    bench.add_argument("what", choices=("append", "replay", "e2e"))
    bench.add_argument("--events", type=int, default=200_000)
    bench.add_argument("--batch", type=int, default=500)
    bench.add_argument("--workflows", type=int, default=300)
    _audit_commands(sub, common)
    return parser


def _audit_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``audit``, ``replay``, ``export``, ``import``, ``retention`` and ``rebuild``."""
    audit = sub.add_parser("audit", help="tamper evidence of the stored history")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_sub.add_parser("verify", parents=[common], help="check every chain")
    verify.add_argument("runs", nargs="*", metavar="RUN")
    verify.add_argument("--all", action="store_true", help="every run (the default)")
    verify.add_argument("--anchors", default=None, metavar="FILE", help="from `audit anchor`")
    audit_sub.add_parser("anchor", parents=[common], help="print every run's head (JSON)")

    replay = sub.add_parser("replay", parents=[common], help="a run's timeline and state")
    replay.add_argument("run_id", metavar="RUN")
    replay.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="FILE.jsonl",
        help="read the history from an export file (no Redis needed)",
    )
    replay.add_argument(
        "--as-of", default=None, metavar="SEQ|TIME", help="state at a seq, unix ms or ISO-8601 time"
    )
    replay.add_argument(
        "--verify", action="store_true", help="compare with the head, run index and snapshot"
    )
    replay.add_argument(
        "--definition",
        default=None,
        metavar="FILE",
        help="report the first decision a changed definition would make differently",
    )

    export = sub.add_parser("export", parents=[common], help="write runs as JSON lines")
    export.add_argument("runs", nargs="*", metavar="RUN")
    export.add_argument("--all", action="store_true", help="every run")
    export.add_argument(
        "--since",
        default=None,
        metavar="TIME",
        help="only runs submitted at or after TIME (unix ms or ISO-8601)",
    )
    export.add_argument("--out", dest="out_file", required=True, metavar="FILE.jsonl[.gz]")

    imports = sub.add_parser("import", parents=[common], help="append an export file's events")
    imports.add_argument("file")

    retention = sub.add_parser("retention", help="feed retention")
    retention_sub = retention.add_subparsers(
        dest="retention_command", required=True, metavar="ACTION"
    )
    trim = retention_sub.add_parser("run", parents=[common], help="archive and trim the feeds")
    trim.add_argument("--archive", default=None, metavar="DIR", help="archive to DIR first")
    trim.add_argument("--gzip", action="store_true", help="gzip the archive files")
    trim.add_argument("--dry-run", action="store_true", help="only report what would go")

    sub.add_parser(
        "rebuild",
        parents=[common],
        help="rebuild run snapshots, run index and metrics model from the history",
    )


def _handlers() -> dict[str, Handler]:
    from services import cli_audit, cli_commands

    return {
        "demo": cli_commands.demo,
        "up": cli_commands.up,
        "service": cli_commands.service,
        "validate": cli_commands.validate,
        "submit": cli_commands.submit,
        "runs list": cli_commands.runs_list,
        "runs show": cli_commands.runs_show,
        "runs pause": cli_commands.runs_control,
        "runs resume": cli_commands.runs_control,
        "runs cancel": cli_commands.runs_control,
        "runs retry": cli_commands.runs_retry,
        "bench": cli_commands.bench,
        "audit verify": cli_audit.audit_verify,
        "audit anchor": cli_audit.audit_anchor,
        "replay": cli_audit.replay,
        "export": cli_audit.export,
        "import": cli_audit.import_file,
        "retention run": cli_audit.retention_run,
        "rebuild": cli_audit.rebuild,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    action = getattr(args, f"{args.command}_command", None)
    key = f"{args.command} {action}" if action else args.command
    handler = _handlers()[key]
    out = Output(args.output)
    args.out = out
    tune_gc()
    try:
        try:
            settings = Settings(**overrides)
        except (pydantic.ValidationError, SettingsError) as exc:
            raise InvalidSettings(f"the FLOWLOG_ settings are not valid: {exc}") from exc
        return anyio.run(handler, args, settings)
    except DefinitionError as exc:
        if out.machine:
            out.json(
                {"error": "definition", "issues": [msgspec.to_builtins(i) for i in exc.issues]}
            )
        else:
            out.err.print(f"[red]invalid definition[/red]\n{exc}", markup=True)
        return 1
    except FlowlogError as exc:
        if out.machine:
            out.json({"error": type(exc).__name__, "message": str(exc)})
        else:
            out.err.print(f"[red]error:[/red] {exc}", markup=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
