"""Injected faults on 4 gloo ranks are detected and localized by the monitor (end to end:
probing backend, reporters, collector on rank 0, detector, events file)."""

from __future__ import annotations

import json
import os

import pytest
from elastickit.monitor import register_backend

from tests._dist import RankError, run_ranks

BACKEND = register_backend()

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _loop(
    rank: int, world_size: int, events_path: str, specs: list[str], steps: int, abort_on_hang: bool
) -> int:
    """A tiny hybrid job: ~40 ms of compute, a p2p ring, tp-pair and world all-reduces."""
    import time

    import torch
    import torch.distributed as dist

    from elastickit.faults import build_step_hooks

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = pairs[rank // 2]
    hooks = build_step_hooks(specs, events_path, rank, world_size, abort_on_hang=abort_on_hang)
    x = torch.ones(256)
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            for h in hooks:
                h.on_step_start(step)
            time.sleep(0.04)
            ops = [
                dist.P2POp(dist.isend, x, (rank + 1) % world_size),
                dist.P2POp(dist.irecv, torch.empty(256), (rank - 1) % world_size),
            ]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            dist.all_reduce(x, group=mine)
            dist.all_reduce(x)
            x.fill_(1.0)
            dt = time.perf_counter() - t0
            for h in hooks:
                h.on_step_end(step, 0.0, dt)
    finally:
        for h in hooks:
            h.close()
    return steps


def _events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(
    tmp_path,
    specs: list[str],
    steps: int,
    abort_on_hang: bool = False,
    expect_failure: bool = False,
) -> list[dict]:
    path = str(tmp_path / "events.jsonl")
    try:
        run_ranks(
            _loop,
            world_size=4,
            args=(path, specs, steps, abort_on_hang),
            timeout_s=90,
            backend=BACKEND,
            error_grace_s=4.0,
        )
    except RankError:
        if not expect_failure:
            raise
    return _events(path)


def test_slow_rank_is_named(tmp_path) -> None:
    events = _run(tmp_path, ["slow:rank=2:ms=30:step=2"], steps=14)
    kinds = {(e["type"], tuple(e["ranks"])) for e in events}
    assert ("slow_rank", (2,)) in kinds, events
    assert not [e for e in events if e["type"] == "slow_rank" and e["ranks"] != [2]], events
    assert all(e["type"] != "crash" and e["type"] != "hang" for e in events), events
    first = next(e for e in events if e["type"] == "slow_rank")
    for field in ("type", "ranks", "step", "time", "op", "evidence", "confidence"):
        assert field in first
    assert first["step"] <= 2 + 8, first  # named within a handful of steps of the onset


def test_slow_link_names_the_pair(tmp_path) -> None:
    events = _run(tmp_path, ["slowlink:src=1:dst=2:ms=25"], steps=12)
    links = [tuple(e["ranks"]) for e in events if e["type"] == "slow_link"]
    assert (1, 2) in links, events
    assert not [e for e in events if e["type"] == "slow_rank" and e["ranks"][0] not in (1, 2)]


def test_hang_is_localized_and_aborts_the_job(tmp_path) -> None:
    events = _run(
        tmp_path, ["hang:rank=3:step=5"], steps=40, abort_on_hang=True, expect_failure=True
    )
    hangs = [e for e in events if e["type"] == "hang"]
    assert hangs, events
    assert hangs[0]["ranks"] == [3]
    assert hangs[0]["op"] and hangs[0]["seq"] > 0
    assert 3 not in hangs[0]["evidence"]["waiting_ranks"]


def test_crash_is_reported(tmp_path) -> None:
    events = _run(tmp_path, ["crash:rank=1:step=4"], steps=40, expect_failure=True)
    crashes = [e for e in events if e["type"] == "crash"]
    assert crashes and crashes[0]["ranks"] == [1], events
    assert crashes[0]["evidence"]["process_exited"] is True
