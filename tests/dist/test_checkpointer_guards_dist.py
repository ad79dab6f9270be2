"""Issue 13's Checkpointer guards across ranks: every rank of a job raises the same sentence."""

import os
import subprocess
import sys

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist]

HOLDER = r"""
import sys
import elastickit as ek
ck = ek.Checkpointer(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def _construct(rank: int, world: int, root: str):
    from elastickit.checkpoint.errors import RequestError

    import elastickit as ek

    try:
        ek.Checkpointer(root).close()
        return None
    except RequestError as e:
        return str(e)


@pytest.mark.timeout(240)
def test_every_rank_of_a_second_job_is_refused_naming_the_holder(tmp_path):
    root = str(tmp_path / "root")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        got = run_ranks(_construct, 2, (root,), timeout_s=150)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert got[0] == got[1] and got[0] is not None
    assert got[0].startswith(f"the checkpoint root {root} is in use by pid {holder.pid} on host")
    assert run_ranks(_construct, 2, (root,), timeout_s=150) == [None, None]  # the holder is gone
    assert os.path.isfile(os.path.join(root, ".elastickit.lock"))


def _stage(rank: int, seed: int, layers: int = 2, rows: int = 4):
    import torch

    # Each rank holds its own layers under their own names, as pipeline stages do.
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(
        {f"r{rank}": torch.nn.Sequential(*[torch.nn.Linear(4, rows if i == 0 else 4) for i in range(layers)])}
    )


def _strict(rank: int, world: int, root: str):
    import torch
    from elastickit.checkpoint.errors import MismatchError
    from elastickit.checkpoint.events import read_events

    import elastickit as ek

    def attempt(model, **kw):
        with ek.Checkpointer(root) as ck:
            try:
                return ck.restore({"model": model}, **kw), ck.last_restore
            except MismatchError as e:
                return str(e), None

    saved = _stage(rank, rank)
    with ek.Checkpointer(root) as ck:
        for step in (1, 2):
            ck.save(step, {"model": saved})
    out = {}
    fresh = _stage(rank, 10 + rank)  # no rank loads every tensor, all ranks together do: it fits
    out["fits"] = attempt(fresh)[0]
    out["same"] = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), saved.state_dict().values()))
    out["smaller"] = attempt(_stage(rank, 20, layers=1 if rank == 1 else 2))[0]  # rank 1 lost a layer
    step, report = attempt(_stage(rank, 20, layers=1 if rank == 1 else 2), strict=False)
    out["lenient"] = (step, report.unused if report else None)
    out["shape"] = attempt(_stage(rank, 30, rows=5 if rank == 0 else 4))[0]  # rank 0: another shape
    if rank == 0:
        out["fallbacks"] = [e for e in read_events(os.path.join(root, "events.jsonl")) if e["type"] == "restore_fallback"]
    return out


@pytest.mark.timeout(300)
def test_strictness_counts_all_ranks_and_a_mismatch_raises_once_everywhere(tmp_path):
    root = str(tmp_path / "root")
    got = run_ranks(_strict, 2, (root,), timeout_s=240)
    for r in (0, 1):
        assert got[r]["fits"] == 2 and got[r]["same"]
        assert got[r]["smaller"] == (
            f"step 2 on the persistent tier ({root}/step-00000002) does not fit the state restored into "
            "it: 2 checkpoint tensor(s) are not in the state (model/r1.1.bias, model/r1.1.weight); restore "
            "into the model that was saved, or pass strict=False to load what matches"
        )
        assert got[r]["lenient"] == (2, ("model/r1.1.bias", "model/r1.1.weight"))
        assert got[r]["shape"].startswith(
            f"rank 0: the model's tensor 'model/r0.0.weight' has shape [5, 4] (F32), but in "
            f"{root}/step-00000002 it has shape [4, 4] (F32): they are different models"
        )
    assert got[0]["fallbacks"] == []  # step 1 was never tried for a mismatch
