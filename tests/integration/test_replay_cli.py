"""``flowlog replay``, ``export``, ``import`` and ``rebuild`` as a user runs them, on runs the
services recorded in a real Redis; ``replay --from`` with no Redis configured at all."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.processes import REPO
from support.redis_server import RedisServer, isolated
from support.waits import caught_up

from eventstore.redis_store import RedisStore
from eventstore.store import StoreConfig
from projections.run_state import STATE_VERSION
from services import commands
from services.app import running
from services.producer import Producer
from services.runs import snapshot_of
from services.settings import Settings
from services.workflow.loader import load_definition

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    prefix: str
    run_id: str

    def env(self, prefix: str | None = None, *, redis: bool = True) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLOG_")}
        if not redis:
            return clean
        return {
            **clean,
            "FLOWLOG_REDIS_URL": self.url,
            "FLOWLOG_STORE__PREFIX": prefix or self.prefix,
            "FLOWLOG_STORE__PARTITIONS": "4",
        }

    def flowlog(
        self, *args: str, prefix: str | None = None, redis: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.env(prefix, redis=redis),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def json(self, *args: str, prefix: str | None = None, redis: bool = True) -> Any:
        done = self.flowlog(*args, "-o", "json", prefix=prefix, redis=redis)
        assert done.returncode in (0, 1), done.stderr
        return msgspec.json.decode(done.stdout)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module scope, so the run is recorded once for the module."""
    return "asyncio"


@pytest.fixture(scope="module")
async def recorded(redis_server: RedisServer) -> AsyncIterator[Recorded]:
    """The retry example run to completion by the four services on the test's Redis."""
    config = isolated(StoreConfig(partitions=4))
    store = RedisStore.from_url(redis_server.url, config)
    settings = Settings(http_port=0, redis_url=None)
    try:
        async with running(store, settings):
            definition = load_definition(REPO / "examples" / "retry.yaml")
            run_id = (await commands.submit(store, Producer("cli"), definition)).run_id
            state = await commands.wait(store, run_id, timeout_s=30)
            assert state.status == "completed"
            await caught_up(store, "checkpointer", "metrics")
        yield Recorded(url=redis_server.url, prefix=config.prefix, run_id=run_id)
    finally:
        await store.close()


async def test_replay_prints_timeline_and_state(recorded: Recorded) -> None:
    report = recorded.json("replay", recorded.run_id)
    timeline = report["timeline"]
    assert [row["seq"] for row in timeline] == list(range(1, len(timeline) + 1))
    assert timeline[0]["type"] == "run_submitted"
    assert timeline[0]["producer"].startswith("cli:")
    scheduled = next(row for row in timeline if row["type"] == "step_scheduled")
    assert (scheduled["step"], scheduled["attempt"], scheduled["agent"]) == (
        "unreliable",
        1,
        "flaky",
    )
    assert scheduled["caused_by"] is not None
    assert report["state"]["status"] == "completed"
    assert report["state"]["steps"]["unreliable"]["attempts"] == 3

    lines = recorded.flowlog("replay", recorded.run_id, "-o", "jsonl").stdout.splitlines()
    assert len(lines) == len(timeline) + 1
    assert msgspec.json.decode(lines[0]) == timeline[0]
    assert msgspec.json.decode(lines[-1])["state"] == report["state"]

    people = recorded.flowlog("replay", recorded.run_id)
    assert people.returncode == 0, people.stderr
    assert "step_retry_scheduled" in people.stdout
    assert "completed" in people.stdout


async def test_replay_as_of_seq_and_time(recorded: Recorded) -> None:
    timeline = recorded.json("replay", recorded.run_id)["timeline"]
    at_seq = recorded.json("replay", recorded.run_id, "--as-of", "3")
    assert at_seq["seq"] == 3
    assert len(at_seq["timeline"]) == 3
    assert at_seq["state"]["status"] == "running"
    moment = timeline[4]["ts"]
    at_time = recorded.json("replay", recorded.run_id, "--as-of", str(moment))
    assert at_time["timeline"][-1]["ts"] == moment
    assert at_time["seq"] >= 5


async def test_replay_verify_passes_then_reports_a_bad_snapshot(recorded: Recorded) -> None:
    verified = recorded.flowlog("replay", recorded.run_id, "--verify", "-o", "json")
    assert verified.returncode == 0, verified.stdout
    assert msgspec.json.decode(verified.stdout)["differences"] == []

    store = RedisStore.from_url(recorded.url, StoreConfig(prefix=recorded.prefix, partitions=4))
    try:
        good = await store.get_snapshot(recorded.run_id)
        state = await commands.load_run(store, recorded.run_id)
        await store.put_snapshot(
            snapshot_of(msgspec.structs.replace(state, status="failed", degraded=True))
        )
        broken = recorded.flowlog("replay", recorded.run_id, "--verify", "-o", "json")
        assert broken.returncode == 1
        differences = msgspec.json.decode(broken.stdout)["differences"]
        assert differences == [
            {"path": "snapshot.state.status", "expected": "completed", "found": "failed"},
            {"path": "snapshot.state.degraded", "expected": False, "found": True},
        ]
        people = recorded.flowlog("replay", recorded.run_id, "--verify")
        assert people.returncode == 1
        assert "snapshot.state.status" in people.stdout
    finally:
        if good is not None:
            await store.put_snapshot(good)
        await store.close()
    assert good is not None
    assert good.version == STATE_VERSION


async def test_export_replay_without_redis_and_import_twice(
    recorded: Recorded, tmp_path: Path
) -> None:
    live = recorded.json("replay", recorded.run_id)
    file = tmp_path / "export.jsonl.gz"
    exported = recorded.json("export", recorded.run_id, "--out", str(file))
    assert exported["events"] == len(live["timeline"])

    offline = recorded.json("replay", recorded.run_id, "--from", str(file), redis=False)
    assert offline == live
    missing = recorded.flowlog("replay", "run-unknown", "--from", str(file), redis=False)
    assert missing.returncode == 2
    assert "no events of run 'run-unknown'" in missing.stderr

    target = isolated(StoreConfig()).prefix
    first = recorded.json("import", str(file), prefix=target)
    assert (first["appended"], first["duplicate"], first["refused"]) == (
        exported["events"],
        0,
        {},
    )
    second = recorded.json("import", str(file), prefix=target)
    assert (second["appended"], second["duplicate"]) == (0, exported["events"])
    imported = recorded.flowlog("replay", recorded.run_id, "--verify", "-o", "json", prefix=target)
    assert imported.returncode == 0, imported.stdout
    assert msgspec.json.decode(imported.stdout)["timeline"] == live["timeline"]


async def test_replay_against_a_changed_definition(recorded: Recorded, tmp_path: Path) -> None:
    original = (REPO / "examples" / "retry.yaml").read_text()
    same = tmp_path / "same.yaml"
    same.write_text(original)
    assert recorded.json("replay", recorded.run_id, "--definition", str(same))["divergence"] is None
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(original.replace("max_attempts: 3", "max_attempts: 2"))
    done = recorded.flowlog("replay", recorded.run_id, "--definition", str(stricter), "-o", "json")
    assert done.returncode == 1
    divergence = msgspec.json.decode(done.stdout)["divergence"]
    assert divergence["recorded"][0]["type"] == "step_retry_scheduled"
    assert divergence["new"][0]["type"] == "run_failed"
    people = recorded.flowlog("replay", recorded.run_id, "--definition", str(stricter))
    assert f"first different decision at seq {divergence['seq']}" in people.stdout


async def test_rebuild_reports_events_per_second(recorded: Recorded) -> None:
    report = recorded.json("rebuild")
    assert report["runs"] == 1
    assert report["by_status"] == {"completed": 1}
    assert report["events"] == len(recorded.json("replay", recorded.run_id)["timeline"])
    assert report["events_per_s"] > 0
    people = recorded.flowlog("rebuild")
    assert people.returncode == 0, people.stderr
    assert "events/s" in people.stdout


@pytest.mark.parametrize("command", [["audit", "verify"], ["export", "--out", "unused.jsonl"]])
async def test_a_run_the_store_does_not_hold_is_an_error_not_an_empty_success(
    recorded: Recorded, tmp_path: Path, command: list[str]
) -> None:
    """A mistyped or expired run id: audit verify must not call it intact, export must not
    write an empty file."""
    if command[0] == "export":
        command = ["export", "--out", str(tmp_path / "out.jsonl")]
    done = recorded.flowlog(*command, "no-such-run", recorded.run_id, "-o", "json")
    assert done.returncode == 2, done.stdout
    error = msgspec.json.decode(done.stdout)
    assert error["error"] == "RunNotFound"
    assert "no-such-run" in error["message"]
    assert recorded.run_id not in error["message"]
    assert not (tmp_path / "out.jsonl").exists()
