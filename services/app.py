"""Running services: one per process (``flowlog service NAME``) or all four in one (``up``).

Each process serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``FLOWLOG_HTTP_HOST``:
``FLOWLOG_HTTP_PORT`` (loopback and port 9400 by default; port 0 picks a free one and logs it),
logs JSON lines, and stops gracefully on SIGTERM/SIGINT: it stops reading, finishes or hands
back in-flight work, acknowledges, and exits.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from eventstore.errors import StoreUnavailable
from eventstore.store import EventStore
from services.agents.resilience import AgentExecutor
from services.checkpointer import Checkpointer
from services.metrics_projector import MetricsProjector
from services.observability.http import HealthServer
from services.observability.instrumented import InstrumentedStore
from services.observability.prometheus import ProcessMetrics
from services.observability.tracing import flush_tracing
from services.producer import Producer, default_instance
from services.runner.service import RunnerService
from services.runs import RunLoader
from services.scheduler.service import SchedulerService
from services.settings import Settings

log = logging.getLogger("flowlog.app")

#: The consumer name of the (single) metrics projector in its group.
PROJECTOR_CONSUMER = "projector"


class Service(Protocol):
    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    def stop(self) -> None: ...


def build_services(
    names: Sequence[str], store: EventStore, settings: Settings, registry: CollectorRegistry
) -> list[Service]:
    """The service objects for ``names``, wired to ``store`` and ``settings``."""
    instance = settings.instance or default_instance()
    # Services in one process fold each run's events once, into one cache of run states.
    loader = RunLoader(store)
    services: list[Service] = []
    for name in names:
        producer = Producer(name, instance)
        if name == "scheduler":
            services.append(SchedulerService(store, producer, consumer=instance, loader=loader))
        elif name == "runner":
            services.append(
                RunnerService(
                    store,
                    producer,
                    AgentExecutor.from_settings(
                        settings.runner, max_output_bytes=settings.store.max_event_bytes
                    ),
                    consumer=instance,
                    queues=settings.runner.queues,
                    concurrency=settings.runner.concurrency,
                    heartbeat_s=settings.runner.heartbeat_s,
                    prefetch=settings.runner.prefetch,
                )
            )
        elif name == "checkpointer":
            services.append(
                Checkpointer(
                    store,
                    producer,
                    consumer=instance,
                    every=settings.checkpoint.every_events,
                    level_min_events=settings.checkpoint.level_min_events,
                    interval_s=settings.checkpoint.interval_s,
                    retention_interval_s=settings.checkpoint.retention_interval_s or None,
                    archive_dir=settings.checkpoint.archive_dir,
                    loader=loader,
                )
            )
        elif name == "metrics":
            # One projector per store, always under one consumer name: a restarted projector
            # (new pid, new host) gets the entries its predecessor left pending first, so
            # every run's events still arrive in order.
            services.append(MetricsProjector(store, registry=registry, consumer=PROJECTOR_CONSUMER))
        else:
            raise ValueError(f"unknown service {name!r}")
    return services


async def _readiness(store: EventStore, health: HealthServer, interval_s: float = 2.0) -> None:
    while True:
        try:
            await store.ping()
        except StoreUnavailable as exc:
            health.set_ready(False, str(exc))
        else:
            health.set_ready(True)
        await anyio.sleep(interval_s)


ALL_SERVICES = ("scheduler", "runner", "checkpointer", "metrics")


@asynccontextmanager
async def running(
    store: EventStore, settings: Settings, names: Sequence[str] = ALL_SERVICES
) -> AsyncIterator[list[Service]]:
    """``names`` running in this process for the duration of the block, as ``flowlog up``
    runs them; leaving the block stops them gracefully."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        services: list[Service] = await tg.start(
            functools.partial(serve, names, store, settings, stop=stop)
        )
        try:
            yield services
        finally:
            stop.set()


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            stop.set()
            return


async def serve(
    names: Sequence[str],
    store: EventStore,
    settings: Settings,
    *,
    duration_s: float | None = None,
    stop: anyio.Event | None = None,
    task_status: TaskStatus[list[Service]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``names`` against ``store`` until SIGTERM/SIGINT, ``duration_s`` or ``stop``;
    buffered trace spans are exported before it returns."""
    stop = stop or anyio.Event()
    registry = CollectorRegistry()
    store = InstrumentedStore(store, ProcessMetrics(registry))
    services = build_services(names, store, settings, registry)
    health = HealthServer(settings.http_host, settings.http_port, registry)
    port = health.start()
    log.info("serving health and metrics", extra={"host": settings.http_host, "port": port})
    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(_readiness, store, health)
            async with anyio.create_task_group() as tg:
                for svc in services:
                    await tg.start(svc.run)
                outer.start_soon(_stop_on_signal, stop)
                task_status.started(services)
                with anyio.move_on_after(duration_s):
                    await stop.wait()
                health.set_ready(False, "stopping")
                for svc in services:
                    svc.stop()
                tg.cancel_scope.deadline = anyio.current_time() + 30
            outer.cancel_scope.cancel()
    finally:
        health.stop()
        flush_tracing()
