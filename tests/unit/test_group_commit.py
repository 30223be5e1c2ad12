"""Group commit batches concurrent submissions and keeps every caller's own result."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from services.group_commit import GroupCommit

pytestmark = pytest.mark.anyio


async def test_concurrent_items_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []
    release = anyio.Event()

    async def flush(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            await release.wait()
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(flush)
    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await commit.submit(i)

    async with anyio.create_task_group() as tg:
        await tg.start(commit.run)
        tg.start_soon(call, 0)
        await anyio.wait_all_tasks_blocked()
        for i in range(1, 6):
            tg.start_soon(call, i)
        await anyio.wait_all_tasks_blocked()
        release.set()
        with anyio.fail_after(5):
            while len(results) < 6:
                await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert results == {i: i * 10 for i in range(6)}


async def test_a_failed_flush_raises_in_every_caller_of_the_batch() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        raise RuntimeError("store down")

    commit: GroupCommit[int, int] = GroupCommit(flush)
    errors: list[str] = []

    async def call(i: int) -> None:
        try:
            await commit.submit(i)
        except RuntimeError as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg:
        await tg.start(commit.run)
        async with anyio.create_task_group() as callers:
            for i in range(3):
                callers.start_soon(call, i)
        tg.cancel_scope.cancel()
    assert errors == ["store down"] * 3


class BadItem(ValueError):
    """An error naming one item of a batch."""


async def test_an_isolated_error_fails_only_the_item_that_caused_it() -> None:
    batches: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if 13 in items:
            raise BadItem("13 is refused; nothing was written")
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(flush, isolate=(BadItem,))
    outcomes: dict[int, int | str] = {}

    async def call(i: int) -> None:
        try:
            outcomes[i] = await commit.submit(i)
        except BadItem as exc:
            outcomes[i] = str(exc)

    async with anyio.create_task_group() as tg:
        # every caller queues before the commit task takes its first batch
        for i in (12, 13, 14):
            tg.start_soon(call, i)
        await anyio.wait_all_tasks_blocked()
        await tg.start(commit.run)
        with anyio.fail_after(5):
            while len(outcomes) < 3:
                await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert batches == [[12, 13, 14], [12], [13], [14]]
    assert outcomes == {12: 120, 13: "13 is refused; nothing was written", 14: 140}
