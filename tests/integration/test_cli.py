"""The ``flowlog`` command as a user runs it: demo, validate, and commands without Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
from support.processes import REPO

from services.cli import parse_inputs

EXAMPLES = REPO / "examples"


def flowlog(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLOG_")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_runs_every_example_to_completion() -> None:
    done = flowlog("demo", "-o", "json")
    assert done.returncode == 0, done.stderr
    report = msgspec.json.decode(done.stdout)
    workflows = {run["workflow"]: run for run in report["runs"]}
    assert set(workflows) == {p.stem for p in EXAMPLES.glob("*.yaml")}
    assert all(run["status"] == "completed" for run in report["runs"])
    assert workflows["retry"]["retried"] == ["unreliable"]
    assert workflows["fallback"]["fallback_used"] == ["primary"]
    assert workflows["non-critical"]["degraded"] is True
    timeline = report["timeline"]["events"]
    assert [row["seq"] for row in timeline] == list(range(1, len(timeline) + 1))
    assert timeline[0]["type"] == "run_submitted"


def test_demo_shows_progress_results_and_timeline_for_people() -> None:
    done = flowlog("demo")
    assert done.returncode == 0, done.stderr
    assert "Results" in done.stdout
    assert "Replayed timeline of order-pipeline" in done.stdout
    assert "all runs completed" in done.stdout


def test_validate_prints_levels() -> None:
    done = flowlog("validate", str(EXAMPLES / "order-pipeline.yaml"), "-o", "json")
    assert done.returncode == 0, done.stderr
    assert msgspec.json.decode(done.stdout)["levels"] == [["fetch"], ["check", "poll"], ["each"]]


def test_validate_reports_every_error_with_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\n"
        "steps:\n"
        "  - id: a\n"
        "    agent: nope\n"
        "    depends_on: [b]\n"
        "  - id: b\n"
        "    agent: echo\n"
        "    depends_on: [a]\n"
        "    retry: {max_attempts: zero}\n"
    )
    done = flowlog("validate", str(bad))
    assert done.returncode == 1
    assert f"{bad}:4: steps[0].agent:" in done.stderr
    assert f"{bad}:9: steps[1].retry.max_attempts:" in done.stderr
    assert "a -> b -> a" in done.stderr or "b -> a -> b" in done.stderr
    machine = flowlog("validate", str(bad), "-o", "json")
    issues = msgspec.json.decode(machine.stdout)["issues"]
    assert {(i["line"], i["field"]) for i in issues} >= {
        (4, "steps[0].agent"),
        (9, "steps[1].retry.max_attempts"),
    }


def test_commands_that_need_redis_say_so_and_point_at_the_demo() -> None:
    done = flowlog("runs", "list")
    assert done.returncode == 2
    assert "needs Redis" in done.stderr
    assert "flowlog demo" in done.stderr
    machine = flowlog("submit", str(EXAMPLES / "sequential.yaml"), "-o", "json")
    assert msgspec.json.decode(machine.stdout)["error"] == "RedisNotConfigured"


def test_a_bad_setting_is_named_with_a_clean_error() -> None:
    done = flowlog("runs", "list", "-o", "json", env={"FLOWLOG_STORE__PARTITIONS": "0"})
    assert (done.returncode, done.stderr) == (2, "")
    error = msgspec.json.decode(done.stdout)
    assert error["error"] == "InvalidSettings"
    assert "store.partitions" in error["message"]
    cluster = flowlog("runs", "list", env={"FLOWLOG_REDIS_CLUSTER": "true"})
    assert cluster.returncode == 2
    assert "Redis Cluster is not supported" in cluster.stderr
    assert "Traceback" not in cluster.stderr


def test_input_values_are_json_or_the_string_as_typed() -> None:
    assert parse_inputs(
        ["n=3", "on=true", "items=[1, 2]", 'obj={"a": 1}', 'quoted="007"', "empty="]
    ) == {"n": 3, "on": True, "items": [1, 2], "obj": {"a": 1}, "quoted": "007", "empty": ""}
    typed = ["channel=#general", "zip=01234", "at=12:30", "country=NO", "user=@alice"]
    assert parse_inputs(typed) == {pair.split("=")[0]: pair.split("=")[1] for pair in typed}
