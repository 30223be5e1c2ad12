"""``flowlog bench e2e``: whole workflows through the services, on Redis and in memory.

Two shapes of 10 no-op steps each: a chain (s1 -> ... -> s10) and a fan-out (a -> 8 in
parallel -> z). On Redis the four services run as separate processes (``flowlog service``),
against a private redis-server unless a URL is given; in memory they run in one process as
``flowlog up`` does. For each: workflows/s and steps/s over the whole batch (first submit to
last completion), and the handoff latency (a step's success appended -> its dependent's start
appended, from event timestamps). The Redis figures are then measured again with submissions
paced at half the peak rate, where handoff latency is the figure that matters.

Each figure also gives ``cpu_ms_per_step``: CPU milliseconds (user + system) each process
spent per step while the batch ran — the services, the private redis-server (not a given one)
and the harness (submitting and polling). Throughput depends on how fast the machine is at the
moment; this breakdown shows where the time goes, and compares across machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psutil

from eventstore.events import Envelope, StepStarted, StepSucceeded
from eventstore.memory import MemoryStore
from eventstore.redis_store import RedisStore
from eventstore.store import TERMINAL_STATUSES, EventStore, StoreConfig
from services import commands
from services.app import running
from services.bench.redis_launcher import RedisServer, free_port
from services.producer import Producer
from services.settings import Settings
from services.workflow.loader import parse_definition
from services.workflow.model import WorkflowDef

STEPS = 10
SERVICES = ("scheduler", "runner", "checkpointer", "metrics")


def chain_definition() -> WorkflowDef:
    lines = ["name: bench-chain", "steps:"]
    for i in range(1, STEPS + 1):
        dep = f", depends_on: [s{i - 1}]" if i > 1 else ""
        lines.append(f"  - {{id: s{i}, agent: noop{dep}}}")
    return parse_definition("\n".join(lines) + "\n", source="bench-chain")


def fanout_definition() -> WorkflowDef:
    lines = ["name: bench-fanout", "steps:", "  - {id: a, agent: noop}"]
    lines += [f"  - {{id: p{i}, agent: noop, depends_on: [a]}}" for i in range(1, 9)]
    deps = ", ".join(f"p{i}" for i in range(1, 9))
    lines.append(f"  - {{id: z, agent: noop, depends_on: [{deps}]}}")
    return parse_definition("\n".join(lines) + "\n", source="bench-fanout")


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def handoffs(definition: WorkflowDef, events: Sequence[Envelope]) -> list[float]:
    """Milliseconds from each dependency's success to its dependent's start."""
    succeeded = {e.data.step: e.ts for e in events if isinstance(e.data, StepSucceeded)}
    started = {e.data.step: e.ts for e in events if isinstance(e.data, StepStarted)}
    result: list[float] = []
    for step in definition.steps:
        if step.depends_on and step.id in started:
            ready = max(succeeded.get(d, 0) for d in step.depends_on)
            result.append(float(started[step.id] - ready))
    return result


async def _wait_all(store: EventStore, run_ids: Sequence[str], timeout_s: float) -> None:
    """Wait until every run is terminal. Runs finish roughly in submission order, so each
    poll checks runs in order and stops at the first unfinished one (the harness must not
    steal the CPU it is measuring)."""
    remaining = list(run_ids)
    with anyio.fail_after(timeout_s):
        while remaining:
            while remaining:
                head = await store.head(remaining[0])
                if head is None or head.status not in TERMINAL_STATUSES:
                    break
                remaining.pop(0)
            if remaining:
                await anyio.sleep(0.01)


def _cpu_seconds(processes: Mapping[str, psutil.Process]) -> dict[str, float]:
    seconds = {}
    for name, process in processes.items():
        times = process.cpu_times()
        seconds[name] = times.user + times.system
    return seconds


async def _measure(
    store: EventStore,
    definition: WorkflowDef,
    workflows: int,
    *,
    processes: Mapping[str, psutil.Process],
    rate_per_s: float | None = None,
    timeout_s: float = 600,
) -> dict[str, Any]:
    producer = Producer("bench")
    run_ids: list[str] = []
    cpu_before = _cpu_seconds(processes)
    started = time.perf_counter()
    for i in range(workflows):
        if rate_per_s:
            delay = started + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
        run_ids.append((await commands.submit(store, producer, definition)).run_id)
    await _wait_all(store, run_ids, timeout_s)
    elapsed = time.perf_counter() - started
    cpu_after = _cpu_seconds(processes)
    steps = workflows * STEPS
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for run_id in run_ids:
        events = [e async for e in store.read_run(run_id)]
        latencies.extend(handoffs(definition, events))
        head = await store.head(run_id)
        status = head.status if head else "missing"
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "workflows": workflows,
        "statuses": statuses,
        "elapsed_s": round(elapsed, 3),
        "workflows_per_s": round(workflows / elapsed, 1),
        "steps_per_s": round(steps / elapsed, 1),
        "handoff_p50_ms": _percentile(latencies, 0.50),
        "handoff_p99_ms": _percentile(latencies, 0.99),
        "cpu_ms_per_step": {
            name: round((cpu_after[name] - cpu_before[name]) * 1000 / steps, 3)
            for name in processes
        },
    }


async def bench_memory(workflows: int) -> dict[str, Any]:
    """Both shapes through all four services in this process on the in-memory store."""
    settings = Settings(redis_url=None, http_port=0)
    results: dict[str, Any] = {}
    for name, definition in (("chain", chain_definition()), ("fanout", fanout_definition())):
        results[name] = await _memory_once(settings, definition, workflows)
    return results


async def _memory_once(settings: Settings, definition: WorkflowDef, workflows: int) -> Any:
    store = MemoryStore(settings.store.to_config())
    async with running(store, settings, SERVICES):
        result = await _measure(
            store, definition, workflows, processes={"flowlog up": psutil.Process()}
        )
    await store.close()
    return result


def _start_services(url: str, prefix: str, workdir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for name in SERVICES:
        env = {
            **os.environ,
            "FLOWLOG_REDIS_URL": url,
            "FLOWLOG_STORE__PREFIX": prefix,
            "FLOWLOG_HTTP_PORT": str(free_port()),
            "FLOWLOG_LOG_LEVEL": "WARNING",
            "FLOWLOG_STORE__SPOOL_PATH": str(workdir / f"{name}.spool"),
        }
        log = (workdir / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "services.cli", "service", name],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


async def bench_redis(url: str, workflows: int, redis_pid: int | None = None) -> dict[str, Any]:
    """Both shapes through the four services as separate processes on Redis (``redis_pid``:
    the server's process, when it is ours, to count its CPU)."""
    results: dict[str, Any] = {}
    for name, definition in (("chain", chain_definition()), ("fanout", fanout_definition())):
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory(prefix="flowlog-bench-") as tmp:
            procs = _start_services(url, prefix, Path(tmp))
            processes = {
                service: psutil.Process(proc.pid)
                for service, proc in zip(SERVICES, procs, strict=True)
            }
            if redis_pid is not None:
                processes["redis-server"] = psutil.Process(redis_pid)
            processes["harness"] = psutil.Process()
            store = RedisStore.from_url(url, StoreConfig(prefix=prefix))
            try:
                await _measure(store, definition, min(20, workflows), processes=processes)
                peak = await _measure(store, definition, workflows, processes=processes)
                half = await _measure(
                    store,
                    definition,
                    max(20, workflows // 2),
                    processes=processes,
                    rate_per_s=peak["workflows_per_s"] / 2,
                )
                results[name] = peak
                results[f"{name}_at_half_load"] = half
            finally:
                await store.close()
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=30)
    return results


async def bench_e2e(redis_url: str | None, workflows: int) -> dict[str, Any]:
    memory = await bench_memory(workflows)
    if redis_url:
        redis = await bench_redis(redis_url, workflows)
    else:
        with RedisServer() as server:
            redis = await bench_redis(server.url, workflows, server.pid)
    result: dict[str, Any] = msgspec.to_builtins({"redis": redis, "memory": memory})
    return result
