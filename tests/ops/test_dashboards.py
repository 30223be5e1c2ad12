"""Grafana dashboards: valid, on the flowlog datasource, and backed by exported metrics."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import jsonschema
import pytest
from support.prometheus import (
    PrometheusServer,
    append_synthetic,
    expand_grafana,
    panel_queries,
    wait_until,
)

from eventstore.memory import MemoryStore
from eventstore.store import StoreConfig
from services.metrics_projector import MetricsProjector
from services.observability.http import HealthServer
from services.observability.prometheus import ProcessMetrics, new_registry

DATASOURCE_UID = "flowlog-prometheus"
METRIC = re.compile(r"\bflowlog_[a-z0-9_]+")
DASHBOARDS = ("flowlog-overview.json", "flowlog-workflow.json")
T0 = 1_700_000_000_000


def load(repo_root: Path, name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((repo_root / "dashboards" / name).read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, with the panels inside rows, except the rows themselves."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.extend(panels(panel) if panel["type"] == "row" else [panel])
    return found


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_is_valid_against_the_grafana_schema(
    name: str, repo_root: Path, shared_dir: Path
) -> None:
    schema = json.loads((shared_dir / "schemas" / "grafana-dashboard.jsonschema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(load(repo_root, name))


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_and_variable_uses_the_flowlog_datasource(name: str, repo_root: Path) -> None:
    board = load(repo_root, name)
    for panel in panels(board):
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_query_uses_exported_metrics(
    name: str, repo_root: Path, exported_names: frozenset[str]
) -> None:
    queries = list(panel_queries(load(repo_root, name)))
    assert queries
    for title, expr in queries:
        names = set(METRIC.findall(expr))
        assert names, f"panel {title!r} uses no flowlog metric: {expr}"
        assert names <= exported_names, f"panel {title!r} uses {names - exported_names}"


def test_workflow_variable_lists_submitted_workflows(repo_root: Path) -> None:
    variables = load(repo_root, "flowlog-workflow.json")["templating"]["list"]
    assert [(v["name"], v["query"]) for v in variables] == [
        ("workflow", "label_values(flowlog_runs_submitted_total, workflow)")
    ]


def test_expand_grafana_substitutes_macros_and_variables() -> None:
    expr = 'rate(x{w=~"$workflow"}[$__rate_interval]) + increase(y{s="${step:raw}"}[$__range])'
    assert expand_grafana(expr, {"workflow": "ingest", "step": "fetch"}) == (
        'rate(x{w=~"ingest"}[1m]) + increase(y{s="fetch"}[1h])'
    )
    with pytest.raises(KeyError, match="workflow"):
        expand_grafana("x{w=~'$workflow'}")


def finite_result(prometheus: PrometheusServer, expr: str) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in prometheus.query(expr))


@pytest.mark.anyio
async def test_every_panel_query_returns_data_from_a_real_prometheus(repo_root: Path) -> None:
    store = MemoryStore(StoreConfig(partitions=4))
    registry = new_registry()
    process = ProcessMetrics(registry)
    projector = MetricsProjector(store, registry=registry, consumer="ops-test", block_ms=20)
    health = HealthServer("127.0.0.1", 0, registry)
    port = health.start()
    prometheus = PrometheusServer([f"127.0.0.1:{port}"])
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(projector.run)
            applied = await append_synthetic(store, process, "first", T0)
            with anyio.fail_after(10):
                await projector.wait_applied(applied)
            await projector.refresh_store_gauges()
            await anyio.to_thread.run_sync(prometheus.start)
            await anyio.to_thread.run_sync(
                lambda: wait_until(prometheus.targets_up, timeout_s=30, what="a first scrape")
            )
            # a second workload after the first scrape, so every rate() sees an increase
            applied += await append_synthetic(store, process, "second", T0 + 60_000)
            with anyio.fail_after(10):
                await projector.wait_applied(applied)
            await projector.refresh_store_gauges()
            projector.stop()

        def second_scraped() -> bool | None:
            samples = prometheus.query("sum(flowlog_runs_submitted_total)")
            return True if samples and samples[0]["value"][1] == "14" else None

        await anyio.to_thread.run_sync(
            lambda: wait_until(second_scraped, timeout_s=30, what="the second workload")
        )
        queries = {
            expand_grafana(expr, {"workflow": workflow}): f"{name} / {title}"
            for name in DASHBOARDS
            for title, expr in panel_queries(load(repo_root, name))
            for workflow in (".*", "ingest")
        }
        empty = [
            f"{panel}: {query}"
            for query, panel in queries.items()
            if not await anyio.to_thread.run_sync(finite_result, prometheus, query)
        ]
        assert empty == []
    finally:
        await anyio.to_thread.run_sync(prometheus.stop)
        health.stop()
