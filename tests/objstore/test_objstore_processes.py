"""The object-storage tier across processes: two gloo ranks saving and restoring bit-exactly,
and a saving process killed (SIGKILL) in the middle of an upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.storage.objstore import ObjectRoot

import elastickit as ek
from tests._dist import run_ranks
from tests._s3 import s3fs_client


def _work(rank: int, world: int, url: str):
    import torch

    import elastickit as ek
    from tests.dist.test_checkpoint_dist import _build, _full, _step

    model, optim, mesh = _build(0, world, 1)
    dp_rank = mesh["dp"].get_local_rank()
    for s in range(2):
        _step(model, optim, s, dp_rank, world)
    ck = ek.Checkpointer(url, layout=mesh)
    ck.save(2, {"model": model, "optim": optim})
    saved = _full(model, optim)
    ref = _step(model, optim, 2, dp_rank, world)
    ck.close()
    model2, optim2, _ = _build(99, world, 1)
    with ek.Checkpointer(url, layout=mesh) as ck:
        step = ck.restore({"model": model2, "optim": optim2})
    restored = _full(model2, optim2)
    got = _step(model2, optim2, 2, dp_rank, world)
    same = sorted(k for k in saved if torch.equal(saved[k], restored[k]))
    return {"step": step, "keys": sorted(saved), "same": same, "ref": ref, "got": got}


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_two_ranks_save_restore_bit_exact(bucket):
    url = f"s3://{bucket}/run"
    results = run_ranks(_work, 2, (url,), timeout_s=200)
    for r in results:
        assert r["step"] == 2
        assert r["same"] == r["keys"], "state after restore differs from the saved state"
        assert r["got"] == r["ref"], "next-step loss after restore is not bit-identical"
    keys = sorted(k.rsplit("/", 1)[1] for k in s3fs_client().find(f"{bucket}/run/step-00000002"))
    assert keys == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"]


SAVER = r"""
import sys, torch
import elastickit as ek
url = sys.argv[1]
torch.manual_seed(0)
small = {"w": torch.randn(64, 64)}
with_big = {"w": small["w"] + 1, "big": torch.randn(48 << 20 >> 2)}   # 48 MiB: two parts or more
ck = ek.Checkpointer(url, lazy="never")
ck.save(1, {"model": small}); ck.wait()
print("step 1 committed", flush=True)
ck.save(2, {"model": with_big}); ck.wait()
print("step 2 committed", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_upload_leaves_earlier_checkpoints_and_no_partial_step(bucket, tmp_path):
    url = f"s3://{bucket}/run"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, url], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    fs = s3fs_client()
    try:
        assert proc.stdout.readline().strip() == "step 1 committed"
        # Wait until step 2's multipart upload is under way (parts arriving), then kill -9.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ups = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="run/step-00000002/").get("Uploads", [])
            if ups and fs.call_s3("list_parts", Bucket=bucket, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"]).get("Parts"):
                break
            assert proc.poll() is None, "the saver finished before it could be killed"
        else:
            pytest.fail("step 2's upload never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    root = ObjectRoot(url)
    assert root.committed_steps() == [1]  # the partial step is invisible
    assert [c.step for c in root.list_steps()] == [1]  # no object of step 2 exists at all
    # The next writer of the root takes the dead writer's lease (same host, pid gone), aborts its
    # orphaned upload, and restores step 1 bit-exactly.
    torch.manual_seed(0)
    want = torch.randn(64, 64)
    state = {"model": {"w": torch.zeros(64, 64)}}
    with ek.Checkpointer(url) as ck:
        assert fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="run/").get("Uploads", []) == []
        assert ck.restore(state) == 1
    assert torch.equal(state["model"]["w"], want)


HOLDER = r"""
import sys
import elastickit as ek
ck = ek.Checkpointer(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(120)
def test_a_second_writer_is_refused_naming_the_holder(bucket):
    url = f"s3://{bucket}/run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(RequestError, match=rf"checkpoint root {url} is in use by pid {proc.pid} on host"):
            ek.Checkpointer(url)
    finally:
        proc.kill()
        proc.wait()
    # The killed holder's lease is taken at once; two Checkpointers of one process share it.
    with ek.Checkpointer(url) as a, ek.Checkpointer(url) as b:
        a.save(1, {"model": {"w": torch.ones(2)}})
        a.wait()
        assert b.latest() == 1
    assert "run/.elastickit.lock" not in [k.split("/", 1)[1] for k in s3fs_client().find(bucket)]
