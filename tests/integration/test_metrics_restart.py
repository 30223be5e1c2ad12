"""The metrics service killed with SIGKILL in the middle of a workload and restarted neither loses
nor double counts: once it caught up, every metric of the model it exports equals the ground
truth, the metrics model folded from the whole log."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.processes import REPO, Cluster, ServiceProcess

from eventstore.redis_store import RedisStore
from eventstore.store import TERMINAL_STATUSES
from projections.metrics_model import fold
from services import commands
from services.metrics_projector import GROUP
from services.observability.prometheus import MetricsModelCollector
from services.producer import Producer
from services.workflow.loader import load_definition, parse_definition
from services.workflow.model import WorkflowDef

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.anyio]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SLOW = parse_definition(
    """
name: slow
steps:
  - {id: nap, agent: sleep, with: {seconds: 3}}
  - {id: after, agent: echo, depends_on: [nap], with: {value: done}}
""",
    source="slow.yaml",
)


def samples(text: str, names: frozenset[str] | None = None) -> Samples:
    """Every sample of an exposition, or of the families named ``names``."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if names is None or family.name in names
        for sample in family.samples
    }


def applied(proc: ServiceProcess) -> float:
    return samples(proc.metrics()).get(("flowlog_projector_events_applied_total", ()), 0.0)


def examples() -> Iterator[WorkflowDef]:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        yield load_definition(path)


async def submit_all(store: RedisStore, definitions: list[WorkflowDef]) -> list[str]:
    producer = Producer("workload", "test")
    return [(await commands.submit(store, producer, d)).run_id for d in definitions]


async def open_runs(store: RedisStore, run_ids: list[str]) -> list[str]:
    heads = [await store.head(run_id) for run_id in run_ids]
    return [
        run_id
        for run_id, head in zip(run_ids, heads, strict=True)
        if head is None or head.status not in TERMINAL_STATUSES
    ]


async def caught_up(store: RedisStore) -> bool:
    groups = [g for g in await store.group_info() if g.group == GROUP]
    return bool(groups) and all(g.pending == 0 and g.lag == 0 for g in groups)


@pytest.mark.parametrize(
    "same_consumer",
    [
        pytest.param(True, id="restarted-as-the-same-consumer"),
        pytest.param(False, id="replaced-by-a-new-consumer"),
    ],
)
async def test_killed_metrics_service_neither_loses_nor_double_counts(
    services: Cluster, store: RedisStore, same_consumer: bool
) -> None:
    """The same consumer is a compose restart (same container, same ``FLOWLOG_INSTANCE``
    default); a new one is the service replaced elsewhere (another host or pod): it reads new
    entries before it may claim the ones the killed process left pending."""
    services.start("scheduler")
    services.start("runner")
    services.start("runner")
    victim = services.start("metrics")
    definitions = list(examples())
    run_ids = await submit_all(store, [SLOW, SLOW, *definitions])

    with anyio.fail_after(30):
        while True:
            if await anyio.to_thread.run_sync(applied, victim) > 0:
                still_open = await open_runs(store, run_ids)
                break
            await anyio.sleep(0.05)
    victim.kill()
    assert still_open, "the metrics service was killed after the workload had finished"

    run_ids += await submit_all(store, [*definitions, SLOW])
    restarted = (
        services.start("metrics", FLOWLOG_INSTANCE=victim.instance)
        if same_consumer
        else services.start("metrics")
    )
    with anyio.fail_after(90):
        while True:
            if not await open_runs(store, run_ids) and await caught_up(store):
                break
            await anyio.sleep(0.1)

    log = [event for run_id in await store.list_runs() async for event in store.read_run(run_id)]
    truth = CollectorRegistry()
    truth.register(MetricsModelCollector(lambda: fold(log)))
    truth_text = generate_latest(truth).decode()
    families = frozenset(family.name for family in text_string_to_metric_families(truth_text))
    expected = samples(truth_text)
    exported = samples(await anyio.to_thread.run_sync(restarted.metrics), families)
    assert exported == expected
    assert expected[("flowlog_runs_submitted_total", (("workflow", "slow"),))] == 3
    assert sum(v for (name, _), v in expected.items() if name == "flowlog_events_total") == len(log)
