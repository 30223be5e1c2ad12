"""Tamper evidence on a real Redis: history changed through raw commands is detected, located
at the right run and seq, by ``verify_runs`` and by ``flowlog audit verify``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from support.processes import REPO
from support.redis_server import RedisServer, admin_client, isolated

from eventstore import codec
from eventstore.audit import Anchor, legacy_chain_hash
from eventstore.events import Envelope, RunSubmitted, StepSucceeded
from eventstore.keys import Keys
from eventstore.redis_conn import command
from eventstore.redis_store import RedisStore
from eventstore.store import StoreConfig
from projections.run_state import replay
from services.cli_audit import verify_runs
from services.replay import verify_run_state

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

KEY = b"audit key for tests"
RUNS = ("run-a", "run-b", "run-c")
EVENTS_PER_RUN = 8


def event(run_id: str, n: int, output: Any = None) -> Envelope:
    data: Any = (
        RunSubmitted(workflow="wf", digest="d", definition="steps: []")
        if n == 1
        else StepSucceeded(step=f"s{n}", attempt=1, agent="echo", output=output or n)
    )
    return Envelope(event_id=f"{run_id}-{n}", run_id=run_id, ts=1_000 + n, producer="t", data=data)


class Tamper:
    """A store with three recorded runs and a raw admin connection to change them."""

    def __init__(self, store: RedisStore, admin: aioredis.Redis, url: str) -> None:
        self.store = store
        self.admin = admin
        self.url = url
        self.keys = Keys(store.config.prefix, store.config.partitions)

    async def redis(self, *args: Any) -> Any:
        return await command(self.admin, *args)

    async def entries(self, run_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        flat = await self.redis("XRANGE", self.keys.run(run_id), "-", "+")
        return [(entry_id, dict(zip(f[::2], f[1::2], strict=True))) for entry_id, f in flat]

    async def findings(
        self, key: bytes = KEY, anchors: dict[str, Anchor] | None = None
    ) -> list[tuple[str, int, str]]:
        found = await verify_runs(self.store, list(RUNS), key=key, anchors=anchors or {})
        return [(f.run_id, f.seq, f.kind) for f in found]

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWLOG_")}
        return {
            **clean,
            "FLOWLOG_REDIS_URL": self.url,
            "FLOWLOG_STORE__PREFIX": self.store.config.prefix,
            "FLOWLOG_STORE__PARTITIONS": str(self.store.config.partitions),
            "FLOWLOG_AUDIT_KEY": KEY.decode(),
        }

    def flowlog(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=self.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
async def tamper(redis_server: RedisServer) -> AsyncIterator[Tamper]:
    config = isolated(StoreConfig(partitions=4, audit_key=KEY))
    store = RedisStore.from_url(redis_server.url, config)
    admin = admin_client(redis_server.url)
    try:
        for run_id in RUNS:
            for n in range(1, EVENTS_PER_RUN + 1, 3):
                last = min(n + 3, EVENTS_PER_RUN + 1)
                await store.append(run_id, [event(run_id, i) for i in range(n, last)])
        yield Tamper(store, admin, redis_server.url)
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
            await admin.aclose()


async def test_untouched_history_verifies(tamper: Tamper) -> None:
    assert await tamper.findings() == []
    assert await tamper.findings(key=b"") == []


async def test_forged_entry_added_with_xadd_is_located(tamper: Tamper) -> None:
    forged = codec.encode(event("run-b", EVENTS_PER_RUN + 1, output="forged"))
    seq = EVENTS_PER_RUN + 1
    await tamper.redis(
        "XADD", tamper.keys.run("run-b"), f"{seq}-0", "s", seq, "e", forged,
        "h", "0" * 40, "m", "0" * 64,
    )  # fmt: skip
    assert await tamper.findings() == [("run-b", seq, "inserted")]


async def test_forged_entry_inserted_by_rebuilding_the_stream_is_located(tamper: Tamper) -> None:
    run_key = tamper.keys.run("run-b")
    entries = await tamper.entries("run-b")
    await tamper.redis("DEL", run_key)
    forged = codec.encode(event("run-b", 4, output="forged"))
    for entry_id, fields in entries:
        await tamper.redis("XADD", run_key, entry_id, *(x for kv in fields.items() for x in kv))
        if entry_id == b"3-0":
            await tamper.redis(
                "XADD", run_key, "3-1", "s", 4, "e", forged, "h", "0" * 40, "m", "0" * 64
            )
    assert await tamper.findings() == [("run-b", 4, "inserted")]


async def test_forged_entry_after_the_last_is_located(tamper: Tamper) -> None:
    forged = codec.encode(event("run-a", EVENTS_PER_RUN + 1))
    entries = await tamper.entries("run-a")
    previous = entries[-1][1][b"h"].decode()
    chain = codec.chain_hash(previous, EVENTS_PER_RUN + 1, forged)
    await tamper.redis(
        "XADD", tamper.keys.run("run-a"), "*", "s", EVENTS_PER_RUN + 1, "e", forged, "h", chain
    )
    assert await tamper.findings() == [("run-a", EVENTS_PER_RUN + 1, "inserted")]


async def test_deleted_entry_is_located(tamper: Tamper) -> None:
    await tamper.redis("XDEL", tamper.keys.run("run-c"), "5-0")
    assert await tamper.findings() == [("run-c", 5, "deleted")]


async def test_rewritten_payload_with_recomputed_sha1_chain_is_caught_by_the_mac(
    tamper: Tamper,
) -> None:
    run_key = tamper.keys.run("run-a")
    entries = await tamper.entries("run-a")
    await tamper.redis("DEL", run_key)
    chain = ""
    for entry_id, fields in entries:
        seq = int(fields[b"s"])
        raw = codec.encode(event("run-a", 3, output="paid twice")) if seq == 3 else fields[b"e"]
        chain = codec.chain_hash(chain, seq, raw)
        await tamper.redis(
            "XADD", run_key, entry_id, "s", seq, "e", raw, "h", chain, "m", fields[b"m"]
        )
    await tamper.redis("HSET", tamper.keys.head("run-a"), "hash", chain)
    assert await tamper.findings(key=b"") == []
    assert await tamper.findings() == [("run-a", 3, "modified")]


async def test_a_run_begun_by_an_earlier_build_verifies(tamper: Tamper) -> None:
    """Its first entries carry the earlier chain hash (over the envelope bytes themselves), the
    rest the current one, as an upgrade in the middle of the run leaves it."""
    run_key = tamper.keys.run("run-a")
    entries = await tamper.entries("run-a")
    events = [e async for e in tamper.store.read_run("run-a")]

    async def rebuild(earlier: set[int]) -> None:
        """The stream again, with the earlier hash on the entries of ``earlier``."""
        await tamper.redis("DEL", run_key)
        chain = ""
        for entry_id, fields in entries:
            seq, raw = int(fields[b"s"]), fields[b"e"]
            hash_of = legacy_chain_hash if seq in earlier else codec.chain_hash
            chain = hash_of(chain, seq, raw)
            await tamper.redis(
                "XADD", run_key, entry_id, "s", seq, "e", raw, "h", chain, "m", fields[b"m"]
            )
        await tamper.redis("HSET", tamper.keys.head("run-a"), "hash", chain)

    await rebuild({1, 2, 3, 4})
    assert await tamper.findings() == []
    assert await verify_run_state(tamper.store, "run-a", events) == (replay(events), [])
    # The earlier hash is not accepted after an entry with the current one.
    await rebuild({1, 2, 3, 4, EVENTS_PER_RUN})
    assert await tamper.findings() == [("run-a", EVENTS_PER_RUN, "modified")]
    _, differences = await verify_run_state(tamper.store, "run-a", events)
    assert [d.path for d in differences] == ["head.hash"]


async def test_truncated_tail_with_consistent_head_is_caught_by_anchors(tamper: Tamper) -> None:
    head = await tamper.store.head("run-b")
    assert head is not None
    anchor = Anchor(seq=head.seq, hash=head.hash, mac=head.mac)
    entries = await tamper.entries("run-b")
    await tamper.redis("XDEL", tamper.keys.run("run-b"), "7-0", "8-0")
    kept = entries[5][1]
    await tamper.redis(
        "HSET", tamper.keys.head("run-b"), "seq", 6, "hash", kept[b"h"], "mac", kept[b"m"]
    )
    assert await tamper.findings() == []
    assert await tamper.findings(anchors={"run-b": anchor}) == [
        ("run-b", EVENTS_PER_RUN, "truncated")
    ]


async def test_cli_verify_and_anchor(tamper: Tamper, tmp_path: Path) -> None:
    anchored = tamper.flowlog("audit", "anchor")
    assert anchored.returncode == 0, anchored.stderr
    anchors = json.loads(anchored.stdout)
    assert set(anchors) == set(RUNS)
    assert anchors["run-a"]["seq"] == EVENTS_PER_RUN
    file = tmp_path / "anchors.json"
    file.write_text(anchored.stdout)

    clean = tamper.flowlog("audit", "verify", "--all", "--anchors", str(file), "-o", "json")
    assert clean.returncode == 0, clean.stderr
    assert msgspec.json.decode(clean.stdout) == {"runs": 3, "mac_checked": True, "findings": []}

    await tamper.redis("XDEL", tamper.keys.run("run-c"), "2-0")
    await tamper.redis("XDEL", tamper.keys.run("run-a"), "7-0", "8-0")
    broken = tamper.flowlog("audit", "verify", "--anchors", str(file), "-o", "json")
    assert broken.returncode == 1
    found = msgspec.json.decode(broken.stdout)["findings"]
    assert [(f["run_id"], f["seq"], f["kind"]) for f in found] == [
        ("run-a", 8, "head_mismatch"),
        ("run-a", 8, "truncated"),
        ("run-c", 2, "deleted"),
    ]
    people = tamper.flowlog("audit", "verify", "run-c")
    assert people.returncode == 1
    assert "deleted" in people.stdout
    assert "run-c" in people.stdout
