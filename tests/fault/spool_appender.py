"""A process that appends facts through a FallbackStore until it is killed.

Run by the fault tests as a subprocess::

    python tests/fault/spool_appender.py --redis-url URL --spool PATH [--runs N]
    python tests/fault/spool_appender.py --redis-url URL --spool PATH --drain-only

Appending, it prints one line per acknowledged event, flushed before the next append:
``ack <run_id> <event_id> spooled|stored``. Batches alternate between one and two events,
round robin over ``--runs`` runs. With ``--drain-only`` it drains the spool left by an earlier
process (within ``--deadline`` seconds), prints ``drained <records> <remaining>`` and exits 0
when nothing is left.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import anyio

from eventstore.events import Envelope, StepStarted
from eventstore.fallback import FallbackStore, is_spooled
from eventstore.ids import new_event_id
from eventstore.redis_store import RedisStore
from eventstore.store import StoreConfig


def _store(args: argparse.Namespace) -> FallbackStore:
    primary = RedisStore.from_url(args.redis_url, StoreConfig(partitions=4))
    return FallbackStore(primary, Path(args.spool), retry_interval_ms=50)


async def _append_forever(args: argparse.Namespace) -> None:
    async with _store(args) as store:
        for number in itertools.count():
            run_id = f"{args.run_prefix}-{number % args.runs}"
            events = [
                Envelope(
                    event_id=new_event_id(),
                    run_id=run_id,
                    ts=number,
                    producer="spool-appender",
                    data=StepStarted(step=f"step-{number}", attempt=index + 1, agent="noop"),
                )
                for index in range(1 + number % 2)
            ]
            results = await store.append(run_id, events)
            for result in results:
                where = "spooled" if is_spooled(result) else "stored"
                sys.stdout.write(f"ack {run_id} {result.event_id} {where}\n")
            sys.stdout.flush()


async def _drain(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        with anyio.fail_after(args.deadline):
            report = await store.drain()
    finally:
        await store.close()
    sys.stdout.write(f"drained {report.records} {report.remaining}\n")
    sys.stdout.flush()
    return 1 if report.remaining else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run-prefix", default="fault-run")
    parser.add_argument("--drain-only", action="store_true")
    parser.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    if args.drain_only:
        return anyio.run(_drain, args)
    anyio.run(_append_forever, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
