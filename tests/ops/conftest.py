"""Paths of the operations files, and the metric names flowlog really exports."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.prometheus import append_synthetic

from eventstore.memory import MemoryStore
from eventstore.store import StoreConfig
from services.metrics_projector import MetricsProjector
from services.observability.prometheus import ProcessMetrics, new_registry

T0 = 1_700_000_000_000


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_dir(repo_root: Path) -> Path:
    """The shared data files (JSON schemas): ``FLOWLOG_SHARED_DIR``, else ``shared/`` next to
    the repository (where CI puts it). A missing folder is a named error, not a file error."""
    folder = Path(os.environ.get("FLOWLOG_SHARED_DIR", repo_root.parent / "shared"))
    if not (folder / "schemas").is_dir():
        pytest.fail(
            f"no schemas in {folder}/schemas: put the shared/ folder next to the repository"
            " or set FLOWLOG_SHARED_DIR"
        )
    return folder


@pytest.fixture(scope="session")
def compose_dir(repo_root: Path) -> Path:
    return repo_root / "compose"


async def _exposition() -> bytes:
    store = MemoryStore(StoreConfig(partitions=4))
    registry = new_registry()
    process = ProcessMetrics(registry)
    projector = MetricsProjector(store, registry=registry, consumer="ops-test", block_ms=20)
    async with anyio.create_task_group() as tg:
        await tg.start(projector.run)
        total = await append_synthetic(store, process, "ops", T0)
        with anyio.fail_after(10):
            await projector.wait_applied(total)
        await projector.refresh_store_gauges()
        projector.stop()
    return generate_latest(registry)


@pytest.fixture(scope="session")
def exported_names() -> frozenset[str]:
    """Every sample name (``_total``, ``_bucket``... included) of the exposition of a metrics
    projector that folded the synthetic workload from a memory store, with the process metrics."""
    text = anyio.run(_exposition).decode()
    return frozenset(
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    )
