"""Every panel of every dashboard shows data from a real Prometheus scraping the four real service
processes during a real workload (retries, fallbacks, skips, cache hits, failures, a cancel)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from support.processes import REPO, Cluster, cluster
from support.prometheus import PrometheusServer, expand_grafana, panel_queries, wait_until
from support.redis_server import RedisServer

from eventstore.redis_store import RedisStore
from eventstore.store import TERMINAL_STATUSES, StoreConfig
from services import commands
from services.producer import Producer
from services.workflow.loader import load_definition, parse_definition
from services.workflow.model import WorkflowDef

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.anyio]

DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
DOOMED = parse_definition(
    """
name: doomed
steps:
  - id: boom
    agent: shell
    with: {argv: ["python3", "-c", "import sys; sys.exit(3)"]}
    retry: {max_attempts: 1}
""",
    source="doomed.yaml",
)
ENDLESS = parse_definition(
    "name: endless\nsteps:\n  - {id: wait, agent: sleep, with: {seconds: 300}}\n",
    source="endless.yaml",
)


def default_variables(board: dict[str, Any]) -> dict[str, str]:
    """Each dashboard variable's value as the dashboard opens (``All`` is its ``allValue``)."""
    values: dict[str, str] = {}
    for variable in board.get("templating", {}).get("list", []):
        current = variable.get("current", {}).get("value")
        if current in ("$__all", ["$__all"]):
            values[variable["name"]] = variable.get("allValue") or ".*"
        else:
            values[variable["name"]] = "|".join(current) if isinstance(current, list) else current
    return values


def panel_expressions() -> Iterator[tuple[str, str]]:
    """(dashboard / panel title, PromQL as Grafana sends it) of every panel query."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = default_variables(board)
        for title, expr in panel_queries(board):
            yield f"{path.name} / {title}", expand_grafana(expr, variables)


@pytest.fixture
def four_services(redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    with cluster(
        redis_server.url,
        tmp_path,
        ("scheduler", "runner", "checkpointer", "metrics"),
        FLOWLOG_STORE__CLAIM_IDLE_S="1.5",
        FLOWLOG_CHECKPOINT__INTERVAL_S="0.5",
        FLOWLOG_RUNNER__HEARTBEAT_S="0.3",
        # The workload fails shell steps on purpose (examples and DOOMED); five of them in a
        # row, which the timing decides, would open the shell agent's circuit, and the order
        # pipeline's fetch would then fail fast, leaving the cache panels with no hit to show.
        FLOWLOG_RUNNER__BREAKER_FAILURES="1000",
    ) as services:
        yield services


async def run_wave(store: RedisStore, definitions: list[WorkflowDef]) -> int:
    """Submit every definition and one run that is cancelled; wait until all ended. Returns
    the number of runs submitted."""
    producer = Producer("workload", "test")
    run_ids = [(await commands.submit(store, producer, d)).run_id for d in definitions]
    endless = (await commands.submit(store, producer, ENDLESS)).run_id
    with anyio.fail_after(30):
        while True:
            head = await store.head(endless)
            if head is not None and head.status == "running":
                break
            await anyio.sleep(0.05)
    await commands.cancel(store, producer, endless, "dashboard test")
    with anyio.fail_after(120):
        for run_id in [*run_ids, endless]:
            while True:
                head = await store.head(run_id)
                if head is not None and head.status in TERMINAL_STATUSES:
                    break
                await anyio.sleep(0.05)
    return len(run_ids) + 1


def scraped_runs(prometheus: PrometheusServer, runs: int) -> bool | None:
    result = prometheus.query("sum(flowlog_runs_submitted_total)")
    return True if result and float(result[0]["value"][1]) == runs else None


def has_data(prometheus: PrometheusServer, expr: str) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in prometheus.query(expr))


async def test_every_panel_shows_data_of_a_real_workload(four_services: Cluster) -> None:
    definitions = [load_definition(p) for p in sorted((REPO / "examples").glob("*.yaml"))]
    definitions.append(DOOMED)
    targets = [f"127.0.0.1:{proc.port}" for proc in four_services.processes]
    store = RedisStore.from_url(
        four_services.redis_url, StoreConfig(prefix=four_services.prefix, partitions=4)
    )
    prometheus = PrometheusServer(targets)
    try:
        await anyio.to_thread.run_sync(prometheus.start)
        await anyio.to_thread.run_sync(
            lambda: wait_until(prometheus.targets_up, timeout_s=30, what="every target scraped")
        )
        runs = await run_wave(store, definitions)
        await anyio.to_thread.run_sync(
            lambda: wait_until(
                lambda: scraped_runs(prometheus, runs), timeout_s=30, what="the first wave"
            )
        )
        # a second wave after the first was scraped: every rate() sees an increase, and the
        # order pipeline's cacheable step is served from the runner's cache
        runs += await run_wave(store, definitions)
        await anyio.to_thread.run_sync(
            lambda: wait_until(
                lambda: scraped_runs(prometheus, runs), timeout_s=30, what="the second wave"
            )
        )
        expressions = list(panel_expressions())
        assert len(expressions) > 20
        # A scrape that times out on a busy machine marks that target's series stale until the
        # next one succeeds, so an instant query can briefly find nothing: every panel must
        # show data together within the deadline, and the ones that never do are named.
        empty: list[str] = []

        def every_panel_has_data() -> bool | None:
            empty[:] = [
                f"{panel}: {expr}" for panel, expr in expressions if not has_data(prometheus, expr)
            ]
            return True if not empty else None

        try:
            await anyio.to_thread.run_sync(
                lambda: wait_until(every_panel_has_data, timeout_s=20, what="every panel")
            )
        except TimeoutError:
            pytest.fail("panels without data:\n" + "\n".join(empty))
    finally:
        await anyio.to_thread.run_sync(prometheus.stop)
        await store.close()
