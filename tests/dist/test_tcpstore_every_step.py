"""Checkpointing every step under a real TCPStore (as torchrun gives): saves are local to the
training thread (no store round), and the tier's rounds never deadlock.

A regression test: a tier thread blocked in `store.wait` used to hold the TCPStore client, so
the training thread's next round could not even `set` its key while the other rank waited for
it (found by benchmarks/bench_async.py).
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.dist]

WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist
rank, world, port_file, root, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
os.environ.update(RANK=str(rank), WORLD_SIZE="2")
torch.set_num_threads(1)
# Rank 0 hosts the store on a port the OS picks (port 0) and tells rank 1 through a file.
if rank == 0:
    store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(store.port))
    os.replace(port_file + ".tmp", port_file)
else:
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    store = dist.TCPStore("127.0.0.1", int(open(port_file).read()), world, False)
dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
import elastickit as ek
from elastickit.checkpoint.tiers import Tiers, TierSpec
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
# A tier that rests between commits (as by default) and commits often, while saves go on.
ck = ek.Checkpointer(root, tiers=Tiers(persistent=TierSpec(max_busy_fraction=0.5)))
# Saves are local: the training thread never takes part in a store round.
import threading
from elastickit.checkpoint import coord
rounds = []
real = coord.StoreCoordinator.all_gather
def counted(self, value, *, phase):
    rounds.append((threading.current_thread().name, phase))
    return real(self, value, phase=phase)
coord.StoreCoordinator.all_gather = counted
taken = 0
for step in range(1, 41):
    optim.zero_grad()
    model(torch.randn(8, 64)).sum().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    optim.step()
    taken += ck.save(step, {"model": model, "optim": optim}).scheduled
main_rounds = [p for t, p in rounds if t == threading.main_thread().name]
ck.close()
json.dump({"taken": taken, "latest": ck.latest(), "main_rounds": main_rounds, "tier_rounds": len(rounds)}, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_every_step_under_tcpstore_finishes(tmp_path):
    port_file = str(tmp_path / "port")
    outs = [tmp_path / f"r{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), port_file, str(tmp_path / "ck"), str(outs[r])],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        for p in procs:
            p.wait(timeout=150)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads(o.read_text()) for o in outs if o.exists()]
    assert len(results) == 2, [p.stderr.read()[-2000:] for p in procs]
    assert all(r["taken"] == 40 for r in results)
    assert all(r["main_rounds"] == [] for r in results)  # no store round on the training thread
    assert all(r["tier_rounds"] > 0 for r in results)  # the tier agreed and committed meanwhile
    assert all(r["latest"] == 40 for r in results)
    assert os.path.exists(tmp_path / "ck" / "step-00000040" / "manifest.json")
