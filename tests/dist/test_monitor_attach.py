"""One call for any torch.distributed job: attach(optimizer=...) on a DDP loop names the rank
that sleeps every step, and serves metrics on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from elastickit.monitor import register_backend

from tests._dist import run_ranks

BACKEND = register_backend()

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _ddp_loop(rank: int, world_size: int, events_path: str) -> dict[str, object]:
    import time
    import urllib.request

    import elastickit.monitor as ekm
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(torch.nn.Linear(16, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    metrics = ""
    with ekm.attach(optimizer=opt, events_path=events_path, metrics_port=0) as mon:
        for _ in range(12):
            time.sleep(0.03 + (0.03 if rank == 1 else 0.0))  # rank 1: a straggler
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
        if rank == 0:
            time.sleep(0.5)  # let the collector see the last summaries
            url = f"http://127.0.0.1:{mon.metrics_port}/metrics"
            metrics = urllib.request.urlopen(url, timeout=5).read().decode()
        events = [e.to_dict() for e in mon.events]
    return {"events": events, "metrics": metrics}


def test_attach_with_optimizer_names_the_straggler(tmp_path) -> None:
    path = str(tmp_path / "events.jsonl")
    results = run_ranks(_ddp_loop, world_size=2, args=(path,), timeout_s=100, backend=BACKEND)
    with open(path) as f:
        events = [json.loads(line) for line in f]
    assert [(e["type"], e["ranks"]) for e in events] == [("slow_rank", [1])], events
    metrics = results[0]["metrics"]
    assert 'ekmon_step_time_seconds{rank="1"}' in metrics
    assert 'ekmon_events_total{type="slow_rank"} 1.0' in metrics
    assert results[1]["events"] == []  # the collector runs on rank 0 only
