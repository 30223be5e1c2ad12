"""``flowlog bench e2e`` as a user runs it: both shapes through the four services as separate
processes on a redis-server the command starts itself, and through ``flowlog up`` in memory."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest

from services.bench.e2e_bench import SERVICES

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKFLOWS = 30
COMMAND = ["bench", "e2e", "-o", "json", "--workflows", str(WORKFLOWS)]


def test_bench_e2e_completes_every_workflow_and_accounts_cpu_per_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", *COMMAND],
        env={k: v for k, v in os.environ.items() if not k.startswith("FLOWLOG_")},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = msgspec.json.decode(done.stdout)
    figures = {
        **{f"memory {shape}": result for shape, result in report["memory"].items()},
        **{f"redis {shape}": result for shape, result in report["redis"].items()},
    }
    assert set(figures) == {
        "memory chain",
        "memory fanout",
        "redis chain",
        "redis chain_at_half_load",
        "redis fanout",
        "redis fanout_at_half_load",
    }
    for name, result in figures.items():
        workflows = result["workflows"]
        assert result["statuses"] == {"completed": workflows}, name
        assert result["steps_per_s"] == pytest.approx(10 * result["workflows_per_s"], rel=0.01)
        assert 0 <= result["handoff_p50_ms"] <= result["handoff_p99_ms"], name
        cpu = result["cpu_ms_per_step"]
        if name.startswith("memory"):
            assert set(cpu) == {"flowlog up"}
        else:
            assert set(cpu) == {*SERVICES, "redis-server", "harness"}
        assert all(ms >= 0 for ms in cpu.values()), name
        assert sum(cpu.values()) > 0, name
    assert figures["redis chain"]["workflows"] == WORKFLOWS
    assert figures["redis chain_at_half_load"]["workflows"] == 20
