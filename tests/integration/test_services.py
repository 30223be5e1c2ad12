"""The services as separate OS processes on a real redis-server, driven through the CLI."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from support.processes import REPO, Cluster
from support.waits import caught_up, events_of, wait_for_event

from eventstore.events import StepScheduled, StepStarted, StepSucceeded
from eventstore.redis_store import RedisStore
from eventstore.store import TERMINAL_STATUSES

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.anyio]

EXAMPLES = REPO / "examples"
# A step that runs until the test creates the file named by its argument.
WAIT_FOR_FILE = "import os, sys, time\\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)"


async def ended(services: Cluster, run_id: str, timeout_s: float = 60) -> Any:
    """``runs show -o json`` of the run once it is completed, failed or cancelled."""
    with anyio.fail_after(timeout_s):
        while True:
            shown = services.cli_json("runs", "show", run_id)
            if shown["status"] in TERMINAL_STATUSES:
                return shown
            await anyio.sleep(0.05)


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


async def test_examples_complete_with_expected_outputs(services: Cluster) -> None:
    for name in ("scheduler", "runner", "checkpointer", "metrics"):
        services.start(name)
    for example in sorted(EXAMPLES.glob("*.yaml")):
        result = services.cli_json("submit", str(example), "--wait", "--timeout", "60")
        assert result["status"] == "completed", (example.name, result)
    listed = services.cli_json("runs", "list", "--workflow", "order-pipeline")
    (run,) = listed
    shown = services.cli_json("runs", "show", run["run_id"])
    steps = shown["steps"]
    assert shown["status"] == "completed"
    assert steps["fetch"]["output"] == {"n": 3}
    assert steps["check"]["output"] == 3
    assert steps["each"]["output"] == [1, 2, 3]
    assert steps["poll"]["status"] == "succeeded"


async def test_two_schedulers_and_two_runners_execute_every_step_once(
    services: Cluster, store: RedisStore
) -> None:
    for name in ("scheduler", "scheduler", "runner", "runner"):
        services.start(name)
    run_ids = [
        services.cli_json("submit", str(EXAMPLES / "fan-out.yaml"))["run_id"] for _ in range(6)
    ]
    run_ids += [
        services.cli_json("submit", str(EXAMPLES / "parallel.yaml"))["run_id"] for _ in range(6)
    ]
    for run_id in run_ids:
        final = await ended(services, run_id)
        assert final["status"] == "completed"
        events = await events_of(store, run_id)
        units = Counter(
            (e.data.step, e.data.item, e.data.iteration, e.data.attempt)
            for e in events
            if isinstance(e.data, StepSucceeded)
        )
        scheduled = Counter(
            (e.data.step, e.data.item, e.data.iteration, e.data.attempt)
            for e in events
            if isinstance(e.data, StepScheduled)
        )
        started = Counter(
            (e.data.step, e.data.item, e.data.iteration, e.data.attempt)
            for e in events
            if isinstance(e.data, StepStarted)
        )
        assert set(units) == set(scheduled)
        assert all(n == 1 for n in units.values()), units
        assert all(n == 1 for n in scheduled.values()), scheduled
        assert all(n == 1 for n in started.values()), started
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_runner_killed_mid_step_is_reclaimed(
    services: Cluster, store: RedisStore, tmp_path: Path
) -> None:
    definition = write(
        tmp_path,
        "slow.yaml",
        """
name: slow
steps:
  - id: long
    agent: sleep
    with: {seconds: 2}
  - id: after
    agent: echo
    depends_on: [long]
    with: {value: done}
""",
    )
    services.start("scheduler")
    runners = [services.start("runner"), services.start("runner")]
    run_id = services.cli_json("submit", str(definition))["run_id"]
    started = await wait_for_event(store, run_id, StepStarted)
    victim = next(r for r in runners if started.producer.endswith(r.instance))
    victim.kill()
    final = await ended(services, run_id)
    assert final["status"] == "completed"
    events = await events_of(store, run_id)
    starts = [e for e in events if isinstance(e.data, StepStarted) and e.data.step == "long"]
    (success,) = [e for e in events if isinstance(e.data, StepSucceeded) and e.data.step == "long"]
    assert len(starts) == 2
    assert starts[0].producer.endswith(victim.instance)
    assert not starts[1].producer.endswith(victim.instance)
    assert success.producer == starts[1].producer
    assert final["steps"]["after"]["output"] == "done"


async def test_pause_resume_cancel_and_retry_across_processes(
    services: Cluster, store: RedisStore, tmp_path: Path
) -> None:
    services.start("scheduler")
    services.start("runner")
    gate = tmp_path / "gate"
    gated = write(
        tmp_path,
        "gated.yaml",
        f"""
name: gated
steps:
  - id: first
    agent: shell
    with:
      argv: ["python3", "-c", "{WAIT_FOR_FILE}", {str(gate)!r}]
  - id: second
    agent: echo
    depends_on: [first]
    with: {{value: 2}}
""",
    )
    run_id = services.cli_json("submit", str(gated))["run_id"]
    await wait_for_event(store, run_id, StepStarted)
    services.cli_json("runs", "pause", run_id)
    gate.write_text("")
    await wait_for_event(store, run_id, StepSucceeded)
    await caught_up(store, "scheduler")
    shown = services.cli_json("runs", "show", run_id)
    assert shown["status"] == "paused"
    assert shown["steps"]["first"]["status"] == "succeeded"
    assert shown["steps"]["second"]["status"] == "pending"
    services.cli_json("runs", "resume", run_id)
    result = await ended(services, run_id)
    assert result["status"] == "completed"
    assert result["steps"]["second"]["output"] == 2

    endless = write(
        tmp_path,
        "endless.yaml",
        "name: endless\nsteps:\n  - {id: wait, agent: sleep, with: {seconds: 300}}\n",
    )
    run_id = services.cli_json("submit", str(endless))["run_id"]
    await wait_for_event(store, run_id, StepStarted)
    services.cli_json("runs", "cancel", run_id)
    shown = await ended(services, run_id)
    assert shown["status"] == "cancelled"
    assert shown["steps"]["wait"]["status"] == "cancelled"

    marker = tmp_path / "ready"
    fragile = write(
        tmp_path,
        "fragile.yaml",
        f"""
name: fragile
steps:
  - id: gate
    agent: shell
    with:
      argv: ["python3", "-c", "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 4)",
             {str(marker)!r}]
    retry: {{max_attempts: 1}}
  - id: after
    agent: echo
    depends_on: [gate]
    with: {{value: ok}}
""",
    )
    failed = services.cli_json("submit", str(fragile), "--wait", "--timeout", "60", check=False)
    assert failed["status"] == "failed"
    marker.write_text("")
    services.cli_json("runs", "retry", failed["run_id"], "--from-step", "gate")
    shown = await ended(services, failed["run_id"])
    assert shown["status"] == "completed"
    assert shown["steps"]["after"]["output"] == "ok"


async def test_shell_arguments_from_templates_are_never_interpreted(
    services: Cluster, tmp_path: Path
) -> None:
    services.start("scheduler")
    services.start("runner")
    pwned = tmp_path / "pwned"
    definition = write(
        tmp_path,
        "echoargs.yaml",
        """
name: echoargs
inputs: {payload: ""}
steps:
  - id: run
    agent: shell
    with:
      argv: ["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))",
             "${{ inputs.payload }}", "pre-${{ inputs.payload }}"]
""",
    )
    attacks = [
        f"$(touch {pwned})",
        f"`touch {pwned}`",
        f"; touch {pwned}",
        f"&& touch {pwned} ||",
        f"| touch {pwned}",
        "$HOME ${PATH} 'quoted' \"double\" \\ \n newline",
    ]
    for attack in attacks:
        quoted = msgspec.json.encode(attack).decode()  # a YAML double-quoted scalar
        result = services.cli_json(
            "submit", str(definition), "--input", f"payload={quoted}", "--wait", "--timeout", "60"
        )
        assert result["status"] == "completed"
        shown = services.cli_json("runs", "show", result["run_id"])
        assert shown["steps"]["run"]["output"] == [attack, f"pre-{attack}"]
    assert not pwned.exists()
